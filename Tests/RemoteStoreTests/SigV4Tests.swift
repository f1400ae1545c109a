import Foundation
import HTTPClient
import Testing
@testable import RemoteStore

private let example = AWSCredentials(accessKeyID: "AKIAIOSFODNN7EXAMPLE",
                                     secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
private let may24 = Date(timeIntervalSince1970: 1_369_353_600)  // 20130524T000000Z
private let emptyHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

extension SigV4Vector: CustomTestStringConvertible {
    var testDescription: String { name }
}

private extension Substring {
    var trimmed: String { trimmingCharacters(in: .whitespaces) }
}

@Suite("SigV4")
struct SigV4Tests {
    // MARK: - The S3 documentation's examples (sig-v4-header-based-auth, "Examples: Signature Calculations")

    /// Signs `url` as in the S3 examples; the documented Authorization has no space after commas.
    private func checkExample(method: String = "GET", url: String, headers: [(String, String)] = [],
                              body: String? = nil, canonical: [String], canonicalHash: String, signature: String,
                              sourceLocation: SourceLocation = #_sourceLocation) {
        var request = HTTPRequest(method: method, url: url, headers: HTTPHeaders(headers.map { ($0.0, $0.1) }),
                                  body: body.map { .bytes(Array($0.utf8)) })
        let signed = SigV4.signed(&request, credentials: example, region: "us-east-1", service: "s3", date: may24,
                                  payloadHash: nil)
        #expect(signed.canonicalRequest == canonical.joined(separator: "\n"), sourceLocation: sourceLocation)
        #expect(signed.stringToSign == "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
            + canonicalHash, sourceLocation: sourceLocation)
        let signedHeaders = canonical[canonical.count - 2]
        #expect(signed.authorization.replacingOccurrences(of: ", ", with: ",") == "AWS4-HMAC-SHA256 "
            + "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=\(signedHeaders),"
            + "Signature=\(signature)", sourceLocation: sourceLocation)
        #expect(SigV4.signature(stringToSign: signed.stringToSign, secretAccessKey: example.secretAccessKey,
                                date: may24, region: "us-east-1", service: "s3") == signature,
                sourceLocation: sourceLocation)
        #expect(request.headers["Authorization"] == signed.authorization, sourceLocation: sourceLocation)
        #expect(request.headers["Host"] == nil, sourceLocation: sourceLocation)
    }

    @Test func awsExampleGetObjectWithRange() {
        checkExample(url: "https://examplebucket.s3.amazonaws.com/test.txt", headers: [("Range", "bytes=0-9")],
                     canonical: ["GET", "/test.txt", "", "host:examplebucket.s3.amazonaws.com", "range:bytes=0-9",
                                 "x-amz-content-sha256:\(emptyHash)", "x-amz-date:20130524T000000Z", "",
                                 "host;range;x-amz-content-sha256;x-amz-date", emptyHash],
                     canonicalHash: "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972",
                     signature: "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    }

    @Test func awsExamplePutObject() {
        let url = SigV4.s3ObjectURL(endpoint: "https://s3.amazonaws.com", bucket: "examplebucket",
                                    key: "test$file.text", pathStyle: false)
        #expect(url == "https://examplebucket.s3.amazonaws.com/test%24file.text")
        let bodyHash = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        // The raw `$` of the documented request line and the encoded URL sign the same.
        for url in [url, "https://examplebucket.s3.amazonaws.com/test$file.text"] {
            checkExample(method: "PUT", url: url,
                         headers: [("Date", "Fri, 24 May 2013 00:00:00 GMT"),
                                   ("x-amz-storage-class", "REDUCED_REDUNDANCY")],
                         body: "Welcome to Amazon S3.",
                         canonical: ["PUT", "/test%24file.text", "", "date:Fri, 24 May 2013 00:00:00 GMT",
                                     "host:examplebucket.s3.amazonaws.com", "x-amz-content-sha256:\(bodyHash)",
                                     "x-amz-date:20130524T000000Z", "x-amz-storage-class:REDUCED_REDUNDANCY", "",
                                     "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class", bodyHash],
                         canonicalHash: "9e0e90d9c76de8fa5b200d8c849cd5b8dc7a3be3951ddb7f6a76b4158342019d",
                         signature: "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
        }
    }

    @Test func awsExampleGetBucketLifecycle() {
        checkExample(url: "https://examplebucket.s3.amazonaws.com/?lifecycle",
                     canonical: ["GET", "/", "lifecycle=", "host:examplebucket.s3.amazonaws.com",
                                 "x-amz-content-sha256:\(emptyHash)", "x-amz-date:20130524T000000Z", "",
                                 "host;x-amz-content-sha256;x-amz-date", emptyHash],
                     canonicalHash: "9766c798316ff2757b517bc739a67f6213b4ab36dd5da2f94eaebf79c77395ca",
                     signature: "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543")
    }

    @Test func awsExampleListObjects() {
        // Out of order on purpose: the canonical query is sorted.
        checkExample(url: "https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2",
                     canonical: ["GET", "/", "max-keys=2&prefix=J", "host:examplebucket.s3.amazonaws.com",
                                 "x-amz-content-sha256:\(emptyHash)", "x-amz-date:20130524T000000Z", "",
                                 "host;x-amz-content-sha256;x-amz-date", emptyHash],
                     canonicalHash: "df57d21db20da04d7fa30298dd4488ba3a2b47ca3a489c74750e0f1e7df1b9b7",
                     signature: "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
    }

    // MARK: - botocore cross-check (SigV4Vectors.swift, from scripts/sigv4/generate_vectors.py)

    @Test(arguments: SigV4Vector.all)
    func matchesBotocore(_ v: SigV4Vector) {
        let url = SigV4.s3ObjectURL(endpoint: v.endpoint, bucket: v.bucket, key: v.key, pathStyle: v.pathStyle,
                                    query: v.query)
        #expect(url == v.url)
        var request = HTTPRequest(method: v.method, url: v.url, headers: HTTPHeaders(v.headers.map { ($0.0, $0.1) }),
                                  body: v.body.map { .bytes(Array($0.utf8)) })
        let credentials = AWSCredentials(accessKeyID: v.accessKeyID, secretAccessKey: v.secretAccessKey,
                                         sessionToken: v.sessionToken)
        let signed = SigV4.signed(&request, credentials: credentials, region: v.region, service: "s3",
                                  date: Date(timeIntervalSince1970: TimeInterval(v.timestamp)),
                                  payloadHash: v.payloadHash)
        #expect(signed.canonicalRequest == v.canonicalRequest)
        #expect(signed.stringToSign == v.stringToSign)
        #expect(signed.authorization == v.authorization)
        #expect(request.headers.values("Authorization") == [v.authorization])
        #expect(request.headers.values("x-amz-security-token") == (v.sessionToken.map { [$0] } ?? []))
        #expect(request.headers["Host"] == nil)
    }

    @Test func vectorsCoverTheTable() {
        #expect(SigV4Vector.all.count >= 20)
        #expect(SigV4Vector.all.contains { $0.sessionToken != nil })
        #expect(SigV4Vector.all.contains { $0.payloadHash == SigV4.unsignedPayload })
        #expect(SigV4Vector.all.contains { !$0.pathStyle } && SigV4Vector.all.contains { $0.pathStyle })
    }

    /// Runs the generator now and requires its output to equal the committed data, so neither the
    /// table nor botocore's answers can drift unnoticed. Fails (never skips) without python3 + botocore.
    @Test func committedVectorsMatchLiveBotocore() throws {
        let testsDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        let root = testsDirectory.deletingLastPathComponent().deletingLastPathComponent()
        let committed = try String(contentsOf: testsDirectory.appendingPathComponent("SigV4Vectors.swift"),
                                   encoding: .utf8)
        let python = ProcessInfo.processInfo.environment["SIGV4_PYTHON"] ?? "python3"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [python, root.appendingPathComponent("scripts/sigv4/generate_vectors.py").path, "--stdout"]
        let output = Pipe(), errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let generated = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let stderr = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        try #require(process.terminationStatus == 0, """
            could not run the SigV4 vector generator with '\(python)' (set SIGV4_PYTHON to a python3 that has \
            botocore): exit \(process.terminationStatus): \(stderr)
            """)
        guard generated != committed else { return }
        let (now, then) = (generated.split(separator: "\n", omittingEmptySubsequences: false),
                           committed.split(separator: "\n", omittingEmptySubsequences: false))
        let firstDifference = zip(now, then).enumerated().first { $0.element.0 != $0.element.1 }
        let line = firstDifference?.offset ?? min(now.count, then.count)
        Issue.record("""
            Tests/RemoteStoreTests/SigV4Vectors.swift differs from what botocore produces now, first at line \
            \(line + 1): committed \(line < then.count ? then[line].trimmed : "<end>"), \
            generated \(line < now.count ? now[line].trimmed : "<end>"); \
            regenerate with: python3 scripts/sigv4/generate_vectors.py
            """)
    }

    // MARK: - Pieces and properties

    @Test func uriEncoding() {
        #expect(SigV4.uriEncode("AZaz09-_.~", encodeSlash: true) == "AZaz09-_.~")
        #expect(SigV4.uriEncode("a b+c/d:e", encodeSlash: true) == "a%20b%2Bc%2Fd%3Ae")
        #expect(SigV4.uriEncode("blobs/sha256:abc", encodeSlash: false) == "blobs/sha256%3Aabc")
        #expect(SigV4.uriEncode("ü%*", encodeSlash: false) == "%C3%BC%25%2A")
    }

    @Test func s3URLs() {
        #expect(SigV4.s3ObjectURL(endpoint: "http://127.0.0.1:9000/", bucket: "cache", key: "blobs/sha256:abc",
                                  pathStyle: true) == "http://127.0.0.1:9000/cache/blobs/sha256%3Aabc")
        #expect(SigV4.s3ObjectURL(endpoint: "https://S3.us-east-1.amazonaws.com", bucket: "cache", key: "",
                                  pathStyle: false, query: [("list-type", "2"), ("prefix", "a b")])
                == "https://cache.s3.us-east-1.amazonaws.com/?list-type=2&prefix=a%20b")
    }

    @Test func rawURLsAreCanonicalizedLikeEncodedOnes() {
        let headers = HTTPHeaders([("Host", "custom.example")])
        let raw = SigV4.canonicalRequest(method: "get", url: "http://h:80/b/a b$?z=1&y=a+b&x", headers: headers,
                                         signedHeaders: ["HOST"], payloadHash: emptyHash)
        #expect(raw == "GET\n/b/a%20b%24\nx=&y=a%2Bb&z=1\nhost:custom.example\n\nhost\n\(emptyHash)")
        let derived = SigV4.canonicalRequest(method: "GET", url: "https://user@H.example:8443/k#frag",
                                             headers: HTTPHeaders(), signedHeaders: ["host"], payloadHash: "x")
        #expect(derived == "GET\n/k\n\nhost:h.example:8443\n\nhost\nx")
    }

    @Test func signingAgainReplacesEarlierHeaders() {
        var request = HTTPRequest(url: "http://127.0.0.1:9000/cache/k")
        let temporary = AWSCredentials(accessKeyID: "AK", secretAccessKey: "SK", sessionToken: "TOKEN")
        SigV4.sign(&request, credentials: temporary, region: "us-east-1", date: may24)
        SigV4.sign(&request, credentials: example, region: "us-east-1",
                   date: may24.addingTimeInterval(61.9), payloadHash: SigV4.unsignedPayload)
        #expect(request.headers.values("x-amz-date") == ["20130524T000101Z"])
        #expect(request.headers.values("x-amz-content-sha256") == [SigV4.unsignedPayload])
        #expect(request.headers.values("x-amz-security-token").isEmpty)
        #expect(request.headers.values("authorization").count == 1)
        #expect(request.headers["authorization"]?.contains("AKIAIOSFODNN7EXAMPLE/20130524/") == true)
    }

    @Test func credentialsNeverShowSecrets() {
        let credentials = AWSCredentials(accessKeyID: "AKIDVISIBLE", secretAccessKey: "s3cr3t-KEY",
                                         sessionToken: "t0k3n-VALUE", expiration: may24)
        var dumped = ""
        dump(credentials, to: &dumped)
        for text in [credentials.description, "\(credentials)", String(reflecting: credentials), dumped,
                     String(describing: [credentials])] {
            #expect(text.contains("AKIDVISIBLE"))
            #expect(!text.contains("s3cr3t-KEY"))
            #expect(!text.contains("t0k3n-VALUE"))
        }
        #expect(credentials.description.contains("<redacted>"))
    }
}
