import ArgumentParser
import FoundationEssentials
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

struct RefreshCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "refresh",
        abstract: "Resolve every ref of a running mount again, without unmounting.",
        discussion: """
        For a tag that moved on the remote (another job exported it): the mount's daemon \
        resolves its SOURCE and each --tag again, each within the mount's --timeout, and from \
        then on index.json shows the new tags and blobs/sha256 the blobs they reach. A file \
        opened before keeps reading the same bytes (blobs are content-addressed); a blob no tag \
        reaches any more leaves the listing. A ref that fails keeps showing what it showed. \
        Prints one line per tag saying what changed, and exits non-zero if a ref failed. \
        Writable mounts are not refreshed: their index.json is what clients exported.

        Example:
          ocicachefs refresh /mnt/cache
        """
    )

    @Option(help: ArgumentHelp("How long to wait, in seconds, for the daemon's answer.", valueName: "SECONDS"))
    var wait: Int = 900

    @Argument(help: ArgumentHelp("Where the cache is mounted.", valueName: "MOUNTPOINT"))
    var mountpoint: String

    func validate() throws {
        guard wait > 0 else { throw ValidationError("--wait must be positive") }
    }

    func run() throws {
        let answer: String
        do {
            let root = try PrefetchCommand.mountRoot(mountpoint)
            let socket = RuntimeFiles.controlSocket(forPIDFile: RuntimeFiles.pidFile(forMountpoint: root))
            answer = String(decoding: try StatsCommand.ask(socket, "refresh", about: root, waitingAtMost: wait), as: UTF8.self)
        } catch {
            printError("refresh: \(error)")
            throw ExitCode.failure
        }
        var failed = answer.isEmpty
        for line in answer.split(separator: "\n") {
            if line.hasPrefix("ok ") {
                print(line.dropFirst(3))
            } else if line.hasPrefix("failed ") {
                failed = true
                printError("refresh: " + line.dropFirst(7))
            } else {
                failed = true
                printError("refresh: " + (line.hasPrefix("error: ") ? String(line.dropFirst(7)) : String(line)))
            }
        }
        if answer.isEmpty { printError("refresh: the daemon gave no answer") }
        if failed { throw ExitCode.failure }
    }
}
