import Foundation
import HTTPClient
import Logging
import OCI
import RemoteStore
import Synchronization
import Testing

// S3Publisher against moto's S3 server: what it sends (counted by a recording transport),
// what lands in the bucket (read back with S3Source, and through a mount), and how it fails
// (FaultInjectingTransport, moto's signature checking).

private struct FixedCredentials: AWSCredentialProvider {
    var value: AWSCredentials
    func credentials() throws(RemoteStoreError) -> AWSCredentials { value }
}

/// A blob in a file, as the mount hands it to the publisher.
private struct BlobFile {
    var bytes: [UInt8]
    var path: String
    var digest: Digest { Digest.sha256(of: bytes) }
    var size: Int64 { Int64(bytes.count) }

    init(_ ws: Workspace, size: Int, seed: UInt64) throws {
        var generator = SplitMix(seed)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(size + 8)
        while bytes.count < size { withUnsafeBytes(of: generator.next()) { bytes += $0 } }
        bytes.removeLast(bytes.count - size)
        self.bytes = bytes
        path = ws.path("blob-\(seed)")
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }
}

private struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private let quiet = Logger(label: "s3-publisher-test") { _ in SwiftLogNoOpLogHandler() }
private let mebibyte = 1 << 20

private func location(_ moto: MotoS3, bucket: String, names: String = "main") throws -> S3Location {
    try S3Location(spec: SourceSpec(parsing: moto.source(bucket: bucket, names: names)), environment: [:])
}

/// Multipart above 5 MiB, in 5 MiB parts (moto, like S3, wants at least 5 MiB per part).
private func publisher(_ location: S3Location, _ transport: any HTTPTransport, touchRefresh: Duration = .seconds(86_400),
                       parallelism: Int = 4, largestCopy: Int64 = 5 << 30,
                       credentials: AWSCredentials = AWSCredentials(accessKeyID: "testing", secretAccessKey: "testing")) -> S3Publisher {
    S3Publisher(location: location, credentials: FixedCredentials(value: credentials), transport: transport, timeout: .seconds(20),
                logger: quiet, touchRefresh: touchRefresh, multipartThreshold: Int64(5 * mebibyte), partSize: Int64(5 * mebibyte),
                partParallelism: parallelism, largestCopy: largestCopy)
}

private func reader(_ location: S3Location) -> S3Source {
    S3Source(location: location, credentials: FixedCredentials(value: AWSCredentials(accessKeyID: "testing", secretAccessKey: "testing")),
             transport: CurlTransport(), timeout: .seconds(20), logger: quiet)
}

/// The blob's bytes as S3Source streams them from the bucket.
private func readBack(_ source: S3Source, _ digest: Digest) throws -> [UInt8] {
    var bytes: [UInt8] = []
    try source.streamBlob(digest, from: 0, onStart: { _ in }, onBody: { bytes += $0 })
    return bytes
}

/// `…/bk/blobs/sha256%3A<hex>?partNumber=2&uploadId=…` → "partNumber=2".
private func query(_ url: String) -> [String] {
    url.split(separator: "?").dropFirst().first.map { $0.split(separator: "&").map(String.init) } ?? []
}

private func isPart(_ url: String, _ number: Int) -> Bool { query(url).contains("partNumber=\(number)") }

/// S3's error for a part that failed on its side; it passes, so it is retried.
private let internalError = Array("<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>".utf8)

@Suite("S3 publisher against moto")
struct S3PublisherTests {
    @Test("small and multipart uploads read back byte for byte; a second publish sends no blob byte; touchRefresh 0 copies each blob onto itself once")
    func uploadsAndRefreshes() async throws {
        try await withS3Workspace("s3-publish") { ws in
            let moto = try await ws.startMoto()
            let bucket = "bk-publish"
            try await moto.createBucket(bucket, in: ws)
            let place = try location(moto, bucket: bucket)
            let small = try BlobFile(ws, size: 300_000, seed: 1)
            let large = try BlobFile(ws, size: 12 * mebibyte + 12_345, seed: 2)
            let recorder = RecordingTransport(wrapping: CurlTransport())

            // First publish: a PutObject signed with the digest, and a multipart upload of 3 parts.
            let first = publisher(place, recorder)
            #expect(try first.publishBlob(small.digest, size: small.size, contentsAt: small.path) == .uploaded(bytes: small.size))
            let smallRequests = recorder.exchanges
            #expect(smallRequests.map(\.method) == ["HEAD", "PUT"], "\(smallRequests.map(\.url))")
            #expect(smallRequests.last?.bodyBytes == small.size)
            #expect(smallRequests.last?.headers["x-amz-content-sha256"] == small.digest.hex, "the whole blob is signed with its digest")
            recorder.reset()
            #expect(try first.publishBlob(large.digest, size: large.size, contentsAt: large.path) == .uploaded(bytes: large.size))
            let largeRequests = recorder.exchanges
            #expect(largeRequests.map(\.method) == ["HEAD", "POST", "PUT", "PUT", "PUT", "POST"], "\(largeRequests.map(\.url))")
            #expect(query(largeRequests[1].url) == ["uploads="])
            let parts = largeRequests.filter { $0.method == "PUT" }
            #expect(Set(parts.compactMap { query($0.url).first }) == ["partNumber=1", "partNumber=2", "partNumber=3"])
            let sizes = [5 * mebibyte, 5 * mebibyte, 2 * mebibyte + 12_345]
            for (number, size) in sizes.enumerated() {
                let part = try #require(parts.first { isPart($0.url, number + 1) })
                let start = sizes[..<number].reduce(0, +)
                #expect(part.bodyBytes == Int64(size), "part \(number + 1)")
                #expect(part.headers["x-amz-content-sha256"] == Digest.sha256(of: large.bytes[start..<start + size]).hex,
                        "part \(number + 1) is signed with its own SHA-256")
            }
            #expect(largeRequests.last.map { query($0.url).first?.hasPrefix("uploadId=") == true } == true, "CompleteMultipartUpload")
            #expect(largeRequests.reduce(0) { $0 + ($1.method == "PUT" ? $1.bodyBytes : 0) } == large.size)

            let source = reader(place)
            #expect(try readBack(source, small.digest) == small.bytes)
            #expect(try readBack(source, large.digest) == large.bytes)
            #expect(try await moto.multipartUploads(bucket: bucket, in: ws).isEmpty)

            // An object of another size at a blob's key is not the blob: it is replaced.
            let stray = try BlobFile(ws, size: 10, seed: 3)
            #expect(try first.publishBlob(small.digest, size: stray.size, contentsAt: stray.path) == .uploaded(bytes: stray.size))
            #expect(try first.publishBlob(small.digest, size: small.size, contentsAt: small.path) == .uploaded(bytes: small.size))
            #expect(try readBack(source, small.digest) == small.bytes)

            // Again, fresh blobs on S3: one HeadObject each, not a byte of a blob sent.
            recorder.reset()
            for blob in [small, large] {
                #expect(try publisher(place, recorder).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .alreadyPresent)
            }
            #expect(recorder.exchanges.map(\.method) == ["HEAD", "HEAD"], "\(recorder.exchanges.map(\.url))")
            #expect(recorder.exchanges.reduce(0) { $0 + $1.bodyBytes } == 0)

            // touchRefresh 0: every blob is old enough; one CopyObject onto itself each, which
            // S3 dates anew (Last-Modified counts whole seconds).
            let smallKey = place.blobKey(small.digest.description)
            let dated = try await moto.lastModified(bucket: bucket, key: smallKey, in: ws)
            try await Task.sleep(for: .milliseconds(1100))
            recorder.reset()
            let refreshing = publisher(place, recorder, touchRefresh: .zero)
            for blob in [small, large] {
                #expect(try refreshing.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .alreadyPresent)
            }
            let redated = try await moto.lastModified(bucket: bucket, key: smallKey, in: ws)
            #expect(dated != nil && redated != nil && redated != dated, "Last-Modified \(dated ?? "-") → \(redated ?? "-")")
            let copies = recorder.exchanges
            #expect(copies.map(\.method) == ["HEAD", "PUT", "HEAD", "PUT"], "\(copies.map(\.url))")
            for (copy, blob) in zip(copies.filter { $0.method == "PUT" }, [small, large]) {
                #expect(copy.headers["x-amz-copy-source"] == "\(bucket)/blobs/sha256%3A\(blob.digest.hex)")
                #expect(copy.headers["x-amz-metadata-directive"] == "REPLACE")
                #expect(copy.bodyBytes == 0)
            }
            #expect(try readBack(source, small.digest) == small.bytes)
            #expect(try readBack(source, large.digest) == large.bytes)

            // Blobs too large for one CopyObject (the limit lowered from 5 GiB) are copied part by part.
            recorder.reset()
            let partwise = publisher(place, recorder, touchRefresh: .zero, largestCopy: Int64(5 * mebibyte))
            #expect(try partwise.publishBlob(large.digest, size: large.size, contentsAt: large.path) == .alreadyPresent)
            let partCopies = recorder.exchanges
            #expect(partCopies.map(\.method) == ["HEAD", "POST", "PUT", "PUT", "PUT", "POST"], "\(partCopies.map(\.url))")
            let ranges = Set(partCopies.compactMap { $0.headers["x-amz-copy-source-range"] })
            #expect(ranges == ["bytes=0-5242879", "bytes=5242880-10485759", "bytes=10485760-\(large.size - 1)"])
            #expect(partCopies.reduce(0) { $0 + $1.bodyBytes } > 0 && partCopies.filter { $0.method == "PUT" }.allSatisfy { $0.bodyBytes == 0 },
                    "only the CompleteMultipartUpload document has a body")
            #expect(try readBack(source, large.digest) == large.bytes)
            #expect(try await moto.multipartUploads(bucket: bucket, in: ws).isEmpty)
        }
    }

    @Test("publishTag writes BuildKit's S3 object; S3Source and a mount show the tag with its layers, sizes and config")
    func tagsReadBack() async throws {
        try await withS3Workspace("s3-publish-tag") { ws in
            let moto = try await ws.startMoto()
            let bucket = "bk-publish-tag"
            try await moto.createBucket(bucket, in: ws)
            let place = try location(moto, bucket: bucket, names: "main;old")
            let layers = [try BlobFile(ws, size: 200_000, seed: 11), try BlobFile(ws, size: 6 * mebibyte, seed: 12),
                          try BlobFile(ws, size: 50_000, seed: 13)]
            let descriptors = layers.enumerated().map { index, layer in
                Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: layer.digest, size: layer.size,
                           annotations: [Annotation.uncompressed: Digest.sha256(of: layer.bytes + [UInt8(index)]).description,
                                         Annotation.buildkitCreatedAt: "2026-12-02T12:25:33.\(index)00000000Z"])
            }
            // Layer 2 is built on layer 0, layer 1 on layer 2 (`parent` absent means entry 0).
            let config = Array("""
                {"layers":[{"blob":"\(layers[0].digest)","parent":-1},{"blob":"\(layers[1].digest)","parent":2},\
                {"blob":"\(layers[2].digest)"}],"records":[{"layers":[{"layer":1,"createdAt":"2026-12-02T12:25:33.6Z"}],\
                "digest":"\(Digest.sha256(of: [9]))","inputs":[[{"selector":"sha256:x","link":1}]]},{"digest":"\(Digest.sha256(of: [8]))"}]}
                """.utf8)
            let configDescriptor = Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: config), size: Int64(config.count))
            let imageManifest = BuildKitVariant.imageManifest(config: configDescriptor, layers: descriptors)
            let indexManifest = BuildKitS3Cache.indexManifest(layers: descriptors, cacheConfig: configDescriptor)

            let recorder = RecordingTransport(wrapping: CurlTransport())
            let publisher = publisher(place, recorder)
            for layer in layers { _ = try publisher.publishBlob(layer.digest, size: layer.size, contentsAt: layer.path) }
            for (tag, manifest, type) in [("main", imageManifest, MediaType.ociManifest), ("old", indexManifest, MediaType.ociIndex)] {
                try publisher.publishTag(tag, manifest: Descriptor(mediaType: type, digest: Digest.sha256(of: manifest), size: Int64(manifest.count)),
                                         manifestBytes: manifest, smallBlob: { $0 == configDescriptor.digest ? config : nil })
            }
            #expect(moto.requests("PUT", bucket: bucket, key: "manifests/main").map(\.status) == [200])
            #expect(moto.requests("PUT", bucket: bucket, key: "manifests/old").map(\.status) == [200])

            // Both variants give the same S3 object; S3Source shows it as the index variant.
            let snapshot = try reader(place).loadSnapshot()
            #expect(snapshot.tags.map(\.tag) == ["main", "old"])
            #expect(snapshot.tags.map(\.manifest.digest) == [snapshot.tags[0].manifest.digest, snapshot.tags[0].manifest.digest])
            let shown = try BuildKitS3Cache.parts(of: ManifestContent.parse(#require(snapshot.smallBlobs[snapshot.tags[0].manifest.digest])))
            #expect(shown.layers == descriptors, "layers, sizes, diffIDs and creation times as the manifest gave them")
            for layer in layers { #expect(snapshot.lazyBlobs[layer.digest] == layer.size) }
            let object = try #require(snapshot.smallBlobs[shown.cacheConfig.digest])
            #expect(CacheChains.successors(inConfig: object) == CacheChains.successors(inConfig: config))
            #expect(try OrderedJSON.parse(object)["records"] == OrderedJSON.parse(config)["records"])

            // A mount of the published cache: buildctl's import replay finds the layers and the config.
            let mount = try await ws.mountS3ExpectingSuccess(moto.source(bucket: bucket, names: "main", extra: S3Tests.attributeKeys))
            let outcome = try BuildctlImport.run(mount.mountpoint, tag: "main")
            #expect(outcome.cacheConfig == object)
            #expect(outcome.layers.map(\.digest) == layers.map(\.digest.description))
            #expect(outcome.layers.map(\.bytes) == layers.map(\.bytes))
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("a failed part is sent again; a part that keeps failing aborts the upload and leaves the published tag as it was")
    func partFailures() async throws {
        try await withS3Workspace("s3-publish-faults") { ws in
            let moto = try await ws.startMoto()
            let bucket = "bk-publish-faults"
            try await moto.createBucket(bucket, in: ws)
            let place = try location(moto, bucket: bucket)
            let source = reader(place)
            let large = try BlobFile(ws, size: 11 * mebibyte, seed: 21)
            let faults = FaultInjectingTransport(wrapping: CurlTransport())

            // One 500 for part 2 (and a slow part 1, so that parts overlap): sent again, the object is right.
            faults.inject(.status(500, body: internalError), times: 1) { $0.method == "PUT" && isPart($0.url, 2) }
            faults.inject(.delay(.milliseconds(300)), times: 1) { $0.method == "PUT" && isPart($0.url, 1) }
            let recorder = RecordingTransport(wrapping: faults)
            #expect(try publisher(place, recorder, parallelism: 2).publishBlob(large.digest, size: large.size, contentsAt: large.path)
                    == .uploaded(bytes: large.size))
            let partTwo = faults.requests.filter { $0.method == "PUT" && isPart($0.url, 2) }
            #expect(partTwo.map(\.fault) == [.status(500, body: internalError), nil], "part 2 failed once, then went through")
            #expect(recorder.mostInFlight == 2, "two parts at a time: \(recorder.mostInFlight)")
            #expect(try readBack(source, large.digest) == large.bytes)
            #expect(try await moto.multipartUploads(bucket: bucket, in: ws).isEmpty)

            // A published tag, then a blob whose part 2 always fails.
            let layer = try BlobFile(ws, size: 10_000, seed: 22)
            let config = Array(#"{"layers":[{"blob":"\#(layer.digest)","parent":-1}],"records":[{"digest":"\#(Digest.sha256(of: [1]))","layers":[{"layer":0}]}]}"#.utf8)
            let configDescriptor = Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: config), size: Int64(config.count))
            let manifest = BuildKitVariant.imageManifest(config: configDescriptor, layers: [
                Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: layer.digest, size: layer.size,
                           annotations: [Annotation.uncompressed: Digest.sha256(of: [2]).description]),
            ])
            let steady = publisher(place, faults)
            _ = try steady.publishBlob(layer.digest, size: layer.size, contentsAt: layer.path)
            try steady.publishTag("main", manifest: Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: manifest), size: Int64(manifest.count)),
                                  manifestBytes: manifest, smallBlob: { $0 == configDescriptor.digest ? config : nil })
            let before = try source.loadSnapshot()

            let doomed = try BlobFile(ws, size: 11 * mebibyte, seed: 23)
            faults.removeAllFaults()
            faults.clearLog()
            faults.inject(.status(500, body: internalError)) { $0.method == "PUT" && isPart($0.url, 2) }
            #expect { try steady.publishBlob(doomed.digest, size: doomed.size, contentsAt: doomed.path) } throws: { error in
                guard case .server(let message) = error as? RemoteStoreError else { return false }
                return message.contains("InternalError") && !message.contains("\n") && (error as? RemoteStoreError)?.isTransient == true
            }
            let log = faults.requests
            #expect(log.filter { $0.method == "PUT" && isPart($0.url, 2) }.count == 3, "three attempts at part 2: \(log.map(\.url))")
            #expect(log.filter { $0.method == "DELETE" && query($0.url).contains { $0.hasPrefix("uploadId=") } }.count == 1, "AbortMultipartUpload")
            #expect(!log.contains { $0.method == "POST" && query($0.url).contains { $0.hasPrefix("uploadId=") } }, "never completed")
            #expect(try await moto.multipartUploads(bucket: bucket, in: ws).isEmpty, "the abort removed the parts")
            #expect(try await moto.lastModified(bucket: bucket, key: place.blobKey(doomed.digest.description), in: ws) == nil)
            let after = try source.loadSnapshot()
            #expect(after.tags == before.tags && after.smallBlobs == before.smallBlobs, "the published tag is unchanged")
        }
    }

    @Test("a refused credential is one clear error after one request; moto's signature checker accepts the right key's tag PUT")
    func refusedCredentials() async throws {
        try await withS3Workspace("s3-publish-auth") { ws in
            let moto = try await ws.startMoto()
            let bucket = "bk-publish-auth"
            try await moto.createBucket(bucket, in: ws)
            let key = try await moto.enableSignatureChecking(in: ws)
            let place = try location(moto, bucket: bucket)
            let blob = try BlobFile(ws, size: 1000, seed: 31)
            let config = Array(#"{"layers":[{"blob":"\#(blob.digest)","parent":-1}]}"#.utf8)
            let configDescriptor = Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: config), size: Int64(config.count))
            let manifest = BuildKitS3Cache.indexManifest(layers: [
                Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: blob.digest, size: blob.size,
                           annotations: [Annotation.uncompressed: Digest.sha256(of: [3]).description]),
            ], cacheConfig: configDescriptor)
            let manifestDescriptor = Descriptor(mediaType: MediaType.ociIndex, digest: Digest.sha256(of: manifest), size: Int64(manifest.count))
            func publishTag(_ publisher: S3Publisher) throws {
                try publisher.publishTag("main", manifest: manifestDescriptor, manifestBytes: manifest,
                                         smallBlob: { $0 == configDescriptor.digest ? config : nil })
            }

            let recorder = RecordingTransport(wrapping: CurlTransport())
            let wrong = publisher(place, recorder, credentials: AWSCredentials(accessKeyID: key.keyID, secretAccessKey: "not-the-secret"))
            #expect { try wrong.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) } throws: { error in
                guard case .unauthorized(let message) = error as? RemoteStoreError else { return false }
                return message.contains("403") && !message.contains("\n") && !message.contains("not-the-secret")
            }
            #expect(recorder.exchanges.map(\.method) == ["HEAD"], "refused at once, not retried: \(recorder.exchanges.map(\.url))")
            recorder.reset()
            #expect { try publishTag(wrong) } throws: { error in
                guard case .unauthorized(let message) = error as? RemoteStoreError else { return false }
                return message.contains("SignatureDoesNotMatch") && !message.contains("\n") && !message.contains("not-the-secret")
            }
            #expect(recorder.exchanges.map(\.method) == ["PUT"], "\(recorder.exchanges.map(\.url))")
            #expect(moto.requests("PUT", bucket: bucket, key: "manifests/main").map(\.status) == [403])

            // The right key: moto checks the signature (over the body's SHA-256) and stores the object.
            try publishTag(publisher(place, recorder, credentials: AWSCredentials(accessKeyID: key.keyID, secretAccessKey: key.secret)))
            #expect(moto.requests("PUT", bucket: bucket, key: "manifests/main").map(\.status) == [403, 200])
        }
    }
}

extension S3PublisherTests {
    /// moto's own checker refuses every correctly signed request for a key holding `:` (see
    /// S3Tests.motoSignatureChecking), and every blob key holds one; the verifying proxy checks
    /// each request with botocore's signer instead, and each body against its signed SHA-256.
    @Test("every request of a publish (PutObject, multipart parts, copies, abort, the tag) is signed right and its body matches its signed SHA-256")
    func signaturesVerifiedByBotocore() async throws {
        try await withS3Workspace("s3-publish-sig") { ws in
            let moto = try await ws.startMoto()
            let bucket = "bk-publish-sig"
            try await moto.createBucket(bucket, in: ws)
            let keyID = "AKIAPUBLISHVERIFIED1", secret = "publish/Secret+Key=42"
            let credentials = AWSCredentials(accessKeyID: keyID, secretAccessKey: secret)
            let proxy = try await ws.startVerifyingProxy(moto, keyID: keyID, secret: secret)
            let place = try S3Location(spec: SourceSpec(parsing: S3Spec.source(endpoint: proxy.endpoint, bucket: bucket, names: "main")),
                                       environment: [:])
            let small = try BlobFile(ws, size: 100_000, seed: 41)
            let large = try BlobFile(ws, size: 11 * mebibyte, seed: 42)
            let faults = FaultInjectingTransport(wrapping: CurlTransport())

            for blob in [small, large] {
                #expect(try publisher(place, faults, credentials: credentials).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
                        == .uploaded(bytes: blob.size))
                #expect(try publisher(place, faults, touchRefresh: .zero, largestCopy: Int64(5 * mebibyte), credentials: credentials)
                    .publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .alreadyPresent)
            }
            let config = Array(#"{"layers":[{"blob":"\#(small.digest)","parent":-1},{"blob":"\#(large.digest)"}]}"#.utf8)
            let configDescriptor = Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: Digest.sha256(of: config), size: Int64(config.count))
            let manifest = BuildKitS3Cache.indexManifest(layers: [small, large].map { blob in
                Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: blob.digest, size: blob.size,
                           annotations: [Annotation.uncompressed: Digest.sha256(of: blob.bytes.prefix(10)).description])
            }, cacheConfig: configDescriptor)
            try publisher(place, faults, credentials: credentials).publishTag(
                "main", manifest: Descriptor(mediaType: MediaType.ociIndex, digest: Digest.sha256(of: manifest), size: Int64(manifest.count)),
                manifestBytes: manifest, smallBlob: { $0 == configDescriptor.digest ? config : nil })

            // An upload whose part 2 never gets through: the abort is signed right too.
            let doomed = try BlobFile(ws, size: 11 * mebibyte, seed: 43)
            faults.inject(.failConnection) { $0.method == "PUT" && isPart($0.url, 2) }
            #expect(throws: RemoteStoreError.self) {
                try publisher(place, faults, credentials: credentials).publishBlob(doomed.digest, size: doomed.size, contentsAt: doomed.path)
            }

            let verdicts = proxy.verdicts()
            #expect(!verdicts.isEmpty && verdicts.allSatisfy { $0.verdict == "OK" }, "\(verdicts)")
            let kinds = Set(verdicts.map { verdict in
                verdict.method + (verdict.path.contains("?uploads=") ? " uploads" : verdict.path.contains("partNumber=") ? " part"
                                  : verdict.path.contains("uploadId=") ? " upload" : "")
            })
            #expect(kinds == ["HEAD", "PUT", "PUT part", "POST uploads", "POST upload", "DELETE upload"], "\(kinds)")
            let source = S3Source(location: place, credentials: FixedCredentials(value: credentials), transport: CurlTransport(),
                                  timeout: .seconds(20), logger: quiet)
            #expect(try readBack(source, large.digest) == large.bytes)
            #expect(try source.loadSnapshot().tags.map(\.tag) == ["main"])

            // The proxy does refuse: a wrong secret's first request.
            #expect(throws: RemoteStoreError.self) {
                try publisher(place, faults, credentials: AWSCredentials(accessKeyID: keyID, secretAccessKey: "wrong"))
                    .publishBlob(small.digest, size: small.size, contentsAt: small.path)
            }
            #expect(proxy.verdicts().last?.verdict == "SignatureDoesNotMatch")
        }
    }
}

/// BuildKit's image-manifest variant (v0.21 and later by default), as v0.32.2 writes it.
enum BuildKitVariant {
    static func imageManifest(config: Descriptor, layers: [Descriptor]) -> [UInt8] {
        func json(_ descriptor: Descriptor) -> String {
            var text = #"{"mediaType":"\#(descriptor.mediaType)","digest":"\#(descriptor.digest)","size":\#(descriptor.size)"#
            if let annotations = descriptor.annotations {
                text += #","annotations":{"# + annotations.sorted { $0.key < $1.key }.map { #""\#($0.key)":"\#($0.value)""# }.joined(separator: ",") + "}"
            }
            return text + "}"
        }
        return Array(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":\#(json(config)),"layers":[\#(layers.map(json).joined(separator: ","))]}"#.utf8)
    }
}
