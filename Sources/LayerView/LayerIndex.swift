import CZlib

/// How a layer blob is compressed, from its descriptor's media type (OCI and Docker spellings).
/// eStargz layers are gzip; `zstd:chunked` layers are zstd.
public enum LayerCompression: UInt8, Sendable, Hashable {
    case none = 0
    case gzip = 1
    case zstd = 2

    /// Nil for anything that is not a layer tar we can present (foreign formats, configs).
    public init?(mediaType: String) {
        switch mediaType {
        case "application/vnd.oci.image.layer.v1.tar",
             "application/vnd.oci.image.layer.nondistributable.v1.tar",
             "application/vnd.docker.image.rootfs.diff.tar":
            self = .none
        case "application/vnd.oci.image.layer.v1.tar+gzip",
             "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
             "application/vnd.docker.image.rootfs.diff.tar.gzip",
             "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
            self = .gzip
        case "application/vnd.oci.image.layer.v1.tar+zstd",
             "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
             "application/vnd.docker.image.rootfs.diff.tar.zstd":
            self = .zstd
        default:
            return nil
        }
    }
}

/// A point of a compressed stream where decompression can start afresh.
public struct LayerCheckpoint: Sendable, Equatable {
    public enum Kind: UInt8, Sendable {
        /// The start of a gzip member or a zstd frame: nothing to restore.
        case streamStart = 0
        /// Inside a deflate stream, at a block boundary: `bits` bits of the byte before
        /// `compressedOffset` (`primeByte`) belong to the next block, and `window` is the
        /// member's last 32 KiB of output, which later blocks may refer back to.
        case deflateBlock = 1
    }

    public var kind: Kind
    public var uncompressedOffset: Int64
    public var compressedOffset: Int64
    public var bits: UInt8
    public var primeByte: UInt8
    public var window: [UInt8]

    public init(kind: Kind, uncompressedOffset: Int64, compressedOffset: Int64, bits: UInt8 = 0, primeByte: UInt8 = 0,
                window: [UInt8] = []) {
        self.kind = kind
        self.uncompressedOffset = uncompressedOffset
        self.compressedOffset = compressedOffset
        self.bits = bits
        self.primeByte = primeByte
        self.window = window
    }

    public static let start = LayerCheckpoint(kind: .streamStart, uncompressedOffset: 0, compressedOffset: 0)
}

/// What one full pass over a layer learnt: its exact uncompressed size and where reads may
/// start decompressing. Kept in the cache directory, so that it is computed once per machine.
public struct LayerIndex: Sendable, Equatable {
    public var compression: LayerCompression
    public var compressedSize: Int64
    public var uncompressedSize: Int64
    /// Sorted by offset; the first is the stream's start.
    public var checkpoints: [LayerCheckpoint]
    /// The whole uncompressed stream is kept in the cache beside the index: the layer has
    /// checkpoints too far apart (a zstd layer of one large frame).
    public var keepsSpans: Bool

    public init(compression: LayerCompression, compressedSize: Int64, uncompressedSize: Int64,
                checkpoints: [LayerCheckpoint], keepsSpans: Bool = false) {
        self.compression = compression
        self.compressedSize = compressedSize
        self.uncompressedSize = uncompressedSize
        self.checkpoints = checkpoints.isEmpty ? [.start] : checkpoints
        self.keepsSpans = keepsSpans
    }

    /// The last checkpoint at or before `offset`.
    public func checkpoint(before offset: Int64) -> LayerCheckpoint {
        var low = 0, high = checkpoints.count - 1
        while low < high {
            let middle = (low + high + 1) / 2
            if checkpoints[middle].uncompressedOffset <= offset { low = middle } else { high = middle - 1 }
        }
        return checkpoints[low]
    }

    /// The most output between two neighbouring checkpoints (or the last one and the end).
    public var longestSpan: Int64 {
        var longest: Int64 = 0
        for (index, checkpoint) in checkpoints.enumerated() {
            let next = index + 1 < checkpoints.count ? checkpoints[index + 1].uncompressedOffset : uncompressedSize
            longest = max(longest, next - checkpoint.uncompressedOffset)
        }
        return longest
    }

    private static let magic = Array("ocicachefs-layer-index-1\n".utf8)

    /// A binary file: the magic, the fields little-endian, and a CRC-32 of everything before it.
    public func serialized() -> [UInt8] {
        var bytes = Self.magic
        func put(_ value: Int64) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
        bytes.append(compression.rawValue)
        bytes.append(keepsSpans ? 1 : 0)
        put(compressedSize)
        put(uncompressedSize)
        put(Int64(checkpoints.count))
        for checkpoint in checkpoints {
            bytes.append(checkpoint.kind.rawValue)
            bytes.append(checkpoint.bits)
            bytes.append(checkpoint.primeByte)
            put(checkpoint.uncompressedOffset)
            put(checkpoint.compressedOffset)
            put(Int64(checkpoint.window.count))
            bytes.append(contentsOf: checkpoint.window)
        }
        let crc = UInt32(bytes.withUnsafeBufferPointer { crc32(0, $0.baseAddress, UInt32($0.count)) })
        withUnsafeBytes(of: crc.littleEndian) { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// Nil for anything `serialized` did not write whole (a damaged or foreign file).
    public init?(serialized bytes: [UInt8]) {
        guard bytes.count >= Self.magic.count + 4, bytes.starts(with: Self.magic) else { return nil }
        let body = bytes.count - 4
        var stored: UInt32 = 0
        for shift in 0..<4 { stored |= UInt32(bytes[body + shift]) << (8 * shift) }
        let crc = UInt32(bytes.withUnsafeBufferPointer { crc32(0, $0.baseAddress, UInt32(body)) })
        guard crc == stored else { return nil }
        var position = Self.magic.count
        func byte() -> UInt8? {
            guard position < body else { return nil }
            defer { position += 1 }
            return bytes[position]
        }
        func integer() -> Int64? {
            guard position + 8 <= body else { return nil }
            var value: UInt64 = 0
            for shift in 0..<8 { value |= UInt64(bytes[position + shift]) << (8 * shift) }
            position += 8
            return Int64(bitPattern: value)
        }
        guard let compressionByte = byte(), let compression = LayerCompression(rawValue: compressionByte),
              let spans = byte(), let compressedSize = integer(), let uncompressedSize = integer(),
              let count = integer(), count >= 1, count <= Int64(body) else { return nil }
        var checkpoints: [LayerCheckpoint] = []
        for _ in 0..<count {
            guard let kindByte = byte(), let kind = LayerCheckpoint.Kind(rawValue: kindByte), let bits = byte(), bits < 8,
                  let primeByte = byte(), let uncompressedOffset = integer(), let compressedOffset = integer(),
                  let windowCount = integer(), windowCount >= 0, windowCount <= 1 << 15,
                  position + Int(windowCount) <= body else { return nil }
            let window = Array(bytes[position..<position + Int(windowCount)])
            position += Int(windowCount)
            guard (0...uncompressedSize).contains(uncompressedOffset), (0...compressedSize).contains(compressedOffset),
                  uncompressedOffset >= (checkpoints.last?.uncompressedOffset ?? 0) else { return nil }
            checkpoints.append(LayerCheckpoint(kind: kind, uncompressedOffset: uncompressedOffset, compressedOffset: compressedOffset,
                                               bits: bits, primeByte: primeByte, window: window))
        }
        guard position == body, checkpoints[0].uncompressedOffset == 0 else { return nil }
        self.init(compression: compression, compressedSize: compressedSize, uncompressedSize: uncompressedSize,
                  checkpoints: checkpoints, keepsSpans: spans == 1)
    }
}
