import Foundation
import HTTPClient
import Logging
import OCI
import Synchronization
import Testing

@testable import RemoteStore

/// An S3 endpoint in memory: objects by key, answers in S3's shapes, every request recorded.
final class FakeS3: HTTPTransport {
    struct Reply {
        var status: Int
        var headers: HTTPHeaders = HTTPHeaders()
        var body: [UInt8] = []
    }

    private let objects: Mutex<[String: [UInt8]]>
    private let overrides = Mutex<[(urlContains: String, reply: Reply, times: Int)]>([])
    private let log = Mutex<[HTTPRequest]>([])
    let bucket: String

    init(bucket: String, objects: [String: [UInt8]]) {
        self.bucket = bucket
        self.objects = Mutex(objects)
    }

    var requests: [HTTPRequest] { log.withLock { $0 } }

    func answer(_ urlContains: String, with reply: Reply, times: Int = .max) {
        overrides.withLock { $0.append((urlContains, reply, times)) }
    }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        log.withLock { $0.append(request) }
        let reply = overrides.withLock { rules -> Reply? in
            guard let index = rules.firstIndex(where: { request.url.contains($0.urlContains) && $0.times > 0 }) else { return nil }
            rules[index].times -= 1
            return rules[index].reply
        } ?? serve(request)
        try onResponse(HTTPResponseHead(status: reply.status, headers: reply.headers))
        if request.method != "HEAD", !reply.body.isEmpty { try reply.body.withUnsafeBytes { try onBody($0) } }
    }

    private func serve(_ request: HTTPRequest) -> Reply {
        guard let url = URL(string: request.url), let path = url.path.removingPercentEncoding,
              path.hasPrefix("/\(bucket)/") else {
            return Reply(status: 404, body: Array("<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>".utf8))
        }
        let key = String(path.dropFirst(bucket.count + 2))
        guard let object = objects.withLock({ $0[key] }) else {
            return Reply(status: 404, body: Array("<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>".utf8))
        }
        if let range = request.headers["Range"], range.hasPrefix("bytes="), range.hasSuffix("-"),
           let start = Int(range.dropFirst(6).dropLast()) {
            return Reply(status: 206, headers: HTTPHeaders([("Content-Range", "bytes \(start)-\(object.count - 1)/\(object.count)")]),
                         body: Array(object[start...]))
        }
        return Reply(status: 200, headers: HTTPHeaders([("Content-Length", "\(object.count)")]), body: object)
    }
}

struct StaticCredentials: AWSCredentialProvider {
    var value = AWSCredentials(accessKeyID: "AKIDEXAMPLE", secretAccessKey: "s3cr3t-never-printed")
    func credentials() throws(RemoteStoreError) -> AWSCredentials { value }
}

struct S3Cache {
    let layers: [[UInt8]] = [Array(repeating: 7, count: 3000), Array((0..<5000).map { UInt8(truncatingIfNeeded: $0) })]
    var config: [UInt8] {
        let entries = layers.enumerated().map { index, layer in
            let size = omitSizes ? "" : #","size":\#(layer.count)"#
            return #"{"blob":"\#(Digest.sha256(of: layer))",\#(index == 0 ? #""parent":-1,"# : "")"annotations":{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","diffID":"\#(Digest.sha256(of: layer + [1]))"\#(size),"createdAt":"2025-06-01T10:00:00Z"}}"#
        }
        return Array(#"{"layers":[\#(entries.joined(separator: ","))],"records":[]}"#.utf8)
    }
    var omitSizes = false

    func objects(prefix: String = "") -> [String: [UInt8]] {
        var objects = [prefix + "manifests/main": config]
        for layer in layers { objects[prefix + "blobs/\(Digest.sha256(of: layer))"] = layer }
        return objects
    }
}

func makeS3Source(_ attributes: String, transport: any HTTPTransport, environment: [String: String] = [:]) throws -> S3Source {
    let location = try S3Location(spec: SourceSpec(parsing: "type=s3," + attributes), environment: environment)
    return S3Source(location: location, credentials: StaticCredentials(), transport: transport, timeout: .seconds(2),
                    logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
}

@Suite struct S3LocationTests {
    @Test func buildKitDefaults() throws {
        let location = try S3Location(spec: SourceSpec(parsing: "type=s3,bucket=b,region=eu-west-1"), environment: [:])
        #expect(location.endpoint == "https://s3.eu-west-1.amazonaws.com")
        #expect(!location.pathStyle)
        #expect(location.names == ["buildkit"])
        #expect(location.blobKey("sha256:abc") == "blobs/sha256:abc")
        #expect(location.manifestKey("buildkit") == "manifests/buildkit")
    }

    /// The fuzzer's find: only one of several trailing slashes used to go.
    @Test(arguments: ["http://127.0.0.1:9000/", "http://127.0.0.1:9000/base//", "http://127.0.0.1:9000/base/a////"])
    func everyTrailingSlashOfTheEndpointGoes(_ endpoint: String) throws {
        let location = try S3Location(spec: SourceSpec(parsing: "type=s3,bucket=b,region=r,endpoint_url=" + endpoint), environment: [:])
        #expect(!location.endpoint.hasSuffix("/"), "\(location.endpoint)")
        #expect(location.endpoint.hasPrefix("http://127.0.0.1:9000"))
    }

    @Test func environmentFallbacksAndPrefixes() throws {
        let spec = try SourceSpec(parsing: "type=s3,name=a;b;,prefix=team/,blobs_prefix=b/,manifests_prefix=m/")
        let location = try S3Location(spec: spec, environment: ["AWS_BUCKET": "envbucket", "AWS_REGION": "us-west-2"])
        #expect(location.bucket == "envbucket")
        #expect(location.region == "us-west-2")
        #expect(location.names == ["a", "b"])
        #expect(location.blobKey("sha256:x") == "team/b/sha256:x")
        #expect(location.manifestKey("a") == "team/m/a")
    }

    @Test(arguments: [
        ("type=s3,region=r", "bucket"),
        ("type=s3,bucket=b", "region"),
        ("type=s3,bucket=b,region=r,endpoint_url=ftp://x", "endpoint_url"),
        ("type=s3,bucket=b,region=r,endpoint_url=not a url", "endpoint_url"),
        ("type=s3,bucket=b,region=r,endpoint_url=http://127.0.0.1:99999", "port 99999 is outside 1-65535"),
        ("type=s3,bucket=b,region=r,endpoint_url=http://127.0.0.1:0/", "port 0 is outside 1-65535"),
        ("type=s3,bucket=b,region=r,colour=blue", "colour"),
        ("type=s3,bucket=b,region=r,name=;", "name"),
    ])
    func invalidLocations(_ text: String, _ mentioned: String) throws {
        #expect {
            _ = try S3Location(spec: SourceSpec(parsing: text), environment: [:])
        } throws: { error in
            guard case .configuration(let message) = error as? RemoteStoreError else { return false }
            return message.contains(mentioned) && !message.contains("\n")
        }
    }
}

@Suite struct S3SourceTests {
    let cache = S3Cache()

    @Test func manifestObjectsBecomeDeterministicIndexManifests() throws {
        let fake = FakeS3(bucket: "cache", objects: cache.objects())
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.map(\.tag) == ["main"])
        #expect(snapshot.tags[0].manifest.mediaType == MediaType.ociIndex)
        let manifestDigest = snapshot.tags[0].manifest.digest
        let manifestBytes = try #require(snapshot.smallBlobs[manifestDigest])
        #expect(snapshot.tags[0].manifest.size == Int64(manifestBytes.count))
        let content = try ManifestContent.parse(manifestBytes)
        guard case .index(let type, let manifests) = content else {
            Issue.record("not BuildKit's index variant: \(content)")
            return
        }
        #expect(type == MediaType.ociIndex)
        // The layers, then the cache config, as BuildKit's index variant lists them.
        let config = try #require(manifests.last)
        let layers = Array(manifests.dropLast())
        #expect(content.buildkitCacheConfig == config)
        #expect(config == Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: cache.config), size: Int64(cache.config.count)))
        #expect(snapshot.smallBlobs[config.digest] == cache.config)
        #expect(layers.map(\.digest) == cache.layers.map { Digest.sha256(of: $0) })
        #expect(layers.map(\.size) == cache.layers.map { Int64($0.count) })
        #expect(layers.map { $0.annotations?[Annotation.uncompressed] } == cache.layers.map { Digest.sha256(of: $0 + [1]).description })
        #expect(layers.allSatisfy { $0.annotations?[Annotation.buildkitCreatedAt] == "2025-06-01T10:00:00Z" })
        for layer in cache.layers { #expect(snapshot.lazyBlobs[Digest.sha256(of: layer)] == Int64(layer.count)) }
        // The same object always yields the same manifest.
        #expect(try source.loadSnapshot().tags[0].manifest.digest == manifestDigest)
        // Only the manifest object was read: no blob request at mount.
        #expect(fake.requests.allSatisfy { !$0.url.contains("/blobs/") })
        #expect(fake.requests.allSatisfy { $0.headers["Authorization"]?.hasPrefix("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/") == true })
    }

    @Test func severalNamesAreSeveralTagsAndAMissingOneIsAWarning() throws {
        var objects = cache.objects()
        objects["manifests/dev"] = cache.config
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main;dev;gone,endpoint_url=http://127.0.0.1:9,use_path_style=true",
                                      transport: FakeS3(bucket: "cache", objects: objects))
        let snapshot = try source.loadSnapshot()
        #expect(snapshot.tags.map(\.tag) == ["main", "dev"])
        #expect(snapshot.tags[0].manifest == snapshot.tags[1].manifest)
        #expect(snapshot.warnings.count == 1)
        #expect(snapshot.warnings.first?.contains("gone") == true)
    }

    @Test func missingSizesComeFromOneHeadPerLayer() throws {
        var cache = S3Cache()
        cache.omitSizes = true
        let fake = FakeS3(bucket: "cache", objects: cache.objects())
        let snapshot = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true",
                                        transport: fake).loadSnapshot()
        for layer in cache.layers { #expect(snapshot.lazyBlobs[Digest.sha256(of: layer)] == Int64(layer.count)) }
        #expect(fake.requests.filter { $0.method == "HEAD" }.count == cache.layers.count)
    }

    @Test func blobsStreamWithRangesFromTheBlobKeys() throws {
        let fake = FakeS3(bucket: "cache", objects: cache.objects(prefix: "ci/"))
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,prefix=ci/,endpoint_url=http://127.0.0.1:9,use_path_style=true",
                                      transport: fake)
        let layer = cache.layers[1]
        var received: [UInt8] = []
        var start: Int64 = -1
        try source.streamBlob(Digest.sha256(of: layer), from: 1000, onStart: { start = $0 }, onBody: { received += $0 })
        #expect(start == 1000)
        #expect(received == Array(layer[1000...]))
        let request = try #require(fake.requests.last)
        #expect(request.url == "http://127.0.0.1:9/cache/ci/blobs/sha256%3A\(Digest.sha256(of: layer).hex)")
        #expect(request.headers["Range"] == "bytes=1000-")
        #expect(request.headers["x-amz-content-sha256"] == SigV4.unsignedPayload)
    }

    @Test func virtualHostedAddressingPutsTheBucketInTheHost() throws {
        let fake = FakeS3(bucket: "cache", objects: [:])
        fake.answer("manifests/main", with: .init(status: 404, body: Array("<Error><Code>NoSuchKey</Code></Error>".utf8)))
        let source = try makeS3Source("bucket=cache,region=eu-central-1,name=main", transport: fake)
        #expect(try source.loadSnapshot().warnings.count == 1)
        #expect(fake.requests.first?.url == "https://cache.s3.eu-central-1.amazonaws.com/manifests/main")
    }

    @Test func s3ErrorsBecomeOneLine() throws {
        let cases: [(FakeS3.Reply, (RemoteStoreError) -> Bool)] = [
            (.init(status: 403, body: Array("<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match\nthe signature you provided.</Message></Error>".utf8)),
             { if case .unauthorized(let m) = $0 { return m.contains("SignatureDoesNotMatch") && !m.contains("\n") } else { return false } }),
            (.init(status: 403, body: Array("<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>".utf8)),
             { if case .unauthorized(let m) = $0 { return m.contains("AccessDenied") } else { return false } }),
            (.init(status: 301, headers: HTTPHeaders([("x-amz-bucket-region", "eu-west-2")]),
                   body: Array("<Error><Code>PermanentRedirect</Code><Message>use the right endpoint</Message></Error>".utf8)),
             { if case .configuration(let m) = $0 { return m.contains("region=eu-west-2") } else { return false } }),
            (.init(status: 404, body: Array("<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>".utf8)),
             { if case .configuration(let m) = $0 { return m.contains("NoSuchBucket") } else { return false } }),
        ]
        for (reply, matches) in cases {
            let fake = FakeS3(bucket: "cache", objects: cache.objects())
            fake.answer("manifests/main", with: reply)
            let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
            #expect { try source.loadSnapshot() } throws: { error in
                guard let error = error as? RemoteStoreError else { return false }
                return matches(error) && !error.description.contains("s3cr3t")
            }
        }
    }

    @Test func slowDownIsRetried() throws {
        let fake = FakeS3(bucket: "cache", objects: cache.objects())
        fake.answer("manifests/main", with: .init(status: 503, body: Array("<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>".utf8)), times: 2)
        let snapshot = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true",
                                        transport: fake).loadSnapshot()
        #expect(snapshot.tags.count == 1)
        #expect(fake.requests.filter { $0.url.contains("manifests/main") }.count == 3)
    }

    /// Issue 13: a size no blob can have, from an annotation or a HEAD, fails the mount in a
    /// line that names the blob and the size.
    @Test(arguments: ["-1", "4611686018427387905", "9223372036854775807"])
    func impossibleSizesAreRefused(_ size: String) throws {
        let layer = Digest.sha256(of: cache.layers[0])
        for annotated in [true, false] {
            var objects = cache.objects()
            let fake: FakeS3
            if annotated {
                objects["manifests/main"] = Array(String(decoding: cache.config, as: UTF8.self)
                    .replacing(#""size":\#(cache.layers[0].count)"#, with: #""size":\#(size)"#).utf8)
                fake = FakeS3(bucket: "cache", objects: objects)
            } else {
                var unsized = S3Cache()
                unsized.omitSizes = true
                fake = FakeS3(bucket: "cache", objects: unsized.objects())
                fake.answer(layer.hex, with: .init(status: 200, headers: HTTPHeaders([("Content-Length", size)])))
            }
            let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
            #expect { try source.loadSnapshot() } throws: { error in
                guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
                return message.contains("\(layer) declares \(size) bytes")
            }
        }
    }

    @Test func controlCharactersInS3ErrorsAreEscaped() throws {
        let fake = FakeS3(bucket: "cache", objects: cache.objects())
        fake.answer("manifests/main", with: .init(status: 403, body: Array("<Error><Code>AccessDenied</Code><Message>no\u{1B}]0;owned\u{07}</Message></Error>".utf8)))
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
        #expect { try source.loadSnapshot() } throws: { error in
            guard case .unauthorized(let message) = error as? RemoteStoreError else { return false }
            return message.hasSuffix(#"AccessDenied: no\x1b]0;owned\x07"#)
        }
    }

    // Found by the s3-cache-config fuzz target: a negative size went into the layer's
    // descriptor, so the synthesized manifest did not even parse with ManifestContent.parse.
    @Test func aNegativeLayerSizeIsRejected() throws {
        let layer = #"{"blob":"sha256:\#(String(repeating: "a", count: 64))","parent":-1,"annotations":{"diffID":"sha256:\#(String(repeating: "b", count: 64))","size":-231}}"#
        let fake = FakeS3(bucket: "cache", objects: ["manifests/main": Array(#"{"layers":[\#(layer)]}"#.utf8)])
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
        #expect { try source.loadSnapshot() } throws: { error in
            guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
            return message.contains("declares -231 bytes")
        }
    }

    @Test func aNegativeContentLengthFromHeadIsRejected() throws {
        var cache = S3Cache()
        cache.omitSizes = true
        let fake = FakeS3(bucket: "cache", objects: cache.objects())
        fake.answer("blobs/", with: .init(status: 200, headers: HTTPHeaders([("Content-Length", "-5")])))
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
        #expect { try source.loadSnapshot() } throws: { error in
            guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
            return message.contains("declares -5 bytes")
        }
    }

    @Test func aConfigWithoutDiffIDsIsRejected() throws {
        let bad = Array(#"{"layers":[{"blob":"sha256:\#(String(repeating: "a", count: 64))","parent":-1}]}"#.utf8)
        let fake = FakeS3(bucket: "cache", objects: ["manifests/main": bad])
        let source = try makeS3Source("bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true", transport: fake)
        #expect { try source.loadSnapshot() } throws: { error in
            guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
            return message.contains("diffID")
        }
    }
}
