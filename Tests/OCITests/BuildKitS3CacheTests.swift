import Foundation
import Testing
@testable import OCI

@Suite("BuildKit's S3 manifest object and cache manifests")
struct BuildKitS3CacheTests {
    private func parts(_ manifest: [UInt8]) throws -> (layers: [Descriptor], cacheConfig: Descriptor) {
        try BuildKitS3Cache.parts(of: ManifestContent.parse(manifest))
    }

    /// The corpus copies are the fixture's blobs (their digests are the names BuildKit gave them).
    @Test func theDocumentsAreBuildKits() throws {
        #expect(Digest.sha256(of: try BuildKitDocuments.localIndexV0116).hex == "b2e4eecc3cd21997ba72f78341a56fa73b9ec5191081c18294361db3225283bf")
        #expect(Digest.sha256(of: try BuildKitDocuments.localConfigV0116).hex == "6f5d555f38be962509a7492cbf25f08f8e4fce8ac760cc7367ba31820bde769f")
        #expect(Digest.sha256(of: try BuildKitDocuments.localImageManifestV0322).hex == "8abca3a158496a608cf3f4ebf1167b0a703eef273ca351ae6f79267d1c79ddbe")
        #expect(Digest.sha256(of: try BuildKitDocuments.localConfigV0322).hex == "35ad4a4941b2e2d651dd1cda6b5bbe67db29bc1f0b14f0b5b34deef2fa0bdd4f")
    }

    /// The index variant is written exactly as BuildKit v0.11.6 wrote the fixture's: member
    /// order, annotations on the layers, the cache-config descriptor last without annotations.
    @Test func indexManifestIsWrittenAsBuildKitWritesIt() throws {
        let fixture = try BuildKitDocuments.localIndexV0116
        let (layers, config) = try parts(fixture)
        #expect(layers.count == 5)
        #expect(config == Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: try BuildKitDocuments.localConfigV0116), size: 1471))
        #expect(BuildKitS3Cache.indexManifest(layers: layers, cacheConfig: config) == fixture)
    }

    /// BuildKit v0.11.6 exported the same build to a local directory and to S3: converting the
    /// local export gives its S3 object. Compared field by field: `layers` (per layer `blob`,
    /// `parent`, and the annotations `mediaType`, `diffID`, `size`, `createdAt`) and `records`
    /// (every member); then byte for byte.
    @Test func theLocalExportConvertsToBuildKitsS3Object() throws {
        let local = try parts(BuildKitDocuments.localIndexV0116)
        let converted = try BuildKitS3Cache.manifestObject(cacheConfig: BuildKitDocuments.localConfigV0116, layers: local.layers)
        let mine = try OrderedJSON.parse(converted)
        let buildkits = try OrderedJSON.parse(BuildKitDocuments.s3ObjectV0116)

        let myLayers = try #require(mine["layers"]?.arrayValue)
        let theirLayers = try #require(buildkits["layers"]?.arrayValue)
        #expect(myLayers.count == theirLayers.count && myLayers.count == 5)
        for (my, their) in zip(myLayers, theirLayers) {
            #expect(my["blob"] == their["blob"])
            #expect(my["parent"] == their["parent"])
            for field in ["mediaType", "diffID", "size", "createdAt"] {
                #expect(my["annotations"]?[field] != nil && my["annotations"]?[field] == their["annotations"]?[field],
                        "\(field) of \(their["blob"]?.stringValue ?? "?")")
            }
        }
        #expect(mine["records"] != nil && mine["records"] == buildkits["records"])
        #expect(converted == (try BuildKitDocuments.s3ObjectV0116))
    }

    /// The image-manifest variant (v0.32.2's default) converts the same way: its layers'
    /// descriptors annotate the config's layers; the rest of the config is kept as it was.
    @Test func theImageManifestVariantConvertsToo() throws {
        let local = try parts(BuildKitDocuments.localImageManifestV0322)
        let config = try BuildKitDocuments.localConfigV0322
        #expect(local.cacheConfig.digest == Digest.sha256(of: config))
        let converted = try OrderedJSON.parse(BuildKitS3Cache.manifestObject(cacheConfig: config, layers: local.layers))
        let original = try OrderedJSON.parse(config)
        #expect(converted["records"] == original["records"])
        let layers = try #require(converted["layers"]?.arrayValue)
        let originalLayers = try #require(original["layers"]?.arrayValue)
        #expect(layers.count == 3)
        for (layer, originalLayer) in zip(layers, originalLayers) {
            let descriptor = try #require(local.layers.first { $0.digest.description == layer["blob"]?.stringValue })
            // Only `annotations` was added.
            #expect(layer.setting("annotations", to: .null) == originalLayer.setting("annotations", to: .null))
            #expect(layer["annotations"] == .object([
                .init("mediaType", .string(descriptor.mediaType)),
                .init("diffID", .string(descriptor.annotations?[Annotation.uncompressed] ?? "?")),
                .init("size", .number(String(descriptor.size))),
                .init("createdAt", .string(descriptor.annotations?[Annotation.buildkitCreatedAt] ?? "?")),
            ]))
        }
        // The chains the mount prefetches along are the same.
        #expect(CacheChains.successors(inConfig: converted.serialized) == CacheChains.successors(inConfig: config))
    }

    @Test func aLayerWithoutDiffIDIsRefused() throws {
        var (layers, _) = try parts(BuildKitDocuments.localIndexV0116)
        layers[2].annotations?[Annotation.uncompressed] = nil
        #expect {
            try BuildKitS3Cache.manifestObject(cacheConfig: BuildKitDocuments.localConfigV0116, layers: layers)
        } throws: { error in
            let message = (error as? ManifestError)?.description ?? ""
            return message.contains("\(layers[2].digest)") && message.contains("diffID") && !message.contains("\n")
        }
        layers[2].annotations?[Annotation.uncompressed] = "sha256:not-a-digest"
        #expect(throws: ManifestError.self) {
            try BuildKitS3Cache.manifestObject(cacheConfig: BuildKitDocuments.localConfigV0116, layers: layers)
        }
    }

    @Test func aConfigLayerTheManifestDoesNotDescribeIsRefused() throws {
        let (layers, _) = try parts(BuildKitDocuments.localIndexV0116)
        #expect {
            try BuildKitS3Cache.manifestObject(cacheConfig: BuildKitDocuments.localConfigV0116, layers: Array(layers.dropLast()))
        } throws: { error in
            (error as? ManifestError)?.description.contains("\(layers.last!.digest) is not in the manifest") == true
        }
        #expect(throws: ManifestError.self) {
            try BuildKitS3Cache.manifestObject(cacheConfig: Array(#"{"records":[]}"#.utf8), layers: layers)
        }
        #expect(throws: ManifestError.self) {
            try BuildKitS3Cache.manifestObject(cacheConfig: Array(#"{"layers":[{"parent":-1}]}"#.utf8), layers: layers)
        }
        #expect(throws: ManifestError.self) {
            try BuildKitS3Cache.manifestObject(cacheConfig: Array("not json".utf8), layers: layers)
        }
    }

    /// A manifest without a cache config (an inline cache, a plain image index) is no BuildKit
    /// cache manifest.
    @Test func manifestsWithoutACacheConfigAreRefused() throws {
        let digest = Digest.sha256(of: [1])
        let plainImage = ManifestContent.image(mediaType: MediaType.ociManifest,
                                               config: Descriptor(mediaType: MediaType.ociConfig, digest: digest, size: 1), layers: [])
        let plainIndex = ManifestContent.index(mediaType: MediaType.ociIndex,
                                               manifests: [Descriptor(mediaType: MediaType.ociManifest, digest: digest, size: 1)])
        for manifest in [plainImage, plainIndex] {
            #expect { try BuildKitS3Cache.parts(of: manifest) } throws: { error in
                (error as? ManifestError)?.description.contains("not a BuildKit cache") == true
            }
        }
    }
}
