import Foundation
import HTTPClient
import Logging
import OCI
import RemoteStore
import Testing

#if canImport(Glibc)
import Glibc
#endif

// The `files/sha256/<hex>/…` view through real FUSE mounts of the built binary, over layers
// made here with real tar, gzip and zstd (and two written by BuildKit v0.32.2, from the
// fixtures), pushed to Debian's docker-registry: what find, stat and cat see of each layer's
// tree equals what `tar -x` (as root, keeping owners) makes of the same layer.


private struct FilesLayer {
    var name: String
    var mediaType: String
    var blob: String
    /// How `tar` reads the blob.
    var tarFlags: String
    var digest: Digest { Digest.sha256(of: FileManager.default.contents(atPath: blob).map(Array.init) ?? []) }
}

/// A root filesystem with what layers hold: long names (past 100 and 255 bytes), symlinks
/// (relative, absolute, dangling, a loop), hard links, a whiteout and an opaque marker, an
/// empty directory, set-id and sticky modes, owners, sub-second mtimes, a fifo and devices; and
/// a large incompressible file just before a small one (for the bounded read; not at the
/// layer's end, whose read waits for the whole blob to be verified).
private func makeLayers(in ws: Workspace) async throws -> [FilesLayer] {
    _ = try Harness.tool("zstd", neededFor: "zstd layers (Debian package zstd)")
    let root = try ws.makeDirectory("files-rootfs")
    let long = String(repeating: "long-directory-name-", count: 4) + "/" + String(repeating: "n", count: 120)
    let longer = (1...4).map { "level\($0)-" + String(repeating: "x", count: 60) }.joined(separator: "/") + "/leaf.txt"
    try await shell("""
        set -e; cd '\(root)'
        mkdir -p usr/bin etc/ssl empty-dir var/lib/app "$(dirname '\(long)')" "$(dirname '\(longer)')" aa
        head -c 20000000 /dev/urandom > aa/big.bin
        printf 'deep and small\\n' > bb-small.txt
        seq 1 300000 > etc/numbers.txt
        printf 'long\\n' > '\(long)'; printf 'longer\\n' > '\(longer)'
        for i in $(seq 1 50); do echo "config $i" > etc/ssl/c$i.pem; done
        printf '#!/bin/sh\\necho hi\\n' > usr/bin/tool; chmod 4755 usr/bin/tool
        ln usr/bin/tool usr/bin/tool-hardlink; ln etc/numbers.txt var/lib/app/numbers-hardlink
        ln -s tool usr/bin/relative-link; ln -s /etc/numbers.txt usr/bin/absolute-link
        ln -s nowhere usr/bin/dangling; ln -s loop-b usr/bin/loop-a; ln -s loop-a usr/bin/loop-b
        ln -s '\(longer)' long-target-link
        touch var/lib/.wh.removed-file var/lib/app/.wh..wh..opq
        chmod 1777 empty-dir; chmod 0600 etc/ssl/c1.pem; chmod 2750 var/lib/app
        chown 1000:1001 etc/ssl/c2.pem; chown -h 33:44 usr/bin/relative-link; chown 65534:65534 var/lib
        mkfifo var/fifo; mknod var/char-device c 1 3; mknod var/block-device b 7 0
        touch -d '2021-03-04 05:06:07.123456789' etc/numbers.txt; touch -h -d '2019-01-01 00:00:01' usr/bin/dangling
        """, in: ws)
    let work = try ws.makeDirectory("files-layers")
    try await shell("""
        set -e; cd '\(work)'
        tar -C '\(root)' --format=pax --sort=name -cf pax.tar .
        tar -C '\(root)' --format=gnu --sort=name -cf gnu.tar .
        gzip -c -6 gnu.tar > gnu.tar.gz
        zstd -q -c -3 pax.tar > pax.tar.zst
        """, in: ws)
    let fixtures = "/work/shared/fixtures/buildkit-v0.32.2/local-cache/blobs/sha256/"
    let gzipType = "application/vnd.oci.image.layer.v1.tar+gzip"
    return [
        FilesLayer(name: "gzip (GNU tar format)", mediaType: gzipType, blob: work + "/gnu.tar.gz", tarFlags: "-z"),
        FilesLayer(name: "zstd (PAX format)", mediaType: "application/vnd.oci.image.layer.v1.tar+zstd", blob: work + "/pax.tar.zst",
                   tarFlags: "--zstd"),
        FilesLayer(name: "uncompressed (PAX format)", mediaType: "application/vnd.oci.image.layer.v1.tar", blob: work + "/pax.tar",
                   tarFlags: ""),
        FilesLayer(name: "BuildKit v0.32.2 busybox", mediaType: gzipType,
                   blob: fixtures + "c308f776b3c32360d501a195cd728da349e0a6c50f1379bcea49bfbf6282ca32", tarFlags: "-z"),
        FilesLayer(name: "BuildKit v0.32.2 with directories", mediaType: gzipType,
                   blob: fixtures + "28db54cf9ac68de1865408df9e1373e116ffbd4a48d380e38fd1c8198e4448f8", tarFlags: "-z"),
    ]
}

private func push(_ layers: [FilesLayer], to registry: Registry, in ws: Workspace) throws {
    try pushImage(layers.map { ImageLayer(blob: $0.blob, mediaType: $0.mediaType) },
                  config: Array(#"{"architecture":"amd64","os":"linux"}"#.utf8), to: registry, repository: "files", tag: "files", in: ws)
}

/// What find sees of a tree, one line per entry below it, sorted: type, mode, owner, mtime
/// (to the nanosecond), link count, and the size of everything but directories (whose size is
/// the filesystem's own business), a symlink's target (readlink through the mount), and a
/// device's major and minor numbers.
private func listing(of directory: String, in ws: Workspace) async throws -> String {
    try await shell("""
        cd '\(directory)' && { find . -mindepth 1 -type d -printf '%p %y %m %U %G %T@ %n\\n'; \
        find . -mindepth 1 ! -type d -printf '%p %y %m %U %G %T@ %n %s -> %l\\n'; \
        find . -mindepth 1 \\( -type c -o -type b \\) -exec stat -c '%n device %t:%T' {} +; } | LC_ALL=C sort
        """, in: ws).stdout
}

@Suite("files/ view", .serialized)
struct FilesViewIntegrationTests {
    @Test("find, stat and cat over files/sha256/<hex> agree with tar -x of the layer; a small file deep in a large layer costs a span")
    func filesView() async throws {
        try await withWorkspace("files-view") { ws in
            let registry = try await ws.startRegistry()
            let layers = try await makeLayers(in: ws)
            try push(layers, to: registry, in: ws)
            let cache = try ws.makeDirectory("shared-cache")
            let source = registry.source("files:files")
            let mount = try await ws.mountExpectingSuccess(source, cacheDir: cache)
            #expect(Set(FileIO.listDirectory(mount.path("files/sha256"))) == Set(layers.map(\.digest.hex)))

            for layer in layers {
                let extracted = try ws.makeDirectory("extracted-\(layer.digest.hex.prefix(12))")
                try await shell("tar -C '\(extracted)' \(layer.tarFlags) --same-owner --numeric-owner -xpf '\(layer.blob)'", in: ws)
                let view = mount.path("files/sha256/" + layer.digest.hex)
                let expected = try await listing(of: extracted, in: ws)
                let shown = try await listing(of: view, in: ws)
                #expect(!expected.isEmpty && shown == expected, "\(layer.name): find over the view and over tar -x differ")
                if !layer.name.hasPrefix("BuildKit") {
                    for kind in ["./var/char-device c", "./var/block-device b", "./var/fifo p", "./usr/bin/loop-a l", "./var/lib/.wh.removed-file f"] {
                        #expect(shown.contains(kind), "\(layer.name): \(kind)")
                    }
                }
                // Every regular file's bytes, read through the mount.
                let compared = try await shell("""
                    cd '\(extracted)' && n=0 && for f in $(find . -type f | LC_ALL=C sort); do \
                    cmp "$f" '\(view)'/"$f" || exit 1; n=$((n+1)); done; echo $n
                    """, in: ws).stdout
                #expect((Int(compared.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) > 0, "\(layer.name): files compared")
            }
            let ours = mount.path("files/sha256/" + layers[0].digest.hex)
            // Hard links are one inode with both names counted; symlinks are links, not followed.
            let tool = try FileIO.statFile(ours + "/usr/bin/tool"), again = try FileIO.statFile(ours + "/usr/bin/tool-hardlink")
            #expect(tool.st_ino == again.st_ino && tool.st_nlink == 2 && tool.st_mode & 0o7777 == 0o4755)
            var link = stat()
            #expect(lstat(ours + "/usr/bin/loop-a", &link) == 0 && link.st_mode & S_IFMT == S_IFLNK && link.st_size == 6)
            #expect(FileIO.errnoOf { open(ours + "/usr/bin/new-file", O_WRONLY | O_CREAT, 0o644) } == EROFS)
            #expect(FileIO.errnoOfOpenAndWrite(ours + "/etc/numbers.txt", O_WRONLY) == EROFS)
            // Kept beside the checkpoint index: the tar is walked once per machine.
            let kept = FileIO.listDirectory(cache + "/layers").filter { $0.hasSuffix(".files") }
            #expect(Set(kept) == Set(layers.map { $0.digest.hex + ".files" }))
            #expect(try await mount.unmount(in: ws).status == 0)

            // A fresh cache with the gzip layer's checkpoint index and member list but not its
            // blob: a small file after a 20 MB incompressible one fetches about a span.
            let fresh = try ws.makeDirectory("fresh-cache")
            let gzipLayer = layers[0]
            try await shell("""
                mkdir -p '\(fresh)/layers' && cp '\(cache)/layers/\(gzipLayer.digest.hex).index' \
                '\(cache)/layers/\(gzipLayer.digest.hex).files' '\(fresh)/layers/'
                """, in: ws)
            let servedBefore = registry.blobBytesServed(repo: "files", digest: gzipLayer.digest.description)
            let second = try await ws.mountExpectingSuccess(source, cacheDir: fresh)
            let small = try await shell("cat '\(second.path("files/sha256/" + gzipLayer.digest.hex + "/bb-small.txt"))'", in: ws).stdout
            #expect(small == "deep and small\n")
            let served = registry.blobBytesServed(repo: "files", digest: gzipLayer.digest.description) - servedBefore
            let blobSize = Int64(try FileIO.statFile(gzipLayer.blob).st_size)
            #expect(served > 0 && served <= 6 << 20 && served < blobSize / 2,
                    "reading a 15-byte file fetched \(served) of the blob's \(blobSize) bytes")
            #expect(try await second.unmount(in: ws).status == 0)

            // With only the checkpoint index there, a new walk over the tar's headers makes the
            // same tree. It reads up to the tar's end, which (as for blobs/) is answered only
            // once the whole blob is verified: the blob comes once, and no more.
            let indexOnly = try ws.makeDirectory("index-only-cache")
            try await shell("mkdir -p '\(indexOnly)/layers' && cp '\(cache)/layers/\(gzipLayer.digest.hex).index' '\(indexOnly)/layers/'",
                            in: ws)
            let walkedBefore = registry.blobBytesServed(repo: "files", digest: gzipLayer.digest.description)
            let third = try await ws.mountExpectingSuccess(source, cacheDir: indexOnly)
            let extractedAgain = try ws.makeDirectory("extracted-again")
            try await shell("tar -C '\(extractedAgain)' -z --same-owner --numeric-owner -xpf '\(gzipLayer.blob)'", in: ws)
            let walkedListing = try await listing(of: third.path("files/sha256/" + gzipLayer.digest.hex), in: ws)
            #expect(try await walkedListing == listing(of: extractedAgain, in: ws))
            let walked = registry.blobBytesServed(repo: "files", digest: gzipLayer.digest.description) - walkedBefore
            #expect(walked > 0 && walked <= blobSize, "walking the headers fetched \(walked) of the blob's \(blobSize) bytes")
            #expect(try await third.unmount(in: ws).status == 0)
        }
    }
}
