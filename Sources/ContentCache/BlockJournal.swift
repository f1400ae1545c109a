import CChecksum
import FoundationEssentials
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// The sidecar of a partially downloaded blob: which fixed-size blocks of the data file hold
/// downloaded bytes, each with a CRC-32C of those bytes. A block's record is written after its
/// bytes, so a killed process leaves at worst a block without a record (fetched again); bytes
/// that changed on disk since (a torn write after power loss, a bad disk, a hand edit) no
/// longer match their CRC and are fetched again instead of served.
///
/// Every process that reads the blob through the same cache directory shares the file. The
/// process fetching a run of blocks holds an open-file-description lock on their records, so
/// one fetch per block happens however many mounts want it; the lock dies with its process.
final class BlockJournal: Sendable {
    /// Version 2: CRC-32C (version 1's zlib CRC-32 cost a tenth of a cold read's CPU). A
    /// journal of another version starts afresh: its blocks are fetched again.
    static let magic: [UInt8] = Array("OCFSJRN2".utf8)
    static let headerSize: Int64 = 32
    static let recordSize: Int64 = 8
    /// Marks a record whose block is present; a zero word means absent.
    static let presentMarker: UInt32 = 0x5052_4553

    let file: OpenFile
    let blobSize: Int64
    let blockSize: Int64
    let blockCount: Int

    /// Opens the journal at `path`, creating it for a blob of `blobSize` bytes. An existing
    /// journal for another geometry, or with a damaged header, is started afresh: every block
    /// counts as absent, whatever the data file holds.
    convenience init(path: String, blobSize: Int64, blockSize: Int64) throws(CacheError) {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot open \(path)") }
        try self.init(file: OpenFile(fd: fd), blobSize: blobSize, blockSize: blockSize)
    }

    /// The journal kept in `file`, on disk or in memory.
    init(file: OpenFile, blobSize: Int64, blockSize: Int64) throws(CacheError) {
        self.file = file
        self.blobSize = blobSize
        self.blockSize = blockSize
        blockCount = Int((blobSize + blockSize - 1) / blockSize)
        let header = (try? file.read(offset: 0, count: Int(Self.headerSize))) ?? []
        if header != Self.header(blobSize: blobSize, blockSize: blockSize) {
            // A fresh journal, or one for other parameters: every block is absent.
            _ = ftruncate(file.fd, 0)
            try file.write(Self.header(blobSize: blobSize, blockSize: blockSize), at: 0)
        }
    }

    static func header(blobSize: Int64, blockSize: Int64) -> [UInt8] {
        var bytes = magic
        withUnsafeBytes(of: blobSize.littleEndian) { bytes += $0 }
        withUnsafeBytes(of: blockSize.littleEndian) { bytes += $0 }
        bytes += [UInt8](repeating: 0, count: Int(headerSize) - bytes.count)
        return bytes
    }

    func range(ofBlock index: Int) -> Range<Int64> {
        let start = Int64(index) * blockSize
        return start..<min(start + blockSize, blobSize)
    }

    /// The CRC recorded for each block present, nil for absent ones.
    func recordedChecksums() -> [UInt32?] {
        let bytes = (try? file.read(offset: Self.headerSize, count: blockCount * Int(Self.recordSize))) ?? []
        return (0..<blockCount).map { index in
            let start = index * Int(Self.recordSize)
            guard start + Int(Self.recordSize) <= bytes.count else { return nil }
            let crc = Self.word(bytes, at: start)
            return Self.word(bytes, at: start + 4) == Self.presentMarker ? crc : nil
        }
    }

    func recordedChecksum(ofBlock index: Int) -> UInt32? {
        guard let bytes = try? file.read(offset: recordOffset(index), count: Int(Self.recordSize)),
              bytes.count == Int(Self.recordSize), Self.word(bytes, at: 4) == Self.presentMarker else { return nil }
        return Self.word(bytes, at: 0)
    }

    func record(block index: Int, checksum: UInt32) throws(CacheError) {
        var bytes: [UInt8] = []
        withUnsafeBytes(of: checksum.littleEndian) { bytes += $0 }
        withUnsafeBytes(of: Self.presentMarker.littleEndian) { bytes += $0 }
        try file.write(bytes, at: recordOffset(index))
    }

    func forget(block index: Int) {
        let zeros = [UInt8](repeating: 0, count: Int(Self.recordSize))
        try? file.write(zeros, at: recordOffset(index))
    }

    /// Claims blocks `first...last` for fetching; false when another process holds any of them.
    func tryClaim(_ blocks: ClosedRange<Int>) -> Bool { lock(blocks, type: Int16(F_WRLCK)) }

    func release(_ blocks: ClosedRange<Int>) { _ = lock(blocks, type: Int16(F_UNLCK)) }

    private func lock(_ blocks: ClosedRange<Int>, type: Int16) -> Bool {
        var description = flock()
        description.l_type = type
        description.l_whence = Int16(SEEK_SET)
        description.l_start = off_t(recordOffset(blocks.lowerBound))
        description.l_len = off_t(Int64(blocks.count) * Self.recordSize)
        description.l_pid = 0
        return fcntl(file.fd, LinuxConstants.openFileDescriptionSetLock, &description) == 0
    }

    private func recordOffset(_ index: Int) -> Int64 { Self.headerSize + Int64(index) * Self.recordSize }

    private static func word(_ bytes: [UInt8], at index: Int) -> UInt32 {
        UInt32(bytes[index]) | UInt32(bytes[index + 1]) << 8 | UInt32(bytes[index + 2]) << 16 | UInt32(bytes[index + 3]) << 24
    }
}

/// A block's checksum in the journal: CRC-32C, continued over `bytes`.
func crc32c(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
    guard let base = bytes.baseAddress, !bytes.isEmpty else { return crc }
    return CChecksum_crc32c(crc, base, bytes.count)
}
