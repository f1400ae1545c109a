import FoundationEssentials
import HTTPClient
import Logging
import Synchronization

/// The HTTP side of one registry repository, shared by the source that reads it and the
/// publisher that writes to it: where the API is (an insecure registry's scheme found by a
/// probe), the credential and the tokens it earns, and one exchange with challenges and
/// redirects answered.
final class RegistryConnection: Sendable {
    private static let maxRedirects = 5

    let reference: RegistryReference
    /// BuildKit's `registry.insecure`; never set for loopback, which is plain HTTP anyway.
    let insecure: Bool
    /// For an insecure registry, HTTPS without verification until a probe shows only HTTP works.
    private let resolvedBaseURL: Mutex<URL>
    var baseURL: URL { resolvedBaseURL.withLock { $0 } }
    let transport: any HTTPTransport
    private let authenticator: RegistryAuthenticator
    let timeout: Duration
    let logger: Logger

    init(reference: RegistryReference, insecure: Bool, credential: RegistryCredential?,
         credentialSource: RegistryCredentialSource?, transport: any HTTPTransport, timeout: Duration, logger: Logger) {
        self.reference = reference
        self.insecure = insecure && !reference.isLoopback
        let scheme = reference.isLoopback ? "http" : "https"
        // RegistryReference accepts only hosts that make a URL.
        self.resolvedBaseURL = Mutex(URL(string: "\(scheme)://\(reference.apiHost)")!)
        self.transport = transport
        self.timeout = timeout
        self.logger = logger
        self.authenticator = RegistryAuthenticator(host: reference.host, credential: credential,
                                                   credentialSource: credentialSource,
                                                   transport: transport, timeout: timeout,
                                                   unverifiedTLSHost: self.insecure ? reference.apiHost : nil,
                                                   logger: logger)
    }

    /// The token scope for reading the repository, and for writing to it.
    var pullScope: String { "repository:\(reference.repository):pull" }
    var pushScope: String { "repository:\(reference.repository):pull,push" }

    /// BuildKit's `registry.insecure`: HTTPS without certificate checks, else plain HTTP.
    func chooseInsecureScheme() {
        var probe = HTTPRequest(url: baseURL.appendingPathComponent("v2/").absoluteString,
                                stallTimeout: timeout, totalTimeout: timeout)
        probe.verifiesTLSPeer = false
        do {
            _ = try transport.fetch(probe, maxBodyBytes: 64 << 10)
        } catch {
            let http = URL(string: "http://\(reference.apiHost)")!
            logger.info("registry is insecure and does not answer HTTPS; using HTTP", metadata: ["host": "\(reference.host)"])
            resolvedBaseURL.withLock { $0 = http }
        }
    }

    func apiURL(_ path: String) -> URL {
        baseURL.appendingPathComponent("v2/\(reference.repository)/\(path)")
    }

    /// The registry's final answer to one request, and the URL that gave it (after redirects),
    /// against which a relative `Location` in it is resolved.
    struct Answer {
        var head: HTTPResponseHead
        /// The start of a body that was not a success, for the error message.
        var errorBody: [UInt8]
        var url: URL
        var status: Int { head.status }
    }

    /// One registry exchange: answers auth challenges for `scope` (a second time only with
    /// credentials asked for again), follows redirects (never carrying credentials to another
    /// origin), and hands only a successful body to `onBody`. Any other final answer is
    /// returned for the caller to judge.
    func exchange(_ method: String, _ url: URL, headers: HTTPHeaders, body: HTTPRequestBody? = nil,
                  scope: String, totalTimeout: Duration?,
                  onResponse: (HTTPResponseHead) throws -> Void = { _ in },
                  onBody: (UnsafeRawBufferPointer) throws -> Void = { _ in }) throws -> Answer {
        var url = url
        var redirects = 0
        var authentication = AuthenticationRound()
        while true {
            var request = HTTPRequest(method: method, url: url.absoluteString, headers: headers, body: body,
                                      stallTimeout: timeout, totalTimeout: totalTimeout)
            let sameOrigin = Self.origin(of: url) == Self.origin(of: baseURL)
            request.verifiesTLSPeer = !(insecure && sameOrigin)
            let sentAuthorization = sameOrigin ? authenticator.currentAuthorization() : nil
            if let sentAuthorization { request.headers.set("Authorization", sentAuthorization) }
            authentication.sending(sentAuthorization)
            let head: HTTPResponseHead
            let errorBody: [UInt8]
            do {
                (head, errorBody) = try transport.executeExpectingSuccess(request, onSuccess: onResponse, onBody: onBody)
            } catch let error as HTTPTransportError {
                // A URL the transport cannot fetch came from the registry (a redirect): a refusal,
                // not an outage, so neither retried nor answered from a saved resolution.
                if case .invalidRequest = error {
                    throw RemoteStoreError.invalidContent("\(reference.host): \(error)")
                }
                throw RemoteStoreError(error, context: reference.host)
            }
            switch head.status {
            case 301, 302, 303, 307, 308:
                guard redirects < Self.maxRedirects, let location = head.headers["Location"],
                      let next = URL(string: location, relativeTo: url)?.absoluteURL else {
                    throw RemoteStoreError.invalidContent("\(reference.host): too many or unusable redirects for \(url.path)")
                }
                guard let scheme = next.scheme?.lowercased(), scheme == "http" || scheme == "https" else {
                    throw RemoteStoreError.invalidContent(
                        "\(reference.host): redirect for \(url.path) to a \(next.scheme ?? "relative") URL refused (only http and https are followed)")
                }
                redirects += 1
                url = next
            case 401 where sameOrigin && authenticator.mayAnswerAgain(authentication):
                try authenticator.answer(challenges: head.headers.values("WWW-Authenticate"), scope: scope,
                                         round: &authentication)
            default:
                return Answer(head: head, errorBody: errorBody, url: url)
            }
        }
    }

    /// A GET through `exchange` that only a success answers: anything else is thrown, as the
    /// registry's refusal, absence or failure.
    func perform(_ url: URL, headers: HTTPHeaders, scope: String, totalTimeout: Duration?,
                 onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws -> HTTPResponseHead {
        let answer = try exchange("GET", url, headers: headers, scope: scope, totalTimeout: totalTimeout,
                                  onResponse: onResponse, onBody: onBody)
        guard (200..<300).contains(answer.status) else { throw failure(answer) }
        return answer.head
    }

    /// What an answer that is not a success means, in one line.
    func failure(_ answer: Answer) -> RemoteStoreError {
        let summary = RegistrySource.registryErrorSummary(answer.errorBody)
        let path = answer.url.path
        switch answer.status {
        case 401, 403:
            return .unauthorized("\(reference.host) refused access to \(reference.repository) (HTTP \(answer.status)\(summary))")
        case 404:
            return .notFound("\(path): HTTP 404\(summary)")
        case 429, 500...599:
            return .server("\(reference.host): HTTP \(answer.status) for \(path)\(summary)")
        default:
            return .server("\(reference.host): unexpected HTTP \(answer.status) for \(path)\(summary)")
        }
    }

    private static func origin(of url: URL) -> String {
        "\(url.scheme ?? "")://\(url.host ?? ""):\(url.port ?? (url.scheme == "https" ? 443 : 80))"
    }
}
