import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `ocicachefs unmount` against the real binary and real mounts (the tests run as root).
@Suite("ocicachefs unmount touches only its own mounts")
struct UnmountCommandTests {
    @Test("a tmpfs is left mounted, with one line saying what it is")
    func anotherFilesystemIsLeftAlone() async throws {
        try await withWorkspace("unmount-tmpfs") { ws in
            let target = try ws.makeDirectory("tmpfs")
            try await mountTmpfs(at: target, in: ws)
            try "still here".write(toFile: target + "/marker", atomically: false, encoding: .utf8)

            let result = try await Processes.run(try Harness.binary(), ["unmount", target], timeout: 30, in: ws)
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: \(target) is not an ocicachefs mount (it is tmpfs)"], "\(result)")
            #expect(result.stdout.isEmpty, "\(result)")
            #expect(Mounts.isMounted(target), "the tmpfs must still be mounted")
            #expect(FileManager.default.fileExists(atPath: target + "/marker"))
        }
    }

    @Test("a directory with nothing mounted on it: not mounted")
    func plainDirectoryIsNotMounted() async throws {
        try await withWorkspace("unmount-plain") { ws in
            let directory = try ws.makeDirectory("plain")
            let result = try await Processes.run(try Harness.binary(), ["unmount", directory], timeout: 30, in: ws)
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines == ["ocicachefs: \(directory) is not mounted"], "\(result)")

            let missing = ws.path("missing")
            let absent = try await Processes.run(try Harness.binary(), ["unmount", missing], timeout: 30, in: ws)
            #expect(absent.status == 1, "\(absent)")
            #expect(absent.stderrLines == ["ocicachefs: \(missing): No such file or directory"], "\(absent)")
        }
    }

    /// Another user's mount: the kernel answers that user's stat of it with EACCES (no
    /// allow_other), which used to come out as "is not a directory".
    @Test("another user's ocicachefs mount: a permission error, and the mount stays")
    func anotherUsersMountIsAPermissionError() async throws {
        try await withWorkspace("unmount-perm") { ws in
            let registry = try await ws.startRegistry()
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:none-yet"), timeout: 10)
            // mkdtemp made the workspace 0700; the other user must be able to reach the mountpoint.
            #expect(chmod(ws.dir, 0o755) == 0)
            let setpriv = try Harness.tool("setpriv", neededFor: "running unmount as another user")
            let result = try await Processes.run(setpriv, ["--reuid=65534", "--regid=65534", "--clear-groups",
                                                           try Harness.binary(), "unmount", mount.mountpoint],
                                                 timeout: 30, in: ws)
            #expect(result.status == 1, "\(result)")
            #expect(result.stderrLines.count == 1, "\(result)")
            #expect(result.stderr.contains("permission denied"), "\(result)")
            #expect(!result.stderr.contains("not a directory"), "\(result)")
            #expect(mount.isMounted, "another user's unmount must leave the mount in place")

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
            #expect(!mount.isMounted)
        }
    }
}

/// Mounts a small tmpfs at `target` and registers its unmount for the end of the test.
private func mountTmpfs(at target: String, in ws: Workspace) async throws {
    let mountTool = try Harness.tool("mount", neededFor: "mounting a tmpfs")
    let umountTool = try Harness.tool("umount", neededFor: "unmounting the test's tmpfs")
    ws.onCleanup("unmount tmpfs \(target)") { [ws] in
        if Mounts.isMounted(target) { Processes.runSync(umountTool, [target], in: ws) }
    }
    let result = try await Processes.run(mountTool, ["-t", "tmpfs", "-o", "size=1m", "ocicachefs-test", target],
                                         timeout: 30, in: ws)
    guard result.status == 0, Mounts.isMounted(target) else { throw HarnessError("mounting a tmpfs failed: \(result)") }
}
