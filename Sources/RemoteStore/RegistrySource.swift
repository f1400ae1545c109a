import FoundationEssentials
import HTTPClient
import Logging
import OCI
import SystemSupport

/// A repository in an OCI registry, read through the distribution API.
public final class RegistrySource: RemoteCacheSource {
    /// Manifests and configs are read whole into memory at mount; anything bigger is refused.
    public static let maxSmallBlobSize = SmallDocument.maxSize
    /// Child manifests of an index fetched at once.
    static let parallelManifestFetches = 4

    public let reference: RegistryReference
    private let connection: RegistryConnection
    private var insecure: Bool { connection.insecure }
    private var timeout: Duration { connection.timeout }
    private var logger: Logger { connection.logger }

    public var displayName: String { reference.description }

    /// - Parameters:
    ///   - credential: what `credentialSource` gave at mount (nil: none).
    ///   - credentialSource: asked again when the registry refuses the credential; nil: the
    ///     credential never changes.
    public init(reference: RegistryReference, insecure: Bool, credential: RegistryCredential?,
                credentialSource: RegistryCredentialSource? = nil,
                transport: any HTTPTransport, timeout: Duration, logger: Logger) {
        self.reference = reference
        self.connection = RegistryConnection(reference: reference, insecure: insecure, credential: credential,
                                             credentialSource: credentialSource, transport: transport,
                                             timeout: timeout, logger: logger)
    }

    // MARK: Snapshot

    public func loadSnapshot() throws(RemoteStoreError) -> CacheSnapshot {
        if insecure { chooseInsecureScheme() }
        var snapshot = CacheSnapshot()
        let root: (bytes: [UInt8], content: ManifestContent)
        do {
            root = try fetchManifest(reference.manifestReference, expectedDigest: reference.digest)
        } catch .notFound {
            // BuildKit's first export has not run yet, or the tag is misspelt: the mount works,
            // but whoever runs it should see why it shows nothing.
            let missing = reference.digest.map { "manifest \($0)" } ?? "tag \(reference.layoutTag)"
            snapshot.warnings.append("no \(missing) at \(reference.host)/\(reference.repository); "
                                     + "the mount is empty until a cache is exported")
            return snapshot
        }
        let digest = Digest.sha256(of: root.bytes)
        let content = root.content
        snapshot.tags.append(.init(tag: reference.layoutTag,
                                   manifest: Descriptor(mediaType: content.mediaType, digest: digest, size: Int64(root.bytes.count))))
        snapshot.addSmallBlob(digest, root.bytes)
        try addReferencedBlobs(of: content, to: &snapshot, depth: 0)
        return snapshot
    }

    private func addReferencedBlobs(of content: ManifestContent, to snapshot: inout CacheSnapshot, depth: Int) throws(RemoteStoreError) {
        switch content {
        case .image(_, let config, let layers):
            snapshot.addSmallBlob(config.digest, try fetchSmallBlob(config))
            layers.forEach { snapshot.addLazyBlob($0) }
        case .index(_, let manifests) where content.buildkitCacheConfig != nil:
            // BuildKit's index variant: the entries are layers plus one cache config, not manifests.
            for entry in manifests {
                if entry.mediaType == MediaType.buildkitCacheConfig {
                    snapshot.addSmallBlob(entry.digest, try fetchSmallBlob(entry))
                } else {
                    snapshot.addLazyBlob(entry)
                }
            }
        case .index(_, let manifests):
            guard depth < 2 else { throw .invalidContent("\(reference): indexes nested deeper than two levels") }
            var children: [Descriptor] = []
            var seen = Set<Digest>()
            for entry in manifests where snapshot.smallBlobs[entry.digest] == nil && seen.insert(entry.digest).inserted {
                if MediaType.indexTypes.contains(entry.mediaType) || MediaType.manifestTypes.contains(entry.mediaType) {
                    children.append(entry)
                } else {
                    snapshot.addLazyBlob(entry)
                }
            }
            // A few children at once: the registry serves them in parallel, and one child's
            // decoding overlaps the next one's transfer (an index of five 3 MB manifests took
            // 1.25 s one after another).
            let parts = SystemThread.map(children, width: Self.parallelManifestFetches, named: "ocicachefs-resolve") { entry in
                Result { () throws(RemoteStoreError) -> CacheSnapshot in
                    var part = CacheSnapshot()
                    let child = try self.fetchManifest(entry.digest.description, expectedDigest: entry.digest, expectedSize: entry.size)
                    part.addSmallBlob(entry.digest, child.bytes)
                    try self.addReferencedBlobs(of: child.content, to: &part, depth: depth + 1)
                    return part
                }
            }
            // Once, for all parts: growing the table part by part rehashed it each time.
            snapshot.lazyBlobs.reserveCapacity(snapshot.lazyBlobs.count + parts.reduce(0) { $0 + ((try? $1.get())?.lazyBlobs.count ?? 0) })
            for part in parts { snapshot.merge(try part.get()) }
        }
    }

    private func parseManifest(_ bytes: [UInt8], contentType: String?, digest: Digest) throws(RemoteStoreError) -> ManifestContent {
        do {
            return try ManifestContent.parse(bytes, contentType: contentType)
        } catch {
            throw .invalidContent("manifest \(digest) of \(reference) is invalid: \(error)")
        }
    }

    /// The manifest's bytes, checked against what names them (the digest asked for, the
    /// descriptor's size, the registry's Docker-Content-Digest) and parsed; a check that fails
    /// is tried again, as the bytes may have been damaged on the way.
    private func fetchManifest(_ manifestReference: String, expectedDigest: Digest?,
                               expectedSize: Int64? = nil) throws(RemoteStoreError) -> (bytes: [UInt8], content: ManifestContent) {
        let url = apiURL("manifests/\(manifestReference)")
        return try fetchSmall(url, accept: MediaType.acceptedManifests.joined(separator: ", "),
                              what: "manifest \(manifestReference)") { response throws(RemoteStoreError) in
            let digest = Digest.sha256(of: response.body)
            if let expectedDigest, expectedDigest != digest {
                throw .invalidContent("\(reference): manifest \(manifestReference) arrived with digest \(digest)")
            }
            if let expectedSize, Int64(response.body.count) != expectedSize {
                throw .invalidContent("\(reference): manifest \(manifestReference) is \(response.body.count) bytes, its descriptor says \(expectedSize)")
            }
            if let claimed = response.headers["Docker-Content-Digest"], let claimedDigest = Digest(claimed), claimedDigest != digest {
                throw .invalidContent("\(reference): registry sent manifest bytes that do not match its Docker-Content-Digest \(claimed)")
            }
            return (response.body, try parseManifest(response.body, contentType: response.headers["Content-Type"], digest: digest))
        }
    }

    private func fetchSmallBlob(_ descriptor: Descriptor) throws(RemoteStoreError) -> [UInt8] {
        guard descriptor.size <= Self.maxSmallBlobSize else {
            throw .invalidContent("\(reference): \(descriptor.mediaType.escapingControlCharacters) blob \(descriptor.digest) is \(descriptor.size) bytes; configs over \(Self.maxSmallBlobSize) bytes are refused")
        }
        return try fetchSmall(apiURL("blobs/\(descriptor.digest)"), accept: nil, what: "blob \(descriptor.digest)") { response throws(RemoteStoreError) in
            let actual = Digest.sha256(of: response.body)
            guard actual == descriptor.digest, Int64(response.body.count) == descriptor.size else {
                throw .invalidContent("\(reference): blob \(descriptor.digest) arrived as \(response.body.count) bytes with digest \(actual)")
            }
            return response.body
        }
    }

    private func fetchSmall<Document>(_ url: URL, accept: String?, what: String,
                                      check: (HTTPResponse) throws(RemoteStoreError) -> Document) throws(RemoteStoreError) -> Document {
        let headers = accept.map { HTTPHeaders([("Accept", $0)]) } ?? HTTPHeaders()
        return try SmallDocument.fetch("\(reference): \(what)", logger: logger, { onBody in
            try perform(url, headers: headers, totalTimeout: timeout, onResponse: { _ in }, onBody: onBody)
        }, check: check)
    }

    // MARK: Blobs

    public func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                           onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        var headers = HTTPHeaders()
        if let range = ByteRange.header(from: offset, through: last) { headers.set("Range", range) }
        _ = try perform(apiURL("blobs/\(digest)"), headers: headers, totalTimeout: nil, onResponse: { head in
            try onStart(ByteRange.start(of: head, requested: offset, context: "\(self.reference): blob \(digest)"))
        }, onBody: onBody)
    }

    static func contentRangeStart(_ value: String?) -> Int64? { ByteRange.contentRangeStart(value) }

    private func chooseInsecureScheme() { connection.chooseInsecureScheme() }

    // MARK: HTTP

    private func apiURL(_ path: String) -> URL { connection.apiURL(path) }

    private func perform(_ url: URL, headers: HTTPHeaders, totalTimeout: Duration?,
                         onResponse: (HTTPResponseHead) throws -> Void,
                         onBody: (UnsafeRawBufferPointer) throws -> Void) throws -> HTTPResponseHead {
        try connection.perform(url, headers: headers, scope: connection.pullScope, totalTimeout: totalTimeout,
                               onResponse: onResponse, onBody: onBody)
    }

    /// `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"..."}]}` → `: MANIFEST_UNKNOWN manifest unknown`.
    package static func registryErrorSummary(_ body: [UInt8]) -> String {
        struct Errors: Decodable {
            struct Entry: Decodable {
                var code: String?
                var message: String?
            }
            var errors: [Entry]
        }
        guard let decoded = try? JSONDecoder().decode(Errors.self, from: Data(body)), let first = decoded.errors.first else {
            return ""
        }
        let text = [first.code, first.message].compactMap { $0 }.joined(separator: " ")
            .map { $0.isNewline || $0 == "\t" ? " " : $0 }
        return text.isEmpty ? "" : ": " + String(String(text).prefix(200)).escapingControlCharacters
    }
}

extension RemoteStoreError: BlobSourceFailure {
    /// Worth another try: the server or the network may do better in a moment.
    public var isTransient: Bool {
        switch self {
        case .server, .transport: return true
        default: return false
        }
    }

    /// The remote could not be reached or did not answer usefully; it did not say no.
    public var isUnavailability: Bool {
        switch self {
        case .server, .transport, .timedOut: return true
        default: return false
        }
    }
}
