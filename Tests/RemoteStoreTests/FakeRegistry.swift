import Foundation
import HTTPClient
import OCI
import Synchronization

/// An in-memory OCI distribution registry behind `HTTPTransport`, for driving `RegistrySource`
/// without a network. It serves `/v2/<repo>/manifests/<ref>` and `/v2/<repo>/blobs/<digest>`
/// for any host except the two helper hosts below, honours `Range: bytes=N-`, can demand Basic
/// or Bearer auth (with a token endpoint at `tokenHost`), can redirect blob GETs (to `cdnHost`
/// or to another path on its own host), and records every request it sees.
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
        var authorization: String?
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
        let answer: (HTTPResponseHead, [UInt8], Int)? = state.withLock { state in
            state.requests.append(request)
            if state.refusesHTTPS, request.url.hasPrefix("https://"),
               let host = URLComponents(string: request.url)?.host, host != Self.tokenHost, host != Self.cdnHost {
                return nil
            }
            let (head, body) = Self.respond(to: request, repository: repository, state: &state)
            return (head, body, state.chunkSize)
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

    private static func respond(to request: HTTPRequest, repository: String, state: inout State) -> (HTTPResponseHead, [UInt8]) {
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
            return respondRegistry(request, path: path, repository: repository, state: &state)
        }
    }

    private static func respondRegistry(_ request: HTTPRequest, path: String, repository: String,
                                        state: inout State) -> (HTTPResponseHead, [UInt8]) {
        if let challenge = missingAuthChallenge(request, state: state) {
            var (head, body) = status(401, "UNAUTHORIZED", "authentication required")
            head.headers.add("WWW-Authenticate", challenge)
            return (head, body)
        }
        let prefix = "/v2/\(repository)/"
        guard path.hasPrefix(prefix) else { return status(404, "NAME_UNKNOWN", "repository name not known to registry") }
        let rest = path.dropFirst(prefix.count)
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
        if request.method == "POST" {
            var form = URLComponents()
            form.percentEncodedQuery = String(decoding: request.body?.bytes ?? [], as: UTF8.self)
            for item in form.queryItems ?? [] { query[item.name] = item.value ?? "" }
        } else {
            for item in components.queryItems ?? [] { query[item.name] = item.value ?? "" }
        }
        state.tokenRequests.append(TokenRequest(service: query["service"], scope: query["scope"],
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
