import Foundation
import HTTPClient
import Logging
import OCI
import Synchronization
import Testing

@testable import RemoteStore

// The publisher's decisions on canned answers; tests/IntegrationTests/S3PublisherTests.swift
// runs it against moto.

private func makePublisher(_ transport: any HTTPTransport) throws -> S3Publisher {
    let location = try S3Location(spec: SourceSpec(parsing: "type=s3,bucket=cache,region=us-east-1,name=main,endpoint_url=http://127.0.0.1:9,use_path_style=true"),
                                  environment: [:])
    return S3Publisher(location: location, credentials: StaticCredentials(), transport: transport, timeout: .seconds(2),
                       logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
}

/// FakeS3, except that a PutObject with a streamed body is read as a transport sends it, and
/// kept when its whole body was read.
private final class StreamStoringS3: HTTPTransport {
    let fake: FakeS3
    let stored = Mutex<[String: [UInt8]]>([:])

    init(wrapping fake: FakeS3) { self.fake = fake }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        guard request.method == "PUT", case .stream(let stream)? = request.body else {
            return try fake.execute(request, onResponse: onResponse, onBody: onBody)
        }
        var bytes: [UInt8] = []
        var piece = [UInt8](repeating: 0, count: 3)
        while true {
            // A body that throws cuts the request: S3 keeps nothing of it.
            let got = try piece.withUnsafeMutableBytes { try stream.next(into: $0) }
            if got == 0 { break }
            bytes += piece[..<got]
        }
        stored.withLock { $0[request.url] = bytes }
        try onResponse(HTTPResponseHead(status: 200, headers: HTTPHeaders([("Content-Length", "0")])))
    }
}

@Suite struct S3PublisherUnitTests {
    /// The client announced the blob's digest with a size that is not the committed file's
    /// (`total` lied): the PutObject's last byte waits for the commit, which is not the
    /// announced blob, so S3 never stores a prefix under the blob's name.
    @Test(arguments: [10, 5])
    func anEarlyUploadSendsItsLastByteOnlyForTheAnnouncedDigestAndSize(announcedSize: Int64) throws {
        let bytes = (0..<10).map { UInt8($0) }
        let digest = Digest.sha256(of: bytes)
        let transport = StreamStoringS3(wrapping: FakeS3(bucket: "cache", objects: [:]))
        let contents = TestGrowingContents(announced: AnnouncedBlob(digest: digest, size: announcedSize))
        let upload = try #require(try makePublisher(transport).beginEarlyUpload(of: contents))
        contents.append(bytes)
        contents.seal()
        upload.run()
        let stored = transport.stored.withLock { $0 }.filter { $0.key.contains(digest.hex) }
        if announcedSize == 10 {
            #expect(Array(stored.values) == [bytes], "the announced blob, whole")
        } else {
            #expect(stored.isEmpty, "a prefix stored under the blob's name: \(stored)")
        }
    }

    @Test func lastModifiedDatesAreRead() {
        #expect(S3Publisher.httpDate("Wed, 21 Oct 2015 07:28:00 GMT") == Date(timeIntervalSince1970: 1_445_412_480))
        #expect(S3Publisher.httpDate("Tue, 02 Dec 2025 19:00:59 GMT") == Date(timeIntervalSince1970: 1_764_702_059))
        for text in ["", "Wed, 21 Oct 2015 07:28:00 UTC", "Wed, 21 Foo 2015 07:28:00 GMT", "2015-10-21T07:28:00Z", "Wed, 21 Oct 2015 07:28 GMT"] {
            #expect(S3Publisher.httpDate(text) == nil, "\(text)")
        }
    }

    /// CopyObject answers 200 at once and may report a failure in the body: that is a failure,
    /// retried like a 500. An object of unknown age (no Last-Modified) is refreshed.
    @Test func anErrorInsideA200IsAFailure() throws {
        let blob: [UInt8] = Array(repeating: 5, count: 100)
        let digest = Digest.sha256(of: blob)
        let fake = FakeS3(bucket: "cache", objects: ["blobs/\(digest)": blob])
        let faults = FaultInjectingTransport(wrapping: fake)
        let slowDown = Array("<?xml version=\"1.0\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>".utf8)
        faults.inject(.status(200, body: slowDown), times: 1) { $0.headers["x-amz-copy-source"] != nil }
        #expect(try makePublisher(faults).publishBlob(digest, size: 100, contentsAt: "/nonexistent") == .alreadyPresent)
        #expect(faults.requests.map(\.method) == ["HEAD", "PUT", "PUT"])

        faults.clearLog()
        faults.inject(.status(200, body: slowDown)) { $0.headers["x-amz-copy-source"] != nil }
        #expect { try makePublisher(faults).publishBlob(digest, size: 100, contentsAt: "/nonexistent") } throws: { error in
            guard case .server(let message) = error as? RemoteStoreError else { return false }
            return message == "cache/blobs/\(digest): HTTP 200 SlowDown: Please reduce your request rate."
        }
        #expect(faults.requests.map(\.method) == ["HEAD", "PUT", "PUT", "PUT"], "three attempts, then the error")
    }

    /// A blob file that is not the blob it is said to be is refused before anything is sent.
    @Test func aBlobFileOfTheWrongSizeIsRefused() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("s3publisher-\(UUID().uuidString)").path
        try Data(repeating: 1, count: 10).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let fake = FakeS3(bucket: "cache", objects: [:])
        let digest = Digest.sha256(of: [1])
        for (file, reason) in [(path, "holds 10 bytes, not the 11"), ("/nonexistent/blob", "cannot open blob")] {
            #expect { try makePublisher(fake).publishBlob(digest, size: 11, contentsAt: file) } throws: { error in
                guard case .invalidContent(let message) = error as? RemoteStoreError else { return false }
                return message.contains(reason) && !message.contains("\n")
            }
        }
        #expect(fake.requests.map(\.method) == ["HEAD", "HEAD"], "only the HeadObjects that found no object")
    }
}
