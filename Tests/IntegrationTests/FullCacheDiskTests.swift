import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 12, defect 5, through a real mount: a cache directory on a filesystem with no room
/// left degrades reads to memory instead of failing them.
@Suite("A full cache directory through a real mount")
struct FullCacheDiskTests {
    @Test("a cache directory with no room: the blob is read whole and exact, the mount stays up, one clear line")
    func fullCacheDirectory() async throws {
        try await withWorkspace("full-disk") { ws in
            let registry = try await ws.startRegistry()
            let summary = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 8 << 20, seed: 95)
            let layer = summary.layers[0]
            let small = try ws.makeDirectory("small-cache")
            let mounted = try await Processes.run("/bin/mount", ["-t", "tmpfs", "-o", "size=3m", "tmpfs", small], timeout: 10, in: ws)
            guard mounted.status == 0 else { throw HarnessError("cannot mount a tmpfs for the cache directory (root needed): \(mounted)") }
            ws.onCleanup("unmount \(small)") { _ = umount2(small, Int32(MNT_DETACH)) }

            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), cacheDir: small + "/cache")
            for _ in 0..<2 {
                let read = try await HostileRemoteTests.sha256sum(mount.blobPath(layer.digest), timeout: 60, in: ws)
                #expect(read.digest == layer.digest, "\(read.result)")
            }
            #expect(mount.isMounted)
            #expect(FileManager.default.fileExists(atPath: mount.path("index.json")))
            let full = mount.log.split(separator: "\n").filter { $0.contains("the cache directory is full") }
            #expect(full.count == 1, "one clear line, not one per block: \(full)")
        }
    }
}
