// AWS credentials for the S3 source, resolved the way BuildKit (aws-sdk-go-v2's default chain)
// does: explicit source attributes, the environment, web identity, the shared config/credentials
// files (keys, assumed roles, SSO, credential_process), container credentials, then EC2
// instance metadata (IMDSv2). First match wins.

import FoundationEssentials
import SystemSupport
import HTTPClient
import Synchronization

// MARK: - AWSCredentialProvider

/// Something that hands out AWS credentials for signing requests.
public protocol AWSCredentialProvider: Sendable {
    /// Current credentials; refreshed before temporary ones expire.
    func credentials() throws(RemoteStoreError) -> AWSCredentials
}

// MARK: - AWSCredentialChain

/// The default AWS credential chain, in BuildKit's order (aws-sdk-go-v2):
///
/// 1. `explicit` (the source attributes `access_key_id`, `secret_access_key`, `session_token`);
/// 2. `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`;
/// 3. web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN` (and
///    `AWS_ROLE_SESSION_NAME`), exchanged with STS `AssumeRoleWithWebIdentity`;
/// 4. the profile `AWS_PROFILE` (default `default`) of the shared credentials file
///    (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`) and the config file
///    (`AWS_CONFIG_FILE`, default `~/.aws/config`), in the SDKs' order within a profile:
///    `role_arn` with `source_profile` (STS `AssumeRole` signed with the source profile's
///    credentials, source profiles chained up to `maxProfileChain` deep) or with
///    `web_identity_token_file`; keys (`aws_access_key_id`…); SSO (`sso_session` or
///    `sso_start_url`, from the token `aws sso login` caches); `credential_process`;
/// 5. container credentials (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `_FULL_URI`);
///    when these are configured, instance metadata is not tried (as in the AWS SDKs);
/// 6. EC2 instance metadata, IMDSv2 (unless `AWS_EC2_METADATA_DISABLED=true`).
///
/// Every network exchange is bounded: container and instance metadata requests by `timeout`
/// (both the stall and the total bound), so a source that does not answer costs at most
/// `timeout` per request (one request for container credentials, at most three for instance
/// metadata); STS and SSO requests, and a `credential_process` run, by `serviceTimeout`.
///
/// Credentials from steps 2–6 are cached. Those without an expiration are kept for the life
/// of the chain; temporary ones are refreshed once less than five minutes remain. While a
/// refresh is under way other callers keep getting the old, still valid credentials; if a
/// refresh fails while the old ones are still valid, those are used and the refresh is retried
/// a little later. Errors are one line and never contain a secret.
public final class AWSCredentialChain: AWSCredentialProvider {
    /// Temporary credentials are refreshed when less than this remains.
    public static let refreshWindow: TimeInterval = 5 * 60
    /// After a failed refresh (old credentials still valid), the next attempt waits this long.
    static let retryAfterFailure: TimeInterval = 30
    static let containerHost = "169.254.170.2"
    static let imdsDefaultEndpoint = "http://169.254.169.254"
    static let imdsIPv6Endpoint = "http://[fd00:ec2::254]"
    static let imdsTokenTTLSeconds = "21600"
    static let maxResponseBytes = 64 * 1024

    static let noCredentialsMessage = "no AWS credentials found: set access_key_id/secret_access_key, "
        + "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile in ~/.aws/credentials, "
        + "or run where container or instance credentials exist"

    private struct CacheState {
        var cached: AWSCredentials?
        /// When the cached credentials are due for a refresh; nil: never (no expiration).
        var refreshAt: Date?
        var refreshing = false

        /// The cached credentials if they are not yet due for a refresh.
        func fresh(at now: Date) -> AWSCredentials? {
            guard let cached else { return nil }
            if let refreshAt, now >= refreshAt { return nil }
            return cached
        }

        /// Fresh credentials, or while someone else refreshes, old ones that have not expired.
        func usable(at now: Date) -> AWSCredentials? {
            if let fresh = fresh(at: now) { return fresh }
            guard refreshing, let cached, !AWSCredentialChain.hasExpired(cached, at: now) else { return nil }
            return cached
        }
    }

    /// Source profiles followed from one profile at most (`role_arn` + `source_profile`).
    static let maxProfileChain = 8

    private let explicit: AWSCredentials?
    let environment: [String: String]
    let transport: any HTTPTransport
    private let timeout: Duration
    let serviceTimeout: Duration
    /// The region of the bucket: STS's region when neither the environment nor the profile names one.
    let defaultRegion: String?
    let workingDirectory: String
    let now: @Sendable () -> Date
    private let state = Mutex(CacheState())
    /// Held for the whole of a refresh, so concurrent callers do not fetch twice.
    private let refreshLock = Mutex(())

    /// - Parameters:
    ///   - explicit: credentials from the source attributes; when given, nothing else is tried.
    ///   - environment: the environment for `AWS_*` variables and `HOME`.
    ///   - transport: HTTP for container credentials and instance metadata.
    ///   - transport: HTTP for container credentials, instance metadata, STS and SSO.
    ///   - timeout: the bound on each container or instance metadata request.
    ///   - serviceTimeout: the bound on each STS or SSO request and on a `credential_process` run.
    ///   - region: the bucket's region, for STS when nothing else names one.
    ///   - workingDirectory: what relative file names in the environment and profiles mean.
    ///   - now: the clock deciding when temporary credentials are refreshed.
    public init(explicit: AWSCredentials?, environment: [String: String] = ProcessInfo.processInfo.environment,
                transport: any HTTPTransport, timeout: Duration = .seconds(2), serviceTimeout: Duration = .seconds(30),
                region: String? = nil, workingDirectory: String = FileManager.default.currentDirectoryPath,
                now: @escaping @Sendable () -> Date = Date.init) {
        self.explicit = explicit
        self.environment = environment
        self.transport = transport
        self.timeout = timeout
        self.serviceTimeout = serviceTimeout
        self.defaultRegion = region
        self.workingDirectory = workingDirectory
        self.now = now
    }

    public func credentials() throws(RemoteStoreError) -> AWSCredentials {
        if let explicit {
            guard !explicit.accessKeyID.isEmpty, !explicit.secretAccessKey.isEmpty else {
                throw .configuration("AWS credentials need both access_key_id and secret_access_key")
            }
            return explicit
        }
        if let usable = state.withLock({ $0.usable(at: now()) }) { return usable }

        return try refreshLock.withLock { _ throws(RemoteStoreError) -> AWSCredentials in
            // Someone else may have refreshed while this caller waited for the lock.
            if let fresh = state.withLock({ $0.fresh(at: now()) }) { return fresh }
            state.withLock { $0.refreshing = true }
            defer { state.withLock { $0.refreshing = false } }
            do throws(RemoteStoreError) {
                let credentials = try resolve()
                let fetchedAt = now()
                state.withLock { state in
                    state.cached = credentials
                    state.refreshAt = credentials.expiration.map { Self.refreshTime(expiration: $0, now: fetchedAt) }
                }
                return credentials
            } catch {
                let failedAt = now()
                let fallback = state.withLock { state -> AWSCredentials? in
                    guard let cached = state.cached, let expiration = cached.expiration,
                          failedAt < expiration else { return nil }
                    state.refreshAt = min(failedAt.addingTimeInterval(Self.retryAfterFailure), expiration)
                    return cached
                }
                if let fallback { return fallback }
                throw error
            }
        }
    }

    /// Five minutes before expiry; credentials handed out with less left than that are
    /// re-fetched at most every `retryAfterFailure` seconds until they expire.
    static func refreshTime(expiration: Date, now: Date) -> Date {
        let ideal = expiration.addingTimeInterval(-refreshWindow)
        if ideal > now { return ideal }
        return min(expiration, now.addingTimeInterval(retryAfterFailure))
    }

    static func hasExpired(_ credentials: AWSCredentials, at now: Date) -> Bool {
        guard let expiration = credentials.expiration else { return false }
        return now >= expiration
    }

    // MARK: Resolution

    /// Runs links 2–6 of the chain.
    private func resolve() throws(RemoteStoreError) -> AWSCredentials {
        var notes: [String] = []
        if let credentials = environmentCredentials() { return credentials }
        if let credentials = try environmentWebIdentityCredentials() { return credentials }
        if let credentials = try profileCredentials(notes: &notes) { return credentials }

        if let endpoint = containerEndpoint() {
            switch endpoint {
            case .success(let endpoint):
                switch containerCredentials(endpoint) {
                case .success(let credentials): return credentials
                case .failure(let note): notes.append(note.message)
                }
            case .failure(let note):
                notes.append(note.message)
            }
        } else if !imdsDisabled {
            switch instanceCredentials() {
            case .success(let credentials): return credentials
            case .failure(let note): notes.append(note.message)
            }
        }

        var message = Self.noCredentialsMessage
        if !notes.isEmpty { message += " (" + notes.joined(separator: "; ") + ")" }
        throw .unauthorized(Self.oneLine(message))
    }

    func env(_ name: String) -> String? {
        guard let value = environment[name], !value.isEmpty else { return nil }
        return value
    }

    // MARK: 2. Environment

    private func environmentCredentials() -> AWSCredentials? {
        // AWS_ACCESS_KEY / AWS_SECRET_KEY are the SDKs' legacy spellings.
        guard let accessKey = env("AWS_ACCESS_KEY_ID") ?? env("AWS_ACCESS_KEY"),
              let secretKey = env("AWS_SECRET_ACCESS_KEY") ?? env("AWS_SECRET_KEY") else { return nil }
        return AWSCredentials(accessKeyID: accessKey, secretAccessKey: secretKey,
                              sessionToken: env("AWS_SESSION_TOKEN"))
    }

    // MARK: 3. Shared config and credentials files

    /// `~` expanded, and a relative path taken from `workingDirectory`: the files are read
    /// again at each renewal, after a background daemon has moved to `/`.
    func localPath(_ path: String) -> String? {
        if path == "~" || path.hasPrefix("~/") {
            guard let home = env("HOME") else { return nil }
            return localPath(joinedPath(home, String(path.dropFirst(path == "~" ? 1 : 2))))
        }
        return path.hasPrefix("/") ? path : joinedPath(workingDirectory, path)
    }

    private func sharedFilePath(variable: String, defaultName: String) -> String? {
        if let path = env(variable) { return localPath(path) }
        guard let home = env("HOME") else { return nil }
        return joinedPath(joinedPath(home, ".aws"), defaultName)
    }

    /// The sections of an INI file, or nil when it does not exist.
    private func readINI(_ path: String) throws(RemoteStoreError) -> [String: [String: String]]? {
        var isDirectory = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return nil }
        guard !isDirectory, let data = FileManager.default.contents(atPath: path) else {
            throw .configuration("cannot read AWS shared file \(path)")
        }
        return AWSINIParser.parse(String(decoding: data, as: UTF8.self))
    }

    func loadSharedFiles() throws(RemoteStoreError) -> AWSSharedFiles {
        let credentialsPath = sharedFilePath(variable: "AWS_SHARED_CREDENTIALS_FILE", defaultName: "credentials")
        let configPath = sharedFilePath(variable: "AWS_CONFIG_FILE", defaultName: "config")
        return AWSSharedFiles(credentialsPath: credentialsPath, configPath: configPath,
                              credentialsSections: try credentialsPath.flatMap { path throws(RemoteStoreError) in try readINI(path) },
                              configSections: try configPath.flatMap { path throws(RemoteStoreError) in try readINI(path) })
    }

    private func profileCredentials(notes: inout [String]) throws(RemoteStoreError) -> AWSCredentials? {
        let explicitProfile = env("AWS_PROFILE")
        let files = try loadSharedFiles()
        guard let profile = files.profile(explicitProfile ?? "default") else {
            if let explicitProfile {
                let paths = [files.credentialsPath, files.configPath].compactMap { $0 }.joined(separator: " or ")
                throw .configuration(Self.oneLine(
                    "AWS profile \"\(explicitProfile)\" (AWS_PROFILE) not found in \(paths.isEmpty ? "any shared file" : paths)"))
            }
            return nil
        }
        let credentials = try credentials(for: profile, in: files, via: [], region: stsRegion(profile: profile))
        if credentials == nil {
            notes.append("profile \"\(profile.name)\" names no credentials")
        }
        return credentials
    }

    // MARK: 4. Container credentials

    package struct Failure: Error {
        package var message: String
        init(_ message: String) { self.message = AWSCredentialChain.oneLine(message) }
    }

    private struct ContainerEndpoint {
        var url: String
        /// scheme://host[:port], safe to show.
        var display: String
    }

    /// nil: not configured.
    private func containerEndpoint() -> Result<ContainerEndpoint, Failure>? {
        if let relative = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            let path = relative.hasPrefix("/") ? relative : "/" + relative
            let url = "http://\(Self.containerHost)\(path)"
            return .success(ContainerEndpoint(url: url, display: "http://\(Self.containerHost)"))
        }
        guard let full = env("AWS_CONTAINER_CREDENTIALS_FULL_URI") else { return nil }
        guard let components = URLComponents(string: full), let scheme = components.scheme?.lowercased(),
              let host = components.host, !host.isEmpty, scheme == "http" || scheme == "https" else {
            return .failure(Failure("container credentials: AWS_CONTAINER_CREDENTIALS_FULL_URI is not an http(s) URL"))
        }
        let display = "\(scheme)://\(components.percentEncodedHost ?? host)" + (components.port.map { ":\($0)" } ?? "")
        // As in the AWS SDKs, plain http only to this machine or the ECS/EKS agents.
        if scheme == "http" && !Self.isAllowedContainerHTTPHost(host) {
            return .failure(Failure(
                "container credentials: \(display) must use https, or http to a loopback or ECS/EKS agent address"))
        }
        return .success(ContainerEndpoint(url: full, display: display))
    }

    static func isAllowedContainerHTTPHost(_ rawHost: String) -> Bool {
        var host = rawHost.lowercased()
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return isLoopbackHost(host) || ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"].contains(host)
    }

    private func containerAuthorization() -> Result<String?, Failure> {
        let token: String
        if let file = env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            guard let data = FileManager.default.contents(atPath: file) else {
                return .failure(Failure("container credentials: cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE \(file)"))
            }
            token = String(decoding: data, as: UTF8.self).trimmingWhitespace()
        } else if let value = env("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
            token = value
        } else {
            return .success(nil)
        }
        guard !token.isEmpty else { return .success(nil) }
        guard !token.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            return .failure(Failure("container credentials: the authorization token contains a control character"))
        }
        return .success(token)
    }

    private func containerCredentials(_ endpoint: ContainerEndpoint) -> Result<AWSCredentials, Failure> {
        let context = "container credentials (\(endpoint.display))"
        var headers = HTTPHeaders([("Accept", "application/json")])
        switch containerAuthorization() {
        case .success(let token): if let token { headers.add("Authorization", token) }
        case .failure(let failure): return .failure(failure)
        }
        let response: HTTPResponse
        switch exchange(HTTPRequest(method: "GET", url: endpoint.url, headers: headers), context: context) {
        case .success(let r): response = r
        case .failure(let failure): return .failure(failure)
        }
        guard response.status == 200 else {
            return .failure(Failure("\(context): HTTP \(response.status)"))
        }
        return Self.decodeCredentials(response.body, context: context)
    }

    // MARK: 5. EC2 instance metadata (IMDSv2)

    private var imdsDisabled: Bool {
        env("AWS_EC2_METADATA_DISABLED")?.trimmingWhitespace().lowercased() == "true"
    }

    private var imdsEndpoint: String {
        if var endpoint = env("AWS_EC2_METADATA_SERVICE_ENDPOINT") {
            while endpoint.hasSuffix("/") { endpoint.removeLast() }
            return endpoint
        }
        if env("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")?.lowercased() == "ipv6" { return Self.imdsIPv6Endpoint }
        return Self.imdsDefaultEndpoint
    }

    private func instanceCredentials() -> Result<AWSCredentials, Failure> {
        let base = imdsEndpoint
        let context = "instance metadata"

        // The session token (IMDSv2).
        let tokenRequest = HTTPRequest(
            method: "PUT", url: base + "/latest/api/token",
            headers: HTTPHeaders([("X-aws-ec2-metadata-token-ttl-seconds", Self.imdsTokenTTLSeconds)]))
        let token: String
        switch exchange(tokenRequest, context: "\(context) token") {
        case .success(let response):
            guard response.status == 200 else {
                return .failure(Failure("\(context) token: HTTP \(response.status)"))
            }
            token = String(decoding: response.body, as: UTF8.self).trimmingWhitespace()
            guard !token.isEmpty, !token.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
                return .failure(Failure("\(context) token: unusable token in the response"))
            }
        case .failure(let failure):
            return .failure(failure)
        }
        let tokenHeader = HTTPHeaders([("X-aws-ec2-metadata-token", token)])
        let credentialsBase = base + "/latest/meta-data/iam/security-credentials/"

        // The role attached to the instance.
        let role: String
        switch exchange(HTTPRequest(method: "GET", url: credentialsBase, headers: tokenHeader),
                        context: "\(context) role") {
        case .success(let response):
            if response.status == 404 {
                return .failure(Failure("\(context): no IAM role is attached to this instance"))
            }
            guard response.status == 200 else {
                return .failure(Failure("\(context) role: HTTP \(response.status)"))
            }
            let first = String(decoding: response.body, as: UTF8.self)
                .split(whereSeparator: \.isNewline)
                .map { $0.trimmingWhitespace() }
                .first { !$0.isEmpty }
            guard let first, Self.isValidRoleName(first) else {
                return .failure(Failure("\(context) role: no usable role name in the response"))
            }
            role = first
        case .failure(let failure):
            return .failure(failure)
        }

        // The role's credentials.
        let roleContext = "\(context) credentials for role \(role)"
        switch exchange(HTTPRequest(method: "GET", url: credentialsBase + role, headers: tokenHeader),
                        context: roleContext) {
        case .success(let response):
            guard response.status == 200 else {
                return .failure(Failure("\(roleContext): HTTP \(response.status)"))
            }
            return Self.decodeCredentials(response.body, context: roleContext)
        case .failure(let failure):
            return .failure(failure)
        }
    }

    /// IAM role names: letters, digits and `+=,.@_-`, at most 64 characters.
    static func isValidRoleName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 128 && name.unicodeScalars.allSatisfy { scalar in
            scalar.isASCII && (Character(scalar).isLetter || Character(scalar).isNumber || "+=,.@_-".unicodeScalars.contains(scalar))
        }
    }

    // MARK: Shared helpers

    /// One bounded exchange; failures become a note naming `context` (never a header or body).
    private func exchange(_ request: HTTPRequest, context: String) -> Result<HTTPResponse, Failure> {
        var request = request
        request.stallTimeout = timeout
        request.totalTimeout = timeout
        do {
            return .success(try transport.fetch(request, maxBodyBytes: Self.maxResponseBytes))
        } catch let error as HTTPTransportError {
            return .failure(Failure("\(context): \(error)"))
        } catch {
            return .failure(Failure("\(context): request failed"))
        }
    }

    private struct CredentialsDocument: Decodable {
        var Code: String?
        var AccessKeyId: String?
        var SecretAccessKey: String?
        var Token: String?
        var Expiration: String?
    }

    /// Container and instance metadata answers: `{AccessKeyId, SecretAccessKey, Token, Expiration}`.
    package static func decodeCredentials(_ body: [UInt8], context: String) -> Result<AWSCredentials, Failure> {
        guard let document = try? JSONDecoder().decode(CredentialsDocument.self, from: Data(body)) else {
            return .failure(Failure("\(context): the response is not a credentials JSON object"))
        }
        if let code = document.Code, code != "Success" {
            let shown = code.count <= 64 && code.allSatisfy({ $0.isLetter || $0.isNumber }) ? code : "an error"
            return .failure(Failure("\(context): the service answered \(shown)"))
        }
        guard let accessKey = document.AccessKeyId, !accessKey.isEmpty,
              let secretKey = document.SecretAccessKey, !secretKey.isEmpty else {
            return .failure(Failure("\(context): the response lacks AccessKeyId or SecretAccessKey"))
        }
        var expiration: Date?
        if let text = document.Expiration, !text.isEmpty {
            guard let date = parseISO8601(text) else {
                return .failure(Failure("\(context): the response has an unreadable Expiration"))
            }
            expiration = date
        }
        let token = document.Token.flatMap { $0.isEmpty ? nil : $0 }
        return .success(AWSCredentials(accessKeyID: accessKey, secretAccessKey: secretKey,
                                       sessionToken: token, expiration: expiration))
    }

    static func parseISO8601(_ text: String) -> Date? {
        let trimmed = text.trimmingWhitespace()
        if let date = try? Date(trimmed, strategy: Date.ISO8601FormatStyle()) { return date }
        return try? Date(trimmed, strategy: Date.ISO8601FormatStyle(includingFractionalSeconds: true))
    }

    static func oneLine(_ text: String) -> String {
        text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).joined(separator: " ")
    }
}

// MARK: - INI parsing

/// The AWS shared-file dialect of INI: `[section]` headers, `key = value` lines, `#` and `;`
/// comments (whole lines, or after whitespace at the end of a line), case-insensitive keys,
/// and indented sub-properties under a key with an empty value (`s3 =` then `  addressing_style
/// = path`), which are skipped. Section names keep their case; `[profile  x]` becomes
/// `profile x`. A repeated section merges into the earlier one, later keys winning.
package enum AWSINIParser {
    package static func parse(_ text: String) -> [String: [String: String]] {
        var sections: [String: [String: String]] = [:]
        var current: String?
        var lastKeyHadEmptyValue = false

        var body = Substring(text)
        if body.hasPrefix("\u{FEFF}") { body = body.dropFirst() }
        for rawLine in body.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" }) {
            let indented = rawLine.first.map { $0 == " " || $0 == "\t" } ?? false
            let line = rawLine.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }

            if line.hasPrefix("[") {
                guard let close = line.firstIndex(of: "]") else { current = nil; continue }
                let name = line[line.index(after: line.startIndex)..<close]
                    .split(whereSeparator: { $0 == " " || $0 == "\t" })
                    .joined(separator: " ")
                current = name.isEmpty ? nil : name
                if let current, sections[current] == nil { sections[current] = [:] }
                lastKeyHadEmptyValue = false
                continue
            }
            guard let section = current else { continue }
            if indented && lastKeyHadEmptyValue { continue }  // a sub-property

            guard let separator = line.firstIndex(of: "=") ?? line.firstIndex(of: ":") else { continue }
            let key = line[..<separator].trimmingWhitespace().lowercased()
            guard !key.isEmpty else { continue }
            let value = stripInlineComment(line[line.index(after: separator)...])
                .trimmingWhitespace()
            sections[section, default: [:]][key] = value
            lastKeyHadEmptyValue = value.isEmpty
        }
        return sections
    }

    /// Drops ` # ...` or ` ; ...` (the marker must follow whitespace, so values may contain them).
    private static func stripInlineComment(_ value: Substring) -> Substring {
        var previous: Character = " "
        var index = value.startIndex
        var first = true
        while index < value.endIndex {
            let character = value[index]
            if (character == "#" || character == ";") && (previous == " " || previous == "\t") && !first {
                return value[..<index]
            }
            previous = character
            first = false
            index = value.index(after: index)
        }
        return value
    }
}
