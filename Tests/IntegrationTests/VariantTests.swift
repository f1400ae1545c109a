import Foundation
import Testing

/// A kind of content pushed by `seed_cache.py`, and what skopeo can do with it.
struct VariantCase: Sendable, CustomTestStringConvertible {
    var variant: String
    var dockerMediaTypes: Bool
    var skopeo: SkopeoExpectation

    enum SkopeoExpectation: Sendable {
        /// `skopeo inspect` (parsed) and `skopeo copy` both work.
        case inspectAndCopy
        /// A BuildKit cache manifest: its config is a cacheconfig, not an image config, so
        /// skopeo refuses the "image-specific" `inspect` by design; `inspect --raw` and `copy` work.
        case rawInspectAndCopy
        /// Docker media types: skopeo's oci: transport skips index.json entries whose
        /// mediaType is not an OCI manifest/index (containers/image oci/layout), so skopeo
        /// cannot be used; the blobs are still checked.
        case notApplicable
    }

    var testDescription: String { variant + (dockerMediaTypes ? " (docker media types)" : "") }

    static let all: [VariantCase] = [
        .init(variant: "manifest", dockerMediaTypes: false, skopeo: .rawInspectAndCopy),
        .init(variant: "manifest", dockerMediaTypes: true, skopeo: .notApplicable),
        .init(variant: "index", dockerMediaTypes: true, skopeo: .notApplicable),
        .init(variant: "image", dockerMediaTypes: false, skopeo: .inspectAndCopy),
        .init(variant: "image", dockerMediaTypes: true, skopeo: .notApplicable),
        .init(variant: "image-index", dockerMediaTypes: false, skopeo: .inspectAndCopy),
    ]
}

@Suite("Cache and image variants")
struct VariantTests {
    @Test("variant mounts, every blob verifies, and skopeo reads the layout", arguments: VariantCase.all)
    func variant(_ testCase: VariantCase) async throws {
        let skopeo = try Harness.tool("skopeo", neededFor: "reading the mount as an OCI layout (package skopeo)")
        let label = testCase.variant + (testCase.dockerMediaTypes ? "-docker" : "")
        try await withWorkspace("variant-\(label)") { ws in
            let registry = try await ws.startRegistry()
            let tag = "v1"
            let seed = try await ws.seed(registry, repo: "images", tag: tag, variant: testCase.variant,
                                         dockerMediaTypes: testCase.dockerMediaTypes, layers: 2, layerSize: 1_200_000, seed: 7)
            let mount = try await ws.mountExpectingSuccess(registry.source("images:\(tag)"))

            try Check.indexJSON(mount, tag: tag, manifest: seed.manifest)
            try Check.blobsListedWithSizes(mount, seed)
            let early = registry.blobGets(repo: "images", digests: seed.layers.map(\.digest))
            #expect(early.values.allSatisfy { $0 == 0 }, "no layer fetched at mount: \(early)")
            // The top manifest is served byte-identical to what the registry holds.
            let manifestBytes = try FileIO.readAll(mount.blobPath(seed.manifest.digest))
            #expect(Int64(manifestBytes.count) == seed.manifest.size)
            Check.blobsVerify(mount, seed.blobs)

            let reference = "oci:\(mount.mountpoint):\(tag)"
            switch testCase.skopeo {
            case .notApplicable:
                return
            case .inspectAndCopy:
                let inspect = try await Processes.run(skopeo, ["inspect", reference], timeout: 60, in: ws)
                #expect(inspect.status == 0, "\(inspect)")
                if inspect.status == 0 {
                    let object = try JSONSerialization.jsonObject(with: Data(inspect.stdout.utf8)) as? [String: Any]
                    #expect(object?["Layers"] as? [String] == seed.layers.map(\.digest), "skopeo's layers: \(inspect.stdout)")
                }
            case .rawInspectAndCopy:
                let inspect = try await Processes.run(skopeo, ["inspect", "--raw", reference], timeout: 60, in: ws)
                #expect(inspect.status == 0, "\(inspect)")
                #expect(Array(inspect.stdout.utf8) == manifestBytes, "skopeo inspect --raw should print the manifest as served")
            }

            let out = ws.path("copy-out")
            let copy = try await Processes.run(skopeo, ["copy", "--quiet", reference, "dir:\(out)"], timeout: 90, in: ws)
            #expect(copy.status == 0, "\(copy)")
            guard copy.status == 0 else { return }
            let files = FileIO.listDirectory(out).filter { $0 != "manifest.json" && $0 != "version" }
            // Every layer and the config arrived, and every copied blob hashes to its name.
            for blob in seed.blobs where blob.role == "layer" || blob.role == "config" || blob.role == "cacheconfig" {
                #expect(files.contains(blob.hex), "skopeo copy lacks \(blob.role ?? "") \(blob.digest); got \(files)")
            }
            for file in files {
                let digest = try FileIO.digest(out + "/" + file).digest
                #expect(digest == "sha256:" + file, "copied blob \(file) hashes to \(digest)")
            }
            // skopeo copies the (single-platform) manifest unchanged: it must be one the seed pushed.
            let copiedManifest = try FileIO.digest(out + "/manifest.json").digest
            let manifests = seed.blobs.filter { $0.role == "manifest" }.map(\.digest)
            #expect(manifests.contains(copiedManifest), "copied manifest.json \(copiedManifest) is none of \(manifests)")
        }
    }
}
