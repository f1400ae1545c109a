import Foundation
import HTTPClient
import Logging
import OCI
import RemoteStore
import Synchronization
import Testing

// RegistryPublisher against Debian's docker-registry: BuildKit caches of both registry
// variants (written by seed_cache.py into one repository, as a mount would hold them in its
// cache) are published to another and read back with RegistrySource, byte for byte.

private let quietLogger = Logger(label: "RegistryPublishingTests") { _ in SwiftLogNoOpLogHandler() }

/// A cache as a writable mount holds it before publishing: every blob in a file of its own,
/// and the tag's manifest.
private struct ExportedCache {
    var manifest: Descriptor
    var manifestBytes: [UInt8]
    /// Every blob the manifest references, with the file that holds it.
    var blobs: [(descriptor: Descriptor, path: String)]

    /// Seeds `variant` into `repository` with seed_cache.py, then reads it back into files.
    static func seeded(in ws: Workspace, registry: Registry, repository: String, variant: String, seed: Int,
                       credential: RegistryCredential? = nil, user: String? = nil, password: String? = nil) async throws -> ExportedCache {
        let summary = try await ws.seed(registry, repo: repository, variant: variant, layers: 3, layerSize: 400_000,
                                        seed: seed, user: user, password: password)
        let source = try makeSource(registry, "\(repository):main", credential: credential)
        let snapshot = try source.loadSnapshot()
        let directory = try ws.makeDirectory("exported-\(ws.nextID())")
        var blobs: [(Descriptor, String)] = []
        for blob in summary.blobs where blob.role != "manifest" {
            let digest = try #require(Digest(blob.digest))
            let bytes = try snapshot.smallBlobs[digest] ?? read(source, digest)
            let path = directory + "/" + blob.hex
            #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            blobs.append((Descriptor(mediaType: blob.mediaType, digest: digest, size: blob.size), path))
        }
        let manifestDigest = try #require(Digest(summary.manifest.digest))
        return ExportedCache(manifest: Descriptor(mediaType: summary.manifest.mediaType, digest: manifestDigest, size: summary.manifest.size),
                             manifestBytes: try #require(snapshot.smallBlobs[manifestDigest]), blobs: blobs)
    }

    func publishBlobs(_ publisher: RegistryPublisher) throws -> [BlobPublication] {
        try blobs.map { try publisher.publishBlob($0.descriptor.digest, size: $0.descriptor.size, contentsAt: $0.path) }
    }

    func publishTag(_ publisher: RegistryPublisher, _ tag: String = "main") throws {
        try publisher.publishTag(tag, manifest: manifest, manifestBytes: manifestBytes, smallBlob: { _ in nil })
    }

    /// The tag in `repository` names this manifest, and every blob reads back byte for byte.
    func expectPublished(_ registry: Registry, _ repository: String, credential: RegistryCredential? = nil,
                         sourceLocation: SourceLocation = #_sourceLocation) throws {
        let source = try makeSource(registry, "\(repository):main", credential: credential)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.map(\.manifest.digest) == [manifest.digest], sourceLocation: sourceLocation)
        #expect(snapshot.smallBlobs[manifest.digest] == manifestBytes, sourceLocation: sourceLocation)
        #expect(Set(snapshot.smallBlobs.keys).union(snapshot.lazyBlobs.keys) == Set(blobs.map(\.descriptor.digest) + [manifest.digest]),
                sourceLocation: sourceLocation)
        for (descriptor, path) in blobs {
            let expected = try #require(FileManager.default.contents(atPath: path), sourceLocation: sourceLocation)
            #expect(try read(source, descriptor.digest) == Array(expected), "blob \(descriptor.digest)", sourceLocation: sourceLocation)
            if let small = snapshot.smallBlobs[descriptor.digest] {
                #expect(small == Array(expected), "config \(descriptor.digest)", sourceLocation: sourceLocation)
            }
        }
    }
}

private func makeSource(_ registry: Registry, _ repositoryAndTag: String, credential: RegistryCredential? = nil) throws -> RegistrySource {
    RegistrySource(reference: try RegistryReference(parsing: "\(registry.host)/\(repositoryAndTag)"), insecure: false,
                   credential: credential, transport: CurlTransport(), timeout: .seconds(30), logger: quietLogger)
}

private func makePublisher(_ registry: Registry, _ repository: String, transport: any HTTPTransport,
                           mountFrom: [String] = [], credential: RegistryCredential? = nil) throws -> RegistryPublisher {
    // Small limits, so that the layers (about 400 kB) go up in chunks and the configs whole.
    RegistryPublisher(reference: try RegistryReference(parsing: "\(registry.host)/\(repository)"), insecure: false,
                      credential: credential, mountFrom: mountFrom, monolithicLimit: 64 << 10, chunkSize: 150_000,
                      transport: transport, timeout: .seconds(30), logger: quietLogger)
}

private func read(_ source: RegistrySource, _ digest: Digest) throws -> [UInt8] {
    var bytes: [UInt8] = []
    try source.streamBlob(digest, from: 0, onStart: { #expect($0 == 0) }, onBody: { bytes.append(contentsOf: $0) })
    return bytes
}

@Suite("Publishing to docker-registry")
struct RegistryPublishingTests {
    @Test("both BuildKit variants are published and read back byte for byte", arguments: ["index", "manifest"])
    func publishesAndReadsBack(variant: String) async throws {
        try await withWorkspace("publish-\(variant)") { ws in
            let registry = try await ws.startRegistry()
            let cache = try await ExportedCache.seeded(in: ws, registry: registry, repository: "origin", variant: variant, seed: 1)
            let network = RecordingTransport(wrapping: CurlTransport())
            let publisher = try makePublisher(registry, "published", transport: network)

            let publications = try cache.publishBlobs(publisher)
            #expect(publications == cache.blobs.map { .uploaded(bytes: $0.descriptor.size) })
            // Layers went up in PATCHed chunks, the configs in one PUT each.
            let layers = cache.blobs.filter { $0.descriptor.size > 64 << 10 }
            #expect(layers.count == 3)
            #expect(network.count("PATCH") == layers.map { Int(($0.descriptor.size + 149_999) / 150_000) }.reduce(0, +))
            #expect(network.count("PUT") == cache.blobs.count)
            #expect(network.bodyBytes == cache.blobs.map(\.descriptor.size).reduce(0, +), "every byte sent once")
            #expect(network.exchanges.allSatisfy { $0.status.map { (200..<300).contains($0) || $0 == 404 } ?? false },
                    "only HEADs of absent blobs may be refused: \(network.exchanges.filter { $0.status.map { $0 >= 300 } ?? true }.map(\.url))")

            try cache.publishTag(publisher)
            try cache.expectPublished(registry, "published")

            // Published again: HEADs only, not one byte sent.
            network.reset()
            #expect(try cache.publishBlobs(publisher) == cache.blobs.map { _ in .alreadyPresent })
            #expect(network.exchanges.map(\.method) == cache.blobs.map { _ in "HEAD" })
            #expect(network.bodyBytes == 0)
        }
    }

    @Test func blobsAreMountedFromAnotherRepository() async throws {
        try await withWorkspace("publish-mount") { ws in
            let registry = try await ws.startRegistry()
            let cache = try await ExportedCache.seeded(in: ws, registry: registry, repository: "origin", variant: "index", seed: 2)
            let network = RecordingTransport(wrapping: CurlTransport())
            let publisher = try makePublisher(registry, "mounted", transport: network, mountFrom: ["origin"])

            #expect(try cache.publishBlobs(publisher) == cache.blobs.map { _ in .mountedFromRepository("origin") })
            #expect(network.bodyBytes == 0)
            #expect(network.count("PATCH") + network.count("PUT") == 0)
            // The index variant is accepted only when its blobs are in the repository: mounted, they are.
            try cache.publishTag(publisher)
            try cache.expectPublished(registry, "mounted")
        }
    }

    @Test func pushTokensCoverTheRepositoryAndTheOneMountedFrom() async throws {
        try await withWorkspace("publish-token") { ws in
            let issuer = try await ws.startTokenIssuer(user: "alice", password: "pw")
            let registry = try await ws.startRegistry(auth: .token(issuer.endpoint))
            let login = RegistryCredential.basic(username: "alice", password: "pw")
            let origin = try await ExportedCache.seeded(in: ws, registry: registry, repository: "origin", variant: "index", seed: 3,
                                                        credential: login, user: "alice", password: "pw")
            let fresh = try await ExportedCache.seeded(in: ws, registry: registry, repository: "elsewhere", variant: "manifest",
                                                       seed: 4, credential: login, user: "alice", password: "pw")
            let publisher = try makePublisher(registry, "team/published", transport: CurlTransport(), mountFrom: ["origin"],
                                              credential: login)

            #expect(try origin.publishBlobs(publisher) == origin.blobs.map { _ in .mountedFromRepository("origin") })
            #expect(try fresh.publishBlobs(publisher) == fresh.blobs.map { .uploaded(bytes: $0.descriptor.size) })
            try fresh.publishTag(publisher)
            try fresh.expectPublished(registry, "team/published", credential: login)
        }
    }

    @Test func tagIsReplacedOnlyWhenTheNewManifestIsTaken() async throws {
        try await withWorkspace("publish-replace") { ws in
            let registry = try await ws.startRegistry()
            let old = try await ExportedCache.seeded(in: ws, registry: registry, repository: "origin-old", variant: "index", seed: 5)
            let new = try await ExportedCache.seeded(in: ws, registry: registry, repository: "origin-new", variant: "manifest", seed: 6)
            let network = FaultInjectingTransport(wrapping: CurlTransport())
            let publisher = try makePublisher(registry, "published", transport: network)
            _ = try old.publishBlobs(publisher)
            try old.publishTag(publisher)
            try old.expectPublished(registry, "published")

            // The new manifest before its blobs: the registry refuses it, at once and in one line.
            let refused = try #require(throws: RemoteStoreError.self) { try new.publishTag(publisher) }
            #expect(!refused.isTransient)
            #expect(refused.description.contains("MANIFEST_BLOB_UNKNOWN"), "\(refused)")
            #expect(refused.description.contains(new.manifest.digest.description))
            #expect(!refused.description.contains("\n"))
            #expect(network.requestCount(method: "PUT", urlContains: "/manifests/") == 2)
            try old.expectPublished(registry, "published")

            // Its blobs published, but every manifest PUT failing: the old tag stays.
            _ = try new.publishBlobs(publisher)
            network.inject(.status(500, body: []), method: "PUT", urlContains: "/manifests/")
            let failing = try #require(throws: RemoteStoreError.self) { try new.publishTag(publisher) }
            #expect(failing.isTransient)
            #expect(network.requestCount(method: "PUT", urlContains: "/manifests/") == 2 + RegistryPublisher.attempts)
            try old.expectPublished(registry, "published")

            network.removeAllFaults()
            try new.publishTag(publisher)
            try new.expectPublished(registry, "published")
        }
    }

    @Test func chunkThatFailedIsResumedWhereTheRegistryStands() async throws {
        try await withWorkspace("publish-resume") { ws in
            let registry = try await ws.startRegistry()
            let cache = try await ExportedCache.seeded(in: ws, registry: registry, repository: "origin", variant: "manifest", seed: 7)
            let network = FaultInjectingTransport(wrapping: CurlTransport())
            let recorder = RecordingTransport(wrapping: network)
            let publisher = try makePublisher(registry, "published", transport: recorder)
            let layer = try #require(cache.blobs.first { $0.descriptor.size > 2 * 150_000 })
            // The second chunk's connection fails: the registry holds the first, and says so.
            network.inject(.failConnection, times: 1) { request in
                request.method == "PATCH" && request.headers["Content-Range"] == "150000-299999"
            }

            let publication = try publisher.publishBlob(layer.descriptor.digest, size: layer.descriptor.size, contentsAt: layer.path)
            #expect(publication == .uploaded(bytes: layer.descriptor.size))
            #expect(recorder.count("POST") == 1, "the upload started over instead of resuming")
            #expect(recorder.count("GET") == 1)
            let ranges = recorder.exchanges.filter { $0.method == "PATCH" }.compactMap(\.contentRange)
            #expect(ranges.prefix(3) == ["0-149999", "150000-299999", "150000-299999"])
            let source = try makeSource(registry, "published:main")
            let expected = try #require(FileManager.default.contents(atPath: layer.path))
            #expect(try read(source, layer.descriptor.digest) == Array(expected))
        }
    }
}
