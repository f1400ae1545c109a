// AWS Signature Version 4 for S3 requests sent with an `Authorization` header.
//
// Which headers are signed: every header the request carries, except `Authorization` itself and
// the hop-by-hop or client-owned ones in `unsignedHeaders` (the same list botocore leaves out).
// `Host` is signed but never added: libcurl sends it, derived from the URL exactly as `hostValue`
// derives it (lowercased host, plus `:port` unless it is the scheme's default). Headers libcurl
// adds on its own (`Accept`, `Content-Length`, `Expect:` suppression) are not in the request, so
// they are not signed; S3 needs only `host` and the `x-amz-*` headers signed.
//
// Paths and queries: S3 does not normalize or double-encode paths. The canonical URI is the URL's
// path percent-decoded and re-encoded once with `uriEncode` (so an already-encoded path from
// `s3ObjectURL` is kept as is, and a raw `$` becomes `%24` as S3 computes it); the query is
// decoded and re-encoded the same way, with `+` taken literally (never as a space).

import Crypto
import SystemSupport
import FoundationEssentials
import HTTPClient

public struct AWSCredentials: Sendable, Equatable {
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String?
    /// When temporary credentials stop working.
    public var expiration: Date?

    public init(accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil, expiration: Date? = nil) {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
        self.expiration = expiration
    }
}

/// The access key ID is not secret (it travels in every `Authorization` header); the secret key
/// and the session token never appear in any textual form.
extension AWSCredentials: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    public var description: String {
        var text = "AWSCredentials(accessKeyID: \(accessKeyID), secretAccessKey: <redacted>"
        if sessionToken != nil { text += ", sessionToken: <redacted>" }
        if let expiration { text += ", expiration: \(expiration)" }
        return text + ")"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(self, children: [
            "accessKeyID": accessKeyID, "secretAccessKey": "<redacted>",
            "sessionToken": sessionToken == nil ? "nil" : "<redacted>",
            "expiration": expiration as Any,
        ], displayStyle: .struct)
    }
}

public enum SigV4 {
    public static let unsignedPayload = "UNSIGNED-PAYLOAD"
    static let algorithm = "AWS4-HMAC-SHA256"
    /// Never signed: hop-by-hop headers and ones a client or proxy may add or rewrite.
    static let unsignedHeaders: Set<String> = [
        "authorization", "connection", "expect", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "x-amzn-trace-id",
    ]

    /// What one signing produced; `sign` keeps only the headers, tests read the rest.
    struct Signed {
        var canonicalRequest: String
        var stringToSign: String
        var authorization: String
    }

    /// Adds `x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token` (with a session token;
    /// a stale one is removed otherwise) and `Authorization`, replacing earlier values, so a
    /// request may be signed again (a retry, refreshed credentials). `Host` is signed, not added.
    /// `payloadHash` nil signs the SHA-256 of the body (of nothing when there is none); a body
    /// read from a file is sent unsigned unless the caller gives its hash.
    public static func sign(_ request: inout HTTPRequest, credentials: AWSCredentials, region: String,
                            service: String = "s3", date: Date, payloadHash: String? = nil) {
        _ = signed(&request, credentials: credentials, region: region, service: service, date: date,
                   payloadHash: payloadHash)
    }

    static func signed(_ request: inout HTTPRequest, credentials: AWSCredentials, region: String,
                       service: String, date: Date, payloadHash: String?) -> Signed {
        let hash: String
        switch (payloadHash, request.body) {
        case (let given?, _): hash = given
        case (nil, .fileRange?), (nil, .stream?): hash = unsignedPayload
        case (nil, let body): hash = SHA256.hash(data: body?.bytes ?? []).lowercaseHex
        }
        for name in ["Authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"] {
            request.headers.remove(name)
        }
        request.headers.add("x-amz-date", timestamp(date))
        request.headers.add("x-amz-content-sha256", hash)
        if let token = credentials.sessionToken { request.headers.add("x-amz-security-token", token) }

        var names = Set(request.headers.fields.map { $0.name.lowercased() }).subtracting(unsignedHeaders)
        names.insert("host")
        let signedHeaders = names.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        let canonical = canonicalRequest(method: request.method, url: request.url, headers: request.headers,
                                         signedHeaders: signedHeaders, payloadHash: hash)
        let toSign = stringToSign(canonicalRequest: canonical, date: date, region: region, service: service)
        let sig = signature(stringToSign: toSign, secretAccessKey: credentials.secretAccessKey, date: date,
                            region: region, service: service)
        let authorization = "\(algorithm) Credential=\(credentials.accessKeyID)/"
            + "\(scope(date: date, region: region, service: service)), "
            + "SignedHeaders=\(signedHeaders.joined(separator: ";")), Signature=\(sig)"
        request.headers.add("Authorization", authorization)
        return Signed(canonicalRequest: canonical, stringToSign: toSign, authorization: authorization)
    }

    // MARK: - Pieces

    /// `signedHeaders` are header names (any case); `host` falls back to the URL's host.
    public static func canonicalRequest(method: String, url: String, headers: HTTPHeaders, signedHeaders: [String],
                                        payloadHash: String) -> String {
        let parts = URLParts(url)
        let names = Set(signedHeaders.map { $0.lowercased() }).sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        var lines = [method.uppercased(), canonicalURI(parts.path), canonicalQuery(parts.query)]
        for name in names {
            var values = headers.values(name)
            if values.isEmpty && name == "host" { values = [hostValue(parts)] }
            lines.append(name + ":" + values.map(trimAll).joined(separator: ","))
        }
        lines.append("")
        lines.append(names.joined(separator: ";"))
        lines.append(payloadHash)
        return lines.joined(separator: "\n")
    }

    public static func stringToSign(canonicalRequest: String, date: Date, region: String, service: String) -> String {
        [algorithm, timestamp(date), scope(date: date, region: region, service: service),
         SHA256.hash(data: Array(canonicalRequest.utf8)).lowercaseHex].joined(separator: "\n")
    }

    public static func signature(stringToSign: String, secretAccessKey: String, date: Date, region: String,
                                 service: String) -> String {
        var key = SymmetricKey(data: Array(("AWS4" + secretAccessKey).utf8))
        for part in [String(timestamp(date).prefix(8)), region, service, "aws4_request"] {
            key = SymmetricKey(data: Array(HMAC<SHA256>.authenticationCode(for: Array(part.utf8), using: key)))
        }
        return HMAC<SHA256>.authenticationCode(for: Array(stringToSign.utf8), using: key).lowercaseHex
    }

    /// RFC 3986 percent-encoding as AWS wants it: unreserved `A-Z a-z 0-9 - _ . ~` kept, `/` kept
    /// unless `encodeSlash`, every other UTF-8 byte as `%XX` (upper-case hex).
    public static func uriEncode(_ text: String, encodeSlash: Bool) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        let hex = Array("0123456789ABCDEF".utf8)
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(byte)
            case UInt8(ascii: "/") where !encodeSlash:
                out.append(byte)
            default:
                out += [UInt8(ascii: "%"), hex[Int(byte >> 4)], hex[Int(byte & 0xF)]]
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// An S3 object URL whose path is already encoded the way the canonical URI is:
    /// `endpoint/bucket/key` (path style) or `scheme://bucket.host/key` (virtual-hosted). An
    /// empty key addresses the bucket (`endpoint/bucket`, or `/` virtual-hosted). Query pairs are
    /// encoded with `uriEncode` and always carry `=`.
    public static func s3ObjectURL(endpoint: String, bucket: String, key: String, pathStyle: Bool,
                                   query: [(String, String)] = []) -> String {
        var base = endpoint
        while base.hasSuffix("/") { base.removeLast() }
        let scheme: String, rest: Substring
        if let range = base.firstRange(of: "://") {
            scheme = base[..<range.lowerBound].lowercased()
            rest = base[range.upperBound...]
        } else {
            (scheme, rest) = ("https", base[...])
        }
        let authorityEnd = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = rest[..<authorityEnd].lowercased()
        let basePath = rest[authorityEnd...]
        let encodedKey = uriEncode(key, encodeSlash: false)
        var url: String
        if pathStyle {
            url = "\(scheme)://\(authority)\(basePath)/\(uriEncode(bucket, encodeSlash: true))"
            if !key.isEmpty { url += "/" + encodedKey }
        } else {
            url = "\(scheme)://\(bucket.lowercased()).\(authority)\(basePath)/\(encodedKey)"
        }
        if !query.isEmpty {
            url += "?" + query.map { uriEncode($0.0, encodeSlash: true) + "=" + uriEncode($0.1, encodeSlash: true) }
                .joined(separator: "&")
        }
        return url
    }

    // MARK: - Helpers

    struct URLParts {
        var scheme = "", host = "", port: Int?, path = "/", query = ""

        init(_ url: String) {
            var rest = Substring(url)
            if let hash = rest.firstIndex(of: "#") { rest = rest[..<hash] }
            if let range = rest.firstRange(of: "://") {
                scheme = rest[..<range.lowerBound].lowercased()
                rest = rest[range.upperBound...]
            }
            let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" } ?? rest.endIndex
            var authority = rest[..<authorityEnd]
            rest = rest[authorityEnd...]
            if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
            // A port follows the last ':' unless that ':' is inside an IPv6 literal's brackets.
            if let colon = authority.lastIndex(of: ":"), !authority[colon...].contains("]") {
                port = Int(authority[authority.index(after: colon)...])
                authority = authority[..<colon]
            }
            host = authority.lowercased()
            if let question = rest.firstIndex(of: "?") {
                query = String(rest[rest.index(after: question)...])
                rest = rest[..<question]
            }
            if !rest.isEmpty { path = String(rest) }
        }
    }

    /// The `Host` value libcurl sends for this URL.
    static func hostValue(_ parts: URLParts) -> String {
        let defaultPort = ["http": 80, "https": 443][parts.scheme]
        guard let port = parts.port, port != defaultPort else { return parts.host }
        return "\(parts.host):\(port)"
    }

    static func canonicalURI(_ path: String) -> String {
        uriEncode(percentDecode(path), encodeSlash: false)
    }

    /// Pairs sorted by encoded name, then encoded value; `=` always present.
    static func canonicalQuery(_ query: String) -> String {
        let pairs = query.split(separator: "&").map { piece -> (String, String) in
            let equals = piece.firstIndex(of: "=") ?? piece.endIndex
            let value = equals == piece.endIndex ? "" : piece[piece.index(after: equals)...]
            return (uriEncode(percentDecode(piece[..<equals]), encodeSlash: true),
                    uriEncode(percentDecode(value), encodeSlash: true))
        }
        return pairs.sorted {
            $0.0 == $1.0 ? $0.1.utf8.lexicographicallyPrecedes($1.1.utf8)
                : $0.0.utf8.lexicographicallyPrecedes($1.0.utf8)
        }.map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    /// `%XX` becomes its byte; anything else (including a stray `%` or `+`) stays literal.
    static func percentDecode<S: StringProtocol>(_ text: S) -> String {
        let bytes = Array(text.utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "%"), i + 2 < bytes.count, let high = hexValue(bytes[i + 1]),
               let low = hexValue(bytes[i + 2]) {
                out.append(high << 4 | low)
                i += 3
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// Trimmed, with runs of spaces and tabs inside collapsed to one space.
    static func trimAll(_ value: String) -> String {
        value.split(whereSeparator: { $0 == " " || $0 == "\t" }).joined(separator: " ")
    }

    /// `YYYYMMDD'T'HHMMSS'Z'` in UTC; fractions of a second are dropped.
    static func timestamp(_ date: Date) -> String {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .gmt
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: date)
        func pad(_ n: Int?, _ width: Int) -> String {
            let digits = String(n ?? 0)
            return String(repeating: "0", count: max(0, width - digits.count)) + digits
        }
        return pad(c.year, 4) + pad(c.month, 2) + pad(c.day, 2) + "T" + pad(c.hour, 2) + pad(c.minute, 2)
            + pad(c.second, 2) + "Z"
    }

    static func scope(date: Date, region: String, service: String) -> String {
        "\(timestamp(date).prefix(8))/\(region)/\(service)/aws4_request"
    }

}
