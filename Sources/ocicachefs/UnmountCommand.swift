import ArgumentParser
import FoundationEssentials
import FuseBinding
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

struct UnmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmount",
        abstract: "Unmount MOUNTPOINT and wait for its daemon to exit.",
        discussion: """
        Acts only on an ocicachefs mount: any other filesystem at MOUNTPOINT is left alone. \
        For a --writable mount it waits while the daemon publishes what clients exported, \
        printing its progress, and fails naming every blob or tag it could not publish. \
        Fails with EBUSY's message while a process still has a file open in the mount. \
        Sending SIGTERM or SIGINT to the daemon also unmounts cleanly.

        Example:
          ocicachefs unmount /mnt/cache
        """
    )

    @Option(help: ArgumentHelp("How long to wait for the daemon to exit, in seconds.", valueName: "SECONDS"))
    var timeout: Double = 30

    @Argument(help: ArgumentHelp("Where the cache is mounted.", valueName: "MOUNTPOINT"))
    var mountpoint: String

    func run() throws {
        let path: String
        do {
            path = try Self.ocicachefsMount(mountpoint)
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
        let pidFile = RuntimeFiles.pidFile(forMountpoint: path)
        let pid = RuntimeFiles.readPID(pidFile)
        switch Unmounter.unmount(path, lazy: false) {
        case .success: break
        case .failure(let error):
            printError(error.description)
            throw ExitCode.failure
        }
        let statusFile = RuntimeFiles.statusFile(forPIDFile: pidFile)
        guard let pid, RuntimeFiles.isMountDaemon(pid) else {
            // A daemon killed outright leaves its files: they describe nothing now.
            unlink(pidFile)
            unlink(RuntimeFiles.controlSocket(forPIDFile: pidFile))
            return
        }
        // A writable mount's daemon finishes its uploads first: wait as long as it reports
        // progress, and at most --timeout without any.
        var deadline = Date().addingTimeInterval(timeout)
        var lastStatus: String?
        // The daemon removes its PID file as it exits.
        while kill(pid, 0) == 0 && FileManager.default.fileExists(atPath: pidFile) {
            let status = try? String(contentsOfFile: statusFile, encoding: .utf8)
            if let status, status != lastStatus {
                lastStatus = status
                deadline = Date().addingTimeInterval(timeout)
                if status.hasPrefix("uploading") { printError(status.trimmingWhitespace()) }
            }
            guard Date() < deadline else {
                printError("unmounted \(path), but its daemon (pid \(pid)) is still running after \(Int(timeout)) s"
                           + (lastStatus == nil ? "" : " without progress"))
                throw ExitCode.failure
            }
            usleep(20_000)
        }
        guard let final = try? String(contentsOfFile: statusFile, encoding: .utf8) else { return }
        unlink(statusFile)
        let unpublished = final.split(separator: "\n").filter { $0.hasPrefix("not published") }
        guard unpublished.isEmpty else {
            for line in unpublished { printError(String(line)) }
            throw ExitCode.failure
        }
    }

    /// The mount point as the kernel lists it, when an ocicachefs mount this user may unmount is
    /// on top there. The directory itself is never stat'ed: a mount of another user answers
    /// EACCES and one whose daemon died ENOTCONN, and those need unmounting most.
    static func ocicachefsMount(_ argument: String) throws -> String {
        let resolved = realpath(argument, nil)
        let resolveError = errno
        defer { free(resolved) }
        let path = resolved.map { String(cString: $0) } ?? lexicallyAbsolute(argument)
        guard let entry = MountTable.topmost(at: path) else {
            if resolved == nil { throw CommandError("\(argument): \(String(cString: strerror(resolveError)))") }
            throw CommandError("\(path) is not mounted")
        }
        guard entry.filesystemType == Unmounter.filesystemType else {
            throw CommandError("\(path) is not an ocicachefs mount (it is \(entry.filesystemType))")
        }
        // fusermount3 would only say it finds no entry of ours in /etc/mtab.
        if getuid() != 0, let owner = entry.fuseOwner, owner != getuid() {
            throw CommandError("cannot unmount \(path): permission denied (it was mounted by uid \(owner))")
        }
        return path
    }

    /// `path` made absolute and stripped of `.`, `..` and repeated slashes, without touching
    /// the filesystem.
    static func lexicallyAbsolute(_ path: String) -> String {
        var full = path
        if !path.hasPrefix("/") {
            let cwd = getcwd(nil, 0)
            defer { free(cwd) }
            full = (cwd.map { String(cString: $0) } ?? "") + "/" + path
        }
        var components: [Substring] = []
        for component in full.split(separator: "/") {
            switch component {
            case ".": continue
            case "..": _ = components.popLast()
            default: components.append(component)
            }
        }
        return "/" + components.joined(separator: "/")
    }
}
