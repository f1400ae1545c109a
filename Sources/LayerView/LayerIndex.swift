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

    /// Where a checkpoint's window lies in the index file, and its CRC-32: windows stay on
    /// disk until a read starts there (a 4 GiB layer has 2,048 of them, 64 MiB).
    public struct WindowLocation: Sendable, Equatable {
        public var offset: Int64
        public var length: Int
        public var crc: UInt32

        public init(offset: Int64, length: Int, crc: UInt32) {
            self.offset = offset
            self.length = length
            self.crc = crc
        }
    }

    public var kind: Kind
    public var uncompressedOffset: Int64
    public var compressedOffset: Int64
    public var bits: UInt8
    public var primeByte: UInt8
    /// Filled in when the decoder is made; empty while it stays in the index file.
    public var window: [UInt8]
    public var windowLocation: WindowLocation?

    public init(kind: Kind, uncompressedOffset: Int64, compressedOffset: Int64, bits: UInt8 = 0, primeByte: UInt8 = 0,
                window: [UInt8] = [], windowLocation: WindowLocation? = nil) {
        self.kind = kind
        self.uncompressedOffset = uncompressedOffset
        self.compressedOffset = compressedOffset
        self.bits = bits
        self.primeByte = primeByte
        self.window = window
        self.windowLocation = windowLocation
    }

    public static let start = LayerCheckpoint(kind: .streamStart, uncompressedOffset: 0, compressedOffset: 0)

    /// The CRC-32 a window's location records.
    public static func crc32(of window: [UInt8]) -> UInt32 { crc32Of(window) }

    /// The window read back from its location: nil when the bytes are not the ones recorded.
    public func withWindow(_ bytes: [UInt8]) -> LayerCheckpoint? {
        guard let windowLocation, bytes.count == windowLocation.length, crc32Of(bytes) == windowLocation.crc else { return nil }
        var loaded = self
        loaded.window = bytes
        return loaded
    }
}

func crc32Of(_ bytes: [UInt8]) -> UInt32 {
    bytes.withUnsafeBufferPointer { UInt32(crc32(0, $0.baseAddress, UInt32($0.count))) }
}

/// What one full pass over a layer learnt: its exact uncompressed size and where reads may
/// start decompressing. Kept in the cache directory, so that it is computed once per machine.
///
/// The file: `fileHeader`, the windows one after another (written as the pass records them),
/// then the table of checkpoints and a footer (`trailer`), whose CRC-32 covers the table.
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

    public static let fileHeader = Array("ocicachefs-layer-index-2\n".utf8)
    /// The footer: the table's offset and its CRC-32.
    public static let footerSize = 12

    /// The table and footer that end the file; the windows were written before `tableOffset`
    /// at their checkpoints' locations.
    public func trailer(tableOffset: Int64) -> [UInt8] {
        var bytes: [UInt8] = []
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
            put(checkpoint.windowLocation?.offset ?? -1)
            put(Int64(checkpoint.windowLocation?.length ?? 0))
            put(Int64(checkpoint.windowLocation?.crc ?? 0))
        }
        let crc = crc32Of(bytes)
        put(tableOffset)
        withUnsafeBytes(of: crc.littleEndian) { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// Where the table starts, from the file's last `footerSize` bytes; nil when they cannot
    /// be a footer of a file of `fileSize` bytes.
    public static func tableOffset(footer: [UInt8], fileSize: Int64) -> Int64? {
        guard footer.count == footerSize else { return nil }
        let offset = Int64(bitPattern: readInteger(footer, at: 0, width: 8))
        guard offset >= Int64(fileHeader.count), offset <= fileSize - Int64(footerSize) else { return nil }
        return offset
    }

    /// Parses the table and footer (`trailer`) of a file whose table starts at `tableOffset`:
    /// nil for anything not written whole by `trailer`. Checkpoints keep their windows on disk.
    public init?(trailer bytes: [UInt8], tableOffset: Int64) {
        guard bytes.count >= Self.footerSize else { return nil }
        let body = bytes.count - Self.footerSize
        let stored = UInt32(readInteger(bytes, at: body + 8, width: 4))
        guard crc32Of(Array(bytes[..<body])) == stored, Int64(bitPattern: readInteger(bytes, at: body, width: 8)) == tableOffset else {
            return nil
        }
        var position = 0
        func byte() -> UInt8? {
            guard position < body else { return nil }
            defer { position += 1 }
            return bytes[position]
        }
        func integer() -> Int64? {
            guard position + 8 <= body else { return nil }
            defer { position += 8 }
            return Int64(bitPattern: readInteger(bytes, at: position, width: 8))
        }
        guard let compressionByte = byte(), let compression = LayerCompression(rawValue: compressionByte),
              let spans = byte(), let compressedSize = integer(), let uncompressedSize = integer(),
              compressedSize >= 0, uncompressedSize >= 0, let count = integer(), count >= 1, count <= Int64(body) else { return nil }
        var checkpoints: [LayerCheckpoint] = []
        for _ in 0..<count {
            guard let kindByte = byte(), let kind = LayerCheckpoint.Kind(rawValue: kindByte), let bits = byte(), bits < 8,
                  let primeByte = byte(), let uncompressedOffset = integer(), let compressedOffset = integer(),
                  let windowOffset = integer(), let windowLength = integer(), let windowCRC = integer(),
                  (0...uncompressedSize).contains(uncompressedOffset), (0...compressedSize).contains(compressedOffset),
                  uncompressedOffset >= (checkpoints.last?.uncompressedOffset ?? 0) else { return nil }
            var location: LayerCheckpoint.WindowLocation?
            if windowOffset >= 0 {
                guard windowOffset >= Int64(Self.fileHeader.count), (0...(1 << 15)).contains(windowLength),
                      windowOffset <= tableOffset - windowLength, (0...Int64(UInt32.max)).contains(windowCRC) else { return nil }
                location = .init(offset: windowOffset, length: Int(windowLength), crc: UInt32(windowCRC))
            }
            guard (kind == .deflateBlock) == (location != nil) else { return nil }
            checkpoints.append(LayerCheckpoint(kind: kind, uncompressedOffset: uncompressedOffset, compressedOffset: compressedOffset,
                                               bits: bits, primeByte: primeByte, windowLocation: location))
        }
        guard position == body, checkpoints[0].uncompressedOffset == 0 else { return nil }
        self.init(compression: compression, compressedSize: compressedSize, uncompressedSize: uncompressedSize,
                  checkpoints: checkpoints, keepsSpans: spans == 1)
    }

    /// A whole index file of checkpoints that hold their windows (for tests and small tools):
    /// the header, the windows, the trailer.
    public func serializedFile() -> [UInt8] {
        var bytes = Self.fileHeader
        var placed = self
        for index in placed.checkpoints.indices where placed.checkpoints[index].kind == .deflateBlock {
            let window = placed.checkpoints[index].window
            placed.checkpoints[index].windowLocation = .init(offset: Int64(bytes.count), length: window.count, crc: crc32Of(window))
            placed.checkpoints[index].window = []
            bytes += window
        }
        return bytes + placed.trailer(tableOffset: Int64(bytes.count))
    }

    /// Parses a whole file `serializedFile` wrote, windows included.
    public init?(serializedFile bytes: [UInt8]) {
        guard bytes.count >= Self.fileHeader.count + Self.footerSize, bytes.starts(with: Self.fileHeader),
              let tableOffset = Self.tableOffset(footer: Array(bytes.suffix(Self.footerSize)), fileSize: Int64(bytes.count)),
              var index = LayerIndex(trailer: Array(bytes[Int(tableOffset)...]), tableOffset: tableOffset) else { return nil }
        for position in index.checkpoints.indices {
            guard let location = index.checkpoints[position].windowLocation else { continue }
            let window = Array(bytes[Int(location.offset)..<Int(location.offset) + location.length])
            guard let loaded = index.checkpoints[position].withWindow(window) else { return nil }
            index.checkpoints[position] = loaded
        }
        self = index
    }
}

private func readInteger(_ bytes: [UInt8], at position: Int, width: Int) -> UInt64 {
    var value: UInt64 = 0
    for shift in 0..<width { value |= UInt64(bytes[position + shift]) << (8 * shift) }
    return value
}
