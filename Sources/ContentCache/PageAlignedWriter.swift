#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Writes a stream of received pieces into a file in large writes that end on page
/// boundaries: pieces are gathered until `capacity` bytes are held, then everything up to the
/// last page boundary is written and the partial page kept for the next write or `flush`.
///
/// Two costs of ext4 on this path (docs/performance.md, "Measurements behind design choices"):
/// a buffered write that covers a new page only in part makes ext4 zero the rest of that page,
/// which the next write then overwrites; and every write pays a fixed price (the inode's lock,
/// which the connections of one download contend for, and the timestamps), so writing each
/// 16 to 64 KiB piece the socket delivers costs far more than writing the same bytes in
/// 256 KiB.
struct PageAlignedWriter: ~Copyable {
    static let pageSize = Int64(sysconf(Int32(_SC_PAGESIZE)))
    /// One buffer per download in progress, so at most one per fetch worker.
    static let defaultCapacity = 256 * 1024

    private let file: OpenFile
    /// Received bytes not yet written, which belong at `heldOffset`.
    private let held: UnsafeMutableRawBufferPointer
    private var heldOffset: Int64 = 0
    private var heldCount = 0

    /// `capacity` is rounded up to whole pages, at least two.
    init(file: OpenFile, capacity: Int = defaultCapacity) {
        self.file = file
        let page = Int(Self.pageSize)
        // SAFETY: owned by this noncopyable writer alone and freed in its deinit.
        held = .allocate(byteCount: max(2, (capacity + page - 1) / page) * page, alignment: page)
    }

    deinit { held.deallocate() }

    /// Takes `piece`, which belongs at `offset`; what it completes is written, up to a page
    /// boundary. A piece that does not continue the held bytes flushes them first.
    mutating func write(_ piece: UnsafeRawBufferPointer, at offset: Int64) throws(CacheError) {
        if heldCount > 0 && offset != heldOffset + Int64(heldCount) { try flush() }
        if heldCount == 0 { heldOffset = offset }
        var rest = piece
        while !rest.isEmpty {
            let taken = min(rest.count, held.count - heldCount)
            UnsafeMutableRawBufferPointer(rebasing: held[heldCount..<(heldCount + taken)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: rest[..<taken]))
            heldCount += taken
            rest = UnsafeRawBufferPointer(rebasing: rest[taken...])
            if heldCount == held.count { try writeWholePages() }
        }
    }

    /// Writes whatever is held.
    mutating func flush() throws(CacheError) {
        guard heldCount > 0 else { return }
        try file.write(UnsafeRawBufferPointer(rebasing: held[..<heldCount]), at: heldOffset)
        heldOffset += Int64(heldCount)
        heldCount = 0
    }

    /// Writes the held bytes up to the last page boundary they reach and moves the rest, less
    /// than a page, to the front. With at least two pages held there is such a boundary.
    private mutating func writeWholePages() throws(CacheError) {
        let pageEnd = (heldOffset + Int64(heldCount)) / Self.pageSize * Self.pageSize
        let count = Int(pageEnd - heldOffset)
        try file.write(UnsafeRawBufferPointer(rebasing: held[..<count]), at: heldOffset)
        let left = heldCount - count
        // SAFETY: both ranges lie inside `held`; memmove allows them to overlap.
        if left > 0 { memmove(held.baseAddress!, held.baseAddress! + count, left) }
        heldOffset = pageEnd
        heldCount = left
    }
}
