import Foundation
import HTTPClient
import Testing
@testable import RemoteStore

@Suite("AWS STS answers, service endpoints and the XML they come in")
struct AWSSecurityTokenServiceTests {
    private func response(_ status: Int, _ body: String) -> HTTPResponse {
        HTTPResponse(head: HTTPResponseHead(status: status, headers: HTTPHeaders()), body: Array(body.utf8))
    }

    @Test func credentialsOfASuccess() throws {
        let body = """
            <AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>
            <AssumedRoleUser><Arn>arn:aws:sts::1:assumed-role/r/s</Arn></AssumedRoleUser>
            <Credentials>
              <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
              <SecretAccessKey>se&amp;cr&#x2F;et&lt;</SecretAccessKey>
              <SessionToken>tok&#43;en</SessionToken>
              <Expiration>2026-12-02T23:29:13.034976Z</Expiration>
            </Credentials></AssumeRoleResult></AssumeRoleResponse>
            """
        let (outcome, retry) = AWSSecurityTokenService.interpret(response(200, body), context: "STS AssumeRole")
        let credentials = try outcome.get()
        #expect(!retry)
        #expect(credentials.accessKeyID == "ASIAEXAMPLE")
        #expect(credentials.secretAccessKey == "se&cr/et<", "entities and character references decoded")
        #expect(credentials.sessionToken == "tok+en")
        #expect(credentials.expiration == AWSCredentialChain.parseISO8601("2026-12-02T23:29:13.034976Z"))
    }

    @Test func errorsAreOneLineAndSayWhetherARetryMayHelp() {
        let refusal = "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>Not\nauthorized</Message></Error></ErrorResponse>"
        let (denied, retryDenied) = AWSSecurityTokenService.interpret(response(403, refusal), context: "STS X")
        #expect(denied == .failure(.unauthorized("STS X: HTTP 403 AccessDenied: Not authorized")))
        #expect(!retryDenied)

        let (throttled, retryThrottled) = AWSSecurityTokenService.interpret(
            response(400, "<Error><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"), context: "STS X")
        #expect(throttled == .failure(.unauthorized("STS X: HTTP 400 Throttling: Rate exceeded")))
        #expect(retryThrottled)

        let (server, retryServer) = AWSSecurityTokenService.interpret(response(502, "<html>bad gateway</html>"), context: "STS X")
        #expect(server == .failure(.server("STS X: HTTP 502")))
        #expect(retryServer)

        let (empty, retryEmpty) = AWSSecurityTokenService.interpret(response(200, "<Credentials><AccessKeyId>A</AccessKeyId></Credentials>"),
                                                                   context: "STS X")
        #expect(empty == .failure(.invalidContent("STS X: the answer holds no Credentials with AccessKeyId and SecretAccessKey")))
        #expect(!retryEmpty)

        let long = String(repeating: "x", count: 1000)
        let (verbose, _) = AWSSecurityTokenService.interpret(response(403, "<Code>C</Code><Message>\(long)</Message>"), context: "STS X")
        #expect(((try? verbose.get()) == nil) && String(describing: verbose).count < 400, "a server's message is cut short")
    }

    @Test func endpoints() {
        #expect(AWSSecurityTokenService.endpoint(environment: [:], region: "eu-west-1") == "https://sts.eu-west-1.amazonaws.com")
        #expect(AWSSecurityTokenService.endpoint(environment: [:], region: "cn-north-1") == "https://sts.cn-north-1.amazonaws.com.cn")
        #expect(AWSSecurityTokenService.endpoint(environment: ["AWS_ENDPOINT_URL": "http://127.0.0.1:5000/"], region: "x")
                == "http://127.0.0.1:5000")
        #expect(AWSSecurityTokenService.endpoint(environment: ["AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_STS": "http://b"],
                                                 region: "x") == "http://b", "the service's own variable wins")
        #expect(AWSSecurityTokenService.endpoint(environment: ["AWS_ENDPOINT_URL_STS": "http://b",
                                                               "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"], region: "us-east-2")
                == "https://sts.us-east-2.amazonaws.com")
        #expect(AWSCredentialChain.ssoPortal(environment: [:], region: "eu-central-1") == "https://portal.sso.eu-central-1.amazonaws.com")
        #expect(AWSCredentialChain.ssoPortal(environment: ["AWS_ENDPOINT_URL_SSO": "http://127.0.0.1:9"], region: "x") == "http://127.0.0.1:9")
    }

    @Test func xmlEntities() {
        #expect(AWSXML.decodeEntities("a &amp; b &lt;c&gt; &quot;d&quot; &apos;e&apos; &#65;&#x42;") == "a & b <c> \"d\" 'e' AB")
        #expect(AWSXML.decodeEntities("fish & chips &unknown; &#xZZ;") == "fish & chips &unknown; &#xZZ;", "what is not an entity stays")
        #expect(AWSXML.text(of: "Code", in: "<Error><Code> Throttling </Code></Error>") == "Throttling")
        #expect(AWSXML.text(of: "Code", in: "<Error><Code>unterminated") == nil)
    }
}

/// Never sends anything: the tests below must not reach the network.
private struct NoNetwork: HTTPTransport {
    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        Issue.record("unexpected request to \(request.url)")
        throw HTTPTransportError.connectionFailed("no network in this test")
    }
}

@Suite("AWSCredentialChain: relative file names keep their meaning")
struct AWSCredentialChainRelativePathTests {
    /// A daemon renews credentials after it has moved to `/`: relative names in the
    /// environment and profiles mean what they meant where the mount was started.
    @Test func relativeNamesAreTakenFromTheWorkingDirectory() throws {
        let directory = FileManager.default.temporaryDirectory.path + "/ocicachefs-relative-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory + "/aws", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try """
            [default]
            credential_process = printf '{"Version": 1, "AccessKeyId": "AKIARELATIVE", "SecretAccessKey": "s"}'

            [profile wi]
            role_arn = arn:aws:iam::1:role/r
            web_identity_token_file = tokens/absent
            """.write(toFile: directory + "/aws/config", atomically: true, encoding: .utf8)
        let environment = ["HOME": "/nonexistent-home", "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "aws/config",
                           "PATH": "/usr/bin:/bin"]
        let chain = AWSCredentialChain(explicit: nil, environment: environment, transport: NoNetwork(), workingDirectory: directory)
        #expect(try chain.credentials().accessKeyID == "AKIARELATIVE")

        var profiled = environment
        profiled["AWS_PROFILE"] = "wi"
        let webIdentity = AWSCredentialChain(explicit: nil, environment: profiled, transport: NoNetwork(), workingDirectory: directory)
        do {
            _ = try webIdentity.credentials()
            Issue.record("a missing token file must fail")
        } catch {
            #expect(error.description.contains("cannot read the token file \(directory)/tokens/absent"), "\(error)")
        }
    }
}
