import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A BuildKit cache as an export writes it: the layers (listed by digest, as BuildKit lists
/// them), the cache config chaining them and the manifest, in one of BuildKit's two variants.
/// The documents have the shape of those a real BuildKit wrote (Fuzz/corpus/manifest and
/// Fuzz/corpus/cache-config: key order, `parent` left out when it is 0, annotations); layer
/// bytes are pseudo-random, as compressed layers look.
struct BuildCache: Sendable {
    enum Variant: Sendable {
        /// BuildKit before v0.21: an OCI index listing the layers and the cache config.
        case index
        /// BuildKit v0.21 and later: an OCI image manifest whose config is the cache config.
        case imageManifest
    }

    /// One layer of the chain the cache describes.
    struct Layer: Sendable {
        var digest: Digest
        var size: Int64
        var diffID: String
        var createdAt: String
        var mediaType = "application/vnd.oci.image.layer.v1.tar+gzip"
        /// nil for a layer already in the layout: an export finds it there and writes nothing.
        var bytes: [UInt8]?

        /// `size` deterministic bytes that do not compress.
        static func random(seed: UInt64, size: Int, createdAt: String = "2026-12-02T12:25:33.613844879Z") -> Layer {
            var state = seed &* 0x9E37_79B9_7F4A_7C15 &+ 0x2545_F491_4F6C_DD1D
            var bytes = [UInt8](repeating: 0, count: size)
            bytes.withUnsafeMutableBytes { buffer in
                var index = 0
                while index < size {
                    // SplitMix64.
                    state &+= 0x9E37_79B9_7F4A_7C15
                    var z = state
                    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                    z ^= z >> 31
                    for shift in stride(from: 0, to: 64, by: 8) where index < size {
                        buffer[index] = UInt8(truncatingIfNeeded: z >> UInt64(shift))
                        index += 1
                    }
                }
            }
            let digest = Digest.sha256(of: bytes)
            return Layer(digest: digest, size: Int64(size), diffID: Digest.sha256(of: Array("uncompressed \(digest)".utf8)).description,
                         createdAt: createdAt, bytes: bytes)
        }

        /// A layer a manifest already lists (its descriptor, as JSON), without its bytes.
        init(existing descriptor: [String: Any]) throws {
            guard let digestText = descriptor["digest"] as? String, let digest = Digest(digestText),
                  let size = (descriptor["size"] as? NSNumber)?.int64Value,
                  let annotations = descriptor["annotations"] as? [String: String],
                  let diffID = annotations["containerd.io/uncompressed"] else {
                throw HarnessError("not a BuildKit layer descriptor: \(descriptor)")
            }
            self.init(digest: digest, size: size, diffID: diffID, createdAt: annotations["buildkit/createdat"] ?? "2026-01-01T00:00:00Z",
                      mediaType: descriptor["mediaType"] as? String ?? "application/vnd.oci.image.layer.v1.tar+gzip", bytes: nil)
        }

        init(digest: Digest, size: Int64, diffID: String, createdAt: String,
             mediaType: String = "application/vnd.oci.image.layer.v1.tar+gzip", bytes: [UInt8]?) {
            self.digest = digest
            self.size = size
            self.diffID = diffID
            self.createdAt = createdAt
            self.mediaType = mediaType
            self.bytes = bytes
        }
    }

    struct Blob: Sendable, CustomStringConvertible {
        var role: String
        var digest: Digest
        var size: Int64
        var bytes: [UInt8]?
        var hex: String { digest.hex }
        var description: String { "\(role) \(digest)" }
    }

    static let cacheConfigMediaType = "application/vnd.buildkit.cacheconfig.v0"

    let variant: Variant
    /// Base first.
    let chain: [Layer]
    /// As the manifest and the cache config list them: by digest.
    let listed: [Layer]
    let config: Blob
    let manifest: Blob
    let manifestMediaType: String

    /// - Parameter salt: makes the records (so the config and the manifest) differ between
    ///   caches of the same layers, as a new build's do.
    init(chain: [Layer], variant: Variant, salt: String = "") {
        self.variant = variant
        self.chain = chain
        listed = chain.sorted { $0.digest.description < $1.digest.description }
        let position = Dictionary(uniqueKeysWithValues: listed.enumerated().map { ($0.element.digest, $0.offset) })
        let configLayers = chain.enumerated().map { step, layer -> (Int, String) in
            let parent = step == 0 ? -1 : position[chain[step - 1].digest]!
            // `parent` is omitempty in BuildKit's types: 0 is left out.
            let parentField = parent == 0 ? "" : #","parent":\#(parent)"#
            return (position[layer.digest]!, #"{"blob":"\#(layer.digest)"\#(parentField)}"#)
        }.sorted { $0.0 < $1.0 }.map(\.1)
        let selector = Digest.sha256(of: Array("selector \(salt)".utf8))
        let records = chain.enumerated().map { step, layer in
            let inputs = step == 0 ? "" : #","inputs":[[{"selector":"\#(selector)","link":\#(step - 1)}]]"#
            return #"{"layers":[{"layer":\#(position[layer.digest]!),"createdAt":"\#(layer.createdAt)"}],"#
                + #""digest":"\#(Digest.sha256(of: Array("record \(step) \(salt)".utf8)))"\#(inputs)}"#
        }
        let configBytes = Array(#"{"layers":[\#(configLayers.joined(separator: ","))],"records":[\#(records.joined(separator: ","))]}"#.utf8)
        config = Blob(role: "config", digest: Digest.sha256(of: configBytes), size: Int64(configBytes.count), bytes: configBytes)
        let layerDescriptors = listed.map { layer in
            #"{"mediaType":"\#(layer.mediaType)","digest":"\#(layer.digest)","size":\#(layer.size),"#
                + #""annotations":{"buildkit/createdat":"\#(layer.createdAt)","containerd.io/uncompressed":"\#(layer.diffID)"}}"#
        }
        let configDescriptor = #"{"mediaType":"\#(Self.cacheConfigMediaType)","digest":"\#(config.digest)","size":\#(config.size)}"#
        let manifestBytes: [UInt8]
        switch variant {
        case .index:
            manifestMediaType = "application/vnd.oci.image.index.v1+json"
            manifestBytes = Array((#"{"schemaVersion":2,"mediaType":"\#(manifestMediaType)","manifests":["#
                + (layerDescriptors + [configDescriptor]).joined(separator: ",") + "]}").utf8)
        case .imageManifest:
            manifestMediaType = "application/vnd.oci.image.manifest.v1+json"
            manifestBytes = Array((#"{"schemaVersion":2,"mediaType":"\#(manifestMediaType)","config":"# + configDescriptor
                + #","layers":["# + layerDescriptors.joined(separator: ",") + "]}").utf8)
        }
        manifest = Blob(role: "manifest", digest: Digest.sha256(of: manifestBytes), size: Int64(manifestBytes.count), bytes: manifestBytes)
    }

    var layers: [Blob] { listed.map { Blob(role: "layer", digest: $0.digest, size: $0.size, bytes: $0.bytes) } }
    /// In BuildKit's export order: layers, config, manifest.
    var blobs: [Blob] { layers + [config, manifest] }
    /// The blobs an export into a layout without them writes.
    var newBlobs: [Blob] { blobs.filter { $0.bytes != nil } }
}

/// BuildKit's `--export-cache type=local,dest=DIR`, as the client process performs it on DIR
/// (shared/reference/buildkit-cache.md sections 3, 4 and 4b), replayed with raw system calls.
enum BuildctlExport {
    enum Version: String, Sendable, CustomStringConvertible, CaseIterable {
        /// containerd 1.x store: `MkdirAll(ingest)` when the store opens, no fs-verity probe,
        /// layers one at a time, no fsync of blobs/sha256, no oci-layout, index.json without
        /// `mediaType`; the index variant.
        case v0_11_6 = "v0.11.6"
        /// containerd 2.x store: the fs-verity probe, up to four layers at once on threads of
        /// their own, fsync of blobs/sha256, oci-layout, index.json with `mediaType`; the
        /// image-manifest variant.
        case v0_32_2 = "v0.32.2"

        var description: String { rawValue }
        var variant: BuildCache.Variant { self == .v0_11_6 ? .index : .imageManifest }
    }

    enum BlobOutcome: Sendable, Equatable {
        case written
        /// `stat(blobs/sha256/<hex>)` found it: nothing written.
        case alreadyExists
    }

    struct Outcome: Sendable {
        var blobs: [Digest: BlobOutcome]
        /// errno of close(index.json), 0 when it succeeded: the commit point of the tag.
        var indexCloseErrno: Int32
        /// errno of the FS_IOC_ENABLE_VERITY probe (v0.32.2 only).
        var verityErrno: Int32?

        func written(_ cache: BuildCache) -> [Digest] { cache.blobs.map(\.digest).filter { blobs[$0] == .written } }
    }

    static let timestamp = Array("2026-12-02T12:25:33.613844879Z".utf8)  // 30 bytes, RFC 3339 with nanoseconds
    static let ociLayout = Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8)  // 30 bytes
    static let indexMediaType = "application/vnd.oci.image.index.v1+json"

    static func fail(_ call: String, _ path: String) -> SysError { SysError(call: call, path: path, code: errno) }

    /// A call that must fail with `expected` (what a local filesystem answers there).
    static func expectErrno(_ expected: Int32, _ call: String, _ path: String, _ body: () -> Int32) throws {
        errno = 0
        let rc = body()
        let code = rc < 0 ? errno : 0
        guard code == expected else {
            throw HarnessError("\(call)(\(path)) must fail with \(String(cString: strerror(expected))); got "
                               + (code == 0 ? "success" : String(cString: strerror(code))))
        }
    }

    /// The whole export: open the store, every blob, then index.json under its lock.
    /// - Parameters:
    ///   - skipExistenceCheck: write every blob even when `blobs/sha256/<hex>` is there (what
    ///     two exports racing into one directory do), so that the rename replaces it.
    ///   - rewriteIndex: changes the bytes written to index.json (bad input).
    static func run(_ cache: BuildCache, into root: String, tag: String, version: Version, skipExistenceCheck: Bool = false,
                    rewriteIndex: @Sendable ([UInt8]) -> [UInt8] = { $0 }) throws -> Outcome {
        var info = stat()
        guard stat(root, &info) == 0 else { throw fail("stat", root) }
        var verityErrno: Int32?
        var probe: Int32 = -1
        switch version {
        case .v0_11_6:
            try mkdirAll(root + "/ingest", 0o755)
        case .v0_32_2:
            (verityErrno, probe) = try fsverityProbe(root)
        }
        defer { if probe >= 0 { close(probe) } }

        var outcomes: [Digest: BlobOutcome] = [:]
        let layers = cache.layers
        let layerOutcomes = try inParallel(layers.count, width: version == .v0_32_2 ? 4 : 1) { index in
            try exportBlob(layers[index], root: root, version: version, skipExistenceCheck: skipExistenceCheck)
        }
        for (layer, outcome) in zip(layers, layerOutcomes) { outcomes[layer.digest] = outcome }
        for blob in [cache.config, cache.manifest] {
            outcomes[blob.digest] = try exportBlob(blob, root: root, version: version, skipExistenceCheck: skipExistenceCheck)
        }
        let closeErrno = try writeIndex(root, tag: tag, manifest: cache.manifest, mediaType: cache.manifestMediaType,
                                        version: version, rewrite: rewriteIndex)
        return Outcome(blobs: outcomes, indexCloseErrno: closeErrno, verityErrno: verityErrno)
    }

    /// Runs `body` for 0..<count on `width` threads of their own, so that their system calls
    /// interleave as BuildKit's goroutines' do; the first error is thrown.
    static func inParallel<T: Sendable>(_ count: Int, width: Int, _ body: @escaping @Sendable (Int) throws -> T) throws -> [T] {
        guard count > 0 else { return [] }
        let results = ParallelResults<T>(count: count)
        let done = DispatchGroup()
        for _ in 0..<min(max(width, 1), count) {
            done.enter()
            Thread.detachNewThread {
                defer { done.leave() }
                while let index = results.claim() {
                    results.store(index, Result { try body(index) })
                }
            }
        }
        done.wait()
        return try results.all()
    }

    // MARK: The content store

    /// `os.MkdirAll`: stat first, then mkdir from the first missing ancestor down.
    static func mkdirAll(_ path: String, _ mode: mode_t) throws {
        var info = stat()
        if stat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFDIR else { throw HarnessError("\(path) exists and is not a directory") }
            return
        }
        let parent = (path as NSString).deletingLastPathComponent
        if parent != path, !parent.isEmpty { try mkdirAll(parent, mode) }
        guard mkdir(path, mode) == 0 || errno == EEXIST else { throw fail("mkdir", path) }
    }

    /// containerd 2.x: mkdir `.fsverity-check-<digits>`, create `supported`, reopen it
    /// read-only, FS_IOC_ENABLE_VERITY (must fail), then `os.RemoveAll` of the directory. The
    /// read-only descriptor stays open until the export ends. Returns the ioctl's errno and it.
    static func fsverityProbe(_ root: String) throws -> (Int32, Int32) {
        let directory = root + "/.fsverity-check-\(UInt32.random(in: 1_000_000_000...4_000_000_000))"
        guard mkdir(directory, 0o700) == 0 else { throw fail("mkdir", directory) }
        let supported = directory + "/supported"
        let created = try openFile(supported, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard close(created) == 0 else { throw fail("close", supported) }
        let readOnly = try openFile(supported, O_RDONLY, 0)
        var argument = [UInt8](repeating: 0, count: 128)
        argument[0] = 1  // version
        argument[4] = 1  // FS_VERITY_HASH_ALG_SHA256
        argument[9] = 0x10  // block_size 4096, little-endian
        errno = 0
        let rc = argument.withUnsafeMutableBytes { ioctl(readOnly, BuildctlImport.enableVerity, $0.baseAddress!) }
        let verityErrno = rc == 0 ? 0 : errno
        try removeAll(directory, expecting: ["supported"])
        return (verityErrno, readOnly)
    }

    /// Go's `os.RemoveAll` of a directory: unlink (EISDIR), rmdir (ENOTEMPTY), list, unlink
    /// each entry, rmdir. The listing must be `expecting`.
    static func removeAll(_ directory: String, expecting names: [String]) throws {
        try expectErrno(EISDIR, "unlink", directory) { unlink(directory) }
        try expectErrno(ENOTEMPTY, "rmdir", directory) { rmdir(directory) }
        let listed = try list(directory)
        guard listed == names.sorted() else { throw HarnessError("\(directory) holds \(listed), expected \(names.sorted())") }
        for name in listed {
            guard unlink(directory + "/" + name) == 0 else { throw fail("unlink", directory + "/" + name) }
        }
        guard rmdir(directory) == 0 else { throw fail("rmdir", directory) }
    }

    /// readdir(3) without `.` and `..`, sorted.
    static func list(_ directory: String) throws -> [String] {
        guard let handle = opendir(directory) else { throw fail("opendir", directory) }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: Int(NAME_MAX) + 1) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// open(2), then the F_GETFL/F_SETFL pair Go's runtime does on every descriptor.
    static func openFile(_ path: String, _ flags: Int32, _ mode: mode_t) throws -> Int32 {
        let fd = open(path, flags | O_CLOEXEC, mode)
        guard fd >= 0 else { throw fail("open", path) }
        let status = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, status | O_NONBLOCK)
        _ = fcntl(fd, F_SETFL, status)
        return fd
    }

    static func writeAll(_ fd: Int32, _ bytes: ArraySlice<UInt8>, _ path: String) throws {
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw fail("write", path) }
            written += n
        }
    }

    /// One small file: open with `flags`, one write, close.
    static func writeFile(_ path: String, _ bytes: [UInt8], flags: Int32) throws {
        let fd = try openFile(path, flags, 0o666)
        do {
            try writeAll(fd, bytes[...], path)
        } catch {
            close(fd)
            throw error
        }
        guard close(fd) == 0 else { throw fail("close", path) }
    }

    /// `startedat`/`updatedat`: written to `<name>.tmp` with O_SYNC, then renamed over `<name>`.
    static func writeTimestamp(_ directory: String, _ name: String) throws {
        let temporary = directory + "/" + name + ".tmp", final = directory + "/" + name
        try writeFile(temporary, timestamp, flags: O_RDWR | O_CREAT | O_TRUNC | O_SYNC)
        var info = stat()
        try expectErrno(ENOENT, "lstat", final) { lstat(final, &info) }
        guard rename(temporary, final) == 0 else { throw fail("rename", temporary) }
    }

    /// One blob through containerd's content writer and its commit.
    static func exportBlob(_ blob: BuildCache.Blob, root: String, version: Version, skipExistenceCheck: Bool) throws -> BlobOutcome {
        let target = root + "/blobs/sha256/" + blob.hex
        var info = stat()
        if !skipExistenceCheck {
            if stat(target, &info) == 0 { return .alreadyExists }
            guard errno == ENOENT else { throw fail("stat", target) }
        }
        guard let bytes = blob.bytes else { throw HarnessError("\(blob) is not in \(root) and the export has no bytes for it") }

        // The writer: ingest/<sha256 of the ref>, with ref, total, startedat, updatedat, data.
        try mkdirAll(root + "/ingest", 0o777)
        let ref = "\(blob.role)-\(blob.digest)"
        let ingest = root + "/ingest/" + Digest.sha256(of: Array(ref.utf8)).hex
        guard mkdir(ingest, 0o755) == 0 else { throw fail("mkdir", ingest) }
        try writeFile(ingest + "/ref", Array(ref.utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
        try writeFile(ingest + "/total", Array(String(bytes.count).utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
        try writeTimestamp(ingest, "startedat")
        try writeTimestamp(ingest, "updatedat")
        // data: no O_TRUNC, lseek to 0, sequential 1 MiB writes, fsync, fstat, close.
        let dataPath = ingest + "/data"
        let data = try openFile(dataPath, O_WRONLY | O_CREAT, 0o666)
        do {
            guard lseek(data, 0, SEEK_SET) == 0 else { throw fail("lseek", dataPath) }
            var offset = 0
            while offset < bytes.count {
                let end = min(offset + (1 << 20), bytes.count)
                try writeAll(data, bytes[offset..<end], dataPath)
                offset = end
            }
            guard fsync(data) == 0 else { throw fail("fsync", dataPath) }
            guard fstat(data, &info) == 0 else { throw fail("fstat", dataPath) }
            guard Int64(info.st_size) == blob.size else { throw HarnessError("fstat(\(dataPath)) says \(info.st_size), wrote \(blob.size)") }
        } catch {
            close(data)
            throw error
        }
        guard close(data) == 0 else { throw fail("close", dataPath) }

        // The commit.
        if version == .v0_32_2 {
            try expectErrno(EEXIST, "mkdir", root + "/blobs") { mkdir(root + "/blobs", 0o755) }
            try expectErrno(EEXIST, "mkdir", root + "/blobs/sha256") { mkdir(root + "/blobs/sha256", 0o755) }
        } else {
            try mkdirAll(root + "/blobs/sha256", 0o755)
        }
        if !skipExistenceCheck {
            try expectErrno(ENOENT, "stat", target) { stat(target, &info) }
            try expectErrno(ENOENT, "lstat", target) { lstat(target, &info) }
        }
        guard rename(dataPath, target) == 0 else { throw fail("rename into blobs/sha256", dataPath) }
        if version == .v0_32_2 {
            let directory = try openFile(root + "/blobs/sha256", O_RDONLY | O_DIRECTORY, 0)
            let synced = fsync(directory)
            let syncErrno = errno
            close(directory)
            guard synced == 0 else { throw SysError(call: "fsync", path: root + "/blobs/sha256", code: syncErrno) }
        }
        guard utimensat(AT_FDCWD, target, nil, 0) == 0 else { throw fail("utimensat", target) }
        try removeAll(ingest, expecting: ["ref", "startedat", "total", "updatedat"])
        guard chmod(target, 0o444) == 0 else { throw fail("chmod 0444", target) }
        return .written
    }

    // MARK: index.json

    /// `client/ociindex`: index.json.lock created and locked exclusively, oci-layout (not
    /// v0.11.6), index.json opened O_RDWR|O_CREAT, read, the tag's entry replaced, written back
    /// with pwrite at 0 and ftruncate, closed; then unlocked, the lock closed and unlinked.
    /// Returns the errno of close(index.json) (0 when it succeeded): the tag's commit point.
    static func writeIndex(_ root: String, tag: String, manifest: BuildCache.Blob, mediaType: String, version: Version,
                           rewrite: ([UInt8]) -> [UInt8]) throws -> Int32 {
        let lockPath = root + "/index.json.lock"
        let lock = try openFile(lockPath, O_RDONLY | O_CREAT, 0o600)
        guard flock(lock, LOCK_EX | LOCK_NB) == 0 else {
            let error = fail("flock(LOCK_EX|LOCK_NB)", lockPath)
            close(lock)
            throw error
        }
        let closeErrno: Int32
        do {
            if version == .v0_32_2 { try writeFile(root + "/oci-layout", ociLayout, flags: O_WRONLY | O_CREAT | O_TRUNC) }
            let indexPath = root + "/index.json"
            let index = try openFile(indexPath, O_RDWR | O_CREAT, 0o644)
            let bytes: [UInt8]
            do {
                let existing = try readToEnd(index, indexPath)
                bytes = rewrite(try indexBytes(replacing: tag, in: existing, with: manifest, mediaType: mediaType, version: version))
                let written = bytes.withUnsafeBytes { pwrite(index, $0.baseAddress!, $0.count, 0) }
                guard written == bytes.count else { throw fail("pwrite(off 0)", indexPath) }
                guard ftruncate(index, off_t(bytes.count)) == 0 else { throw fail("ftruncate", indexPath) }
            } catch {
                close(index)
                throw error
            }
            errno = 0
            closeErrno = close(index) == 0 ? 0 : errno
        } catch {
            close(lock)
            throw error
        }
        guard flock(lock, LOCK_UN) == 0 else { throw fail("flock(LOCK_UN)", lockPath) }
        guard close(lock) == 0 else { throw fail("close", lockPath) }
        guard unlink(lockPath) == 0 else { throw fail("unlink", lockPath) }
        return closeErrno
    }

    static func readToEnd(_ fd: Int32, _ path: String) throws -> [UInt8] {
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw fail("read", path) }
            if n == 0 { return bytes }
            bytes += buffer[..<n]
        }
    }

    /// The index BuildKit writes: the other tags' entries kept, this tag's replaced (added last).
    static func indexBytes(replacing tag: String, in existing: [UInt8], with manifest: BuildCache.Blob, mediaType: String,
                           version: Version) throws -> [UInt8] {
        var entries: [String] = []
        if !existing.isEmpty {
            guard let index = try JSONSerialization.jsonObject(with: Data(existing)) as? [String: Any] else {
                throw HarnessError("index.json is not a JSON object: \(String(decoding: existing, as: UTF8.self))")
            }
            for entry in index["manifests"] as? [[String: Any]] ?? [] {
                let annotations = entry["annotations"] as? [String: String] ?? [:]
                guard annotations["org.opencontainers.image.ref.name"] != tag else { continue }
                entries.append(try descriptorJSON(mediaType: entry["mediaType"] as? String ?? "", digest: entry["digest"] as? String ?? "",
                                                  size: (entry["size"] as? NSNumber)?.int64Value ?? 0, annotations: annotations))
            }
        }
        entries.append(try descriptorJSON(mediaType: mediaType, digest: manifest.digest.description, size: manifest.size,
                                          annotations: ["org.opencontainers.image.ref.name": tag]))
        let indexType = version == .v0_11_6 ? "" : #","mediaType":"\#(indexMediaType)""#
        return Array(#"{"schemaVersion":2\#(indexType),"manifests":[\#(entries.joined(separator: ","))]}"#.utf8)
    }

    /// A descriptor in Go's field order, annotations sorted by key.
    static func descriptorJSON(mediaType: String, digest: String, size: Int64, annotations: [String: String]) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        func quoted(_ text: String) throws -> String { String(decoding: try encoder.encode(text), as: UTF8.self) }
        var json = #"{"mediaType":\#(try quoted(mediaType)),"digest":\#(try quoted(digest)),"size":\#(size)"#
        if !annotations.isEmpty {
            let members = try annotations.sorted { $0.key < $1.key }.map { "\(try quoted($0.key)):\(try quoted($0.value))" }
            json += #","annotations":{\#(members.joined(separator: ","))}"#
        }
        return json + "}"
    }
}

/// Results of `BuildctlExport.inParallel`, filled by its threads.
private final class ParallelResults<T: Sendable>: @unchecked Sendable {
    // SAFETY (@unchecked Sendable): `next` and `results` are only touched under `lock`.
    private let lock = NSLock()
    private let count: Int
    private var next = 0
    private var results: [Result<T, any Error>?]

    init(count: Int) {
        self.count = count
        results = Array(repeating: nil, count: count)
    }

    /// The next index to run, nil once all are taken or one failed.
    func claim() -> Int? {
        lock.withLock {
            guard next < count, !results.contains(where: { if case .failure? = $0 { return true } else { return false } }) else { return nil }
            next += 1
            return next - 1
        }
    }

    func store(_ index: Int, _ result: Result<T, any Error>) { lock.withLock { results[index] = result } }

    func all() throws -> [T] {
        try lock.withLock {
            for case .failure(let error)? in results { throw error }
            return try results.map { result -> T in
                guard case .success(let value)? = result else { throw HarnessError("a parallel step did not run") }
                return value
            }
        }
    }
}
