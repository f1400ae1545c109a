import FoundationEssentials
import SystemSupport
import OCI
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Starting the mount in the background: the command re-executes itself in the foreground in a
/// new session, and returns only once the child says the mount is ready or why it is not.
enum Daemon {
    static let childReadyFD: Int32 = 3
    /// Where the daemon reads its source: secrets in it must not be on its command line.
    static let childSourceFD: Int32 = 4

    static func spawnAndAwaitReady(arguments: [String], source: String, logPath: String, readyTimeout: Double) -> Int32 {
        // Opened here rather than by posix_spawn, whose failure cannot say which file it was.
        let logFD = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard logFD >= 0 else {
            printError("cannot open the log file \(logPath): \(String(cString: strerror(errno)))")
            return 1
        }
        defer { close(logFD) }
        let logStart = lseek(logFD, 0, SEEK_END)

        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else {
            printError("cannot create a pipe: \(String(cString: strerror(errno)))")
            return 1
        }
        let (readEnd, writeEnd) = (pipeFDs[0], pipeFDs[1])
        // Only the copy at fd 3 may reach the child (dup2 onto itself would keep close-on-exec).
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)
        if writeEnd != childReadyFD { _ = fcntl(writeEnd, F_SETFD, FD_CLOEXEC) }
        defer { close(readEnd) }

        guard let sourceReader = sourcePipe(holding: source) else { return 1 }
        defer { close(sourceReader) }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, logFD, 1)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, childReadyFD)
        posix_spawn_file_actions_adddup2(&actions, sourceReader, childSourceFD)
        // The daemon outlives this command: it must not hold whatever its caller left open
        // (a CI runner's pipes would then never see their end).
        for fd in inheritedDescriptors() where fd > childSourceFD {
            posix_spawn_file_actions_addclose(&actions, fd)
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var emptySet = sigset_t()
        sigemptyset(&emptySet)
        posix_spawnattr_setsigmask(&attributes, &emptySet)
        posix_spawnattr_setflags(&attributes, Int16(LinuxConstants.spawnNewSession | POSIX_SPAWN_SETSIGMASK))

        let childArguments = ["ocicachefs"] + arguments
        var cArguments = childArguments.map { strdup($0) } + [nil]
        defer { cArguments.forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/proc/self/exe", &actions, &attributes, &cArguments, environ)
        close(writeEnd)
        guard spawned == 0 else {
            printError("cannot start the mount daemon: \(String(cString: strerror(spawned)))")
            return 1
        }

        let deadline = Date().addingTimeInterval(readyTimeout)
        var message = readLine(from: readEnd, until: deadline)
        while let warning = message, warning.hasPrefix("warning: ") {
            printError(warning)
            message = readLine(from: readEnd, until: deadline)
        }
        if message == "ready" {
            // A service manager that started this command (`Type=notify`) hears that the mount
            // is ready and that the daemon, not this command, is now the service's process.
            ServiceNotifier(environment: ProcessInfo.processInfo.environment).notify(["MAINPID=\(pid)", "READY=1"])
            return 0
        }
        if let message, message.hasPrefix("error: ") {
            printError(String(message.dropFirst("error: ".count)))
        } else if message == nil {
            printError("the mount daemon (pid \(pid)) did not become ready within \(Int(readyTimeout)) s; see \(logPath)")
            kill(pid, SIGTERM)
        } else {
            // The pipe closed without a word: the daemon died (it writes a line before any
            // orderly exit). Say how, with the log's own words for it.
            var status: Int32 = 0
            let exited = waitpid(pid, &status, 0) == pid
            var reason = "exited before the mount was ready"
            if exited && status & 0x7f != 0 {
                reason = "was killed by signal \(status & 0x7f) before the mount was ready"
            } else if exited {
                reason = "exited with status \((status >> 8) & 0xff) before the mount was ready"
            }
            let detail = lastErrorLine(of: logPath, from: logStart).map { ": " + $0 } ?? ""
            printError("the mount daemon (pid \(pid)) \(reason)\(detail); log: \(logPath)")
            return 1
        }
        var status: Int32 = 0
        waitpid(pid, &status, WNOHANG)
        return 1
    }

    /// The line of the log written since `offset` that best says why the daemon died: the Swift
    /// runtime's "Fatal error" line, else the backtracer's "crashed" line, else the last line.
    private static func lastErrorLine(of path: String, from offset: off_t) -> String? {
        guard offset >= 0 else { return nil }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        let count = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
        guard count > 0 else { return nil }
        let lines = String(decoding: bytes[..<count], as: UTF8.self).split(whereSeparator: \.isNewline)
            .map { $0.trimmingWhitespace() }.filter { !$0.isEmpty }
        let chosen = lines.first { $0.contains("Fatal error") } ?? lines.first { $0.contains("crashed") } ?? lines.last
        return chosen.map { String($0.prefix(300)) }
    }

    /// Descriptors open in this process now (it has no other threads starting processes).
    private static func inheritedDescriptors() -> [Int32] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return names.compactMap { Int32($0) }.filter { fcntl($0, F_GETFD) >= 0 }
    }

    /// A pipe already holding `source`, its read end at a descriptor above the ones the child's
    /// are copied onto (so no copy overwrites it first); nil after saying why not.
    private static func sourcePipe(holding source: String) -> Int32? {
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else {
            printError("cannot create a pipe: \(String(cString: strerror(errno)))")
            return nil
        }
        defer { close(pipeFDs[0]) }
        // Written before the child exists, so it must fit the pipe; a source is a few hundred bytes.
        let bytes = Array(source.utf8)
        _ = fcntl(pipeFDs[1], F_SETFL, O_NONBLOCK)
        let written = bytes.withUnsafeBytes { Glibc.write(pipeFDs[1], $0.baseAddress, $0.count) }
        close(pipeFDs[1])
        guard written == bytes.count else {
            printError("the source is too long (\(bytes.count) bytes)")
            return nil
        }
        let reader = fcntl(pipeFDs[0], F_DUPFD_CLOEXEC, childSourceFD + 1)
        guard reader >= 0 else {
            printError("cannot create a pipe: \(String(cString: strerror(errno)))")
            return nil
        }
        return reader
    }

    /// One line from `fd`, or nil past `deadline`; "" when the writer closed without a line.
    private static func readLine(from fd: Int32, until deadline: Date) -> String? {
        var bytes: [UInt8] = []
        while true {
            let remaining = deadline.timeIntervalSinceNow
            guard remaining > 0 else { return nil }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(min(remaining, 1) * 1000))
            if ready < 0 && errno != EINTR { return "" }
            guard ready > 0 else { continue }
            var byte: UInt8 = 0
            let n = Glibc.read(fd, &byte, 1)
            if n <= 0 { return String(decoding: bytes, as: UTF8.self) }
            if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(byte)
        }
    }
}

/// The child's half of the readiness pipe; says "ready" or why not, once.
final class ReadinessReporter: Sendable {
    private let fd: Int32?
    private let reported = Atomic<Bool>(false)

    init(fd: Int32?) { self.fd = fd }

    /// A line the caller prints on stderr before the mount is ready (a daemon's log is not
    /// where a person looks when a mount seems to work).
    func warn(_ line: String) {
        guard let fd, !reported.load(ordering: .acquiring) else { return }
        write(fd, "warning: " + line.replacing("\n", with: " "))
    }

    func ready() { finish("ready") }

    func fail(_ line: String) { finish("error: " + line.replacing("\n", with: " ")) }

    private func finish(_ line: String) {
        guard let fd, !reported.exchange(true, ordering: .acquiringAndReleasing) else { return }
        write(fd, line)
        close(fd)
    }

    private func write(_ fd: Int32, _ line: String) {
        let text = line + "\n"
        _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
    }
}

enum Signals {
    private static let termination: [Int32] = [SIGINT, SIGTERM, SIGHUP]

    /// A shell starts background jobs with SIGINT ignored; an ignored signal never reaches
    /// sigwait, so restore the defaults, then block them so that only our waiter sees them.
    static func blockTerminationSignals() {
        signal(SIGPIPE, SIG_IGN)
        var set = sigset_t()
        sigemptyset(&set)
        for signal in termination {
            Glibc.signal(signal, SIG_DFL)
            sigaddset(&set, signal)
        }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    static func onTermination(_ handler: @escaping @Sendable (Int32) -> Void) {
        SystemThread.start(named: "ocicachefs-signal") {
            var set = sigset_t()
            sigemptyset(&set)
            for signal in termination { sigaddset(&set, signal) }
            while true {
                var received: Int32 = 0
                if sigwait(&set, &received) == 0 { handler(received) }
            }
        }
    }
}

/// Where a running mount records its daemon's PID, so `unmount` can wait for it.
enum RuntimeFiles {
    static var directory: String {
        if getuid() == 0 { return "/run/ocicachefs" }
        if let runtime = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !runtime.isEmpty {
            return runtime + "/ocicachefs"
        }
        return "/tmp/ocicachefs-\(getuid())"
    }

    static func pidFile(forMountpoint mountpoint: String) -> String {
        directory + "/" + String(Digest.sha256(of: Array(mountpoint.utf8)).hex.prefix(32)) + ".pid"
    }

    /// What a writable mount's daemon reports while it finishes its uploads after the unmount,
    /// and at the end what it could not publish.
    static func statusFile(forPIDFile pidFile: String) -> String {
        String(pidFile.dropLast(".pid".count)) + ".status"
    }

    /// The unix socket where the daemon answers `ocicachefs stats`.
    static func controlSocket(forPIDFile pidFile: String) -> String {
        String(pidFile.dropLast(".pid".count)) + ".sock"
    }

    static func writeStatus(_ text: String, to path: String) {
        try? (text + "\n").write(toFile: path, atomically: true, encoding: .utf8)
    }

    static func write(pid: pid_t, to path: String) {
        // What an earlier daemon of this mount point reported is not this one's.
        unlink(statusFile(forPIDFile: path))
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                 attributes: [.posixPermissions: 0o700])
        try? "\(pid)\n".write(toFile: path, atomically: true, encoding: .utf8)
        removeStale(except: path)
    }

    /// Daemons killed outright leave their PID files; each new mount clears those whose process
    /// is no longer a mount daemon, so they do not pile up until a reboot. A socket or status
    /// file whose PID file is gone is cleared too, once it is a minute old: a daemon unmounted
    /// by other means than `ocicachefs unmount` leaves its last status, which `ocicachefs
    /// unmount` reads just after the daemon exits.
    private static func removeStale(except kept: String) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        for name in names where name.hasSuffix(".pid") {
            let path = directory + "/" + name
            guard path != kept, let pid = readPID(path), !isMountDaemon(pid) else { continue }
            unlink(controlSocket(forPIDFile: path))
            unlink(path)
        }
        let now = time(nil)
        for name in names where name.hasSuffix(".sock") || name.hasSuffix(".status") {
            let path = directory + "/" + name
            let pidFile = String(path[..<path.lastIndex(of: ".")!]) + ".pid"
            var info = stat()
            guard !FileManager.default.fileExists(atPath: pidFile), lstat(path, &info) == 0,
                  now - info.st_mtim.tv_sec > 60 else { continue }
            unlink(path)
        }
    }

    static func readPID(_ path: String) -> pid_t? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        return pid_t(text.trimmingWhitespace())
    }

    /// True when `pid` is a running ocicachefs mount daemon. A daemon killed outright leaves its
    /// PID file behind, and the number may since belong to an unrelated process.
    static func isMountDaemon(_ pid: pid_t) -> Bool {
        guard let bytes = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let arguments = bytes.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        return arguments.count > 2 && arguments[0].hasSuffix("ocicachefs") && arguments[1] == "mount"
            && arguments.contains("--foreground")
    }
}
