import Foundation
import HTTPClient
import Logging
import OCI
import RemoteStore
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

// The credential sources CI platforms hand out, against moto's STS (served on the same port
// as its S3) and, where moto has no such service or cannot be made to refuse, a small
// loopback HTTP service these tests start. The S3 source is then run with the chain, through
// libcurl, and every S3 request is checked for the access key the credential source produced.

private let quiet = Logger(label: "aws-credential-sources-test") { _ in SwiftLogNoOpLogHandler() }

/// libcurl underneath; every exchange is kept with its request body and (small) answer, so a
/// test can read the STS form that was sent and the credentials that came back.
final class CapturingTransport: HTTPTransport {
    struct Exchange: Sendable {
        var method: String
        var url: String
        var headers: HTTPHeaders
        var body: String
        var status: Int?
        var answer: String = ""

        /// A field of the `application/x-www-form-urlencoded` body, decoded.
        func form(_ name: String) -> String? {
            for pair in body.split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1).map(String.init)
                if parts.first == name { return (parts.count > 1 ? parts[1] : "").removingPercentEncoding }
            }
            return nil
        }

        /// `Credential=KEY/…` of the Authorization header.
        var signingKey: String? {
            guard let authorization = headers["Authorization"], let range = authorization.range(of: "Credential=") else { return nil }
            return String(authorization[range.upperBound...].prefix { $0 != "/" })
        }

        /// `<AccessKeyId>` of an STS answer.
        var answeredKey: String? {
            guard let open = answer.range(of: "<AccessKeyId>"), let close = answer.range(of: "</AccessKeyId>") else { return nil }
            return String(answer[open.upperBound..<close.lowerBound])
        }
    }

    private let inner = CurlTransport()
    private let state = Mutex<[Exchange]>([])

    var exchanges: [Exchange] { state.withLock { $0 } }
    /// STS calls (query-protocol POSTs), in order.
    var stsCalls: [Exchange] { exchanges.filter { $0.method == "POST" && $0.form("Action") != nil } }
    /// Requests for objects of `bucket` (path style).
    func s3Requests(bucket: String) -> [Exchange] { exchanges.filter { $0.url.contains("/\(bucket)/") } }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        let index = state.withLock { exchanges in
            exchanges.append(Exchange(method: request.method, url: request.url, headers: request.headers,
                                      body: String(decoding: request.body?.bytes ?? [], as: UTF8.self)))
            return exchanges.count - 1
        }
        try inner.execute(request, onResponse: { head in
            state.withLock { $0[index].status = head.status }
            try onResponse(head)
        }, onBody: { chunk in
            state.withLock { exchanges in
                if exchanges[index].answer.utf8.count < 64 * 1024 { exchanges[index].answer += String(decoding: chunk, as: UTF8.self) }
            }
            try onBody(chunk)
        })
    }
}

/// A clock the refresh tests move by hand; it starts at the real time, as STS's expirations do.
final class HandClock: Sendable {
    private let current = Mutex(Date())
    var now: Date { current.withLock { $0 } }
    func set(_ date: Date) { current.withLock { $0 = date } }
}

// MARK: - A loopback stand-in for STS and the SSO portal

/// Answers every request with what `configure` last said (status, content type, body, or no
/// answer at all: `hang`), and logs each request as one JSON line (method, path, headers, body).
/// Exits when its stdin closes.
final class FakeAWSService: Sendable {
    static let script = #"""
    import json, os, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    CONFIG, LOG = sys.argv[1:3]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            with lock:
                with open(LOG, "a") as out:
                    out.write(json.dumps({"method": self.command, "path": self.path,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}) + "\n")
                with open(CONFIG) as source:
                    reply = json.load(source)
            if reply.get("hang"):
                time.sleep(600)
                return
            data = reply.get("body", "").encode()
            self.send_response(reply.get("status", 200))
            self.send_header("Content-Type", reply.get("content_type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = handle_any
        do_POST = handle_any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("port %d" % server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    os._exit(0)
    """#

    struct Request: Decodable {
        var method: String
        var path: String
        var headers: [String: String]
        var body: String
    }

    let port: Int
    let server: BackgroundServer
    let configPath: String
    let logPath: String
    var endpoint: String { "http://127.0.0.1:\(port)" }

    init(port: Int, server: BackgroundServer, configPath: String, logPath: String) {
        self.port = port
        self.server = server
        self.configPath = configPath
        self.logPath = logPath
    }

    func configure(status: Int = 200, contentType: String = "application/json", body: String = "", hang: Bool = false) throws {
        let reply: [String: Any] = ["status": status, "content_type": contentType, "body": body, "hang": hang]
        try JSONSerialization.data(withJSONObject: reply).write(to: URL(fileURLWithPath: configPath))
    }

    func requests() -> [Request] {
        Processes.readText(logPath).split(separator: "\n").compactMap { try? JSONDecoder().decode(Request.self, from: Data($0.utf8)) }
    }
}

extension Workspace {
    func startFakeAWSService(label: String = "fake-aws") async throws -> FakeAWSService {
        let scriptPath = path("fake_aws_service.py")
        try FakeAWSService.script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let configPath = path("\(label)-\(nextID()).json")
        let logPath = path("\(label)-\(nextID()).log")
        try "{\"status\": 404}".write(toFile: configPath, atomically: true, encoding: .utf8)
        let server = try BackgroundServer(try Harness.python(), ["-u", scriptPath, configPath, logPath],
                                          in: self, label: label, keepStdinOpen: true)
        let port = try await server.awaitNumber(after: "port")
        return FakeAWSService(port: port, server: server, configPath: configPath, logPath: logPath)
    }
}

// MARK: - Fixture

/// moto with a seeded BuildKit S3 cache, and chains whose STS is moto.
private struct CredentialFixture {
    let ws: Workspace
    let moto: MotoS3
    let bucket: String
    let home: String

    static func start(_ ws: Workspace, bucket: String) async throws -> CredentialFixture {
        let moto = try await ws.startMoto()
        _ = try await ws.seedS3(moto, bucket: bucket, names: "main", layers: 1, layerSize: 100_000, seed: 5)
        return CredentialFixture(ws: ws, moto: moto, bucket: bucket, home: try ws.makeDirectory("aws-home"))
    }

    /// Nothing of this machine's: HOME and the shared files in the workspace, no instance
    /// metadata, STS at moto unless `environment` says otherwise.
    func environment(_ extra: [String: String]) -> [String: String] {
        var environment = ["HOME": home, "AWS_EC2_METADATA_DISABLED": "true", "PATH": "/usr/bin:/bin",
                           "AWS_SHARED_CREDENTIALS_FILE": home + "/no-credentials", "AWS_CONFIG_FILE": home + "/no-config",
                           "AWS_ENDPOINT_URL_STS": moto.endpoint]
        environment.merge(extra) { $1 }
        return environment
    }

    func chain(_ extra: [String: String], transport: CapturingTransport, serviceTimeout: Duration = .seconds(10),
               clock: HandClock? = nil) -> AWSCredentialChain {
        if let clock {
            return AWSCredentialChain(explicit: nil, environment: environment(extra), transport: transport,
                                      serviceTimeout: serviceTimeout, region: "us-east-1", now: { clock.now })
        }
        return AWSCredentialChain(explicit: nil, environment: environment(extra), transport: transport,
                                  serviceTimeout: serviceTimeout, region: "us-east-1")
    }

    /// The S3 source over `chain` reads the cache: the tag `main` is there.
    func readCache(with chain: AWSCredentialChain, transport: CapturingTransport) throws {
        let spec = try SourceSpec(parsing: S3Spec.source(endpoint: moto.endpoint, bucket: bucket, names: "main"))
        let source = S3Source(location: try S3Location(spec: spec, environment: [:]), credentials: chain, transport: transport,
                              timeout: .seconds(10), logger: quiet)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.map(\.tag) == ["main"])
    }

    @discardableResult
    func write(_ name: String, _ text: String) throws -> String {
        let path = home + "/" + name
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
}

/// The error `body` throws (a RemoteStoreError), or nil.
private func thrownError(_ body: () throws -> AWSCredentials) -> RemoteStoreError? {
    do {
        _ = try body()
        return nil
    } catch let error as RemoteStoreError {
        return error
    } catch {
        Issue.record("unexpected error type: \(error)")
        return nil
    }
}

private func expectOneLine(_ error: RemoteStoreError?, containing parts: [String], sourceLocation: SourceLocation = #_sourceLocation) {
    guard let error else {
        Issue.record("expected an error containing \(parts)", sourceLocation: sourceLocation)
        return
    }
    let text = error.description
    #expect(!text.contains("\n") && !text.contains("\r"), "one line: \(text)", sourceLocation: sourceLocation)
    for part in parts { #expect(text.contains(part), "\(part) in: \(text)", sourceLocation: sourceLocation) }
}

/// The S3 requests were all signed with `key` and carried `token`.
private func expectSigned(_ transport: CapturingTransport, bucket: String, key: String, token: String?,
                          sourceLocation: SourceLocation = #_sourceLocation) {
    let requests = transport.s3Requests(bucket: bucket)
    #expect(!requests.isEmpty, "no S3 request was made", sourceLocation: sourceLocation)
    for request in requests {
        #expect(request.signingKey == key, "\(request.method) \(request.url) signed with \(request.signingKey ?? "nothing"), not \(key)",
                sourceLocation: sourceLocation)
        #expect(request.headers["x-amz-security-token"] == token, "session token of \(request.url)", sourceLocation: sourceLocation)
        #expect(request.status == 200, "\(request.method) \(request.url) answered \(request.status ?? 0)", sourceLocation: sourceLocation)
    }
}

private let roleARN = "arn:aws:iam::123456789012:role/ci-cache"

// MARK: - Tests

@Suite("AWS credentials CI hands out: web identity, assumed roles, credential_process, SSO", .serialized)
struct AWSCredentialSourcesTests {
    /// GitHub Actions OIDC / EKS IRSA: the token file and role ARN in the environment become
    /// moto's STS credentials, and the S3 source signs every request with them.
    @Test func webIdentityFromTheEnvironmentSignsTheS3Requests() async throws {
        try await withS3Workspace("creds-web-identity") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-web-identity")
            let tokenFile = try fixture.write("oidc-token", "eyJhbGciOiJSUzI1NiJ9.github-actions-oidc.signature\n")
            let transport = CapturingTransport()
            let chain = fixture.chain(["AWS_WEB_IDENTITY_TOKEN_FILE": tokenFile, "AWS_ROLE_ARN": roleARN,
                                       "AWS_ROLE_SESSION_NAME": "gha-run-7"], transport: transport)
            try fixture.readCache(with: chain, transport: transport)

            let calls = transport.stsCalls
            #expect(calls.count == 1, "one STS call for all requests: \(calls.map(\.body))")
            let call = try #require(calls.first)
            #expect(call.url == fixture.moto.endpoint + "/")
            #expect(call.form("Action") == "AssumeRoleWithWebIdentity")
            #expect(call.form("RoleArn") == roleARN)
            #expect(call.form("RoleSessionName") == "gha-run-7")
            #expect(call.form("WebIdentityToken") == "eyJhbGciOiJSUzI1NiJ9.github-actions-oidc.signature", "the file's token, trimmed")
            #expect(call.headers["Authorization"] == nil, "AssumeRoleWithWebIdentity is not signed")
            #expect(call.status == 200)

            let credentials = try chain.credentials()
            #expect(credentials.accessKeyID == call.answeredKey, "the chain hands out what STS answered")
            #expect(credentials.accessKeyID.hasPrefix("ASIA"))
            let expiration = try #require(credentials.expiration)
            #expect(expiration > Date().addingTimeInterval(50 * 60) && expiration < Date().addingTimeInterval(70 * 60),
                    "STS's default hour: \(expiration)")
            expectSigned(transport, bucket: fixture.bucket, key: credentials.accessKeyID, token: credentials.sessionToken)
            #expect(credentials.sessionToken != nil)
        }
    }

    /// The same from a profile (`web_identity_token_file` + `role_arn`), through the binary: the
    /// mount reads the cache, and moto saw the STS call.
    @Test func webIdentityFromAProfileMounts() async throws {
        try await withS3Workspace("creds-web-identity-mount") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-web-identity-mount")
            let seed = try await ws.seedS3(fixture.moto, bucket: "bk-wi-mount", names: "main", layers: 2, layerSize: 300_000, seed: 9)
            let tokenFile = try fixture.write("token", "irsa-projected-token")
            let config = try fixture.write("config", """
                [profile ci]
                role_arn = \(roleARN)
                web_identity_token_file = \(tokenFile)
                role_session_name = mount-test
                """)
            let mount = try await ws.mountS3ExpectingSuccess(
                S3Spec.source(endpoint: fixture.moto.endpoint, bucket: "bk-wi-mount", names: "main"),
                environment: ["AWS_CONFIG_FILE": config, "AWS_PROFILE": "ci", "AWS_ENDPOINT_URL_STS": fixture.moto.endpoint])
            try S3Check.layout(mount, seed, names: ["main"])
            Check.blobsVerify(mount, seed.layers.map(\.blob))
            let stsPosts = fixture.moto.requests().filter { $0.method == "POST" && $0.path == "/" }
            #expect(stsPosts.count == 1 && stsPosts.allSatisfy { $0.status == 200 }, "\(fixture.moto.requests())")
        }
    }

    /// `role_arn` + `source_profile`, two deep: the first AssumeRole is signed with the base
    /// profile's keys, the second with what the first returned, and S3 with the last.
    @Test func assumeRoleThroughSourceProfiles() async throws {
        try await withS3Workspace("creds-assume-role") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-assume-role")
            let credentialsFile = try fixture.write("credentials", """
                [base]
                aws_access_key_id = AKIABASEPROFILE00001
                aws_secret_access_key = base-secret
                """)
            let config = try fixture.write("config", """
                [profile ci]
                role_arn = \(roleARN)
                source_profile = middle
                role_session_name = ci-session
                duration_seconds = 900

                [profile middle]
                role_arn = arn:aws:iam::123456789012:role/middle
                source_profile = base
                external_id = shared-secret-id
                region = eu-central-1
                """)
            let transport = CapturingTransport()
            let chain = fixture.chain(["AWS_SHARED_CREDENTIALS_FILE": credentialsFile, "AWS_CONFIG_FILE": config, "AWS_PROFILE": "ci"],
                                      transport: transport)
            try fixture.readCache(with: chain, transport: transport)

            let calls = transport.stsCalls
            try #require(calls.count == 2, "\(calls.map(\.body))")
            #expect(calls.allSatisfy { $0.form("Action") == "AssumeRole" })
            #expect(calls[0].form("RoleArn") == "arn:aws:iam::123456789012:role/middle")
            #expect(calls[0].form("ExternalId") == "shared-secret-id")
            #expect(calls[0].signingKey == "AKIABASEPROFILE00001")
            #expect(calls[0].headers["Authorization"]?.contains("/us-east-1/sts/aws4_request") == true,
                    "the bucket's region: the named profile gives none, and a source profile's is not used")
            #expect(calls[1].form("RoleArn") == roleARN)
            #expect(calls[1].form("RoleSessionName") == "ci-session")
            #expect(calls[1].form("DurationSeconds") == "900")
            let middleKey = try #require(calls[0].answeredKey)
            #expect(calls[1].signingKey == middleKey, "the second role is assumed with the first role's credentials")
            #expect(calls[1].headers["x-amz-security-token"] != nil)
            let credentials = try chain.credentials()
            #expect(credentials.accessKeyID == calls[1].answeredKey)
            let expiration = try #require(credentials.expiration)
            #expect(expiration < Date().addingTimeInterval(16 * 60), "duration_seconds = 900 asked for a short session: \(expiration)")
            expectSigned(transport, bucket: fixture.bucket, key: credentials.accessKeyID, token: credentials.sessionToken)

            // Profiles that name each other: one line, and no STS call.
            let loop = try fixture.write("loop-config", """
                [profile a]
                role_arn = \(roleARN)
                source_profile = b
                [profile b]
                role_arn = \(roleARN)
                source_profile = a
                """)
            let loopTransport = CapturingTransport()
            let looping = fixture.chain(["AWS_CONFIG_FILE": loop, "AWS_PROFILE": "a"], transport: loopTransport)
            expectOneLine(thrownError { try looping.credentials() }, containing: ["\"a\" -> \"b\" -> \"a\"", "loops"])
            #expect(loopTransport.exchanges.isEmpty)
        }
    }

    /// moto with signature checking on refuses AssumeRole signed with keys it does not know:
    /// one line naming the profile and moto's code.
    @Test func assumeRoleRefusedByMoto() async throws {
        try await withS3Workspace("creds-assume-role-refused") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-assume-refused")
            _ = try await fixture.moto.enableSignatureChecking(in: ws)
            let credentialsFile = try fixture.write("credentials", """
                [base]
                aws_access_key_id = AKIAUNKNOWNTOMOTO001
                aws_secret_access_key = not-known
                """)
            let config = try fixture.write("config", "[profile ci]\nrole_arn = \(roleARN)\nsource_profile = base\n")
            let transport = CapturingTransport()
            let chain = fixture.chain(["AWS_SHARED_CREDENTIALS_FILE": credentialsFile, "AWS_CONFIG_FILE": config, "AWS_PROFILE": "ci"],
                                      transport: transport)
            let error = thrownError { try chain.credentials() }
            expectOneLine(error, containing: ["AWS profile \"ci\"", "STS AssumeRole", "HTTP 403", "InvalidClientTokenId"])
            if case .unauthorized = error {} else { Issue.record("a refusal is .unauthorized: \(String(describing: error))") }
            #expect(error?.description.contains("not-known") == false, "no secret in the line")
            #expect(transport.stsCalls.count == 1, "a refusal is not retried")
        }
    }

    /// `credential_process`: run once, its Version 1 JSON signs the S3 requests; its failures
    /// (non-zero exit, a hang past the bound, garbage, another Version) are one line each.
    @Test func credentialProcess() async throws {
        try await withS3Workspace("creds-process") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-process")
            let runs = fixture.home + "/runs"
            let expiration = ISO8601DateFormatter().string(from: Date().addingTimeInterval(3600))
            let script = try fixture.write("helper.sh", """
                #!/bin/sh
                echo run >> '\(runs)'
                case "$1" in
                good) printf '{"Version": 1, "AccessKeyId": "AKIAPROCESS000000001", "SecretAccessKey": "process-secret", "SessionToken": "process-token", "Expiration": "\(expiration)"}\\n' ;;
                fail) echo 'vault is sealed' >&2; echo 'second line' >&2; exit 3 ;;
                hang) echo $$ > '\(fixture.home)/hung.pid'; sleep 60 ;;
                garbage) echo 'Welcome to the helper!' ;;
                v2) echo '{"Version": 2, "AccessKeyId": "A", "SecretAccessKey": "B"}' ;;
                esac
                """)
            chmod(script, 0o755)
            func chain(_ mode: String, transport: CapturingTransport) throws -> AWSCredentialChain {
                let config = try fixture.write("config-\(mode)", "[default]\ncredential_process = \(script) \(mode)\n")
                return fixture.chain(["AWS_CONFIG_FILE": config], transport: transport, serviceTimeout: .seconds(2))
            }

            let transport = CapturingTransport()
            let good = try chain("good", transport: transport)
            try fixture.readCache(with: good, transport: transport)
            _ = try good.credentials()
            expectSigned(transport, bucket: fixture.bucket, key: "AKIAPROCESS000000001", token: "process-token")
            #expect(Processes.readText(runs).split(separator: "\n").count == 1, "credentials with an hour left are not fetched again")

            let failed = thrownError { try chain("fail", transport: CapturingTransport()).credentials() }
            expectOneLine(failed, containing: ["credential_process of AWS profile \"default\"", "exit status 3", "vault is sealed"])
            #expect(failed?.description.contains("second line") == false)

            let hung = thrownError { try chain("hang", transport: CapturingTransport()).credentials() }
            expectOneLine(hung, containing: ["did not finish within 2", "stopped"])
            if case .timedOut = hung {} else { Issue.record("a hang is .timedOut: \(String(describing: hung))") }
            let hungPID = pid_t(Processes.readText(fixture.home + "/hung.pid").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            // Killed with its process group; until whoever adopted it reaps it, it is a zombie.
            let ended = await LifecycleTests.eventually(5) {
                kill(hungPID, 0) != 0 || Processes.readText("/proc/\(hungPID)/stat").split(separator: " ").dropFirst(2).first == "Z"
            }
            #expect(hungPID > 0 && ended, "the hung helper was killed, not left running")

            expectOneLine(thrownError { try chain("garbage", transport: CapturingTransport()).credentials() },
                          containing: ["did not print a credentials JSON object"])
            expectOneLine(thrownError { try chain("v2", transport: CapturingTransport()).credentials() },
                          containing: ["printed Version 2", "only Version 1"])
        }
    }

    /// The SSO token `aws sso login` cached (named by the SHA-1 of the sso-session's name, or of
    /// the start URL for a legacy profile) buys role credentials from the portal; an expired
    /// token, or one the portal refuses, tells the person to log in again.
    @Test func ssoTokenCache() async throws {
        try await withS3Workspace("creds-sso") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-sso")
            let portal = try await ws.startFakeAWSService(label: "sso-portal")
            let expirationMillis = Int64(Date().addingTimeInterval(3600).timeIntervalSince1970 * 1000)
            try portal.configure(body: """
                {"roleCredentials": {"accessKeyId": "ASIASSOPORTAL0000001", "secretAccessKey": "sso-secret",
                 "sessionToken": "sso-session-token", "expiration": \(expirationMillis)}}
                """)
            let config = try fixture.write("config", """
                [profile dev]
                sso_session = corp
                sso_account_id = 111122223333
                sso_role_name = ReadCache

                [sso-session corp]
                sso_start_url = https://corp.awsapps.com/start
                sso_region = eu-west-1

                [profile legacy]
                sso_start_url = https://legacy.awsapps.com/start
                sso_region = eu-west-1
                sso_account_id = 444455556666
                sso_role_name = Legacy
                """)
            func cacheToken(_ sha1: String, _ token: String, expiresIn seconds: TimeInterval) throws {
                let expiresAt = ISO8601DateFormatter().string(from: Date().addingTimeInterval(seconds))
                try fixture.write(".aws/sso/cache/\(sha1).json",
                                  "{\"accessToken\": \"\(token)\", \"expiresAt\": \"\(expiresAt)\", \"region\": \"eu-west-1\"}")
            }
            let corpCache = "ee0bfd2552fbd840c02cc48b6e823320543c450f"  // sha1("corp")
            let legacyCache = "79e435d7a515078e81c9dffc35f38d5687ebd3a7"  // sha1("https://legacy.awsapps.com/start")
            try cacheToken(corpCache, "corp-bearer-token", expiresIn: 3600)
            let environment = ["AWS_CONFIG_FILE": config, "AWS_ENDPOINT_URL_SSO": portal.endpoint]

            let transport = CapturingTransport()
            let chain = fixture.chain(environment.merging(["AWS_PROFILE": "dev"]) { $1 }, transport: transport)
            try fixture.readCache(with: chain, transport: transport)
            let requests = portal.requests()
            try #require(requests.count == 1, "\(requests.map(\.path))")
            #expect(requests[0].method == "GET")
            #expect(requests[0].path == "/federation/credentials?account_id=111122223333&role_name=ReadCache")
            #expect(requests[0].headers["x-amz-sso_bearer_token"] == "corp-bearer-token")
            let credentials = try chain.credentials()
            #expect(credentials.expiration.map { abs($0.timeIntervalSince1970 * 1000 - Double(expirationMillis)) < 1 } == true)
            expectSigned(transport, bucket: fixture.bucket, key: "ASIASSOPORTAL0000001", token: "sso-session-token")

            // A legacy profile's cache is named after its start URL.
            try cacheToken(legacyCache, "legacy-bearer-token", expiresIn: 600)
            _ = try fixture.chain(environment.merging(["AWS_PROFILE": "legacy"]) { $1 }, transport: CapturingTransport()).credentials()
            #expect(portal.requests().last?.headers["x-amz-sso_bearer_token"] == "legacy-bearer-token")
            #expect(portal.requests().last?.path.contains("role_name=Legacy") == true)

            // Expired: one line, and the portal is not asked.
            try cacheToken(corpCache, "corp-bearer-token", expiresIn: -60)
            let asked = portal.requests().count
            let expired = thrownError { try fixture.chain(environment.merging(["AWS_PROFILE": "dev"]) { $1 }, transport: CapturingTransport()).credentials() }
            expectOneLine(expired, containing: ["SSO token expired", "aws sso login --profile dev"])
            #expect(portal.requests().count == asked)

            // Refused by the portal (a token revoked early): the same advice.
            try cacheToken(corpCache, "corp-bearer-token", expiresIn: 3600)
            try portal.configure(status: 401, body: "{\"message\": \"Session token not found or invalid\"}")
            let refused = thrownError { try fixture.chain(environment.merging(["AWS_PROFILE": "dev"]) { $1 }, transport: CapturingTransport()).credentials() }
            expectOneLine(refused, containing: ["HTTP 401", "aws sso login --profile dev"])

            // No cached token at all.
            try FileManager.default.removeItem(atPath: fixture.home + "/.aws/sso/cache/\(corpCache).json")
            let missing = thrownError { try fixture.chain(environment.merging(["AWS_PROFILE": "dev"]) { $1 }, transport: CapturingTransport()).credentials() }
            expectOneLine(missing, containing: ["no cached SSO token", "aws sso login --profile dev"])
        }
    }

    /// Temporary credentials are renewed once less than five minutes remain, before they
    /// expire: by one STS call however many callers ask at once, with the token file read
    /// again; never earlier.
    @Test func refreshedBeforeExpiryByOneCall() async throws {
        try await withS3Workspace("creds-refresh") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-refresh")
            let tokenFile = try fixture.write("token", "first-token")
            let clock = HandClock()
            let transport = CapturingTransport()
            let config = try fixture.write("config", """
                [default]
                role_arn = \(roleARN)
                web_identity_token_file = \(tokenFile)
                duration_seconds = 900
                """)
            let chain = fixture.chain(["AWS_CONFIG_FILE": config], transport: transport, clock: clock)
            let first = try chain.credentials()
            let expiration = try #require(first.expiration)
            #expect(expiration.timeIntervalSince(clock.now) <= 960 && expiration.timeIntervalSince(clock.now) > 800,
                    "a short (15 minute) session: \(expiration)")
            #expect(transport.stsCalls.count == 1)

            // Six minutes before expiry: still the same credentials, no call.
            clock.set(expiration.addingTimeInterval(-360))
            #expect(try chain.credentials() == first)
            #expect(transport.stsCalls.count == 1)

            // Four minutes before: eight callers at once, one STS call, with the new token.
            try "second-token".write(toFile: tokenFile, atomically: true, encoding: .utf8)
            clock.set(expiration.addingTimeInterval(-240))
            let results = Mutex<[String]>([])
            DispatchQueue.concurrentPerform(iterations: 8) { _ in
                if let key = try? chain.credentials().accessKeyID { results.withLock { $0.append(key) } }
            }
            let calls = transport.stsCalls
            #expect(calls.count == 2, "one refresh for eight callers: \(calls.count) calls")
            #expect(calls.last?.form("WebIdentityToken") == "second-token", "the token file is read again at each refresh")
            let renewed = try chain.credentials()
            #expect(renewed.accessKeyID != first.accessKeyID)
            #expect(renewed.accessKeyID == calls.last?.answeredKey)
            #expect(results.withLock { $0.count == 8 && $0.allSatisfy { $0 == first.accessKeyID || $0 == renewed.accessKeyID } },
                    "every caller got valid credentials: \(results.withLock { $0 })")

            // The S3 source now signs with the renewed ones.
            try fixture.readCache(with: chain, transport: transport)
            expectSigned(transport, bucket: fixture.bucket, key: renewed.accessKeyID, token: renewed.sessionToken)
            #expect(transport.stsCalls.count == 2)
        }
    }

    /// An STS that refuses, fails or never answers: one line each, retries bounded, a stall
    /// not waited for twice; configuration mistakes are named before any request.
    @Test func stsFailuresAreOneLineAndBounded() async throws {
        try await withS3Workspace("creds-sts-failures") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-sts-failures")
            let sts = try await ws.startFakeAWSService(label: "fake-sts")
            let tokenFile = try fixture.write("token", "a-token")
            let environment = ["AWS_WEB_IDENTITY_TOKEN_FILE": tokenFile, "AWS_ROLE_ARN": roleARN, "AWS_ENDPOINT_URL_STS": sts.endpoint]
            func attempt() -> RemoteStoreError? {
                thrownError { try fixture.chain(environment, transport: CapturingTransport(), serviceTimeout: .seconds(2)).credentials() }
            }

            try sts.configure(status: 403, contentType: "text/xml", body: """
                <ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>\
                <Code>AccessDenied</Code><Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message>\
                </Error><RequestId>1</RequestId></ErrorResponse>
                """)
            let refused = attempt()
            expectOneLine(refused, containing: ["web identity", "AssumeRoleWithWebIdentity", roleARN, "HTTP 403 AccessDenied",
                                                "Not authorized to perform sts:AssumeRoleWithWebIdentity"])
            #expect(sts.requests().count == 1, "a refusal is not retried")

            try sts.configure(status: 503, contentType: "text/xml", body: "<ErrorResponse><Error><Code>ServiceUnavailable</Code></Error></ErrorResponse>")
            expectOneLine(attempt(), containing: ["HTTP 503 ServiceUnavailable"])
            #expect(sts.requests().count == 1 + 3, "a server error is tried three times, no more")

            try sts.configure(status: 200, contentType: "text/xml", body: "<html>captive portal</html>")
            expectOneLine(attempt(), containing: ["holds no Credentials"])

            let before = sts.requests().count
            try sts.configure(hang: true)
            let stalled = attempt()
            expectOneLine(stalled, containing: ["STS AssumeRoleWithWebIdentity", "timed out"])
            if case .timedOut = stalled {} else { Issue.record("a silent STS is .timedOut: \(String(describing: stalled))") }
            #expect(sts.requests().count == before + 1, "a stall is not retried")

            // Named before any request.
            let noRole = thrownError {
                try fixture.chain(["AWS_WEB_IDENTITY_TOKEN_FILE": tokenFile], transport: CapturingTransport()).credentials()
            }
            expectOneLine(noRole, containing: ["AWS_ROLE_ARN is not"])
            let noFile = thrownError {
                try fixture.chain(["AWS_WEB_IDENTITY_TOKEN_FILE": fixture.home + "/absent", "AWS_ROLE_ARN": roleARN],
                                  transport: CapturingTransport()).credentials()
            }
            expectOneLine(noFile, containing: ["cannot read the token file", "absent"])
        }
    }

    /// Through the binary, a refused web identity fails the mount with one line.
    @Test func refusedWebIdentityFailsTheMountWithOneLine() async throws {
        try await withS3Workspace("creds-refused-mount") { ws in
            let fixture = try await CredentialFixture.start(ws, bucket: "bk-refused-mount")
            let sts = try await ws.startFakeAWSService(label: "refusing-sts")
            try sts.configure(status: 400, contentType: "text/xml", body: """
                <ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>Token expired</Message></Error></ErrorResponse>
                """)
            let tokenFile = try fixture.write("token", "expired-token")
            let refused = try await ws.mountS3(S3Spec.source(endpoint: fixture.moto.endpoint, bucket: fixture.bucket, names: "main"),
                                               environment: ["AWS_WEB_IDENTITY_TOKEN_FILE": tokenFile, "AWS_ROLE_ARN": roleARN,
                                                             "AWS_ENDPOINT_URL_STS": sts.endpoint])
            Check.mountFailedCleanly(refused, within: 30)
            #expect(refused.result.stderr.contains("InvalidIdentityToken") && refused.result.stderr.contains("Token expired"),
                    "\(refused.result)")
            #expect(!refused.result.stderr.contains("expired-token"), "the token is never printed")
        }
    }
}
