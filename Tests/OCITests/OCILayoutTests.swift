import Foundation
import Testing
@testable import OCI

private let hexA = String(repeating: "a", count: 64)
private let hexB = String(repeating: "b", count: 64)

@Suite("OCILayout")
struct OCILayoutTests {
    @Test func ociLayoutFileBytes() {
        #expect(String(decoding: OCILayout.ociLayoutFile, as: UTF8.self) == #"{"imageLayoutVersion":"1.0.0"}"#)
    }

    @Test func indexFileOneTagGoldenBytes() {
        let bytes = OCILayout.indexFile([
            .init(tag: "latest", manifest: Descriptor(mediaType: MediaType.ociManifest, digest: Digest("sha256:" + hexA)!, size: 1045)),
        ])
        let expected = #"{"manifests":[{"annotations":{"org.opencontainers.image.ref.name":"latest"},"digest":"sha256:\#(hexA)","mediaType":"application/vnd.oci.image.manifest.v1+json","size":1045}],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#
        #expect(String(decoding: bytes, as: UTF8.self) == expected)
        #expect(bytes == Array(expected.utf8))
    }

    @Test func indexFileTwoTagsGoldenBytesInGivenOrder() {
        let entries: [OCILayout.TaggedManifest] = [
            .init(tag: "buildcache", manifest: Descriptor(mediaType: MediaType.ociIndex, digest: Digest("sha256:" + hexB)!, size: 2048)),
            .init(tag: "v1.2.3", manifest: Descriptor(mediaType: MediaType.dockerManifest, digest: Digest("sha256:" + hexA)!, size: 7)),
        ]
        let expected = #"{"manifests":["#
            + #"{"annotations":{"org.opencontainers.image.ref.name":"buildcache"},"digest":"sha256:\#(hexB)","mediaType":"application/vnd.oci.image.index.v1+json","size":2048},"#
            + #"{"annotations":{"org.opencontainers.image.ref.name":"v1.2.3"},"digest":"sha256:\#(hexA)","mediaType":"application/vnd.docker.distribution.manifest.v2+json","size":7}"#
            + #"],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#
        #expect(String(decoding: OCILayout.indexFile(entries), as: UTF8.self) == expected)
    }

    @Test func indexFileWithNoTags() {
        #expect(String(decoding: OCILayout.indexFile([]), as: UTF8.self)
            == #"{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#)
    }

    @Test func indexFileIsDeterministic() {
        let entries: [OCILayout.TaggedManifest] = (0..<20).map { i in
            .init(tag: "tag\(i)", manifest: Descriptor(mediaType: MediaType.ociManifest,
                                                       digest: Digest.sha256(of: Array("m\(i)".utf8)), size: Int64(i * 100)))
        }
        let first = OCILayout.indexFile(entries)
        for _ in 0..<20 {
            #expect(OCILayout.indexFile(entries) == first)
        }
        #expect(Digest.sha256(of: OCILayout.indexFile(entries)) == Digest.sha256(of: first))
    }

    @Test func entriesCarryOnlyTheRefNameAnnotation() throws {
        let manifest = Descriptor(mediaType: MediaType.ociManifest, digest: Digest("sha256:" + hexA)!, size: 1,
                                  annotations: ["org.example.other": "x", Annotation.refName: "stale"])
        let bytes = OCILayout.indexFile([.init(tag: "main", manifest: manifest)])
        let index = try ManifestContent.parse(bytes)
        guard case .index(let type, let manifests) = index else {
            Issue.record("expected an index, got \(index)")
            return
        }
        #expect(type == MediaType.ociIndex)
        #expect(manifests == [Descriptor(mediaType: MediaType.ociManifest, digest: Digest("sha256:" + hexA)!, size: 1,
                                         annotations: ["org.opencontainers.image.ref.name": "main"])])
        #expect(Annotation.refName == "org.opencontainers.image.ref.name")
    }

    @Test func canonicalJSONSortsKeysAndDoesNotEscapeSlashes() {
        struct Value: Encodable {
            var zeta = 1
            var alpha = "a/b"
            var middle = ["y": 2, "x": 1]
        }
        #expect(String(decoding: OCILayout.canonicalJSON(Value()), as: UTF8.self)
            == #"{"alpha":"a/b","middle":{"x":1,"y":2},"zeta":1}"#)
    }
}
