import FoundationEssentials
import HTTPClient
import SystemSupport

/// The requests of one BuildKit S3 cache, signed with SigV4 and answered in one line when they
/// fail: what `S3Source` (reads) and `S3Publisher` (writes) share.
struct S3Client: Sendable {
    let location: S3Location
    let credentials: any AWSCredentialProvider
    let transport: any HTTPTransport
    /// Bound on connecting and on any stall of every request.
    let timeout: Duration

    /// One signed exchange; only a successful (2xx) answer reaches the handlers, any other
    /// becomes a `RemoteStoreError` naming the object. `payloadHash` nil signs the SHA-256 of an
    /// in-memory body (or of nothing); a body from a file needs its hash given, or is unsigned.
    func perform(_ method: String, key: String, query: [(String, String)] = [], headers: HTTPHeaders = HTTPHeaders(),
                 body: HTTPRequestBody? = nil, payloadHash: String?, totalTimeout: Duration?,
                 onResponse: (HTTPResponseHead) throws -> Void = { _ in },
                 onBody: (UnsafeRawBufferPointer) throws -> Void = { _ in }) throws -> HTTPResponseHead {
        let url = SigV4.s3ObjectURL(endpoint: location.endpoint, bucket: location.bucket, key: key,
                                    pathStyle: location.pathStyle, query: query)
        var request = HTTPRequest(method: method, url: url, headers: headers, body: body, stallTimeout: timeout,
                                  totalTimeout: totalTimeout)
        SigV4.sign(&request, credentials: try credentials.credentials(), region: location.region, service: "s3",
                   date: Date(), payloadHash: payloadHash)
        let head: HTTPResponseHead
        let errorBody: [UInt8]
        do {
            (head, errorBody) = try transport.executeExpectingSuccess(request, onSuccess: onResponse, onBody: onBody)
        } catch let error as HTTPTransportError {
            // The URL is built from endpoint_url and the keys: no retry can make it fetchable.
            if case .invalidRequest = error {
                throw RemoteStoreError.configuration("\(location.displayName): \(method) \(key): \(error)")
            }
            throw RemoteStoreError(error, context: "\(location.displayName): \(method) \(key)")
        }
        if (200..<300).contains(head.status) { return head }
        throw S3ErrorResponse(status: head.status, headers: head.headers, body: errorBody)
            .remoteStoreError(context: "\(location.bucket)/\(key)", region: location.region)
    }
}

/// S3's XML error document, turned into one line.
package struct S3ErrorResponse {
    var status: Int
    var headers: HTTPHeaders
    var body: [UInt8]

    package init(status: Int, headers: HTTPHeaders, body: [UInt8]) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    var code: String? { element("Code") }
    var message: String? { element("Message") }

    /// A 2xx answer whose body is an error document anyway: CopyObject and
    /// CompleteMultipartUpload answer 200 at once and report a failure found later in the body.
    static func isErrorDocument(_ body: [UInt8]) -> Bool {
        S3XML.text(of: "Code", in: body) != nil && String(decoding: body.prefix(512), as: UTF8.self).contains("<Error>")
    }

    package func remoteStoreError(context: String, region: String) -> RemoteStoreError {
        let summary = [code, message].compactMap { $0 }.joined(separator: ": ")
        let detail = summary.isEmpty ? "HTTP \(status)" : "HTTP \(status) \(summary)"
        if status == 301 || code == "PermanentRedirect" || code == "AuthorizationHeaderMalformed",
           let actual = headers["x-amz-bucket-region"] ?? element("Region"), actual != region {
            return .configuration("\(context): the bucket is in region \(actual), not \(region); set region=\(actual)")
        }
        switch (status, code) {
        case (404, "NoSuchBucket"?): return .configuration("\(context): \(detail)")
        case (404, _): return .notFound("\(context): \(detail)")
        case (401, _), (403, _): return .unauthorized("\(context): \(detail)")
        case (429, _), (500...599, _): return .server("\(context): \(detail)")
        // A failure reported inside a 200 (see isErrorDocument) is S3's own, and passes as its
        // 500s do.
        case (200..<300, _): return .server("\(context): \(detail)")
        default: return .invalidContent("\(context): \(detail)")
        }
    }

    /// One line: newlines become spaces, control characters are escaped, at most 300 characters.
    private func element(_ name: String) -> String? {
        guard let text = S3XML.text(of: name, in: body) else { return nil }
        let value = text.map { $0.isNewline ? " " : $0 }
        return String(String(value).prefix(300)).escapingControlCharacters
    }
}

/// S3's answers are flat, small XML documents; the first `<name>` element is all that is read.
enum S3XML {
    /// The text of the first `<name>` element, its five predefined entities decoded.
    static func text(of name: String, in body: [UInt8]) -> String? {
        let text = String(decoding: body, as: UTF8.self)
        guard let open = text.firstRange(of: "<\(name)>"), let close = text[open.upperBound...].firstRange(of: "</\(name)>") else {
            return nil
        }
        return unescaped(text[open.upperBound..<close.lowerBound])
    }

    static func escaped(_ text: String) -> String {
        text.replacing("&", with: "&amp;").replacing("<", with: "&lt;").replacing(">", with: "&gt;")
    }

    private static func unescaped(_ text: Substring) -> String {
        // `&amp;` last, so that `&amp;lt;` stays the text `&lt;`.
        String(text).replacing("&lt;", with: "<").replacing("&gt;", with: ">").replacing("&quot;", with: "\"")
            .replacing("&apos;", with: "'").replacing("&amp;", with: "&")
    }
}
