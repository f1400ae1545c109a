import Foundation
import HTTPClient
import OCI
import Synchronization

/// An in-memory OCI distribution registry behind `HTTPTransport`, for driving `RegistrySource`
/// without a network. It serves `/v2/<repo>/manifests/<ref>` and `/v2/<repo>/blobs/<digest>`
/// for any host except the two helper hosts below, honours `Range: bytes=N-`, can demand Basic
/// or Bearer auth (with a token endpoint at `tokenHost`), can redirect blob GETs (to `cdnHost`
/// or to another path on its own host), and records every request it sees. It takes pushes as
/// the distribution spec describes them: upload sessions (monolithic or chunked, resumable),
/// cross-repository mounts from `otherRepositoryBlobs`, and manifest PUTs.
final class FakeRegistry: HTTPTransport {
    static let tokenHost = "auth.test"
    static let tokenRealm = "http://auth.test/token"
    static let cdnHost = "cdn.example"

    struct StoredManifest: Sendable {
        var bytes: [UInt8]
        var contentType: String?
        /// nil: the real digest; .some(nil): no header; .some(x): header x.
        var digestHeader: String??
    }

    enum Auth: Sendable {
        case anonymous
        case basic(username: String, password: String)
        /// Bearer tokens from `tokenRealm`. With a username, the token endpoint demands that
        /// Basic credential; without, it hands tokens to anyone. `challengeScope` is put in the
        /// challenge when given (real registries do; the client must cope without).
        case bearer(service: String, challengeScope: String?, username: String?, password: String?, expiresIn: Int?)
    }

    enum BlobRedirect: Sendable {
        case none
        /// 307 to `http://cdn.example/blobs/<hex>?sig=...`, served without auth.
        case otherHost
        /// 307 to `/v2/<repo>/redirected-blobs/<digest>` (relative), auth required as usual.
        case sameHost
        /// 307 to the very same URL, forever.
        case loop
        /// 307 to this absolute Location, whatever it is.
        case location(String)
    }

    struct TokenRequest: Sendable {
        var service: String?
        var scope: String?
        /// Every `scope` parameter, in order (a cross-repository mount asks for two).
        var scopes: [String]
        var authorization: String?
    }

    /// What happens to an upload session when a PATCH is cut midway.
    enum CutSession: Sendable {
        /// The registry keeps the bytes that arrived and the session (the OCI spec's resume).
        case keepsWhatArrived
        /// The session is gone (distribution 2.8 answers a later GET of it 404).
        case isLost
    }

    private struct State {
        var manifests: [String: StoredManifest] = [:]
        var blobs: [Digest: [UInt8]] = [:]
        var auth: Auth = .anonymous
        var validTokens: Set<String> = []
        var tokensIssued = 0
        var tokenRequests: [TokenRequest] = []
        var redirect: BlobRedirect = .none
        var ignoreRange = false
        var refusesHTTPS = false
        var rangeStartOverride: Int?
        var tokenRealm = FakeRegistry.tokenRealm
        var chunkSize = 4096
        var requests: [HTTPRequest] = []
        var uploads: [String: [UInt8]] = [:]
        var uploadsOpened = 0
        var otherRepositoryBlobs: [String: Set<Digest>] = [:]
        /// The next this-many PATCHes store only `cutAfter` bytes, then the connection drops.
        var patchCuts = 0
        var cutAfter = 0
        var cutSession = CutSession.keepsWhatArrived
        var manifestDigestAnswer: String?
    }

    let repository: String
    private let state = Mutex(State())

    init(repository: String) {
        self.repository = repository
    }

    // MARK: Configuration

    /// Stores a manifest under `tag` (if any) and under its digest; returns the digest.
    @discardableResult
    func putManifest(_ bytes: [UInt8], tag: String?, contentType: String?, digestHeader: String?? = nil) -> Digest {
        let digest = Digest.sha256(of: bytes)
        let stored = StoredManifest(bytes: bytes, contentType: contentType, digestHeader: digestHeader)
        state.withLock { state in
            if let tag { state.manifests[tag] = stored }
            state.manifests[digest.description] = stored
        }
        return digest
    }

    /// Stores a manifest under an arbitrary reference (a tag, or a digest it does not have).
    func putManifest(_ bytes: [UInt8], reference: String, contentType: String?, digestHeader: String?? = nil) {
        state.withLock { $0.manifests[reference] = StoredManifest(bytes: bytes, contentType: contentType, digestHeader: digestHeader) }
    }

    @discardableResult
    func putBlob(_ bytes: [UInt8]) -> Digest {
        let digest = Digest.sha256(of: bytes)
        state.withLock { $0.blobs[digest] = bytes }
        return digest
    }

    /// Serves `bytes` for `digest` whatever they hash to.
    func putBlob(_ bytes: [UInt8], as digest: Digest) {
        state.withLock { $0.blobs[digest] = bytes }
    }

    /// Another repository of the registry holds this blob (it may be mounted from there).
    func putBlob(_ bytes: [UInt8], inRepository other: String) {
        state.withLock { state in
            state.blobs[Digest.sha256(of: bytes)] = bytes
            state.otherRepositoryBlobs[other, default: []].insert(Digest.sha256(of: bytes))
        }
    }

    /// The next `times` PATCHes keep `afterBytes` bytes of their body, then the connection drops.
    func cutPatches(afterBytes: Int, times: Int = 1, session: CutSession) {
        state.withLock { state in
            state.patchCuts = times
            state.cutAfter = afterBytes
            state.cutSession = session
        }
    }

    /// Manifest PUTs are answered with this Docker-Content-Digest whatever they stored.
    func setManifestDigestAnswer(_ digest: String?) { state.withLock { $0.manifestDigestAnswer = digest } }

    func setAuth(_ auth: Auth) { state.withLock { $0.auth = auth } }
    func setRedirect(_ redirect: BlobRedirect) { state.withLock { $0.redirect = redirect } }
    func setIgnoreRange(_ ignore: Bool) { state.withLock { $0.ignoreRange = ignore } }
    /// Registry hosts answer plain HTTP only: an `https` request fails to connect.
    func setRefusesHTTPS(_ refuses: Bool) { state.withLock { $0.refusesHTTPS = refuses } }
    func setChunkSize(_ size: Int) { state.withLock { $0.chunkSize = max(1, size) } }
    /// Answers every range request with a 206 starting here, whatever was asked.
    func setRangeStartOverride(_ start: Int?) { state.withLock { $0.rangeStartOverride = start } }
    /// Where the Bearer challenge sends clients for tokens (default `tokenRealm`, on `tokenHost`).
    func setTokenRealm(_ realm: String) { state.withLock { $0.tokenRealm = realm } }
    /// Makes every token issued so far invalid, as an expiry on the server side would.
    func revokeTokens() { state.withLock { $0.validTokens.removeAll() } }

    // MARK: Observation

    var requests: [HTTPRequest] { state.withLock { $0.requests } }
    func blob(_ digest: Digest) -> [UInt8]? { state.withLock { $0.blobs[digest] } }
    func manifest(_ reference: String) -> StoredManifest? { state.withLock { $0.manifests[reference] } }
    var uploadsOpened: Int { state.withLock { $0.uploadsOpened } }
    /// Upload sessions neither closed nor deleted.
    var uploadsOpen: Int { state.withLock { $0.uploads.count } }
    var tokenRequests: [TokenRequest] { state.withLock { $0.tokenRequests } }
    var tokensIssued: Int { state.withLock { $0.tokensIssued } }
    var issuedTokenValues: [String] { state.withLock { s in (0..<s.tokensIssued).map { Self.tokenValue($0 + 1) } } }

    func requests(host: String) -> [HTTPRequest] {
        requests.filter { URLComponents(string: $0.url)?.host == host }
    }

    func requests(pathContains fragment: String) -> [HTTPRequest] {
        requests.filter { (URLComponents(string: $0.url)?.percentEncodedPath.removingPercentEncoding ?? "").contains(fragment) }
    }

    static func tokenValue(_ n: Int) -> String { "tok\(n)-SECRETTOKEN" }

    // MARK: HTTPTransport

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        let requestBody = try Self.bytes(of: request.body)
        let answer: (HTTPResponseHead, [UInt8], Int)?? = state.withLock { state in
            state.requests.append(request)
            if state.refusesHTTPS, request.url.hasPrefix("https://"),
               let host = URLComponents(string: request.url)?.host, host != Self.tokenHost, host != Self.cdnHost {
                return .some(nil)
            }
            guard let (head, body) = Self.respond(to: request, body: requestBody, repository: repository, state: &state) else {
                return nil
            }
            return (head, body, state.chunkSize)
        }
        guard let answer else {
            throw HTTPTransportError.protocolError("fake: \(request.url): connection dropped while the body was sent")
        }
        guard let (head, body, chunkSize) = answer else {
            throw HTTPTransportError.connectionFailed("fake: \(request.url): connection refused")
        }
        // Handlers run outside the lock, in chunks, as a network transport would call them.
        try onResponse(head)
        guard request.method != "HEAD", !body.isEmpty else { return }
        try body.withUnsafeBytes { buffer in
            var start = 0
            while start < buffer.count {
                let end = min(start + chunkSize, buffer.count)
                try onBody(UnsafeRawBufferPointer(rebasing: buffer[start..<end]))
                start = end
            }
        }
    }

    // MARK: Responses

    /// A request body's bytes, read from its file range as a transport would send them.
    private static func bytes(of body: HTTPRequestBody?) throws -> [UInt8] {
        switch body {
        case nil: return []
        case .bytes(let bytes): return bytes
        case .fileRange(let descriptor, let offset, let length):
            var bytes = [UInt8](repeating: 0, count: Int(length))
            let read = bytes.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, Int(length), off_t(offset)) }
            guard read == Int(length) else { throw HTTPTransportError.aborted("fake: short request body file") }
            return bytes
        case .stream(let stream):
            var bytes: [UInt8] = []
            var piece = [UInt8](repeating: 0, count: 64 << 10)
            while true {
                let got = try piece.withUnsafeMutableBytes { try stream.next(into: $0) }
                if got == 0 { return bytes }
                bytes += piece[..<got]
            }
        }
    }

    /// nil: the connection dropped before an answer.
    private static func respond(to request: HTTPRequest, body: [UInt8], repository: String,
                                state: inout State) -> (HTTPResponseHead, [UInt8])? {
        guard let components = URLComponents(string: request.url), let host = components.host else {
            return status(400, "BAD_REQUEST", "unparseable URL \(request.url)")
        }
        let path = components.percentEncodedPath.removingPercentEncoding ?? components.percentEncodedPath
        if let realm = URLComponents(string: state.tokenRealm), realm.host == host, realm.port == components.port,
           realm.percentEncodedPath == components.percentEncodedPath {
            return respondToken(request, components: components, path: "/token", state: &state)
        }
        switch host {
        case tokenHost:
            return respondToken(request, components: components, path: path, state: &state)
        case cdnHost:
            guard path.hasPrefix("/blobs/"), let digest = Digest(hex: String(path.dropFirst("/blobs/".count))),
                  let bytes = state.blobs[digest] else {
                return status(404, "BLOB_UNKNOWN", "blob unknown to cdn")
            }
            return serveBlob(bytes, request: request, state: state)
        default:
            return respondRegistry(request, components: components, path: path, body: body, repository: repository, state: &state)
        }
    }

    private static func respondRegistry(_ request: HTTPRequest, components: URLComponents, path: String, body: [UInt8],
                                        repository: String, state: inout State) -> (HTTPResponseHead, [UInt8])? {
        if let challenge = missingAuthChallenge(request, state: state) {
            var (head, body) = status(401, "UNAUTHORIZED", "authentication required")
            head.headers.add("WWW-Authenticate", challenge)
            return (head, body)
        }
        let prefix = "/v2/\(repository)/"
        guard path.hasPrefix(prefix) else { return status(404, "NAME_UNKNOWN", "repository name not known to registry") }
        let rest = path.dropFirst(prefix.count)
        if rest.hasPrefix("blobs/uploads/") {
            return respondUpload(request, components: components, uuid: String(rest.dropFirst("blobs/uploads/".count)),
                                 body: body, repository: repository, state: &state)
        }
        if request.method == "PUT", rest.hasPrefix("manifests/") {
            let reference = String(rest.dropFirst("manifests/".count))
            let digest = Digest.sha256(of: body)
            let stored = StoredManifest(bytes: body, contentType: request.headers["Content-Type"], digestHeader: nil)
            state.manifests[reference] = stored
            state.manifests[digest.description] = stored
            return (HTTPResponseHead(status: 201, headers: HTTPHeaders([
                ("Location", "/v2/\(repository)/manifests/\(digest)"),
                ("Docker-Content-Digest", state.manifestDigestAnswer ?? digest.description),
                ("Content-Length", "0"),
            ])), [])
        }
        guard request.method == "GET" || request.method == "HEAD" else { return status(405, "UNSUPPORTED", "method") }
        if rest.hasPrefix("manifests/") {
            let reference = String(rest.dropFirst("manifests/".count))
            guard let manifest = state.manifests[reference] else {
                return status(404, "MANIFEST_UNKNOWN", "manifest unknown")
            }
            var headers = HTTPHeaders([("Content-Length", String(manifest.bytes.count))])
            if let contentType = manifest.contentType { headers.add("Content-Type", contentType) }
            switch manifest.digestHeader {
            case nil: headers.add("Docker-Content-Digest", Digest.sha256(of: manifest.bytes).description)
            case .some(nil): break
            case .some(.some(let value)): headers.add("Docker-Content-Digest", value)
            }
            return (HTTPResponseHead(status: 200, headers: headers), manifest.bytes)
        }
        let redirected = rest.hasPrefix("redirected-blobs/")
        if rest.hasPrefix("blobs/") || redirected {
            let digestText = String(rest.drop(while: { $0 != "/" }).dropFirst())
            guard let digest = Digest(digestText), let bytes = state.blobs[digest] else {
                return status(404, "BLOB_UNKNOWN", "blob unknown to registry")
            }
            if !redirected {
                switch state.redirect {
                case .none: break
                case .otherHost:
                    return (HTTPResponseHead(status: 307, headers: HTTPHeaders([
                        ("Location", "http://\(cdnHost)/blobs/\(digest.hex)?sig=abc&expires=1"),
                        ("Content-Length", "0"),
                    ])), [])
                case .sameHost:
                    return (HTTPResponseHead(status: 307, headers: HTTPHeaders([
                        ("Location", "/v2/\(repository)/redirected-blobs/\(digest)"),
                        ("Content-Length", "0"),
                    ])), [])
                case .loop:
                    return (HTTPResponseHead(status: 307, headers: HTTPHeaders([
                        ("Location", request.url),
                        ("Content-Length", "0"),
                    ])), [])
                case .location(let location):
                    return (HTTPResponseHead(status: 307, headers: HTTPHeaders([
                        ("Location", location),
                        ("Content-Length", "0"),
                    ])), [])
                }
            }
            return serveBlob(bytes, request: request, state: state)
        }
        return status(404, "NOT_FOUND", "no such endpoint")
    }

    /// `POST blobs/uploads/[?mount=&from=]` opens a session (its Location relative, as the spec
    /// allows); `PATCH`, `GET`, `PUT ?digest=` and `DELETE` act on one (their Locations absolute).
    private static func respondUpload(_ request: HTTPRequest, components: URLComponents, uuid: String, body: [UInt8],
                                      repository: String, state: inout State) -> (HTTPResponseHead, [UInt8])? {
        let query = Dictionary((components.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { $1 })
        let base = "\(components.scheme ?? "http")://\(components.host ?? "")\(components.port.map { ":\($0)" } ?? "")"
        func session(_ status: Int, _ uuid: String, relative: Bool = false) -> (HTTPResponseHead, [UInt8]) {
            let held = state.uploads[uuid]?.count ?? 0
            let path = "/v2/\(repository)/blobs/uploads/\(uuid)?_state=\(uuid)-\(held)"
            return (HTTPResponseHead(status: status, headers: HTTPHeaders([
                ("Location", relative ? path : base + path),
                // As distribution: `0-0` for an empty session too.
                ("Range", "0-\(max(held - 1, 0))"),
                ("Docker-Upload-UUID", uuid),
                ("Content-Length", "0"),
            ])), [])
        }
        if uuid.isEmpty {
            guard request.method == "POST" else { return status(405, "UNSUPPORTED", "method") }
            if let mount = query["mount"].flatMap({ Digest($0) }), let from = query["from"],
               state.otherRepositoryBlobs[from]?.contains(mount) == true {
                return (HTTPResponseHead(status: 201, headers: HTTPHeaders([
                    ("Location", "/v2/\(repository)/blobs/\(mount)"), ("Docker-Content-Digest", mount.description),
                    ("Content-Length", "0"),
                ])), [])
            }
            state.uploadsOpened += 1
            let opened = "upload-\(state.uploadsOpened)"
            state.uploads[opened] = []
            return session(202, opened, relative: true)
        }
        guard let held = state.uploads[uuid] else { return status(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry") }
        switch request.method {
        case "GET":
            return session(204, uuid)
        case "DELETE":
            state.uploads[uuid] = nil
            return (HTTPResponseHead(status: 204, headers: HTTPHeaders([("Content-Length", "0")])), [])
        case "PATCH":
            // Without Content-Range the body is appended, as distribution does for a streamed upload.
            if let range = request.headers["Content-Range"] {
                guard let start = range.split(separator: "-").first.flatMap({ Int($0) }), start == held.count else {
                    return status(416, "RANGE_INVALID", "invalid content range")
                }
            }
            if state.patchCuts > 0 {
                state.patchCuts -= 1
                switch state.cutSession {
                case .keepsWhatArrived: state.uploads[uuid]!.append(contentsOf: body.prefix(state.cutAfter))
                case .isLost: state.uploads[uuid] = nil
                }
                return nil
            }
            state.uploads[uuid]!.append(contentsOf: body)
            return session(202, uuid)
        case "PUT":
            let bytes = held + body
            state.uploads[uuid] = nil
            guard let digest = query["digest"].flatMap({ Digest($0) }), Digest.sha256(of: bytes) == digest else {
                return status(400, "DIGEST_INVALID", "provided digest did not match uploaded content")
            }
            state.blobs[digest] = bytes
            return (HTTPResponseHead(status: 201, headers: HTTPHeaders([
                ("Location", "\(base)/v2/\(repository)/blobs/\(digest)"), ("Docker-Content-Digest", digest.description),
                ("Content-Length", "0"),
            ])), [])
        default:
            return status(405, "UNSUPPORTED", "method")
        }
    }

    /// The challenge to answer with when the request lacks valid credentials.
    private static func missingAuthChallenge(_ request: HTTPRequest, state: State) -> String? {
        let authorization = request.headers["Authorization"]
        switch state.auth {
        case .anonymous:
            return nil
        case .basic(let username, let password):
            return authorization == basicHeader(username, password) ? nil : #"Basic realm="fake registry""#
        case .bearer(let service, let scope, _, _, _):
            if let authorization, authorization.hasPrefix("Bearer "),
               state.validTokens.contains(String(authorization.dropFirst("Bearer ".count))) {
                return nil
            }
            var challenge = #"Bearer realm="\#(state.tokenRealm)",service="\#(service)""#
            if let scope { challenge += #",scope="\#(scope)""# }
            return challenge
        }
    }

    private static func respondToken(_ request: HTTPRequest, components: URLComponents, path: String,
                                     state: inout State) -> (HTTPResponseHead, [UInt8]) {
        guard path == "/token" else { return status(404, "NOT_FOUND", "no such endpoint") }
        var query: [String: String] = [:]
        var items = components.queryItems ?? []
        if request.method == "POST" {
            var form = URLComponents()
            form.percentEncodedQuery = String(decoding: request.body?.bytes ?? [], as: UTF8.self)
            items = form.queryItems ?? []
        }
        for item in items { query[item.name] = item.value ?? "" }
        state.tokenRequests.append(TokenRequest(service: query["service"], scope: query["scope"],
                                                scopes: items.filter { $0.name == "scope" }.compactMap(\.value),
                                                authorization: request.headers["Authorization"]))
        guard case .bearer(let service, _, let username, let password, let expiresIn) = state.auth else {
            return status(404, "NOT_FOUND", "no token service")
        }
        guard query["service"] == service else { return status(400, "BAD_REQUEST", "wrong service") }
        if let username, let password, request.headers["Authorization"] != basicHeader(username, password) {
            return status(401, "UNAUTHORIZED", "incorrect username or password")
        }
        state.tokensIssued += 1
        let token = tokenValue(state.tokensIssued)
        state.validTokens.insert(token)
        var json = #"{"token":"\#(token)""#
        if let expiresIn { json += #","expires_in":\#(expiresIn)"# }
        json += "}"
        return (HTTPResponseHead(status: 200, headers: HTTPHeaders([("Content-Type", "application/json")])), Array(json.utf8))
    }

    private static func serveBlob(_ bytes: [UInt8], request: HTTPRequest, state: State) -> (HTTPResponseHead, [UInt8]) {
        if !state.ignoreRange, let range = request.headers["Range"] {
            guard range.hasPrefix("bytes="), range.hasSuffix("-"),
                  let requested = Int(range.dropFirst("bytes=".count).dropLast()) else {
                return status(400, "RANGE_INVALID", "unsupported range \(range)")
            }
            let start = state.rangeStartOverride ?? requested
            guard start < bytes.count else {
                return (HTTPResponseHead(status: 416, headers: HTTPHeaders([("Content-Range", "bytes */\(bytes.count)")])), [])
            }
            return (HTTPResponseHead(status: 206, headers: HTTPHeaders([
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", String(bytes.count - start)),
                ("Content-Range", "bytes \(start)-\(bytes.count - 1)/\(bytes.count)"),
            ])), Array(bytes[start...]))
        }
        return (HTTPResponseHead(status: 200, headers: HTTPHeaders([
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", String(bytes.count)),
        ])), bytes)
    }

    private static func status(_ code: Int, _ errorCode: String, _ message: String) -> (HTTPResponseHead, [UInt8]) {
        let body = Array(#"{"errors":[{"code":"\#(errorCode)","message":"\#(message)"}]}"#.utf8)
        return (HTTPResponseHead(status: code, headers: HTTPHeaders([
            ("Content-Type", "application/json"),
            ("Content-Length", String(body.count)),
        ])), body)
    }

    static func basicHeader(_ username: String, _ password: String) -> String {
        "Basic " + Data("\(username):\(password)".utf8).base64EncodedString()
    }
}
