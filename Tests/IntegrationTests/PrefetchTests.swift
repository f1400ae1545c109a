import Foundation
import Testing

@Suite("ocicachefs prefetch: the tags' blobs into the cache through a real mount")
struct PrefetchTests {
    static func prefetch(_ arguments: [String], in ws: Workspace) async throws -> ProcessResult {
        try await Processes.run(try Harness.binary(), ["prefetch"] + arguments, timeout: 60, in: ws)
    }

    @Test("prefetch of a tag fetches each layer once, prints a line per blob, and later reads need no download")
    func prefetchFillsTheCache() async throws {
        try await withWorkspace("prefetch") { ws in
            let registry = try await ws.startRegistry()
            let seeded = try await ws.seed(registry, variant: "manifest", layers: 3, layerSize: 700_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let layers = seeded.layers.map(\.digest)
            #expect(registry.blobGets(repo: "cache", digests: layers).values.allSatisfy { $0 == 0 }, "layers are lazy")

            // Not a terminal: one line per blob (the manifest, its config, three layers), then a summary.
            let result = try await Self.prefetch([mount.mountpoint, "main"], in: ws)
            #expect(result.status == 0, "\(result)")
            let lines = result.stdout.split(separator: "\n")
            #expect(lines.count == 6, "\(result.stdout)")
            for blob in [seeded.manifest] + seeded.blobs {
                #expect(lines.contains { $0.hasPrefix(blob.digest + " ") }, "a line for \(blob.role ?? "manifest") \(blob.digest): \(result.stdout)")
            }
            #expect(lines.last?.hasPrefix("5 blob(s), ") == true, "\(result.stdout)")
            #expect(registry.blobGets(repo: "cache", digests: layers).values.allSatisfy { $0 == 1 }, "each layer fetched once")

            for layer in seeded.layers {
                let bytes = try FileIO.readAll(mount.path("blobs/sha256/" + layer.hex))
                #expect(Int64(bytes.count) == layer.size)
            }
            #expect(registry.blobGets(repo: "cache", digests: layers).values.allSatisfy { $0 == 1 }, "reads after prefetch are served from the cache")
        }
    }

    @Test("--chain fetches only the layers of the chain ending at the layer named")
    func prefetchOneChain() async throws {
        try await withWorkspace("prefetch-chain") { ws in
            let registry = try await ws.startRegistry()
            let seeded = try await ws.seed(registry, variant: "index", layers: 3, layerSize: 500_000)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let layers = seeded.layers.map(\.digest)
            let result = try await Self.prefetch(["--chain", layers[1], mount.mountpoint], in: ws)
            #expect(result.status == 0, "\(result)")
            let lines = result.stdout.split(separator: "\n")
            #expect(lines.count == 3, "two layers and the summary: \(result.stdout)")
            #expect(Set(lines.dropLast().compactMap { $0.split(separator: " ").first.map(String.init) }) == [layers[0], layers[1]],
                    "in the order they finished: \(result.stdout)")
            // (The daemon may fetch layers[2] on its own: it reads ahead along a chain being read.)
            let gets = registry.blobGets(repo: "cache", digests: layers)
            #expect(gets[layers[0]] == 1 && gets[layers[1]] == 1, "\(gets)")

            let unknown = try await Self.prefetch(["--chain", "sha256:" + String(repeating: "0", count: 64), mount.mountpoint], in: ws)
            #expect(unknown.status != 0)
            #expect(unknown.stderrLines == ["ocicachefs: prefetch: layer sha256:\(String(repeating: "0", count: 64)) is in no cache chain of any tag"],
                    "\(unknown)")
        }
    }

    @Test("a blob the remote serves wrong fails prefetch, naming it; an unknown tag or a directory that is not a mount is one line")
    func prefetchFailuresAreNamed() async throws {
        try await withWorkspace("prefetch-fail") { ws in
            let registry = try await ws.startRegistry()
            let seeded = try await ws.seed(registry, variant: "manifest", layers: 2, layerSize: 400_000)
            let bad = seeded.layers[1]
            try await ws.corruptBlob(registry, digest: bad.digest)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))

            let result = try await Self.prefetch([mount.mountpoint], in: ws)
            #expect(result.status != 0, "\(result)")
            #expect(result.stderrLines.contains { $0.hasPrefix("ocicachefs: prefetch: not cached: \(bad.digest) (") && $0.hasSuffix("Input/output error") },
                    "\(result)")
            #expect(result.stderrLines.last == "ocicachefs: prefetch: 1 of 4 blob(s) failed", "\(result)")
            #expect(result.stdout.contains(seeded.layers[0].digest + " "), "the good layer is still fetched: \(result.stdout)")

            let unknownTag = try await Self.prefetch([mount.mountpoint, "nope"], in: ws)
            #expect(unknownTag.status != 0)
            #expect(unknownTag.stderrLines == ["ocicachefs: prefetch: no tag nope in index.json (it has: main)"], "\(unknownTag)")

            let plain = try ws.makeDirectory("plain")
            let notMounted = try await Self.prefetch([plain], in: ws)
            #expect(notMounted.status != 0)
            #expect(notMounted.stderrLines == ["ocicachefs: prefetch: \(plain) is not mounted"], "\(notMounted)")
        }
    }
}
