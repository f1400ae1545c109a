/// An OCI content descriptor: what a blob is, its digest and its exact size.
public struct Descriptor: Hashable, Sendable, Codable {
    public var mediaType: String
    public var digest: Digest
    public var size: Int64
    public var annotations: [String: String]?

    public init(mediaType: String, digest: Digest, size: Int64, annotations: [String: String]? = nil) {
        self.mediaType = mediaType
        self.digest = digest
        self.size = size
        self.annotations = annotations
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        mediaType = try container.decodeIfPresent(String.self, forKey: .mediaType) ?? ""
        digest = try container.decode(Digest.self, forKey: .digest)
        size = try container.decode(Int64.self, forKey: .size)
        annotations = try container.decodeIfPresent([String: String].self, forKey: .annotations)
        if let problem = Self.sizeProblem(size, of: digest) {
            throw DecodingError.dataCorruptedError(forKey: .size, in: container, debugDescription: problem)
        }
    }

    /// The largest size a blob may declare: 4 EiB. No filesystem Linux mounts holds a file that
    /// large (ext4 stops at 16 TiB, XFS and Btrfs at 8 EiB), and the read path adds offsets,
    /// read lengths and roundings to blocks and chunks to sizes: below 2^62 none of that can
    /// overflow an Int64.
    public static let maximumSize: Int64 = 1 << 62

    /// Why `size` cannot be the size of the blob `digest`, or nil when it can.
    public static func sizeProblem(_ size: Int64, of digest: Digest) -> String? {
        guard size < 0 || size > maximumSize else { return nil }
        return "blob \(digest) declares \(size) bytes; a blob holds 0 to \(maximumSize) bytes (2^62)"
    }
}
