import Foundation
import HTTPClient
import Logging
import OCI
import Synchronization
import SystemSupport
import Testing
@testable import RemoteStore

// MARK: - Fixtures

private let quietLogger = Logger(label: "RegistrySourceTests") { _ in SwiftLogNoOpLogHandler() }

private let gzipLayer = "application/vnd.oci.image.layer.v1.tar+gzip"
private let zstdLayer = "application/vnd.oci.image.layer.v1.tar+zstd"
private let dockerLayer = "application/vnd.docker.image.rootfs.diff.tar.gzip"
private let password = "s3cret-PASSWORD-value"

/// Deterministic pseudo-random bytes.
private func blobBytes(_ seed: UInt64, count: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

private func descriptorJSON(_ mediaType: String, _ bytes: [UInt8], annotations: String? = nil) -> String {
    var json = #"{"mediaType":"\#(mediaType)","digest":"\#(Digest.sha256(of: bytes))","size":\#(bytes.count)"#
    if let annotations { json += #","annotations":\#(annotations)"# }
    return json + "}"
}

private func cacheConfig(_ layers: [[UInt8]]) -> [UInt8] {
    let entries = layers.enumerated().map { index, layer in
        index == 0 ? #"{"blob":"\#(Digest.sha256(of: layer))","parent":-1}"# : #"{"blob":"\#(Digest.sha256(of: layer))","parent":\#(index - 1)}"#
    }
    return Array(#"{"layers":[\#(entries.joined(separator: ","))],"records":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","layers":[{"layer":0}]}]}"#.utf8)
}

private func imageManifest(mediaType: String?, config: String, layers: [String]) -> [UInt8] {
    let type = mediaType.map { #""mediaType":"\#($0)","# } ?? ""
    return Array(#"{"schemaVersion":2,\#(type)"config":\#(config),"layers":[\#(layers.joined(separator: ","))]}"#.utf8)
}

private func indexManifest(mediaType: String?, entries: [String]) -> [UInt8] {
    let type = mediaType.map { #""mediaType":"\#($0)","# } ?? ""
    return Array(#"{"schemaVersion":2,\#(type)"manifests":[\#(entries.joined(separator: ","))]}"#.utf8)
}

/// A registry holding one BuildKit cache (two layers and a cache config) in the index variant.
private struct IndexVariantCache {
    let registry = FakeRegistry(repository: "team/cache")
    let layer1 = blobBytes(1, count: 1000)
    let layer2 = blobBytes(2, count: 2500)
    let config: [UInt8]
    let manifest: [UInt8]
    let manifestDigest: Digest

    init(mediaType: String = MediaType.ociIndex, layerType: String = gzipLayer, tag: String = "buildcache") {
        config = cacheConfig([layer1, layer2])
        manifest = indexManifest(mediaType: mediaType, entries: [
            descriptorJSON(layerType, layer1, annotations: #"{"containerd.io/uncompressed":"sha256:\#(String(repeating: "d", count: 64))"}"#),
            descriptorJSON(layerType == gzipLayer ? zstdLayer : layerType, layer2),
            descriptorJSON(MediaType.buildkitCacheConfig, config),
        ])
        registry.putBlob(layer1)
        registry.putBlob(layer2)
        registry.putBlob(config)
        manifestDigest = registry.putManifest(manifest, tag: tag, contentType: mediaType)
    }
}

private func makeSource(_ reference: String = "registry.test/team/cache:buildcache", insecure: Bool = false,
                        credential: RegistryCredential? = nil, transport: any HTTPTransport) throws -> RegistrySource {
    RegistrySource(reference: try RegistryReference(parsing: reference), insecure: insecure, credential: credential,
                   transport: transport, timeout: .seconds(5), logger: quietLogger)
}

/// The RemoteStoreError `body` throws; records an issue when it does not throw one.
private func remoteError(sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) -> RemoteStoreError? {
    do {
        try body()
        Issue.record("expected a RemoteStoreError, got success", sourceLocation: sourceLocation)
    } catch let error as RemoteStoreError {
        return error
    } catch {
        Issue.record("expected a RemoteStoreError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

/// Every way an error might be printed: none may hold a secret or span lines.
private func expectClean(_ error: RemoteStoreError?, secrets: [String], sourceLocation: SourceLocation = #_sourceLocation) {
    guard let error else { return }
    for text in Set([error.description, String(describing: error), String(reflecting: error), error.localizedDescription]) {
        #expect(!text.contains("\n"), "multi-line error: \(text)", sourceLocation: sourceLocation)
        for secret in secrets where !secret.isEmpty {
            #expect(!text.contains(secret), "error shows a secret: \(text)", sourceLocation: sourceLocation)
        }
    }
}

private struct StreamResult {
    var starts: [Int64] = []
    var bytes: [UInt8] = []
}

private func stream(_ source: RegistrySource, _ digest: Digest, from offset: Int64) throws -> StreamResult {
    var result = StreamResult()
    try source.streamBlob(digest, from: offset, onStart: { result.starts.append($0) }, onBody: { chunk in
        #expect(!result.starts.isEmpty, "body before onStart")
        result.bytes.append(contentsOf: chunk)
    })
    return result
}

// MARK: - Snapshots

@Suite("RegistrySource snapshots")
struct RegistrySourceSnapshotTests {
    @Test func indexVariant() throws {
        let cache = IndexVariantCache()
        let source = try makeSource(transport: cache.registry)
        #expect(source.displayName == "registry.test/team/cache:buildcache")
        let snapshot = try source.loadSnapshot()

        #expect(snapshot.tags == [.init(tag: "buildcache", manifest: Descriptor(
            mediaType: MediaType.ociIndex, digest: cache.manifestDigest, size: Int64(cache.manifest.count)))])
        #expect(snapshot.smallBlobs == [cache.manifestDigest: cache.manifest, Digest.sha256(of: cache.config): cache.config])
        #expect(snapshot.lazyBlobs == [Digest.sha256(of: cache.layer1): 1000, Digest.sha256(of: cache.layer2): 2500])
        #expect(snapshot.warnings.isEmpty)

        // Manifest then config, and no layer is fetched at mount time.
        let requests = cache.registry.requests
        #expect(requests.map(\.url) == [
            "https://registry.test/v2/team/cache/manifests/buildcache",
            "https://registry.test/v2/team/cache/blobs/\(Digest.sha256(of: cache.config))",
        ])
        #expect(requests.allSatisfy { $0.method == "GET" })
        let accept = requests[0].headers["Accept"] ?? ""
        for type in [MediaType.ociIndex, MediaType.ociManifest, MediaType.dockerManifestList, MediaType.dockerManifest] {
            #expect(accept.contains(type), "Accept: \(accept)")
        }
        #expect(requests.allSatisfy { $0.headers["Authorization"] == nil })
    }

    @Test func dockerManifestListVariant() throws {
        let cache = IndexVariantCache(mediaType: MediaType.dockerManifestList, layerType: dockerLayer)
        let snapshot = try makeSource(transport: cache.registry).loadSnapshot()
        #expect(snapshot.tags.map(\.manifest.mediaType) == [MediaType.dockerManifestList])
        #expect(snapshot.tags.map(\.manifest.digest) == [cache.manifestDigest])
        #expect(Set(snapshot.smallBlobs.keys) == [cache.manifestDigest, Digest.sha256(of: cache.config)])
        #expect(snapshot.lazyBlobs == [Digest.sha256(of: cache.layer1): 1000, Digest.sha256(of: cache.layer2): 2500])
    }

    @Test func imageManifestVariant() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let layers = [blobBytes(3, count: 700), blobBytes(4, count: 900), blobBytes(5, count: 11)]
        let config = cacheConfig(layers)
        let manifest = imageManifest(mediaType: MediaType.ociManifest,
                                     config: descriptorJSON(MediaType.buildkitCacheConfig, config),
                                     layers: layers.map { descriptorJSON(gzipLayer, $0) })
        registry.putBlob(config)
        let digest = registry.putManifest(manifest, tag: "buildcache", contentType: MediaType.ociManifest)

        let snapshot = try makeSource(transport: registry).loadSnapshot()
        #expect(snapshot.tags == [.init(tag: "buildcache", manifest: Descriptor(
            mediaType: MediaType.ociManifest, digest: digest, size: Int64(manifest.count)))])
        #expect(snapshot.smallBlobs == [digest: manifest, Digest.sha256(of: config): config])
        #expect(snapshot.lazyBlobs == Dictionary(uniqueKeysWithValues: layers.map { (Digest.sha256(of: $0), Int64($0.count)) }))
        #expect(registry.requests.count == 2)
    }

    @Test func dockerSchema2Manifest() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let layer = blobBytes(6, count: 321)
        let config = Array(#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.utf8)
        let manifest = imageManifest(mediaType: MediaType.dockerManifest,
                                     config: descriptorJSON(MediaType.dockerConfig, config),
                                     layers: [descriptorJSON(dockerLayer, layer)])
        registry.putBlob(config)
        let digest = registry.putManifest(manifest, tag: "buildcache", contentType: MediaType.dockerManifest)

        let snapshot = try makeSource(transport: registry).loadSnapshot()
        #expect(snapshot.tags.map(\.manifest) == [Descriptor(mediaType: MediaType.dockerManifest, digest: digest, size: Int64(manifest.count))])
        #expect(snapshot.smallBlobs[Digest.sha256(of: config)] == config)
        #expect(snapshot.lazyBlobs == [Digest.sha256(of: layer): 321])
    }

    @Test func mediaTypeFromContentTypeWhenTheManifestHasNone() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let config = cacheConfig([])
        let manifest = imageManifest(mediaType: nil, config: descriptorJSON(MediaType.buildkitCacheConfig, config), layers: [])
        registry.putBlob(config)
        registry.putManifest(manifest, tag: "buildcache", contentType: MediaType.dockerManifest + "; charset=utf-8")
        let snapshot = try makeSource(transport: registry).loadSnapshot()
        #expect(snapshot.tags.map(\.manifest.mediaType) == [MediaType.dockerManifest])
    }

    /// A real image index: child manifests fetched by digest and kept whole; their configs
    /// small, their layers lazy; entries that are not manifests are lazy blobs.
    @Test func imageIndexFetchesChildManifestsByDigest() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let shared = blobBytes(7, count: 4000)
        let amdOnly = blobBytes(8, count: 100)
        let amdConfig = Array(#"{"architecture":"amd64","os":"linux"}"#.utf8)
        let armConfig = Array(#"{"architecture":"arm64","os":"linux"}"#.utf8)
        let amd = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, amdConfig),
                                layers: [descriptorJSON(gzipLayer, shared), descriptorJSON(gzipLayer, amdOnly)])
        let arm = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, armConfig),
                                layers: [descriptorJSON(gzipLayer, shared)])
        let attestation = blobBytes(9, count: 55)
        let index = indexManifest(mediaType: MediaType.ociIndex, entries: [
            descriptorJSON(MediaType.ociManifest, amd),
            descriptorJSON(MediaType.ociManifest, arm),
            descriptorJSON("application/vnd.in-toto+json", attestation),
        ])
        registry.putBlob(amdConfig)
        registry.putBlob(armConfig)
        let amdDigest = registry.putManifest(amd, tag: nil, contentType: MediaType.ociManifest)
        let armDigest = registry.putManifest(arm, tag: nil, contentType: MediaType.ociManifest)
        let indexDigest = registry.putManifest(index, tag: "v1", contentType: MediaType.ociIndex)

        let snapshot = try makeSource("registry.test/team/cache:v1", transport: registry).loadSnapshot()
        #expect(snapshot.tags == [.init(tag: "v1", manifest: Descriptor(mediaType: MediaType.ociIndex, digest: indexDigest, size: Int64(index.count)))])
        #expect(snapshot.smallBlobs == [
            indexDigest: index, amdDigest: amd, armDigest: arm,
            Digest.sha256(of: amdConfig): amdConfig, Digest.sha256(of: armConfig): armConfig,
        ])
        #expect(snapshot.lazyBlobs == [
            Digest.sha256(of: shared): 4000, Digest.sha256(of: amdOnly): 100, Digest.sha256(of: attestation): 55,
        ])
        let manifestURLs = registry.requests(pathContains: "/manifests/").map(\.url)
        #expect(manifestURLs.first == "https://registry.test/v2/team/cache/manifests/v1")
        #expect(manifestURLs.dropFirst().sorted() == [
            "https://registry.test/v2/team/cache/manifests/\(amdDigest)",
            "https://registry.test/v2/team/cache/manifests/\(armDigest)",
        ].sorted())
    }

    @Test func childManifestsOfAnIndexAreFetchedSeveralAtOnce() throws {
        let registry = FakeRegistry(repository: "team/cache")
        var entries: [String] = []
        for child in 0..<6 {
            let config = Array(#"{"child":\#(child)}"#.utf8)
            let layer = blobBytes(UInt64(100 + child), count: 10 + child)
            let manifest = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, config),
                                         layers: [descriptorJSON(gzipLayer, layer)])
            registry.putBlob(config)
            _ = registry.putManifest(manifest, tag: nil, contentType: MediaType.ociManifest)
            entries.append(descriptorJSON(MediaType.ociManifest, manifest))
        }
        _ = registry.putManifest(indexManifest(mediaType: MediaType.ociIndex, entries: entries), tag: "v1", contentType: MediaType.ociIndex)
        let gate = ConcurrencyGate(inner: registry, gated: "/manifests/sha256:", waitingFor: RegistrySource.parallelManifestFetches)

        let snapshot = try makeSource("registry.test/team/cache:v1", transport: gate).loadSnapshot()
        #expect(snapshot.smallBlobs.count == 1 + 6 + 6)
        #expect(snapshot.lazyBlobs.count == 6)
        #expect(gate.mostAtOnce == RegistrySource.parallelManifestFetches)
    }

    @Test func aFailingChildManifestFailsTheSnapshot() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let config = Array(#"{"a":1}"#.utf8)
        registry.putBlob(config)
        let good = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, config), layers: [])
        _ = registry.putManifest(good, tag: nil, contentType: MediaType.ociManifest)
        let missing = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, Array("{}".utf8)), layers: [])
        _ = registry.putManifest(indexManifest(mediaType: MediaType.ociIndex, entries: [
            descriptorJSON(MediaType.ociManifest, good), descriptorJSON(MediaType.ociManifest, missing),
        ]), tag: "v1", contentType: MediaType.ociIndex)
        let error = remoteError { _ = try makeSource("registry.test/team/cache:v1", transport: registry).loadSnapshot() }
        guard case .notFound(let message)? = error else {
            Issue.record("expected notFound, got \(String(describing: error))")
            return
        }
        #expect(message.contains(Digest.sha256(of: missing).description), "\(message)")
    }

    @Test func childManifestWithTheWrongSizeIsInvalid() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let config = Array("{}".utf8)
        let child = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, config), layers: [])
        let childDigest = registry.putManifest(child, tag: nil, contentType: MediaType.ociManifest)
        registry.putBlob(config)
        let index = indexManifest(mediaType: MediaType.ociIndex, entries: [
            #"{"mediaType":"\#(MediaType.ociManifest)","digest":"\#(childDigest)","size":\#(child.count + 1)}"#,
        ])
        registry.putManifest(index, tag: "buildcache", contentType: MediaType.ociIndex)
        let error = remoteError { _ = try makeSource(transport: registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("\(childDigest)"), "\(message)")
    }

    /// index → index → image manifest: two index levels are fine; a third is refused.
    @Test func nestedIndexes() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let config = Array(#"{"os":"linux"}"#.utf8)
        let layer = blobBytes(10, count: 77)
        registry.putBlob(config)
        let image = imageManifest(mediaType: MediaType.ociManifest, config: descriptorJSON(MediaType.ociConfig, config),
                                  layers: [descriptorJSON(gzipLayer, layer)])
        let imageDigest = registry.putManifest(image, tag: nil, contentType: MediaType.ociManifest)
        let inner = indexManifest(mediaType: MediaType.ociIndex, entries: [descriptorJSON(MediaType.ociManifest, image)])
        let innerDigest = registry.putManifest(inner, tag: nil, contentType: MediaType.ociIndex)
        let outer = indexManifest(mediaType: MediaType.ociIndex, entries: [descriptorJSON(MediaType.ociIndex, inner)])
        let outerDigest = registry.putManifest(outer, tag: "two", contentType: MediaType.ociIndex)
        let snapshot = try makeSource("registry.test/team/cache:two", transport: registry).loadSnapshot()
        #expect(Set(snapshot.smallBlobs.keys) == [outerDigest, innerDigest, imageDigest, Digest.sha256(of: config)])
        #expect(snapshot.lazyBlobs == [Digest.sha256(of: layer): 77])

        let third = indexManifest(mediaType: MediaType.ociIndex, entries: [descriptorJSON(MediaType.ociIndex, outer)])
        registry.putManifest(third, tag: "three", contentType: MediaType.ociIndex)
        let error = remoteError { _ = try makeSource("registry.test/team/cache:three", transport: registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("nested"), "\(message)")
    }

    @Test func manifestOverFourMiBIsRefused() throws {
        let registry = FakeRegistry(repository: "team/cache")
        registry.setChunkSize(1 << 20)
        let padding = String(repeating: " ", count: 4 << 20)
        let huge = Array((#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"# + padding).utf8)
        registry.putManifest(huge, tag: "buildcache", contentType: MediaType.ociIndex)
        let error = remoteError { _ = try makeSource(transport: registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("refused"), "\(message)")
        #expect(registry.requests.count == 1, "refusal is not retried")
    }

    @Test func missingTagIsAnEmptySnapshotWithOneWarning() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let snapshot = try makeSource(transport: registry).loadSnapshot()
        #expect(snapshot.tags.isEmpty)
        #expect(snapshot.smallBlobs.isEmpty)
        #expect(snapshot.lazyBlobs.isEmpty)
        #expect(snapshot.warnings.count == 1)
        let warning = snapshot.warnings.first ?? ""
        #expect(warning == "no tag buildcache at registry.test/team/cache; the mount is empty until a cache is exported", "\(warning)")
        #expect(!warning.contains("\n"))
        #expect(registry.requests.count == 1, "a 404 is not retried")
    }

    @Test func missingConfigBlobIsAnError() throws {
        let cache = IndexVariantCache()
        let registry = FakeRegistry(repository: "team/cache")
        registry.putManifest(cache.manifest, tag: "buildcache", contentType: MediaType.ociIndex)
        let error = remoteError { _ = try makeSource(transport: registry).loadSnapshot() }
        guard case .notFound? = error else {
            Issue.record("expected notFound, got \(String(describing: error))")
            return
        }
    }

    @Test func malformedManifestIsInvalidContent() throws {
        let registry = FakeRegistry(repository: "team/cache")
        registry.putManifest(Array(#"{"schemaVersion":1}"#.utf8), tag: "buildcache", contentType: "application/json")
        let error = remoteError { _ = try makeSource(transport: registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("schemaVersion 1"), "\(message)")
        expectClean(error, secrets: [])
    }

    // MARK: Integrity

    @Test func manifestNotMatchingDockerContentDigestIsInvalid() throws {
        let cache = IndexVariantCache()
        let wrong = Digest.sha256(of: Array("something else".utf8))
        cache.registry.putManifest(cache.manifest, tag: "buildcache", contentType: MediaType.ociIndex, digestHeader: .some(wrong.description))
        let error = remoteError { _ = try makeSource(transport: cache.registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("Docker-Content-Digest"), "\(message)")
        // Damage in transit passes on a retry; a registry that always lies is asked a bounded
        // number of times (issue 12: a manifest corrupt once failed the whole mount).
        #expect(cache.registry.requests.count == 3, "\(cache.registry.requests.count) requests")
    }

    @Test func digestPinnedReference() throws {
        let cache = IndexVariantCache()
        let source = try makeSource("registry.test/team/cache@\(cache.manifestDigest)", transport: cache.registry)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.map(\.tag) == ["latest"])
        #expect(snapshot.tags.map(\.manifest.digest) == [cache.manifestDigest])
        #expect(cache.registry.requests.first?.url == "https://registry.test/v2/team/cache/manifests/\(cache.manifestDigest)")
    }

    @Test(arguments: [false, true])
    func digestPinnedReferenceWithOtherBytesIsAnError(sendsDigestHeader: Bool) throws {
        let cache = IndexVariantCache()
        let pinned = Digest.sha256(of: Array("the manifest we asked for".utf8))
        // The registry answers the pinned digest with the bytes of another manifest, with no
        // Docker-Content-Digest, or with one that (falsely) claims the pinned digest.
        cache.registry.putManifest(cache.manifest, reference: pinned.description, contentType: MediaType.ociIndex,
                                   digestHeader: sendsDigestHeader ? .some(pinned.description) : .some(nil))
        let error = remoteError {
            _ = try makeSource("registry.test/team/cache:v1@\(pinned)", transport: cache.registry).loadSnapshot()
        }
        guard case .invalidContent? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
    }

    @Test func configOverFourMiBIsRefusedWithoutFetchingIt() throws {
        let registry = FakeRegistry(repository: "team/cache")
        let bigSize = 4 << 20 + 1
        let configDigest = Digest.sha256(of: Array("pretend".utf8))
        let manifest = imageManifest(mediaType: MediaType.ociManifest,
                                     config: #"{"mediaType":"\#(MediaType.buildkitCacheConfig)","digest":"\#(configDigest)","size":\#(bigSize)}"#,
                                     layers: [])
        registry.putManifest(manifest, tag: "buildcache", contentType: MediaType.ociManifest)
        let error = remoteError { _ = try makeSource(transport: registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("\(configDigest)"), "\(message)")
        #expect(message.contains("\(bigSize)"), "\(message)")
        #expect(message.contains("refused"), "\(message)")
        #expect(registry.requests(pathContains: "/blobs/").isEmpty)
    }

    @Test func configBodyLargerThanFourMiBIsRefused() throws {
        let registry = FakeRegistry(repository: "team/cache")
        registry.setChunkSize(1 << 20)
        let claimed = Array(#"{"layers":[]}"#.utf8)
        let configDigest = Digest.sha256(of: claimed)
        registry.putBlob([UInt8](repeating: 0x20, count: 5 << 20), as: configDigest)
        let manifest = imageManifest(mediaType: MediaType.ociManifest,
                                     config: descriptorJSON(MediaType.buildkitCacheConfig, claimed), layers: [])
        registry.putManifest(manifest, tag: "buildcache", contentType: MediaType.ociManifest)
        let error = remoteError { _ = try makeSource(transport: registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("refused"), "\(message)")
    }

    @Test func configWithTheWrongBytesIsInvalid() throws {
        let cache = IndexVariantCache()
        let configDigest = Digest.sha256(of: cache.config)
        var tampered = cache.config
        tampered[0] ^= 0xFF
        cache.registry.putBlob(tampered, as: configDigest)
        let error = remoteError { _ = try makeSource(transport: cache.registry).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("\(configDigest)"), "\(message)")
    }

    // MARK: URLs

    @Test func schemeAndHostFollowTheReference() throws {
        let cases: [(reference: String, repository: String, url: String)] = [
            ("registry.test/team/cache:buildcache", "team/cache", "https://registry.test/v2/team/cache/manifests/buildcache"),
            ("registry.test:8443/team/cache:buildcache", "team/cache", "https://registry.test:8443/v2/team/cache/manifests/buildcache"),
            ("127.0.0.1:5000/cache:main", "cache", "http://127.0.0.1:5000/v2/cache/manifests/main"),
            ("localhost/cache", "cache", "http://localhost/v2/cache/manifests/latest"),
            ("alpine", "library/alpine", "https://registry-1.docker.io/v2/library/alpine/manifests/latest"),
            ("user/repo:c", "user/repo", "https://registry-1.docker.io/v2/user/repo/manifests/c"),
        ]
        for entry in cases {
            let registry = FakeRegistry(repository: entry.repository)
            _ = try makeSource(entry.reference, transport: registry).loadSnapshot()
            #expect(registry.requests.map(\.url) == [entry.url], "\(entry.reference)")
            #expect(registry.requests.allSatisfy { $0.verifiesTLSPeer })
        }
    }

    // MARK: registry.insecure

    /// HTTPS answers: it is used, without certificate checks, for the registry only.
    @Test func insecureRegistryUsesHTTPSWithoutVerification() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: nil, password: nil, expiresIn: 300))
        let source = try makeSource(insecure: true, transport: cache.registry)
        _ = try source.loadSnapshot()
        cache.registry.setRedirect(.otherHost)
        _ = try stream(source, Digest.sha256(of: cache.layer1), from: 0)

        let registryRequests = cache.registry.requests(host: "registry.test")
        #expect(registryRequests.first?.url == "https://registry.test/v2/")
        #expect(registryRequests.allSatisfy { $0.url.hasPrefix("https://") })
        #expect(registryRequests.allSatisfy { !$0.verifiesTLSPeer })
        // Other hosts (token server, CDN) are not the insecure registry: they are verified.
        #expect(cache.registry.requests(host: FakeRegistry.tokenHost).allSatisfy { $0.verifiesTLSPeer })
        #expect(cache.registry.requests(host: FakeRegistry.cdnHost).count == 1)
        #expect(cache.registry.requests(host: FakeRegistry.cdnHost).allSatisfy { $0.verifiesTLSPeer })
    }

    /// HTTPS does not answer at all: plain HTTP, as BuildKit falls back.
    @Test func insecureRegistryFallsBackToHTTP() throws {
        let cache = IndexVariantCache()
        cache.registry.setRefusesHTTPS(true)
        let source = try makeSource(insecure: true, transport: cache.registry)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.map(\.manifest.digest) == [cache.manifestDigest])
        let streamed = try stream(source, Digest.sha256(of: cache.layer2), from: 3)
        #expect(streamed.bytes == Array(cache.layer2[3...]))
        #expect(cache.registry.requests.map(\.url) == [
            "https://registry.test/v2/",
            "http://registry.test/v2/team/cache/manifests/buildcache",
            "http://registry.test/v2/team/cache/blobs/\(Digest.sha256(of: cache.config))",
            "http://registry.test/v2/team/cache/blobs/\(Digest.sha256(of: cache.layer2))",
        ])
    }

    @Test func insecureIsIgnoredForLoopback() throws {
        let registry = FakeRegistry(repository: "cache")
        _ = try makeSource("127.0.0.1:5000/cache:main", insecure: true, transport: registry).loadSnapshot()
        #expect(registry.requests.map(\.url) == ["http://127.0.0.1:5000/v2/cache/manifests/main"])
    }

    /// BuildKit's `registry.insecure` skips certificate checks for everything its resolver
    /// sends to that registry, the token requests included (the authorizer shares the
    /// insecure client). A self-signed registry serving its own tokens must still mount.
    @Test func insecureRegistryTokenServerOnTheSameHostIsNotVerified() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: nil, password: nil, expiresIn: 300))
        cache.registry.setTokenRealm("https://registry.test/token")
        _ = try makeSource(insecure: true, transport: cache.registry).loadSnapshot()
        let tokenRequests = cache.registry.requests(pathContains: "/token")
        #expect(tokenRequests.count == 1)
        #expect(tokenRequests.allSatisfy { !$0.verifiesTLSPeer }, "token request to the insecure registry verifies its certificate")
    }

    @Test func secureRegistryNeverFallsBackToHTTP() throws {
        let cache = IndexVariantCache()
        cache.registry.setRefusesHTTPS(true)
        let error = remoteError { _ = try makeSource(transport: cache.registry).loadSnapshot() }
        guard case .transport? = error else {
            Issue.record("expected transport, got \(String(describing: error))")
            return
        }
        #expect(cache.registry.requests.allSatisfy { $0.url.hasPrefix("https://") })
    }
}

// MARK: - Authentication

@Suite("RegistrySource authentication")
struct RegistrySourceAuthTests {
    @Test func basicAuthAnswersTheChallengeThenSendsItUpFront() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.basic(username: "alice", password: password))
        let source = try makeSource(credential: .basic(username: "alice", password: password), transport: cache.registry)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.count == 1)

        let expected = FakeRegistry.basicHeader("alice", password)
        let requests = cache.registry.requests
        #expect(requests.count == 3)
        #expect(requests.map { $0.headers["Authorization"] } == [nil, expected, expected])
        #expect(requests[0].url == requests[1].url)

        let streamed = try stream(source, Digest.sha256(of: cache.layer1), from: 0)
        #expect(streamed.bytes == cache.layer1)
        #expect(cache.registry.requests.last?.headers["Authorization"] == expected)
        #expect(cache.registry.requests.count == 4)
    }

    @Test func basicChallengeWithoutCredentials() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.basic(username: "alice", password: password))
        let error = remoteError { _ = try makeSource(transport: cache.registry).loadSnapshot() }
        guard case .unauthorized(let message)? = error else {
            Issue.record("expected unauthorized, got \(String(describing: error))")
            return
        }
        #expect(message.contains("registry.test"), "\(message)")
        #expect(message.contains("username and password"), "\(message)")
        expectClean(error, secrets: [password])
    }

    @Test func wrongBasicCredentials() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.basic(username: "alice", password: password))
        let wrong = "wrong-PASSWORD-guess"
        let error = remoteError {
            _ = try makeSource(credential: .basic(username: "alice", password: wrong), transport: cache.registry).loadSnapshot()
        }
        guard case .unauthorized(let message)? = error else {
            Issue.record("expected unauthorized, got \(String(describing: error))")
            return
        }
        #expect(message.contains("registry.test"), "\(message)")
        #expect(message.contains("team/cache"), "\(message)")
        expectClean(error, secrets: [wrong, password, FakeRegistry.basicHeader("alice", wrong),
                                     String(FakeRegistry.basicHeader("alice", wrong).dropFirst("Basic ".count))])
        #expect(cache.registry.requests.count == 2, "one challenge is answered once, then it stops")
    }

    @Test func anonymousBearerTokenWithDefaultScopeIsFetchedOnceAndCached() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: nil, password: nil, expiresIn: 300))
        let source = try makeSource(transport: cache.registry)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.smallBlobs.count == 2)

        #expect(cache.registry.tokensIssued == 1)
        let tokenRequest = try #require(cache.registry.tokenRequests.first)
        #expect(tokenRequest.scope == "repository:team/cache:pull")
        #expect(tokenRequest.service == "registry.test")
        #expect(tokenRequest.authorization == nil)

        let token = "Bearer " + FakeRegistry.tokenValue(1)
        let registryRequests = cache.registry.requests(host: "registry.test")
        #expect(registryRequests.map { $0.headers["Authorization"] } == [nil, token, token])

        // Later requests reuse the token.
        let streamed = try stream(source, Digest.sha256(of: cache.layer2), from: 0)
        #expect(streamed.bytes == cache.layer2)
        #expect(cache.registry.tokensIssued == 1)
        #expect(cache.registry.requests(host: FakeRegistry.tokenHost).count == 1)
        #expect(cache.registry.requests.last?.headers["Authorization"] == token)
    }

    @Test func bearerWithCredentialsUsesTheChallengeScopeAndBasicAtTheTokenServer() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "Fake Registry Service", challengeScope: "repository:team/cache:pull",
                                       username: "bob", password: password, expiresIn: nil))
        let source = try makeSource(credential: .basic(username: "bob", password: password), transport: cache.registry)
        _ = try source.loadSnapshot()
        #expect(cache.registry.tokensIssued == 1)
        let tokenRequest = try #require(cache.registry.tokenRequests.first)
        #expect(tokenRequest.scope == "repository:team/cache:pull")
        #expect(tokenRequest.service == "Fake Registry Service")
        #expect(tokenRequest.authorization == FakeRegistry.basicHeader("bob", password))
        // The Basic credential goes to the token server only; the registry sees the token.
        #expect(cache.registry.requests(host: "registry.test").allSatisfy { $0.headers["Authorization"]?.hasPrefix("Basic") != true })
    }

    @Test func identityTokenIsExchangedWithAPost() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: nil, password: nil, expiresIn: 300))
        let refresh = "REFRESH-token-secret"
        _ = try makeSource(credential: .identityToken(refresh), transport: cache.registry).loadSnapshot()
        let tokenRequests = cache.registry.requests(host: FakeRegistry.tokenHost)
        #expect(tokenRequests.map(\.method) == ["POST"])
        #expect(tokenRequests.allSatisfy { !$0.url.contains(refresh) }, "refresh token must not be in the URL")
        let body = String(decoding: tokenRequests.first?.body?.bytes ?? [], as: UTF8.self)
        #expect(body.contains("grant_type=refresh_token"), "\(body)")
        #expect(cache.registry.tokenRequests.first?.scope == "repository:team/cache:pull")
    }

    @Test func bearerTokenIsRenewedAfterA401() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: "repository:team/cache:pull",
                                       username: nil, password: nil, expiresIn: 300))
        let source = try makeSource(transport: cache.registry)
        _ = try source.loadSnapshot()
        #expect(cache.registry.tokensIssued == 1)

        cache.registry.revokeTokens()
        let streamed = try stream(source, Digest.sha256(of: cache.layer1), from: 10)
        #expect(streamed.bytes == Array(cache.layer1[10...]))
        #expect(streamed.starts == [10])
        #expect(cache.registry.tokensIssued == 2)
        let blobRequests = cache.registry.requests(pathContains: "/blobs/\(Digest.sha256(of: cache.layer1))")
        #expect(blobRequests.map { $0.headers["Authorization"] } == [
            "Bearer " + FakeRegistry.tokenValue(1), "Bearer " + FakeRegistry.tokenValue(2),
        ])
        #expect(blobRequests.allSatisfy { $0.headers["Range"] == "bytes=10-" })
    }

    @Test func wrongCredentialsAtTheTokenServer() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "bob", password: password, expiresIn: nil))
        let wrong = "not-the-PASSWORD"
        let error = remoteError {
            _ = try makeSource(credential: .basic(username: "bob", password: wrong), transport: cache.registry).loadSnapshot()
        }
        guard case .unauthorized(let message)? = error else {
            Issue.record("expected unauthorized, got \(String(describing: error))")
            return
        }
        #expect(message.contains("registry.test"), "\(message)")
        expectClean(error, secrets: [wrong, password, String(FakeRegistry.basicHeader("bob", wrong).dropFirst("Basic ".count))])
    }

    @Test func anonymousRefusedAtTheTokenServer() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "bob", password: password, expiresIn: nil))
        let error = remoteError { _ = try makeSource(transport: cache.registry).loadSnapshot() }
        guard case .unauthorized(let message)? = error else {
            Issue.record("expected unauthorized, got \(String(describing: error))")
            return
        }
        #expect(message.contains("docker login"), "\(message)")
        expectClean(error, secrets: [password])
    }

    @Test func tokensNeverAppearInErrors() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "bob", password: password, expiresIn: 300))
        let faulty = FaultInjectingTransport(wrapping: cache.registry)
        let source = try makeSource(credential: .basic(username: "bob", password: password), transport: faulty)
        _ = try source.loadSnapshot()
        let token = FakeRegistry.tokenValue(1)

        faulty.inject(.status(403, body: Array(#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#.utf8)),
                      urlContains: "/blobs/")
        let denied = remoteError { _ = try stream(source, Digest.sha256(of: cache.layer1), from: 0) }
        guard case .unauthorized(let message)? = denied else {
            Issue.record("expected unauthorized, got \(String(describing: denied))")
            return
        }
        #expect(message.contains("DENIED"), "\(message)")
        expectClean(denied, secrets: [token, password])

        faulty.removeAllFaults()
        faulty.inject(.failConnection, urlContains: "/blobs/")
        let failed = remoteError { _ = try stream(source, Digest.sha256(of: cache.layer1), from: 0) }
        expectClean(failed, secrets: [token, password])
        // The faulted requests did carry the token: it was there to leak.
        #expect(faulty.requests.last?.headers["Authorization"] == "Bearer " + token)
    }

    // MARK: Redirects

    @Test func redirectToAnotherHostDropsAuthorization() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.basic(username: "alice", password: password))
        let source = try makeSource(credential: .basic(username: "alice", password: password), transport: cache.registry)
        _ = try source.loadSnapshot()
        cache.registry.setRedirect(.otherHost)
        cache.registry.setChunkSize(9)

        let digest = Digest.sha256(of: cache.layer2)
        let streamed = try stream(source, digest, from: 100)
        #expect(streamed.starts == [100])
        #expect(streamed.bytes == Array(cache.layer2[100...]))

        let cdnRequests = cache.registry.requests(host: FakeRegistry.cdnHost)
        #expect(cdnRequests.count == 1)
        #expect(cdnRequests.first?.url == "http://cdn.example/blobs/\(digest.hex)?sig=abc&expires=1")
        #expect(cdnRequests.first?.headers["Authorization"] == nil)
        #expect(cdnRequests.first?.headers["Range"] == "bytes=100-")
        let registryBlobRequests = cache.registry.requests(host: "registry.test").filter { $0.url.contains("/blobs/\(digest)") }
        #expect(registryBlobRequests.map { $0.headers["Authorization"] } == [FakeRegistry.basicHeader("alice", password)])
    }

    @Test func redirectToTheSameHostKeepsAuthorization() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.basic(username: "alice", password: password))
        cache.registry.setRedirect(.sameHost)
        let source = try makeSource(credential: .basic(username: "alice", password: password), transport: cache.registry)
        // The config blob is redirected too.
        _ = try source.loadSnapshot()
        let digest = Digest.sha256(of: cache.layer1)
        let streamed = try stream(source, digest, from: 0)
        #expect(streamed.bytes == cache.layer1)
        let redirected = cache.registry.requests(pathContains: "/redirected-blobs/\(digest)")
        #expect(redirected.map(\.url) == ["https://registry.test/v2/team/cache/redirected-blobs/\(digest)"])
        #expect(redirected.first?.headers["Authorization"] == FakeRegistry.basicHeader("alice", password))
    }

    /// Within a bearer flow the CDN must not see the token either.
    @Test func redirectToAnotherHostDropsTheBearerToken() throws {
        let cache = IndexVariantCache()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: nil, password: nil, expiresIn: 300))
        cache.registry.setRedirect(.otherHost)
        let source = try makeSource(transport: cache.registry)
        _ = try source.loadSnapshot()
        let streamed = try stream(source, Digest.sha256(of: cache.layer1), from: 0)
        #expect(streamed.bytes == cache.layer1)
        let cdn = cache.registry.requests(host: FakeRegistry.cdnHost)
        #expect(cdn.count == 2, "config and layer")
        #expect(cdn.allSatisfy { $0.headers["Authorization"] == nil })
    }
}

// MARK: - Blobs and failures

@Suite("RegistrySource blobs and failures")
struct RegistrySourceBlobTests {
    @Test func streamFromZero() throws {
        let cache = IndexVariantCache()
        cache.registry.setChunkSize(7)
        let source = try makeSource(transport: cache.registry)
        let digest = Digest.sha256(of: cache.layer2)
        let result = try stream(source, digest, from: 0)
        #expect(result.starts == [0])
        #expect(result.bytes == cache.layer2)
        #expect(cache.registry.requests.map(\.url) == ["https://registry.test/v2/team/cache/blobs/\(digest)"])
        #expect(cache.registry.requests.first?.headers["Range"] == nil)
    }

    @Test(arguments: [1, 7, 1234, 2499])
    func streamFromAnOffset(_ offset: Int) throws {
        let cache = IndexVariantCache()
        cache.registry.setChunkSize(64)
        let source = try makeSource(transport: cache.registry)
        let result = try stream(source, Digest.sha256(of: cache.layer2), from: Int64(offset))
        #expect(result.starts == [Int64(offset)])
        #expect(result.bytes == Array(cache.layer2[offset...]))
        #expect(cache.registry.requests.first?.headers["Range"] == "bytes=\(offset)-")
    }

    @Test func serverIgnoringRangeStartsAtZero() throws {
        let cache = IndexVariantCache()
        cache.registry.setIgnoreRange(true)
        let source = try makeSource(transport: cache.registry)
        let result = try stream(source, Digest.sha256(of: cache.layer1), from: 500)
        #expect(result.starts == [0])
        #expect(result.bytes == cache.layer1)
        #expect(cache.registry.requests.first?.headers["Range"] == "bytes=500-")
    }

    @Test func missingBlobIsNotFound() throws {
        let cache = IndexVariantCache()
        let source = try makeSource(transport: cache.registry)
        let missing = Digest.sha256(of: Array("missing".utf8))
        var started = false
        let error = remoteError {
            try source.streamBlob(missing, from: 0, onStart: { _ in started = true }, onBody: { _ in
                Issue.record("an error body reached onBody")
            })
        }
        guard case .notFound(let message)? = error else {
            Issue.record("expected notFound, got \(String(describing: error))")
            return
        }
        #expect(!started)
        #expect(message.contains("BLOB_UNKNOWN"), "\(message)")
    }

    @Test func contentRangeStart() {
        #expect(RegistrySource.contentRangeStart("bytes 100-199/1000") == 100)
        #expect(RegistrySource.contentRangeStart("bytes 0-0/1") == 0)
        #expect(RegistrySource.contentRangeStart("bytes */1000") == nil)
        #expect(RegistrySource.contentRangeStart("items 1-2/3") == nil)
        #expect(RegistrySource.contentRangeStart(nil) == nil)
    }

    @Test func registryErrorSummary() {
        #expect(RegistrySource.registryErrorSummary(Array(#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#.utf8))
            == ": MANIFEST_UNKNOWN manifest unknown")
        #expect(RegistrySource.registryErrorSummary(Array("<html>oops</html>".utf8)) == "")
        #expect(RegistrySource.registryErrorSummary([]) == "")
        // Issue 13: the registry writes this text; it reaches the terminal escaped, in one line.
        #expect(RegistrySource.registryErrorSummary(Array(#"{"errors":[{"code":"DENIED","message":"no\u001b]0;owned\u0007\nmore"}]}"#.utf8))
            == #": DENIED no\x1b]0;owned\x07 more"#)
    }

    @Test func rangeAnswerStartingElsewhereIsInvalid() throws {
        let cache = IndexVariantCache()
        cache.registry.setRangeStartOverride(0)
        let source = try makeSource(transport: cache.registry)
        var started = false
        var received = 0
        let error = remoteError {
            try source.streamBlob(Digest.sha256(of: cache.layer1), from: 100, onStart: { _ in started = true },
                                  onBody: { received += $0.count })
        }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("100"), "\(message)")
        #expect(!started)
        #expect(received == 0)
    }

    @Test func redirectLoopIsRefused() throws {
        let cache = IndexVariantCache()
        cache.registry.setRedirect(.loop)
        let source = try makeSource(transport: cache.registry)
        let error = remoteError { _ = try stream(source, Digest.sha256(of: cache.layer1), from: 0) }
        // Not transient: a loop is not retried.
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("redirect"), "\(message)")
        #expect(cache.registry.requests.count == 6, "the first request and five redirects")
    }

    /// A registry that redirects to file:// or ftp:// must not get the transport to try them;
    /// the refusal is final (not transient), so nothing retries it.
    @Test(arguments: ["file:///etc/passwd", "ftp://cdn.example/blob", "FILE:///etc/shadow"])
    func redirectToANonHTTPSchemeIsRefusedWithoutFetchingIt(_ location: String) throws {
        let cache = IndexVariantCache()
        let source = try makeSource(transport: cache.registry)
        _ = try source.loadSnapshot()
        cache.registry.setRedirect(.location(location))
        let before = cache.registry.requests.count
        let error = remoteError { _ = try stream(source, Digest.sha256(of: cache.layer1), from: 0) }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(error?.isTransient == false)
        #expect(message.contains("redirect") && message.lowercased().contains(location.prefix(while: { $0 != ":" }).lowercased()),
                "\(message)")
        #expect(cache.registry.requests.dropFirst(before).map(\.url).allSatisfy { $0.hasPrefix("https://registry.test/") })
    }

    /// A URL the transport refuses to fetch (malformed, say) fails the same way every time: the
    /// small-document fetch, which retries transient failures, must ask only once.
    @Test func unfetchableRedirectTargetIsNotRetried() throws {
        let cache = IndexVariantCache()
        cache.registry.setRedirect(.otherHost)
        let transport = RefusingTransport(inner: cache.registry, refusedHost: FakeRegistry.cdnHost)
        let error = remoteError { _ = try makeSource(transport: transport).loadSnapshot() }
        guard case .invalidContent(let message)? = error else {
            Issue.record("expected invalidContent, got \(String(describing: error))")
            return
        }
        #expect(message.contains("malformed URL"), "\(message)")
        #expect(cache.registry.requests(host: FakeRegistry.cdnHost).count == 1, "asked again after a refusal")
    }

    /// Registry error messages are quoted into errors and warnings, which must stay one line
    /// ("One readable line per failure"); a registry may put newlines in its message.
    @Test func registryErrorMessagesStayOnOneLine() throws {
        let body = Array(#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown\nsecond line\r\nthird"}]}"#.utf8)
        let cache = IndexVariantCache()
        let faulty = FaultInjectingTransport(wrapping: cache.registry)
        faulty.inject(.status(404, body: body), urlContains: "/manifests/")
        let snapshot = try makeSource(transport: faulty).loadSnapshot()
        #expect(snapshot.warnings.count == 1)
        for warning in snapshot.warnings {
            #expect(!warning.contains("\n") && !warning.contains("\r"), "multi-line warning: \(warning)")
        }

        faulty.removeAllFaults()
        faulty.inject(.status(400, body: body), urlContains: "/blobs/")
        let error = remoteError { _ = try stream(try makeSource(transport: faulty), Digest.sha256(of: cache.layer1), from: 0) }
        expectClean(error, secrets: [])
        #expect(error.map { !$0.description.contains("\r") } ?? true)
    }

    @Test func transientServerErrorOnTheManifestIsRetried() throws {
        let cache = IndexVariantCache()
        let faulty = FaultInjectingTransport(wrapping: cache.registry)
        faulty.inject(.status(500, body: []), urlContains: "/manifests/", times: 1)
        let snapshot = try makeSource(transport: faulty).loadSnapshot()
        #expect(snapshot.tags.map(\.manifest.digest) == [cache.manifestDigest])
        #expect(faulty.requestCount(urlContains: "/manifests/buildcache") == 2)
        #expect(faulty.requests.first?.fault == .status(500, body: []))
    }

    @Test func persistentServerErrorGivesUpAfterThreeAttempts() throws {
        let cache = IndexVariantCache()
        let faulty = FaultInjectingTransport(wrapping: cache.registry)
        faulty.inject(.status(503, body: Array(#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#.utf8)), urlContains: "/manifests/")
        let error = remoteError { _ = try makeSource(transport: faulty).loadSnapshot() }
        guard case .server(let message)? = error else {
            Issue.record("expected server, got \(String(describing: error))")
            return
        }
        #expect(message.contains("503"), "\(message)")
        #expect(message.contains("UNAVAILABLE"), "\(message)")
        #expect(faulty.requestCount(urlContains: "/manifests/") == 3)
        expectClean(error, secrets: [])
    }

    @Test func connectionFailureIsATransportError() throws {
        let cache = IndexVariantCache()
        let faulty = FaultInjectingTransport(wrapping: cache.registry)
        faulty.inject(.failConnection)
        let error = remoteError {
            _ = try makeSource(credential: .basic(username: "alice", password: password), transport: faulty).loadSnapshot()
        }
        guard case .transport(let message)? = error else {
            Issue.record("expected transport, got \(String(describing: error))")
            return
        }
        #expect(message.contains("registry.test"), "\(message)")
        #expect(message.contains("connection failed"), "\(message)")
        expectClean(error, secrets: [password])
        #expect(faulty.requests.count == 3)
        #expect(cache.registry.requests.isEmpty)
    }

    @Test func connectionFailureWhileStreaming() throws {
        let cache = IndexVariantCache()
        let faulty = FaultInjectingTransport(wrapping: cache.registry)
        faulty.inject(.failConnection, urlContains: "/blobs/")
        let error = remoteError { _ = try stream(try makeSource(transport: faulty), Digest.sha256(of: cache.layer1), from: 0) }
        guard case .transport? = error else {
            Issue.record("expected transport, got \(String(describing: error))")
            return
        }
        expectClean(error, secrets: [])
    }

    @Test func isTransient() {
        #expect(RemoteStoreError.server("x").isTransient)
        #expect(RemoteStoreError.transport("x").isTransient)
        #expect(!RemoteStoreError.notFound("x").isTransient)
        #expect(!RemoteStoreError.unauthorized("x").isTransient)
        #expect(!RemoteStoreError.invalidContent("x").isTransient)
        #expect(!RemoteStoreError.configuration("x").isTransient)
    }

    /// A reference whose host cannot make a URL must fail as a configuration error, never
    /// trap: `RegistrySource.init` force-unwraps `URL(string: scheme://apiHost)`. The first
    /// argument is a control that must pass.
    @Test(arguments: ["registry.example.com/x", "a b.example.com/x", "reg.example.com:abc/x", "[::1/x"])
    func unusableHostDoesNotTrap(_ text: String) async {
        await #expect(processExitsWith: .success) { [text] in
            if let reference = try? RegistryReference(parsing: text) {
                _ = RegistrySource(reference: reference, insecure: false, credential: nil,
                                   transport: FakeRegistry(repository: "x"), timeout: .seconds(1),
                                   logger: Logger(label: "exit-test") { _ in SwiftLogNoOpLogHandler() })
            }
        }
    }
}

/// Throws what CurlTransport throws for a malformed URL for every request to `refusedHost`
/// (after recording it in the inner fake), and passes the rest through.
private struct RefusingTransport: HTTPTransport {
    let inner: FakeRegistry
    let refusedHost: String

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        guard URLComponents(string: request.url)?.host == refusedHost else {
            return try inner.execute(request, onResponse: onResponse, onBody: onBody)
        }
        try inner.execute(request, onResponse: { _ in }, onBody: { _ in })
        throw HTTPTransportError.invalidRequest("malformed URL: Port number was not a decimal number between 0 and 65535")
    }
}

/// Holds requests whose URL contains `gated` until `width` of them are in flight at once (or a
/// bounded wait passes), recording the most seen at once.
private final class ConcurrencyGate: HTTPTransport, Sendable {
    let inner: any HTTPTransport
    let gated: String
    let width: Int
    private let running = Mutex((now: 0, most: 0))

    init(inner: any HTTPTransport, gated: String, waitingFor width: Int) {
        self.inner = inner
        self.gated = gated
        self.width = width
    }

    var mostAtOnce: Int { running.withLock { $0.most } }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        guard request.url.contains(gated) else { return try inner.execute(request, onResponse: onResponse, onBody: onBody) }
        running.withLock { state in
            state.now += 1
            state.most = max(state.most, state.now)
        }
        defer { running.withLock { $0.now -= 1 } }
        for _ in 0..<2_500 where mostAtOnce < width { SystemThread.sleep(for: .milliseconds(2)) }
        try inner.execute(request, onResponse: onResponse, onBody: onBody)
    }
}
