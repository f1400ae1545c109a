#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// An errno answer for the kernel, named as swift-system names them.
public struct FSError: Error, Sendable, Equatable, CustomStringConvertible {
    public let code: Int32

    public init(_ code: Int32) { self.code = code }

    public static let noSuchFileOrDirectory = FSError(ENOENT)
    public static let readOnlyFileSystem = FSError(EROFS)
    public static let fileExists = FSError(EEXIST)
    public static let notDirectory = FSError(ENOTDIR)
    public static let isDirectory = FSError(EISDIR)
    public static let directoryNotEmpty = FSError(ENOTEMPTY)
    public static let invalidArgument = FSError(EINVAL)
    public static let ioError = FSError(EIO)
    public static let noSpace = FSError(ENOSPC)
    public static let nameTooLong = FSError(ENAMETOOLONG)
    public static let badFileDescriptor = FSError(EBADF)
    public static let notPermitted = FSError(EPERM)
    public static let notImplemented = FSError(ENOSYS)

    public var description: String { String(cString: strerror(code)) }
}

public struct Timestamp: Sendable, Equatable {
    public var seconds: Int
    public var nanoseconds: Int

    public init(seconds: Int, nanoseconds: Int) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    public static func now() -> Timestamp {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Timestamp(seconds: spec.tv_sec, nanoseconds: spec.tv_nsec)
    }
}

public enum FileType: Sendable, Equatable {
    case directory
    case regular
    /// The `files/` view shows a layer's symlinks, devices and fifos as the tar holds them.
    case symlink
    case characterDevice
    case blockDevice
    case fifo

    public var modeBits: UInt32 {
        switch self {
        case .directory: return UInt32(S_IFDIR)
        case .regular: return UInt32(S_IFREG)
        case .symlink: return UInt32(S_IFLNK)
        case .characterDevice: return UInt32(S_IFCHR)
        case .blockDevice: return UInt32(S_IFBLK)
        case .fifo: return UInt32(S_IFIFO)
        }
    }
}

public struct FileAttributes: Sendable, Equatable {
    public var inode: UInt64
    public var type: FileType
    /// Permission bits only.
    public var permissions: UInt32
    public var linkCount: UInt32
    public var size: Int64
    public var modified: Timestamp
    public var uid: UInt32
    public var gid: UInt32
    /// A device's number (`st_rdev`, as glibc's `makedev` makes it); 0 for anything else.
    public var device: UInt64 = 0

    public var mode: UInt32 { type.modeBits | permissions }
}

/// An answer to lookup/create/mkdir: the attributes and how long the kernel may keep them.
public struct Entry: Sendable, Equatable {
    public var attributes: FileAttributes
    /// Seconds the kernel may cache the name and the attributes.
    public var cacheSeconds: Double
}

public struct DirectoryEntry: Sendable, Equatable {
    public var name: String
    public var inode: UInt64
    public var type: FileType
}

/// What `setattr` asks to change; nil fields stay as they are.
public struct AttributeChanges: Sendable {
    public var permissions: UInt32?
    public var size: Int64?
    public var modified: Timestamp?

    public init(permissions: UInt32? = nil, size: Int64? = nil, modified: Timestamp? = nil) {
        self.permissions = permissions
        self.size = size
        self.modified = modified
    }

    public var isEmpty: Bool { permissions == nil && size == nil && modified == nil }
}

public struct OpenFlags: Sendable {
    public var rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    public var wantsWrite: Bool { rawValue & O_ACCMODE != O_RDONLY }
    public var truncates: Bool { rawValue & O_TRUNC != 0 }
    public var exclusive: Bool { rawValue & O_EXCL != 0 }
}
