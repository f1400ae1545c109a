/// A layer's tar members as the `files/` view keeps them in the cache directory: what one walk
/// over the layer found, so that the next mount on this machine builds the tree without
/// reading the layer again.
///
/// The file: `fileHeader`, the member count, the members, then a CRC-32 of all that before it.
public enum TarEntryList {
    public static let fileHeader = Array("ocicachefs-layer-files-1\n".utf8)

    public static func serialized(_ entries: [TarEntry]) -> [UInt8] {
        var bytes = fileHeader
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
        func put(_ text: String) {
            put(UInt32(text.utf8.count))
            bytes.append(contentsOf: text.utf8)
        }
        put(UInt64(entries.count))
        for entry in entries {
            bytes.append(entry.kind.rawValue)
            bytes.append(entry.isSparse ? 1 : 0)
            put(entry.mode)
            put(entry.uid)
            put(entry.gid)
            put(entry.modifiedSeconds)
            put(entry.modifiedNanoseconds)
            put(entry.size)
            put(entry.dataOffset)
            put(entry.deviceMajor)
            put(entry.deviceMinor)
            put(entry.path)
            put(entry.linkTarget)
        }
        put(crc32Of(bytes))
        return bytes
    }

    /// The members of a file `serialized` wrote whole; nil for anything else.
    public static func parse(_ bytes: [UInt8]) -> [TarEntry]? {
        guard bytes.count >= fileHeader.count + 12, bytes.starts(with: fileHeader) else { return nil }
        let body = bytes.count - 4
        var stored: UInt32 = 0
        for shift in 0..<4 { stored |= UInt32(bytes[body + shift]) << (8 * shift) }
        guard crc32Of(Array(bytes[..<body])) == stored else { return nil }
        var position = fileHeader.count
        func integer<T: FixedWidthInteger>(_: T.Type) -> T? {
            let width = MemoryLayout<T>.size
            guard position + width <= body else { return nil }
            var value: T = 0
            for shift in 0..<width { value |= T(truncatingIfNeeded: bytes[position + shift]) << (8 * shift) }
            position += width
            return value
        }
        func text() -> String? {
            guard let length = integer(UInt32.self), Int(length) <= body - position else { return nil }
            defer { position += Int(length) }
            return String(validating: bytes[position..<position + Int(length)], as: UTF8.self)
        }
        // Each member takes at least 59 bytes: a count beyond that is a lie.
        guard let count = integer(UInt64.self), count <= UInt64(body / 59) else { return nil }
        var entries: [TarEntry] = []
        entries.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let kindByte = integer(UInt8.self), let kind = TarEntry.Kind(rawValue: kindByte), let sparse = integer(UInt8.self),
                  let mode = integer(UInt32.self), let uid = integer(UInt32.self), let gid = integer(UInt32.self),
                  let seconds = integer(Int64.self), let nanoseconds = integer(Int32.self), let size = integer(Int64.self),
                  let dataOffset = integer(Int64.self), let major = integer(UInt32.self), let minor = integer(UInt32.self),
                  let path = text(), let linkTarget = text(), size >= 0, dataOffset >= 0 else { return nil }
            entries.append(TarEntry(path: path, kind: kind, mode: mode, uid: uid, gid: gid, modifiedSeconds: seconds,
                                    modifiedNanoseconds: nanoseconds, size: size, dataOffset: dataOffset, linkTarget: linkTarget,
                                    deviceMajor: major, deviceMinor: minor, isSparse: sparse == 1))
        }
        guard position == body else { return nil }
        return entries
    }
}
