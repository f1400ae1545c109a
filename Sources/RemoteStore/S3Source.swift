import FoundationEssentials
import HTTPClient
import Logging
import OCI
import SystemSupport

/// BuildKit's `type=s3` cache in any S3-compatible store. Each manifest object (a BuildKit
/// cache config with per-layer annotations) is presented as a synthesized OCI image manifest,
/// the same bytes for the same object, so `type=local` imports find the cache they expect.
public final class S3Source: RemoteCacheSource {
    public let location: S3Location
    private let credentials: any AWSCredentialProvider
    private let transport: any HTTPTransport
    private let timeout: Duration
    private let logger: Logger

    /// Names the endpoint too: the same bucket name at two endpoints is two caches.
    public var displayName: String {
        "s3://\(location.bucket)/\(location.prefix)\(location.manifestsPrefix){\(location.names.joined(separator: ";"))} at \(location.endpoint)"
    }

    public init(location: S3Location, credentials: any AWSCredentialProvider, transport: any HTTPTransport,
                timeout: Duration, logger: Logger) {
        self.location = location
        self.credentials = credentials
        self.transport = transport
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
            snapshot.tags.append(.init(tag: name, manifest: Descriptor(mediaType: MediaType.ociManifest, digest: manifest.digest,
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

    private struct SynthesizedManifest: Encodable {
        var schemaVersion = 2
        var mediaType = MediaType.ociManifest
        var config: Descriptor
        var layers: [Descriptor]
    }

    /// The image manifest BuildKit's own S3 importer builds in memory, serialized canonically.
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
            if let createdAt = annotations?.createdAt { layerAnnotations[Annotation.buildkitCreatedAt] = createdAt }
            layers.append(Descriptor(mediaType: annotations?.mediaType ?? "application/vnd.oci.image.layer.v1.tar+gzip",
                                     digest: layer.blob, size: size, annotations: layerAnnotations))
        }
        let manifest = SynthesizedManifest(
            config: Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: config), size: Int64(config.count)),
            layers: layers)
        let bytes = OCILayout.canonicalJSON(manifest)
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

    /// One signed exchange; only a successful body reaches the caller, errors become one line.
    private func perform(_ method: String, key: String, headers: HTTPHeaders, totalTimeout: Duration?,
                         onResponse: (HTTPResponseHead) throws -> Void,
                         onBody: (UnsafeRawBufferPointer) throws -> Void) throws -> HTTPResponseHead {
        let url = SigV4.s3ObjectURL(endpoint: location.endpoint, bucket: location.bucket, key: key, pathStyle: location.pathStyle)
        var request = HTTPRequest(method: method, url: url, headers: headers, stallTimeout: timeout, totalTimeout: totalTimeout)
        SigV4.sign(&request, credentials: try credentials.credentials(), region: location.region, service: "s3",
                   date: Date(), payloadHash: SigV4.unsignedPayload)
        let head: HTTPResponseHead
        let errorBody: [UInt8]
        do {
            (head, errorBody) = try transport.executeExpectingSuccess(request, onSuccess: onResponse, onBody: onBody)
        } catch let error as HTTPTransportError {
            // The URL is built from endpoint_url and the keys: no retry can make it fetchable.
            if case .invalidRequest = error {
                throw RemoteStoreError.configuration("\(displayName): \(method) \(key): \(error)")
            }
            throw RemoteStoreError(error, context: "\(displayName): \(method) \(key)")
        }
        if (200..<300).contains(head.status) { return head }
        throw S3ErrorResponse(status: head.status, headers: head.headers, body: errorBody)
            .remoteStoreError(context: "\(location.bucket)/\(key)", region: location.region)
    }
}

/// S3's XML error document, turned into one line.
package struct S3ErrorResponse {
    var status: Int
    var headers: HTTPHeaders
    var body: [UInt8]

    package init(status: Int, headers: HTTPHeaders, body: [UInt8]) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    var code: String? { element("Code") }
    var message: String? { element("Message") }

    package func remoteStoreError(context: String, region: String) -> RemoteStoreError {
        let summary = [code, message].compactMap { $0 }.joined(separator: ": ")
        let detail = summary.isEmpty ? "HTTP \(status)" : "HTTP \(status) \(summary)"
        if status == 301 || code == "PermanentRedirect" || code == "AuthorizationHeaderMalformed",
           let actual = headers["x-amz-bucket-region"] ?? element("Region"), actual != region {
            return .configuration("\(context): the bucket is in region \(actual), not \(region); set region=\(actual)")
        }
        switch (status, code) {
        case (404, "NoSuchBucket"?): return .configuration("\(context): \(detail)")
        case (404, _): return .notFound("\(context): \(detail)")
        case (401, _), (403, _): return .unauthorized("\(context): \(detail)")
        case (429, _), (500...599, _): return .server("\(context): \(detail)")
        default: return .invalidContent("\(context): \(detail)")
        }
    }

    /// The text of the first `<name>` element; the error documents are flat and small.
    private func element(_ name: String) -> String? {
        let text = String(decoding: body, as: UTF8.self)
        guard let open = text.firstRange(of: "<\(name)>"), let close = text[open.upperBound...].firstRange(of: "</\(name)>") else {
            return nil
        }
        let value = text[open.upperBound..<close.lowerBound].map { $0.isNewline ? " " : $0 }
        return String(String(value).prefix(300)).escapingControlCharacters
    }
}
