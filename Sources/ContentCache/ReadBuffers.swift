import FoundationEssentials
import Dispatch
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// A fixed number of buffers that reads from the cache's files borrow for as long as it takes to
/// check them or hand them to the kernel; a borrower waits while all are out.
///
/// A fresh megabyte per read grew glibc's heaps: once a freed large block raises malloc's mmap
/// threshold, later ones come from the heaps and fragment them, and the daemon's RSS rose by
/// about 20 MiB while streaming 4 GiB. A fixed set also bounds the peak: with no cap, bursts of
/// replies each held their own megabyte at once. Holders never wait for anything but the disk
/// and the kernel's reply queue, so waiting for a buffer cannot deadlock.
final class ReadBuffers: Sendable {
    /// SAFETY: a mapping has one borrower at a time; the pool hands it over under its lock.
    private struct Mapping: @unchecked Sendable {
        let base: UnsafeMutableRawPointer
    }

    let size: Int
    let count: Int
    private let permits: DispatchSemaphore
    /// Mapped on first need, so a mount that never reads a blob maps none.
    private let idle = Mutex<[Mapping]>([])

    init(size: Int, count: Int) {
        self.size = size
        self.count = max(count, 1)
        permits = DispatchSemaphore(value: self.count)
    }

    deinit {
        for mapping in idle.withLock({ $0 }) { munmap(mapping.base, size) }
    }

    /// Calls `body` with `count` bytes of writable memory that stay valid until it returns; nil
    /// when the memory cannot be had.
    func withBuffer<R>(count: Int, _ body: (UnsafeMutableRawBufferPointer) -> R) -> R? {
        guard count > 0 else { return body(UnsafeMutableRawBufferPointer(start: nil, count: 0)) }
        permits.wait()
        defer { permits.signal() }
        if count > size {
            // Larger than any read the kernel sends: only a caller outside the mount asks this.
            guard let base = Self.map(count) else { return nil }
            defer { munmap(base, count) }
            return body(UnsafeMutableRawBufferPointer(start: base, count: count))
        }
        guard let mapping = idle.withLock({ $0.popLast() }) ?? Self.map(size).map(Mapping.init) else { return nil }
        defer { idle.withLock { $0.append(mapping) } }
        return body(UnsafeMutableRawBufferPointer(start: mapping.base, count: count))
    }

    private static func map(_ count: Int) -> UnsafeMutableRawPointer? {
        let base = mmap(nil, count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let base, base != MAP_FAILED else { return nil }
        return base
    }
}
