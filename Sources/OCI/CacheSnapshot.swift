/// Everything the mount shows, resolved once at mount time: tags, the small blobs (manifests
/// and configs, exact bytes) and the sizes of the large ones (layers, fetched lazily).
public struct CacheSnapshot: Sendable {
    public var tags: [OCILayout.TaggedManifest] = []
    public var smallBlobs: [Digest: [UInt8]] = [:]
    public var lazyBlobs: [Digest: Int64] = [:]
    /// Things a person should know that do not stop the mount (a tag that does not exist yet).
    public var warnings: [String] = []

    public init() {}

    public mutating func addLazyBlob(_ descriptor: Descriptor) {
        if smallBlobs[descriptor.digest] == nil { lazyBlobs[descriptor.digest] = descriptor.size }
    }

    public mutating func addSmallBlob(_ digest: Digest, _ bytes: [UInt8]) {
        smallBlobs[digest] = bytes
        lazyBlobs[digest] = nil
    }

    /// Adds what `other` resolved, as if its blobs had been added here after these.
    public mutating func merge(_ other: CacheSnapshot) {
        tags += other.tags
        warnings += other.warnings
        for (digest, bytes) in other.smallBlobs { addSmallBlob(digest, bytes) }
        for (digest, size) in other.lazyBlobs where smallBlobs[digest] == nil { lazyBlobs[digest] = size }
    }

    /// The same resolution with every tag shown as `name`: a ref that a mount shows under a
    /// name of its own (`--tag NAME=SOURCE`).
    public func showingTags(as name: String) -> CacheSnapshot {
        var renamed = self
        renamed.tags = tags.map { OCILayout.TaggedManifest(tag: name, manifest: $0.manifest) }
        return renamed
    }

    /// The manifest each tag points at.
    public var tagDigests: [String: Digest] {
        Dictionary(tags.map { ($0.tag, $0.manifest.digest) }, uniquingKeysWith: { first, _ in first })
    }
}

/// Where blob bytes come from: the one thing the content cache asks of the network. Calls
/// block the calling thread and every wait inside them is bounded.
public protocol BlobSource: Sendable {
    /// Streams a blob's bytes from `offset` through `last` (inclusive; nil: to its end).
    /// `onStart` receives the offset the body actually starts at (0 when the server ignored the
    /// range, in which case the body runs to the blob's end), before any body byte. Errors
    /// that may pass on another attempt conform to `BlobSourceFailure`.
    func streamBlob(
        _ digest: Digest, from offset: Int64, through last: Int64?,
        onStart: (Int64) throws -> Void,
        onBody: (UnsafeRawBufferPointer) throws -> Void
    ) throws
}

extension BlobSource {
    /// Streams a blob from `offset` to its end.
    public func streamBlob(_ digest: Digest, from offset: Int64, onStart: (Int64) throws -> Void,
                           onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        try streamBlob(digest, from: offset, through: nil, onStart: onStart, onBody: onBody)
    }
}

/// A failure of a `BlobSource` that says whether trying again may help.
public protocol BlobSourceFailure: Error {
    /// Worth another try: the server or the network may do better in a moment.
    var isTransient: Bool { get }
}
