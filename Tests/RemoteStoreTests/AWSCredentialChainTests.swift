import Foundation
import HTTPClient
import Synchronization
import Testing
@testable import RemoteStore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Network rule for these tests: nothing may reach 169.254.x.x. Every chain is built by
// `makeChain`, which disables instance metadata unless the test points its endpoint at
// 127.0.0.1, and container/IMDS tests use the in-memory `FakeAWSEndpoint` (which never sends
// anything anywhere). The only real traffic goes to a silent listener on 127.0.0.1.

// MARK: - Fixtures

/// A temporary directory, removed by `cleanup()`.
private struct AWSTempDir {
    let path: String

    init() throws {
        let base = FileManager.default.temporaryDirectory.path
        path = (base as NSString).appendingPathComponent("ocicachefs-awscreds-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }

    @discardableResult
    func write(_ name: String, _ contents: String) throws -> String {
        let target = file(name)
        try FileManager.default.createDirectory(
            atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data(contents.utf8).write(to: URL(fileURLWithPath: target))
        return target
    }
}

/// An in-memory HTTP endpoint: answers from a handler and records every request. It never
/// opens a socket, so URLs like 169.254.170.2 are safe to "request".
private final class FakeAWSEndpoint: HTTPTransport {
    struct Reply: Sendable {
        var status: Int
        var body: String
        init(_ status: Int, _ body: String = "") {
            self.status = status
            self.body = body
        }
    }

    typealias Handler = @Sendable (HTTPRequest) throws -> Reply

    private struct State {
        var requests: [HTTPRequest] = []
        var handler: Handler
    }

    private let state: Mutex<State>

    init(_ handler: @escaping Handler = { _ in Reply(404) }) {
        state = Mutex(State(handler: handler))
    }

    var requests: [HTTPRequest] { state.withLock { $0.requests } }

    func setHandler(_ handler: @escaping Handler) { state.withLock { $0.handler = handler } }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        let handler = state.withLock { state in
            state.requests.append(request)
            return state.handler
        }
        let reply = try handler(request)
        let body = Array(reply.body.utf8)
        try onResponse(HTTPResponseHead(status: reply.status,
                                        headers: HTTPHeaders([("Content-Length", "\(body.count)")])))
        try body.withUnsafeBytes { try onBody($0) }
    }
}

/// A clock tests move by hand.
private final class ManualClock: Sendable {
    private let current: Mutex<Date>
    init(_ start: Date = Date(timeIntervalSince1970: 1_700_000_000)) { current = Mutex(start) }
    var now: Date { current.withLock { $0 } }
    func advance(by seconds: TimeInterval) { current.withLock { $0 = $0.addingTimeInterval(seconds) } }
}

private let imdsFakeEndpoint = "http://127.0.0.1:1338"

/// A chain over `environment` with HOME in `home` (never the real one) and instance metadata
/// disabled unless the test configured its endpoint.
private func makeChain(
    explicit: AWSCredentials? = nil, environment: [String: String] = [:], home: AWSTempDir? = nil,
    transport: any HTTPTransport = FakeAWSEndpoint(), timeout: Duration = .seconds(2),
    clock: ManualClock? = nil
) -> AWSCredentialChain {
    var env = environment
    env["HOME"] = home?.path ?? "/nonexistent-ocicachefs-home"
    if env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] == nil { env["AWS_EC2_METADATA_DISABLED"] = "true" }
    precondition(env["AWS_EC2_METADATA_SERVICE_ENDPOINT"].map { $0.hasPrefix("http://127.0.0.1") } ?? true)
    if let clock {
        return AWSCredentialChain(explicit: explicit, environment: env, transport: transport,
                                  timeout: timeout, now: { clock.now })
    }
    return AWSCredentialChain(explicit: explicit, environment: env, transport: transport, timeout: timeout)
}

private func iso8601(_ date: Date) -> String { date.formatted(Date.ISO8601FormatStyle()) }

private func credentialsJSON(_ key: String, _ secret: String, token: String? = nil,
                             expiration: Date? = nil, code: String? = nil) -> String {
    var fields: [String] = []
    if let code { fields.append("\"Code\": \"\(code)\"") }
    fields.append("\"AccessKeyId\": \"\(key)\"")
    fields.append("\"SecretAccessKey\": \"\(secret)\"")
    if let token { fields.append("\"Token\": \"\(token)\"") }
    if let expiration { fields.append("\"Expiration\": \"\(iso8601(expiration))\"") }
    return "{" + fields.joined(separator: ", ") + "}"
}

/// Runs `body` and returns the RemoteStoreError it throws.
private func remoteStoreError(_ body: () throws(RemoteStoreError) -> AWSCredentials) -> RemoteStoreError? {
    do {
        _ = try body()
        return nil
    } catch {
        return error
    }
}

private func isUnauthorized(_ error: RemoteStoreError?) -> Bool {
    if case .unauthorized = error { return true }
    return false
}

private func isConfiguration(_ error: RemoteStoreError?) -> Bool {
    if case .configuration = error { return true }
    return false
}

private let envKeys = [
    "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "env-secret-SHOULD-NOT-LEAK",
]

// MARK: - 1. Explicit and 2. environment

@Suite("AWSCredentialChain: explicit and environment")
struct AWSCredentialChainExplicitEnvironmentTests {
    @Test func explicitCredentialsWinOverEverything() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[default]\naws_access_key_id = AKIAFILE\naws_secret_access_key = file-secret\n")
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("AKIANET", "net-secret")) }
        var env = envKeys
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = "http://127.0.0.1:1/creds"
        let explicit = AWSCredentials(accessKeyID: "AKIAEXPLICIT", secretAccessKey: "explicit-secret",
                                      sessionToken: "explicit-token")
        let chain = makeChain(explicit: explicit, environment: env, home: home, transport: fake)
        #expect(try chain.credentials() == explicit)
        #expect(fake.requests.isEmpty)
    }

    @Test func explicitCredentialsNeedBothKeys() {
        let explicit = AWSCredentials(accessKeyID: "AKIAEXPLICIT", secretAccessKey: "")
        let chain = makeChain(explicit: explicit, environment: envKeys)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isConfiguration(error))
    }

    @Test func environmentCredentialsWithSessionToken() throws {
        var env = envKeys
        env["AWS_SESSION_TOKEN"] = "env-token"
        let chain = makeChain(environment: env)
        #expect(try chain.credentials() == AWSCredentials(
            accessKeyID: "AKIAENV", secretAccessKey: "env-secret-SHOULD-NOT-LEAK", sessionToken: "env-token"))
    }

    @Test func environmentWinsOverProfileAndNetwork() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[default]\naws_access_key_id = AKIAFILE\naws_secret_access_key = file-secret\n")
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("AKIANET", "net-secret")) }
        var env = envKeys
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = "http://127.0.0.1:1/creds"
        let chain = makeChain(environment: env, home: home, transport: fake)
        #expect(try chain.credentials().accessKeyID == "AKIAENV")
        #expect(try chain.credentials().sessionToken == nil)
        #expect(fake.requests.isEmpty)
    }

    @Test func legacyEnvironmentNamesAreAccepted() throws {
        let chain = makeChain(environment: ["AWS_ACCESS_KEY": "AKIALEGACY", "AWS_SECRET_KEY": "legacy-secret"])
        #expect(try chain.credentials().accessKeyID == "AKIALEGACY")
    }

    @Test func partialEnvironmentIsSkipped() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[default]\naws_access_key_id = AKIAFILE\naws_secret_access_key = file-secret\n")
        let chain = makeChain(environment: ["AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": ""], home: home)
        #expect(try chain.credentials().accessKeyID == "AKIAFILE")
    }
}

// MARK: - 3. Profiles

@Suite("AWSCredentialChain: profiles")
struct AWSCredentialChainProfileTests {
    @Test func defaultProfileFromDefaultCredentialsFile() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", """
            [other]
            aws_access_key_id = AKIAOTHER
            aws_secret_access_key = other-secret

            [default]
            aws_access_key_id = AKIADEFAULT
            aws_secret_access_key = default-secret
            aws_session_token = default-token
            """)
        let chain = makeChain(home: home)
        #expect(try chain.credentials() == AWSCredentials(
            accessKeyID: "AKIADEFAULT", secretAccessKey: "default-secret", sessionToken: "default-token"))
    }

    @Test func namedProfileFromCustomCredentialsFile() throws {
        let dir = try AWSTempDir()
        defer { dir.cleanup() }
        let path = try dir.write("creds.ini", """
            [default]
            aws_access_key_id = AKIADEFAULT
            aws_secret_access_key = default-secret
            [ci]
            aws_access_key_id = AKIACI
            aws_secret_access_key = ci-secret
            """)
        let chain = makeChain(environment: ["AWS_PROFILE": "ci", "AWS_SHARED_CREDENTIALS_FILE": path])
        #expect(try chain.credentials() == AWSCredentials(accessKeyID: "AKIACI", secretAccessKey: "ci-secret"))
    }

    @Test func tildeInFilePathsMeansHome() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write("elsewhere/creds", "[default]\naws_access_key_id = AKIATILDE\naws_secret_access_key = s\n")
        let chain = makeChain(environment: ["AWS_SHARED_CREDENTIALS_FILE": "~/elsewhere/creds"], home: home)
        #expect(try chain.credentials().accessKeyID == "AKIATILDE")
    }

    @Test func configFileProfileSection() throws {
        let dir = try AWSTempDir()
        defer { dir.cleanup() }
        let config = try dir.write("config", """
            [default]
            region = us-east-1
            [build]
            aws_access_key_id = AKIABARE
            aws_secret_access_key = bare-secret
            [profile build]
            region = eu-west-1
            aws_access_key_id = AKIABUILD
            aws_secret_access_key = build-secret
            """)
        let chain = makeChain(environment: [
            "AWS_PROFILE": "build", "AWS_CONFIG_FILE": config,
            "AWS_SHARED_CREDENTIALS_FILE": dir.file("missing-credentials"),
        ])
        // `[build]` in the config file is not the profile; `[profile build]` is.
        #expect(try chain.credentials() == AWSCredentials(accessKeyID: "AKIABUILD", secretAccessKey: "build-secret"))
    }

    @Test func configFileDefaultSection() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/config", "[default]\nregion = us-east-1\naws_access_key_id = AKIACFG\naws_secret_access_key = cfg-secret\n")
        let chain = makeChain(home: home)
        #expect(try chain.credentials().accessKeyID == "AKIACFG")
    }

    @Test func credentialsFileWinsOverConfigFile() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/config", """
            [profile dev]
            aws_access_key_id = AKIACONFIG
            aws_secret_access_key = config-secret
            aws_session_token = config-token
            """)
        try home.write(".aws/credentials", """
            [dev]
            aws_access_key_id = AKIACREDS
            aws_secret_access_key = creds-secret
            """)
        let chain = makeChain(environment: ["AWS_PROFILE": "dev"], home: home)
        // Taken as a unit: the config file's session token does not leak into these keys.
        #expect(try chain.credentials() == AWSCredentials(accessKeyID: "AKIACREDS", secretAccessKey: "creds-secret"))
    }

    @Test func configFileUsedWhenCredentialsFileLacksTheProfile() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[other]\naws_access_key_id = AKIAOTHER\naws_secret_access_key = o\n")
        try home.write(".aws/config", "[profile dev]\naws_access_key_id = AKIACONFIG\naws_secret_access_key = c\n")
        let chain = makeChain(environment: ["AWS_PROFILE": "dev"], home: home)
        #expect(try chain.credentials().accessKeyID == "AKIACONFIG")
    }

    @Test func commentsWhitespaceCaseAndLineEndings() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        let text = "\u{FEFF}# leading comment\r\n"
            + "; another comment\r\n"
            + "[ default ]   # header comment\r\n"
            + "   AWS_Access_Key_ID   =   AKIAMIXED   # inline comment\r\n"
            + "\r\n"
            + "Aws_Secret_Access_Key=secret/with+slash=\t; inline\r\n"
            + "s3 =\r\n"
            + "    aws_secret_access_key = nested-not-a-key\r\n"
            + "\taddressing_style = path\r\n"
            + "aws_session_token = tok#en;kept\r\n"
            + "[profile ignored]\r\n"
            + "aws_access_key_id = AKIAIGNORED\r\n"
        try home.write(".aws/credentials", text)
        let chain = makeChain(home: home)
        #expect(try chain.credentials() == AWSCredentials(
            accessKeyID: "AKIAMIXED", secretAccessKey: "secret/with+slash=", sessionToken: "tok#en;kept"))
    }

    @Test func iniParserSections() {
        let sections = AWSINIParser.parse("""
            key = outside any section
            [profile   spaced    name]
            A = 1
            [broken
            b = 2
            [profile spaced name]
            a = 3
            c : 4
            """)
        #expect(sections["profile spaced name"] == ["a": "3", "c": "4"])
        #expect(sections.count == 1)
    }

    @Test func missingFilesFallThroughToNoCredentials() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        let chain = makeChain(environment: ["AWS_CONFIG_FILE": home.file("nope/config")], home: home)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isUnauthorized(error))
        #expect(error?.description.hasPrefix("no AWS credentials found") == true)
    }

    @Test func profileWithoutKeysFallsThrough() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/config", "[default]\nregion = us-east-1\n")
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("AKIANET", "net-secret")) }
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds"],
                              home: home, transport: fake)
        #expect(try chain.credentials().accessKeyID == "AKIANET")
    }

    @Test func profileWinsOverContainerCredentials() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[default]\naws_access_key_id = AKIAFILE\naws_secret_access_key = f\n")
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("AKIANET", "net-secret")) }
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds"],
                              home: home, transport: fake)
        #expect(try chain.credentials().accessKeyID == "AKIAFILE")
        #expect(fake.requests.isEmpty)
    }

    @Test func namedProfileThatDoesNotExistIsAConfigurationError() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[default]\naws_access_key_id = AKIAFILE\naws_secret_access_key = f\n")
        let chain = makeChain(environment: ["AWS_PROFILE": "typo"], home: home)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isConfiguration(error))
        #expect(error?.description.contains("\"typo\"") == true)
    }

    @Test func partialProfileIsAConfigurationErrorWithoutSecrets() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/credentials", "[default]\naws_secret_access_key = partial-secret-SHOULD-NOT-LEAK\n")
        let chain = makeChain(home: home)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isConfiguration(error))
        #expect(error?.description.contains("partial-secret") == false)
        #expect(error?.description.contains("aws_access_key_id") == true)
    }

    @Test func unsupportedProfileSettingIsNamedInTheError() throws {
        let home = try AWSTempDir()
        defer { home.cleanup() }
        try home.write(".aws/config", "[default]\nrole_arn = arn:aws:iam::123:role/x\ncredential_source = Ec2InstanceMetadata\n")
        let chain = makeChain(home: home)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isConfiguration(error))
        #expect(error?.description.contains("credential_source = Ec2InstanceMetadata is not supported") == true)
    }
}

// MARK: - 4. Container credentials

@Suite("AWSCredentialChain: container credentials")
struct AWSCredentialChainContainerTests {
    @Test func fullURIWithAuthorizationToken() throws {
        let clock = ManualClock()
        let expiration = clock.now.addingTimeInterval(3600)
        let fake = FakeAWSEndpoint { _ in
            .init(200, credentialsJSON("ASIACONTAINER", "container-secret", token: "container-token", expiration: expiration))
        }
        let chain = makeChain(environment: [
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:8080/get-credentials?a=1",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "Bearer auth-token-SHOULD-NOT-LEAK",
        ], transport: fake, clock: clock)
        let credentials = try chain.credentials()
        #expect(credentials == AWSCredentials(accessKeyID: "ASIACONTAINER", secretAccessKey: "container-secret",
                                              sessionToken: "container-token", expiration: expiration))
        let requests = fake.requests
        try #require(requests.count == 1)
        #expect(requests[0].method == "GET")
        #expect(requests[0].url == "http://127.0.0.1:8080/get-credentials?a=1")
        #expect(requests[0].headers["Authorization"] == "Bearer auth-token-SHOULD-NOT-LEAK")
        #expect(requests[0].totalTimeout == .seconds(2))
        #expect(requests[0].stallTimeout == .seconds(2))
    }

    @Test func relativeURIUsesTheECSAgentAddressAndTokenFile() throws {
        let dir = try AWSTempDir()
        defer { dir.cleanup() }
        let tokenFile = try dir.write("token", "file-token\n")
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("ASIAECS", "ecs-secret", token: "ecs-token")) }
        let chain = makeChain(environment: [
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/1234-abcd",
            // Relative wins over full; the token file wins over the token variable.
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:8080/ignored",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": tokenFile,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "env-token",
        ], transport: fake, timeout: .milliseconds(750))
        #expect(try chain.credentials().accessKeyID == "ASIAECS")
        let requests = fake.requests
        try #require(requests.count == 1)
        #expect(requests[0].url == "http://169.254.170.2/v2/credentials/1234-abcd")
        #expect(requests[0].headers["Authorization"] == "file-token")
        #expect(requests[0].totalTimeout == .milliseconds(750))
    }

    @Test func noAuthorizationHeaderWithoutToken() throws {
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("ASIA", "s")) }
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://localhost:1/c"], transport: fake)
        _ = try chain.credentials()
        #expect(fake.requests.first?.headers["Authorization"] == nil)
    }

    @Test func containerConfiguredMeansInstanceMetadataIsNotTried() throws {
        let fake = FakeAWSEndpoint { request in
            request.url.hasPrefix(imdsFakeEndpoint) ? .init(200, "imds") : .init(500, "boom")
        }
        let chain = makeChain(environment: [
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:8080/creds",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint,
        ], transport: fake)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isUnauthorized(error))
        #expect(error?.description.contains("container credentials (http://127.0.0.1:8080): HTTP 500") == true)
        #expect(fake.requests.map(\.url) == ["http://127.0.0.1:8080/creds"])
    }

    @Test func plainHTTPToARemoteHostIsRefusedWithoutARequest() throws {
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("ASIA", "s")) }
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://creds.example.com/x"],
                              transport: fake)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isUnauthorized(error))
        #expect(error?.description.contains("must use https") == true)
        #expect(fake.requests.isEmpty)
        #expect(AWSCredentialChain.isAllowedContainerHTTPHost("127.0.0.53"))
        #expect(AWSCredentialChain.isAllowedContainerHTTPHost("[::1]"))
        #expect(AWSCredentialChain.isAllowedContainerHTTPHost("169.254.170.23"))
        #expect(!AWSCredentialChain.isAllowedContainerHTTPHost("127.0.0.1.example.com"))
    }

    @Test func httpsToAnyHostIsAllowed() throws {
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("ASIAHTTPS", "s")) }
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "https://creds.example.com/x"],
                              transport: fake)
        #expect(try chain.credentials().accessKeyID == "ASIAHTTPS")
        #expect(fake.requests.map(\.url) == ["https://creds.example.com/x"])
    }

    @Test func malformedResponsesBecomeReadableErrors() throws {
        for (body, expected) in [
            ("not json", "not a credentials JSON object"),
            (#"{"AccessKeyId": "ASIA"}"#, "lacks AccessKeyId or SecretAccessKey"),
            (#"{"AccessKeyId": "ASIA", "SecretAccessKey": "s3cr3t-SHOULD-NOT-LEAK", "Expiration": "soon"}"#,
             "unreadable Expiration"),
        ] {
            let fake = FakeAWSEndpoint { _ in .init(200, body) }
            let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/c"],
                                  transport: fake)
            let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
            #expect(isUnauthorized(error))
            #expect(error?.description.contains(expected) == true, "\(expected)")
            #expect(error?.description.contains("s3cr3t") == false)
        }
    }

    @Test func fractionalSecondExpirationIsAccepted() throws {
        let fake = FakeAWSEndpoint { _ in
            .init(200, #"{"AccessKeyId":"ASIA","SecretAccessKey":"s","Token":"t","Expiration":"2030-01-02T03:04:05.678Z"}"#)
        }
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/c"],
                              transport: fake)
        let expiration = try #require(try chain.credentials().expiration)
        #expect(abs(expiration.timeIntervalSince1970 - 1_893_553_445.678) < 0.01)
    }
}

// MARK: - 5. Instance metadata

/// A fake IMDSv2 at `imdsFakeEndpoint`.
private func fakeIMDS(role: String? = "build-role", credentials: String) -> FakeAWSEndpoint {
    FakeAWSEndpoint { request in
        let path = String(request.url.dropFirst(imdsFakeEndpoint.count))
        if path == "/latest/api/token" {
            guard request.method == "PUT", request.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600" else {
                return .init(400)
            }
            return .init(200, "imds-session-token")
        }
        guard request.method == "GET", request.headers["X-aws-ec2-metadata-token"] == "imds-session-token" else {
            return .init(401)
        }
        if path == "/latest/meta-data/iam/security-credentials/" {
            return role.map { .init(200, $0 + "\n") } ?? .init(404)
        }
        if let role, path == "/latest/meta-data/iam/security-credentials/\(role)" {
            return .init(200, credentials)
        }
        return .init(404)
    }
}

@Suite("AWSCredentialChain: instance metadata")
struct AWSCredentialChainInstanceMetadataTests {
    @Test func imdsV2TokenFlowAndHeaders() throws {
        let clock = ManualClock()
        let expiration = clock.now.addingTimeInterval(6 * 3600)
        let fake = fakeIMDS(credentials: credentialsJSON(
            "ASIAIMDS", "imds-secret", token: "imds-token", expiration: expiration, code: "Success"))
        let chain = makeChain(environment: ["AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint + "/"],
                              transport: fake, clock: clock)
        #expect(try chain.credentials() == AWSCredentials(
            accessKeyID: "ASIAIMDS", secretAccessKey: "imds-secret", sessionToken: "imds-token", expiration: expiration))

        let requests = fake.requests
        try #require(requests.count == 3)
        #expect(requests.map(\.method) == ["PUT", "GET", "GET"])
        #expect(requests.map(\.url) == [
            imdsFakeEndpoint + "/latest/api/token",
            imdsFakeEndpoint + "/latest/meta-data/iam/security-credentials/",
            imdsFakeEndpoint + "/latest/meta-data/iam/security-credentials/build-role",
        ])
        #expect(requests[0].headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600")
        #expect(requests[0].headers["X-aws-ec2-metadata-token"] == nil)
        #expect(requests[1].headers["X-aws-ec2-metadata-token"] == "imds-session-token")
        #expect(requests[2].headers["X-aws-ec2-metadata-token"] == "imds-session-token")
        #expect(requests.allSatisfy { $0.totalTimeout == .seconds(2) && $0.stallTimeout == .seconds(2) })

        // Cached: no more requests while far from expiry.
        clock.advance(by: 3600)
        _ = try chain.credentials()
        #expect(fake.requests.count == 3)
    }

    @Test func disabledInstanceMetadataSendsNothing() throws {
        let fake = fakeIMDS(credentials: credentialsJSON("ASIAIMDS", "s"))
        let chain = makeChain(environment: [
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint, "AWS_EC2_METADATA_DISABLED": "TRUE",
        ], transport: fake)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isUnauthorized(error))
        #expect(fake.requests.isEmpty)
    }

    @Test func instanceWithoutRole() throws {
        let fake = fakeIMDS(role: nil, credentials: "")
        let chain = makeChain(environment: ["AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint], transport: fake)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isUnauthorized(error))
        #expect(error?.description.contains("no IAM role is attached") == true)
    }

    @Test func failedCredentialsCodeIsReported() throws {
        let fake = fakeIMDS(credentials: #"{"Code": "AssumeRoleUnauthorizedAccess", "Message": "x"}"#)
        let chain = makeChain(environment: ["AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint], transport: fake)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(error?.description.contains("AssumeRoleUnauthorizedAccess") == true)
    }

    @Test func tokenRefusalStopsTheFlow() throws {
        let fake = FakeAWSEndpoint { _ in .init(403) }
        let chain = makeChain(environment: ["AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint], transport: fake)
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(error?.description.contains("instance metadata token: HTTP 403") == true)
        #expect(fake.requests.count == 1)
    }

    @Test func environmentAndProfileWinOverInstanceMetadata() throws {
        let fake = fakeIMDS(credentials: credentialsJSON("ASIAIMDS", "s"))
        var env = envKeys
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imdsFakeEndpoint
        #expect(try makeChain(environment: env, transport: fake).credentials().accessKeyID == "AKIAENV")
        #expect(fake.requests.isEmpty)
    }
}

// MARK: - Caching and refresh

@Suite("AWSCredentialChain: expiry and refresh")
struct AWSCredentialChainRefreshTests {
    /// A container endpoint handing out numbered credentials valid for `lifetime`.
    private func rotatingEndpoint(clock: ManualClock, lifetime: TimeInterval) -> FakeAWSEndpoint {
        let counter = Mutex(0)
        return FakeAWSEndpoint { _ in
            let n = counter.withLock { $0 += 1; return $0 }
            return .init(200, credentialsJSON("ASIA\(n)", "secret-\(n)", token: "token-\(n)",
                                              expiration: clock.now.addingTimeInterval(lifetime)))
        }
    }

    private let containerEnv = ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/creds"]

    @Test func refreshedWhenLessThanFiveMinutesRemain() throws {
        let clock = ManualClock()
        let fake = rotatingEndpoint(clock: clock, lifetime: 3600)
        let chain = makeChain(environment: containerEnv, transport: fake, clock: clock)

        #expect(try chain.credentials().accessKeyID == "ASIA1")
        clock.advance(by: 3600 - 301)  // 5 min 1 s left
        #expect(try chain.credentials().accessKeyID == "ASIA1")
        #expect(fake.requests.count == 1)
        clock.advance(by: 2)  // 4 min 59 s left
        #expect(try chain.credentials().accessKeyID == "ASIA2")
        #expect(try chain.credentials().accessKeyID == "ASIA2")
        #expect(fake.requests.count == 2)
    }

    @Test func failedRefreshKeepsStillValidCredentialsThenFails() throws {
        let clock = ManualClock()
        let fake = rotatingEndpoint(clock: clock, lifetime: 3600)
        let chain = makeChain(environment: containerEnv, transport: fake, clock: clock)
        #expect(try chain.credentials().accessKeyID == "ASIA1")

        fake.setHandler { _ in throw HTTPTransportError.connectionFailed("refused") }
        clock.advance(by: 3600 - 120)  // in the refresh window, still valid
        #expect(try chain.credentials().accessKeyID == "ASIA1")
        #expect(fake.requests.count == 2)
        // The next attempt waits a little instead of hammering the endpoint.
        #expect(try chain.credentials().accessKeyID == "ASIA1")
        #expect(fake.requests.count == 2)
        clock.advance(by: 31)
        #expect(try chain.credentials().accessKeyID == "ASIA1")
        #expect(fake.requests.count == 3)

        clock.advance(by: 120)  // expired
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        #expect(isUnauthorized(error))
        #expect(error?.description.contains("connection failed: refused") == true)
    }

    @Test func credentialsWithoutExpirationAreFetchedOnce() throws {
        let fake = FakeAWSEndpoint { _ in .init(200, credentialsJSON("ASIASTATIC", "s")) }
        let chain = makeChain(environment: containerEnv, transport: fake)
        for _ in 0..<5 { #expect(try chain.credentials().accessKeyID == "ASIASTATIC") }
        #expect(fake.requests.count == 1)
    }

    @Test func shortLivedCredentialsAreNotRefetchedOnEveryCall() throws {
        let clock = ManualClock()
        let fake = rotatingEndpoint(clock: clock, lifetime: 120)  // already inside the window
        let chain = makeChain(environment: containerEnv, transport: fake, clock: clock)
        #expect(try chain.credentials().accessKeyID == "ASIA1")
        #expect(try chain.credentials().accessKeyID == "ASIA1")
        clock.advance(by: 31)
        #expect(try chain.credentials().accessKeyID == "ASIA2")
        #expect(fake.requests.count == 2)
    }

    @Test func concurrentCallersShareOneFetch() throws {
        let clock = ManualClock()
        let fake = rotatingEndpoint(clock: clock, lifetime: 3600)
        let chain = makeChain(environment: containerEnv, transport: fake, clock: clock)
        let keys = Mutex<Set<String>>([])
        DispatchQueue.concurrentPerform(iterations: 32) { _ in
            if let key = try? chain.credentials().accessKeyID { keys.withLock { _ = $0.insert(key) } }
        }
        #expect(keys.withLock { $0 } == ["ASIA1"])
        #expect(fake.requests.count == 1)

        clock.advance(by: 3600 - 60)
        DispatchQueue.concurrentPerform(iterations: 32) { _ in
            if let key = try? chain.credentials().accessKeyID { keys.withLock { _ = $0.insert(key) } }
        }
        // Callers during the refresh may still see the old, valid credentials; only one fetch.
        #expect(fake.requests.count == 2)
        #expect(try chain.credentials().accessKeyID == "ASIA2")
    }

    @Test func refreshTimeArithmetic() {
        let now = Date(timeIntervalSince1970: 1000)
        #expect(AWSCredentialChain.refreshTime(expiration: now.addingTimeInterval(3600), now: now)
            == now.addingTimeInterval(3300))
        #expect(AWSCredentialChain.refreshTime(expiration: now.addingTimeInterval(10), now: now)
            == now.addingTimeInterval(10))
        #expect(AWSCredentialChain.refreshTime(expiration: now.addingTimeInterval(-10), now: now)
            == now.addingTimeInterval(-10))
    }
}

// MARK: - Failing network sources and bounds

/// A TCP listener on 127.0.0.1 that never accepts or answers: connections complete (the
/// kernel queues them) and then nothing moves.
private final class SilentListener {
    let fd: Int32
    let port: UInt16

    init() throws {
        #if canImport(Glibc)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_INET, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw POSIXError(.EIO) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else { close(fd); throw POSIXError(.EADDRINUSE) }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { close(fd); throw POSIXError(.EIO) }
        self.fd = fd
        port = UInt16(bigEndian: address.sin_port)
    }

    deinit { close(fd) }
}

@Suite("AWSCredentialChain: failing sources")
struct AWSCredentialChainFailureTests {
    @Test func stalledContainerEndpointFallsThroughWithinTheBound() throws {
        let faulty = FaultInjectingTransport(wrapping: FakeAWSEndpoint { _ in .init(200, credentialsJSON("ASIA", "s")) })
        faulty.inject(.stall)
        let chain = makeChain(environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/creds"],
                              transport: faulty, timeout: .milliseconds(200))
        let start = ContinuousClock.now
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        let elapsed = ContinuousClock.now - start
        #expect(isUnauthorized(error))
        #expect(error?.description.hasPrefix("no AWS credentials found") == true)
        #expect(error?.description.contains("timed out") == true)
        #expect(elapsed < .seconds(2))
    }

    @Test func stalledInstanceMetadataStopsAfterTheTokenRequest() throws {
        let faulty = FaultInjectingTransport(wrapping: fakeIMDS(credentials: credentialsJSON("ASIA", "s")))
        faulty.inject(.stall)
        let chain = makeChain(environment: ["AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint],
                              transport: faulty, timeout: .milliseconds(200))
        let start = ContinuousClock.now
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        let elapsed = ContinuousClock.now - start
        #expect(isUnauthorized(error))
        #expect(error?.description.contains("instance metadata token: timed out") == true)
        #expect(faulty.requests.count == 1)
        #expect(elapsed < .seconds(2))
    }

    @Test func silentLocalEndpointOverRealHTTPIsBounded() throws {
        let listener = try SilentListener()
        let chain = makeChain(
            environment: ["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:\(listener.port)/creds"],
            transport: CurlTransport(), timeout: .milliseconds(300))
        let start = ContinuousClock.now
        let error = remoteStoreError { () throws(RemoteStoreError) in try chain.credentials() }
        let elapsed = ContinuousClock.now - start
        #expect(isUnauthorized(error))
        #expect(error?.description.contains("container credentials (http://127.0.0.1:\(listener.port))") == true)
        #expect(elapsed < .seconds(3))
        withExtendedLifetime(listener) {}
    }
}

// MARK: - Secrets

@Suite("AWSCredentialChain: secrets")
struct AWSCredentialChainSecretTests {
    @Test func errorsAndDescriptionsNeverContainSecrets() throws {
        let secrets = ["env-secret-SHOULD-NOT-LEAK", "auth-token-SHOULD-NOT-LEAK", "imds-token-SHOULD-NOT-LEAK",
                       "body-secret-SHOULD-NOT-LEAK"]
        var messages: [String] = []

        // A container endpoint refusing the token, with a body echoing secrets.
        let refusing = FakeAWSEndpoint { _ in .init(403, #"{"message": "bad token auth-token-SHOULD-NOT-LEAK body-secret-SHOULD-NOT-LEAK"}"#) }
        let containerChain = makeChain(environment: [
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/creds?sig=body-secret-SHOULD-NOT-LEAK",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "auth-token-SHOULD-NOT-LEAK",
        ], transport: refusing)
        if let error = remoteStoreError({ () throws(RemoteStoreError) in try containerChain.credentials() }) {
            messages.append(error.description)
        }

        // Instance metadata whose role lookup fails after handing out a session token.
        let imds = FakeAWSEndpoint { request in
            request.method == "PUT" ? .init(200, "imds-token-SHOULD-NOT-LEAK") : .init(500, "imds-token-SHOULD-NOT-LEAK")
        }
        let imdsChain = makeChain(environment: ["AWS_EC2_METADATA_SERVICE_ENDPOINT": imdsFakeEndpoint], transport: imds)
        if let error = remoteStoreError({ () throws(RemoteStoreError) in try imdsChain.credentials() }) {
            messages.append(error.description)
        }

        // A transport error whose message would be shown.
        let failing = FakeAWSEndpoint { _ in throw HTTPTransportError.connectionFailed("refused") }
        let failingChain = makeChain(environment: [
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/creds",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "auth-token-SHOULD-NOT-LEAK",
        ], transport: failing)
        if let error = remoteStoreError({ () throws(RemoteStoreError) in try failingChain.credentials() }) {
            messages.append(error.description)
        }

        // Explicit credentials missing their secret.
        let partial = makeChain(explicit: AWSCredentials(accessKeyID: "", secretAccessKey: "env-secret-SHOULD-NOT-LEAK"))
        if let error = remoteStoreError({ () throws(RemoteStoreError) in try partial.credentials() }) {
            messages.append(error.description)
        }

        #expect(messages.count == 4)
        for message in messages {
            #expect(!message.contains("\n"))
            for secret in secrets { #expect(!message.contains(secret), "\(message)") }
        }

        // The credentials themselves print without their secrets.
        let credentials = try makeChain(environment: envKeys.merging(["AWS_SESSION_TOKEN": "imds-token-SHOULD-NOT-LEAK"]) { $1 })
            .credentials()
        for text in [String(describing: credentials), String(reflecting: credentials), "\(credentials)"] {
            for secret in secrets { #expect(!text.contains(secret), "\(text)") }
        }
    }
}
