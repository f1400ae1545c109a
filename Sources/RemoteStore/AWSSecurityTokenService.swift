// AWS STS as the credential chain uses it: AssumeRoleWithWebIdentity (unsigned: the web
// identity token is the proof) and AssumeRole (signed with the source profile's credentials).
// Both are query-protocol POSTs answered in XML; only the `Credentials` element of a success
// and the `Code`/`Message` of an error are read.

import FoundationEssentials
import HTTPClient
import SystemSupport

struct AWSSecurityTokenService {
    static let apiVersion = "2011-06-15"
    static let maxResponseBytes = 64 * 1024
    /// Attempts per call when the failure may pass (network, 5xx, throttling).
    static let attempts = 3

    /// `scheme://host[:port]`, without a trailing slash.
    let endpoint: String
    /// The region the requests are signed for.
    let region: String
    let transport: any HTTPTransport
    /// The bound on each exchange (connect, stall and total).
    let timeout: Duration

    /// `AWS_ENDPOINT_URL_STS`, else `AWS_ENDPOINT_URL`, else the regional endpoint.
    static func endpoint(environment: [String: String], region: String) -> String {
        AWSCredentialChain.serviceEndpoint(variableSuffix: "STS", regionalHost: "sts", environment: environment, region: region)
    }

    func assumeRoleWithWebIdentity(roleARN: String, sessionName: String, token: String,
                                   durationSeconds: Int?) throws(RemoteStoreError) -> AWSCredentials {
        var parameters = [("RoleArn", roleARN), ("RoleSessionName", sessionName), ("WebIdentityToken", token)]
        if let durationSeconds { parameters.append(("DurationSeconds", String(durationSeconds))) }
        return try call("AssumeRoleWithWebIdentity", parameters, roleARN: roleARN, signingWith: nil)
    }

    func assumeRole(roleARN: String, sessionName: String, externalID: String?, durationSeconds: Int?,
                    with source: AWSCredentials) throws(RemoteStoreError) -> AWSCredentials {
        var parameters = [("RoleArn", roleARN), ("RoleSessionName", sessionName)]
        if let externalID { parameters.append(("ExternalId", externalID)) }
        if let durationSeconds { parameters.append(("DurationSeconds", String(durationSeconds))) }
        return try call("AssumeRole", parameters, roleARN: roleARN, signingWith: source)
    }

    private func call(_ action: String, _ parameters: [(String, String)], roleARN: String,
                      signingWith source: AWSCredentials?) throws(RemoteStoreError) -> AWSCredentials {
        let context = "STS \(action) for \(roleARN) at \(endpoint)"
        let body = ([("Action", action), ("Version", Self.apiVersion)] + parameters)
            .map { SigV4.uriEncode($0.0, encodeSlash: true) + "=" + SigV4.uriEncode($0.1, encodeSlash: true) }
            .joined(separator: "&")
        var failures = 0
        while true {
            var request = HTTPRequest(method: "POST", url: endpoint + "/",
                                      headers: HTTPHeaders([("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")]),
                                      body: .bytes(Array(body.utf8)), stallTimeout: timeout, totalTimeout: timeout)
            // Signed at each attempt: the signature carries the time.
            if let source { SigV4.sign(&request, credentials: source, region: region, service: "sts", date: Date()) }
            let outcome: Result<AWSCredentials, RemoteStoreError>
            let mayPass: Bool
            do {
                let response = try transport.fetch(request, maxBodyBytes: Self.maxResponseBytes)
                (outcome, mayPass) = Self.interpret(response, context: context)
            } catch let error as HTTPTransportError {
                outcome = .failure(RemoteStoreError(error, context: context))
                mayPass = error.isTransient
            } catch {
                outcome = .failure(.transport("\(context): request failed"))
                mayPass = false
            }
            switch outcome {
            case .success(let credentials):
                return credentials
            case .failure(let error):
                failures += 1
                // A stall already cost the whole bound: not waited for again.
                if case .timedOut = error { throw error }
                guard mayPass, failures < Self.attempts else { throw error }
                SystemThread.sleep(for: RetryBackoff.pause(afterFailures: failures))
            }
        }
    }

    /// The credentials of a 200, or the error of anything else and whether a retry may help.
    static func interpret(_ response: HTTPResponse, context: String) -> (Result<AWSCredentials, RemoteStoreError>, Bool) {
        let text = String(decoding: response.body, as: UTF8.self)
        guard response.status == 200 else {
            let code = AWSXML.text(of: "Code", in: text[...]).map(sanitized)
            let message = AWSXML.text(of: "Message", in: text[...]).map(sanitized)
            var line = "\(context): HTTP \(response.status)"
            if let code { line += " \(code)" }
            if let message, !message.isEmpty { line += ": \(message)" }
            let throttled = code.map { ["Throttling", "ThrottlingException", "RequestLimitExceeded", "IDPCommunicationError"].contains($0) } ?? false
            if response.status >= 500 { return (.failure(.server(line)), true) }
            return (.failure(.unauthorized(line)), throttled || response.status == 429)
        }
        guard let credentials = AWSXML.element("Credentials", in: text[...]),
              let accessKey = AWSXML.text(of: "AccessKeyId", in: credentials), !accessKey.isEmpty,
              let secretKey = AWSXML.text(of: "SecretAccessKey", in: credentials), !secretKey.isEmpty else {
            return (.failure(.invalidContent("\(context): the answer holds no Credentials with AccessKeyId and SecretAccessKey")), false)
        }
        var expiration: Date?
        if let text = AWSXML.text(of: "Expiration", in: credentials) {
            guard let date = AWSCredentialChain.parseISO8601(text) else {
                return (.failure(.invalidContent("\(context): the answer has an unreadable Expiration")), false)
            }
            expiration = date
        }
        let token = AWSXML.text(of: "SessionToken", in: credentials).flatMap { $0.isEmpty ? nil : $0 }
        return (.success(AWSCredentials(accessKeyID: accessKey, secretAccessKey: secretKey, sessionToken: token,
                                        expiration: expiration)), false)
    }

    /// A server's words in one bounded line.
    static func sanitized(_ text: String) -> String {
        let line = AWSCredentialChain.oneLine(text).trimmingWhitespace()
        return line.count <= 300 ? line : String(line.prefix(300)) + "…"
    }
}

/// Just enough XML for AWS query-protocol answers: the first element of a name (without
/// attributes on its tag, as AWS writes them) and its text with the five predefined entities and
/// character references decoded.
enum AWSXML {
    static func element(_ name: String, in text: Substring) -> Substring? {
        guard let open = text.firstRange(of: "<\(name)>") else { return nil }
        let rest = text[open.upperBound...]
        guard let close = rest.firstRange(of: "</\(name)>") else { return nil }
        return rest[..<close.lowerBound]
    }

    static func text(of name: String, in text: Substring) -> String? {
        element(name, in: text).map { decodeEntities($0).trimmingWhitespace() }
    }

    static func decodeEntities(_ text: Substring) -> String {
        guard text.contains("&") else { return String(text) }
        var out = ""
        var rest = text
        while let ampersand = rest.firstIndex(of: "&") {
            out += rest[..<ampersand]
            let after = rest[rest.index(after: ampersand)...]
            guard let semicolon = after.prefix(12).firstIndex(of: ";") else {
                out += "&"
                rest = after
                continue
            }
            let entity = after[..<semicolon]
            let named = ["amp": "&", "lt": "<", "gt": ">", "quot": "\"", "apos": "'"][String(entity)]
            var scalar: Unicode.Scalar?
            if entity.hasPrefix("#x") || entity.hasPrefix("#X") {
                scalar = UInt32(entity.dropFirst(2), radix: 16).flatMap(Unicode.Scalar.init)
            } else if entity.hasPrefix("#") {
                scalar = UInt32(entity.dropFirst(), radix: 10).flatMap(Unicode.Scalar.init)
            }
            if let named {
                out += named
            } else if let scalar {
                out.unicodeScalars.append(scalar)
            } else {
                out += "&" + entity + ";"
            }
            rest = after[after.index(after: semicolon)...]
        }
        return out + rest
    }
}
