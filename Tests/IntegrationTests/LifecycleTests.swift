import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Where the daemon's PID file may be (root: /run/ocicachefs).
enum PIDFiles {
    static var directories: [String] {
        var result = ["/run/ocicachefs"]
        if let runtime = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !runtime.isEmpty {
            result.append(runtime + "/ocicachefs")
        }
        result.append("/tmp/ocicachefs-\(getuid())")
        return result
    }

    /// PID files whose content is `pid`.
    static func files(for pid: pid_t) -> [String] {
        directories.flatMap { directory in
            FileIO.listDirectory(directory).filter { $0.hasSuffix(".pid") }.map { directory + "/" + $0 }
        }.filter { path in
            Processes.readText(path).trimmingCharacters(in: .whitespacesAndNewlines) == String(pid)
        }
    }
}

@Suite("Unmount and daemon lifecycle")
struct LifecycleTests {
    /// Polls until `condition` holds or `seconds` pass.
    static func eventually(_ seconds: Double, _ condition: () -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return condition()
    }

    /// The single daemon of a fresh mount, and its PID file.
    static func daemon(of mount: MountHandle) throws -> (pid: pid_t, pidFile: String) {
        let pids = mount.daemonPIDs
        guard pids.count == 1, let pid = pids.first else {
            throw HarnessError("expected one ocicachefs daemon for \(mount.mountpoint), found \(pids)")
        }
        let files = PIDFiles.files(for: pid)
        guard files.count == 1, let file = files.first else {
            throw HarnessError("expected one PID file holding \(pid) in \(PIDFiles.directories), found \(files)")
        }
        return (pid, file)
    }

    /// A process that is not a daemon, named in the PID file at `path` as if its number had been
    /// reused after a daemon was killed.
    static func unrelatedProcess(namedIn path: String, _ ws: Workspace) throws -> ChildProcess {
        let process = try ChildProcess("/bin/sleep", ["60"], stdoutPath: ws.path("sleep.out"), stderrPath: ws.path("sleep.err"))
        do {
            try "\(process.pid)\n".write(toFile: path, atomically: true, encoding: .utf8)
        } catch {
            process.stop(grace: 1)
            throw error
        }
        return process
    }

    @Test("ocicachefs unmount: no mount left, daemon gone")
    func unmountCommand() async throws {
        try await withWorkspace("life-unmount") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 200_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            Check.blobsVerify(mount, seed.blobs)
            let (pid, pidFile) = try Self.daemon(of: mount)
            #expect(Processes.isAlive(pid))

            let result = try await mount.unmount(in: ws)
            #expect(result.status == 0, "\(result)")
            #expect(result.stderr.isEmpty && result.stdout.isEmpty, "\(result)")
            // `unmount` returns once unmounted and the daemon is finishing: nothing is left.
            #expect(!Mounts.isMounted(mount.mountpoint), "still in /proc/mounts after unmount")
            #expect(await Self.eventually(5) { !Processes.isAlive(pid) }, "daemon \(pid) still running after unmount")
            #expect(!FileManager.default.fileExists(atPath: pidFile), "PID file \(pidFile) left behind")
            #expect(FileIO.listDirectory(mount.mountpoint).isEmpty, "the mountpoint is an empty directory again")
            #expect(mount.log.contains("unmounted"), "the daemon logs its exit: \(mount.log.suffix(800))")

            // Unmounting again is an error with one line, not a hang.
            let again = try await mount.unmount(in: ws)
            #expect(again.status != 0, "\(again)")
            #expect(again.stderrLines.count == 1 && again.stderrLines.first?.hasPrefix("ocicachefs: ") == true, "\(again)")
        }
    }

    /// A daemon killed outright leaves its PID file; by the time someone unmounts, the number
    /// may name an unrelated process, which `unmount` must neither wait for nor touch.
    @Test("unmount after the daemon was killed: a stale PID file is removed, not waited on")
    func unmountAfterKilledDaemon() async throws {
        try await withWorkspace("life-stale-pid") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 200_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            Check.blobsVerify(mount, seed.blobs)
            let (pid, pidFile) = try Self.daemon(of: mount)
            #expect(kill(pid, SIGKILL) == 0)
            #expect(await Self.eventually(5) { !Processes.isAlive(pid) }, "daemon \(pid) survived SIGKILL")
            #expect(FileManager.default.fileExists(atPath: pidFile), "a killed daemon cannot remove its PID file")
            let socket = String(pidFile.dropLast(".pid".count)) + ".sock"
            #expect(FileManager.default.fileExists(atPath: socket), "nor its statistics socket")
            var info = stat()
            let statErrno = stat(mount.path("index.json"), &info) == -1 ? errno : 0
            // (Kernels say ENOTCONN, or ECONNABORTED once the connection was aborted.)
            #expect(statErrno == ENOTCONN || statErrno == ECONNABORTED, "the mount is stale, not \(statErrno)")

            let unrelated = try Self.unrelatedProcess(namedIn: pidFile, ws)
            defer { unrelated.stop(grace: 1) }

            let result = try await mount.unmount(in: ws)
            #expect(result.status == 0, "\(result)")
            #expect(!Mounts.isMounted(mount.mountpoint), "still in /proc/mounts after unmount")
            #expect(!FileManager.default.fileExists(atPath: pidFile), "stale PID file \(pidFile) left behind")
            #expect(!FileManager.default.fileExists(atPath: socket), "stale socket \(socket) left behind")
            #expect(Processes.isAlive(unrelated.pid), "unmount touched a process that is not its daemon")
        }
    }

    @Test("a new mount clears PID files of daemons that were killed, and only those")
    func newMountClearsStalePIDFiles() async throws {
        try await withWorkspace("life-stale-sweep") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 200_000)
            let first = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let (_, firstPIDFile) = try Self.daemon(of: first)
            let stale = (firstPIDFile as NSString).deletingLastPathComponent + "/stale-\(UUID().uuidString).pid"
            let unrelated = try Self.unrelatedProcess(namedIn: stale, ws)
            defer { unrelated.stop(grace: 1) }
            defer { unlink(stale) }
            // A socket and a status file without a PID file: debris of daemons that ended
            // without `ocicachefs unmount`, once a minute old; a recent one may still be read.
            let directory = (firstPIDFile as NSString).deletingLastPathComponent
            let orphans = ["orphan-\(UUID().uuidString).sock", "orphan-\(UUID().uuidString).status"].map { directory + "/" + $0 }
            let recent = directory + "/orphan-\(UUID().uuidString).status"
            for path in orphans + [recent] { #expect(FileManager.default.createFile(atPath: path, contents: Data("published\n".utf8))) }
            defer { for path in orphans + [recent] { unlink(path) } }
            for path in orphans {
                var times = [timespec(tv_sec: time(nil) - 120, tv_nsec: 0), timespec(tv_sec: time(nil) - 120, tv_nsec: 0)]
                #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
            }

            let second = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            Check.blobsVerify(second, seed.blobs)
            #expect(!FileManager.default.fileExists(atPath: stale), "the stale PID file \(stale) is still there")
            for path in orphans { #expect(!FileManager.default.fileExists(atPath: path), "\(path) is still there") }
            #expect(FileManager.default.fileExists(atPath: recent), "a status file a minute old or less is kept")
            #expect(FileManager.default.fileExists(atPath: firstPIDFile), "the live first daemon's PID file was removed")
            #expect(Processes.isAlive(unrelated.pid), "a process that is not a daemon was touched")
        }
    }

    @Test("SIGTERM to the daemon unmounts cleanly")
    func sigterm() async throws {
        try await withWorkspace("life-sigterm") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 200_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            Check.blobsVerify(mount, seed.blobs)
            let (pid, pidFile) = try Self.daemon(of: mount)

            #expect(kill(pid, SIGTERM) == 0)
            #expect(await Self.eventually(5) { !Mounts.isMounted(mount.mountpoint) }, "still mounted 5 s after SIGTERM")
            #expect(await Self.eventually(5) { !Processes.isAlive(pid) }, "daemon \(pid) still running 5 s after SIGTERM")
            #expect(!FileManager.default.fileExists(atPath: pidFile), "PID file \(pidFile) left behind")
            var info = stat()
            #expect(stat(mount.mountpoint, &info) == 0, "the mountpoint must not be left as a dead FUSE endpoint (ENOTCONN)")
            #expect(mount.log.contains("signal received"), "\(mount.log.suffix(800))")
        }
    }

    @Test("unmount of a busy mount fails with one line and leaves the mount working")
    func busyUnmount() async throws {
        try await withWorkspace("life-busy") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 200_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let (pid, _) = try Self.daemon(of: mount)
            let fd = open(mount.path("index.json"), O_RDONLY | O_CLOEXEC)
            #expect(fd >= 0)

            let busy = try await mount.unmount(in: ws)
            #expect(busy.status == 1, "\(busy)")
            #expect(busy.stderrLines.count == 1 && busy.stderrLines.first?.hasPrefix("ocicachefs: ") == true, "\(busy)")
            #expect(busy.stderr.lowercased().contains("busy"), "\(busy)")
            #expect(mount.isMounted && Processes.isAlive(pid), "a refused unmount must leave the mount serving")
            Check.blobsVerify(mount, seed.blobs)

            if fd >= 0 { close(fd) }
            let result = try await mount.unmount(in: ws)
            #expect(result.status == 0, "\(result)")
            #expect(!mount.isMounted)
            #expect(await Self.eventually(5) { !Processes.isAlive(pid) })
        }
    }

    /// Mounting again onto a live mount stacks a second FUSE mount over the first; both
    /// daemons share one PID file (keyed by the path), so `unmount` can no longer wait for
    /// the right daemon. MOUNTPOINT is documented as "an existing empty directory".
    @Test("mounting onto a live mount is refused")
    func mountOntoLiveMount() async throws {
        try await withWorkspace("life-double") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 200_000)
            let first = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let (pid, _) = try Self.daemon(of: first)

            let again = try await Processes.run(try Harness.binary(),
                                                ["mount", "--cache-dir", ws.path("cache-again"), "--timeout", "5",
                                                 "--log-file", ws.path("again.log"), registry.source("cache:main"), first.mountpoint],
                                                environment: ["DOCKER_CONFIG": try ws.dockerConfig()], timeout: 60, in: ws)
            let stacked = Mounts.all().filter { $0 == first.mountpoint }.count
            #expect(again.status == 1, "a second mount onto a live mount must be refused: \(again); mounts there: \(stacked)")
            #expect(again.stderrLines.count == 1 && again.stderrLines.first?.hasPrefix("ocicachefs: ") == true, "\(again)")
            #expect(stacked == 1, "exactly one mount at \(first.mountpoint), found \(stacked)")
            #expect(first.daemonPIDs == [pid], "only the first daemon may serve the mountpoint: \(first.daemonPIDs)")
            Check.blobsVerify(first, seed.blobs)

            // Unmount whatever is there (both mounts if stacked): once nothing is mounted,
            // no daemon may be left.
            var rounds = 0
            while first.isMounted && rounds < 3 {
                _ = try await first.unmount(in: ws)
                rounds += 1
            }
            #expect(!first.isMounted)
            #expect(await Self.eventually(5) { first.daemonPIDs.isEmpty }, "daemons left: \(first.daemonPIDs)")
        }
    }

    /// MOUNTPOINT is documented as "an existing empty directory"; mounting over files hides them.
    @Test("mounting onto a non-empty directory is refused")
    func mountOntoNonEmptyDirectory() async throws {
        try await withWorkspace("life-nonempty") { ws in
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 100_000)
            let crowded = try ws.makeDirectory("crowded")
            FileManager.default.createFile(atPath: crowded + "/precious", contents: Data("x".utf8))
            ws.onCleanup("unmount \(crowded)") { [ws] in ws.forceUnmount(crowded) }
            let onto = try await Processes.run(try Harness.binary(),
                                               ["mount", "--cache-dir", ws.path("cache-crowded"), "--timeout", "5",
                                                "--log-file", ws.path("crowded.log"), registry.source("cache:main"), crowded],
                                               environment: ["DOCKER_CONFIG": try ws.dockerConfig()], timeout: 60, in: ws)
            #expect(onto.status == 1, "mounting over a non-empty directory (hiding its files) must be refused: \(onto)")
            #expect(onto.stderrLines.count == 1 && onto.stderrLines.first?.hasPrefix("ocicachefs: ") == true, "\(onto)")
            #expect(!Mounts.isMounted(crowded))
        }
    }
}
