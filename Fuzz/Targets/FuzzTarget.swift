import ContentCache
import FoundationEssentials
import HTTPClient
import LayerView
import Logging
import OCI
import RemoteStore

/// One fuzz target per parser of remote or user input. `run` feeds one input to the parser the
/// way the mount does and checks what must hold of whatever it accepts: a trap, in the parser
/// or in a check here, is a crash to libFuzzer. Corpora live in `Fuzz/corpus/<rawValue>/`.
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// OCI image indexes and manifests, Docker manifest lists and manifests (registry bodies).
    case manifest
    /// BuildKit cache configs (`application/vnd.buildkit.cacheconfig.v0`), read for layer chains.
    case cacheConfig = "cache-config"
    /// S3 manifest objects: cache configs with per-layer annotations, turned into image manifests.
    case s3CacheConfig = "s3-cache-config"
    /// A raw HTTP response head and body: the header-line parser, then what is read from the
    /// headers (Content-Type, Content-Range, Docker-Content-Digest, WWW-Authenticate,
    /// Content-Length) and from error bodies (registry JSON errors, S3 XML errors).
    case httpResponse = "http-response"
    /// `WWW-Authenticate` header values.
    case wwwAuthenticate = "www-authenticate"
    /// The mount's source argument (`type=registry,ref=…`, `type=s3,bucket=…`), down to the URLs
    /// and signed requests made from it.
    case sourceSpec = "source-spec"
    /// `HOST[:PORT]/REPO[:TAG|@DIGEST]` references.
    case registryReference = "registry-reference"
    /// Docker's `config.json`.
    case dockerConfig = "docker-config"
    /// AWS shared `config` and `credentials` files.
    case awsSharedFile = "aws-shared-file"
    /// Container and instance-metadata credential answers (`{AccessKeyId, …, Expiration}`).
    case awsCredentialsResponse = "aws-credentials-response"
    /// `--cache-size` and `--min-free` values.
    case cacheSize = "cache-size"
    /// A layer's uncompressed tar, as the `files/` view walks it: the parser, the tree made of
    /// its members and the entry list kept in the cache directory.
    case tar

    public func run(_ bytes: [UInt8]) {
        switch self {
        case .manifest: Self.manifest(bytes, contentType: nil)
        case .cacheConfig: Self.cacheConfig(bytes)
        case .s3CacheConfig: Self.s3CacheConfig(bytes)
        case .httpResponse: Self.httpResponse(bytes)
        case .wwwAuthenticate: Self.wwwAuthenticate(String(decoding: bytes, as: UTF8.self))
        case .sourceSpec: Self.sourceSpec(String(decoding: bytes, as: UTF8.self))
        case .registryReference: Self.registryReference(String(decoding: bytes, as: UTF8.self))
        case .dockerConfig: Self.dockerConfig(bytes)
        case .awsSharedFile: Self.awsSharedFile(String(decoding: bytes, as: UTF8.self))
        case .awsCredentialsResponse: Self.awsCredentialsResponse(bytes)
        case .cacheSize: Self.cacheSize(String(decoding: bytes, as: UTF8.self))
        case .tar: Self.tar(bytes)
        }
    }

    // MARK: OCI

    private static func manifest(_ bytes: [UInt8], contentType: String?) {
        let content = try? ManifestContent.parse(bytes, contentType: contentType)
        // The fast reader answers only where JSONDecoder would answer the same.
        check(content == (try? ManifestContent.parseWithFoundation(bytes, contentType: contentType)),
              "the fast manifest reader and JSONDecoder disagree")
        guard let content else { return }
        let descriptors: [Descriptor]
        switch content {
        case .index(let mediaType, let manifests):
            check(MediaType.indexTypes.contains(mediaType), "index with media type \(mediaType)")
            descriptors = manifests
        case .image(let mediaType, let config, let layers):
            check(MediaType.manifestTypes.contains(mediaType), "image manifest with media type \(mediaType)")
            descriptors = [config] + layers
        }
        // What the mount shows of a descriptor (index.json, synthesized manifests) must read back.
        for descriptor in descriptors.prefix(4) {
            check(descriptor.size >= 0, "descriptor with negative size \(descriptor.size)")
            let rendered = OCILayout.canonicalJSON(descriptor)
            let reread = try? JSONDecoder().decode(Descriptor.self, from: Data(rendered))
            check(reread == descriptor, "descriptor does not survive canonical JSON")
        }
    }

    private static func cacheConfig(_ bytes: [UInt8]) {
        guard let successors = CacheChains.successors(inConfig: bytes) else { return }
        for (layer, next) in successors {
            check(layer != next, "layer \(layer) is its own successor")
        }
    }

    private static func s3CacheConfig(_ bytes: [UInt8]) {
        // A layer without a size annotation costs a HEAD request; answer some, refuse others.
        let synthesized = try? S3Source.synthesizeManifest(
            fromCacheConfig: bytes, name: "main", source: "s3://fuzz", key: "manifests/main"
        ) { blob throws(RemoteStoreError) in
            switch blob.hex.utf8.first! {
            case UInt8(ascii: "0"): return -1  // a Content-Length a hostile endpoint may send
            case ..<UInt8(ascii: "8"): return 1234
            default: throw .notFound("HEAD: HTTP 404")
            }
        }
        guard let synthesized else { return }
        check(Digest.sha256(of: synthesized.bytes) == synthesized.digest, "synthesized manifest digest")
        // The mount serves these bytes as BuildKit's index variant; its own parser must read them back.
        let config: Descriptor, layers: [Descriptor]
        do {
            (layers, config) = try BuildKitS3Cache.parts(of: ManifestContent.parse(synthesized.bytes))
        } catch {
            fail("synthesized manifest does not parse as a BuildKit cache manifest: \(error)")
        }
        guard case .index = try? ManifestContent.parse(synthesized.bytes) else { fail("synthesized manifest is not an index") }
        check(config.digest == Digest.sha256(of: bytes) && config.size == Int64(bytes.count), "config descriptor")
        check(layers == synthesized.layers, "layers do not survive serialization")
    }

    // MARK: HTTP

    /// The input is a response as it comes off the wire: header lines up to the first empty
    /// one, then the body.
    private static func httpResponse(_ bytes: [UInt8]) {
        var parser = ResponseHeadParser()
        var bodyStart = bytes.endIndex
        var lineStart = bytes.startIndex
        while lineStart < bytes.endIndex {
            let lineEnd = bytes[lineStart...].firstIndex(of: UInt8(ascii: "\n")).map { $0 + 1 } ?? bytes.endIndex
            let line = bytes[lineStart..<lineEnd]
            lineStart = lineEnd
            if line.allSatisfy({ $0 == 0x0D || $0 == 0x0A }) {
                bodyStart = lineEnd
                break
            }
            parser.receive(line: line)
        }
        let head = parser.head
        let body = Array(bytes[bodyStart...])
        for (name, value) in head.headers {
            check(!name.isEmpty, "empty header name")
            check(!value.hasPrefix(" ") && !value.hasSuffix(" "), "untrimmed header value")
        }

        let contentType = head.headers["Content-Type"]
        if head.status == 200 {
            manifest(body, contentType: contentType)
        }
        if let range = head.headers["Content-Range"], let start = ByteRange.contentRangeStart(range) {
            check(start >= 0, "negative Content-Range start \(start)")
        }
        _ = head.headers["Docker-Content-Digest"].flatMap { Digest($0) }
        _ = head.headers["Content-Length"].flatMap { Int64($0) }
        for challenge in AuthChallenge.parse(headerValues: head.headers.values("WWW-Authenticate")) {
            checkChallenge(challenge)
        }
        let summary = RegistrySource.registryErrorSummary(body)
        checkOneLine(summary)
        let error = S3ErrorResponse(status: head.status, headers: head.headers, body: body)
            .remoteStoreError(context: "bucket/key", region: "eu-west-1")
        checkOneLine(error.description)
    }

    private static func wwwAuthenticate(_ value: String) {
        for challenge in AuthChallenge.parse(value) {
            checkChallenge(challenge)
        }
    }

    private static func checkChallenge(_ challenge: AuthChallenge) {
        check(!challenge.scheme.isEmpty, "challenge without a scheme")
        check(challenge.scheme == challenge.scheme.lowercased(), "scheme \(challenge.scheme) is not lowercased")
        for key in challenge.parameters.keys {
            check(!key.isEmpty && key == key.lowercased(), "parameter name \(key)")
        }
        _ = challenge.description
    }

    // MARK: Sources

    private static func sourceSpec(_ text: String) {
        guard let spec = try? SourceSpec(parsing: text) else { return }
        check(spec.attributes["type"] == nil, "type left among the attributes")
        for key in spec.attributes.keys {
            check(!key.isEmpty && key == key.lowercased(), "attribute name \(key)")
        }
        switch spec.type {
        case "registry":
            if let ref = spec.attributes["ref"] {
                registryReference(ref)
            }
            _ = try? spec.flag("registry.insecure")
        case "s3":
            guard let location = try? S3Location(spec: spec, environment: [:]) else { return }
            check(!location.names.isEmpty && !location.names.contains(""), "S3 names \(location.names)")
            check(!location.endpoint.hasSuffix("/"), "endpoint \(location.endpoint) ends with a slash")
            var keys = location.names.prefix(4).map(location.manifestKey)
            keys.append(location.blobKey("sha256:" + String(repeating: "ab", count: 32)))
            for key in keys {
                let url = SigV4.s3ObjectURL(endpoint: location.endpoint, bucket: location.bucket, key: key,
                                            pathStyle: location.pathStyle)
                var request = HTTPRequest(method: "GET", url: url)
                SigV4.sign(&request, credentials: fuzzCredentials, region: location.region, service: "s3",
                           date: Date(timeIntervalSince1970: 1_700_000_000), payloadHash: SigV4.unsignedPayload)
                check(request.headers["Authorization"] != nil, "unsigned request")
            }
        default:
            break
        }
    }

    private static let fuzzCredentials = AWSCredentials(accessKeyID: "AKIDEXAMPLE",
                                                        secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")

    private static func registryReference(_ text: String) {
        guard let reference = try? RegistryReference(parsing: text) else { return }
        // RegistrySource force-unwraps the URL of the API host: every accepted reference must make one.
        _ = RegistrySource(reference: reference, insecure: true, credential: nil, transport: NoNetwork(),
                           timeout: .seconds(1), logger: quietLogger)
        _ = reference.isLoopback
        _ = reference.manifestReference
        // Shown in logs and index.json, and what a user would paste back: it must mean the same.
        let reparsed = try? RegistryReference(parsing: reference.description)
        check(reparsed == reference, "\(reference) does not parse back to itself")
    }

    // MARK: Credentials

    private static func dockerConfig(_ bytes: [UInt8]) {
        for host in ["docker.io", "registry.example.com", "127.0.0.1:5000"] {
            do {
                _ = try DockerCredentialStore.resolve(configFile: bytes, host: host)
            } catch let error as CredentialError {
                checkOneLine(error.message)
                return
            } catch {
                fail("unexpected error type \(type(of: error))")
            }
        }
    }

    private static func awsSharedFile(_ text: String) {
        for (section, values) in AWSINIParser.parse(text) {
            check(!section.isEmpty, "empty section name")
            for key in values.keys {
                check(!key.isEmpty && key == key.lowercased(), "key \(key)")
            }
        }
    }

    private static func awsCredentialsResponse(_ bytes: [UInt8]) {
        switch AWSCredentialChain.decodeCredentials(bytes, context: "container credentials") {
        case .success(let credentials):
            check(!credentials.accessKeyID.isEmpty && !credentials.secretAccessKey.isEmpty, "empty credentials")
        case .failure(let failure):
            checkOneLine(failure.message)
        }
    }

    private static func cacheSize(_ text: String) {
        guard let size = CacheLimits.parseSize(text) else { return }
        check(size >= 0, "negative size \(size) from \(text)")
    }

    // MARK: Layers

    private static func tar(_ bytes: [UInt8]) {
        // Fed whole and in odd pieces, skipping data where it may: the same members either way.
        func parse(piece: Int, skipping: Bool) -> (entries: [TarEntry], error: TarError?) {
            var reader = TarReader()
            var entries: [TarEntry] = []
            var start = 0
            do throws(TarError) {
                while start < bytes.count {
                    if skipping, reader.dataAhead > 0 {
                        let skipped = min(reader.dataAhead, Int64(bytes.count - start))
                        reader.skip(skipped)
                        start += Int(skipped)
                        continue
                    }
                    let end = min(bytes.count, start + piece)
                    var failure: TarError?
                    bytes[start..<end].withUnsafeBytes { chunk in
                        do throws(TarError) { try reader.feed(chunk) { entries.append($0) } } catch { failure = error }
                    }
                    if let failure { throw failure }
                    start = end
                }
                check(reader.position == Int64(bytes.count), "position \(reader.position) after \(bytes.count) bytes")
                try reader.finish()
            } catch {
                return (entries, error)
            }
            return (entries, nil)
        }
        let whole = parse(piece: bytes.count + 1, skipping: false)
        let pieces = parse(piece: 7, skipping: true)
        check(whole.entries == pieces.entries && whole.error == pieces.error, "feeding in pieces changes what is parsed")
        for entry in whole.entries {
            check(entry.size >= 0 && entry.dataOffset >= 512 && entry.dataOffset % 512 == 0, "entry \(entry)")
            check(entry.isSparse || entry.kind != .regular || entry.dataOffset + entry.size <= Int64(bytes.count) || whole.error != nil,
                  "data past the stream's end for \(entry.path)")
        }
        check(TarEntryList.parse(TarEntryList.serialized(whole.entries)) == whole.entries, "entry list does not read back")
        let tree = TarTree(entries: whole.entries)
        // Every node is reached by names that are not `.`, `..` or empty, with no cycle.
        var seen = Set<Int>()
        var pending = [0]
        while let directory = pending.popLast() {
            check(tree.nodes[directory].entry.kind == .directory, "a node with children that is no directory")
            for (name, child) in tree.nodes[directory].children {
                check(!name.isEmpty && name != "." && name != ".." && !name.contains("/"), "name \(name.debugDescription)")
                check(tree.nodes[child].entry.kind != .hardLink, "a hard link node")
                if tree.nodes[child].entry.kind == .directory {
                    check(seen.insert(child).inserted, "directory \(child) reached twice")
                    pending.append(child)
                }
            }
        }
    }

    // MARK: Checks

    /// Errors go to logs and stderr as one line each: a CR or LF from the remote would forge more.
    private static func checkOneLine(_ message: String) {
        check(!message.utf8.contains(where: { $0 == 0x0A || $0 == 0x0D }), "message is not one line: \(message)")
    }

    private static func check(_ condition: Bool, _ message: @autoclosure () -> String,
                              file: StaticString = #fileID, line: UInt = #line) {
        if !condition { fail(message(), file: file, line: line) }
    }

    private static func fail(_ message: String, file: StaticString = #fileID, line: UInt = #line) -> Never {
        fatalError("fuzz check failed: \(message)", file: file, line: line)
    }
}

/// Every exchange fails: the targets construct sources but never fetch.
private struct NoNetwork: HTTPTransport {
    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        throw HTTPTransportError.connectionFailed("the fuzz targets have no network")
    }
}

private let quietLogger = Logger(label: "fuzz") { _ in SwiftLogNoOpLogHandler() }
