internal import CSystem

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Runs a short-lived program to its end with a deadline: its input written up front, its
/// output and errors collected without pipe deadlocks. Built on posix_spawn rather than
/// Foundation's `Process`, which would link corelibs Foundation and its ICU data.
public enum ChildProcess {
    public struct Outcome: Sendable {
        public var stdout: [UInt8]
        public var stderr: [UInt8]
        /// The exit status, or 128 + N when signal N ended it.
        public var exitStatus: Int32
        /// `exit status 1`, `killed by signal 9`.
        public var terminationDescription: String
    }

    public enum Failure: Error, Equatable, Sendable, CustomStringConvertible {
        /// posix_spawn failed with this errno (no such file, not executable, …).
        case cannotStart(errno: Int32)
        /// The deadline passed; the program and its process group were killed.
        case timedOut
        /// It wrote more than `maxOutput` bytes to stdout or stderr.
        case tooMuchOutput
        /// The pipes could not be made (errno).
        case noPipes(errno: Int32)

        public var description: String {
            switch self {
            case .cannotStart(let code): return String(cString: strerror(code))
            case .timedOut: return "timed out"
            case .tooMuchOutput: return "too much output"
            case .noPipes(let code): return "cannot make pipes: \(String(cString: strerror(code)))"
            }
        }
    }

    /// - Parameters:
    ///   - environment: the program's whole environment; nil passes this process's on.
    ///   - input: written to its stdin before it starts, so at most a pipe's capacity (4 KiB
    ///     are guaranteed); stdin then reaches end of file.
    ///   - timeout: from now until the program must have exited, output closed.
    public static func run(_ executable: String, arguments: [String], environment: [String: String]? = nil,
                           input: [UInt8] = [], timeout: Duration, maxOutput: Int = 1 << 20) throws(Failure) -> Outcome {
        precondition(input.count <= 4096, "stdin input above a pipe's guaranteed capacity")
        let deadline = ContinuousClock.now.advanced(by: timeout)
        // [stdin read, stdin write, stdout read, stdout write, stderr read, stderr write]; every
        // end close-on-exec, so no other child spawned meanwhile keeps one open.
        var ends = [Int32](repeating: -1, count: 6)
        defer { for end in ends where end >= 0 { close(end) } }
        for pair in 0..<3 {
            var fds: [Int32] = [-1, -1]
            guard CSystem_pipeClosedOnExec(&fds) == 0 else { throw .noPipes(errno: errno) }
            ends[2 * pair] = fds[0]
            ends[2 * pair + 1] = fds[1]
        }
        // The read end is still open here, so this neither blocks nor raises SIGPIPE.
        if !input.isEmpty { _ = input.withUnsafeBytes { write(ends[1], $0.baseAddress, $0.count) } }
        closeEnd(&ends[1])

        var pid: pid_t = 0
        for attempt in 1...5 {
            let result = spawn(executable, arguments, environment, stdin: ends[0], stdout: ends[3], stderr: ends[5], pid: &pid)
            if result == 0 { break }
            // ETXTBSY: the executable was just written and another thread's fork still holds
            // it open for writing.
            guard result == ETXTBSY, attempt < 5 else { throw .cannotStart(errno: result) }
            SystemThread.sleep(for: .milliseconds(50))
        }
        closeEnd(&ends[0])
        closeEnd(&ends[3])
        closeEnd(&ends[5])

        var stdout: [UInt8] = []
        var stderr: [UInt8] = []
        let outputClosed = readUntilClosed(stdout: ends[2], stderr: ends[4], into: &stdout, &stderr,
                                           deadline: deadline, maxOutput: maxOutput)
        let status = outputClosed ? waitForExit(pid, until: deadline) : nil
        guard let status else {
            // It leads its own process group: a grandchild could otherwise keep running.
            kill(-pid, SIGKILL)
            kill(pid, SIGKILL)
            _ = waitForExit(pid, until: nil)
            throw .timedOut
        }
        guard stdout.count <= maxOutput, stderr.count <= maxOutput else { throw .tooMuchOutput }
        let signal = status & 0x7f
        if signal == 0 {
            let code = (status >> 8) & 0xff
            return Outcome(stdout: stdout, stderr: stderr, exitStatus: code, terminationDescription: "exit status \(code)")
        }
        return Outcome(stdout: stdout, stderr: stderr, exitStatus: 128 + signal, terminationDescription: "killed by signal \(signal)")
    }

    private static func closeEnd(_ end: inout Int32) {
        close(end)
        end = -1
    }

    /// posix_spawn in its own process group, with default signal handling and nothing
    /// blocked: ignored and blocked signals would otherwise pass on through exec.
    private static func spawn(_ executable: String, _ arguments: [String], _ environment: [String: String]?,
                              stdin: Int32, stdout: Int32, stderr: Int32, pid: inout pid_t) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdin, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var nothing = sigset_t()
        sigemptyset(&nothing)
        posix_spawnattr_setsigmask(&attributes, &nothing)
        var everything = sigset_t()
        sigfillset(&everything)
        posix_spawnattr_setsigdefault(&attributes, &everything)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))

        var argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        var envp: [UnsafeMutablePointer<CChar>?]? = environment.map { $0.map { strdup("\($0.key)=\($0.value)") } + [nil] }
        defer {
            argv.forEach { free($0) }
            envp?.forEach { free($0) }
        }
        if envp == nil { return posix_spawn(&pid, executable, &actions, &attributes, &argv, environ) }
        return posix_spawn(&pid, executable, &actions, &attributes, &argv, &envp!)
    }

    /// Reads both pipes until both reach end of file (true) or the deadline passes (false).
    /// Reading both at once means a child that fills one while we wait on the other cannot
    /// deadlock. Keeps at most one byte over `maxOutput` of each, enough to tell.
    private static func readUntilClosed(stdout: Int32, stderr: Int32, into out: inout [UInt8], _ err: inout [UInt8],
                                        deadline: ContinuousClock.Instant, maxOutput: Int) -> Bool {
        var open: [Int32] = [stdout, stderr]
        var buffer = [UInt8](repeating: 0, count: 16384)
        while !open.isEmpty {
            let remaining = ContinuousClock.now.duration(to: deadline)
            if remaining <= .zero { return false }
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&fds, nfds_t(fds.count), milliseconds(remaining, atMost: 1000))
            if ready < 0 {
                if errno == EINTR { continue }
                return true  // cannot poll; give up on the output
            }
            for descriptor in fds where descriptor.revents != 0 {
                let count = buffer.withUnsafeMutableBytes { read(descriptor.fd, $0.baseAddress, $0.count) }
                if count > 0 {
                    let kept = buffer[0..<min(count, maxOutput + 1)]
                    if descriptor.fd == stdout {
                        if out.count <= maxOutput { out.append(contentsOf: kept) }
                    } else if err.count <= maxOutput {
                        err.append(contentsOf: kept)
                    }
                } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                    open.removeAll { $0 == descriptor.fd }
                }
            }
        }
        return true
    }

    /// The raw wait status once `pid` has exited and is reaped; nil if the deadline passed.
    /// No deadline blocks until it exits.
    private static func waitForExit(_ pid: pid_t, until deadline: ContinuousClock.Instant?) -> Int32? {
        var status: Int32 = 0
        while true {
            let result = waitpid(pid, &status, deadline == nil ? 0 : WNOHANG)
            if result == pid { return status }
            // Its status is lost (ECHILD): report a failure, never a success.
            if result < 0 && errno != EINTR { return 255 << 8 }
            if let deadline, ContinuousClock.now >= deadline { return nil }
            if result == 0 { SystemThread.sleep(for: .milliseconds(2)) }
        }
    }

    private static func milliseconds(_ duration: Duration, atMost limit: Int32) -> Int32 {
        let (seconds, attoseconds) = duration.components
        let total = seconds * 1000 + attoseconds / 1_000_000_000_000_000 + 1
        return Int32(clamping: max(1, min(total, Int64(limit))))
    }
}
