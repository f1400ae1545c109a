import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

enum RemoteKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case registry
    case s3
    var description: String { rawValue }
}

/// The remote a writable mount publishes to in these tests: repository `cache` of a
/// docker-registry, or bucket `cache` of moto. What the tests check there they read directly
/// (the distribution API, S3 GetObject through boto3, the servers' own request logs), never
/// through the product's clients.
final class ExportRemote: Sendable {
    static let repository = "cache"
    static let bucket = "cache"

    /// One request the server logged.
    struct Request: CustomStringConvertible {
        var method: String
        /// The path and query, `%3A` shown as `:`.
        var path: String
        var status: Int
        var description: String { "\(method) \(path) \(status)" }
    }

    let kind: RemoteKind
    let ws: Workspace
    let registry: Registry?
    let moto: MotoS3?

    private init(kind: RemoteKind, ws: Workspace, registry: Registry?, moto: MotoS3?) {
        self.kind = kind
        self.ws = ws
        self.registry = registry
        self.moto = moto
    }

    /// A new, empty remote (S3: its bucket exists).
    static func start(_ kind: RemoteKind, in ws: Workspace) async throws -> ExportRemote {
        switch kind {
        case .registry:
            return ExportRemote(kind: kind, ws: ws, registry: try await ws.startRegistry(), moto: nil)
        case .s3:
            try await S3Prerequisites.require(in: ws)
            let moto = try await ws.startMoto()
            try await moto.createBucket(bucket, in: ws)
            return ExportRemote(kind: kind, ws: ws, registry: nil, moto: moto)
        }
    }

    var port: Int { registry?.port ?? moto!.port }

    /// A cache under `tag` written by the seed scripts (not by a mount).
    func seed(tag: String, layers: Int = 2, layerSize: Int = 600_000, seed: Int = 1) async throws {
        switch kind {
        case .registry:
            _ = try await ws.seed(registry!, repo: Self.repository, tag: tag, variant: "manifest", layers: layers, layerSize: layerSize, seed: seed)
        case .s3:
            _ = try await ws.seedS3(moto!, bucket: Self.bucket, names: tag, layers: layers, layerSize: layerSize, seed: seed)
        }
    }

    /// The mount's SOURCE: a registry reference names one tag (the first), an S3 source every
    /// name; through `proxy` when given.
    func source(_ tags: [String], via proxy: UploadHoldingProxy? = nil) -> String {
        switch kind {
        case .registry:
            return "type=registry,ref=\(proxy?.host ?? registry!.host)/\(Self.repository):\(tags[0])"
        case .s3:
            return S3Spec.source(endpoint: proxy?.endpoint ?? moto!.endpoint, bucket: Self.bucket, names: tags.joined(separator: ";"))
        }
    }

    /// `ocicachefs mount` that must succeed; a fresh, empty cache directory unless `cacheDir`;
    /// `options` are added to its command line and `environment` to its environment.
    func mount(_ tags: [String], writable: Bool, cacheDir: String? = nil, via proxy: UploadHoldingProxy? = nil,
               options: [String] = [], environment: [String: String] = [:]) async throws -> MountHandle {
        switch kind {
        case .registry:
            return try await ws.mountExpectingSuccess(source(tags, via: proxy), cacheDir: cacheDir, environment: environment,
                                                      writable: writable, options: options)
        case .s3:
            // moto takes any key (its signature checks are off).
            return try await ws.mountS3ExpectingSuccess(source(tags, via: proxy), cacheDir: cacheDir,
                                                        environment: environment.merging(["AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"]) { $1 },
                                                        writable: writable, options: options)
        }
    }

    // MARK: What the server logged

    /// Every request the server logged so far, in the order the answers completed.
    func requests() -> [Request] {
        switch kind {
        case .registry:
            // Access lines only (`127.0.0.1 - - [...] "GET /v2/... HTTP/1.1" 200 ...`), not logrus'.
            return Processes.readText(registry!.logPath).split(separator: "\n").compactMap { line in
                guard line.hasPrefix("127.0.0.1 "), let open = line.firstIndex(of: "\"") else { return nil }
                let rest = line[line.index(after: open)...]
                guard let close = rest.firstIndex(of: "\"") else { return nil }
                let fields = rest[..<close].split(separator: " ")
                guard fields.count == 3, fields[2].hasPrefix("HTTP/") else { return nil }
                let status = rest[rest.index(after: close)...].split(separator: " ").first.flatMap { Int($0) } ?? 0
                let path = String(fields[1]).replacingOccurrences(of: "%3A", with: ":").replacingOccurrences(of: "%3a", with: ":")
                return Request(method: String(fields[0]), path: path, status: status)
            }
        case .s3:
            return moto!.requests().map { Request(method: $0.method, path: $0.path, status: $0.status) }
        }
    }

    /// Where blobs are, as the server logs their paths.
    private var blobsPath: String { kind == .registry ? "/v2/\(Self.repository)/blobs/" : "/\(Self.bucket)/blobs/" }

    /// Where blob bytes are sent: a registry's upload sessions, S3's blob keys themselves.
    private var uploadsPath: String { kind == .registry ? blobsPath + "uploads/" : blobsPath }

    private var tagArea: String {
        kind == .registry ? "/v2/\(Self.repository)/manifests/" : "/\(Self.bucket)/manifests/"
    }

    /// Requests that send a blob or start sending one (registry: POST, PATCH, PUT of
    /// `blobs/uploads/`; S3: PUT or POST of `blobs/`).
    func blobWrites(_ requests: ArraySlice<Request>) -> [Request] {
        requests.filter { ["POST", "PUT", "PATCH"].contains($0.method) && $0.path.hasPrefix(uploadsPath) }
    }

    /// The blobs whose upload completed, one entry per completed upload.
    func uploadedBlobs(_ requests: ArraySlice<Request>) -> [String] {
        blobWrites(requests).compactMap { request in
            switch kind {
            case .registry:
                guard request.method == "PUT", request.status == 201,
                      let digest = request.path.split(separator: "?").last?.split(separator: "&")
                        .first(where: { $0.hasPrefix("digest=") })?.dropFirst("digest=".count) else { return nil }
                return String(digest)
            case .s3:
                // PutObject, or CompleteMultipartUpload (POST ?uploadId=…).
                let key = request.path.split(separator: "?", maxSplits: 1)
                let completes = request.method == "POST" && key.count == 2 && key[1].hasPrefix("uploadId=")
                guard request.status == 200, (request.method == "PUT" && key.count == 1) || completes else { return nil }
                return String(key[0].dropFirst(uploadsPath.count))
            }
        }
    }

    /// Writes of a tag (registry: PUT of a manifest; S3: PUT of a manifest object).
    func tagWrites(_ requests: ArraySlice<Request>) -> [Request] {
        requests.filter { $0.method == "PUT" && $0.path.hasPrefix(tagArea) }
    }

    /// The path of a blob in the server's log.
    func blobPath(_ digest: Digest) -> String { blobsPath + digest.description }

    /// Existence checks of blobs (HEAD), whatever they answered.
    func blobChecks(_ requests: ArraySlice<Request>) -> [Request] {
        requests.filter { $0.method == "HEAD" && $0.path.hasPrefix(blobsPath + "sha256:") }
    }

    /// Completed downloads of the bytes of `digests` (registry blob GETs, S3 GETs of blob objects).
    func blobReads(_ requests: ArraySlice<Request>, of digests: [Digest]) -> [Request] {
        let paths = Set(digests.map(blobPath))
        return requests.filter { $0.method == "GET" && paths.contains($0.path) && ($0.status == 200 || $0.status == 206) }
    }

    // MARK: What the remote holds

    static let manifestTypes = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                                "application/vnd.docker.distribution.manifest.v2+json",
                                "application/vnd.docker.distribution.manifest.list.v2+json"].joined(separator: ", ")

    /// What the remote holds under `tag`: a registry the manifest's bytes (GET by tag), S3 the
    /// object `manifests/<tag>`; nil when there is none.
    func tagDocument(_ tag: String) async throws -> [UInt8]? {
        switch kind {
        case .registry:
            guard let answer = RawHTTP.get(port: registry!.port, path: "/v2/\(Self.repository)/manifests/\(tag)",
                                           headers: ["Accept": Self.manifestTypes]) else {
                throw HarnessError("the registry did not answer GET manifests/\(tag)")
            }
            if answer.status == 404 { return nil }
            guard answer.status == 200 else { throw HarnessError("GET manifests/\(tag): \(answer.status) \(String(decoding: answer.body, as: UTF8.self))") }
            return answer.body
        case .s3:
            return try await moto!.objects(bucket: Self.bucket, keys: ["manifests/" + tag], in: ws)["manifests/" + tag]
        }
    }

    /// The blobs the remote holds among `digests`, with their bytes.
    func blobs(_ digests: [Digest]) async throws -> [Digest: [UInt8]] {
        switch kind {
        case .registry:
            var found: [Digest: [UInt8]] = [:]
            for digest in digests {
                guard let answer = RawHTTP.get(port: registry!.port, path: "/v2/\(Self.repository)/blobs/\(digest)") else {
                    throw HarnessError("the registry did not answer GET blobs/\(digest)")
                }
                if answer.status == 200 { found[digest] = answer.body }
            }
            return found
        case .s3:
            let objects = try await moto!.objects(bucket: Self.bucket, keys: digests.map { "blobs/\($0)" }, in: ws)
            return Dictionary(uniqueKeysWithValues: digests.compactMap { digest in objects["blobs/\(digest)"].map { (digest, $0) } })
        }
    }

    /// The blobs a tag's document reaches: a registry manifest's config and layers (or an
    /// index's entries), an S3 object's layers.
    func reachedBlobs(fromTagDocument document: [UInt8]) throws -> [(digest: Digest, size: Int64?)] {
        guard let object = try JSONSerialization.jsonObject(with: Data(document)) as? [String: Any] else {
            throw HarnessError("the tag's document is not a JSON object")
        }
        func descriptor(_ entry: [String: Any], key: String = "digest") throws -> (Digest, Int64?) {
            guard let text = entry[key] as? String, let digest = Digest(text) else { throw HarnessError("no digest in \(entry)") }
            let size = ((entry["size"] as? NSNumber) ?? ((entry["annotations"] as? [String: Any])?["size"] as? NSNumber))?.int64Value
            return (digest, size)
        }
        switch kind {
        case .registry:
            let entries = [object["config"] as? [String: Any]].compactMap { $0 } + (object["layers"] as? [[String: Any]] ?? [])
                + (object["manifests"] as? [[String: Any]] ?? [])
            return try entries.map { try descriptor($0) }
        case .s3:
            return try (object["layers"] as? [[String: Any]] ?? []).map { try descriptor($0, key: "blob") }
        }
    }

    /// The tag names a document whose every blob is on the remote with the bytes its digest
    /// names; returns the document.
    @discardableResult
    func expectComplete(tag: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> [UInt8] {
        try await expectCompleteFetching(tag: tag, sourceLocation: sourceLocation).document
    }

    /// `expectComplete`, also returning the blobs it fetched.
    private func expectCompleteFetching(tag: String, sourceLocation: SourceLocation) async throws -> (document: [UInt8], blobs: [Digest: [UInt8]]) {
        let document = try #require(try await tagDocument(tag), "no tag \(tag) on the \(kind)", sourceLocation: sourceLocation)
        let reached = try reachedBlobs(fromTagDocument: document)
        #expect(!reached.isEmpty, "tag \(tag) reaches no blob", sourceLocation: sourceLocation)
        let present = try await blobs(reached.map(\.digest))
        for (digest, size) in reached {
            guard let bytes = present[digest] else {
                Issue.record("tag \(tag) reaches \(digest), which is not on the \(kind)", sourceLocation: sourceLocation)
                continue
            }
            #expect(Digest.sha256(of: bytes) == digest, "blob \(digest) on the \(kind) holds other bytes", sourceLocation: sourceLocation)
            if let size { #expect(Int64(bytes.count) == size, "blob \(digest) size", sourceLocation: sourceLocation) }
        }
        return (document, present)
    }

    /// The remote holds `cache` under `tag` as BuildKit's exporter of its kind would have put
    /// it: a registry the manifest's exact bytes, S3 its own manifest object; and every layer
    /// (registry: every blob) byte for byte.
    func expectPublished(_ cache: BuildCache, tag: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let (document, fetched) = try await expectCompleteFetching(tag: tag, sourceLocation: sourceLocation)
        let expectedBlobs: [BuildCache.Blob]
        switch kind {
        case .registry:
            #expect(document == cache.manifest.bytes, "the manifest under \(tag) is not the one exported", sourceLocation: sourceLocation)
            expectedBlobs = cache.blobs
        case .s3:
            try Self.expectS3ManifestObject(document, describes: cache, sourceLocation: sourceLocation)
            expectedBlobs = cache.layers
        }
        let present = fetched.merging(try await blobs(expectedBlobs.map(\.digest).filter { fetched[$0] == nil })) { old, _ in old }
        for blob in expectedBlobs {
            guard let bytes = present[blob.digest] else {
                Issue.record("\(blob) of tag \(tag) is not on the \(kind)", sourceLocation: sourceLocation)
                continue
            }
            if let exported = blob.bytes {
                #expect(sameBytes(bytes, exported), "\(blob) differs on the \(kind)", sourceLocation: sourceLocation)
            }
        }
    }

    /// BuildKit's S3 manifest object (cache/remotecache/s3): the cache config whose layers
    /// carry annotations mediaType, diffID, size and createdAt, records unchanged.
    static func expectS3ManifestObject(_ object: [UInt8], describes cache: BuildCache,
                                       sourceLocation: SourceLocation = #_sourceLocation) throws {
        let document = try #require(try JSONSerialization.jsonObject(with: Data(object)) as? [String: Any], sourceLocation: sourceLocation)
        let config = try #require(try JSONSerialization.jsonObject(with: Data(cache.config.bytes ?? [])) as? [String: Any],
                                  sourceLocation: sourceLocation)
        let layers = document["layers"] as? [[String: Any]] ?? []
        let configLayers = config["layers"] as? [[String: Any]] ?? []
        #expect(layers.count == configLayers.count, "S3 object layers: \(layers)", sourceLocation: sourceLocation)
        for (entry, configEntry) in zip(layers, configLayers) {
            let blob = entry["blob"] as? String
            #expect(blob == configEntry["blob"] as? String, sourceLocation: sourceLocation)
            // A missing parent is 0 (omitempty).
            #expect((entry["parent"] as? Int ?? 0) == (configEntry["parent"] as? Int ?? 0), "parent of \(blob ?? "?")",
                    sourceLocation: sourceLocation)
            guard let layer = cache.listed.first(where: { $0.digest.description == blob }) else {
                Issue.record("S3 object lists \(blob ?? "?"), not a layer of the cache", sourceLocation: sourceLocation)
                continue
            }
            let annotations = entry["annotations"] as? [String: Any] ?? [:]
            #expect(annotations["mediaType"] as? String == layer.mediaType, "\(annotations)", sourceLocation: sourceLocation)
            #expect(annotations["diffID"] as? String == layer.diffID, "\(annotations)", sourceLocation: sourceLocation)
            #expect((annotations["size"] as? NSNumber)?.int64Value == layer.size, "\(annotations)", sourceLocation: sourceLocation)
            #expect(annotations["createdAt"] as? String == layer.createdAt, "\(annotations)", sourceLocation: sourceLocation)
        }
        #expect(NSArray(array: document["records"] as? [Any] ?? []).isEqual(to: config["records"] as? [Any] ?? ["missing"]),
                "the S3 object's records are not the cache config's", sourceLocation: sourceLocation)
    }

    /// A fresh machine: a read-only mount with an empty cache directory shows each tag's cache
    /// and reads every layer back byte for byte through BuildKit's import sequence. A registry
    /// mount shows one tag, and serves the exported manifest and config as they are; an S3
    /// mount shows every name, each as the index variant it synthesises from the manifest object.
    func expectReadBack(_ caches: [(tag: String, cache: BuildCache)], sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let groups: [[(tag: String, cache: BuildCache)]] = kind == .registry ? caches.map { [$0] } : [caches]
        for group in groups {
            let cacheDir = try ws.makeDirectory("cache-fresh-\(ws.nextID())")
            #expect(FileIO.listDirectory(cacheDir).isEmpty, sourceLocation: sourceLocation)
            let mount = try await mount(group.map(\.tag), writable: false, cacheDir: cacheDir)
            let index = try FileIO.json(mount.path("index.json"))
            let entries = index["manifests"] as? [[String: Any]] ?? []
            #expect(Set(entries.compactMap { ($0["annotations"] as? [String: String])?["org.opencontainers.image.ref.name"] })
                    == Set(group.map(\.tag)), "index.json: \(entries)", sourceLocation: sourceLocation)
            for (tag, cache) in group {
                let root = mount.mountpoint
                let outcome = try await onThread { Result { try BuildctlImport.run(root, tag: tag) } }.value.get()
                #expect(Set(outcome.layers.map(\.digest)) == Set(cache.listed.map(\.digest.description)),
                        "tag \(tag) lists other layers", sourceLocation: sourceLocation)
                for layer in outcome.layers {
                    let exported = cache.listed.first { $0.digest.description == layer.digest }?.bytes
                    #expect(Digest.sha256(of: layer.bytes).description == layer.digest, sourceLocation: sourceLocation)
                    if let exported { #expect(sameBytes(layer.bytes, exported), "layer \(layer.digest) read back", sourceLocation: sourceLocation) }
                }
                switch kind {
                case .registry:
                    #expect(outcome.manifest == cache.manifest.bytes, "manifest of \(tag) read back", sourceLocation: sourceLocation)
                    #expect(outcome.cacheConfig == cache.config.bytes, "cache config of \(tag) read back", sourceLocation: sourceLocation)
                case .s3:
                    #expect(outcome.cacheConfig == (try await tagDocument(tag)), "the synthesised config of \(tag) is the manifest object",
                            sourceLocation: sourceLocation)
                }
            }
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)", sourceLocation: sourceLocation)
        }
    }
}

/// Byte-for-byte equality with memcmp (Array's == goes element by element in debug builds).
func sameBytes(_ lhs: [UInt8], _ rhs: [UInt8]) -> Bool {
    guard lhs.count == rhs.count else { return false }
    guard !lhs.isEmpty else { return true }
    return lhs.withUnsafeBytes { left in rhs.withUnsafeBytes { right in memcmp(left.baseAddress!, right.baseAddress!, left.count) == 0 } }
}

/// Runs an export replay on a thread of its own (it blocks, and starts threads).
func replayExport(_ cache: BuildCache, into mount: MountHandle, tag: String, version: BuildctlExport.Version,
                  skipExistenceCheck: Bool = false,
                  rewriteIndex: @escaping @Sendable ([UInt8]) -> [UInt8] = { $0 }) async throws -> BuildctlExport.Outcome {
    let root = mount.mountpoint
    return try await onThread {
        Result { try BuildctlExport.run(cache, into: root, tag: tag, version: version, skipExistenceCheck: skipExistenceCheck,
                                        rewriteIndex: rewriteIndex) }
    }.value.get()
}
