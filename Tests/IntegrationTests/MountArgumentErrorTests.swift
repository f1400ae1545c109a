import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Mistakes on the command line: one line that names the path or host at fault, exit 1, and
/// nothing mounted. Against the real binary; the tests run as root, so "not writable" is a
/// read-only bind mount (root may write anywhere else).
@Suite("Mount errors that name the cause")
struct MountArgumentErrorTests {
    @Test("--cache-dir that is a regular file", arguments: [Variant.defaultLogFile, .ownLogFile, .foreground])
    func cacheDirectoryIsAFile(_ variant: Variant) async throws {
        try await withWorkspace("err-cachefile") { ws in
            let file = ws.path("not-a-directory")
            try "x".write(toFile: file, atomically: false, encoding: .utf8)
            let result = try await runMount(in: ws, cacheDir: file, variant: variant)
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: cache directory \(file) is not a directory"], "\(result)")
        }
    }

    @Test("--cache-dir below a regular file")
    func cacheDirectoryBelowAFile() async throws {
        try await withWorkspace("err-cachebelow") { ws in
            let file = ws.path("file")
            try "x".write(toFile: file, atomically: false, encoding: .utf8)
            let result = try await runMount(in: ws, cacheDir: file + "/cache", variant: .defaultLogFile)
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: cache directory \(file)/cache: Not a directory"], "\(result)")
        }
    }

    @Test("--cache-dir on a read-only filesystem")
    func cacheDirectoryIsReadOnly() async throws {
        try await withWorkspace("err-cachero") { ws in
            let directory = try ws.makeDirectory("read-only")
            try await bindMountReadOnly(directory, in: ws)
            let result = try await runMount(in: ws, cacheDir: directory, variant: .defaultLogFile)
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: cache directory \(directory) is not writable: Read-only file system"],
                    "\(result)")
        }
    }

    @Test("--log-file in a directory that does not exist")
    func logFileInAMissingDirectory() async throws {
        try await withWorkspace("err-logdir") { ws in
            let log = ws.path("no-such-directory/ocicachefs.log")
            let result = try await runMount(in: ws, cacheDir: try ws.makeDirectory("cache"), variant: .logFile(log))
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: cannot open the log file \(log): No such file or directory"], "\(result)")
        }
    }

    @Test("a registry port outside 1-65535, refused before any request", arguments: ["0", "65536", "99999"])
    func portOutOfRange(_ port: String) async throws {
        try await withWorkspace("err-port") { ws in
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(port)/cache:main", timeout: 5)
            Check.mountFailedCleanly(mount, within: 5)
            #expect(mount.result.stderr.contains("port \(port) is outside 1-65535"), "\(mount.result)")
        }
    }

    /// Guards the wording after the handle fix: the retried request must still report the
    /// connection failure itself.
    @Test("connection refused: curl's reason with host and port")
    func connectionRefusedNamesTheHost() async throws {
        try await withWorkspace("err-refused") { ws in
            let port = try closedPort()
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(port)/cache:main", timeout: 5)
            Check.mountFailedCleanly(mount, within: 30)
            let line = mount.result.stderr
            #expect(line.contains("127.0.0.1") && line.contains("port \(port)") && line.contains("connect"), "\(mount.result)")
            #expect(!line.contains("cannot set"), "\(mount.result)")
        }
    }

    enum Variant: Sendable, CustomTestStringConvertible {
        /// No --log-file: the daemon logs into the cache directory.
        case defaultLogFile
        /// A --log-file elsewhere, so the daemon does start.
        case ownLogFile
        case logFile(String)
        case foreground

        var testDescription: String {
            switch self {
            case .defaultLogFile: return "log in the cache directory"
            case .ownLogFile: return "--log-file elsewhere"
            case .logFile(let path): return "--log-file \(path)"
            case .foreground: return "--foreground"
            }
        }
    }
}

/// `ocicachefs mount` of an unreachable registry (the errors under test come first) into a
/// fresh mountpoint; fails the test if anything got mounted.
private func runMount(in ws: Workspace, cacheDir: String, variant: MountArgumentErrorTests.Variant,
                      sourceLocation: SourceLocation = #_sourceLocation) async throws -> ProcessResult {
    let mountpoint = try ws.makeDirectory("mnt-\(ws.nextID())")
    ws.onCleanup("unmount \(mountpoint)") { [ws] in ws.forceUnmount(mountpoint) }
    var arguments = ["mount", "--cache-dir", cacheDir, "--timeout", "2"]
    switch variant {
    case .defaultLogFile: break
    case .ownLogFile: arguments += ["--log-file", ws.path("daemon-\(ws.nextID()).log")]
    case .logFile(let path): arguments += ["--log-file", path]
    case .foreground: arguments += ["--foreground"]
    }
    arguments += ["type=registry,ref=127.0.0.1:\(try closedPort())/cache:main", mountpoint]
    let result = try await Processes.run(try Harness.binary(), arguments, environment: ["DOCKER_CONFIG": try ws.dockerConfig()],
                                         timeout: 60, in: ws)
    #expect(!Mounts.isMounted(mountpoint), "a failed mount must leave nothing mounted", sourceLocation: sourceLocation)
    return result
}

/// Makes `directory` a read-only bind mount of itself, unmounted at the end of the test.
private func bindMountReadOnly(_ directory: String, in ws: Workspace) async throws {
    let mountTool = try Harness.tool("mount", neededFor: "a read-only bind mount")
    let umountTool = try Harness.tool("umount", neededFor: "removing the test's bind mount")
    ws.onCleanup("unmount bind \(directory)") { [ws] in
        if Mounts.isMounted(directory) { Processes.runSync(umountTool, [directory], in: ws) }
    }
    for arguments in [["--bind", directory, directory], ["-o", "remount,bind,ro", directory]] {
        let result = try await Processes.run(mountTool, arguments, timeout: 30, in: ws)
        guard result.status == 0 else { throw HarnessError("mount \(arguments) failed: \(result)") }
    }
}
