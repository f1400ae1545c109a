import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Unmounting a FUSE mount: root calls umount2 itself; others ask the setuid fusermount3.
public enum Unmounter {
    /// What the kernel calls a mount made with `subtype=ocicachefs`.
    public static let filesystemType = "fuse.ocicachefs"

    public static func unmount(_ path: String, lazy: Bool) -> Result<Void, FuseError> {
        if getuid() == 0 {
            if umount2(path, lazy ? Int32(MNT_DETACH) : 0) == 0 { return .success(()) }
            switch errno {
            case EBUSY:
                return .failure(FuseError(description: "\(path) is busy: a process still uses it"))
            case EINVAL:
                return .failure(FuseError(description: "\(path) is not mounted"))
            case EPERM, EACCES:
                return .failure(FuseError(description: "cannot unmount \(path): permission denied"))
            case let code:
                return .failure(FuseError(description: "cannot unmount \(path): \(String(cString: strerror(code)))"))
            }
        }
        let outcome: ChildProcess.Outcome
        do {
            outcome = try ChildProcess.run("/usr/bin/fusermount3", arguments: lazy ? ["-u", "-z", path] : ["-u", path],
                                           timeout: .seconds(30))
        } catch {
            return .failure(FuseError(description: "cannot run fusermount3: \(error)"))
        }
        guard outcome.exitStatus == 0 else {
            let message = String(decoding: outcome.stderr, as: UTF8.self).trimmingWhitespace()
            return .failure(FuseError(description: message.isEmpty ? "fusermount3 failed: \(outcome.terminationDescription)" : message))
        }
        return .success(())
    }
}

/// One line of `/proc/self/mountinfo`.
public struct MountEntry: Sendable, Equatable {
    public var mountpoint: String
    public var filesystemType: String
    /// The filesystem's own options (after the separator), e.g. FUSE's `user_id=1000`.
    public var superOptions: [String]

    /// The uid a FUSE mount belongs to (`user_id=`), nil for other filesystems.
    public var fuseOwner: uid_t? {
        superOptions.first { $0.hasPrefix("user_id=") }.flatMap { uid_t($0.dropFirst("user_id=".count)) }
    }
}

/// The mounts this process sees.
public enum MountTable {
    /// The mount on top at exactly `path` (absolute, without symbolic links), or nil when
    /// nothing is mounted there.
    public static func topmost(at path: String) -> MountEntry? {
        // A mount over a mount is listed after it.
        parse(readProcFile("/proc/self/mountinfo")).last { $0.mountpoint == path }
    }

    /// A /proc file has no size to stat: read until EOF. Empty when unreadable.
    private static func readProcFile(_ path: String) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            bytes.append(contentsOf: chunk[..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `36 35 98:0 /root /mnt rw,noatime master:1 - ext4 /dev/sda1 rw,errors=continue`: the
    /// mount point is field 5; the type, source and super options follow the lone "-".
    static func parse(_ text: String) -> [MountEntry] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count > 5, let dash = fields[5...].firstIndex(of: "-"), dash + 3 < fields.count else { return nil }
            return MountEntry(mountpoint: unescape(fields[4]), filesystemType: unescape(fields[dash + 1]),
                              superOptions: fields[dash + 3].split(separator: ",").map(String.init))
        }
    }

    /// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
    static func unescape(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        var rest = Array(field.utf8)[...]
        while let byte = rest.popFirst() {
            if byte == UInt8(ascii: "\\"), rest.count >= 3,
               let value = UInt8(String(decoding: rest.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                rest = rest.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
