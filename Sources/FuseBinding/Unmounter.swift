import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Unmounting a FUSE mount: root calls umount2 itself; others ask the setuid fusermount3.
public enum Unmounter {
    public static func unmount(_ path: String, lazy: Bool) -> Result<Void, FuseError> {
        if getuid() == 0 {
            if umount2(path, lazy ? Int32(MNT_DETACH) : 0) == 0 { return .success(()) }
            let code = errno
            if code == EBUSY {
                return .failure(FuseError(description: "\(path) is busy: a process still uses it"))
            }
            return .failure(FuseError(description: "cannot unmount \(path): \(String(cString: strerror(code)))"))
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
