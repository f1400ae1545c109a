import ArgumentParser
import ContentCache
import FoundationEssentials
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Show what a running mount has fetched, served, cached and published.",
        discussion: """
        Asks the mount's daemon, through a socket only its owner can use: bytes received from \
        the remote and served to readers, cache hits and misses (by blob and by byte), downloads \
        and uploads in flight, read latency percentiles (the bound of the histogram bucket they \
        fall in), errors by kind, and the cache directory's size and limits. Counts start when \
        the mount does.

        Example:
          ocicachefs stats /mnt/cache
        """
    )

    @Flag(help: "Print the statistics as one JSON object.")
    var json = false

    @Argument(help: ArgumentHelp("Where the cache is mounted.", valueName: "MOUNTPOINT"))
    var mountpoint: String

    func run() throws {
        let answer: [UInt8]
        do {
            let root = try PrefetchCommand.mountRoot(mountpoint)
            let socket = RuntimeFiles.controlSocket(forPIDFile: RuntimeFiles.pidFile(forMountpoint: root))
            answer = try Self.ask(socket, "stats", about: root)
        } catch {
            printError("stats: \(error)")
            throw ExitCode.failure
        }
        if json {
            _ = answer.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
            return
        }
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = jsonInfinity.decoding
        guard let snapshot = try? decoder.decode(MountStatisticsSnapshot.self, from: Data(answer)) else {
            printError("stats: the daemon's answer is not statistics: \(String(decoding: answer.prefix(200), as: UTF8.self))")
            throw ExitCode.failure
        }
        print(Self.describe(snapshot), terminator: "")
    }

    /// Sends `request` to the daemon's socket and returns its whole answer, waiting at most
    /// `seconds` for each part of it.
    static func ask(_ path: String, _ request: String, about mountpoint: String, waitingAtMost seconds: Int = 10) throws -> [UInt8] {
        var address = try StatisticsEndpoints.unixAddress(path)
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
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
            guard count >= 0 else { throw CommandError("\(mountpoint): the daemon's answer: \(String(cString: strerror(errno)))") }
            if count == 0 { break }
            answer += buffer[..<count]
        }
        return answer
    }

    static func describe(_ s: MountStatisticsSnapshot) -> String {
        func size(_ bytes: Int64) -> String { ByteSize.describe(bytes) }
        func latency(_ seconds: Double?) -> String {
            guard let seconds else { return "-" }
            if seconds.isInfinite { return "> \(MountStatistics.latencyBuckets.last ?? 0) s" }
            return seconds < 1 ? "≤ \((seconds * 1000).withOneDecimal) ms" : "≤ \(seconds.withOneDecimal) s"
        }
        let errors = s.errors.isEmpty ? "none" : s.errors.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
        var limits: [String] = []
        if let limit = s.cache.limitBytes { limits.append("cap \(size(limit))") }
        if let minFree = s.cache.minFreeBytes { limits.append("leaves \(size(minFree)) free") }
        return """
        uptime       \(Int(s.uptimeSeconds)) s
        remote       \(size(s.remoteBytes)) received, \(s.downloadsInFlight) download(s) in flight
        served       \(size(s.servedBytes)) in \(s.reads) read(s); latency p50 \(latency(s.readLatency.p50Seconds)), \
        p90 \(latency(s.readLatency.p90Seconds)), p99 \(latency(s.readLatency.p99Seconds))
        cache hits   \(s.cacheHitBlobs) blob(s), \(size(s.cacheHitBytes))
        cache misses \(s.cacheMissBlobs) blob(s), \(size(s.cacheMissBytes))
        uploads      \(size(s.uploadedBytes)) sent, \(s.uploadsInFlight) in flight
        errors       \(errors)
        cache        \(s.cache.directory): \(size(s.cache.bytes)) in \(s.cache.blobs) blob(s)\(limits.isEmpty ? "" : " (" + limits.joined(separator: ", ") + ")")

        """
    }
}
