import FoundationEssentials
import HTTPClient
import Synchronization

/// Answers a registry's `WWW-Authenticate` challenges (Basic, or the Bearer token flow) and
/// remembers the resulting Authorization header until it expires or is refused.
final class RegistryAuthenticator: Sendable {
    private struct CachedAuthorization {
        var header: String
        var expires: ContinuousClock.Instant?
    }

    private let host: String
    private let credential: RegistryCredential?
    private let transport: any HTTPTransport
    private let timeout: Duration
    private let cached = Mutex<CachedAuthorization?>(nil)
    /// An insecure registry's own host, whose token endpoint is trusted without a certificate check.
    private let unverifiedTLSHost: String?

    init(host: String, credential: RegistryCredential?, transport: any HTTPTransport, timeout: Duration,
         unverifiedTLSHost: String? = nil) {
        self.host = host
        self.unverifiedTLSHost = unverifiedTLSHost
        self.credential = credential
        self.transport = transport
        self.timeout = timeout
    }

    /// The header to send, if one is known and still valid.
    func currentAuthorization() -> String? {
        cached.withLock { entry in
            guard let current = entry else { return nil }
            if let expires = current.expires, expires <= .now {
                entry = nil
                return nil
            }
            return current.header
        }
    }

    /// Turns a 401's challenges into a fresh Authorization header for `scope`.
    func answer(challenges headerValues: [String], scope: String) throws(RemoteStoreError) {
        cached.withLock { $0 = nil }
        let challenges = headerValues.flatMap { AuthChallenge.parse($0) }
        if let bearer = challenges.first(where: { $0.scheme == "bearer" }) {
            let (token, lifetime) = try fetchToken(bearer, defaultScope: scope)
            // Renew a little early so a token never expires between check and use.
            let margin = min(lifetime / 10, .seconds(30))
            cached.withLock { $0 = CachedAuthorization(header: "Bearer " + token, expires: .now + lifetime - margin) }
        } else if challenges.contains(where: { $0.scheme == "basic" }) {
            guard case .basic(let username, let password)? = credential else {
                throw .unauthorized("registry \(host) requires a username and password; none found in the Docker config for \(host)")
            }
            cached.withLock { $0 = CachedAuthorization(header: Self.basicHeader(username, password), expires: nil) }
        } else {
            throw .unauthorized("registry \(host) answered 401 without a supported authentication challenge")
        }
    }

    private func fetchToken(_ challenge: AuthChallenge, defaultScope: String) throws(RemoteStoreError) -> (String, Duration) {
        guard let realm = challenge.parameters["realm"], var components = URLComponents(string: realm),
              components.scheme == "https" || components.scheme == "http" else {
            throw .unauthorized("registry \(host) sent a Bearer challenge without a usable realm")
        }
        let service = challenge.parameters["service"]
        let scope = challenge.parameters["scope"] ?? defaultScope
        var request = HTTPRequest(url: "", stallTimeout: timeout, totalTimeout: timeout)
        switch credential {
        case .identityToken(let refreshToken):
            var form = [("grant_type", "refresh_token"), ("refresh_token", refreshToken), ("client_id", "ocicachefs"), ("scope", scope)]
            if let service { form.append(("service", service)) }
            request.method = "POST"
            request.url = realm
            request.headers.set("Content-Type", "application/x-www-form-urlencoded")
            request.body = Array(Self.formEncode(form).utf8)
        case .basic(let username, let password):
            request.headers.set("Authorization", Self.basicHeader(username, password))
            fallthrough
        case nil:
            var items = components.queryItems ?? []
            if let service { items.append(URLQueryItem(name: "service", value: service)) }
            items.append(URLQueryItem(name: "scope", value: scope))
            components.queryItems = items
            request.url = components.string ?? realm
        }
        if let unverifiedTLSHost, URL(string: request.url).map({ Self.hostAndPort($0) }) == unverifiedTLSHost {
            request.verifiesTLSPeer = false
        }
        let response: HTTPResponse
        do {
            response = try transport.fetch(request, maxBodyBytes: 1 << 20)
        } catch let error as HTTPTransportError {
            // The realm is the registry's word: one the transport cannot fetch is refused, not retried.
            if case .invalidRequest = error {
                throw .invalidContent("token server \(components.host ?? realm) for \(host): \(error)")
            }
            throw RemoteStoreError(error, context: "token server \(components.host ?? realm) for \(host)")
        } catch {
            throw .transport("token server \(components.host ?? realm) for \(host): \(error)")
        }
        switch response.status {
        case 200..<300: break
        case 401, 403:
            throw .unauthorized(credential == nil
                ? "token server for \(host) refused anonymous access (HTTP \(response.status)); add credentials with docker login"
                : "token server for \(host) refused the credentials from the Docker config (HTTP \(response.status))")
        default:
            throw .server("token server for \(host) answered HTTP \(response.status)")
        }
        struct TokenResponse: Decodable {
            var token: String?
            var access_token: String?
            var expires_in: Int?
        }
        guard let decoded = try? JSONDecoder().decode(TokenResponse.self, from: Data(response.body)),
              let token = decoded.token ?? decoded.access_token, !token.isEmpty else {
            throw .invalidContent("token server for \(host) sent no token")
        }
        // The distribution spec's default lifetime is 60 s when none is given.
        let seconds = max(decoded.expires_in ?? 60, 1)
        return (token, .seconds(seconds))
    }

    private static func hostAndPort(_ url: URL) -> String {
        guard let host = url.host else { return "" }
        return url.port.map { "\(host):\($0)" } ?? host
    }

    static func basicHeader(_ username: String, _ password: String) -> String {
        "Basic " + Data("\(username):\(password)".utf8).base64EncodedString()
    }

    private static func formEncode(_ pairs: [(String, String)]) -> String {
        pairs.map { key, value in "\(key)=\(SigV4.uriEncode(value, encodeSlash: true))" }.joined(separator: "&")
    }
}
