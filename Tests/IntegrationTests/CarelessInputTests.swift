import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 13 ("Hostile and careless input") through the real binary: what a registry declares
/// and writes, and what a person types, end in one readable line or a working mount.
@Suite("Hostile and careless input")
struct CarelessInputTests {
    static let timeout = 5.0
    static let layerDigest = "sha256:" + String(repeating: "2", count: 64)

    /// A layer size no blob can have is refused at mount, in one line naming the blob and the
    /// size, instead of mounting a file that no read can ever complete.
    @Test("a descriptor size no blob can have fails the mount in one line naming digest and size",
          arguments: [("size-int64max", "9223372036854775807"), ("size-over-limit", "4611686018427387905"), ("size-negative", "-1")])
    func impossibleSize(tag: String, size: String) async throws {
        try await withWorkspace("size-\(tag)") { ws in
            let fake = try await FakeRegistry.start(in: ws)
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(fake.port)/cache:\(tag)", timeout: Self.timeout)
            Check.mountFailedCleanly(mount, within: 15)
            let line = mount.result.stderr
            #expect(line.contains(Self.layerDigest) && line.contains(" \(size) "), "the line names the blob and its size: \(mount.result)")
        }
    }

    @Test("the largest accepted size mounts, with that exact size")
    func sizeAtTheLimit() async throws {
        try await withWorkspace("size-at-limit") { ws in
            let fake = try await FakeRegistry.start(in: ws)
            let mount = try await ws.mountExpectingSuccess("type=registry,ref=127.0.0.1:\(fake.port)/cache:size-at-limit", timeout: Self.timeout)
            let info = try FileIO.statFile(mount.blobPath(Self.layerDigest))
            #expect(Int64(info.st_size) == Int64(1) << 62)
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    /// A media type and a registry error message holding ESC and BEL: printed raw they would
    /// retitle the terminal and colour everything after them.
    @Test("control characters a registry sends are escaped on stderr and in the log", arguments: ["escape-mediatype", "escape-denied"])
    func controlCharactersAreEscaped(tag: String) async throws {
        try await withWorkspace("escape-\(tag)") { ws in
            let fake = try await FakeRegistry.start(in: ws)
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(fake.port)/cache:\(tag)", timeout: Self.timeout)
            Check.mountFailedCleanly(mount, within: 15)
            let controls = Set<UInt8>([0x1B, 0x07])
            #expect(!mount.result.stderr.utf8.contains { controls.contains($0) }, "raw ESC/BEL on stderr: \(mount.result)")
            #expect(mount.result.stderr.contains(#"\x1b]0;owned\x07"#), "the text is shown, escaped: \(mount.result)")
            let log = mount.log
            #expect(log.contains("owned"), "the daemon logged the failure: \(log.suffix(1500))")
            #expect(!log.utf8.contains { controls.contains($0) }, "raw ESC/BEL in the log: \(log.suffix(1500).debugDescription)")
        }
    }
}
