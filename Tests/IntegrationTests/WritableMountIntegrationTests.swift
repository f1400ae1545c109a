import Foundation
import OCI
import SystemSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Writable mounts end to end: the built binary mounted with --writable through FUSE, BuildKit's
// export replayed into it with system calls (ExportReplay.swift), `ocicachefs unmount`, and the
// result checked on the real docker-registry or moto directly, then read back by a read-only
// mount of a fresh machine (an empty cache directory).

/// Layers shaped as the fixtures' (sizes of the v0.11.6 and v0.32.2 builds, a shared base).
private enum Layers {
    static let base = BuildCache.Layer.random(seed: 1, size: 1_068_619, createdAt: "2026-11-21T12:42:11.22262472Z")

    /// v0.11.6's cache of four layers, the index variant.
    static let v0_11_6 = BuildCache(chain: [base, .random(seed: 2, size: 9_966, createdAt: "2026-11-21T12:42:11.631811604Z"),
                                            .random(seed: 3, size: 4_195_730, createdAt: "2026-11-21T12:42:11.701095143Z"),
                                            .random(seed: 4, size: 231, createdAt: "2026-11-21T12:42:11.77623431Z")],
                                    variant: .index, salt: "v0.11.6")

    /// v0.32.2's cache over the same base, the image-manifest variant; three layers written at once.
    static let v0_32_2 = BuildCache(chain: [base, .random(seed: 5, size: 3_001_231), .random(seed: 6, size: 2_000_809),
                                            .random(seed: 7, size: 2_500_000)],
                                    variant: .imageManifest, salt: "v0.32.2")
}

@Suite("writable mounts: BuildKit's export through FUSE, published and read back")
struct WritableMountIntegrationTests {
    static let verityRefusals: Set<Int32> = [ENOTTY, EOPNOTSUPP]

    @Test("v0.11.6 and v0.32.2 exports through one writable mount are published as BuildKit would, and read back byte for byte from an empty cache",
          arguments: RemoteKind.allCases)
    func exportsArePublishedAndReadBack(_ kind: RemoteKind) async throws {
        try await withWorkspace("wexport-\(kind)") { ws in
            let remote = try await ExportRemote.start(kind, in: ws)
            let (old, new) = (Layers.v0_11_6, Layers.v0_32_2)
            let mark = remote.requests().count
            let mount = try await remote.mount(["v011", "v032"], writable: true)

            let first = try await replayExport(old, into: mount, tag: "v011", version: .v0_11_6)
            #expect(first.indexCloseErrno == 0, "close(index.json): \(String(cString: strerror(first.indexCloseErrno)))")
            #expect(first.written(old) == old.blobs.map(\.digest), "v0.11.6 writes every blob of an empty layout")
            let second = try await replayExport(new, into: mount, tag: "v032", version: .v0_32_2)
            #expect(second.indexCloseErrno == 0, "close(index.json): \(String(cString: strerror(second.indexCloseErrno)))")
            #expect(second.verityErrno.map(Self.verityRefusals.contains) == true, "fs-verity must be refused: \(String(describing: second.verityErrno))")
            // The base layer the first export committed is found by stat: not written again.
            #expect(second.blobs[Layers.base.digest] == .alreadyExists)
            #expect(Set(second.written(new)) == Set(new.blobs.map(\.digest)).subtracting([Layers.base.digest]))

            // The layout as BuildKit leaves a local directory.
            #expect(FileIO.listDirectory(mount.mountpoint) == ["blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
            #expect(FileIO.listDirectory(mount.path("ingest")).isEmpty)
            let allBlobs = Set((old.blobs + new.blobs).map(\.hex))
            #expect(Set(FileIO.listDirectory(mount.path("blobs/sha256"))) == allBlobs)
            for blob in old.blobs + new.blobs {
                let info = try FileIO.statFile(mount.blobPath(blob.digest.description))
                #expect(Int64(info.st_size) == blob.size && info.st_mode & 0o777 == 0o444, "\(blob) after its commit")
            }
            let index = try FileIO.json(mount.path("index.json"))
            let tagged = (index["manifests"] as? [[String: Any]] ?? []).map {
                (($0["annotations"] as? [String: String])?["org.opencontainers.image.ref.name"] ?? "", $0["digest"] as? String ?? "")
            }
            #expect(tagged.map(\.0) == ["v011", "v032"] && tagged.map(\.1) == [old.manifest.digest.description, new.manifest.digest.description],
                    "index.json keeps the other tag: \(tagged)")

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            #expect(!mount.isMounted)

            // On the remote: each blob uploaded once (the shared base too), one write per tag.
            let requests = remote.requests()[mark...]
            #expect(remote.uploadedBlobs(requests).sorted() == allBlobs.map { "sha256:" + $0 }.sorted(),
                    "uploads: \(remote.blobWrites(requests))")
            #expect(remote.tagWrites(requests).count == 2, "\(remote.tagWrites(requests))")
            try await remote.expectPublished(old, tag: "v011")
            try await remote.expectPublished(new, tag: "v032")

            try await remote.expectReadBack([("v011", old), ("v032", new)])
        }
    }

    @Test("one job imports a tenth of the cache lazily and exports through the same writable mount: only the new blobs are uploaded, the tag moves")
    func importThenExportThroughOneMount() async throws {
        try await withWorkspace("wjob") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let registry = try #require(remote.registry)
            let seed = try await ws.seed(registry, repo: ExportRemote.repository, tag: "main", variant: "manifest", layers: 4,
                                         layerSize: 2_000_000, seed: 11)
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint

            // The import: store opened, index.json read under its lock, manifest and config
            // read whole, then the first tenth of the cache's layer bytes in one 1 MiB-bounded pread.
            let imported = try await onThread { () -> Result<([UInt8], [UInt8], [UInt8], Int32), any Error> in
                Result {
                    let verity = try BuildctlImport.openStore(root)
                    let index = try BuildctlImport.readIndexUnderLock(root)
                    let manifest = try BuildctlImport.readWhole(root + "/blobs/sha256/" + seed.manifest.hex)
                    guard let layer = seed.layers.first else { throw HarnessError("the seed has no layer") }
                    let tenth = Int(seed.layers.reduce(0) { $0 + $1.size } / 10)
                    let fd = open(root + "/blobs/sha256/" + layer.hex, O_RDONLY | O_CLOEXEC)
                    guard fd >= 0 else { throw BuildctlImport.fail("open", layer.hex) }
                    defer { close(fd) }
                    var bytes = [UInt8](repeating: 0, count: min(tenth, 1 << 20))
                    let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, $0.count, 0) }
                    guard n == bytes.count else { throw BuildctlImport.fail("pread", layer.hex) }
                    return (index, manifest, bytes, verity)
                }
            }.value.get()
            #expect(Self.verityRefusals.contains(imported.3))
            #expect(String(decoding: imported.0, as: UTF8.self).contains(seed.manifest.digest), "index.json names the seeded manifest")
            #expect(Digest.sha256(of: imported.1).description == seed.manifest.digest)
            #expect(!FileManager.default.fileExists(atPath: mount.path("index.json.lock")), "the import removed its lock file")

            // The export: the chain goes on with two new layers; a new config and manifest, same tag.
            let manifest = try #require(try JSONSerialization.jsonObject(with: Data(imported.1)) as? [String: Any])
            let existing = try (manifest["layers"] as? [[String: Any]] ?? []).map(BuildCache.Layer.init(existing:))
            #expect(existing.map(\.digest.description) == seed.layers.map(\.digest))
            let cache = BuildCache(chain: existing + [.random(seed: 21, size: 1_500_000), .random(seed: 22, size: 700_000)],
                                   variant: .imageManifest, salt: "job 2")
            // The layers after the one read are fetched ahead (the rest of its chain); once they
            // are kept, the export starts.
            let ahead = seed.layers.dropFirst().map(\.hex)
            #expect(FileIO.cachedBlobs(mount.cacheDir, expecting: ahead, timeout: 20).isSuperset(of: ahead))
            let mark = remote.requests().count
            let outcome = try await replayExport(cache, into: mount, tag: "main", version: .v0_32_2)
            #expect(outcome.indexCloseErrno == 0)
            #expect(Set(outcome.written(cache)) == Set(cache.newBlobs.map(\.digest)), "the seeded layers are found by stat, never written")
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")

            let requests = remote.requests()[mark...]
            #expect(remote.uploadedBlobs(requests).sorted() == cache.newBlobs.map(\.digest.description).sorted(),
                    "only the two new layers, the config and the manifest go up: \(remote.blobWrites(requests))")
            #expect(remote.blobWrites(requests).allSatisfy { write in !seed.layers.contains { write.path.contains($0.digest) } })
            #expect(remote.tagWrites(requests).count == 1)
            // Publishing downloaded nothing, yet the new tag reaches every seeded layer.
            #expect(!requests.contains { $0.method == "GET" && $0.path.contains("/blobs/sha256:") }, "\(Array(requests))")
            for layer in seed.layers.dropFirst() {
                #expect(registry.blobGets(repo: ExportRemote.repository, digest: layer.digest) == 1, "layer \(layer.digest), fetched ahead once")
            }
            let first = try #require(seed.layers.first)
            #expect(try await remote.tagDocument("main") == cache.manifest.bytes, "the tag points at the new manifest")
            try await remote.expectPublished(cache, tag: "main")
            let served = try await remote.blobs([try #require(Digest(first.digest))])
            #expect(served.values.first.map { Array($0.prefix(imported.2.count)) } == imported.2, "the tenth read is the layer's start")
        }
    }

    /// A registry mount shows the exported manifest and config, so the export finds every blob
    /// and the tag is unchanged. An S3 mount shows the index variant it synthesises from the
    /// manifest object: the export writes its config and manifest again (the remote has them:
    /// nothing is sent) and the tag is written again with the same bytes, as BuildKit's own S3
    /// exporter does on every export.
    @Test("exporting a cache the remote already holds through a fresh writable mount uploads no blob, even when every blob is written and renamed again",
          arguments: RemoteKind.allCases)
    func reExportOfAnUnchangedCacheUploadsNothing(_ kind: RemoteKind) async throws {
        try await withWorkspace("wreexport-\(kind)") { ws in
            let remote = try await ExportRemote.start(kind, in: ws)
            let cache = Layers.v0_32_2
            let first = try await remote.mount(["main"], writable: true)
            #expect(try await replayExport(cache, into: first, tag: "main", version: .v0_32_2).indexCloseErrno == 0)
            let firstUnmount = try await first.unmount(in: ws)
            #expect(firstUnmount.status == 0, "\(firstUnmount)")
            let published = try await remote.tagDocument("main")
            #expect(published != nil)

            let mark = remote.requests().count
            let second = try await remote.mount(["main"], writable: true)
            let again = try await replayExport(cache, into: second, tag: "main", version: .v0_32_2)
            #expect(again.indexCloseErrno == 0)
            let rewritten = kind == .registry ? [] : [cache.config.digest, cache.manifest.digest]
            #expect(again.written(cache) == rewritten, "the blobs the mount shows are found by stat: \(again.blobs)")
            // Two exports racing into one directory write and rename blobs that are there already.
            let forced = try await replayExport(cache, into: second, tag: "main", version: .v0_32_2, skipExistenceCheck: true)
            #expect(forced.indexCloseErrno == 0)
            #expect(forced.written(cache) == cache.blobs.map(\.digest))
            Check.blobsVerify(second, cache.blobs.map { .init(mediaType: "", digest: $0.digest.description, size: $0.size, role: $0.role) })
            let unmounted = try await second.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(second.log.suffix(3000))")

            let requests = remote.requests()[mark...]
            #expect(remote.blobWrites(requests).isEmpty, "nothing is uploaded: \(remote.blobWrites(requests))")
            // The mount asks the remote only about blobs it did not show; those it showed are there.
            #expect(Set(remote.blobChecks(requests).map(\.path)) == Set(rewritten.map(remote.blobPath)),
                    "existence checks: \(remote.blobChecks(requests))")
            #expect(remote.tagWrites(requests).count == (kind == .registry ? 0 : 1), "tag writes: \(remote.tagWrites(requests))")
            let layerReads = remote.blobReads(requests, of: cache.layers.map(\.digest))
            #expect(layerReads.isEmpty, "layers are found by stat or renamed in, never downloaded: \(layerReads)")
            #expect(try await remote.tagDocument("main") == published)
        }
    }

    @Test("kill -9 in the middle of an upload: the remote keeps its previous tag, and the next writable mount of the cache directory finishes the export",
          arguments: RemoteKind.allCases)
    func killedDuringAnUploadThenResumed(_ kind: RemoteKind) async throws {
        try await withWorkspace("wkill-\(kind)") { ws in
            let remote = try await ExportRemote.start(kind, in: ws)
            try await remote.seed(tag: "main", seed: 31)
            let previous = try await remote.expectComplete(tag: "main")
            let proxy = try await ws.startHoldingProxy(upstreamPort: remote.port)
            let cacheDir = try ws.makeDirectory("cache-kept")
            let cache = Layers.v0_32_2

            let first = try await remote.mount(["main"], writable: true, cacheDir: cacheDir, via: proxy)
            // The largest layer's bytes wait at the proxy; every other blob goes up.
            let slow = try #require(cache.layers.max { $0.size < $1.size })
            let others = cache.newBlobs.map(\.digest).filter { $0 != slow.digest }
            try proxy.hold("^(PUT|PATCH|POST) \\S*\(slow.hex)")
            let mark = remote.requests().count
            let outcome = try await replayExport(cache, into: first, tag: "main", version: .v0_32_2)
            #expect(outcome.indexCloseErrno == 0)
            try await proxy.waitFor("the upload of \(slow) held") { $0.held == 1 }
            // Once the others are up, only the held layer keeps the tag back.
            let deadline = Date().addingTimeInterval(20)
            while !Set(remote.uploadedBlobs(remote.requests()[mark...])).isSuperset(of: others.map(\.description)) && Date() < deadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            let daemons = first.daemonPIDs
            #expect(daemons.count == 1, "one daemon serves the mount: \(daemons)")
            for pid in daemons { kill(pid, SIGKILL) }
            while daemons.contains(where: Processes.isAlive) && Date() < deadline { try await Task.sleep(for: .milliseconds(10)) }
            #expect(!daemons.contains(where: Processes.isAlive))
            // What the daemon had in flight dies with it: the proxy drops it, never forwards it.
            try await proxy.waitFor("the held upload dropped") { $0.held == 0 && $0.dropped == 1 }
            let cleared = try await first.unmount(in: ws)
            #expect(!first.isMounted, "the dead mount is gone: \(cleared)")

            // The remote: the previous tag, intact and complete; every new blob but the held one.
            #expect(remote.uploadedBlobs(remote.requests()[mark...]).sorted() == others.map(\.description).sorted())
            #expect(remote.tagWrites(remote.requests()[mark...]).isEmpty, "no tag write while a blob it reaches is missing")
            #expect(try await remote.tagDocument("main") == previous)
            try await remote.expectComplete(tag: "main")
            #expect(Set(try await remote.blobs(cache.newBlobs.map(\.digest)).keys) == Set(others))

            try proxy.hold(nil)
            let second = try await remote.mount(["main"], writable: true, cacheDir: cacheDir, via: proxy)
            // It shows the export it is finishing.
            let index = try FileIO.json(second.path("index.json"))
            #expect((index["manifests"] as? [[String: Any]])?.first?["digest"] as? String == cache.manifest.digest.description,
                    "index.json shows the tag still to publish: \(index)")
            let unmounted = try await second.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(second.log.suffix(3000))")
            #expect(second.log.contains("resuming uploads an earlier mount left unfinished"))

            try await remote.expectPublished(cache, tag: "main")
            if kind == .registry { #expect(try await remote.tagDocument("main") == cache.manifest.bytes) }
        }
    }

    @Test("two writable mounts of one tag, mounted together, export one after the other: the second wins, complete")
    func twoMountsExportToOneTag() async throws {
        try await withWorkspace("wtwo") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            try await remote.seed(tag: "main", seed: 41)
            let first = try await remote.mount(["main"], writable: true)
            let second = try await remote.mount(["main"], writable: true)
            let earlier = BuildCache(chain: [Layers.base, .random(seed: 42, size: 1_200_000)], variant: .imageManifest, salt: "first")
            let later = BuildCache(chain: [Layers.base, .random(seed: 43, size: 900_000), .random(seed: 44, size: 300_000)],
                                   variant: .imageManifest, salt: "second")

            #expect(try await replayExport(earlier, into: first, tag: "main", version: .v0_32_2).indexCloseErrno == 0)
            let firstUnmount = try await first.unmount(in: ws)
            #expect(firstUnmount.status == 0, "\(firstUnmount)")
            #expect(try await remote.tagDocument("main") == earlier.manifest.bytes)

            // The second mount still shows the seeded tag, and its own export moves it.
            #expect(try await replayExport(later, into: second, tag: "main", version: .v0_32_2).indexCloseErrno == 0)
            let secondUnmount = try await second.unmount(in: ws)
            #expect(secondUnmount.status == 0, "\(secondUnmount); daemon log: \(second.log.suffix(3000))")
            try await remote.expectPublished(later, tag: "main")
            // Nothing is ever deleted: the first export's blobs stay.
            #expect(try await remote.blobs(earlier.newBlobs.map(\.digest)).count == earlier.newBlobs.count)
            try await remote.expectReadBack([("main", later)])
        }
    }

    @Test("bad input: a blob whose content is not its name (EIO), files made in blobs/ (EPERM), an index.json that is not JSON (EIO at close); nothing is uploaded and unmount names the refused index")
    func badBlobsAndAnInvalidIndexAreRefused() async throws {
        try await withWorkspace("wbad") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            try await remote.seed(tag: "main", seed: 51)
            let before = try await remote.expectComplete(tag: "main")
            let mark = remote.requests().count
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint

            // A rename into blobs/sha256 whose content does not hash to the name.
            let ingest = root + "/ingest/bad"
            #expect(mkdir(ingest, 0o755) == 0)
            let data = ingest + "/data"
            try BuildctlExport.writeFile(data, Array(repeating: 7, count: 100_000), flags: O_WRONLY | O_CREAT | O_TRUNC)
            let claimed = Digest.sha256(of: Array(repeating: 8, count: 100_000)).hex
            #expect(FileIO.errnoOf { rename(data, root + "/blobs/sha256/" + claimed) } == EIO)
            #expect(!FileIO.listDirectory(root + "/blobs/sha256").contains(claimed))
            #expect(FileManager.default.fileExists(atPath: data), "the refused file stays where it was")

            // Nothing else makes a file in blobs/ or changes a blob.
            func create(_ path: String) -> Int32 {
                let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
                if fd >= 0 { close(fd) }
                return fd
            }
            #expect(FileIO.errnoOf { create(root + "/blobs/sha256/" + claimed) } == EPERM)
            #expect(FileIO.errnoOf { create(root + "/blobs/notes") } == EPERM)
            #expect(FileIO.errnoOf { mkdir(root + "/blobs/sha512", 0o755) } == EPERM)
            let existing = try #require(FileIO.listDirectory(root + "/blobs/sha256").first)
            #expect(FileIO.errnoOf {
                let fd = open(root + "/blobs/sha256/" + existing, O_WRONLY | O_CLOEXEC)
                if fd >= 0 { close(fd) }
                return fd
            } == EPERM)
            #expect(FileIO.errnoOf { truncate(root + "/blobs/sha256/" + existing, 0) } == EPERM)

            // index.json rewritten with something that is not JSON: close fails with EIO.
            let lock = try BuildctlExport.openFile(root + "/index.json.lock", O_RDONLY | O_CREAT, 0o600)
            #expect(flock(lock, LOCK_EX | LOCK_NB) == 0)
            let index = try BuildctlExport.openFile(root + "/index.json", O_RDWR | O_CREAT, 0o644)
            let garbage = Array(#"{"schemaVersion":2,"manifests":[{"mediaType":"#.utf8)
            #expect(garbage.withUnsafeBytes { pwrite(index, $0.baseAddress!, $0.count, 0) } == garbage.count)
            #expect(ftruncate(index, off_t(garbage.count)) == 0)
            #expect(FileIO.errnoOf { close(index) } == EIO, "close(index.json) reports the refused tag commit")
            #expect(flock(lock, LOCK_UN) == 0 && close(lock) == 0 && unlink(root + "/index.json.lock") == 0)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status != 0, "unmount must fail: \(unmounted)")
            #expect(unmounted.stderr.contains("not published: index.json"), "names the refused index: \(unmounted)")
            #expect(!mount.isMounted)
            let requests = remote.requests()[mark...]
            #expect(remote.blobWrites(requests).isEmpty && remote.tagWrites(requests).isEmpty, "nothing uploaded: \(Array(requests))")
            #expect(try await remote.tagDocument("main") == before, "the remote tag is unchanged")
        }
    }

    @Test("an index.json whose tag reaches blobs the mount lacks fails its close with EIO; the S3 tag is unchanged and unmount names it")
    func aTagReachingMissingBlobsIsRefused() async throws {
        try await withWorkspace("wmissing") { ws in
            let remote = try await ExportRemote.start(.s3, in: ws)
            try await remote.seed(tag: "main", seed: 61)
            let before = try await remote.expectComplete(tag: "main")
            let mount = try await remote.mount(["main"], writable: true)
            let cache = BuildCache(chain: [.random(seed: 62, size: 400_000), .random(seed: 63, size: 300_000)],
                                   variant: .imageManifest, salt: "missing")
            let mark = remote.requests().count

            // The manifest itself is not there.
            let noManifest = try await onThread {
                Result { try BuildctlExport.writeIndex(mount.mountpoint, tag: "main", manifest: cache.manifest,
                                                       mediaType: cache.manifestMediaType, version: .v0_32_2, rewrite: { $0 }) }
            }.value.get()
            #expect(noManifest == EIO)
            #expect(remote.blobWrites(remote.requests()[mark...]).isEmpty)

            // The config and manifest are committed, a layer is not.
            let missing = try #require(cache.layers.first)
            for blob in cache.blobs where blob.digest != missing.digest {
                #expect(try BuildctlExport.exportBlob(blob, root: mount.mountpoint, version: .v0_32_2, skipExistenceCheck: false) == .written)
            }
            let noLayer = try await onThread {
                Result { try BuildctlExport.writeIndex(mount.mountpoint, tag: "main", manifest: cache.manifest,
                                                       mediaType: cache.manifestMediaType, version: .v0_32_2, rewrite: { $0 }) }
            }.value.get()
            #expect(noLayer == EIO)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status != 0, "unmount must fail: \(unmounted)")
            #expect(unmounted.stderr.contains("not published: tag main") && unmounted.stderr.contains(missing.digest.description),
                    "names the tag and the blob it lacks: \(unmounted)")
            let requests = remote.requests()[mark...]
            #expect(remote.tagWrites(requests).isEmpty, "\(Array(requests))")
            #expect(!remote.uploadedBlobs(requests).contains(missing.digest.description))
            #expect(try await remote.tagDocument("main") == before, "the remote tag is unchanged")
        }
    }

    @Test("a layer larger than --upload-cutoff goes up in chunks (registry) or parts (S3) and reads back byte for byte",
          arguments: RemoteKind.allCases)
    func aLargeLayerIsSentInPieces(_ kind: RemoteKind) async throws {
        try await withWorkspace("wlarge-\(kind)") { ws in
            let remote = try await ExportRemote.start(kind, in: ws)
            // Above the cutoff the mount is given, below the default; a random MiB repeated, and
            // a tail that is not a whole MiB.
            let block = try #require(BuildCache.Layer.random(seed: 91, size: 1 << 20).bytes)
            var bytes: [UInt8] = []
            bytes.reserveCapacity(71 << 20)
            for _ in 0..<70 { bytes += block }
            bytes += [UInt8](repeating: 0x5A, count: 123_457)
            let digest = Digest.sha256(of: bytes)
            let large = BuildCache.Layer(digest: digest, size: Int64(bytes.count),
                                         diffID: Digest.sha256(of: Array("uncompressed \(digest)".utf8)).description,
                                         createdAt: "2026-12-02T12:25:33.613844879Z", bytes: bytes)
            let cache = BuildCache(chain: [Layers.base, large], variant: .imageManifest, salt: "large")
            let mark = remote.requests().count
            let mount = try await remote.mount(["main"], writable: true, options: ["--upload-cutoff", "64M"])
            #expect(try await replayExport(cache, into: mount, tag: "main", version: .v0_32_2).indexCloseErrno == 0)
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")

            let requests = remote.requests()[mark...]
            #expect(remote.uploadedBlobs(requests).sorted() == cache.blobs.map(\.digest.description).sorted())
            let pieces = remote.blobWrites(requests).filter { request in
                kind == .registry ? request.method == "PATCH" : request.method == "PUT" && request.path.contains("partNumber=")
            }
            // S3: 16 MiB parts after the commit. Registry: streamed while written (EarlyUploadTests),
            // in PATCHes of at most the cutoff.
            #expect(pieces.count >= (kind == .registry ? 2 : 4), "\(Int64(bytes.count) >> 20) MiB in pieces: \(remote.blobWrites(requests))")
            try await remote.expectPublished(cache, tag: "main")
            try await remote.expectReadBack([("main", cache)])
        }
    }

    /// containerd resumes an ingest it finds (the client died mid-write): `data` is read whole to
    /// hash what is there, reopened without O_TRUNC and continued at its end; or, on a restart,
    /// truncated to 0 and written again (buildkit-cache.md section 3, steps 2 and 5).
    @Test("a blob write a client left half done is resumed, or truncated and restarted, by the next export in the same ingest directory")
    func anInterruptedBlobWriteIsResumed() async throws {
        try await withWorkspace("wresume") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let cache = BuildCache(chain: [.random(seed: 81, size: 3_000_000), .random(seed: 82, size: 1_500_000)],
                                   variant: .imageManifest, salt: "resumed")
            let (continued, restarted) = (try #require(cache.chain[0].bytes), try #require(cache.chain[1].bytes))
            func ingest(_ bytes: [UInt8]) -> String { root + "/ingest/" + Digest.sha256(of: Array("layer-\(Digest.sha256(of: bytes))".utf8)).hex }

            // The first client dies: half of one layer written, garbage in the other.
            for (bytes, written) in [(continued, Array(continued[..<1_200_000])), (restarted, [UInt8](repeating: 0xAB, count: 700_000))] {
                let directory = ingest(bytes)
                try BuildctlExport.mkdirAll(directory, 0o755)
                try BuildctlExport.writeFile(directory + "/ref", Array("layer-\(Digest.sha256(of: bytes))".utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
                try BuildctlExport.writeFile(directory + "/total", Array(String(bytes.count).utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
                try BuildctlExport.writeTimestamp(directory, "startedat")
                try BuildctlExport.writeTimestamp(directory, "updatedat")
                try BuildctlExport.writeFile(directory + "/data", written, flags: O_WRONLY | O_CREAT)
            }

            // The next client resumes the first: data read whole, then continued where it ends.
            let first = ingest(continued)
            #expect(FileIO.errnoOf { mkdir(first, 0o755) } == EEXIST)
            let partial = try FileIO.readAll(first + "/data")
            #expect(partial == Array(continued[..<partial.count]), "the staged half reads back as written")
            let writer = try BuildctlExport.openFile(first + "/data", O_WRONLY | O_CREAT, 0o666)
            #expect(lseek(writer, off_t(partial.count), SEEK_SET) == off_t(partial.count))
            try BuildctlExport.writeAll(writer, continued[partial.count...], first + "/data")
            #expect(fsync(writer) == 0 && close(writer) == 0)
            // ...and restarts the second: truncated to nothing, written from the start.
            let second = ingest(restarted)
            let rewriter = try BuildctlExport.openFile(second + "/data", O_WRONLY | O_CREAT, 0o666)
            #expect(ftruncate(rewriter, 0) == 0 && lseek(rewriter, 0, SEEK_SET) == 0)
            try BuildctlExport.writeAll(rewriter, restarted[...], second + "/data")
            #expect(fsync(rewriter) == 0 && close(rewriter) == 0)
            for (bytes, directory) in [(continued, first), (restarted, second)] {
                let target = root + "/blobs/sha256/" + Digest.sha256(of: bytes).hex
                #expect(FileIO.errnoOf { rename(directory + "/data", target) } == 0, "the completed blob commits")
                try BuildctlExport.removeAll(directory, expecting: ["ref", "startedat", "total", "updatedat"])
            }
            // The rest of the export finds both layers and writes the config, manifest and tag.
            let outcome = try await replayExport(cache, into: mount, tag: "main", version: .v0_32_2)
            #expect(outcome.written(cache) == [cache.config.digest, cache.manifest.digest])
            #expect(outcome.indexCloseErrno == 0)
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            try await remote.expectPublished(cache, tag: "main")
        }
    }

    @Test("index.json.lock in a writable mount: BuildKit's import creates and unlinks it, exclusive locks exclude, and no lock file is ever published")
    func lockFilesInAWritableMount() async throws {
        try await withWorkspace("wlock") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let registry = try #require(remote.registry)
            let seed = try await ws.seed(registry, repo: ExportRemote.repository, tag: "main", variant: "index", layers: 2,
                                         layerSize: 700_000, seed: 71)
            let mark = remote.requests().count
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let lockPath = root + "/index.json.lock"

            // --import-cache: lock file created, shared lock, index.json, unlock, unlink; twice.
            for _ in 0..<2 {
                let outcome = try await onThread { Result { try BuildctlImport.run(root, tag: "main") } }.value.get()
                #expect(outcome.layers.map(\.digest) == seed.layers.map(\.digest))
                #expect(outcome.layers.allSatisfy { Digest.sha256(of: $0.bytes).description == $0.digest })
                #expect(!FileManager.default.fileExists(atPath: lockPath))
            }

            // Two holders, as two exporting clients: the second's non-blocking lock fails.
            let holder = try BuildctlExport.openFile(lockPath, O_RDONLY | O_CREAT, 0o600)
            #expect(flock(holder, LOCK_EX | LOCK_NB) == 0)
            let other = try BuildctlExport.openFile(lockPath, O_RDONLY | O_CREAT, 0o600)
            #expect(FileIO.errnoOf { flock(other, LOCK_EX | LOCK_NB) } == EWOULDBLOCK)
            #expect(FileIO.errnoOf { flock(other, LOCK_SH | LOCK_NB) } == EWOULDBLOCK)
            #expect(flock(holder, LOCK_UN) == 0)
            #expect(flock(other, LOCK_SH | LOCK_NB) == 0)
            #expect(flock(other, LOCK_UN) == 0)
            #expect(close(holder) == 0 && close(other) == 0)
            #expect(unlink(lockPath) == 0)
            #expect(FileIO.errnoOf { unlink(lockPath) } == ENOENT)
            #expect(FileIO.listDirectory(root) == ["blobs", "files", "index.json", "ingest", "layers", "oci-layout"])

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
            let requests = remote.requests()[mark...]
            #expect(remote.blobWrites(requests).isEmpty && remote.tagWrites(requests).isEmpty, "an import publishes nothing: \(Array(requests))")
        }
    }

    @Test("a file written through a writable mount leaves no copy in the mount's page cache (the staged file on disk is its one copy), and reads back as written")
    func writtenFilesStayOutOfTheMountsPageCache() async throws {
        try await withWorkspace("wdirect") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let bytes = try #require(BuildCache.Layer.random(seed: 93, size: 8 << 20).bytes)
            let whole = Int64(0)..<Int64(bytes.count)

            /// Writes `bytes` into `path` as BuildKit writes a blob; the file stays open.
            func written(_ path: String) throws -> Int32 {
                let fd = try BuildctlExport.openFile(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
                try EarlyUploadTests.write(fd, bytes[...], at: 0)
                return fd
            }

            // The control: the same writes into a local file leave their pages cached, so a count
            // of 0 below is the mount's doing and not a blind cachestat.
            let local = try written(ws.path("local-data"))
            #expect(try cachedPageCount(fd: local, whole).get() == Int64(bytes.count) / Int64(getpagesize()))
            #expect(close(local) == 0)

            #expect(mkdir(root + "/ingest/direct", 0o755) == 0)
            let fd = try written(root + "/ingest/direct/data")
            #expect(try cachedPageCount(fd: fd, whole).get() == 0, "the client's writes left pages in the mount's page cache")
            var readBack = [UInt8](repeating: 0, count: bytes.count)
            let got = readBack.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, $0.count, 0) }
            #expect(got == bytes.count && sameBytes(readBack, bytes), "the file reads back as written")
            #expect(try cachedPageCount(fd: fd, whole).get() == 0, "reading it back left pages in the mount's page cache")
            #expect(close(fd) == 0)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
        }
    }
}
