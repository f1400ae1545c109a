#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Writes a stream of received pieces into a file so that every write ends on a page boundary,
/// holding back the partial last page of each piece until the next one completes it.
///
/// A buffered write that covers a new page only in part makes ext4 zero the rest of that page,
/// which the next write then overwrites. Pieces come in whatever sizes the socket delivers, and
/// after the first odd-sized one every write starts and ends mid-page (docs/performance.md,
/// "Measurements behind design choices", has what that cost).
struct PageAlignedWriter: ~Copyable {
    static let pageSize = Int64(sysconf(Int32(_SC_PAGESIZE)))

    private let file: OpenFile
    /// Received bytes not yet written; they never extend past the page `heldOffset` is in.
    private let held: UnsafeMutableRawBufferPointer
    private var heldOffset: Int64 = 0
    private var heldCount = 0

    init(file: OpenFile) {
        self.file = file
        held = .allocate(byteCount: Int(Self.pageSize), alignment: 16)
    }

    deinit { held.deallocate() }

    /// Writes `piece`, which belongs at `offset`, except for a partial last page, which is kept
    /// for the next piece or `flush`. A piece that does not continue the held bytes flushes them
    /// first.
    mutating func write(_ piece: UnsafeRawBufferPointer, at offset: Int64) throws(CacheError) {
        if heldCount > 0 && offset != heldOffset + Int64(heldCount) { try flush() }
        if heldCount == 0 { heldOffset = offset }
        let end = heldOffset + Int64(heldCount + piece.count)
        let pageEnd = end / Self.pageSize * Self.pageSize
        let direct = pageEnd > heldOffset ? Int(pageEnd - heldOffset) - heldCount : 0
        if direct > 0 {
            try file.write(UnsafeRawBufferPointer(rebasing: held[..<heldCount]),
                           followedBy: UnsafeRawBufferPointer(rebasing: piece[..<direct]), at: heldOffset)
            heldOffset = pageEnd
            heldCount = 0
        }
        let rest = UnsafeRawBufferPointer(rebasing: piece[direct...])
        UnsafeMutableRawBufferPointer(rebasing: held[heldCount...]).copyMemory(from: rest)
        heldCount += rest.count
    }

    /// Writes whatever is held.
    mutating func flush() throws(CacheError) {
        guard heldCount > 0 else { return }
        try file.write(UnsafeRawBufferPointer(rebasing: held[..<heldCount]), at: heldOffset)
        heldCount = 0
    }
}
