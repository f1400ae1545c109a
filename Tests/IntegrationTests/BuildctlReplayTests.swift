import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The file operations `buildctl --import-cache type=local,src=MOUNT,tag=TAG` performs
/// (shared/reference/buildkit-cache.md sections 1, 2 and 5), replayed with raw system calls.
enum BuildctlImport {
    /// FS_IOC_ENABLE_VERITY = _IOW('f', 133, struct fsverity_enable_arg /* 128 bytes */).
    static let enableVerity: UInt = 0x4080_6685

    struct Outcome {
        var manifest: [UInt8]
        var cacheConfig: [UInt8]?
        /// Layer digest -> bytes read chunk by chunk.
        var layers: [(digest: String, size: Int64, bytes: [UInt8], chunks: Int)]
        var verityErrno: Int32
    }

    static func fail(_ call: String, _ path: String) -> SysError { SysError(call: call, path: path, code: errno) }

    /// Opening the content store: `stat(DIR)`; containerd 1.x `MkdirAll(DIR/ingest)`;
    /// containerd 2.x fs-verity probe (mkdir `.fsverity-check-*`, create `supported`,
    /// FS_IOC_ENABLE_VERITY, remove both). Returns the ioctl's errno (0 if it succeeded).
    static func openStore(_ root: String) throws -> Int32 {
        var info = stat()
        guard stat(root, &info) == 0 else { throw fail("stat", root) }
        // MkdirAll: stat first (observed), then mkdir, where EEXIST on a directory is success.
        let ingest = root + "/ingest"
        if stat(ingest, &info) != 0 {
            guard mkdir(ingest, 0o755) == 0 || errno == EEXIST else { throw fail("mkdir", ingest) }
        }
        guard mkdir(ingest, 0o755) != 0, errno == EEXIST else {
            throw SysError(call: "mkdir (must fail with EEXIST)", path: ingest, code: errno)
        }
        guard stat(ingest, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else { throw fail("stat dir", ingest) }

        let probe = root + "/.fsverity-check-\(UInt32.random(in: 100_000_000...999_999_999))"
        guard mkdir(probe, 0o700) == 0 else { throw fail("mkdir", probe) }
        let supported = probe + "/supported"
        let fd = open(supported, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw fail("create", supported) }
        var argument = [UInt8](repeating: 0, count: 128)
        argument[0] = 1  // version
        argument[4] = 1  // hash_algorithm SHA-256
        argument[8] = 0x10  // block_size 4096 (little-endian 0x1000)
        argument[9] = 0
        errno = 0
        let rc = argument.withUnsafeMutableBytes { ioctl(fd, enableVerity, $0.baseAddress!) }
        let verityErrno = rc == 0 ? 0 : errno
        close(fd)
        guard unlink(supported) == 0 else { throw fail("unlink", supported) }
        guard rmdir(probe) == 0 else { throw fail("rmdir", probe) }
        return verityErrno
    }

    /// `client/ociindex`: lock file created, shared-locked, index.json read, unlocked, closed,
    /// lock file unlinked.
    static func readIndexUnderLock(_ root: String) throws -> [UInt8] {
        let lockPath = root + "/index.json.lock"
        let lock = open(lockPath, O_RDONLY | O_CREAT | O_CLOEXEC, 0o600)
        guard lock >= 0 else { throw fail("open(O_CREAT)", lockPath) }
        guard flock(lock, LOCK_SH | LOCK_NB) == 0 else {
            let error = fail("flock(LOCK_SH|LOCK_NB)", lockPath)
            close(lock)
            throw error
        }
        let index: [UInt8]
        do {
            index = try FileIO.readAll(root + "/index.json")
        } catch {
            close(lock)
            throw error
        }
        guard flock(lock, LOCK_UN) == 0 else { throw fail("flock(LOCK_UN)", lockPath) }
        guard close(lock) == 0 else { throw fail("close", lockPath) }
        guard unlink(lockPath) == 0 else { throw fail("unlink", lockPath) }
        return index
    }

    /// A small blob read as the importer does: stat for the size (limit 1 MiB), open, one
    /// pread of that size at 0, close.
    static func readWhole(_ path: String) throws -> [UInt8] {
        var info = stat()
        for _ in 0..<2 { guard stat(path, &info) == 0 else { throw fail("stat", path) } }
        guard info.st_size <= 1 << 20 else { throw HarnessError("\(path) is too large (\(info.st_size) > 1048576)") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw fail("open", path) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, Int(info.st_size), 0) }
        guard n >= 0 else { throw fail("pread", path) }
        guard n == Int(info.st_size) else { throw HarnessError("short pread of \(path): \(n) of \(info.st_size)") }
        return bytes
    }

    /// A layer copied chunk by chunk: `stat, stat, open, pread(1 MiB at k MiB), close` per chunk
    /// until a pread returns 0 (containerd's content server).
    static func readLayer(_ path: String, size: Int64) throws -> (bytes: [UInt8], chunks: Int) {
        let chunk = 1 << 20
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        var k = 0
        while true {
            var info = stat()
            for _ in 0..<2 {
                guard stat(path, &info) == 0 else { throw fail("stat", path) }
                guard Int64(info.st_size) == size else { throw HarnessError("stat of \(path) says \(info.st_size), descriptor \(size)") }
            }
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw fail("open", path) }
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, chunk, off_t(k * chunk)) }
            let readErrno = errno
            guard close(fd) == 0 else { throw fail("close", path) }
            guard n >= 0 else { throw SysError(call: "pread(off \(k * chunk))", path: path, code: readErrno) }
            if n == 0 { return (bytes, k) }
            bytes.append(contentsOf: buffer[0..<n])
            k += 1
            guard k < 1000 else { throw HarnessError("\(path): runaway read loop") }
        }
    }

    static func run(_ root: String, tag: String) throws -> Outcome {
        let verityErrno = try openStore(root)
        let indexBytes = try readIndexUnderLock(root)
        guard let index = try JSONSerialization.jsonObject(with: Data(indexBytes)) as? [String: Any],
              let entries = index["manifests"] as? [[String: Any]] else { throw HarnessError("index.json is not an OCI index") }
        // First entry with io.containerd.image.name == tag, else org.opencontainers.image.ref.name == tag.
        func annotation(_ entry: [String: Any], _ key: String) -> String? { (entry["annotations"] as? [String: String])?[key] }
        guard let entry = entries.first(where: { annotation($0, "io.containerd.image.name") == tag })
                ?? entries.first(where: { annotation($0, "org.opencontainers.image.ref.name") == tag }),
              let manifestDigest = entry["digest"] as? String,
              let hex = Digest(manifestDigest)?.hex else { throw HarnessError("tag \(tag) not in index.json: \(entries)") }
        let manifestPath = root + "/blobs/sha256/" + hex
        let manifest = try readWhole(manifestPath)
        guard let document = try JSONSerialization.jsonObject(with: Data(manifest)) as? [String: Any] else {
            throw HarnessError("manifest is not JSON")
        }
        // Index variant: manifests[] = layers + one cacheconfig; manifest variant: config + layers[].
        var descriptors = (document["manifests"] as? [[String: Any]]) ?? (document["layers"] as? [[String: Any]]) ?? []
        var configDescriptor = document["config"] as? [String: Any]
        if let index = descriptors.firstIndex(where: { $0["mediaType"] as? String == "application/vnd.buildkit.cacheconfig.v0" }) {
            configDescriptor = descriptors.remove(at: index)
        }
        var cacheConfig: [UInt8]?
        if let digest = configDescriptor?["digest"] as? String, let configHex = Digest(digest)?.hex {
            cacheConfig = try readWhole(root + "/blobs/sha256/" + configHex)
        }
        var layers: [(String, Int64, [UInt8], Int)] = []
        for descriptor in descriptors {
            guard let digest = descriptor["digest"] as? String, let layerHex = Digest(digest)?.hex,
                  let size = (descriptor["size"] as? NSNumber)?.int64Value else { throw HarnessError("bad layer descriptor \(descriptor)") }
            let (bytes, chunks) = try readLayer(root + "/blobs/sha256/" + layerHex, size: size)
            layers.append((digest, size, bytes, chunks))
        }
        return Outcome(manifest: manifest, cacheConfig: cacheConfig, layers: layers, verityErrno: verityErrno)
    }
}

@Suite("buildctl import replay and filesystem semantics")
struct BuildctlReplayTests {
    @Test("buildctl's import sequence against the mount", arguments: ["index", "manifest"])
    func importReplay(variant: String) async throws {
        try await withWorkspace("replay-\(variant)") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, repo: "bk", tag: "cache", variant: variant, layers: 2, layerSize: 2_500_000, seed: 3)
            let mount = try await ws.mountExpectingSuccess(registry.source("bk:cache"))
            let root = mount.mountpoint

            let outcome = try BuildctlImport.run(root, tag: "cache")

            // The fs-verity ioctl must fail (unsupported), the probe leaves nothing behind, and
            // the lock file is gone again.
            #expect(outcome.verityErrno != 0, "FS_IOC_ENABLE_VERITY should be refused")
            #expect(FileIO.listDirectory(root) == ["blobs", "files", "index.json", "ingest", "layers", "oci-layout"],
                    "probe dir and lock file must be gone: \(FileIO.listDirectory(root))")
            #expect(Digest.sha256(of: outcome.manifest).description == seed.manifest.digest)
            let configBlob = seed.blobs.first { $0.role == "cacheconfig" }
            #expect(configBlob != nil)
            if let configBlob, let config = outcome.cacheConfig {
                #expect(Digest.sha256(of: config).description == configBlob.digest)
            } else {
                Issue.record("the cache config was not found through the manifest")
            }
            #expect(outcome.layers.map(\.digest) == seed.layers.map(\.digest), "the replay reads exactly the seeded layers in order")
            for layer in outcome.layers {
                #expect(Int64(layer.bytes.count) == layer.size)
                #expect(Digest.sha256(of: layer.bytes).description == layer.digest, "layer \(layer.digest) read chunk by chunk must verify")
                #expect(layer.chunks == Int((layer.size + (1 << 20) - 1) >> 20), "1 MiB chunks of \(layer.digest)")
            }
            // Dozens of open/close per layer, yet every byte crossed the network once.
            let gets = registry.blobGets(repo: "bk", digests: seed.layers.map(\.digest))
            for layer in seed.layers {
                #expect(registry.blobBytesServed(repo: "bk", digest: layer.digest) == layer.size,
                        "each byte of \(layer.digest) fetched once by the chunked import (\(gets[layer.digest] ?? 0) range requests)")
            }

            // A second import (new lock file, probe, all chunks) works the same, with no new transfer.
            let again = try BuildctlImport.run(root, tag: "cache")
            #expect(again.layers.map { Digest.sha256(of: $0.bytes).description } == seed.layers.map(\.digest))
            #expect(registry.blobGets(repo: "bk", digests: seed.layers.map(\.digest)) == gets)

            // Import by digest skips index.json and the lock: the manifest is read directly.
            #expect(try BuildctlImport.readWhole(mount.blobPath(seed.manifest.digest)) == outcome.manifest)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("read-only blobs and index.json, unknown names, no escapes")
    func readOnlySemantics() async throws {
        try await withWorkspace("readonly") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 300_000, seed: 5)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let root = mount.mountpoint
            let layer = try #require(seed.layers.first)
            let layerPath = mount.blobPath(layer.digest)
            let indexPath = mount.path("index.json")
            let manifestPath = mount.blobPath(seed.manifest.digest)
            let indexBefore = try FileIO.readAll(indexPath)

            func expectErrno(_ expected: Set<Int32>, _ what: String, _ body: () -> Int32,
                             sourceLocation: SourceLocation = #_sourceLocation) {
                let code = FileIO.errnoOf(body)
                #expect(expected.contains(code),
                        "\(what): got \(code == 0 ? "success" : String(cString: strerror(code))) (\(code)), want \(expected.map { String(cString: strerror($0)) })",
                        sourceLocation: sourceLocation)
            }
            // A read-only mount lets the kernel open files without asking (zero-message opens),
            // so an open for writing may succeed: then its first write is what fails.
            func expectOpenAndWriteRefused(_ what: String, _ path: String, _ flags: Int32,
                                           sourceLocation: SourceLocation = #_sourceLocation) {
                let code = FileIO.errnoOfOpenAndWrite(path, flags)
                #expect(code == EROFS, "\(what): got \(code == 0 ? "success" : String(cString: strerror(code))) (\(code)), want EROFS",
                        sourceLocation: sourceLocation)
            }
            func openFD(_ path: String, _ flags: Int32) -> Int32 {
                let fd = open(path, flags | O_CLOEXEC, 0o644)
                if fd >= 0 { close(fd); return 0 }
                return -1
            }

            // Writes to published content: EROFS.
            for path in [indexPath, layerPath, manifestPath] {
                expectOpenAndWriteRefused("open(O_WRONLY) and write \(path)", path, O_WRONLY)
                expectOpenAndWriteRefused("open(O_RDWR) and write \(path)", path, O_RDWR)
                expectErrno([EROFS], "open(O_WRONLY|O_TRUNC) \(path)") { openFD(path, O_WRONLY | O_TRUNC) }
                expectOpenAndWriteRefused("open(O_RDWR|O_CREAT) and write \(path)", path, O_RDWR | O_CREAT)
                expectOpenAndWriteRefused("open(O_WRONLY|O_APPEND) and write \(path)", path, O_WRONLY | O_APPEND)
                expectErrno([EROFS], "truncate \(path)") { truncate(path, 0) }
                expectErrno([EROFS], "chmod \(path)") { chmod(path, 0o644) }
                expectErrno([EROFS], "unlink \(path)") { unlink(path) }
                expectErrno([EROFS], "rename \(path)") { rename(path, path + ".moved") }
            }
            expectErrno([EROFS], "rename index.json over itself elsewhere") { rename(indexPath, root + "/ingest/index.json") }
            let newHex = String(repeating: "ab", count: 32)
            expectErrno([EROFS], "create in blobs/sha256") { openFD(root + "/blobs/sha256/" + newHex, O_WRONLY | O_CREAT | O_EXCL) }
            expectErrno([EROFS], "mkdir in blobs/sha256") { mkdir(root + "/blobs/sha256/dir", 0o755) }
            expectErrno([EROFS], "mkdir in blobs") { mkdir(root + "/blobs/sha512", 0o755) }
            expectErrno([EROFS, ENOTEMPTY], "rmdir blobs/sha256") { rmdir(root + "/blobs/sha256") }
            expectErrno([EROFS], "unlink oci-layout") { unlink(root + "/oci-layout") }

            // An export's commit (rename ingest/<id>/data -> blobs/sha256/<hex>) is refused and
            // leaves the published tree unchanged.
            let ingestDir = root + "/ingest/export-1"
            #expect(mkdir(ingestDir, 0o755) == 0, "ingest/ is scratch space")
            let data = ingestDir + "/data"
            let fd = open(data, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            #expect(fd >= 0)
            if fd >= 0 {
                _ = "hello".withCString { write(fd, $0, 5) }
                close(fd)
            }
            let helloHex = Digest.sha256(of: Array("hello".utf8)).hex
            expectErrno([EROFS], "rename ingest data into blobs/sha256") { rename(data, root + "/blobs/sha256/" + helloHex) }
            expectErrno([EROFS], "rename ingest data over a blob") { rename(data, layerPath) }
            expectErrno([EROFS], "rename ingest data over index.json") { rename(data, indexPath) }
            #expect(unlink(data) == 0)
            #expect(rmdir(ingestDir) == 0)

            // Names that are not known digests: ENOENT.
            var info = stat()
            for name in [String(repeating: "0", count: 64), newHex, layer.hex.uppercased(), "sha256:" + layer.hex,
                         String(layer.hex.dropLast()), layer.hex + "0", "not-a-digest", ".", "index.json"] where name != "." {
                expectErrno([ENOENT], "stat blobs/sha256/\(name)") { stat(root + "/blobs/sha256/" + name, &info) }
                expectErrno([ENOENT], "open blobs/sha256/\(name)") { openFD(root + "/blobs/sha256/" + name, O_RDONLY) }
            }
            expectErrno([ENOENT], "blobs/sha512") { stat(root + "/blobs/sha512", &info) }

            // `..` never leaves the layout: it resolves within the mount, to the same inodes.
            let indexInfo = try FileIO.statFile(indexPath)
            let viaDots = try FileIO.statFile(root + "/blobs/sha256/../../index.json")
            #expect(viaDots.st_ino == indexInfo.st_ino && viaDots.st_dev == indexInfo.st_dev)
            let blobsInfo = try FileIO.statFile(root + "/blobs")
            let blobsViaDots = try FileIO.statFile(root + "/blobs/sha256/..")
            #expect(blobsViaDots.st_ino == blobsInfo.st_ino)
            if let resolved = realpath(root + "/blobs/sha256/../../ingest/..", nil) {
                #expect(String(cString: resolved) == root)
                free(resolved)
            } else {
                Issue.record("realpath through .. failed: \(String(cString: strerror(errno)))")
            }
            #expect(try FileIO.readAll(root + "/blobs/sha256/../../blobs/sha256/" + layer.hex).count == Int(layer.size))
            // Names with slashes cannot reach the filesystem; encoded ones are just unknown.
            expectErrno([ENOENT], "encoded ../ name") { stat(root + "/blobs/sha256/..%2F..%2Findex.json", &info) }
            // A symlink out of the mount cannot be made, and nothing moves across the mount: what a
            // local filesystem without links says (vfat: EPERM), not "function not implemented".
            expectErrno([EPERM], "symlink in ingest") { symlink("/etc/passwd", root + "/ingest/passwd") }
            expectErrno([EPERM], "hard link of a blob into ingest") { link(layerPath, root + "/ingest/blob") }
            // BuildKit probes fs-verity and tolerates a filesystem without it.
            let probe = open(layerPath, O_RDONLY)
            #expect(probe >= 0)
            var verityArguments = [UInt8](repeating: 0, count: 128)
            expectErrno([ENOTTY, EOPNOTSUPP], "FS_IOC_ENABLE_VERITY") { ioctl(probe, 0x4080_6685, &verityArguments) }
            close(probe)
            expectErrno([EXDEV], "rename a blob out of the mount") { rename(layerPath, ws.path("stolen")) }
            #expect(!FileManager.default.fileExists(atPath: ws.path("stolen")))

            // Nothing above changed what is published.
            #expect(try FileIO.readAll(indexPath) == indexBefore)
            #expect(FileIO.listDirectory(root) == ["blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
            #expect(FileIO.listDirectory(root + "/ingest").isEmpty)
            #expect(Set(FileIO.listDirectory(root + "/blobs/sha256")) == Set(seed.blobs.map(\.hex)))
            Check.blobsVerify(mount, seed.blobs)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }
}
