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

/// An errno value, for results that carry a system call's failure.
public struct Errno: Error, Sendable, Equatable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public var description: String { String(cString: strerror(rawValue)) }
}
