// The credential sources CI platforms and developer machines hand out beyond plain keys: web
// identity (GitHub Actions OIDC, EKS IRSA), roles assumed through source profiles,
// `credential_process`, and the SSO token `aws sso login` caches. Each yields temporary
// credentials with an expiration, which the chain refreshes before they expire by running
// the same source again (a web identity token file is read again each time).

import Crypto
import FoundationEssentials
import HTTPClient
import SystemSupport

// MARK: - Shared files

/// The shared credentials and config files, read once per resolution.
struct AWSSharedFiles {
    var credentialsPath: String?
    var configPath: String?
    var credentialsSections: [String: [String: String]]?
    var configSections: [String: [String: String]]?

    /// A profile is `[NAME]` in the credentials file and `[profile NAME]` (or `[default]`) in the
    /// config file; nil when neither file has it.
    func profile(_ name: String) -> AWSProfile? {
        let credentials = credentialsPath.flatMap { path in credentialsSections?[name].map { (path, $0) } }
        let config = configPath.flatMap { path in
            (configSections?["profile \(name)"] ?? (name == "default" ? configSections?["default"] : nil)).map { (path, $0) }
        }
        guard credentials != nil || config != nil else { return nil }
        return AWSProfile(name: name, credentials: credentials, config: config)
    }

    /// `[sso-session NAME]` of the config file.
    func ssoSession(_ name: String) -> [String: String]? { configSections?["sso-session \(name)"] }
}

struct AWSProfile {
    var name: String
    var credentials: (path: String, settings: [String: String])?
    var config: (path: String, settings: [String: String])?

    /// A non-empty setting; the credentials file's wins over the config file's.
    subscript(key: String) -> String? {
        for settings in [credentials?.settings, config?.settings] {
            if let value = settings?[key], !value.isEmpty { return value }
        }
        return nil
    }

    /// The files that hold this profile, for messages.
    var place: String {
        "AWS profile \"\(name)\" in " + [credentials?.path, config?.path].compactMap { $0 }.joined(separator: " and ")
    }

    /// `aws_access_key_id` and its companions. The credentials file wins; its keys are taken
    /// as a unit, never mixed with config's.
    func staticKeys() throws(RemoteStoreError) -> AWSCredentials? {
        for (path, section) in [credentials, config].compactMap({ $0 }) {
            let keys = ["aws_access_key_id", "aws_secret_access_key", "aws_session_token"]
            guard keys.contains(where: { section[$0] != nil }) else { continue }
            guard let accessKey = section["aws_access_key_id"], !accessKey.isEmpty,
                  let secretKey = section["aws_secret_access_key"], !secretKey.isEmpty else {
                throw .configuration(AWSCredentialChain.oneLine(
                    "AWS profile \"\(name)\" in \(path) needs both aws_access_key_id and aws_secret_access_key"))
            }
            let token = section["aws_session_token"].flatMap { $0.isEmpty ? nil : $0 }
            return AWSCredentials(accessKeyID: accessKey, secretAccessKey: secretKey, sessionToken: token)
        }
        return nil
    }
}

// MARK: - Sources

extension AWSCredentialChain {
    /// Largest web identity token file and credential_process output read.
    static let maxSourceBytes = 64 * 1024

    /// A profile's credentials in the SDKs' order, or nil when it names none. `via`: the
    /// profiles that led here through `source_profile`; `region`: STS's, the same for every
    /// profile of the chain (the SDKs take it from the profile that was named).
    func credentials(for profile: AWSProfile, in files: AWSSharedFiles, via: [String],
                     region: String) throws(RemoteStoreError) -> AWSCredentials? {
        if via.contains(profile.name) || via.count >= Self.maxProfileChain {
            let path = (via + [profile.name]).map { "\"\($0)\"" }.joined(separator: " -> ")
            throw .configuration("AWS profiles \(path): source_profile \(via.contains(profile.name) ? "loops" : "nests deeper than \(Self.maxProfileChain)")")
        }
        if let roleARN = profile["role_arn"] {
            let duration = try durationSeconds(profile)
            if let tokenFile = profile["web_identity_token_file"] {
                return try webIdentityCredentials(
                    roleARN: roleARN, tokenFile: tokenFile, sessionName: profile["role_session_name"],
                    durationSeconds: duration, region: region, context: "\(profile.place): web identity")
            }
            if profile["mfa_serial"] != nil {
                throw .configuration("\(profile.place): role_arn with mfa_serial needs an MFA code, which a mount cannot ask for")
            }
            guard let sourceName = profile["source_profile"] else {
                if let source = profile["credential_source"] {
                    throw .configuration(Self.oneLine("\(profile.place): credential_source = \(source) is not supported; use source_profile"))
                }
                throw .configuration("\(profile.place): role_arn needs source_profile or web_identity_token_file")
            }
            let source: AWSCredentials
            if sourceName == profile.name {
                // A profile may hold the keys that assume its own role.
                guard let keys = try profile.staticKeys() else {
                    throw .configuration("\(profile.place): it is its own source_profile but holds no aws_access_key_id")
                }
                source = keys
            } else {
                guard let sourceProfile = files.profile(sourceName) else {
                    throw .configuration(Self.oneLine("\(profile.place): its source_profile \"\(sourceName)\" does not exist"))
                }
                guard let credentials = try credentials(for: sourceProfile, in: files, via: via + [profile.name], region: region) else {
                    throw .configuration(Self.oneLine("\(profile.place): its source_profile \"\(sourceName)\" names no credentials"))
                }
                source = credentials
            }
            let sts = securityTokenService(region: region)
            return try prefixing("\(profile.place): assuming a role") { () throws(RemoteStoreError) in
                try sts.assumeRole(roleARN: roleARN, sessionName: profile["role_session_name"] ?? Self.defaultSessionName(),
                                   externalID: profile["external_id"], durationSeconds: duration, with: source)
            }
        }
        if let keys = try profile.staticKeys() { return keys }
        if profile["sso_session"] != nil || profile["sso_start_url"] != nil {
            return try ssoCredentials(profile, files: files)
        }
        if let command = profile["credential_process"] {
            return try processCredentials(command, context: "credential_process of \(profile.place)")
        }
        return nil
    }

    private func durationSeconds(_ profile: AWSProfile) throws(RemoteStoreError) -> Int? {
        guard let text = profile["duration_seconds"] else { return nil }
        guard let seconds = Int(text), (900...43_200).contains(seconds) else {
            throw .configuration(Self.oneLine("\(profile.place): duration_seconds = \(text) is not a number of seconds from 900 to 43200"))
        }
        return seconds
    }

    static func defaultSessionName() -> String { "ocicachefs-\(Int64(Date().timeIntervalSince1970))" }

    /// The region the environment, else the named profile, else the bucket names.
    func stsRegion(profile: AWSProfile?) -> String {
        env("AWS_REGION") ?? env("AWS_DEFAULT_REGION") ?? profile?["region"] ?? defaultRegion ?? "us-east-1"
    }

    func securityTokenService(region: String) -> AWSSecurityTokenService {
        AWSSecurityTokenService(endpoint: AWSSecurityTokenService.endpoint(environment: environment, region: region),
                                       region: region, transport: transport, timeout: serviceTimeout)
    }

    /// Runs `body`, putting `prefix` before the message of what it throws.
    func prefixing<T>(_ prefix: String, _ body: () throws(RemoteStoreError) -> T) throws(RemoteStoreError) -> T {
        do {
            return try body()
        } catch {
            switch error {
            case .unauthorized(let m): throw .unauthorized("\(prefix): \(m)")
            case .notFound(let m): throw .notFound("\(prefix): \(m)")
            case .invalidContent(let m): throw .invalidContent("\(prefix): \(m)")
            case .server(let m): throw .server("\(prefix): \(m)")
            case .transport(let m): throw .transport("\(prefix): \(m)")
            case .timedOut(let m): throw .timedOut("\(prefix): \(m)")
            case .configuration(let m): throw .configuration("\(prefix): \(m)")
            }
        }
    }

    // MARK: Web identity

    /// `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`; nil when the token file is not set.
    func environmentWebIdentityCredentials() throws(RemoteStoreError) -> AWSCredentials? {
        guard let tokenFile = env("AWS_WEB_IDENTITY_TOKEN_FILE") else { return nil }
        guard let roleARN = env("AWS_ROLE_ARN") else {
            throw .configuration("web identity: AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not")
        }
        return try webIdentityCredentials(roleARN: roleARN, tokenFile: tokenFile, sessionName: env("AWS_ROLE_SESSION_NAME"),
                                          durationSeconds: nil, region: stsRegion(profile: nil), context: "web identity (AWS_ROLE_ARN)")
    }

    /// The token file is read at every call: the platform replaces it before it expires.
    func webIdentityCredentials(roleARN: String, tokenFile: String, sessionName: String?, durationSeconds: Int?,
                                region: String, context: String) throws(RemoteStoreError) -> AWSCredentials {
        let path = localPath(tokenFile) ?? tokenFile
        let token: String
        switch readSmallFile(path) {
        case .success(let bytes): token = String(decoding: bytes, as: UTF8.self).trimmingWhitespace()
        case .failure(let reason): throw .configuration(Self.oneLine("\(context): cannot read the token file \(path): \(reason.message)"))
        }
        guard !token.isEmpty else { throw .configuration(Self.oneLine("\(context): the token file \(path) is empty")) }
        let sts = securityTokenService(region: region)
        return try prefixing(context) { () throws(RemoteStoreError) in
            try sts.assumeRoleWithWebIdentity(roleARN: roleARN, sessionName: sessionName ?? Self.defaultSessionName(),
                                              token: token, durationSeconds: durationSeconds)
        }
    }

    /// A regular file's bytes, at most `maxSourceBytes`, or why not.
    private func readSmallFile(_ path: String) -> Result<[UInt8], Failure> {
        var isDirectory = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return .failure(Failure("no such file")) }
        guard !isDirectory, let data = FileManager.default.contents(atPath: path) else { return .failure(Failure("not a readable file")) }
        guard data.count <= Self.maxSourceBytes else { return .failure(Failure("larger than \(Self.maxSourceBytes) bytes")) }
        return .success(Array(data))
    }

    // MARK: credential_process

    private struct ProcessOutput: Decodable {
        var Version: Int?
        var AccessKeyId: String?
        var SecretAccessKey: String?
        var SessionToken: String?
        var Expiration: String?
    }

    /// Runs `command` with `/bin/sh -c`, as the Go SDK does, within `serviceTimeout`, and reads
    /// the JSON (Version 1) it prints.
    func processCredentials(_ command: String, context: String) throws(RemoteStoreError) -> AWSCredentials {
        let outcome: ChildProcess.Outcome
        do {
            outcome = try ChildProcess.run("/bin/sh", arguments: ["-c", command], environment: environment,
                                           timeout: serviceTimeout, maxOutput: Self.maxSourceBytes)
        } catch {
            switch error {
            case .timedOut:
                throw .timedOut("\(context) did not finish within \(serviceTimeout) and was stopped")
            case .tooMuchOutput:
                throw .invalidContent("\(context) printed more than \(Self.maxSourceBytes) bytes")
            case .cannotStart, .noPipes:
                throw .configuration("\(context): cannot run /bin/sh: \(error)")
            }
        }
        guard outcome.exitStatus == 0 else {
            let firstLine = String(decoding: outcome.stderr, as: UTF8.self)
                .split(whereSeparator: \.isNewline).map { $0.trimmingWhitespace() }.first { !$0.isEmpty }
            var line = "\(context) failed (\(outcome.terminationDescription))"
            if let firstLine { line += ": \(AWSSecurityTokenService.sanitized(firstLine))" }
            throw .unauthorized(line)
        }
        guard let output = try? JSONDecoder().decode(ProcessOutput.self, from: Data(outcome.stdout)) else {
            throw .invalidContent("\(context) did not print a credentials JSON object (Version 1, AccessKeyId, SecretAccessKey)")
        }
        guard output.Version == 1 else {
            throw .invalidContent("\(context) printed Version \(output.Version.map(String.init) ?? "(none)"); only Version 1 is understood")
        }
        guard let accessKey = output.AccessKeyId, !accessKey.isEmpty, let secretKey = output.SecretAccessKey, !secretKey.isEmpty else {
            throw .invalidContent("\(context) printed no AccessKeyId or SecretAccessKey")
        }
        var expiration: Date?
        if let text = output.Expiration, !text.isEmpty {
            guard let date = Self.parseISO8601(text) else {
                throw .invalidContent("\(context) printed an unreadable Expiration (RFC 3339 expected)")
            }
            expiration = date
        }
        return AWSCredentials(accessKeyID: accessKey, secretAccessKey: secretKey,
                              sessionToken: output.SessionToken.flatMap { $0.isEmpty ? nil : $0 }, expiration: expiration)
    }

    // MARK: SSO

    private struct SSOCachedToken: Decodable {
        var accessToken: String?
        var expiresAt: String?
    }

    private struct SSORoleCredentials: Decodable {
        struct Credentials: Decodable {
            var accessKeyId: String?
            var secretAccessKey: String?
            var sessionToken: String?
            /// Milliseconds since 1970.
            var expiration: Int64?
        }
        var roleCredentials: Credentials?
    }

    /// The role credentials the SSO portal gives for the token `aws sso login` cached in
    /// `~/.aws/sso/cache/<sha1 of the session name, or of the start URL>.json`. The token is
    /// not refreshed here: when it has expired, the person is told to log in again.
    func ssoCredentials(_ profile: AWSProfile, files: AWSSharedFiles) throws(RemoteStoreError) -> AWSCredentials {
        let context = "\(profile.place): SSO"
        let login = "run `aws sso login --profile \(profile.name)`"
        let startURL: String?, ssoRegion: String?, cacheKey: String?
        if let sessionName = profile["sso_session"] {
            guard let session = files.ssoSession(sessionName) else {
                throw .configuration(Self.oneLine("\(context): [sso-session \(sessionName)] is not in \(files.configPath ?? "the config file")"))
            }
            startURL = session["sso_start_url"]
            ssoRegion = session["sso_region"].flatMap { $0.isEmpty ? nil : $0 } ?? profile["sso_region"]
            cacheKey = sessionName
        } else {
            startURL = profile["sso_start_url"]
            ssoRegion = profile["sso_region"]
            cacheKey = startURL
        }
        guard let startURL, !startURL.isEmpty, let ssoRegion, let cacheKey, let accountID = profile["sso_account_id"],
              let roleName = profile["sso_role_name"] else {
            throw .configuration("\(context) needs sso_start_url, sso_region, sso_account_id and sso_role_name")
        }
        guard let home = env("HOME") else { throw .configuration("\(context): HOME is not set, so the SSO token cache cannot be found") }
        let cachePath = joinedPath(home, ".aws/sso/cache/" + Insecure.SHA1.hash(data: Array(cacheKey.utf8)).lowercaseHex + ".json")

        let cached: SSOCachedToken
        switch readSmallFile(cachePath) {
        case .success(let bytes):
            guard let token = try? JSONDecoder().decode(SSOCachedToken.self, from: Data(bytes)) else {
                throw .unauthorized(Self.oneLine("\(context): the cached SSO token \(cachePath) is unreadable; \(login)"))
            }
            cached = token
        case .failure(let reason):
            throw .unauthorized(Self.oneLine("\(context): no cached SSO token (\(cachePath): \(reason.message)); \(login)"))
        }
        guard let accessToken = cached.accessToken, !accessToken.isEmpty,
              !accessToken.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }),
              let expiresText = cached.expiresAt,
              // The AWS CLI v1 wrote `…UTC` where RFC 3339 has `Z`.
              let expiresAt = Self.parseISO8601(expiresText.hasSuffix("UTC") ? String(expiresText.dropLast(3)) + "Z" : expiresText) else {
            throw .unauthorized(Self.oneLine("\(context): the cached SSO token \(cachePath) lacks accessToken or expiresAt; \(login)"))
        }
        guard expiresAt > now() else {
            throw .unauthorized(Self.oneLine("\(context): the SSO token expired at \(expiresText); \(login)"))
        }

        let portal = Self.ssoPortal(environment: environment, region: ssoRegion)
        let url = portal + "/federation/credentials?account_id=" + SigV4.uriEncode(accountID, encodeSlash: true)
            + "&role_name=" + SigV4.uriEncode(roleName, encodeSlash: true)
        let request = HTTPRequest(method: "GET", url: url,
                                  headers: HTTPHeaders([("x-amz-sso_bearer_token", accessToken), ("Accept", "application/json")]),
                                  stallTimeout: serviceTimeout, totalTimeout: serviceTimeout)
        let portalContext = "\(context): GetRoleCredentials for role \(roleName) of account \(accountID) at \(portal)"
        let response: HTTPResponse
        do {
            response = try transport.fetch(request, maxBodyBytes: Self.maxResponseBytes)
        } catch let error as HTTPTransportError {
            throw RemoteStoreError(error, context: portalContext)
        } catch {
            throw .transport("\(portalContext): request failed")
        }
        switch response.status {
        case 200: break
        case 401, 403: throw .unauthorized("\(portalContext): HTTP \(response.status) (the SSO token was refused); \(login)")
        case 500...: throw .server("\(portalContext): HTTP \(response.status)")
        default: throw .unauthorized("\(portalContext): HTTP \(response.status)")
        }
        guard let answer = try? JSONDecoder().decode(SSORoleCredentials.self, from: Data(response.body)),
              let role = answer.roleCredentials, let accessKey = role.accessKeyId, !accessKey.isEmpty,
              let secretKey = role.secretAccessKey, !secretKey.isEmpty else {
            throw .invalidContent("\(portalContext): the answer holds no roleCredentials with accessKeyId and secretAccessKey")
        }
        return AWSCredentials(accessKeyID: accessKey, secretAccessKey: secretKey,
                              sessionToken: role.sessionToken.flatMap { $0.isEmpty ? nil : $0 },
                              expiration: role.expiration.map { Date(timeIntervalSince1970: TimeInterval($0) / 1000) })
    }

    /// The SSO portal: `AWS_ENDPOINT_URL_SSO`, else `AWS_ENDPOINT_URL`, else the region's.
    static func ssoPortal(environment: [String: String], region: String) -> String {
        serviceEndpoint(variableSuffix: "SSO", regionalHost: "portal.sso", environment: environment, region: region)
    }

    /// Where the AWS SDKs send a service's requests: `AWS_ENDPOINT_URL_<SERVICE>`, else
    /// `AWS_ENDPOINT_URL` (neither when `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`), else
    /// `https://<regionalHost>.<region>.amazonaws.com`. No trailing slash.
    static func serviceEndpoint(variableSuffix: String, regionalHost: String, environment: [String: String],
                                region: String) -> String {
        if environment["AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"]?.lowercased() != "true" {
            for name in ["AWS_ENDPOINT_URL_" + variableSuffix, "AWS_ENDPOINT_URL"] {
                guard var url = environment[name]?.trimmingWhitespace(), !url.isEmpty else { continue }
                while url.hasSuffix("/") { url.removeLast() }
                return url
            }
        }
        let domain = region.hasPrefix("cn-") ? "amazonaws.com.cn" : "amazonaws.com"
        return "https://\(regionalHost).\(region).\(domain)"
    }
}
