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
            answer = try Self.ask(socket, "refresh", about: root, waitingAtMost: wait)
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

    /// Sends `request` to the daemon's socket and returns its whole answer, waiting at most
    /// `seconds` for each part of it.
    static func ask(_ path: String, _ request: String, about mountpoint: String, waitingAtMost seconds: Int) throws -> String {
        var address = try StatisticsEndpoints.unixAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CommandError(String(cString: strerror(errno))) }
        defer { close(fd) }
        var bound = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &bound, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &bound, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) { pointer in
            // SAFETY: sockaddr_un starts with the generic sockaddr header, as connect expects.
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            let reason = errno == ENOENT || errno == ECONNREFUSED
                ? "its daemon does not answer (a mount of an older ocicachefs, or it is exiting)"
                : String(cString: strerror(errno))
            throw CommandError("\(mountpoint): \(reason)")
        }
        StatisticsEndpoints.send(fd, request + "\n")
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = recv(fd, &buffer, buffer.count, 0)
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else {
                throw CommandError("\(mountpoint): the daemon's answer: \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            answer += buffer[..<count]
        }
        return String(decoding: answer, as: UTF8.self)
    }
}
