import ContentCache
import FoundationEssentials
import Logging
import Synchronization
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Where a running mount's statistics can be read: a unix socket in the run directory that
/// only the daemon's owner can reach (`ocicachefs stats`), and optionally a Prometheus text
/// file rewritten every few seconds and an HTTP `/metrics` listener.
final class StatisticsEndpoints: Sendable {
    /// How often the metrics file is rewritten.
    static let fileInterval: Duration = .seconds(5)
    /// A client that does not send its request or take its answer within this is dropped.
    static let clientBound = 2
    /// The periodic exports scan the cache directory at most this often (100,000 blobs take a
    /// moment); `ocicachefs stats`, asked by a person, always scans.
    static let cacheScanInterval: Duration = .seconds(10)

    private let statistics: MountStatistics
    private let mountpoint: String
    private let cacheDirectory: String
    private let limits: CacheLimits
    private let logger: Logger
    private let listeners = Mutex<[Int32]>([])
    private let stopped = Atomic<Bool>(false)
    private let stopSignal = Mutex(false)
    /// Answers `refresh`: resolves the mount's refs again and says what changed.
    private let refresher = Mutex<(@Sendable () -> String)?>(nil)
    private let lastScan = Mutex<(at: ContinuousClock.Instant, cache: MountStatisticsSnapshot.Cache)?>(nil)

    init(statistics: MountStatistics, mountpoint: String, cacheDirectory: String, limits: CacheLimits, logger: Logger) {
        self.statistics = statistics
        self.mountpoint = mountpoint
        self.cacheDirectory = cacheDirectory
        self.limits = limits
        self.logger = logger
    }

    func snapshot(scanningCache: Bool = false) -> MountStatisticsSnapshot {
        let cache = lastScan.withLock { last -> MountStatisticsSnapshot.Cache in
            if !scanningCache, let last, ContinuousClock.now - last.at < Self.cacheScanInterval { return last.cache }
            let blobs = ContentStore.completeBlobs(inCache: cacheDirectory)
            let partial = ContentStore.partialBlobs(inCache: cacheDirectory)
            let cache = MountStatisticsSnapshot.Cache(directory: cacheDirectory,
                                                      bytes: (blobs + partial).reduce(0) { $0 + $1.size }, blobs: blobs.count,
                                                      limitBytes: limits.maxBytes, minFreeBytes: limits.minFreeBytes)
            last = (ContinuousClock.now, cache)
            return cache
        }
        return statistics.snapshot(cache: cache)
    }

    func prometheusText() -> String { snapshot().prometheusText(mountpoint: mountpoint) }

    // MARK: The control socket

    /// `ocicachefs refresh`: its answer is what `refresh` returns.
    func onRefresh(_ refresh: @escaping @Sendable () -> String) {
        refresher.withLock { $0 = refresh }
    }

    /// Serves `stats` (JSON), `metrics` (Prometheus text) and `refresh` requests, one line each,
    /// at `path`.
    func serveControlSocket(at path: String) throws {
        var address = try Self.unixAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CommandError("statistics socket: \(String(cString: strerror(errno)))") }
        unlink(path)
        // Created unreadable by others from the start, not narrowed after a window.
        let previousMask = umask(0o177)
        let bound = withUnsafePointer(to: &address) { pointer in
            // SAFETY: sockaddr_un starts with the generic sockaddr header, as bind expects.
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(previousMask)
        guard bound == 0, listen(fd, 16) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw CommandError("statistics socket \(path): \(reason)")
        }
        serve(fd, named: "ocicachefs-stats") { [self] client in
            guard let line = Self.readRequest(client)?.split(separator: "\n").first else { return }
            switch line.trimmingWhitespace() {
            case "stats": Self.send(client, String(decoding: Self.json(snapshot(scanningCache: true)), as: UTF8.self) + "\n")
            case "metrics": Self.send(client, prometheusText())
            case "refresh":
                // Resolving takes network time (bounded by --timeout): stats wait meanwhile.
                Self.send(client, refresher.withLock { $0 }?() ?? "error: this mount cannot be refreshed\n")
            default: Self.send(client, "error: unknown request\n")
            }
        }
    }

    // MARK: Prometheus

    /// `GET /metrics` over HTTP on `host:port`.
    func serveMetrics(host: String, port: UInt16) throws {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            throw CommandError("--metrics-listen: \(host) is not an IPv4 address")
        }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CommandError("--metrics-listen: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &address) { pointer in
            // SAFETY: sockaddr_in starts with the generic sockaddr header, as bind expects.
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw CommandError("--metrics-listen \(host):\(port): \(reason)")
        }
        serve(fd, named: "ocicachefs-metrics") { [self] client in
            guard let request = Self.readRequest(client, until: "\r\n\r\n") else { return }
            let target = request.split(separator: " ", maxSplits: 2).dropFirst().first ?? ""
            guard request.hasPrefix("GET "), target == "/metrics" || target.hasPrefix("/metrics?") else {
                Self.send(client, "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n")
                return
            }
            let body = prometheusText()
            Self.send(client, "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                      + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body)
        }
    }

    /// Rewrites `path` (through a temporary file and a rename, so a reader never sees half of
    /// it) every `fileInterval` until `stop`, and once more then.
    func writeMetricsFile(to path: String) {
        let temporary = path + ".tmp-\(getpid())"
        let write: @Sendable () -> Void = { [self] in
            do {
                try prometheusText().write(toFile: temporary, atomically: false, encoding: .utf8)
                guard rename(temporary, path) == 0 else { throw CommandError(String(cString: strerror(errno))) }
            } catch {
                unlink(temporary)
                logger.warning("cannot write the metrics file", metadata: ["file": "\(path)", "error": "\(error)"])
            }
        }
        SystemThread.start(named: "ocicachefs-metrics-file") { [self] in
            while !stopped.load(ordering: .acquiring) {
                write()
                let deadline = ContinuousClock.now + Self.fileInterval
                while !stopped.load(ordering: .acquiring) && ContinuousClock.now < deadline {
                    SystemThread.sleep(for: .milliseconds(100))
                }
            }
            write()
            stopSignal.withLock { $0 = true }
        }
    }

    /// Stops accepting; the metrics file gets its last version before this returns.
    func stop(metricsFile: Bool) {
        stopped.store(true, ordering: .releasing)
        for fd in listeners.withLock({ $0 }) { shutdown(fd, Int32(SHUT_RDWR)) }
        let deadline = ContinuousClock.now + .seconds(5)
        while metricsFile && !stopSignal.withLock({ $0 }) && ContinuousClock.now < deadline {
            SystemThread.sleep(for: .milliseconds(10))
        }
    }

    // MARK: Sockets

    private func serve(_ listener: Int32, named name: String, _ handle: @escaping @Sendable (Int32) -> Void) {
        listeners.withLock { $0.append(listener) }
        SystemThread.start(named: name) { [self] in
            defer { close(listener) }
            while !stopped.load(ordering: .acquiring) {
                let client = accept(listener, nil, nil)
                if client < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    if !stopped.load(ordering: .acquiring) {
                        logger.warning("statistics endpoint stopped", metadata: ["error": "\(String(cString: strerror(errno)))"])
                    }
                    return
                }
                // Credential helpers the daemon starts must not inherit a client's connection.
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                var bound = timeval(tv_sec: Self.clientBound, tv_usec: 0)
                setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &bound, socklen_t(MemoryLayout<timeval>.size))
                setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &bound, socklen_t(MemoryLayout<timeval>.size))
                handle(client)
                close(client)
            }
        }
    }

    /// What the client sent up to `terminator` (at most 8 KiB); nil if it sent nothing in time.
    static func readRequest(_ fd: Int32, until terminator: String = "\n") -> String? {
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        while bytes.count < 8192 {
            let count = recv(fd, &buffer, buffer.count, 0)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            bytes += buffer[..<count]
            if String(decoding: bytes, as: UTF8.self).contains(terminator) { break }
        }
        return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
    }

    static func send(_ fd: Int32, _ text: String) {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let sent = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent < 0 && errno == EINTR { continue }
            guard sent > 0 else { return }
            bytes = bytes.dropFirst(sent)
        }
    }

    static func unixAddress(_ path: String) throws -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw CommandError("socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        return address
    }

    static func json(_ snapshot: MountStatisticsSnapshot) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = jsonInfinity.encoding
        // A snapshot holds only numbers, strings and arrays of them: encoding cannot fail.
        return Array((try? encoder.encode(snapshot)) ?? Data())
    }
}

/// A latency quantile past the histogram's last bound is infinite, which JSON cannot hold.
let jsonInfinity = (encoding: JSONEncoder.NonConformingFloatEncodingStrategy.convertToString(
                        positiveInfinity: "+Inf", negativeInfinity: "-Inf", nan: "NaN"),
                    decoding: JSONDecoder.NonConformingFloatDecodingStrategy.convertFromString(
                        positiveInfinity: "+Inf", negativeInfinity: "-Inf", nan: "NaN"))
