import Foundation
import HTTPClient
import Logging
import OCI
import RemoteStore
import Testing

#if canImport(Glibc)
import Glibc
#endif

// The `layers/sha256/<hex>` view through real FUSE mounts of the built binary, over layers made
// here with real tar, gzip and zstd (and one written by BuildKit v0.11.6, from the fixtures),
// pushed to Debian's docker-registry.


/// One layer blob of the test image and what its view must show.
private struct TestLayer {
    var name: String
    var mediaType: String
    var blob: String
    /// The uncompressed tar the view must equal, and its digest (the diffID).
    var tar: String
    var diffID: Digest
    /// How `tar` lists the blob itself.
    var tarListFlags: [String]
    /// Decompresses to something other than its diffID's stream: the view must fail with EIO.
    var corrupt = false
    var digest: Digest { Digest.sha256(of: FileManager.default.contents(atPath: blob).map(Array.init) ?? []) }
}

private func sha256(ofFile path: String) throws -> Digest {
    Digest.sha256(of: try #require(FileManager.default.contents(atPath: path).map(Array.init)))
}

/// A root filesystem of about 14 MB (noise, text, small files, a symlink, a hard link), as tar.
private func makeLayers(in ws: Workspace) async throws -> [TestLayer] {
    _ = try Harness.tool("zstd", neededFor: "zstd layers (Debian package zstd)")
    let root = try ws.makeDirectory("rootfs")
    try await shell("""
        set -e; cd '\(root)'; mkdir -p usr/lib data/deep/er
        head -c 6000000 /dev/urandom > usr/lib/noise.bin
        seq 1 1200000 > data/numbers.txt
        for i in $(seq 1 200); do echo "small file $i" > data/deep/er/f$i.txt; done
        ln -s ../data/numbers.txt usr/numbers; ln data/numbers.txt data/hardlink.txt
        """, in: ws)
    let work = try ws.makeDirectory("layers-work")
    let tar = work + "/layer.tar"
    try await shell("""
        set -e; cd '\(work)'
        tar -C '\(root)' -cf layer.tar .
        gzip -c -6 layer.tar > layer.tar.gz
        split -b 5000000 layer.tar part.
        for p in part.*; do gzip -c -1 $p >> multi.tar.gz; zstd -q -c -3 $p >> frames.tar.zst; done
        zstd -q -c -3 layer.tar > single.tar.zst
        head -c $(( $(stat -c %s layer.tar.gz) - 4000 )) layer.tar.gz > truncated.tar.gz
        cp layer.tar.gz flipped.tar.gz
        printf '\\x5a' | dd of=flipped.tar.gz bs=1 seek=3000000 conv=notrunc status=none
        """, in: ws)
    let diffID = try sha256(ofFile: tar)
    let gzipType = "application/vnd.oci.image.layer.v1.tar+gzip", zstdType = "application/vnd.oci.image.layer.v1.tar+zstd"
    let buildkitBlob = "/work/shared/fixtures/buildkit-v0.11.6/local-cache/blobs/sha256/4c34544d6aa3d199fb56e4796d61172fef88bd3290aa052b26c31fa356024ddc"
    let buildkitTar = work + "/buildkit.tar"
    try await shell("gzip -dc '\(buildkitBlob)' > '\(buildkitTar)'", in: ws)
    return [
        TestLayer(name: "gzip", mediaType: gzipType, blob: work + "/layer.tar.gz", tar: tar, diffID: diffID, tarListFlags: ["-tzf"]),
        TestLayer(name: "multi-member gzip", mediaType: "application/vnd.docker.image.rootfs.diff.tar.gzip", blob: work + "/multi.tar.gz",
                  tar: tar, diffID: diffID, tarListFlags: ["-tzf"]),
        TestLayer(name: "zstd, one frame", mediaType: zstdType, blob: work + "/single.tar.zst", tar: tar, diffID: diffID,
                  tarListFlags: ["--zstd", "-tf"]),
        TestLayer(name: "zstd, several frames", mediaType: zstdType, blob: work + "/frames.tar.zst", tar: tar, diffID: diffID,
                  tarListFlags: ["--zstd", "-tf"]),
        TestLayer(name: "uncompressed", mediaType: "application/vnd.oci.image.layer.v1.tar", blob: tar, tar: tar, diffID: diffID,
                  tarListFlags: ["-tf"]),
        TestLayer(name: "BuildKit v0.11.6", mediaType: gzipType, blob: buildkitBlob, tar: buildkitTar,
                  diffID: try #require(Digest("sha256:68f2605248e7e2ad7f56ee5bcad5261deb0d29e1740c612efaee1d18747f1c47")),
                  tarListFlags: ["-tzf"]),
        TestLayer(name: "truncated gzip", mediaType: gzipType, blob: work + "/truncated.tar.gz", tar: tar, diffID: diffID,
                  tarListFlags: ["-tzf"], corrupt: true),
        TestLayer(name: "bit-flipped gzip", mediaType: gzipType, blob: work + "/flipped.tar.gz", tar: tar, diffID: diffID,
                  tarListFlags: ["-tzf"], corrupt: true),
    ]
}

/// Pushes the layers as one OCI image, tag `layers`: the zstd layers' diffIDs only in the image
/// config's rootfs.diff_ids, the others also in `containerd.io/uncompressed`.
private func push(_ layers: [TestLayer], to registry: Registry, in ws: Workspace) throws {
    let diffIDs = layers.map { "\"\($0.diffID)\"" }.joined(separator: ",")
    let config = Array(#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[\#(diffIDs)]}}"#.utf8)
    try pushImage(layers.map { layer in
        ImageLayer(blob: layer.blob, mediaType: layer.mediaType,
                   annotations: layer.mediaType.hasSuffix("zstd") ? nil : [Annotation.uncompressed: layer.diffID.description])
    }, config: config, to: registry, repository: "view", tag: "layers", in: ws)
}

private func preads(_ path: String, _ ranges: [(offset: Int64, count: Int)]) throws -> [[UInt8]] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SysError(call: "open", path: path, code: errno) }
    defer { close(fd) }
    return try ranges.map { range in
        var buffer = [UInt8](repeating: 0, count: range.count)
        var filled = 0
        while filled < range.count {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + filled, range.count - filled, off_t(range.offset) + off_t(filled)) }
            if n < 0 { throw SysError(call: "pread", path: path, code: errno) }
            if n == 0 { break }
            filled += n
        }
        return Array(buffer.prefix(filled))
    }
}

@Suite("layers/ view", .serialized)
struct LayerViewIntegrationTests {
    @Test("every layer's uncompressed tar: listing, stat, tar -t, diffID, random reads, corrupt layers EIO")
    func layersView() async throws {
        try await withWorkspace("layers-view") { ws in
            let registry = try await ws.startRegistry()
            let layers = try await makeLayers(in: ws)
            try push(layers, to: registry, in: ws)
            let cache = try ws.makeDirectory("shared-cache")
            let source = registry.source("view:layers")

            let mount = try await ws.mountExpectingSuccess(source, cacheDir: cache)
            let listed = Set(FileIO.listDirectory(mount.path("layers/sha256")))
            #expect(listed == Set(layers.map(\.digest.hex)), "every layer and nothing else (no config)")

            for layer in layers where !layer.corrupt {
                let view = mount.path("layers/sha256/" + layer.digest.hex)
                let expectedSize = Int64(try FileIO.statFile(layer.tar).st_size)
                #expect(Int64(try FileIO.statFile(view).st_size) == expectedSize, "\(layer.name): exact size")
                let listedView = try await shell("tar -tf '\(view)'", in: ws).stdout
                let listedBlob = try await shell("tar \(layer.tarListFlags.joined(separator: " ")) '\(mount.blobPath(layer.digest.description))'",
                                                 in: ws).stdout
                #expect(!listedView.isEmpty && listedView == listedBlob, "\(layer.name): tar -t of the view and of the blob")
                let whole = try FileIO.digest(view)
                #expect(whole.digest == layer.diffID.description && whole.size == expectedSize, "\(layer.name): sha256 is the diffID")
            }
            for layer in layers where layer.corrupt {
                let view = mount.path("layers/sha256/" + layer.digest.hex)
                #expect(FileIO.errnoOf { open(view, O_RDONLY) } == EIO, "\(layer.name): EIO, never other bytes")
                #expect(FileIO.readUntilFailure(view).errno == EIO, "\(layer.name): again EIO")
            }
            #expect(FileIO.errnoOfOpenAndWrite(mount.path("layers/sha256/" + layers[0].digest.hex), O_WRONLY) == EROFS)
            // Computed once: the index is kept in the cache directory.
            let indexes = FileIO.listDirectory(cache + "/layers").filter { $0.hasSuffix(".index") }
            #expect(Set(indexes) == Set(layers.filter { !$0.corrupt && $0.name != "uncompressed" }.map { $0.digest.hex + ".index" }))
            #expect(try await mount.unmount(in: ws).status == 0)

            // A new mount (a cold page cache) reads at random offsets from the saved checkpoints.
            let second = try await ws.mountExpectingSuccess(source, cacheDir: cache)
            var generator = SystemRandomNumberGenerator()
            for layer in layers where !layer.corrupt {
                let tar = try #require(FileManager.default.contents(atPath: layer.tar).map(Array.init))
                let ranges = (0..<200).map { _ in
                    (offset: Int64.random(in: 0..<Int64(tar.count), using: &generator), count: Int.random(in: 1...(1 << 20), using: &generator))
                }
                let got = try preads(second.path("layers/sha256/" + layer.digest.hex), ranges)
                var mismatches = 0
                for (range, bytes) in zip(ranges, got) where bytes != Array(tar[Int(range.offset)..<min(tar.count, Int(range.offset) + range.count)]) {
                    mismatches += 1
                }
                #expect(mismatches == 0, "\(layer.name): \(mismatches) of 200 random reads differ from the decompressed tar")
            }
            #expect(try await second.unmount(in: ws).status == 0)

            // With the index there but not the blob, a small read deep in the layer fetches about
            // one span's compressed bytes, not the blob.
            let fresh = try ws.makeDirectory("fresh-cache")
            let gzipLayer = layers[0]
            try await shell("mkdir -p '\(fresh)/layers' && cp '\(cache)/layers/\(gzipLayer.digest.hex).index' '\(fresh)/layers/'", in: ws)
            let servedBefore = registry.blobBytesServed(repo: "view", digest: gzipLayer.digest.description)
            let third = try await ws.mountExpectingSuccess(source, cacheDir: fresh)
            let tar = try #require(FileManager.default.contents(atPath: gzipLayer.tar).map(Array.init))
            let offset = Int64(tar.count) * 3 / 4
            let got = try preads(third.path("layers/sha256/" + gzipLayer.digest.hex), [(offset, 4096)])
            #expect(got == [Array(tar[Int(offset)..<Int(offset) + 4096])])
            let served = registry.blobBytesServed(repo: "view", digest: gzipLayer.digest.description) - servedBefore
            let blobSize = Int64(try FileIO.statFile(gzipLayer.blob).st_size)
            #expect(served > 0 && served <= 6 << 20 && served < blobSize / 2,
                    "a 4 KiB read fetched \(served) of the blob's \(blobSize) bytes")
            #expect(try await third.unmount(in: ws).status == 0)
        }
    }
}
