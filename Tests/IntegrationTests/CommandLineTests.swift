import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 13 (items 9 and 10): what a person sees of the command and of its daemon.
@Suite("The command line and the daemon process")
struct CommandLineTests {
    @Test("--version prints the version")
    func version() async throws {
        try await withWorkspace("version") { ws in
            let result = try await Processes.run(try Harness.binary(), ["--version"], timeout: 30, in: ws)
            #expect(result.status == 0, "\(result)")
            let line = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(line.split(separator: ".").count == 3 && line.allSatisfy { $0.isNumber || $0 == "." }, "\(result)")
        }
    }

    /// `pgrep ocicachefs` finds the daemon (it re-executes /proc/self/exe, which named it
    /// "exe"), and the daemon does not keep the caller's directory busy.
    @Test("the daemon is named ocicachefs and works in /")
    func daemonNameAndDirectory() async throws {
        try await withWorkspace("daemon-name") { ws in
            let callerDirectory = FileManager.default.currentDirectoryPath
            try #require(callerDirectory != "/", "the test must run outside / to tell the daemon's directory from its caller's")
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 10_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let pid = try #require(mount.daemonPIDs.first, "no daemon for \(mount.mountpoint)")
            #expect(Processes.readText("/proc/\(pid)/comm") == "ocicachefs\n")
            let pgrep = try await Processes.run(try Harness.tool("pgrep", neededFor: "finding the daemon by name"), ["-x", "ocicachefs"],
                                                timeout: 30, in: ws)
            #expect(pgrep.stdout.split(separator: "\n").contains("\(pid)"), "\(pgrep)")
            let directory = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd")
            #expect(directory == "/", "the daemon works in \(directory)")
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("cache ls creates nothing in the cache directory")
    func cacheListIsReadOnly() async throws {
        try await withWorkspace("cache-ls-ro") { ws in
            let cache = try ws.makeDirectory("cache")
            let listed = try await Processes.run(try Harness.binary(), ["cache", "ls", "--cache-dir", cache], timeout: 30, in: ws)
            #expect(listed.status == 0, "\(listed)")
            #expect(listed.stdout.contains("0 blobs"), "\(listed)")
            #expect(FileIO.listDirectory(cache).isEmpty, "cache ls created \(FileIO.listDirectory(cache))")
        }
    }

    @Test("a negative size is called invalid, not missing", arguments: [
        ["cache", "prune", "--max-size", "-1"],
        ["mount", "--cache-size", "-1", "type=registry,ref=127.0.0.1:9/cache:main", "/nonexistent"],
        ["mount", "--min-free", "-5G", "type=registry,ref=127.0.0.1:9/cache:main", "/nonexistent"],
        ["mount", "--writable", "--upload-cutoff", "-64M", "type=registry,ref=127.0.0.1:9/cache:main", "/nonexistent"],
    ])
    func negativeSize(_ arguments: [String]) async throws {
        try await withWorkspace("negative-size") { ws in
            let result = try await Processes.run(try Harness.binary(), arguments + ["--cache-dir", try ws.makeDirectory("cache")],
                                                 timeout: 30, in: ws)
            #expect(result.status != 0, "\(result)")
            let first = result.stderrLines.first ?? ""
            #expect(first.contains("invalid") && first.contains("-"), "\(result)")
            #expect(!result.stderr.contains("Missing value"), "\(result)")
        }
    }

    /// The mount would hide the cache (and the daemon would then write its cache through its
    /// own mount): refused before anything is created.
    @Test("a cache directory equal to or inside the mountpoint is refused in one line", arguments: ["", "/cache", "/a/b"])
    func cacheDirectoryInsideTheMountpoint(_ below: String) async throws {
        try await withWorkspace("cache-in-mnt") { ws in
            let mountpoint = try ws.makeDirectory("mnt")
            ws.onCleanup("unmount \(mountpoint)") { [ws] in ws.forceUnmount(mountpoint) }
            let cache = mountpoint + below
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 10_000)
            let result = try await Processes.run(try Harness.binary(),
                                                 ["mount", "--cache-dir", cache, "--timeout", "5", registry.source("cache:main"), mountpoint],
                                                 environment: ["DOCKER_CONFIG": try ws.dockerConfig()], timeout: 60, in: ws)
            #expect(!Mounts.isMounted(mountpoint), "nothing may be mounted: \(result)")
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: cache directory \(cache) is inside the mountpoint \(mountpoint); the mount would hide it"],
                    "\(result)")
            #expect(FileIO.listDirectory(mountpoint).isEmpty, "created in the mountpoint: \(FileIO.listDirectory(mountpoint))")
        }
    }

    /// The daemon re-executes itself: a secret in the source must not reach its argv, which
    /// every user can read in `ps`, nor its environment, which its children inherit.
    @Test("secret_access_key and session_token given in the source stay out of the daemon's argv")
    func secretsStayOutOfTheDaemonArguments() async throws {
        try await withS3Workspace("s3-secret-argv") { ws in
            let moto = try await ws.startMoto()
            let bucket = "bk-secret"
            let seed = try await ws.seedS3(moto, bucket: bucket, names: "main", layers: 1, layerSize: 100_000, seed: 31)
            let secret = "argv/secret+key", token = "argv-session-token"
            let mount = try await ws.mountS3ExpectingSuccess(moto.source(bucket: bucket, names: "main", extra: [
                "access_key_id=AKIAARGV000000000001", "secret_access_key=\(secret)", "session_token=\(token)",
            ]))
            try S3Check.layout(mount, seed, names: ["main"])
            Check.blobsVerify(mount, seed.layers.map(\.blob))
            let pid = try #require(mount.daemonPIDs.first, "no daemon for \(mount.mountpoint)")
            let arguments = try #require(Processes.commandLine(of: pid)).joined(separator: " ")
            #expect(!arguments.contains(secret) && !arguments.contains(token), "the daemon's argv: \(arguments)")
            #expect(arguments.contains("AKIAARGV000000000001"), "the rest of the source is still shown: \(arguments)")
            let environment = String(decoding: FileManager.default.contents(atPath: "/proc/\(pid)/environ") ?? Data(), as: UTF8.self)
            #expect(!environment.isEmpty && !environment.contains(secret) && !environment.contains(token), "the daemon's environment holds a secret")
            #expect(!mount.log.contains(secret) && !mount.log.contains(token))
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }
}
