import Foundation
import Testing

/// How the registry of a test is protected, and the credentials the mount gets.
enum AuthCase: String, Sendable, CaseIterable, CustomTestStringConvertible {
    case none, basic, token
    var testDescription: String { rawValue }
}

/// A registry with `auth`, seeded with a BuildKit index-variant cache, and a DOCKER_CONFIG
/// holding the right credentials.
struct AuthenticatedCache {
    var registry: Registry
    var seed: SeedSummary
    var dockerConfig: String
    var issuer: TokenIssuer?
}

extension Workspace {
    func authenticatedCache(_ auth: AuthCase, variant: String = "index", layers: Int = 3, layerSize: Int = 1_500_000) async throws -> AuthenticatedCache {
        let user = "alice", password = "s3cret-\(auth.rawValue)"
        switch auth {
        case .none:
            let registry = try await startRegistry()
            let seed = try await self.seed(registry, variant: variant, layers: layers, layerSize: layerSize)
            return AuthenticatedCache(registry: registry, seed: seed, dockerConfig: try dockerConfig(), issuer: nil)
        case .basic:
            let registry = try await startRegistry(auth: .basic(user: user, password: password))
            let seed = try await self.seed(registry, variant: variant, layers: layers, layerSize: layerSize, user: user, password: password)
            return AuthenticatedCache(registry: registry, seed: seed,
                                      dockerConfig: try dockerConfig(host: registry.host, user: user, password: password), issuer: nil)
        case .token:
            let issuer = try await startTokenIssuer(user: user, password: password)
            let registry = try await startRegistry(auth: .token(issuer.endpoint))
            let seed = try await self.seed(registry, variant: variant, layers: layers, layerSize: layerSize, user: user, password: password)
            return AuthenticatedCache(registry: registry, seed: seed,
                                      dockerConfig: try dockerConfig(host: registry.host, user: user, password: password), issuer: issuer)
        }
    }
}

@Suite("Registry cache mounts, per kind of auth")
struct RegistryAuthTests {
    /// (a) layout visible with exact sizes and zero layer GETs; (b) every blob verifies;
    /// (c) each layer fetched exactly once, and a second full read fetches nothing.
    @Test("index-variant cache: lazy layout, verified reads, one fetch per layer", arguments: AuthCase.allCases)
    func indexVariantCache(auth: AuthCase) async throws {
        try await withWorkspace("auth-\(auth.rawValue)") { ws in
            let cache = try await ws.authenticatedCache(auth)
            let seed = cache.seed
            let repo = "cache"
            let layerDigests = seed.layers.map(\.digest)
            #expect(seed.layers.count == 3)
            let tokensBefore = cache.issuer?.stats()["tokens"] ?? 0

            let mount = try await ws.mountExpectingSuccess(cache.registry.source("\(repo):main"), dockerConfig: cache.dockerConfig)
            #expect(mount.result.stderr.isEmpty, "a successful mount prints nothing: \(mount.result)")

            // (a) Structure and sizes, from stat alone.
            try Check.indexJSON(mount, tag: "main", manifest: seed.manifest)
            try Check.blobsListedWithSizes(mount, seed)
            #expect(FileIO.listDirectory(mount.path("blobs/sha256")).count == Set(seed.blobs.map(\.digest)).count,
                    "blobs/sha256 should hold exactly the summary's blobs")
            #expect(FileIO.listDirectory(mount.mountpoint) == ["blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
            #expect(FileIO.listDirectory(mount.path("ingest")).isEmpty)
            #expect(try FileIO.readAll(mount.path("oci-layout")) == Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8))
            let before = cache.registry.blobGets(repo: repo, digests: layerDigests)
            #expect(before.values.allSatisfy { $0 == 0 }, "no layer may be fetched before it is read: \(before)")
            if let issuer = cache.issuer {
                #expect((issuer.stats()["tokens"] ?? 0) > tokensBefore, "the mount should have obtained a token from the issuer")
            }

            // (b) Every blob, read through the mount, hashes to its name.
            Check.blobsVerify(mount, seed.blobs)

            // (c) Exactly one transfer per layer, and none for a second read that bypasses the
            // kernel page cache (POSIX_FADV_DONTNEED), so the daemon serves it from its cache.
            let afterFirst = cache.registry.blobGets(repo: repo, digests: layerDigests)
            #expect(afterFirst.values.allSatisfy { $0 == 1 }, "each layer fetched once after one full read: \(afterFirst)")
            Check.blobsVerify(mount, seed.blobs, dropPageCache: true)
            let afterSecond = cache.registry.blobGets(repo: repo, digests: layerDigests)
            #expect(afterSecond == afterFirst, "a second full read must not reach the registry: \(afterFirst) -> \(afterSecond)")

            // The verified layers are in the private content cache.
            let cached = FileIO.cachedBlobs(mount.cacheDir, expecting: seed.layers.map(\.hex))
            for layer in seed.layers {
                #expect(cached.contains(layer.hex), "layer \(layer.digest) should be in the content cache")
            }

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    /// `ref=HOST/REPO@sha256:…` pins the manifest: shown under tag "latest"; with a tag too,
    /// under that tag; the bytes are the pinned manifest.
    @Test("reference by digest")
    func referenceByDigest() async throws {
        try await withWorkspace("by-digest") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 300_000)
            let byDigest = try await ws.mountExpectingSuccess(registry.source("cache@\(seed.manifest.digest)"))
            try Check.indexJSON(byDigest, tag: "latest", manifest: seed.manifest)
            Check.blobsVerify(byDigest, seed.blobs)
            let both = try await ws.mountExpectingSuccess(registry.source("cache:main@\(seed.manifest.digest)"))
            try Check.indexJSON(both, tag: "main", manifest: seed.manifest)
            for mount in [byDigest, both] {
                let unmounted = try await mount.unmount(in: ws)
                #expect(unmounted.status == 0, "\(unmounted)")
            }
        }
    }
}
