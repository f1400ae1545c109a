import FoundationEssentials
import HTTPClient
import Logging
import Synchronization

/// One request's dealings with the authenticator. A request answers one challenge, and a
/// second one only by asking the credential source again, which it does at most once: a source
/// that keeps handing out refused credentials must not turn one read into a loop.
struct AuthenticationRound {
    fileprivate(set) var challengesAnswered = 0
    fileprivate(set) var askedSourceAgain = false
    /// What the latest attempt carried, and when it left: a 401 refuses that.
    private(set) var sentAuthorization: String?
    private(set) var sentAt = ContinuousClock.now

    mutating func sending(_ authorization: String?) {
        sentAuthorization = authorization
        sentAt = .now
    }
}

/// Answers a registry's `WWW-Authenticate` challenges (Basic, or the Bearer token flow) and
/// remembers the resulting Authorization header until it expires or is refused. When the
/// registry or its token server refuses the credential, the credential source is asked again.
final class RegistryAuthenticator: Sendable {
    private struct CachedAuthorization {
        var header: String
        var expires: ContinuousClock.Instant?
    }

    /// The last time the source was asked again, for the requests refused while it was asked.
    private struct SourceAnswer {
        var finished: ContinuousClock.Instant
        var outcome: Result<RegistryCredential?, RemoteStoreError>
    }

    private enum TokenAnswer {
        case token(String, lifetime: Duration)
        case refused(status: Int)
    }

    private let host: String
    private let currentCredential: Mutex<RegistryCredential?>
    private let credentialSource: RegistryCredentialSource?
    /// Held while the source is asked again, so that a burst of refusals from concurrent
    /// requests runs the helper once; the others wait for its answer and share it.
    private let lastSourceAnswer = Mutex<SourceAnswer?>(nil)
    private let transport: any HTTPTransport
    private let timeout: Duration
    private let logger: Logger?
    private let cached = Mutex<CachedAuthorization?>(nil)
    /// An insecure registry's own host, whose token endpoint is trusted without a certificate check.
    private let unverifiedTLSHost: String?

    /// - Parameters:
    ///   - credential: what `credentialSource` gave at mount (nil: none).
    ///   - credentialSource: asked again when `credential` is refused; nil: it never changes.
    init(host: String, credential: RegistryCredential?, credentialSource: RegistryCredentialSource? = nil,
         transport: any HTTPTransport, timeout: Duration, unverifiedTLSHost: String? = nil, logger: Logger? = nil) {
        self.host = host
        self.unverifiedTLSHost = unverifiedTLSHost
        self.currentCredential = Mutex(credential)
        self.credentialSource = credentialSource
        self.transport = transport
        self.timeout = timeout
        self.logger = logger
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

    /// Whether a request that answered its challenge and was refused again may try once more.
    func mayAnswerAgain(_ round: AuthenticationRound) -> Bool {
        round.challengesAnswered == 0 || (round.challengesAnswered == 1 && credentialSource != nil && !round.askedSourceAgain)
    }

    /// Turns a 401's challenges into a fresh Authorization header for `scope`.
    func answer(challenges headerValues: [String], scope: String, round: inout AuthenticationRound) throws(RemoteStoreError) {
        // The refused header stays cached until a new one replaces it: dropped now, concurrent
        // requests would go out with none, be challenged afresh and miss this burst's answer.
        round.challengesAnswered += 1
        let challenges = headerValues.flatMap { AuthChallenge.parse($0) }
        var credential = currentCredential.withLock { $0 }
        if let bearer = challenges.first(where: { $0.scheme == "bearer" }) {
            // A fresh token refused is the credential behind it refused (an expired cloud login
            // still gets a token, with no access in it).
            if round.challengesAnswered > 1 {
                let replacement = try replacementCredential(for: credential, refusedWith: 401, round: &round)
                // No login before and none now: another anonymous token would be refused too.
                guard replacement != credential else {
                    throw .unauthorized("registry \(host) refused anonymous access (HTTP 401); add credentials with docker login")
                }
                credential = replacement
            }
            var answer = try fetchToken(bearer, defaultScope: scope, credential: credential)
            if case .refused(let status) = answer, credentialSource != nil, !round.askedSourceAgain {
                credential = try replacementCredential(for: credential, refusedWith: status, round: &round)
                answer = try fetchToken(bearer, defaultScope: scope, credential: credential)
            }
            switch answer {
            case .token(let token, let lifetime):
                // Renew a little early so a token never expires between check and use.
                let margin = min(lifetime / 10, .seconds(30))
                cached.withLock { $0 = CachedAuthorization(header: "Bearer " + token, expires: .now + lifetime - margin) }
            case .refused(let status):
                throw .unauthorized(credential == nil
                    ? "token server for \(host) refused anonymous access (HTTP \(status)); add credentials with docker login"
                    : "token server for \(host) refused the credentials from the Docker config (HTTP \(status))")
            }
        } else if challenges.contains(where: { $0.scheme == "basic" }) {
            // The header we sent was this credential's (another request may have replaced it
            // since, and then the new one is simply tried): the registry refused it.
            let refused = credential == nil || round.sentAuthorization == credential.flatMap(Self.basicHeader)
            if refused, credentialSource != nil, !round.askedSourceAgain {
                credential = try replacementCredential(for: credential, refusedWith: 401, round: &round)
            }
            guard let credential, let header = Self.basicHeader(credential) else {
                throw .unauthorized("registry \(host) requires a username and password; none found in the Docker config for \(host)")
            }
            cached.withLock { $0 = CachedAuthorization(header: header, expires: nil) }
        } else {
            throw .unauthorized("registry \(host) answered 401 without a supported authentication challenge")
        }
    }

    /// The credential to use instead of `refused`, from the source asked again. A burst of
    /// refusals asks it once: a request sent before the last asking ended takes that answer,
    /// and one refused with a credential another request already replaced takes the new one.
    /// The same credential again is an error, not a reason to try it again, and it stands for
    /// the source's `failureStandsFor`.
    private func replacementCredential(for refused: RegistryCredential?, refusedWith status: Int,
                                       round: inout AuthenticationRound) throws(RemoteStoreError) -> RegistryCredential? {
        guard let credentialSource else { return refused }
        round.askedSourceAgain = true
        let refusedRequestSentAt = round.sentAt
        let outcome = lastSourceAnswer.withLock { last -> Result<RegistryCredential?, RemoteStoreError> in
            let current = currentCredential.withLock { $0 }
            if current != refused { return .success(current) }
            if let last, last.finished > refusedRequestSentAt { return last.outcome }
            if let last, case .failure = last.outcome, .now < last.finished + credentialSource.failureStandsFor {
                return last.outcome
            }
            let outcome = askAgain(credentialSource, replacing: refused, refusedWith: status)
            if case .success(let fresh) = outcome { currentCredential.withLock { $0 = fresh } }
            last = SourceAnswer(finished: .now, outcome: outcome)
            return outcome
        }
        return try outcome.get()
    }

    private func askAgain(_ source: RegistryCredentialSource, replacing refused: RegistryCredential?,
                          refusedWith status: Int) -> Result<RegistryCredential?, RemoteStoreError> {
        logger?.info("the registry refused the credential; asking its source again",
                     metadata: ["host": "\(host)", "source": "\(source.name)", "status": "\(status)"])
        let fresh: RegistryCredential?
        do {
            fresh = try source.credential()
        } catch {
            // CredentialError's message is one line and never holds a secret.
            return .failure(.unauthorized("\(host) refused the credentials (HTTP \(status)) and asking \(source.name) again failed: \(error)"))
        }
        // None before and none now: the caller's usual message for a missing login says it.
        if fresh == refused && refused != nil {
            return .failure(.unauthorized(
                "\(host) refused the credentials from \(source.name) (HTTP \(status)), and asked again it gave the same ones; log in to \(host) again"))
        }
        return .success(fresh)
    }

    private func fetchToken(_ challenge: AuthChallenge, defaultScope: String,
                            credential: RegistryCredential?) throws(RemoteStoreError) -> TokenAnswer {
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
            request.body = .bytes(Array(Self.formEncode(form).utf8))
        case .basic(let username, let password):
            request.headers.set("Authorization", Self.basicHeader(username, password))
            fallthrough
        case nil:
            var items = components.queryItems ?? []
            if let service { items.append(URLQueryItem(name: "service", value: service)) }
            // A challenge names several scopes apart by spaces (a cross-repository mount needs
            // two repositories); the token endpoint takes one scope parameter for each.
            for single in scope.split(separator: " ") { items.append(URLQueryItem(name: "scope", value: String(single))) }
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
            return .refused(status: response.status)
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
        return .token(token, lifetime: .seconds(seconds))
    }

    private static func hostAndPort(_ url: URL) -> String {
        guard let host = url.host else { return "" }
        return url.port.map { "\(host):\($0)" } ?? host
    }

    static func basicHeader(_ username: String, _ password: String) -> String {
        "Basic " + Data("\(username):\(password)".utf8).base64EncodedString()
    }

    /// The Basic header for a username and password; nil for an identity token, which only a
    /// token server takes.
    static func basicHeader(_ credential: RegistryCredential) -> String? {
        guard case .basic(let username, let password) = credential else { return nil }
        return basicHeader(username, password)
    }

    private static func formEncode(_ pairs: [(String, String)]) -> String {
        pairs.map { key, value in "\(key)=\(SigV4.uriEncode(value, encodeSlash: true))" }.joined(separator: "&")
    }
}
