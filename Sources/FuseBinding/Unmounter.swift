import Foundation

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
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
        process.arguments = lazy ? ["-u", "-z", path] : ["-u", path]
        let errors = Pipe()
        process.standardError = errors
        do {
            try process.run()
        } catch {
            return .failure(FuseError(description: "cannot run fusermount3: \(error.localizedDescription)"))
        }
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            return .failure(FuseError(description: message.trimmingCharacters(in: .whitespacesAndNewlines)))
        }
        return .success(())
    }
}
