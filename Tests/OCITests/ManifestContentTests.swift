import Foundation
import Testing
@testable import OCI

// Fixed digests so the golden documents below are readable.
private func fixedDigest(_ c: Character) -> Digest { Digest("sha256:" + String(repeating: c, count: 64))! }
private let dA = fixedDigest("a")
private let dB = fixedDigest("b")
private let dC = fixedDigest("c")
private let dD = fixedDigest("d")
private let dE = fixedDigest("e")
private let dF = fixedDigest("f")

private let gzipLayer = "application/vnd.oci.image.layer.v1.tar+gzip"
private let zstdLayer = "application/vnd.oci.image.layer.v1.tar+zstd"
private let dockerLayer = "application/vnd.docker.image.rootfs.diff.tar.gzip"

private func parse(_ json: String, contentType: String? = nil) throws(ManifestError) -> ManifestContent {
    try ManifestContent.parse(Array(json.utf8), contentType: contentType)
}

/// The message of the ManifestError `json` raises; records an issue when it parses.
private func errorMessage(_ json: String, contentType: String? = nil,
                          sourceLocation: SourceLocation = #_sourceLocation) -> String {
    do {
        let content = try parse(json, contentType: contentType)
        Issue.record("expected a ManifestError, parsed \(content)", sourceLocation: sourceLocation)
        return ""
    } catch {
        return error.description
    }
}

@Suite("ManifestContent.parse")
struct ManifestContentTests {
    // MARK: Variants

    /// BuildKit's index variant (image-manifest=false), as buildctl v0.11.6 pushes it.
    @Test func buildkitIndexVariant() throws {
        let json = """
        {"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[\
        {"mediaType":"\(gzipLayer)","digest":"\(dA)","size":3623807,"annotations":{"buildkit/createdat":"2024-01-01T00:00:00Z","containerd.io/uncompressed":"\(dD)"}},\
        {"mediaType":"\(zstdLayer)","digest":"\(dB)","size":1024,"annotations":{"containerd.io/uncompressed":"\(dE)"}},\
        {"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"\(dC)","size":402}]}
        """
        let content = try parse(json)
        let layerA = Descriptor(mediaType: gzipLayer, digest: dA, size: 3_623_807,
                                annotations: ["buildkit/createdat": "2024-01-01T00:00:00Z", "containerd.io/uncompressed": dD.description])
        let layerB = Descriptor(mediaType: zstdLayer, digest: dB, size: 1024, annotations: ["containerd.io/uncompressed": dE.description])
        let config = Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: dC, size: 402)
        #expect(content == .index(mediaType: MediaType.ociIndex, manifests: [layerA, layerB, config]))
        #expect(content.mediaType == MediaType.ociIndex)
        #expect(content.buildkitCacheConfig == config)
    }

    /// The same with oci-mediatypes=false: a Docker manifest list of Docker layers.
    @Test func buildkitDockerManifestListVariant() throws {
        let json = """
        {"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[\
        {"mediaType":"\(dockerLayer)","digest":"\(dA)","size":10,"annotations":{"containerd.io/uncompressed":"\(dD)"}},\
        {"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"\(dC)","size":402}]}
        """
        let content = try parse(json)
        guard case .index(let type, let manifests) = content else {
            Issue.record("expected an index, got \(content)")
            return
        }
        #expect(type == MediaType.dockerManifestList)
        #expect(manifests.map(\.digest) == [dA, dC])
        #expect(manifests[0].mediaType == dockerLayer)
        #expect(content.buildkitCacheConfig == Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: dC, size: 402))
    }

    /// BuildKit's image-manifest variant (image-manifest=true), the reference's example.
    @Test func buildkitImageManifestVariant() throws {
        let json = """
        {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"\(dC)","size":402},
         "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"\(dA)","size":3623807,"annotations":{"containerd.io/uncompressed":"\(dD)"}}]}
        """
        let content = try parse(json)
        #expect(content == .image(
            mediaType: MediaType.ociManifest,
            config: Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: dC, size: 402),
            layers: [Descriptor(mediaType: gzipLayer, digest: dA, size: 3_623_807, annotations: ["containerd.io/uncompressed": dD.description])]))
        #expect(content.mediaType == MediaType.ociManifest)
        // Only the index variant reports a cache config this way; the image variant has it as `config`.
        #expect(content.buildkitCacheConfig == nil)
    }

    @Test func plainOCIImageManifest() throws {
        let json = """
        {
          "schemaVersion": 2,
          "mediaType": "application/vnd.oci.image.manifest.v1+json",
          "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "\(dF)", "size": 7023},
          "layers": [
            {"mediaType": "\(gzipLayer)", "digest": "\(dA)", "size": 32654},
            {"mediaType": "\(gzipLayer)", "digest": "\(dB)", "size": 16724}
          ],
          "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
          "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "\(dE)", "size": 1}
        }
        """
        #expect(try parse(json) == .image(
            mediaType: MediaType.ociManifest,
            config: Descriptor(mediaType: MediaType.ociConfig, digest: dF, size: 7023),
            layers: [Descriptor(mediaType: gzipLayer, digest: dA, size: 32654),
                     Descriptor(mediaType: gzipLayer, digest: dB, size: 16724)]))
    }

    @Test func dockerSchema2Manifest() throws {
        let json = """
        {"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",\
        "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7023,"digest":"\(dF)"},\
        "layers":[{"mediaType":"\(dockerLayer)","size":32654,"digest":"\(dA)"}]}
        """
        #expect(try parse(json) == .image(
            mediaType: MediaType.dockerManifest,
            config: Descriptor(mediaType: MediaType.dockerConfig, digest: dF, size: 7023),
            layers: [Descriptor(mediaType: dockerLayer, digest: dA, size: 32654)]))
    }

    @Test func multiPlatformOCIIndexIsNotACacheIndex() throws {
        let json = """
        {"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[\
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"\(dA)","size":500,"platform":{"architecture":"amd64","os":"linux"}},\
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"\(dB)","size":501,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}
        """
        let content = try parse(json)
        #expect(content == .index(mediaType: MediaType.ociIndex, manifests: [
            Descriptor(mediaType: MediaType.ociManifest, digest: dA, size: 500),
            Descriptor(mediaType: MediaType.ociManifest, digest: dB, size: 501),
        ]))
        #expect(content.buildkitCacheConfig == nil)
    }

    @Test func imageManifestWithoutLayersHasNoLayers() throws {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"\#(dC)","size":2}}"#
        #expect(try parse(json) == .image(mediaType: MediaType.ociManifest,
                                          config: Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: dC, size: 2),
                                          layers: []))
    }

    @Test func emptyIndexIsAnIndex() throws {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#
        #expect(try parse(json) == .index(mediaType: MediaType.ociIndex, manifests: []))
    }

    // MARK: Where the media type comes from

    private static let untypedImage = #"{"schemaVersion":2,"config":{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"sha256:\#(String(repeating: "c", count: 64))","size":402},"layers":[]}"#
    private static let untypedIndex = #"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"sha256:\#(String(repeating: "c", count: 64))","size":402}]}"#

    @Test func mediaTypeFromContentTypeWhenTheDocumentHasNone() throws {
        #expect(try parse(Self.untypedImage, contentType: MediaType.dockerManifest).mediaType == MediaType.dockerManifest)
        #expect(try parse(Self.untypedImage, contentType: MediaType.ociManifest).mediaType == MediaType.ociManifest)
        #expect(try parse(Self.untypedIndex, contentType: MediaType.dockerManifestList).mediaType == MediaType.dockerManifestList)
        #expect(try parse(Self.untypedIndex, contentType: MediaType.ociIndex).mediaType == MediaType.ociIndex)
    }

    @Test(arguments: [
        "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8",
        "application/vnd.docker.distribution.manifest.v2+json;charset=utf-8",
        "  application/vnd.docker.distribution.manifest.v2+json ; charset=\"utf-8\"",
    ])
    func contentTypeParametersAreIgnored(_ contentType: String) throws {
        let content = try parse(Self.untypedImage, contentType: contentType)
        #expect(content.mediaType == MediaType.dockerManifest)
        guard case .image = content else {
            Issue.record("expected an image manifest, got \(content)")
            return
        }
    }

    @Test func documentMediaTypeWinsOverContentType() throws {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","digest":"\#(dC)","size":1}}"#
        #expect(try parse(json, contentType: MediaType.dockerManifest).mediaType == MediaType.ociManifest)
    }

    @Test func mediaTypeFromShapeWhenNeither() throws {
        let image = try parse(Self.untypedImage)
        #expect(image.mediaType == MediaType.ociManifest)
        guard case .image = image else {
            Issue.record("expected an image manifest, got \(image)")
            return
        }
        let index = try parse(Self.untypedIndex)
        #expect(index.mediaType == MediaType.ociIndex)
        #expect(index.buildkitCacheConfig?.digest == dC)
    }

    @Test func bareMediaType() {
        #expect(ManifestContent.bareMediaType("application/json; charset=utf-8") == "application/json")
        #expect(ManifestContent.bareMediaType(" a/b ") == "a/b")
        #expect(ManifestContent.bareMediaType("a/b") == "a/b")
        #expect(ManifestContent.bareMediaType("") == "")
    }

    // MARK: Errors

    @Test(arguments: ["", "{", "not json", "{\"schemaVersion\":2,", "\u{FEFF}{]"])
    func malformedJSON(_ json: String) {
        let message = errorMessage(json)
        #expect(message.hasPrefix("malformed manifest JSON"), "\(message)")
        #expect(!message.contains("\n"))
    }

    @Test func topLevelNotAnObject() {
        let message = errorMessage("[1,2,3]")
        #expect(message.hasPrefix("malformed manifest JSON"), "\(message)")
        #expect(!message.contains("\n"))
    }

    @Test func schemaVersion1IsRefused() {
        let json = #"{"schemaVersion":1,"name":"library/alpine","tag":"latest","architecture":"amd64","fsLayers":[],"history":[]}"#
        #expect(errorMessage(json) == "unsupported manifest schemaVersion 1")
        #expect(errorMessage(json, contentType: "application/vnd.docker.distribution.manifest.v1+prettyjws") == "unsupported manifest schemaVersion 1")
    }

    @Test func missingSchemaVersionIsRefused() {
        let json = #"{"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","digest":"\#(dC)","size":1}}"#
        #expect(errorMessage(json) == "unsupported manifest schemaVersion (missing)")
    }

    @Test func missingConfig() {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#
        #expect(errorMessage(json) == "image manifest has no config")
        let docker = #"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":null,"layers":[]}"#
        #expect(errorMessage(docker) == "image manifest has no config")
    }

    @Test func indexWithoutManifests() {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#
        #expect(errorMessage(json) == "index application/vnd.oci.image.index.v1+json has no manifests list")
    }

    /// Issue 13: a size no blob can have (negative, or beyond 2^62 bytes) is refused in a line
    /// that names the blob and the size.
    @Test(arguments: [Int64(-5), -1, Int64(1) << 62 + 1, Int64.max - 511, Int64.max])
    func impossibleSize(_ size: Int64) {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","digest":"\#(dC)","size":1},"layers":[{"mediaType":"m","digest":"\#(dA)","size":\#(size)}]}"#
        let message = errorMessage(json)
        #expect(message.hasPrefix("malformed manifest JSON"), "\(message)")
        #expect(message.contains("layers.0.size: blob \(dA) declares \(size) bytes"), "\(message)")
        #expect(!message.contains("\n"))
    }

    @Test func negativeSizeInIndex() {
        let json = #"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"\#(dA)","size":-1}]}"#
        #expect(errorMessage(json).contains("blob \(dA) declares -1 bytes"))
    }

    @Test(arguments: [Int64(0), Int64(1) << 62])
    func sizesAtTheLimitsAreAccepted(_ size: Int64) throws {
        let json = #"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"\#(dA)","size":\#(size)}]}"#
        guard case .index(_, let manifests) = try parse(json) else {
            Issue.record("not an index")
            return
        }
        #expect(manifests.map(\.size) == [size])
    }

    /// Issue 13: a media type chosen by a registry reaches the terminal through this message.
    @Test func controlCharactersInTheMediaTypeAreEscaped() {
        let json = #"{"schemaVersion":2,"mediaType":"application/x\u001b]0;owned\u0007"}"#
        let message = errorMessage(json)
        #expect(message == #"unsupported manifest media type application/x\x1b]0;owned\x07"#, "\(message.debugDescription)")
    }

    @Test(arguments: [
        "sha256:XYZ",
        "sha512:" + String(repeating: "a", count: 128),
        "sha256:" + String(repeating: "A", count: 64),
        "../../etc/passwd",
    ])
    func badDigest(_ digest: String) {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","digest":"\#(digest)","size":1},"layers":[]}"#
        let message = errorMessage(json)
        #expect(message.hasPrefix("malformed manifest JSON"), "\(message)")
        #expect(message.contains("not a sha256 digest"), "\(message)")
        #expect(message.contains("config"), "\(message)")
        #expect(!message.contains("\n"))
    }

    @Test func missingDigestNamesTheField() {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","size":1}}"#
        #expect(errorMessage(json) == "malformed manifest JSON: missing config.digest")
    }

    @Test func wrongTypeForSize() {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","digest":"\#(dC)","size":"402"}}"#
        let message = errorMessage(json)
        #expect(message.hasPrefix("malformed manifest JSON: config.size"), "\(message)")
        #expect(!message.contains("\n"))
    }

    @Test func unknownMediaType() {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.example.thing+json","config":{"mediaType":"m","digest":"\#(dC)","size":1}}"#
        #expect(errorMessage(json) == "unsupported manifest media type application/vnd.example.thing+json")
    }

    @Test func unknownMediaTypeFromContentType() {
        #expect(errorMessage(Self.untypedImage, contentType: "text/html; charset=utf-8") == "unsupported manifest media type text/html")
    }

    @Test func bigBadDigestDoesNotFloodTheMessage() {
        let json = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"m","digest":"sha256:\#(String(repeating: "q", count: 100_000))","size":1}}"#
        let message = errorMessage(json)
        #expect(message.contains("not a sha256 digest"))
        #expect(message.count < 300, "message is \(message.count) characters")
    }
}

@Suite("The fast manifest reader agrees with JSONDecoder")
struct FastManifestReaderTests {
    private let buildkitManifest = #"""
    {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"sha256:\#(String(repeating: "c", count: 64))","size":402},
     "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:\#(String(repeating: "a", count: 64))","size":3623807,"annotations":{"buildkit/createdat":"2025-06-01T10:00:00.123Z","containerd.io/uncompressed":"sha256:\#(String(repeating: "d", count: 64))"}},
               {"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:\#(String(repeating: "b", count: 64))","size":0}]}
    """#

    private func index(_ extra: String) -> String {
        #"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:\#(String(repeating: "e", count: 64))","size":7\#(extra)}]}"#
    }

    @Test func typicalManifestsTakeTheFastPath() {
        #expect(FastManifestReader.document(Array(buildkitManifest.utf8)) != nil)
        #expect(FastManifestReader.document(Array(index("").utf8)) != nil)
        #expect(FastManifestReader.document(Array(index(#","platform":{"os":"linux","architecture":"arm64","os.features":[]},"urls":[]"#).utf8)) != nil)
    }

    static let readFast = [
        #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
        #" {"schemaVersion" : 2 , "manifests" : [ ] } "#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":1,"annotations":{"a\"b":"\u00e9\n\/","x":"\u0000"}}]}"#,
        #"{"schemaVersion":2,"config":{"digest":"sha256:\#(String(repeating: "2", count: 64))","size":4611686018427387904},"layers":[]}"#,
        #"{"schemaVersion":2,"extra":{"deep":[1,-2.5e+3,0.0,true,false,"s",{"k":[]}]},"manifests":[]}"#,
        #"{"\u0073chemaVersion":2,"manifests":[]}"#,
    ]
    static let leftToJSONDecoder = [
        #"{"schemaVersion":2,"config":{"digest":"sha256:\#(String(repeating: "2", count: 64))","size":9223372036854775807},"layers":[]}"#,
        #"{"schemaVersion":2,"manifests":null}"#,
        #"{"schemaVersion":2.0,"manifests":[]}"#,
        #"{"schemaVersion":2e0,"manifests":[]}"#,
        #"{"schemaVersion":02,"manifests":[]}"#,
        #"{"schemaVersion":-0,"manifests":[]}"#,
        #"{"schemaVersion":2,"schemaVersion":3,"manifests":[]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":1.0}]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":99999999999999999999}]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":-1}]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":"1"}]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"md5:00","size":1}]}"#,
        #"{"schemaVersion":2,"manifests":[{"size":1}]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":1,"annotations":{"a":1}}]}"#,
        #"{"schemaVersion":2,"manifests":[{"digest":"sha256:\#(String(repeating: "1", count: 64))","size":1,"annotations":{"a":"x","a":"y"}}]}"#,
        #"{"schemaVersion":2,"mediaType":"caf\#u{e9}","manifests":[]}"#,
        #"{"schemaVersion":2,"mediaType":"\ud800","manifests":[]}"#,
        #"{"schemaVersion":2,"manifests":[]} x"#,
        #"{"schemaVersion":2,"manifests":[],}"#,
        #"{"schemaVersion":2,"manifests":[1,]}"#,
        #"{"schemaVersion":2,"extra":01,"manifests":[]}"#,
        #"{"schemaVersion":2,"extra":tru,"manifests":[]}"#,
        #"\#u{feff}{"schemaVersion":2,"manifests":[]}"#,
        #"[]"#, "", "{",
    ]

    @Test(arguments: readFast)
    func theFastReaderAnswers(_ json: String) {
        #expect(FastManifestReader.document(Array(json.utf8)) != nil)
    }

    @Test(arguments: leftToJSONDecoder)
    func theFastReaderGivesUp(_ json: String) {
        #expect(FastManifestReader.document(Array(json.utf8)) == nil)
    }

    /// Every input gives the same outcome both ways: the same content, or an error from each.
    @Test(arguments: readFast + leftToJSONDecoder)
    func bothWaysAgree(_ json: String) {
        let bytes = Array(json.utf8)
        let fast = Result { () throws(ManifestError) in try ManifestContent.parse(bytes) }
        let foundation = Result { () throws(ManifestError) in try ManifestContent.parseWithFoundation(bytes) }
        switch (fast, foundation) {
        case (.success(let a), .success(let b)): #expect(a == b)
        case (.failure, .failure): break
        default: Issue.record("fast: \(fast), JSONDecoder: \(foundation)")
        }
    }

    @Test func aDocumentOfTheFastShapeReadsTheSameBothWays() throws {
        let bytes = Array(buildkitManifest.utf8)
        #expect(try ManifestContent.parse(bytes) == ManifestContent.parseWithFoundation(bytes))
        #expect(FastManifestReader.document(bytes) == (try JSONDecoder().decode(ManifestContent.Document.self, from: Data(bytes))))
    }
}
