import ArgumentParser
import FoundationEssentials
import FuseBinding

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

struct UnmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmount",
        abstract: "Unmount MOUNTPOINT and wait for its daemon to exit.",
        discussion: """
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
            path = try MountCommand.checkedMountpoint(mountpoint)
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
        guard let pid, RuntimeFiles.isMountDaemon(pid) else {
            unlink(pidFile)
            return
        }
        let deadline = Date().addingTimeInterval(timeout)
        // The daemon removes its PID file as it exits.
        while kill(pid, 0) == 0 && FileManager.default.fileExists(atPath: pidFile) {
            guard Date() < deadline else {
                printError("unmounted \(path), but its daemon (pid \(pid)) is still running after \(Int(timeout)) s")
                throw ExitCode.failure
            }
            usleep(20_000)
        }
    }
}
