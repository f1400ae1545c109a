import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 12, defect 6: a config that stalls once or arrives corrupt once failed the whole
/// mount. It is tried again within the same bounds as a blob request.
@Suite("Mount-time documents that fail once")
struct MountRetryTests {
    @Test("a cache config that arrives corrupt once or stalls once: the mount retries it and succeeds",
          arguments: [#"{"mode": "corrupt", "count": 1}"#, #"{"mode": "stall", "count": 1}"#, #"{"mode": "reset", "count": 1}"#])
    func configFailingOnce(fault: String) async throws {
        try await withWorkspace("mount-retry") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "manifest", layers: 1, layerSize: 200_000, seed: 44)
            let config = try #require(seed.nonLayers.first { $0.role != "manifest" }, "the seed has a config: \(seed.blobs)")
            let proxy = try await ws.startFaultProxy(inFrontOf: registry)
            try proxy.set(String(fault.dropLast()) + #", "digest": "\#(config.digest)"}"#)

            let timeout = 2.0
            let mount = try await ws.mount(proxy.source("cache:main"), timeout: timeout)
            #expect(mount.result.status == 0, "\(mount.result); log: \(mount.log.suffix(2000))")
            #expect(mount.result.elapsed < 3 * timeout + 5, "took \(mount.result.elapsed) s")
            #expect(try proxy.blobRequests() == 2, "the config was asked for twice")
            if mount.isMounted {
                try Check.indexJSON(mount, tag: "main", manifest: seed.manifest)
                Check.blobsVerify(mount, seed.blobs)
                let unmounted = try await mount.unmount(in: ws)
                #expect(unmounted.status == 0, "\(unmounted)")
            }
        }
    }
}
