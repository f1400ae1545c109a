import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

// The integration harness: real processes only (docker-registry through scripts/testenv,
// the token issuer, the built `ocicachefs` binary, skopeo), each test in its own workspace
// with its own ports, directories and mountpoint, and everything stopped by PID at the end.
//
// Usage:
//     try await withWorkspace("name") { ws in
//         let registry = try await ws.startRegistry()
//         let seed = try await ws.seed(registry, variant: "index")
//         let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
//         ...
//     }   // unmounts, stops the servers and removes the workspace, even when the test failed

/// A harness failure: a missing prerequisite, a server that did not start, a command that
/// did not behave. Thrown, so the test fails with this message (never a skip).
struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

// MARK: - Locations and prerequisites

enum Harness {
    /// Tests/IntegrationTests/Harness.swift -> package root.
    static let packageRoot: String = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    static let testenv = packageRoot + "/scripts/testenv"

    /// The built `ocicachefs`: a sibling of the test bundle (`.build*/<triple>/<config>/`).
    /// `OCICACHEFS_BINARY` overrides the search.
    static func binary() throws -> String {
        if let override = ProcessInfo.processInfo.environment["OCICACHEFS_BINARY"], !override.isEmpty {
            guard FileManager.default.isExecutableFile(atPath: override) else {
                throw HarnessError("OCICACHEFS_BINARY=\(override) is not an executable file")
            }
            return override
        }
        var candidates: [String] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            // The bundle is `<dir>/ocicachefsPackageTests.xctest` (a file on Linux) or a
            // directory holding the executable one level down; look beside both.
            var directory = URL(fileURLWithPath: exe).deletingLastPathComponent()
            for _ in 0..<2 {
                candidates.append(directory.appendingPathComponent("ocicachefs").path)
                directory = directory.deletingLastPathComponent()
            }
        }
        for candidate in candidates where FileManager.default.isExecutableFile(atPath: candidate) {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: candidate, isDirectory: &isDirectory), !isDirectory.boolValue {
                return candidate
            }
        }
        throw HarnessError("""
            the ocicachefs binary was not found next to the test bundle (looked at \(candidates)); \
            run `swift build` (with the same --scratch-path as `swift test`) first, or set OCICACHEFS_BINARY
            """)
    }

    /// An executable on PATH (or the usual system directories); missing is a failure.
    static func tool(_ name: String, neededFor purpose: String) throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = path.split(separator: ":").map(String.init) + ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        for directory in directories {
            let candidate = directory + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw HarnessError("prerequisite missing: `\(name)` (needed for \(purpose)) is not on PATH; on Debian install it with apt-get")
    }

    static func python() throws -> String { try tool("python3", neededFor: "scripts/testenv") }

    /// FUSE must be usable: /dev/fuse present and openable, fusermount3 installed.
    static func requireFuse() throws {
        let fd = open("/dev/fuse", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            throw HarnessError("prerequisite missing: cannot open /dev/fuse (\(String(cString: strerror(errno)))); FUSE is needed for the mount")
        }
        close(fd)
        _ = try tool("fusermount3", neededFor: "unmounting FUSE mounts (package fuse3)")
    }

    static func requireScripts() throws {
        for script in ["registry.py", "seed_cache.py", "token_issuer.py"] {
            guard FileManager.default.fileExists(atPath: testenv + "/" + script) else {
                throw HarnessError("test environment script missing: \(testenv)/\(script)")
            }
        }
    }
}

// MARK: - Processes

struct ProcessResult: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    /// Seconds from start to exit.
    var elapsed: Double
    var command: String

    var stderrLines: [String] { stderr.split(separator: "\n", omittingEmptySubsequences: true).map(String.init) }

    var description: String {
        "`\(command)` exited \(status) after \(String(format: "%.2f", elapsed)) s; stdout: \(stdout.debugDescription); stderr: \(stderr.debugDescription)"
    }
}

/// glibc (2.34+) has it; Swift's Glibc module does not export it.
@_silgen_name("posix_spawn_file_actions_addclosefrom_np")
@discardableResult
func spawnActionsCloseFrom(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ lowestFD: Int32) -> Int32

/// A child process started with posix_spawn and reaped with waitpid, by its PID.
///
/// Not Foundation's `Process`: on Linux it passes the spawning thread's signal mask on (test
/// threads block SIGTERM, so servers could not be stopped) and its SIGCHLD-driven reaping
/// left exited children as zombies that still looked "running". Output goes to files, never
/// pipes: a daemon that inherits a descriptor can then never keep us waiting for EOF.
/// A dedicated thread blocks in waitpid, so the exit time is exact even when the test
/// runner's cooperative threads are all busy.
final class ChildProcess: @unchecked Sendable {
    // SAFETY (@unchecked Sendable): `exit` and `stdinWriter` are guarded by `lock`.
    let pid: pid_t
    let command: String
    let started: Date
    private let lock = NSLock()
    private var exit: (status: Int32, time: Date)?
    private var stdinWriter: Int32?

    /// - Parameter keepStdinOpen: stdin is a pipe whose write end we hold until `stop()`, so a
    ///   child that exits on EOF cannot outlive us; otherwise stdin is /dev/null.
    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
         stdoutPath: String, stderrPath: String, keepStdinOpen: Bool = false) throws {
        command = ([executable] + arguments).joined(separator: " ")
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var pipeFDs: [Int32] = [-1, -1]
        if keepStdinOpen {
            guard pipe(&pipeFDs) == 0 else { throw HarnessError("pipe: \(String(cString: strerror(errno)))") }
            // Neither end may leak into other children (the read end is dup2'd for this one).
            _ = fcntl(pipeFDs[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(pipeFDs[1], F_SETFD, FD_CLOEXEC)
            posix_spawn_file_actions_adddup2(&actions, pipeFDs[0], 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        // Tests run in parallel: without this, a long-lived server would inherit whatever
        // another test had open at that moment (pipes that then never see EOF, scripts being
        // written that then cannot be executed: ETXTBSY).
        spawnActionsCloseFrom(&actions, 3)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2, SIGALRM] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        var argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        var envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        started = Date()
        let rc = posix_spawn(&pid, executable, &actions, &attributes, &argv, &envp)
        if keepStdinOpen { close(pipeFDs[0]) }
        guard rc == 0 else {
            if keepStdinOpen { close(pipeFDs[1]) }
            throw HarnessError("cannot start \(executable): \(String(cString: strerror(rc)))")
        }
        self.pid = pid
        stdinWriter = keepStdinOpen ? pipeFDs[1] : nil
        Thread.detachNewThread { [self] in reap() }
    }

    private func reap() {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR {
                lock.withLock { exit = (-1, Date()) }
                return
            }
        }
        let time = Date()
        let signal = status & 0x7f
        let code = signal == 0 ? (status >> 8) & 0xff : 128 + signal
        lock.withLock { exit = (code, time) }
    }

    /// The exit status (128+N for signal N) once exited and reaped; nil while running.
    func poll() -> Int32? { lock.withLock { exit?.status } }

    /// Seconds from spawn to exit, once exited.
    var runTime: Double? { lock.withLock { exit.map { $0.time.timeIntervalSince(started) } } }

    var isRunning: Bool { poll() == nil }

    func wait(timeout: Double) async -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let status = poll() { return status }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return poll()
    }

    func waitSync(timeout: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let status = poll() { return status }
            usleep(5_000)
        }
        return poll()
    }

    /// SIGTERM, then SIGKILL after `grace` seconds; always reaps. Idempotent.
    func stop(grace: Double = 3) {
        lock.withLock {
            if let writer = stdinWriter { close(writer) }
            stdinWriter = nil
        }
        guard poll() == nil else { return }
        kill(pid, SIGTERM)
        if waitSync(timeout: grace) == nil {
            kill(pid, SIGKILL)
            _ = waitSync(timeout: 5)
        }
    }
}

/// Runs blocking work on its own thread (not the test runner's cooperative pool) and returns
/// its result with the seconds it took, measured on that thread.
func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> (value: T, seconds: Double) {
    await withCheckedContinuation { continuation in
        Thread.detachNewThread {
            let start = Date()
            let value = body()
            continuation.resume(returning: (value, Date().timeIntervalSince(start)))
        }
    }
}

enum Processes {
    /// Runs a command to completion, waiting asynchronously; killed (SIGKILL, by its PID) and
    /// reported as a failure after `timeout` seconds.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
                    timeout: Double = 60, in ws: Workspace) async throws -> ProcessResult {
        let id = ws.nextID()
        let outPath = ws.path("proc-\(id).out"), errPath = ws.path("proc-\(id).err")
        let start = Date()
        let child = try ChildProcess(executable, arguments, environment: environment, stdoutPath: outPath, stderrPath: errPath)
        guard let status = await child.wait(timeout: timeout) else {
            kill(child.pid, SIGKILL)
            _ = child.waitSync(timeout: 5)
            throw HarnessError("`\(child.command)` did not finish within \(timeout) s; killed; stderr: \(readText(errPath).suffix(2000))")
        }
        return ProcessResult(status: status, stdout: readText(outPath), stderr: readText(errPath),
                             elapsed: child.runTime ?? Date().timeIntervalSince(start), command: child.command)
    }

    /// Blocking variant for cleanup paths (a `defer` cannot await).
    @discardableResult
    static func runSync(_ executable: String, _ arguments: [String], timeout: Double = 30, in ws: Workspace) -> ProcessResult? {
        let id = ws.nextID()
        let outPath = ws.path("proc-\(id).out"), errPath = ws.path("proc-\(id).err")
        let start = Date()
        guard let child = try? ChildProcess(executable, arguments, stdoutPath: outPath, stderrPath: errPath) else { return nil }
        var status = child.waitSync(timeout: timeout)
        if status == nil {
            kill(child.pid, SIGKILL)
            status = child.waitSync(timeout: 5)
        }
        return ProcessResult(status: status ?? -1, stdout: readText(outPath), stderr: readText(errPath),
                             elapsed: child.runTime ?? Date().timeIntervalSince(start), command: child.command)
    }

    static func readText(_ path: String) -> String {
        (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
    }

    /// The command line of a process, or nil when it is gone.
    static func commandLine(of pid: pid_t) -> [String]? {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !data.isEmpty else { return nil }
        return data.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            .filter { !$0.isEmpty }
    }

    /// True while the process exists and is not a zombie.
    static func isAlive(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return false }
        // Field 3, after the parenthesised command name.
        guard let close = stat.lastIndex(of: ")") else { return false }
        let rest = stat[stat.index(after: close)...].split(separator: " ")
        guard let state = rest.first else { return false }
        return state != "Z" && state != "X"
    }

    /// PIDs of `ocicachefs` daemons serving `mountpoint` (they carry it on their command line).
    static func daemonPIDs(mountpoint: String) -> [pid_t] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        return entries.compactMap { pid_t($0) }.filter { pid in
            guard pid != getpid(), let args = commandLine(of: pid), let first = args.first else { return false }
            return first.hasSuffix("ocicachefs") && args.contains("mount") && args.contains(mountpoint) && isAlive(pid)
        }
    }
}

// MARK: - Workspace

/// One test's private world: a temp directory, and the cleanups that must run at its end.
final class Workspace: @unchecked Sendable {
    // SAFETY (@unchecked Sendable): mutable state (`cleanups`, `counter`) is guarded by `lock`.
    let dir: String
    let name: String
    private let lock = NSLock()
    private var cleanups: [(String, () -> Void)] = []
    private var counter = 0

    init(_ name: String) throws {
        self.name = name
        var template = Array("/tmp/ocicachefs-integ-\(name)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw HarnessError("mkdtemp failed: \(String(cString: strerror(errno)))") }
        dir = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func path(_ relative: String) -> String { dir + "/" + relative }

    func makeDirectory(_ relative: String) throws -> String {
        let full = path(relative)
        try FileManager.default.createDirectory(atPath: full, withIntermediateDirectories: true)
        return full
    }

    func nextID() -> Int { lock.withLock { counter += 1; return counter } }

    /// Cleanups run in reverse order of registration.
    func onCleanup(_ label: String, _ action: @escaping () -> Void) {
        lock.withLock { cleanups.append((label, action)) }
    }

    func cleanup() {
        let actions = lock.withLock { () -> [(String, () -> Void)] in
            let all = cleanups
            cleanups = []
            return all
        }
        for (_, action) in actions.reversed() { action() }
        // Never recurse into a FUSE mount that is somehow still there.
        if Mounts.anyUnder(dir) {
            Issue.record("cleanup: a mount is still present under \(dir); workspace left in place")
            return
        }
        if ProcessInfo.processInfo.environment["OCICACHEFS_INTEG_KEEP"] == "1" { return }
        // Cached blobs are 0444 and the cache directory 0700: root removes them anyway.
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// A DOCKER_CONFIG directory whose config.json has `auths` for `host` (or none at all).
    func dockerConfig(host: String? = nil, user: String = "", password: String = "") throws -> String {
        let directory = try makeDirectory("docker-config-\(nextID())")
        var auths: [String: Any] = [:]
        if let host {
            auths[host] = ["auth": Data("\(user):\(password)".utf8).base64EncodedString()]
        }
        let data = try JSONSerialization.data(withJSONObject: ["auths": auths], options: [.sortedKeys])
        try data.write(to: URL(fileURLWithPath: directory + "/config.json"))
        return directory
    }
}

/// Runs `body` in a fresh workspace and always cleans it up (unmounts, stops servers by PID).
func withWorkspace<T>(_ name: String, _ body: (Workspace) async throws -> T) async throws -> T {
    try Harness.requireScripts()
    _ = try Harness.python()
    let ws = try Workspace(name)
    defer { ws.cleanup() }
    return try await body(ws)
}

// MARK: - Servers

/// A long-running server we started; stopped by its PID.
final class BackgroundServer: Sendable {
    let child: ChildProcess
    let stdoutPath: String
    let stderrPath: String

    var pid: pid_t { child.pid }
    var isRunning: Bool { child.isRunning }

    init(_ executable: String, _ arguments: [String], in ws: Workspace, label: String, keepStdinOpen: Bool = false,
         environment: [String: String] = [:]) throws {
        stdoutPath = ws.path("\(label).out")
        stderrPath = ws.path("\(label).err")
        child = try ChildProcess(executable, arguments, environment: environment, stdoutPath: stdoutPath, stderrPath: stderrPath,
                                 keepStdinOpen: keepStdinOpen)
        ws.onCleanup("stop \(label)") { [child] in child.stop() }
    }

    /// Waits for a stdout line starting with `prefix` and returns the integer after it.
    func awaitNumber(after prefix: String, timeout: Double = 15) async throws -> Int {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let text = Processes.readText(stdoutPath)
            for line in text.split(separator: "\n") where line.hasPrefix(prefix + " ") {
                if let value = Int(line.dropFirst(prefix.count + 1).trimmingCharacters(in: .whitespaces)) { return value }
            }
            if let status = child.poll() {
                throw HarnessError("`\(child.command)` exited (\(status)) before printing `\(prefix) N`; stderr: \(Processes.readText(stderrPath).suffix(2000))")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw HarnessError("no `\(prefix) N` line within \(timeout) s from `\(child.command)`")
    }

    func stop() { child.stop() }
}

enum RegistryAuth: Sendable, CustomStringConvertible {
    case none
    case basic(user: String, password: String)
    case token(TokenIssuer.Endpoint)

    var description: String {
        switch self {
        case .none: return "none"
        case .basic: return "basic"
        case .token: return "token"
        }
    }
}

/// `scripts/testenv/token_issuer.py`.
final class TokenIssuer: Sendable {
    struct Endpoint: Sendable {
        var port: Int
        var service: String
        var issuer: String
        var certificate: String
        var realm: String { "http://127.0.0.1:\(port)/token" }
    }

    let server: BackgroundServer
    let endpoint: Endpoint
    let user: String
    let password: String

    init(server: BackgroundServer, endpoint: Endpoint, user: String, password: String) {
        self.server = server
        self.endpoint = endpoint
        self.user = user
        self.password = password
    }

    /// `POST /users`: the user's password from now on.
    func changePassword(of user: String, to password: String) throws {
        let body = String(decoding: try JSONSerialization.data(withJSONObject: [user: password]), as: UTF8.self)
        guard let answer = RawHTTP.post(port: endpoint.port, path: "/users", json: body), answer.status == 200 else {
            throw HarnessError("the token issuer did not take the new password of \(user)")
        }
    }

    /// `GET /stats` of the issuer.
    func stats() -> [String: Int] {
        guard let answer = RawHTTP.get(port: endpoint.port, path: "/stats"), answer.status == 200,
              let object = try? JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any] else { return [:] }
        return object.compactMapValues { $0 as? Int }
    }
}

/// `scripts/testenv/registry.py`: docker-registry with its access log in `dir/registry.log`.
final class Registry: Sendable {
    let dir: String
    let port: Int
    let server: BackgroundServer
    var host: String { "127.0.0.1:\(port)" }
    var logPath: String { dir + "/registry.log" }

    init(dir: String, port: Int, server: BackgroundServer) {
        self.dir = dir
        self.port = port
        self.server = server
    }

    /// `type=registry,ref=127.0.0.1:PORT/REPO:TAG`
    func source(_ repoAndTag: String) -> String { "type=registry,ref=\(host)/\(repoAndTag)" }

    /// Completed (200/206) `GET /v2/REPO/blobs/DIGEST` transfers in the access log.
    func blobGets(repo: String, digest: String) -> Int {
        let needle = "\"GET /v2/\(repo)/blobs/\(digest) HTTP/"
        return Processes.readText(logPath).split(separator: "\n").filter { line in
            guard let range = line.range(of: needle) else { return false }
            // `... HTTP/1.1" 200 803 "" ""`: the status follows the closing quote.
            let rest = line[range.upperBound...]
            guard let quote = rest.firstIndex(of: "\"") else { return false }
            let status = rest[rest.index(after: quote)...].split(separator: " ").first ?? ""
            return status == "200" || status == "206"
        }.count
    }

    /// Body bytes the registry sent for a blob, over all its 200 and 206 answers.
    func blobBytesServed(repo: String, digest: String) -> Int64 {
        let needle = "\"GET /v2/\(repo)/blobs/\(digest) HTTP/"
        return Processes.readText(logPath).split(separator: "\n").reduce(Int64(0)) { total, line in
            guard let range = line.range(of: needle) else { return total }
            // `... HTTP/1.1" 206 1048576 "" ""`: status and size follow the closing quote.
            let rest = line[range.upperBound...]
            guard let quote = rest.firstIndex(of: "\"") else { return total }
            let fields = rest[rest.index(after: quote)...].split(separator: " ")
            guard fields.count >= 2, fields[0] == "200" || fields[0] == "206", let bytes = Int64(fields[1]) else { return total }
            return total + bytes
        }
    }

    func blobGets(repo: String, digests: [String]) -> [String: Int] {
        Dictionary(uniqueKeysWithValues: digests.map { ($0, blobGets(repo: repo, digest: $0)) })
    }

    /// Stops the registry now (its PID is the one we started: registry.py execs it).
    func stop() { server.stop() }
}

extension Workspace {
    /// - Parameter ttl: the tokens' lifetime in seconds (the issuer's default when nil).
    func startTokenIssuer(user: String = "alice", password: String = "pw", ttl: Int? = nil) async throws -> TokenIssuer {
        let directory = try makeDirectory("token")
        var arguments = ["-u", Harness.testenv + "/token_issuer.py", "--dir", directory, "--port", "0",
                         "--users", "\(user):\(password)", "--issuer", "integ-issuer", "--service", "integ-registry"]
        if let ttl { arguments += ["--ttl", String(ttl)] }
        let server = try BackgroundServer(try Harness.python(), arguments, in: self, label: "token")
        let port = try await server.awaitNumber(after: "ready")
        return TokenIssuer(server: server,
                           endpoint: .init(port: port, service: "integ-registry", issuer: "integ-issuer",
                                           certificate: directory + "/token.crt"),
                           user: user, password: password)
    }

    /// Starts docker-registry on a free port and waits until `/v2/` answers.
    func startRegistry(auth: RegistryAuth = .none, label: String = "registry") async throws -> Registry {
        _ = try Harness.tool("docker-registry", neededFor: "the test OCI registry (package docker-registry)")
        var lastError: (any Error)?
        // registry.py picks a free port and releases it before the registry binds it; another
        // test may grab it in between, so try again on a failed start.
        for attempt in 1...3 {
            let directory = try makeDirectory("\(label)-\(attempt)")
            var arguments = ["-u", Harness.testenv + "/registry.py", "--dir", directory, "--port", "0"]
            switch auth {
            case .none:
                arguments += ["--auth", "none"]
            case .basic(let user, let password):
                _ = try Harness.tool("htpasswd", neededFor: "Basic auth (package apache2-utils)")
                arguments += ["--auth", "basic", "--htpasswd-user", "\(user):\(password)"]
            case .token(let endpoint):
                arguments += ["--auth", "token", "--token-realm", endpoint.realm, "--token-service", endpoint.service,
                              "--token-issuer", endpoint.issuer, "--token-cert", endpoint.certificate]
            }
            let server = try BackgroundServer(try Harness.python(), arguments, in: self, label: "\(label)-\(attempt)")
            do {
                let port = try await server.awaitNumber(after: "port")
                let deadline = Date().addingTimeInterval(15)
                while Date() < deadline {
                    if let answer = RawHTTP.get(port: port, path: "/v2/"), answer.status == 200 || answer.status == 401 {
                        return Registry(dir: directory, port: port, server: server)
                    }
                    guard server.isRunning else { break }
                    try await Task.sleep(for: .milliseconds(20))
                }
                throw HarnessError("registry on port \(port) did not answer /v2/ (running: \(server.isRunning)); log: \(Processes.readText(directory + "/registry.log").suffix(1500))")
            } catch {
                lastError = error
                server.stop()
            }
        }
        throw lastError ?? HarnessError("registry did not start")
    }
}

/// `scripts/testenv/fault_proxy.py` in front of a registry: blob GETs misbehave on demand.
final class FaultProxy: Sendable {
    let port: Int
    let server: BackgroundServer
    var host: String { "127.0.0.1:\(port)" }

    init(port: Int, server: BackgroundServer) {
        self.port = port
        self.server = server
    }

    /// `type=registry,ref=127.0.0.1:PROXYPORT/REPO:TAG`
    func source(_ repoAndTag: String) -> String { "type=registry,ref=\(host)/\(repoAndTag)" }

    /// The fault every blob GET gets from now on: `{"mode": …}` with its parameters.
    func set(_ fault: String) throws {
        guard let answer = RawHTTP.post(port: port, path: "/_fault", json: fault), answer.status == 200 else {
            throw HarnessError("the fault proxy refused \(fault)")
        }
    }

    /// Blob GETs the proxy received, whatever it answered.
    func blobRequests() throws -> Int {
        guard let answer = RawHTTP.get(port: port, path: "/_fault/stats"),
              let stats = try JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any],
              let count = stats["blob_requests"] as? Int else { throw HarnessError("no stats from the fault proxy") }
        return count
    }
}

extension Workspace {
    func startFaultProxy(inFrontOf registry: Registry) async throws -> FaultProxy {
        let server = try BackgroundServer(try Harness.python(),
                                          ["-u", Harness.testenv + "/fault_proxy.py", "--upstream", "http://\(registry.host)", "--port", "0"],
                                          in: self, label: "fault-proxy-\(nextID())", keepStdinOpen: true)
        return FaultProxy(port: try await server.awaitNumber(after: "port"), server: server)
    }
}

// MARK: - Seeding

struct SeedSummary: Decodable {
    struct Blob: Decodable {
        var mediaType: String
        var digest: String
        var size: Int64
        var role: String?

        var hex: String { String(digest.dropFirst("sha256:".count)) }
    }

    var manifest: Blob
    var blobs: [Blob]
    var ref: String
    var variant: String

    var layers: [Blob] { blobs.filter { $0.role == "layer" } }
    var nonLayers: [Blob] { blobs.filter { $0.role != "layer" } }
}

extension Workspace {
    /// `seed_cache.py`: pushes a cache or image and returns its JSON summary.
    func seed(_ registry: Registry, repo: String = "cache", tag: String = "main", variant: String,
              dockerMediaTypes: Bool = false, layers: Int = 2, layerSize: Int = 1_500_000, seed: Int = 1,
              user: String? = nil, password: String? = nil) async throws -> SeedSummary {
        let out = path("seed-\(nextID()).json")
        var arguments = ["-u", Harness.testenv + "/seed_cache.py", "--registry", registry.host, "--repo", repo, "--tag", tag,
                         "--variant", variant, "--layers", String(layers), "--layer-size", String(layerSize),
                         "--seed", String(seed), "--out", out]
        if dockerMediaTypes { arguments.append("--docker-media-types") }
        if let user { arguments += ["--user", user] }
        if let password { arguments += ["--password", password] }
        let result = try await Processes.run(try Harness.python(), arguments, timeout: 60, in: self)
        guard result.status == 0 else { throw HarnessError("seeding failed: \(result)") }
        guard let data = FileManager.default.contents(atPath: out) else { throw HarnessError("seed summary \(out) missing") }
        return try JSONDecoder().decode(SeedSummary.self, from: data)
    }

    /// `seed_cache.py --corrupt-blob`: overwrites a stored blob with different bytes.
    func corruptBlob(_ registry: Registry, digest: String) async throws {
        let result = try await Processes.run(try Harness.python(),
                                             ["-u", Harness.testenv + "/seed_cache.py", "--corrupt-blob", digest, "--registry-dir", registry.dir],
                                             timeout: 30, in: self)
        guard result.status == 0, result.stdout.hasPrefix("corrupted ") else { throw HarnessError("corrupting \(digest) failed: \(result)") }
    }
}

// MARK: - Mounts

enum Mounts {
    /// Mountpoints in /proc/mounts (octal escapes decoded).
    static func all() -> [String] {
        Processes.readText("/proc/mounts").split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 1 else { return nil }
            return decode(String(fields[1]))
        }
    }

    static func isMounted(_ path: String) -> Bool { all().contains(path) }

    static func anyUnder(_ directory: String) -> Bool { all().contains { $0 == directory || $0.hasPrefix(directory + "/") } }

    private static func decode(_ field: String) -> String {
        var bytes: [UInt8] = []
        var utf8 = Array(field.utf8)[...]
        while let byte = utf8.popFirst() {
            if byte == UInt8(ascii: "\\"), utf8.count >= 3, let value = UInt8(String(decoding: utf8.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                utf8 = utf8.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// One `ocicachefs mount` invocation and its mountpoint.
final class MountHandle: Sendable {
    let mountpoint: String
    let cacheDir: String
    let logFile: String
    let result: ProcessResult

    init(mountpoint: String, cacheDir: String, logFile: String, result: ProcessResult) {
        self.mountpoint = mountpoint
        self.cacheDir = cacheDir
        self.logFile = logFile
        self.result = result
    }

    var isMounted: Bool { Mounts.isMounted(mountpoint) }
    func path(_ relative: String) -> String { mountpoint + "/" + relative }
    func blobPath(_ digest: String) -> String { mountpoint + "/blobs/sha256/" + digest.replacingOccurrences(of: "sha256:", with: "") }
    var log: String { Processes.readText(logFile) }
    var daemonPIDs: [pid_t] { Processes.daemonPIDs(mountpoint: mountpoint) }

    /// `ocicachefs unmount MOUNTPOINT`.
    func unmount(in ws: Workspace, timeout: Double = 20) async throws -> ProcessResult {
        try await Processes.run(try Harness.binary(), ["unmount", "--timeout", "15", mountpoint], timeout: timeout, in: ws)
    }
}

extension Workspace {
    /// Runs `ocicachefs mount` (backgrounding, as users do) into a fresh mountpoint, and
    /// registers an unmount for the end of the test whatever happens.
    /// `dockerConfig` defaults to an empty config so that the machine's ~/.docker never leaks in;
    /// `environment` is added to the daemon's (e.g. a PATH with a credential helper on it);
    /// `writable` adds `--writable`, and `options` are added as they are.
    func mount(_ source: String, cacheDir: String? = nil, dockerConfig: String? = nil, environment: [String: String] = [:],
               timeout: Double = 10, writable: Bool = false, options: [String] = [], label: String = "mnt") async throws -> MountHandle {
        try Harness.requireFuse()
        let binary = try Harness.binary()
        let mountpoint = try makeDirectory("\(label)-\(nextID())")
        let cache = try cacheDir ?? makeDirectory("cache-\(nextID())")
        let logFile = path("\(label)-\(nextID()).log")
        let config = try dockerConfig ?? self.dockerConfig()
        onCleanup("unmount \(mountpoint)") { [self] in forceUnmount(mountpoint) }
        let result = try await Processes.run(binary, ["mount", "--cache-dir", cache, "--timeout", String(timeout),
                                                      "--log-level", "debug", "--log-file", logFile]
                                                 + (writable ? ["--writable"] : []) + options + [source, mountpoint],
                                             environment: environment.merging(["DOCKER_CONFIG": config]) { _, config in config },
                                             timeout: timeout * 4 + 40, in: self)
        return MountHandle(mountpoint: mountpoint, cacheDir: cache, logFile: logFile, result: result)
    }

    /// `mount` that must succeed (exit 0, mounted); throws with the daemon log otherwise.
    func mountExpectingSuccess(_ source: String, cacheDir: String? = nil, dockerConfig: String? = nil,
                               environment: [String: String] = [:], timeout: Double = 10,
                               writable: Bool = false, options: [String] = []) async throws -> MountHandle {
        let handle = try await mount(source, cacheDir: cacheDir, dockerConfig: dockerConfig, environment: environment,
                                     timeout: timeout, writable: writable, options: options)
        guard handle.result.status == 0, handle.isMounted else {
            throw HarnessError("mount failed: \(handle.result); mounted: \(handle.isMounted); daemon log: \(handle.log.suffix(3000))")
        }
        return handle
    }

    /// Unmounts whatever way works and makes sure the daemon is gone (cleanup path).
    func forceUnmount(_ mountpoint: String) {
        let daemons = Processes.daemonPIDs(mountpoint: mountpoint)
        if Mounts.isMounted(mountpoint), let binary = try? Harness.binary() {
            Processes.runSync(binary, ["unmount", "--timeout", "10", mountpoint], timeout: 15, in: self)
        }
        if Mounts.isMounted(mountpoint) { Processes.runSync("/bin/umount", ["-l", mountpoint], in: self) }
        if Mounts.isMounted(mountpoint), let fusermount = try? Harness.tool("fusermount3", neededFor: "cleanup") {
            Processes.runSync(fusermount, ["-uz", mountpoint], in: self)
        }
        // The daemons were started by this test (through `ocicachefs mount`): end them by PID.
        let deadline = Date().addingTimeInterval(5)
        for pid in daemons {
            while Processes.isAlive(pid) && Date() < deadline { usleep(20_000) }
            if Processes.isAlive(pid) { kill(pid, SIGKILL) }
        }
    }
}

// MARK: - File access through the mount

/// A failed system call: which, on what, and errno.
struct SysError: Error, CustomStringConvertible, Equatable {
    var call: String
    var path: String
    var code: Int32
    var description: String { "\(call)(\(path)): \(String(cString: strerror(code))) (errno \(code))" }
}

enum FileIO {
    static let chunk = 1 << 20

    /// Reads a whole file with 1 MiB `read`s; throws on the first failing call.
    static func readAll(_ path: String, dropPageCache: Bool = false) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SysError(call: "open", path: path, code: errno) }
        defer { close(fd) }
        // Forget the kernel's cached pages so that the read reaches the filesystem again.
        if dropPageCache { _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, chunk) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SysError(call: "read", path: path, code: errno)
            }
            if n == 0 { return bytes }
            bytes.append(contentsOf: buffer[0..<n])
        }
    }

    /// sha256 and length of a file read through the filesystem.
    static func digest(_ path: String, dropPageCache: Bool = false) throws -> (digest: String, size: Int64) {
        let bytes = try readAll(path, dropPageCache: dropPageCache)
        return (Digest.sha256(of: bytes).description, Int64(bytes.count))
    }

    static func statFile(_ path: String) throws -> stat {
        var info = stat()
        guard lstat(path, &info) == 0 else { throw SysError(call: "lstat", path: path, code: errno) }
        return info
    }

    /// errno of a failing call, or 0 when it succeeded.
    static func errnoOf(_ body: () -> Int32) -> Int32 {
        errno = 0
        let rc = body()
        return rc < 0 ? errno : 0
    }

    /// The errno of opening `path` with `flags` and writing a byte, 0 when both succeed. A
    /// read-only mount lets the kernel open files without asking (zero-message opens), so an
    /// open for writing may succeed and its first write be what fails.
    static func errnoOfOpenAndWrite(_ path: String, _ flags: Int32) -> Int32 {
        let fd = open(path, flags | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return errno }
        let written = write(fd, "x", 1)
        let code = errno
        close(fd)
        return written == 1 ? 0 : code
    }

    /// Reads until EOF or the first error; returns the bytes read and that error's errno.
    static func readUntilFailure(_ path: String) -> (bytes: Int, errno: Int32?, reads: Int) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return (0, errno, 0) }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: chunk)
        var total = 0, reads = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, chunk) }
            reads += 1
            if n < 0 {
                if errno == EINTR { continue }
                return (total, errno, reads)
            }
            if n == 0 { return (total, nil, reads) }
            total += n
        }
    }

    static func listDirectory(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }

    /// The blobs in a content cache, once those expected are there or `timeout` passed: a
    /// verified blob is served at once and made durable (fsync, rename) just after.
    static func cachedBlobs(_ cacheDir: String, expecting hexes: [String], timeout: Double = 10) -> Set<String> {
        let deadline = Date().addingTimeInterval(timeout)
        var cached = Set(listDirectory(cacheDir + "/blobs/sha256"))
        while !cached.isSuperset(of: hexes) && Date() < deadline {
            usleep(20_000)
            cached = Set(listDirectory(cacheDir + "/blobs/sha256"))
        }
        return cached
    }

    static func json(_ path: String) throws -> [String: Any] {
        let bytes = try readAll(path)
        guard let object = try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any] else {
            throw HarnessError("\(path) is not a JSON object")
        }
        return object
    }
}

// MARK: - Raw HTTP (independent of the product's HTTP client)

enum RawHTTP {
    struct Answer {
        var status: Int
        var head: String
        var body: [UInt8]
    }

    /// One HTTP/1.0 exchange on 127.0.0.1 with a 2 s receive timeout; nil when nothing answers.
    static func get(port: Int, path: String, headers: [String: String] = [:]) -> Answer? {
        exchange(port: port, method: "GET", path: path, headers: headers)
    }

    static func post(port: Int, path: String, json: String) -> Answer? {
        exchange(port: port, method: "POST", path: path, body: Array(json.utf8), contentType: "application/json")
    }

    private static func exchange(port: Int, method: String, path: String, body: [UInt8] = [], contentType: String? = nil,
                                 headers: [String: String] = [:]) -> Answer? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return nil }
        var head = "\(method) \(path) HTTP/1.0\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n"
        if let contentType { head += "Content-Type: \(contentType)\r\n" }
        for (name, value) in headers.sorted(by: { $0.key < $1.key }) { head += "\(name): \(value)\r\n" }
        if !body.isEmpty || method == "POST" { head += "Content-Length: \(body.count)\r\n" }
        let request = Array((head + "\r\n").utf8) + body
        let sent = request.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == request.count else { return nil }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, 65536, 0) }
            if n <= 0 { break }
            response.append(contentsOf: buffer[0..<n])
        }
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        guard let split = response.indices.first(where: { response[$0...].starts(with: separator) }) else { return nil }
        let responseHead = String(decoding: response[..<split], as: UTF8.self)
        let statusField = responseHead.split(separator: " ").dropFirst().first ?? ""
        guard let status = Int(statusField) else { return nil }
        return Answer(status: status, head: responseHead, body: Array(response[(split + 4)...]))
    }
}

// MARK: - Assertions shared by the tests

enum Check {
    /// index.json names `tag` with exactly the manifest's digest, size and media type.
    static func indexJSON(_ mount: MountHandle, tag: String, manifest: SeedSummary.Blob,
                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        let index = try FileIO.json(mount.path("index.json"))
        #expect(index["schemaVersion"] as? Int == 2, sourceLocation: sourceLocation)
        let entries = index["manifests"] as? [[String: Any]] ?? []
        let tagged = entries.filter { ($0["annotations"] as? [String: String])?["org.opencontainers.image.ref.name"] == tag }
        #expect(tagged.count == 1, "index.json should list tag \(tag) once: \(entries)", sourceLocation: sourceLocation)
        guard let entry = tagged.first else { return }
        #expect(entry["digest"] as? String == manifest.digest, sourceLocation: sourceLocation)
        #expect((entry["size"] as? NSNumber)?.int64Value == manifest.size, sourceLocation: sourceLocation)
        #expect(entry["mediaType"] as? String == manifest.mediaType, sourceLocation: sourceLocation)
    }

    /// Every blob of the summary is listed under blobs/sha256 with its exact size (stat only).
    static func blobsListedWithSizes(_ mount: MountHandle, _ seed: SeedSummary,
                                     sourceLocation: SourceLocation = #_sourceLocation) throws {
        let listed = Set(FileIO.listDirectory(mount.path("blobs/sha256")))
        for blob in seed.blobs {
            #expect(listed.contains(blob.hex), "blobs/sha256 lacks \(blob.role ?? "?") \(blob.digest); listed: \(listed.sorted())",
                    sourceLocation: sourceLocation)
            let info = try FileIO.statFile(mount.blobPath(blob.digest))
            #expect(Int64(info.st_size) == blob.size, "stat size of \(blob.digest)", sourceLocation: sourceLocation)
            #expect(info.st_mode & S_IFMT == S_IFREG, sourceLocation: sourceLocation)
        }
    }

    /// Every blob read through the mount hashes to its file name and has the listed size.
    static func blobsVerify(_ mount: MountHandle, _ blobs: [SeedSummary.Blob], dropPageCache: Bool = false,
                            sourceLocation: SourceLocation = #_sourceLocation) {
        for blob in blobs {
            do {
                let (digest, size) = try FileIO.digest(mount.blobPath(blob.digest), dropPageCache: dropPageCache)
                #expect(digest == blob.digest, "content of \(blob.digest) hashes to \(digest)", sourceLocation: sourceLocation)
                #expect(size == blob.size, "read \(size) bytes of \(blob.digest), expected \(blob.size)", sourceLocation: sourceLocation)
            } catch {
                Issue.record("reading \(blob.role ?? "") \(blob.digest) through the mount failed: \(error); daemon log: \(mount.log.suffix(2000))",
                             sourceLocation: sourceLocation)
            }
        }
    }

    /// A failed mount: exit 1, exactly one stderr line starting `ocicachefs:`, no mount left.
    static func mountFailedCleanly(_ handle: MountHandle, within seconds: Double,
                                   sourceLocation: SourceLocation = #_sourceLocation) {
        let result = handle.result
        #expect(result.status == 1, "\(result)", sourceLocation: sourceLocation)
        #expect(result.stderrLines.count == 1, "want exactly one stderr line: \(result)", sourceLocation: sourceLocation)
        #expect(result.stderrLines.first?.hasPrefix("ocicachefs: ") == true, "\(result)", sourceLocation: sourceLocation)
        #expect(result.stdout.isEmpty, "\(result)", sourceLocation: sourceLocation)
        #expect(result.elapsed <= seconds, "took \(result.elapsed) s, bound \(seconds) s: \(result)", sourceLocation: sourceLocation)
        #expect(!handle.isMounted, "a failed mount must leave nothing mounted", sourceLocation: sourceLocation)
    }
}
