import Foundation
import Testing
@testable import OCI

/// A small layout in memory: documents by digest, and descriptors for them.
private struct Layout {
    var documents: [Digest: [UInt8]] = [:]
    var reads: [Digest] = []

    mutating func add(_ text: String, _ mediaType: String) -> Descriptor {
        let bytes = Array(text.utf8)
        let digest = Digest.sha256(of: bytes)
        documents[digest] = bytes
        return Descriptor(mediaType: mediaType, digest: digest, size: Int64(bytes.count))
    }

    static func layer(_ name: String) -> Descriptor {
        Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: Digest.sha256(of: Array(name.utf8)), size: 1000)
    }

    static func json(_ descriptor: Descriptor) -> String {
        #"{"mediaType":"\#(descriptor.mediaType)","digest":"\#(descriptor.digest)","size":\#(descriptor.size)}"#
    }

    static func index(_ entries: [(String?, Descriptor)]) -> [UInt8] {
        let manifests = entries.map { tag, descriptor in
            var object = json(descriptor)
            if let tag { object = String(object.dropLast()) + #","annotations":{"org.opencontainers.image.ref.name":"\#(tag)"}}"# }
            return object
        }
        return Array(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[\#(manifests.joined(separator: ","))]}"#.utf8)
    }

    /// BuildKit's image-manifest variant: the cache config as config, the layers.
    mutating func imageManifest(config: Descriptor, layers: [Descriptor]) -> Descriptor {
        add(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":\#(Self.json(config)),"layers":[\#(layers.map(Self.json).joined(separator: ","))]}"#,
            MediaType.ociManifest)
    }

    /// A cache config chaining `layers` in order.
    mutating func cacheConfig(_ layers: [Descriptor]) -> Descriptor {
        let entries = layers.enumerated().map { index, layer in
            #"{"blob":"\#(layer.digest)","parent":\#(index - 1)}"#
        }
        return add(#"{"layers":[\#(entries.joined(separator: ","))],"records":[]}"#, MediaType.buildkitCacheConfig)
    }

    func plan(_ index: [UInt8], tags: [String] = [], chain: Digest? = nil) throws(ManifestError) -> [Digest] {
        try PrefetchPlan(index: index, tags: tags, chainEndingAt: chain) { descriptor in
            guard let bytes = documents[descriptor.digest] else { throw ManifestError("no such blob") }
            return bytes
        }.blobs.map(\.digest)
    }
}

@Suite("PrefetchPlan: the blobs a layout's tags reach")
struct PrefetchPlanTests {
    @Test func everyTagsManifestConfigAndLayersOnceEach() throws {
        var layout = Layout()
        let (l1, l2, l3) = (Layout.layer("1"), Layout.layer("2"), Layout.layer("3"))
        let mainConfig = layout.cacheConfig([l1, l2])
        let main = layout.imageManifest(config: mainConfig, layers: [l1, l2])
        let branchConfig = layout.cacheConfig([l1, l3])
        let branch = layout.imageManifest(config: branchConfig, layers: [l1, l3])
        let index = Layout.index([("main", main), ("pr-1", branch)])

        #expect(try layout.plan(index) == [main.digest, mainConfig.digest, l1.digest, l2.digest,
                                           branch.digest, branchConfig.digest, l3.digest], "a shared layer once")
        #expect(try layout.plan(index, tags: ["pr-1"]) == [branch.digest, branchConfig.digest, l1.digest, l3.digest])
    }

    @Test func theIndexVariantsEntriesAndChildManifestsAreFollowed() throws {
        var layout = Layout()
        let (l1, l2) = (Layout.layer("1"), Layout.layer("2"))
        let config = layout.cacheConfig([l1, l2])
        let cacheIndex = layout.add(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[\#(Layout.json(l1)),\#(Layout.json(l2)),\#(Layout.json(config))]}"#,
                                    MediaType.ociIndex)
        #expect(try layout.plan(Layout.index([("cache", cacheIndex)])) == [cacheIndex.digest, l1.digest, l2.digest, config.digest])

        let image = layout.imageManifest(config: config, layers: [l1])
        let multi = layout.add(#"{"schemaVersion":2,"manifests":[\#(Layout.json(image))]}"#, MediaType.ociIndex)
        #expect(try layout.plan(Layout.index([(nil, multi)])) == [multi.digest, image.digest, config.digest, l1.digest],
                "an untagged entry is followed when no tag is asked for; a child manifest is read")
    }

    @Test func aChainIsTheLayersUpToTheOneNamedBaseFirst() throws {
        var layout = Layout()
        let (l1, l2, l3) = (Layout.layer("1"), Layout.layer("2"), Layout.layer("3"))
        let config = layout.cacheConfig([l1, l2, l3])
        let manifest = layout.imageManifest(config: config, layers: [l1, l2, l3])
        let index = Layout.index([("main", manifest)])
        #expect(try layout.plan(index, chain: l2.digest) == [l1.digest, l2.digest])
        #expect(try layout.plan(index, tags: ["main"], chain: l3.digest) == [l1.digest, l2.digest, l3.digest])

        let message = #expect(throws: ManifestError.self) { try layout.plan(index, chain: Layout.layer("elsewhere").digest) }?.description
        #expect(message?.contains("is in no cache chain of any tag") == true, "\(message ?? "")")
    }

    @Test func anUnknownTagOrAnUnreadableManifestIsOneClearError() throws {
        var layout = Layout()
        let config = layout.cacheConfig([Layout.layer("1")])
        let manifest = layout.imageManifest(config: config, layers: [Layout.layer("1")])
        let index = Layout.index([("main", manifest)])
        let unknown = #expect(throws: ManifestError.self) { try layout.plan(index, tags: ["nope"]) }?.description ?? ""
        #expect(unknown == "no tag nope in index.json (it has: main)")

        let missing = Layout.index([("gone", Layout.layer("not a manifest"))].map { ($0.0, Descriptor(mediaType: MediaType.ociManifest, digest: $0.1.digest, size: 10)) })
        let unreadable = #expect(throws: ManifestError.self) { try layout.plan(missing) }?.description ?? ""
        #expect(unreadable.hasPrefix("cannot read manifest sha256:") && unreadable.hasSuffix("no such blob"), "\(unreadable)")

        #expect(throws: ManifestError.self) { try layout.plan(Array(#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:\#(String(repeating: "a", count: 64))","size":1},"layers":[]}"#.utf8)) }
    }
}
