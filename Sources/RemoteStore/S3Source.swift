import FoundationEssentials
import HTTPClient
import Logging
import OCI
import SystemSupport

/// BuildKit's `type=s3` cache in any S3-compatible store. Each manifest object (a BuildKit
/// cache config with per-layer annotations) is presented as BuildKit's index variant of a cache
/// manifest, the same bytes for the same object, so `type=local` imports find the cache they
/// expect: every BuildKit reads that variant, while v0.11 and earlier refuse the image-manifest
/// variant ("invalid image with mismatching manifest and config") and import nothing.
public final class S3Source: RemoteCacheSource {
    public let location: S3Location
    private let client: S3Client
    private let timeout: Duration
    private let logger: Logger

    /// Names the endpoint too: the same bucket name at two endpoints is two caches.
    public var displayName: String { location.displayName }

    public init(location: S3Location, credentials: any AWSCredentialProvider, transport: any HTTPTransport,
                timeout: Duration, logger: Logger) {
        self.location = location
        self.client = S3Client(location: location, credentials: credentials, transport: transport, timeout: timeout)
        self.timeout = timeout
        self.logger = logger
    }

    // MARK: Snapshot

    public func loadSnapshot() throws(RemoteStoreError) -> CacheSnapshot {
        var snapshot = CacheSnapshot()
        var missing: [String] = []
        for name in location.names {
            let key = location.manifestKey(name)
            let config: [UInt8]
            do {
                config = try fetchSmall(key)
            } catch .notFound {
                missing.append(name)
                continue
            }
            let manifest = try synthesizeManifest(fromCacheConfig: config, name: name)
            snapshot.addSmallBlob(Digest.sha256(of: config), config)
            snapshot.addSmallBlob(manifest.digest, manifest.bytes)
            for layer in manifest.layers { snapshot.addLazyBlob(layer) }
            snapshot.tags.append(.init(tag: name, manifest: Descriptor(mediaType: MediaType.ociIndex, digest: manifest.digest,
                                                                      size: Int64(manifest.bytes.count))))
        }
        // BuildKit's first export has not run yet, or a name is misspelt: the mount works, but
        // whoever runs it should see why it shows nothing.
        for name in missing {
            let consequence = snapshot.tags.isEmpty ? "the mount is empty" : "tag \(name) is left out of index.json"
            snapshot.warnings.append("no cache named \(name) at s3://\(location.bucket)/\(location.manifestKey(name)) "
                                     + "(\(location.endpoint)); \(consequence) until a cache is exported")
        }
        return snapshot
    }

    private struct AnnotatedCacheConfig: Decodable {
        struct Layer: Decodable {
            struct Annotations: Decodable {
                var mediaType: String?
                var diffID: String?
                var size: Int64?
                var createdAt: String?
            }
            var blob: Digest
            var annotations: Annotations?
        }
        var layers: [Layer]?
    }

    /// BuildKit's index variant of the cache this object holds: its layers as BuildKit's own S3
    /// importer describes them, then the object itself as the cache config.
    func synthesizeManifest(fromCacheConfig config: [UInt8], name: String) throws(RemoteStoreError)
        -> (bytes: [UInt8], digest: Digest, layers: [Descriptor]) {
        try Self.synthesizeManifest(fromCacheConfig: config, name: name, source: displayName,
                                    key: location.manifestKey(name)) { blob throws(RemoteStoreError) in
            try headSize(location.blobKey(blob.description))
        }
    }

    /// The same without a source: `sizeOfBlob` answers for a layer whose annotations give no
    /// size (the source asks S3 with a HEAD request); `source` and `key` only name the object.
    package static func synthesizeManifest(fromCacheConfig config: [UInt8], name: String, source: String, key: String,
                                           sizeOfBlob: (Digest) throws(RemoteStoreError) -> Int64) throws(RemoteStoreError)
        -> (bytes: [UInt8], digest: Digest, layers: [Descriptor]) {
        let parsed: AnnotatedCacheConfig
        do {
            parsed = try JSONDecoder().decode(AnnotatedCacheConfig.self, from: Data(config))
        } catch {
            throw .invalidContent("\(source): \(key) is not a BuildKit cache config")
        }
        var layers: [Descriptor] = []
        for layer in parsed.layers ?? [] {
            let annotations = layer.annotations
            guard let diffID = annotations?.diffID, Digest(diffID) != nil else {
                throw .invalidContent("\(source): layer \(layer.blob) in \(name) has no diffID annotation")
            }
            let size: Int64
            if let annotated = annotations?.size {
                size = annotated
            } else {
                size = try sizeOfBlob(layer.blob)
            }
            // As a registry's descriptor with such a size does not even decode, nor may this one.
            if let problem = Descriptor.sizeProblem(size, of: layer.blob) {
                throw .invalidContent("\(source): \(key): \(problem)")
            }
            var layerAnnotations = [Annotation.uncompressed: diffID]
            // Go's zero time is what BuildKit writes for a layer it knew no creation time of,
            // and what its importer leaves out again.
            if let createdAt = annotations?.createdAt, createdAt != "0001-01-01T00:00:00Z" {
                layerAnnotations[Annotation.buildkitCreatedAt] = createdAt
            }
            let mediaType = annotations?.mediaType.flatMap { $0.isEmpty ? nil : $0 } ?? "application/vnd.oci.image.layer.v1.tar+gzip"
            // In the index it would pass for the cache config.
            guard mediaType != MediaType.buildkitCacheConfig else {
                throw .invalidContent("\(source): layer \(layer.blob) in \(name) claims the cache config's media type")
            }
            layers.append(Descriptor(mediaType: mediaType,
                                     digest: layer.blob, size: size, annotations: layerAnnotations))
        }
        let bytes = BuildKitS3Cache.indexManifest(
            layers: layers,
            cacheConfig: Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: config), size: Int64(config.count)))
        return (bytes, Digest.sha256(of: bytes), layers)
    }

    // MARK: Requests

    public func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                           onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        var headers = HTTPHeaders()
        if let range = ByteRange.header(from: offset, through: last) { headers.set("Range", range) }
        _ = try perform("GET", key: location.blobKey(digest.description), headers: headers, totalTimeout: nil,
                        onResponse: { head in
            try onStart(ByteRange.start(of: head, requested: offset, context: "\(self.displayName): blob \(digest)"))
        }, onBody: onBody)
    }

    private func headSize(_ key: String) throws(RemoteStoreError) -> Int64 {
        do {
            let head = try perform("HEAD", key: key, headers: HTTPHeaders(), totalTimeout: timeout, onResponse: { _ in }, onBody: { _ in })
            guard let length = head.headers["Content-Length"].flatMap({ Int64($0) }) else {
                throw RemoteStoreError.invalidContent("\(displayName): HEAD \(key) gave no Content-Length")
            }
            return length
        } catch let error as RemoteStoreError {
            throw error
        } catch {
            throw .transport("\(displayName): HEAD \(key): \(error)")
        }
    }

    /// A bounded GET of a small object, retried on transient failures (503 SlowDown included).
    private func fetchSmall(_ key: String) throws(RemoteStoreError) -> [UInt8] {
        try SmallDocument.fetch("\(displayName): \(key)", logger: logger) { onBody in
            try perform("GET", key: key, headers: HTTPHeaders(), totalTimeout: timeout, onResponse: { _ in }, onBody: onBody)
        }.body
    }

    /// Reads are signed without a payload hash: they have no body.
    private func perform(_ method: String, key: String, headers: HTTPHeaders, totalTimeout: Duration?,
                         onResponse: (HTTPResponseHead) throws -> Void,
                         onBody: (UnsafeRawBufferPointer) throws -> Void) throws -> HTTPResponseHead {
        try client.perform(method, key: key, headers: headers, payloadHash: SigV4.unsignedPayload, totalTimeout: totalTimeout,
                           onResponse: onResponse, onBody: onBody)
    }
}
