/// One member of a tar stream, with the metadata its headers (ustar, GNU long names and links,
/// PAX extended and global headers) gave it, and where its data lies in the stream.
public struct TarEntry: Sendable, Equatable {
    public enum Kind: UInt8, Sendable {
        case regular = 0
        case directory = 1
        case symlink = 2
        /// Another name for the entry `linkTarget` named earlier in the stream.
        case hardLink = 3
        case characterDevice = 4
        case blockDevice = 5
        case fifo = 6
    }

    /// As the headers spell it (not yet checked or cleaned: see `TarPath`).
    public var path: String
    public var kind: Kind
    /// Permission bits, set-id and sticky bits (`0o7777`).
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var modifiedSeconds: Int64
    public var modifiedNanoseconds: Int32
    /// The file's size as a reader sees it (a sparse file: its expanded size).
    public var size: Int64
    /// Where the entry's bytes start in the uncompressed stream (right after its header).
    public var dataOffset: Int64
    /// A symlink's target, or the path a hard link names.
    public var linkTarget: String
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32
    /// A GNU sparse file: the stream holds its data regions packed, not its bytes as read, so
    /// the view shows its size but answers reads with EIO rather than the wrong bytes.
    public var isSparse: Bool

    public init(path: String, kind: Kind, mode: UInt32 = 0o644, uid: UInt32 = 0, gid: UInt32 = 0, modifiedSeconds: Int64 = 0,
                modifiedNanoseconds: Int32 = 0, size: Int64 = 0, dataOffset: Int64 = 0, linkTarget: String = "",
                deviceMajor: UInt32 = 0, deviceMinor: UInt32 = 0, isSparse: Bool = false) {
        self.path = path
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.modifiedSeconds = modifiedSeconds
        self.modifiedNanoseconds = modifiedNanoseconds
        self.size = size
        self.dataOffset = dataOffset
        self.linkTarget = linkTarget
        self.deviceMajor = deviceMajor
        self.deviceMinor = deviceMinor
        self.isSparse = isSparse
    }
}

public enum TarError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A header's checksum does not match its bytes (the offset is the header's).
    case badChecksum(at: Int64)
    /// A header field does not hold what it must (a number that is not one, a size too large).
    case badHeader(at: Int64, String)
    /// The stream ends inside a header or an entry's data.
    case truncated(at: Int64)

    public var description: String {
        switch self {
        case .badChecksum(let offset): return "tar header at offset \(offset) has a bad checksum"
        case .badHeader(let offset, let message): return "tar header at offset \(offset): \(message)"
        case .truncated(let offset): return "the tar stream ends inside an entry (at offset \(offset))"
        }
    }
}

/// A tar stream's parser with no I/O: bytes go in (in order, from `position`), entries come out.
/// It keeps at most one header and one metadata record (a long name or PAX header, bounded by
/// `metadataLimit`) in memory; the entries' data it only counts, and `dataAhead` says how much
/// of the stream is data it does not need, which a reader with random access may `skip`.
public struct TarReader: Sendable {
    public static let blockSize = 512
    /// The most bytes a GNU long name or PAX header may take: paths are at most a few KiB.
    public static let metadataLimit = 1 << 20

    /// The offset in the stream of the next byte `feed` expects.
    public var position: Int64 { consumed + Int64(block.count) }
    /// Bytes parsed, up to the last whole block or skipped byte of data.
    private var consumed: Int64 = 0
    /// The end-of-archive marker was read; what follows it is ignored.
    public private(set) var isFinished = false

    private enum Phase {
        case header
        /// The data of a metadata member (`L`, `K`, `x`, `g`), kept until its `count` bytes
        /// are in, then `padding` bytes to the next block.
        case metadata(flag: UInt8, count: Int, padding: Int)
        /// GNU sparse extension headers follow the entry's header; then its data.
        case sparseExtension(dataAndPadding: Int64)
        /// An entry's data and the padding to the next block: skipped.
        case data(remaining: Int64)
        case ended
    }

    private var phase = Phase.header
    private var block: [UInt8] = []
    private var metadata: [UInt8] = []
    /// Set by `L`, `K` and `x` members for the next entry only.
    private var longName: String?
    private var longLink: String?
    private var extended: [String: String] = [:]
    /// Set by `g` members for every entry after them.
    private var global: [String: String] = [:]
    private var zeroBlocks = 0
    /// The PAX keys entries are made of. Only these are kept: a stream of headers full of other
    /// keys would otherwise pile up (global ones for the whole walk, merged into every entry).
    static let paxKeysUsed: Set<String> = [
        "path", "linkpath", "size", "uid", "gid", "mtime",
        "GNU.sparse.name", "GNU.sparse.realsize", "GNU.sparse.size", "GNU.sparse.major", "GNU.sparse.minor",
        "GNU.sparse.map", "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes",
    ]

    /// PAX records held for the entries to come: at most `paxKeysUsed.count` of each kind.
    var paxRecordsHeld: Int { global.count + extended.count }

    public init() {
        block.reserveCapacity(Self.blockSize)
    }

    /// Bytes just ahead that are an entry's data or padding: the parser needs none of them.
    public var dataAhead: Int64 {
        if case .data(let remaining) = phase { return remaining }
        return 0
    }

    /// Moves past `count` bytes of `dataAhead` without seeing them.
    public mutating func skip(_ count: Int64) {
        guard case .data(let remaining) = phase, count > 0 else { return }
        let skipped = min(count, remaining)
        consumed += skipped
        phase = skipped == remaining ? .header : .data(remaining: remaining - skipped)
    }

    /// Parses the next bytes of the stream; `entry` is called for each member whose header
    /// they complete, in stream order. Throws at the first malformed header; the parser must
    /// not be used after that.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, entry: (TarEntry) -> Void) throws(TarError) {
        var index = 0
        while index < bytes.count {
            switch phase {
            case .ended:
                consumed += Int64(bytes.count - index)
                return
            case .data(let remaining):
                let taken = Int(min(remaining, Int64(bytes.count - index)))
                skip(Int64(taken))
                index += taken
            case .header, .sparseExtension, .metadata:
                let wanted = Self.blockSize - block.count
                let taken = min(wanted, bytes.count - index)
                block.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[index..<index + taken]))
                index += taken
                guard block.count == Self.blockSize else { continue }
                let blockStart = consumed
                consumed += Int64(Self.blockSize)
                defer { block.removeAll(keepingCapacity: true) }
                try takeBlock(at: blockStart, entry: entry)
            }
        }
    }

    /// Says whether the stream may end here: at the end-of-archive marker, or (as GNU tar
    /// allows) between members with no marker; anywhere else it was cut short.
    public func finish() throws(TarError) {
        switch phase {
        case .ended: return
        case .header where block.isEmpty && longName == nil && longLink == nil && extended.isEmpty: return
        default: throw .truncated(at: position)
        }
    }

    private mutating func takeBlock(at offset: Int64, entry: (TarEntry) -> Void) throws(TarError) {
        switch phase {
        case .metadata(let flag, let count, let padding):
            let missing = count + padding - metadata.count
            metadata.append(contentsOf: block.prefix(missing))
            guard metadata.count == count + padding else { return }
            metadata.removeLast(padding)
            try takeMetadata(flag: flag, at: offset)
            metadata = []
            phase = .header
        case .sparseExtension(let dataAndPadding):
            // 21 more sparse map entries, then whether yet another extension block follows.
            if block[504] == 0 { phase = dataAndPadding > 0 ? .data(remaining: dataAndPadding) : .header }
        case .header:
            if block.allSatisfy({ $0 == 0 }) {
                zeroBlocks += 1
                if zeroBlocks == 2 {
                    isFinished = true
                    phase = .ended
                }
                return
            }
            // A lone zero block inside the archive is skipped, as GNU tar does.
            zeroBlocks = 0
            try takeHeader(at: offset, entry: entry)
        case .data, .ended:
            return
        }
    }

    private mutating func takeHeader(at offset: Int64, entry: (TarEntry) -> Void) throws(TarError) {
        let header = block
        guard let stored = Self.number(header[148..<156]) else { throw .badHeader(at: offset, "checksum is not a number") }
        var unsigned: Int64 = 0
        var signed: Int64 = 0
        for (index, byte) in header.enumerated() {
            let counted = (148..<156).contains(index) ? UInt8(ascii: " ") : byte
            unsigned += Int64(counted)
            signed += Int64(Int8(bitPattern: counted))
        }
        guard stored == unsigned || stored == signed else { throw .badChecksum(at: offset) }

        let flag = header[156]
        func field(_ range: Range<Int>, _ name: String) throws(TarError) -> Int64 {
            guard let value = Self.number(header[range]) else { throw .badHeader(at: offset, "\(name) is not a number") }
            return value
        }
        let storedSize = try field(124..<136, "size")
        guard storedSize >= 0 else { throw .badHeader(at: offset, "negative size") }
        let padding = Int64((Self.blockSize - Int(storedSize % Int64(Self.blockSize))) % Self.blockSize)

        switch flag {
        case UInt8(ascii: "L"), UInt8(ascii: "K"), UInt8(ascii: "x"), UInt8(ascii: "g"):
            guard storedSize <= Int64(Self.metadataLimit) else {
                throw .badHeader(at: offset, "a metadata member of \(storedSize) bytes (at most \(Self.metadataLimit))")
            }
            phase = storedSize == 0 ? .header : .metadata(flag: flag, count: Int(storedSize), padding: Int(padding))
            if storedSize == 0 { try takeMetadata(flag: flag, at: offset) }
            return
        default:
            break
        }

        let isGNU = header[257..<263].elementsEqual(Array("ustar ".utf8))
        let isUstar = header[257..<262].elementsEqual(Array("ustar".utf8))
        var path = Self.string(header[0..<100])
        if isUstar && !isGNU {
            let prefix = Self.string(header[345..<500])
            if !prefix.isEmpty { path = prefix + "/" + path }
        }
        let pax = global.merging(extended) { _, entryValue in entryValue }
        let entryName = longName
        let entryLink = longLink
        longName = nil
        longLink = nil
        extended = [:]
        if let entryName { path = entryName }
        if let paxPath = pax["path"] { path = paxPath }
        var linkTarget = entryLink ?? Self.string(header[157..<257])
        if let paxLink = pax["linkpath"] { linkTarget = paxLink }

        var size = storedSize
        if let paxSize = pax["size"] {
            guard let value = Int64(paxSize), value >= 0 else { throw .badHeader(at: offset, "PAX size \(paxSize) is not a size") }
            size = value
        }
        // The data and the padding to the next block; a hostile size near Int64.max must not wrap.
        let (dataAndPadding, overflow) = size.addingReportingOverflow(Int64((Self.blockSize - Int(size % Int64(Self.blockSize))) % Self.blockSize))
        guard !overflow else { throw .badHeader(at: offset, "size \(size) is too large") }

        let mode = UInt32(truncatingIfNeeded: try field(100..<108, "mode") & 0o7777)
        var uid = try field(108..<116, "uid")
        var gid = try field(116..<124, "gid")
        if let value = pax["uid"] { guard let parsed = Int64(value) else { throw .badHeader(at: offset, "PAX uid \(value)") }; uid = parsed }
        if let value = pax["gid"] { guard let parsed = Int64(value) else { throw .badHeader(at: offset, "PAX gid \(value)") }; gid = parsed }
        guard (0...Int64(UInt32.max)).contains(uid), (0...Int64(UInt32.max)).contains(gid) else {
            throw .badHeader(at: offset, "owner \(uid):\(gid) out of range")
        }
        var seconds = try field(136..<148, "mtime")
        var nanoseconds: Int32 = 0
        if let value = pax["mtime"] {
            guard let time = Self.paxTime(value) else { throw .badHeader(at: offset, "PAX mtime \(value)") }
            (seconds, nanoseconds) = time
        }

        var kind: TarEntry.Kind
        var isSparse = false
        var shownSize = size
        switch flag {
        case UInt8(ascii: "0"), 0, UInt8(ascii: "7"): kind = .regular
        case UInt8(ascii: "1"): kind = .hardLink
        case UInt8(ascii: "2"): kind = .symlink
        case UInt8(ascii: "3"): kind = .characterDevice
        case UInt8(ascii: "4"): kind = .blockDevice
        case UInt8(ascii: "5"), UInt8(ascii: "D"): kind = .directory
        case UInt8(ascii: "6"): kind = .fifo
        case UInt8(ascii: "S"):
            kind = .regular
            isSparse = true
            shownSize = isGNU ? (Self.number(header[483..<495]) ?? size) : size
        case UInt8(ascii: "V"):
            // A volume label names the archive, not a file: tar -x makes nothing of it.
            phase = dataAndPadding > 0 ? .data(remaining: dataAndPadding) : .header
            return
        default:
            // POSIX: members of unknown types are read as regular files.
            kind = .regular
        }
        // A trailing slash marks a directory in old archives.
        if kind == .regular && path.hasSuffix("/") && !isSparse { kind = .directory }
        if pax.keys.contains(where: { $0.hasPrefix("GNU.sparse.") }) {
            isSparse = true
            if let name = pax["GNU.sparse.name"] { path = name }
            if let real = pax["GNU.sparse.realsize"] ?? pax["GNU.sparse.size"], let value = Int64(real), value >= 0 { shownSize = value }
        }
        guard shownSize >= 0 else { throw .badHeader(at: offset, "negative size") }
        guard !path.isEmpty else { throw .badHeader(at: offset, "an entry with no name") }

        var major: UInt32 = 0, minor: UInt32 = 0
        if kind == .characterDevice || kind == .blockDevice {
            major = UInt32(truncatingIfNeeded: Self.number(header[329..<337]) ?? 0)
            minor = UInt32(truncatingIfNeeded: Self.number(header[337..<345]) ?? 0)
        }
        // Whatever its type, the bytes its size field counts follow the header and are skipped.
        let result = TarEntry(path: path, kind: kind, mode: mode, uid: UInt32(uid), gid: UInt32(gid), modifiedSeconds: seconds,
                              modifiedNanoseconds: nanoseconds, size: kind == .regular ? shownSize : 0,
                              dataOffset: consumed, linkTarget: kind == .symlink || kind == .hardLink ? linkTarget : "",
                              deviceMajor: major, deviceMinor: minor, isSparse: isSparse)
        if flag == UInt8(ascii: "S") && isGNU && header[482] != 0 {
            phase = .sparseExtension(dataAndPadding: dataAndPadding)
        } else {
            phase = dataAndPadding > 0 ? .data(remaining: dataAndPadding) : .header
        }
        entry(result)
    }

    private mutating func takeMetadata(flag: UInt8, at offset: Int64) throws(TarError) {
        switch flag {
        case UInt8(ascii: "L"): longName = Self.string(metadata[...])
        case UInt8(ascii: "K"): longLink = Self.string(metadata[...])
        case UInt8(ascii: "x"):
            guard let records = Self.paxRecords(metadata) else { throw .badHeader(at: offset, "a malformed PAX extended header") }
            extended.merge(records.filter { Self.paxKeysUsed.contains($0.key) }) { _, new in new }
        case UInt8(ascii: "g"):
            guard let records = Self.paxRecords(metadata) else { throw .badHeader(at: offset, "a malformed PAX global header") }
            global.merge(records.filter { Self.paxKeysUsed.contains($0.key) }) { _, new in new }
        default:
            break
        }
    }

    // MARK: Fields

    /// A numeric field: octal digits (leading spaces, then NUL or space ends it), or base-256
    /// (the GNU and star extension for values octal cannot hold: the first byte's top bit set,
    /// negative when its next bit is set too). Nil for anything else.
    static func number(_ field: ArraySlice<UInt8>) -> Int64? {
        guard let first = field.first else { return nil }
        if first & 0x80 != 0 {
            let negative = first & 0x40 != 0
            var value: Int64 = negative ? -1 : 0
            for (index, byte) in field.enumerated() {
                let digit = index == 0 ? (negative ? byte | 0x80 : byte & 0x7F) : byte
                // More than 63 significant bits do not fit.
                guard value >> 55 == (negative ? -1 : 0) else { return nil }
                value = (value << 8) | Int64(digit)
            }
            return value
        }
        var value: Int64 = 0
        var digits = 0
        var ended = false
        for byte in field {
            if ended {
                guard byte == 0 || byte == UInt8(ascii: " ") else { return nil }
                continue
            }
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "7"):
                guard value >> 60 == 0 else { return nil }
                value = value << 3 | Int64(byte - UInt8(ascii: "0"))
                digits += 1
            case UInt8(ascii: " ") where digits == 0:
                continue
            case 0, UInt8(ascii: " "):
                ended = true
            default:
                return nil
            }
        }
        return value
    }

    /// A NUL-terminated name field.
    static func string(_ field: ArraySlice<UInt8>) -> String {
        let end = field.firstIndex(of: 0) ?? field.endIndex
        return String(decoding: field[field.startIndex..<end], as: UTF8.self)
    }

    /// PAX records: `LENGTH KEY=VALUE\n`, LENGTH counting the whole record. Nil when they do
    /// not parse whole.
    static func paxRecords(_ bytes: [UInt8]) -> [String: String]? {
        var records: [String: String] = [:]
        var start = 0
        while start < bytes.count {
            // Some writers pad the last record's block with NULs.
            if bytes[start] == 0 { break }
            guard let space = bytes[start...].prefix(24).firstIndex(of: UInt8(ascii: " ")),
                  let length = Int(String(decoding: bytes[start..<space], as: UTF8.self)), length > space - start + 1,
                  length <= bytes.count - start, bytes[start + length - 1] == UInt8(ascii: "\n") else { return nil }
            let record = bytes[(space + 1)..<(start + length - 1)]
            guard let equals = record.firstIndex(of: UInt8(ascii: "=")) else { return nil }
            let key = String(decoding: record[record.startIndex..<equals], as: UTF8.self)
            let value = String(decoding: record[(equals + 1)...], as: UTF8.self)
            // An empty value removes the key (POSIX); for this parser, the header's value stands.
            if value.isEmpty { records[key] = nil } else { records[key] = value }
            start += length
        }
        return records
    }

    /// `SECONDS[.FRACTION]`, possibly negative.
    static func paxTime(_ text: String) -> (Int64, Int32)? {
        let parts = text.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let whole = parts.first, let seconds = Int64(whole) else { return nil }
        guard parts.count == 2 else { return (seconds, 0) }
        let fraction = parts[1]
        guard !fraction.isEmpty, fraction.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else { return nil }
        let digits = String(fraction.prefix(9)).padding(to: 9)
        guard var nanoseconds = Int32(digits) else { return nil }
        if seconds < 0 || whole.hasPrefix("-") {
            // -1.25 is a quarter second before -1.
            guard nanoseconds > 0 else { return (seconds, 0) }
            nanoseconds = 1_000_000_000 - nanoseconds
            // Int64.min and a fraction is before the earliest time this can hold.
            let (earlier, overflowed) = seconds.subtractingReportingOverflow(1)
            return overflowed ? nil : (earlier, nanoseconds)
        }
        return (seconds, nanoseconds)
    }
}

private extension String {
    func padding(to length: Int) -> String {
        utf8.count >= length ? self : self + String(repeating: "0", count: length - utf8.count)
    }
}

/// Where a tar member's path puts it in the layer's tree.
public enum TarPath {
    /// The path's names from the layer's root, `.` and empty names dropped. Nil for a path
    /// that is absolute or leaves the tree (`..`: layers never hold either, only hostile
    /// archives do), or holds a name the view cannot show (NUL, longer than 255 bytes).
    public static func components(_ path: String) -> [String]? {
        guard !path.hasPrefix("/"), !path.utf8.contains(0) else { return nil }
        var names: [String] = []
        for name in path.split(separator: "/", omittingEmptySubsequences: true) {
            if name == "." { continue }
            if name == ".." || name.utf8.count > 255 { return nil }
            names.append(String(name))
        }
        return names
    }
}
