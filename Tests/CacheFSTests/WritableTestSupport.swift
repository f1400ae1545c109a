import CacheFS
import ContentCache
import Foundation
import Logging
import OCI
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A failure of the publisher double, transient or not.
struct PublishFailure: BlobSourceFailure, CustomStringConvertible {
    var isTransient: Bool
    var description: String { isTransient ? "remote busy (transient)" : "remote refused" }
}

/// A `CachePublisher` that records what it is asked to publish, in order, and can fail or
/// block on demand.
final class PublisherDouble: CachePublisher {
    enum Event: Equatable, CustomStringConvertible {
        case blob(Digest, bytes: [UInt8])
        /// `smallBlobs`: what `smallBlob` gave for each blob the manifest reaches that the
        /// publisher may store the tag from (the config).
        case tag(String, manifest: Descriptor, manifestBytes: [UInt8], smallBlobs: [Digest: [UInt8]])

        var description: String {
            switch self {
            case .blob(let digest, let bytes): return "blob \(digest.hex.prefix(12)) (\(bytes.count) bytes)"
            case .tag(let tag, let manifest, _, _): return "tag \(tag) -> \(manifest.digest.hex.prefix(12))"
            }
        }
    }

    struct Behaviour {
        /// Every item fails transiently this many times before it succeeds.
        var transientFailuresPerItem = 0
        /// Every blob fails, transiently, every time.
        var blobsAlwaysFail = false
        /// Every blob fails at once with a failure that is not transient.
        var blobsFailForGood = false
        /// Blob publications wait for `releaseBlocked()`.
        var blockBlobs = false
    }

    let displayName: String
    private let behaviour: Mutex<Behaviour>
    private let recorded = Mutex<[Event]>([])
    private let attemptCounts = Mutex<[String: Int]>([:])
    private let gate = DispatchSemaphore(value: 0)
    private let blockedCount = Atomic<Int>(0)

    init(displayName: String = "double://cache", behaviour: Behaviour = Behaviour()) {
        self.displayName = displayName
        self.behaviour = Mutex(behaviour)
    }

    var events: [Event] { recorded.withLock { $0 } }
    var publishedBlobs: [Digest] {
        events.compactMap { if case .blob(let digest, _) = $0 { return digest } else { return nil } }
    }
    var publishedTags: [String] {
        events.compactMap { if case .tag(let tag, _, _, _) = $0 { return tag } else { return nil } }
    }
    func attempts(_ digest: Digest) -> Int { attemptCounts.withLock { $0[digest.description] ?? 0 } }
    func attempts(tag: String) -> Int { attemptCounts.withLock { $0["tag:" + tag] ?? 0 } }
    /// Publications waiting in `blockBlobs`.
    var blocked: Int { blockedCount.load(ordering: .acquiring) }

    func update(_ change: (inout Behaviour) -> Void) { behaviour.withLock { change(&$0) } }

    /// Lets every blocked publication (and `count` later ones) go on.
    func releaseBlocked(_ count: Int = 64) {
        update { $0.blockBlobs = false }
        for _ in 0..<count { gate.signal() }
    }

    /// Waits until `count` publications are blocked.
    func waitUntilBlocked(_ count: Int) {
        while blocked < count { usleep(1000) }
    }

    private func attempt(_ key: String) -> Int {
        attemptCounts.withLock { counts in
            counts[key, default: 0] += 1
            return counts[key]!
        }
    }

    func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        let attempt = attempt(digest.description)
        let current = behaviour.withLock { $0 }
        if current.blockBlobs {
            blockedCount.add(1, ordering: .releasing)
            gate.wait()
            blockedCount.subtract(1, ordering: .releasing)
        }
        if current.blobsFailForGood { throw PublishFailure(isTransient: false) }
        if current.blobsAlwaysFail || attempt <= current.transientFailuresPerItem { throw PublishFailure(isTransient: true) }
        let bytes = Array(FileManager.default.contents(atPath: path) ?? Data())
        // What a registry checks on upload.
        guard Int64(bytes.count) == size, Digest.sha256(of: bytes) == digest else {
            throw PublishFailure(isTransient: false)
        }
        recorded.withLock { $0.append(.blob(digest, bytes: bytes)) }
        return .uploaded(bytes: size)
    }

    func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8], smallBlob: (Digest) -> [UInt8]?) throws {
        let attempt = attempt("tag:" + tag)
        if attempt <= behaviour.withLock({ $0.transientFailuresPerItem }) { throw PublishFailure(isTransient: true) }
        var small: [Digest: [UInt8]] = [:]
        switch try ManifestContent.parse(manifestBytes, contentType: manifest.mediaType) {
        case .image(_, let config, _): small[config.digest] = smallBlob(config.digest)
        case let content: if let config = content.buildkitCacheConfig { small[config.digest] = smallBlob(config.digest) }
        }
        recorded.withLock { $0.append(.tag(tag, manifest: manifest, manifestBytes: manifestBytes, smallBlobs: small)) }
    }
}

/// A remote that must never be read: every blob a test reads is expected to be local.
final class RefusingSource: BlobSource {
    let calls = Atomic<Int>(0)

    func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                    onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        calls.add(1, ordering: .relaxed)
        throw PublishFailure(isTransient: false)
    }
}

struct StepFailure: Error, CustomStringConvertible {
    var description: String
}

/// A writable mount over a private cache directory, publishing to a `PublisherDouble`.
final class WritableFixture: Sendable {
    let cacheDirectory: String
    let store: ContentStore
    let fetcher: BlobFetcher
    let publisher: PublisherDouble
    let uploads: UploadQueue
    let staging: StagingArea
    let filesystem: CacheFilesystem

    init(snapshot: CacheSnapshot = CacheSnapshot(), source: any BlobSource = RefusingSource(),
         publisher: PublisherDouble = PublisherDouble(), cacheDirectory: String? = nil, limits: CacheLimits? = nil,
         maxAttempts: Int = 3) throws {
        self.cacheDirectory = cacheDirectory ?? NSTemporaryDirectory() + "writable-test-" + UUID().uuidString
        let logger = Logger(label: "test")
        store = try ContentStore(directory: self.cacheDirectory)
        fetcher = BlobFetcher(store: store, source: source, logger: logger, limits: limits)
        self.publisher = publisher
        uploads = try UploadQueue(store: store, publisher: publisher, logger: logger, maxAttempts: maxAttempts,
                                  retryPause: { _ in .milliseconds(1) })
        staging = try StagingArea(cacheDirectory: self.cacheDirectory)
        filesystem = try CacheFilesystem(snapshot: snapshot, fetcher: fetcher, logger: logger,
                                         writable: WritableMount(staging: staging, uploads: uploads))
    }

    /// What a killed process leaves: the queue stops where it is, nothing is drained.
    func abandon() {
        uploads.stop()
        fetcher.shutdown()
    }

    func removeCache() { try? FileManager.default.removeItem(atPath: cacheDirectory) }

    var client: ExportingClient { ExportingClient(fs: filesystem) }
}

/// A cache to export: layers, the cache config chaining them, and the manifest, in the form a
/// BuildKit version writes.
struct ExportedCache {
    enum Variant {
        /// v0.21 and later: an OCI image manifest whose config is the cache config.
        case imageManifest
        /// Before v0.21: an OCI index listing the layers and the cache config.
        case index
    }

    var layers: [[UInt8]]
    var config: [UInt8]
    var manifest: [UInt8]
    var manifestDescriptor: Descriptor

    init(layers: [[UInt8]], variant: Variant, salt: String = "") {
        self.layers = layers
        let layerDigests = layers.map { Digest.sha256(of: $0) }
        let configEntries = layerDigests.enumerated().map { index, digest in
            index == 0 ? #"{"blob":"\#(digest)","parent":-1}"# : index == 1 ? #"{"blob":"\#(digest)"}"# : #"{"blob":"\#(digest)","parent":\#(index - 1)}"#
        }
        let records = layerDigests.indices.map { index in
            #"{"digest":"\#(Digest.sha256(of: Array("record \(index) \(salt)".utf8)))","layers":[{"layer":\#(index),"createdAt":"2025-06-01T10:00:00Z"}]}"#
        }
        config = Array(#"{"layers":[\#(configEntries.joined(separator: ","))],"records":[\#(records.joined(separator: ","))]}"#.utf8)
        let layerDescriptors = zip(layers, layerDigests).map { layer, digest in
            #"{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"\#(digest)","size":\#(layer.count),"#
                + #""annotations":{"buildkit/createdat":"2025-06-01T10:00:00.123456789Z","containerd.io/uncompressed":"\#(Digest.sha256(of: Array(digest.hex.utf8)))"}}"#
        }
        let configDescriptor = #"{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"\#(Digest.sha256(of: config))","size":\#(config.count)}"#
        switch variant {
        case .imageManifest:
            manifest = Array((#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":"# + configDescriptor
                + #","layers":["# + layerDescriptors.joined(separator: ",") + "]}").utf8)
            manifestDescriptor = Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: manifest), size: Int64(manifest.count))
        case .index:
            manifest = Array((#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":["#
                + (layerDescriptors + [configDescriptor]).joined(separator: ",") + "]}").utf8)
            manifestDescriptor = Descriptor(mediaType: MediaType.ociIndex, digest: Digest.sha256(of: manifest), size: Int64(manifest.count))
        }
    }

    /// Layers, then config, then manifest: BuildKit's export order.
    var blobs: [[UInt8]] { layers + [config, manifest] }
    var digests: [Digest] { blobs.map { Digest.sha256(of: $0) } }
}

/// BuildKit's exporting client (buildkit-cache.md sections 3 and 4b), replayed against the
/// core: the same operations, in the same order, with the same flags.
struct ExportingClient: Sendable {
    enum Version {
        /// containerd 1.x content store: no fs-verity probe, no fsync of blobs/sha256, no
        /// oci-layout, index.json without mediaType.
        case v0_11_6
        case v0_32_2
    }

    let fs: CacheFilesystem

    func step<T>(_ result: Result<T, FSError>, _ what: String) throws -> T {
        switch result {
        case .success(let value): return value
        case .failure(let error): throw StepFailure(description: "\(what): \(error)")
        }
    }

    func expectFailure<T>(_ result: Result<T, FSError>, _ expected: FSError, _ what: String) throws {
        switch result {
        case .success: throw StepFailure(description: "\(what): succeeded, expected \(expected)")
        case .failure(let error) where error == expected: return
        case .failure(let error): throw StepFailure(description: "\(what): \(error), expected \(expected)")
        }
    }

    func lookup(_ path: String) -> Result<Entry, FSError> {
        var entry = fs.getattr(CacheFilesystem.rootInode)
        for component in path.split(separator: "/") {
            guard case .success(let directory) = entry else { return entry }
            entry = fs.lookup(parent: directory.attributes.inode, name: String(component))
        }
        return entry
    }

    func parent(of path: String) throws -> (inode: UInt64, name: String) {
        let components = path.split(separator: "/")
        let directory = components.dropLast().joined(separator: "/")
        return (try step(lookup(directory), "lookup \(directory)").attributes.inode, String(components.last!))
    }

    func mkdir(_ path: String, _ mode: UInt32) throws -> Result<Entry, FSError> {
        let (parent, name) = try parent(of: path)
        return fs.mkdir(parent: parent, name: name, permissions: mode)
    }

    /// open(2) with O_CREAT as the kernel turns it into FUSE requests: an existing name is
    /// looked up and opened (O_EXCL: EEXIST), a new one created.
    func open(_ path: String, _ flags: Int32, _ mode: UInt32 = 0o644) throws -> UInt64 {
        if case .success(let entry) = lookup(path) {
            if flags & O_EXCL != 0 { throw StepFailure(description: "open \(path): exists") }
            _ = try step(fs.open(entry.attributes.inode, flags: OpenFlags(flags)), "open \(path)")
            return entry.attributes.inode
        }
        guard flags & O_CREAT != 0 else { throw StepFailure(description: "open \(path): no such file") }
        let (parent, name) = try parent(of: path)
        return try step(fs.create(parent: parent, name: name, permissions: mode, flags: OpenFlags(flags)), "create \(path)").0.attributes.inode
    }

    func write(_ inode: UInt64, _ bytes: [UInt8], at offset: Int64, _ what: String) throws {
        let written = try step(bytes.withUnsafeBytes { fs.write(inode, offset: offset, data: $0) }, "write \(what)")
        guard written == bytes.count else { throw StepFailure(description: "write \(what): \(written) of \(bytes.count) bytes") }
    }

    /// close(2): flush, whose error close returns, then release.
    func close(_ inode: UInt64) -> Result<Void, FSError> {
        defer { fs.release(inode) }
        return fs.flush(inode)
    }

    func writeFile(_ path: String, _ bytes: [UInt8], flags: Int32) throws {
        let inode = try open(path, flags)
        try write(inode, bytes, at: 0, path)
        try step(close(inode), "close \(path)")
    }

    func readAll(_ inode: UInt64) throws -> [UInt8] {
        var bytes: [UInt8] = []
        while true {
            let answer = Mutex<Result<[UInt8], FSError>?>(nil)
            let done = DispatchSemaphore(value: 0)
            fs.read(inode, offset: Int64(bytes.count), count: 1 << 20) { result in
                answer.withLock { $0 = result.map { Array($0) } }
                done.signal()
            }
            done.wait()
            let part = try step(answer.withLock { $0 }!, "read")
            bytes += part
            if part.count < 1 << 20 { return bytes }
        }
    }

    func readFile(_ path: String) throws -> [UInt8] {
        let inode = try step(lookup(path), "lookup \(path)").attributes.inode
        let opened = try step(fs.open(inode, flags: OpenFlags(O_RDONLY)), "open \(path)")
        defer { fs.release(inode, handle: opened.handle) }
        return try readAll(inode)
    }

    /// The fs-verity probe of containerd 2.x stores; the read-only descriptor of `supported`
    /// stays open until `endProbe`.
    func probe() throws -> UInt64 {
        let directory = ".fsverity-check-\(UInt32.random(in: 100_000_000...999_999_999))"
        _ = try step(mkdir(directory, 0o700), "mkdir probe")
        let supported = try open(directory + "/supported", O_RDWR | O_CREAT | O_TRUNC)
        try step(close(supported), "close supported")
        _ = try open(directory + "/supported", O_RDONLY)
        let (root, name) = try parent(of: directory)
        try expectFailure(fs.unlink(parent: root, name: name), .isDirectory, "unlink probe directory")
        try expectFailure(fs.rmdir(parent: root, name: name), .directoryNotEmpty, "rmdir probe directory")
        let probeInode = try step(lookup(directory), "lookup probe").attributes.inode
        for entry in try step(fs.readdir(probeInode), "list probe") where entry.name != "." && entry.name != ".." {
            try step(fs.unlink(parent: probeInode, name: entry.name), "unlink probe file")
        }
        try step(fs.rmdir(parent: root, name: name), "rmdir probe")
        return supported
    }

    enum BlobOutcome: Equatable { case written, alreadyExists }

    /// One blob through containerd's content store writer and commit.
    @discardableResult
    func exportBlob(_ bytes: [UInt8], version: Version) throws -> BlobOutcome {
        let digest = Digest.sha256(of: bytes)
        let target = "blobs/sha256/" + digest.hex
        if case .success = lookup(target) { return .alreadyExists }
        // MkdirAll(ingest): stat first.
        if case .failure = lookup("ingest") { _ = try step(mkdir("ingest", 0o777), "mkdir ingest") }
        let ingest = "ingest/" + Digest.sha256(of: Array("layer-\(digest)".utf8)).hex
        _ = try step(mkdir(ingest, 0o755), "mkdir \(ingest)")
        try writeFile(ingest + "/ref", Array("layer-\(digest)".utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
        try writeFile(ingest + "/total", Array(String(bytes.count).utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
        for name in ["startedat", "updatedat"] {
            try writeFile(ingest + "/\(name).tmp", Array("2025-06-01T10:00:00.123456789Z".utf8),
                          flags: O_RDWR | O_CREAT | O_TRUNC | O_SYNC)
            try expectFailure(lookup(ingest + "/" + name), .noSuchFileOrDirectory, "lstat \(name)")
            let directory = try step(lookup(ingest), "lookup ingest dir").attributes.inode
            try step(fs.rename(parent: directory, name: name + ".tmp", newParent: directory, newName: name), "rename \(name).tmp")
        }
        // data: O_WRONLY|O_CREAT without O_TRUNC, lseek 0, 1 MiB writes in order.
        let data = try open(ingest + "/data", O_WRONLY | O_CREAT)
        var offset = 0
        while offset < bytes.count {
            let end = min(offset + (1 << 20), bytes.count)
            try write(data, Array(bytes[offset..<end]), at: Int64(offset), "data")
            offset = end
        }
        try step(fs.fsync(data, dataOnly: false), "fsync data")
        let size = try step(fs.getattr(data), "fstat data").attributes.size
        guard size == Int64(bytes.count) else { throw StepFailure(description: "data has \(size) bytes") }
        try step(close(data), "close data")
        // MkdirAll(blobs/sha256): they exist.
        if version == .v0_32_2 {
            try expectFailure(mkdir("blobs", 0o755), .fileExists, "mkdir blobs")
            try expectFailure(mkdir("blobs/sha256", 0o755), .fileExists, "mkdir blobs/sha256")
        }
        try expectFailure(lookup(target), .noSuchFileOrDirectory, "stat target")
        let ingestInode = try step(lookup(ingest), "lookup ingest dir").attributes.inode
        let blobsInode = try step(lookup("blobs/sha256"), "lookup blobs/sha256").attributes.inode
        try step(fs.rename(parent: ingestInode, name: "data", newParent: blobsInode, newName: digest.hex), "rename data into blobs")
        if version == .v0_32_2 {
            try step(fs.isDirectory(blobsInode), "open blobs/sha256")
            try step(fs.fsyncdir(blobsInode, dataOnly: false), "fsync blobs/sha256")
        }
        let blob = try step(lookup(target), "lookup committed blob").attributes.inode
        _ = try step(fs.setattr(blob, AttributeChanges(modified: Timestamp.now())), "utimensat")
        // os.RemoveAll(ingest/<id>): unlink, rmdir, then the contents one by one.
        let ingestRoot = try step(lookup("ingest"), "lookup ingest").attributes.inode
        let id = String(ingest.dropFirst("ingest/".count))
        try expectFailure(fs.unlink(parent: ingestRoot, name: id), .isDirectory, "unlink ingest dir")
        try expectFailure(fs.rmdir(parent: ingestRoot, name: id), .directoryNotEmpty, "rmdir ingest dir")
        let names = try step(fs.readdir(ingestInode), "list ingest dir").map(\.name).filter { $0 != "." && $0 != ".." }
        guard names == ["ref", "startedat", "total", "updatedat"] else { throw StepFailure(description: "ingest dir holds \(names)") }
        for name in names { try step(fs.unlink(parent: ingestInode, name: name), "unlink \(name)") }
        try step(fs.rmdir(parent: ingestRoot, name: id), "rmdir ingest dir")
        _ = try step(fs.setattr(blob, AttributeChanges(permissions: 0o444)), "chmod 0444")
        return .written
    }

    /// Every blob of `cache`: up to four layers at once on threads of their own, then the
    /// config and the manifest one at a time.
    func exportBlobs(of cache: ExportedCache, version: Version) throws -> [BlobOutcome] {
        let outcomes = Mutex<[Int: Result<BlobOutcome, StepFailure>]>([:])
        DispatchQueue.concurrentPerform(iterations: cache.layers.count) { index in
            let outcome: Result<BlobOutcome, StepFailure>
            do {
                outcome = .success(try exportBlob(cache.layers[index], version: version))
            } catch {
                outcome = .failure(error as? StepFailure ?? StepFailure(description: "\(error)"))
            }
            outcomes.withLock { $0[index] = outcome }
        }
        let collected = outcomes.withLock { $0 }
        var results = try (0..<cache.layers.count).map { try collected[$0]!.get() }
        results.append(try exportBlob(cache.config, version: version))
        results.append(try exportBlob(cache.manifest, version: version))
        return results
    }

    /// The index.json step of `client/ociindex`: lock file, `oci-layout` (not v0.11.6),
    /// index.json read, rewritten in place with pwrite(0) + ftruncate, closed; lock removed.
    /// Returns what close(index.json) returned.
    func writeIndex(tag: String, manifest: Descriptor, version: Version,
                    transform: ([UInt8]) -> [UInt8] = { $0 }) throws -> Result<Void, FSError> {
        let lock = try open("index.json.lock", O_RDONLY | O_CREAT, 0o600)
        if version == .v0_32_2 {
            try writeFile("oci-layout", Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
        }
        let index = try open("index.json", O_RDWR | O_CREAT)
        let existing = try readAll(index)
        var entries: [String] = []
        if case .index(_, let manifests)? = try? ManifestContent.parse(existing) {
            for entry in manifests where entry.annotations?[Annotation.refName] != tag {
                let name = entry.annotations?[Annotation.refName] ?? ""
                entries.append(#"{"mediaType":"\#(entry.mediaType)","digest":"\#(entry.digest)","size":\#(entry.size),"annotations":{"org.opencontainers.image.ref.name":"\#(name)"}}"#)
            }
        }
        entries.append(#"{"mediaType":"\#(manifest.mediaType)","digest":"\#(manifest.digest)","size":\#(manifest.size),"annotations":{"org.opencontainers.image.ref.name":"\#(tag)"}}"#)
        let mediaType = version == .v0_32_2 ? #","mediaType":"application/vnd.oci.image.index.v1+json""# : ""
        let bytes = transform(Array((#"{"schemaVersion":2"# + mediaType + #","manifests":["# + entries.joined(separator: ",") + "]}").utf8))
        try write(index, bytes, at: 0, "index.json")
        _ = try step(fs.setattr(index, AttributeChanges(size: Int64(bytes.count))), "ftruncate index.json")
        let closed = close(index)
        try step(close(lock), "close lock")
        try step(fs.unlink(parent: CacheFilesystem.rootInode, name: "index.json.lock"), "unlink lock")
        return closed
    }

    /// A whole `--export-cache type=local`: blobs, then index.json.
    func export(_ cache: ExportedCache, tag: String, version: Version) throws -> [BlobOutcome] {
        var probe: UInt64?
        if version == .v0_32_2 { probe = try self.probe() }
        let outcomes = try exportBlobs(of: cache, version: version)
        try step(writeIndex(tag: tag, manifest: cache.manifestDescriptor, version: version), "close index.json")
        if let probe { fs.release(probe) }
        return outcomes
    }
}
