import FoundationEssentials
import Synchronization
import Testing
@testable import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

@Suite("Text and path helpers")
struct TextTests {
    @Test(arguments: [
        (" a b \r\n", "a b"), ("\t\tx", "x"), ("x", "x"), ("", ""), (" \n ", ""), ("a\u{00A0}", "a"),
    ])
    func trimmingWhitespace(input: String, expected: String) {
        #expect(input.trimmingWhitespace() == expected)
        #expect(input[...].trimmingWhitespace() == expected)
    }

    @Test func joinedPathPutsOneSlashBetween() {
        #expect(joinedPath("/home/u", ".docker") == "/home/u/.docker")
        #expect(joinedPath("/home/u/", ".docker") == "/home/u/.docker")
        #expect(joinedPath("/", "etc") == "/etc")
        #expect(joinedPath("", "config.json") == "config.json")
    }

    @Test(arguments: [("/a/b", "/a"), ("/a/b/", "/a"), ("/a", "/"), ("/", "/"), ("b", ""), ("a/b", "a")])
    func parentPath(of path: String, expected: String) {
        #expect(SystemSupport.parentPath(path) == expected)
    }

    /// Issue 13: text a remote chose must not reach a terminal as escape sequences.
    @Test(arguments: [
        ("plain text, ünïcode", "plain text, ünïcode"), ("\u{1B}]0;owned\u{07}", #"\x1b]0;owned\x07"#),
        ("a\nb\r\tc", #"a\x0ab\x0d\x09c"#), ("\u{7F}\u{9B}31m", #"\x7f\x9b31m"#), ("\u{0}", #"\x00"#), ("\\x1b", "\\x1b"),
    ])
    func escapingControlCharacters(input: String, expected: String) {
        #expect(input.escapingControlCharacters == expected)
        #expect(input[...].escapingControlCharacters == expected)
        #expect(expected.escapingControlCharacters == expected, "escaping twice changes nothing")
    }

    @Test(arguments: [(1.25, "1.3"), (0.04, "0.0"), (-1.5, "-1.5"), (1023.96, "1024.0"), (3, "3.0"), (-0.04, "0.0")])
    func oneDecimal(value: Double, expected: String) {
        #expect(value.withOneDecimal == expected)
    }
}

@Suite("Child processes")
struct ChildProcessTests {
    @Test func inputReachesStdinAndBothOutputsAndTheStatusComeBack() throws {
        let outcome = try ChildProcess.run("/bin/sh", arguments: ["-c", "cat; echo oops >&2; exit 3"],
                                           input: Array("hello\n".utf8), timeout: .seconds(10))
        #expect(outcome.stdout == Array("hello\n".utf8))
        #expect(outcome.stderr == Array("oops\n".utf8))
        #expect(outcome.exitStatus == 3)
        #expect(outcome.terminationDescription == "exit status 3")
    }

    @Test func theEnvironmentIsExactlyTheOneGiven() throws {
        let outcome = try ChildProcess.run("/bin/sh", arguments: ["-c", "echo \"$GREETING:$HOME\""],
                                           environment: ["GREETING": "hi"], timeout: .seconds(10))
        #expect(String(decoding: outcome.stdout, as: UTF8.self) == "hi:\n")
    }

    /// The test runner's threads may block or ignore termination signals; the child must not
    /// inherit that, or it could not be stopped.
    @Test func aSignalEndsTheChildWhateverThisProcessBlocks() throws {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        var previous = sigset_t()
        pthread_sigmask(SIG_BLOCK, &set, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        let outcome = try ChildProcess.run("/bin/sh", arguments: ["-c", "kill -TERM $$; sleep 5"], timeout: .seconds(10))
        #expect(outcome.exitStatus == 128 + SIGTERM)
        #expect(outcome.terminationDescription == "killed by signal \(SIGTERM)")
    }

    @Test func aMissingProgramCannotStart() {
        #expect(throws: ChildProcess.Failure.cannotStart(errno: ENOENT)) {
            try ChildProcess.run("/nonexistent/program", arguments: [], timeout: .seconds(5))
        }
    }

    @Test func outputBeyondTheLimitIsRefused() {
        #expect(throws: ChildProcess.Failure.tooMuchOutput) {
            try ChildProcess.run("/bin/sh", arguments: ["-c", "head -c 5000 /dev/zero"], timeout: .seconds(10), maxOutput: 1000)
        }
    }

    /// A grandchild holding the output pipe open must not keep us waiting past the deadline,
    /// and must be killed with the child's process group.
    @Test func theDeadlineKillsTheChildAndWhatItStarted() throws {
        let pidFile = "/tmp/ocicachefs-childprocess-\(getpid()).pid"
        defer { unlink(pidFile) }
        let start = ContinuousClock.now
        #expect(throws: ChildProcess.Failure.timedOut) {
            try ChildProcess.run("/bin/sh", arguments: ["-c", "sleep 30 & echo $! > \(pidFile); wait"], timeout: .milliseconds(300))
        }
        #expect(start.duration(to: .now) < .seconds(10))
        let grandchild = try #require(FileManager.default.contents(atPath: pidFile)
            .flatMap { pid_t(String(decoding: $0, as: UTF8.self).trimmingWhitespace()) })
        var gone = false
        for _ in 0..<200 where !gone {
            let state = FileManager.default.contents(atPath: "/proc/\(grandchild)/stat").map { String(decoding: $0, as: UTF8.self) }
            gone = state == nil || state!.contains(") Z ")
            if !gone { SystemThread.sleep(for: .milliseconds(10)) }
        }
        #expect(gone, "the grandchild \(grandchild) still runs")
    }
}

@Suite("Threads")
struct SystemThreadTests {
    @Test func aStartedThreadRunsUnderItsName() {
        let seen = Mutex<String?>(nil)
        let finished = Atomic<Bool>(false)
        SystemThread.start(named: "ocfs-test-name") {
            let comm = FileManager.default.contents(atPath: "/proc/thread-self/comm").map { String(decoding: $0, as: UTF8.self) }
            seen.withLock { $0 = comm }
            finished.store(true, ordering: .releasing)
        }
        for _ in 0..<500 where !finished.load(ordering: .acquiring) { SystemThread.sleep(for: .milliseconds(2)) }
        #expect(seen.withLock { $0 } == "ocfs-test-name\n")
    }

    @Test func mapKeepsTheItemsOrderAndRunsUpToItsWidthAtOnce() {
        let running = Atomic<Int>(0)
        let mostAtOnce = Atomic<Int>(0)
        let items = Array(0..<40)
        let results = SystemThread.map(items, width: 4, named: "ocfs-test-map") { item in
            let now = running.add(1, ordering: .relaxed).newValue
            _ = mostAtOnce.max(now, ordering: .relaxed)
            // Each item waits (boundedly) for four to run at once: only four threads can do that.
            for _ in 0..<2_500 where running.load(ordering: .relaxed) < 4 && mostAtOnce.load(ordering: .relaxed) < 4 {
                SystemThread.sleep(for: .milliseconds(2))
            }
            running.subtract(1, ordering: .relaxed)
            return item * item
        }
        #expect(results == items.map { $0 * $0 })
        #expect(mostAtOnce.load(ordering: .relaxed) == 4)
        #expect(SystemThread.map([7], width: 4, named: "ocfs-test-map") { $0 + 1 } == [8])
        #expect(SystemThread.map([Int](), width: 4, named: "ocfs-test-map") { $0 + 1 } == [])
    }

    @Test func sleepWaitsAtLeastItsDuration() {
        let start = ContinuousClock.now
        SystemThread.sleep(for: .milliseconds(30))
        #expect(start.duration(to: .now) >= .milliseconds(30))
    }
}
