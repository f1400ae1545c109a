import Foundation
import HTTPClient
import OCI
import Testing

@testable import RemoteStore

/// Documents BuildKit wrote (the fixtures kept in Fuzz/corpus; their digests are checked in
/// OCITests/BuildKitS3CacheTests).
private enum Fixture {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Fuzz/corpus").standardized

    static func read(_ path: String) throws -> [UInt8] { Array(try Data(contentsOf: corpus.appendingPathComponent(path))) }

    /// v0.11.6: the index variant pushed to a registry (= the local export's manifest), its
    /// cache config, and the S3 object the same build exported to S3.
    static var indexV0116: [UInt8] { get throws { try read("manifest/v0.11.6-index-variant.json") } }
    static var configV0116: [UInt8] { get throws { try read("cache-config/v0.11.6.json") } }
    static var s3ObjectV0116: [UInt8] { get throws { try read("s3-cache-config/v0.11.6-main.json") } }
    /// v0.32.2: the image-manifest variant and its cache config.
    static var imageManifestV0322: [UInt8] { get throws { try read("manifest/v0.32.2-image-manifest.json") } }
    static var configV0322: [UInt8] { get throws { try read("cache-config/v0.32.2.json") } }
}

private let source = "bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true"

@Suite("S3 manifest objects: shown as BuildKit's index variant, written from a local export")
struct S3ManifestObjectTests {
    /// What the mount shows for BuildKit's own S3 object is the index BuildKit v0.11.6 pushed to
    /// a registry for the same build, byte for byte, but for the cache-config descriptor: on S3
    /// the config is the object itself (the config with its layer annotations).
    @Test func buildKitsS3ObjectIsShownAsTheIndexBuildKitWrites() throws {
        let object = try Fixture.s3ObjectV0116
        let synthesized = try S3Source.synthesizeManifest(fromCacheConfig: object, name: "main", source: "s3://test", key: "manifests/main") { blob throws(RemoteStoreError) in
            throw .notFound("no HEAD expected for \(blob)")
        }
        let registryConfig = "{\"mediaType\":\"application/vnd.buildkit.cacheconfig.v0\",\"digest\":\"\(Digest.sha256(of: try Fixture.configV0116))\",\"size\":1471}"
        let objectConfig = "{\"mediaType\":\"application/vnd.buildkit.cacheconfig.v0\",\"digest\":\"\(Digest.sha256(of: object))\",\"size\":\(object.count)}"
        let registryIndex = String(decoding: try Fixture.indexV0116, as: UTF8.self)
        #expect(registryIndex.contains(registryConfig))
        #expect(String(decoding: synthesized.bytes, as: UTF8.self) == registryIndex.replacing(registryConfig, with: objectConfig))
        #expect(synthesized.digest == Digest.sha256(of: synthesized.bytes))
    }

    /// A local export of either variant, converted as the publisher converts it and stored at
    /// manifests/main, is read back by S3Source with the same layers (digest, size, media type,
    /// diffID, creation time, in order) and a config with the same layer chains.
    @Test(arguments: ["v0.11.6 index variant", "v0.32.2 image-manifest variant"])
    func aConvertedExportReadsBackWithTheSameLayersAndConfig(_ variant: String) throws {
        let (manifestBytes, config) = variant.hasPrefix("v0.11.6")
            ? (try Fixture.indexV0116, try Fixture.configV0116) : (try Fixture.imageManifestV0322, try Fixture.configV0322)
        let manifest = Descriptor(mediaType: "", digest: Digest.sha256(of: manifestBytes), size: Int64(manifestBytes.count))
        let object = try S3Publisher.manifestObject(tag: "main", manifest: manifest, manifestBytes: manifestBytes,
                                                    smallBlob: { $0 == Digest.sha256(of: config) ? config : nil }, source: "s3://test")
        let local = try BuildKitS3Cache.parts(of: ManifestContent.parse(manifestBytes))

        let fake = FakeS3(bucket: "cache", objects: ["manifests/main": object])
        let snapshot = try makeS3Source(source, transport: fake).loadSnapshot()
        #expect(snapshot.tags.map(\.tag) == ["main"])
        let shown = try BuildKitS3Cache.parts(of: ManifestContent.parse(#require(snapshot.smallBlobs[snapshot.tags[0].manifest.digest])))
        #expect(shown.layers == local.layers)
        #expect(shown.cacheConfig.digest == Digest.sha256(of: object) && snapshot.smallBlobs[shown.cacheConfig.digest] == object)
        #expect(CacheChains.successors(inConfig: object) == CacheChains.successors(inConfig: config))
        for layer in local.layers { #expect(snapshot.lazyBlobs[layer.digest] == layer.size) }
        #expect(fake.requests.map(\.method) == ["GET"], "the sizes come from the annotations, no HEAD: \(fake.requests.map(\.url))")
    }

    /// What BuildKit's S3 cache cannot hold is refused in one line naming the tag and why.
    @Test func unpublishableManifestsAreRefusedInOneLine() throws {
        let manifestBytes = try Fixture.indexV0116
        let config = try Fixture.configV0116
        let configDigest = Digest.sha256(of: config)
        func describing(_ bytes: [UInt8]) -> Descriptor {
            Descriptor(mediaType: MediaType.ociIndex, digest: Digest.sha256(of: bytes), size: Int64(bytes.count))
        }
        let withoutDiffID = Array(String(decoding: manifestBytes, as: UTF8.self)
            .replacing(#","containerd.io/uncompressed":"sha256:c8e827cf4fc32aca16d59da2e641dd1dfed1b8635e7228e5cbf7edf5d3c9f855""#, with: "").utf8)
        #expect(withoutDiffID != manifestBytes)
        let plainImage = Array(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"\#(configDigest)","size":1471},"layers":[]}"#.utf8)
        let cases: [(String, [UInt8], [UInt8]?, String)] = [
            ("main", Array(manifestBytes.dropLast()) + [0x20], config, "not that manifest"),
            ("main", withoutDiffID, config, "sha256:ba76f0633504fad6b3a6de95d9ced352d97ab6c4c87db44a1435bb0f50a97fe4 has no containerd.io/uncompressed"),
            ("main", manifestBytes, nil, "cache config \(configDigest) is not available"),
            ("main", manifestBytes, Array(config.dropLast()), "are not that blob"),
            ("main", plainImage, config, "not a BuildKit cache"),
            ("main", Array("{".utf8), config, "malformed manifest JSON"),
            ("../escape", manifestBytes, config, "not a usable key"),
            ("", manifestBytes, config, "not a usable key"),
        ]
        for (tag, bytes, configBytes, reason) in cases {
            #expect {
                let manifest = reason == "not that manifest" ? describing(manifestBytes) : describing(bytes)
                return try S3Publisher.manifestObject(tag: tag, manifest: manifest, manifestBytes: bytes,
                                               smallBlob: { $0 == configDigest ? configBytes : nil }, source: "s3://b/manifests/ at x")
            } throws: { error in
                guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
                return message.contains("tag \(tag):") && message.contains(reason) && !message.contains("\n")
            }
        }
    }

    /// BuildKit writes Go's zero time for a layer without a creation time, and its importer
    /// leaves it out; a layer claiming the cache config's media type would pass for the config.
    @Test func zeroCreationTimesAreLeftOutAndConfigImpostorsRefused() throws {
        let blob = Digest.sha256(of: [1]), diffID = Digest.sha256(of: [2])
        func object(mediaType: String, createdAt: String) -> [UInt8] {
            Array(#"{"layers":[{"blob":"\#(blob)","parent":-1,"annotations":{"mediaType":"\#(mediaType)","diffID":"\#(diffID)","size":1,"createdAt":"\#(createdAt)"}}]}"#.utf8)
        }
        let synthesized = try S3Source.synthesizeManifest(fromCacheConfig: object(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", createdAt: "0001-01-01T00:00:00Z"),
                                                          name: "main", source: "s3://test", key: "manifests/main") { _ throws(RemoteStoreError) in 1 }
        #expect(synthesized.layers.map(\.annotations) == [[Annotation.uncompressed: diffID.description]])
        #expect {
            try S3Source.synthesizeManifest(fromCacheConfig: object(mediaType: MediaType.buildkitCacheConfig, createdAt: "2025-06-01T10:00:00Z"),
                                            name: "main", source: "s3://test", key: "manifests/main") { _ throws(RemoteStoreError) in 1 }
        } throws: { error in
            guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
            return message.contains("\(blob)") && message.contains("cache config's media type")
        }
    }
}
