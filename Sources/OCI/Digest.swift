import Crypto
import SystemSupport

/// A content digest. Only sha256 is accepted: it is what BuildKit, registries and the local
/// layout (`blobs/sha256/<hex>`) use, and accepting nothing else keeps every path a digest.
public struct Digest: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// 64 lowercase hex characters.
    public let hex: String

    public init?(hex: String) {
        guard hex.utf8.count == 64, hex.utf8.allSatisfy(Digest.isLowerHex) else { return nil }
        self.hex = hex
    }

    /// Parses `sha256:<64 lowercase hex>`.
    public init?(_ string: String) {
        guard string.hasPrefix("sha256:") else { return nil }
        self.init(hex: String(string.dropFirst("sha256:".count)))
    }

    public static func sha256<Bytes: Sequence>(of bytes: Bytes) -> Digest where Bytes.Element == UInt8 {
        var hasher = SHA256()
        hasher.update(data: Array(bytes))
        return Digest(finalized: hasher.finalize())
    }

    public init(finalized: SHA256.Digest) {
        self.hex = finalized.lowercaseHex
    }

    public var description: String { "sha256:" + hex }

    public static func < (lhs: Digest, rhs: Digest) -> Bool { lhs.hex < rhs.hex }

    private static func isLowerHex(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "f"))
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let text = try container.decode(String.self)
        guard let digest = Digest(text) else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "not a sha256 digest: \(text.prefix(80).escapingControlCharacters)")
        }
        self = digest
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// Incremental sha256 for streamed blobs.
// SAFETY: a value type whose SHA256 state is held by value, with no reference shared between copies.
public struct DigestVerifier: @unchecked Sendable {
    private var hasher = SHA256()
    public private(set) var byteCount: Int64 = 0

    public init() {}

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        hasher.update(bufferPointer: bytes)
        byteCount += Int64(bytes.count)
    }

    public func finalize() -> Digest { Digest(finalized: hasher.finalize()) }
}
