internal import CSystem

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Creates a file that lives only in memory (`memfd_create`), for data that must not or cannot
/// go to disk. Returns its descriptor, or the errno of the failure.
public func createMemoryFile(named name: String) -> Result<Int32, Errno> {
    let fd = CSystem_memoryFile(name)
    return fd >= 0 ? .success(fd) : .failure(Errno(rawValue: errno))
}

/// Allocates the disk blocks of `range` in the file without changing its size; false when the
/// filesystem cannot (the writes then allocate as they go).
@discardableResult
public func allocateKeepingSize(fd: Int32, _ range: Range<Int64>) -> Bool {
    CSystem_allocateKeepingSize(fd, range.lowerBound, Int64(range.count)) == 0
}

/// Frees the disk blocks of `range` in the file without changing its size (the range then
/// reads as zeros); false when the filesystem cannot.
@discardableResult
public func freeKeepingSize(fd: Int32, _ range: Range<Int64>) -> Bool {
    CSystem_freeKeepingSize(fd, range.lowerBound, Int64(range.count)) == 0
}

/// Starts writing the dirty pages of `range` of the file to disk without waiting for them
/// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`). Advisory: a failure changes nothing.
public func startWriteBack(fd: Int32, _ range: Range<Int64>) {
    _ = CSystem_startWriteBack(fd, range.lowerBound, Int64(range.count))
}

/// How many pages of `range` of the file the kernel's page cache holds (`cachestat`, Linux 6.5).
public func cachedPageCount(fd: Int32, _ range: Range<Int64>) -> Result<Int64, Errno> {
    let pages = CSystem_cachedPages(fd, range.lowerBound, Int64(range.count))
    return pages >= 0 ? .success(pages) : .failure(Errno(rawValue: errno))
}

/// An errno value, for results that carry a system call's failure.
public struct Errno: Error, Sendable, Equatable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public var description: String { String(cString: strerror(rawValue)) }
}
