import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Local content cache and verification")
struct ContentCacheTests {
    /// Blobs completed by one mount are served by the next mount of the same --cache-dir with
    /// the registry gone, also by a mount made while the registry is down (it shows the
    /// resolution saved by the last successful mount).
    @Test("re-mount with the same cache dir serves layers without the registry")
    func cachedRemount() async throws {
        try await withWorkspace("remount") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 3, layerSize: 1_300_000, seed: 11)
            let layers = seed.layers.map(\.digest)
            let shared = try ws.makeDirectory("shared-cache")
            let source = registry.source("cache:main")

            let first = try await ws.mountExpectingSuccess(source, cacheDir: shared)
            Check.blobsVerify(first, seed.blobs)
            let unmountedFirst = try await first.unmount(in: ws)
            #expect(unmountedFirst.status == 0, "\(unmountedFirst)")
            let getsAfterFirst = registry.blobGets(repo: "cache", digests: layers)
            #expect(getsAfterFirst.values.allSatisfy { $0 == 1 }, "\(getsAfterFirst)")
            let cachedFiles = Set(FileIO.listDirectory(shared + "/blobs/sha256"))
            #expect(cachedFiles.isSuperset(of: seed.layers.map(\.hex)), "completed layers are in the cache dir: \(cachedFiles)")

            // Mount #2 while the registry is up, then take the registry away.
            let second = try await ws.mountExpectingSuccess(source, cacheDir: shared)
            try Check.indexJSON(second, tag: "main", manifest: seed.manifest)
            registry.stop()
            #expect(!registry.server.isRunning, "the registry must be down for the rest of the test")
            #expect(RawHTTP.get(port: registry.port, path: "/v2/") == nil, "nothing may answer on the registry's port")

            // Every blob, layers included, comes from the local cache and verifies.
            Check.blobsVerify(second, seed.blobs)
            #expect(registry.blobGets(repo: "cache", digests: layers) == getsAfterFirst, "no new transfer was logged")

            let unmountedSecond = try await second.unmount(in: ws)
            #expect(unmountedSecond.status == 0, "\(unmountedSecond)")

            // A third mount made while the registry is down shows what the last mount resolved
            // (manifests and configs are in the cache too) and serves every blob from the cache.
            let third = try await ws.mountExpectingSuccess(source, cacheDir: shared, timeout: 5)
            try Check.indexJSON(third, tag: "main", manifest: seed.manifest)
            Check.blobsVerify(third, seed.blobs)
            let unmountedThird = try await third.unmount(in: ws)
            #expect(unmountedThird.status == 0, "\(unmountedThird)")
        }
    }

    /// A registry that serves wrong bytes for a layer: the read reaching the end of that blob
    /// fails with EIO, the blob never enters the content cache, the other blobs are fine.
    @Test("corrupt layer in the registry: EIO at the end, never cached")
    func corruptLayer() async throws {
        try await withWorkspace("corrupt") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 3, layerSize: 1_300_000, seed: 13)
            let bad = seed.layers[1]
            try await ws.corruptBlob(registry, digest: bad.digest)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))

            // stat still gives the descriptor's size (nothing is downloaded for it).
            #expect(Int64(try FileIO.statFile(mount.blobPath(bad.digest)).st_size) == bad.size)

            let first = FileIO.readUntilFailure(mount.blobPath(bad.digest))
            #expect(first.errno == EIO, "reading the corrupt blob to its end must fail with EIO; got \(first)")
            #expect(Int64(first.bytes) < bad.size, "the end of the blob must never be delivered: \(first)")

            // Not in the content cache, no leftover partial file. (The next layer of its chain
            // may have a partial one: its start is fetched as this one nears its end.)
            let cached = FileIO.listDirectory(mount.cacheDir + "/blobs/sha256")
            #expect(!cached.contains(bad.hex), "the corrupt blob must not enter the cache: \(cached)")
            // The partial file goes once the kernel has dropped the pages read from it, which
            // may be just after the reader heard EIO.
            var partial = FileIO.listDirectory(mount.cacheDir + "/partial")
            let deadline = Date().addingTimeInterval(10)
            while partial.contains(where: { $0.hasPrefix(bad.hex) }) && Date() < deadline {
                try await Task.sleep(for: .milliseconds(20))
                partial = FileIO.listDirectory(mount.cacheDir + "/partial")
            }
            #expect(!partial.contains { $0.hasPrefix(bad.hex) }, "the rejected download must not stay behind in partial/: \(partial)")

            // A second attempt fails the same way (the bytes are fetched and checked again).
            let second = FileIO.readUntilFailure(mount.blobPath(bad.digest))
            #expect(second.errno == EIO, "second read: \(second)")
            #expect(!FileIO.listDirectory(mount.cacheDir + "/blobs/sha256").contains(bad.hex))

            // Every other blob still verifies and is cached.
            let good = seed.blobs.filter { $0.digest != bad.digest }
            Check.blobsVerify(mount, good)
            let cachedAfter = FileIO.cachedBlobs(mount.cacheDir, expecting: seed.layers.filter { $0.digest != bad.digest }.map(\.hex))
            for layer in seed.layers where layer.digest != bad.digest {
                #expect(cachedAfter.contains(layer.hex))
            }
            #expect(mount.isMounted, "a corrupt blob must not bring the mount down")

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }
}
