import Dispatch
import Foundation
@testable import HTTPClient
import Synchronization
import Testing

private struct HandlerError: Error, Equatable {
    var id: Int
}

/// Records what the handlers saw, checking the protocol's ordering rules as it goes.
private final class Recorder {
    var heads: [HTTPResponseHead] = []
    var body: [UInt8] = []
    var chunks = 0
    var bodyBeforeHead = false

    func onResponse(_ head: HTTPResponseHead) { heads.append(head) }

    func onBody(_ chunk: UnsafeRawBufferPointer) {
        if heads.isEmpty { bodyBeforeHead = true }
        chunks += 1
        body.append(contentsOf: chunk)
    }

    func run(_ transport: any HTTPTransport, _ request: HTTPRequest) throws {
        try transport.execute(request, onResponse: onResponse, onBody: onBody)
    }
}

@Suite("CurlTransport against a local HTTP server")
struct CurlTransportTests {
    let transport = CurlTransport()

    @Test func getWholeBodyIsByteExact() throws {
        try withFixtureServer { server throws in
            let size = 1_000_003
            let recorder = Recorder()
            try recorder.run(transport, HTTPRequest(url: server.url("/blob/\(size)")))
            #expect(recorder.heads.count == 1)
            #expect(recorder.heads.first?.status == 200)
            #expect(recorder.heads.first?.headers["content-length"] == String(size))
            #expect(!recorder.bodyBeforeHead)
            #expect(recorder.body.count == size)
            #expect(recorder.body == pattern(0..<size))
        }
    }

    @Test func largeBodyStreamsFromCurlsBuffer() throws {
        try withFixtureServer { server throws in
            let size = 32 << 20
            let bufferSize = 128 * 1024
            let transport = CurlTransport(receiveBufferSize: bufferSize)
            // Checked chunk by chunk with memcmp against the pattern (a byte loop is slow in debug builds).
            let reference = pattern(0..<(bufferSize + 251))
            var received = 0
            var chunks = 0
            var largest = 0
            var mismatch: Int?
            var heads = 0
            try transport.execute(HTTPRequest(url: server.url("/blob/\(size)")), onResponse: { head in
                heads += 1
                #expect(head.status == 200)
                #expect(received == 0)
            }, onBody: { chunk in
                chunks += 1
                largest = max(largest, chunk.count)
                if mismatch == nil, chunk.count <= bufferSize {
                    let same = reference.withUnsafeBytes { ref in
                        memcmp(chunk.baseAddress!, ref.baseAddress! + received % 251, chunk.count) == 0
                    }
                    if !same { mismatch = received }
                }
                received += chunk.count
            })
            #expect(heads == 1)
            #expect(received == size)
            #expect(mismatch == nil)
            #expect(chunks > 1)
            #expect(largest <= bufferSize)
        }
    }

    @Test func rangeGetAnswers206WithTheRightBytes() throws {
        try withFixtureServer { server throws in
            let size = 100_000
            func get(_ range: String) throws -> HTTPResponse {
                try transport.fetch(HTTPRequest(url: server.url("/blob/\(size)"),
                                                headers: HTTPHeaders([(name: "Range", value: range)])),
                                    maxBodyBytes: size)
            }
            let middle = try get("bytes=1000-1999")
            #expect(middle.status == 206)
            #expect(middle.headers["Content-Range"] == "bytes 1000-1999/\(size)")
            #expect(middle.body == pattern(1000..<2000))

            let openEnded = try get("bytes=99990-")
            #expect(openEnded.status == 206)
            #expect(openEnded.body == pattern(99_990..<size))

            let suffix = try get("bytes=-7")
            #expect(suffix.status == 206)
            #expect(suffix.body == pattern(size - 7..<size))

            let pastEnd = try get("bytes=\(size)-")
            #expect(pastEnd.status == 416)
            #expect(pastEnd.headers["Content-Range"] == "bytes */\(size)")
        }
    }

    @Test func headReturnsHeadersAndNoBody() throws {
        try withFixtureServer { server throws in
            let recorder = Recorder()
            try recorder.run(transport, HTTPRequest(method: "HEAD", url: server.url("/blob/12345")))
            #expect(recorder.heads.count == 1)
            #expect(recorder.heads.first?.status == 200)
            #expect(recorder.heads.first?.headers["Content-Length"] == "12345")
            #expect(recorder.heads.first?.headers["accept-ranges"] == "bytes")
            #expect(recorder.chunks == 0)
            // The connection stays usable after a HEAD (no body expected on it).
            let after = try transport.fetch(HTTPRequest(url: server.url("/blob/10")), maxBodyBytes: 100)
            #expect(after.body == pattern(0..<10))
            #expect(try server.stats(via: transport).connections == 1)
        }
    }

    @Test func putBodyIsReceivedByteExact() throws {
        try withFixtureServer { server throws in
            var body = [UInt8](repeating: 0, count: (1 << 20) + 17)
            body.withUnsafeMutableBytes { buffer in
                var generator = SystemRandomNumberGenerator()
                for i in stride(from: 0, to: buffer.count - 7, by: 8) {
                    buffer.storeBytes(of: generator.next() as UInt64, toByteOffset: i, as: UInt64.self)
                }
            }
            body[body.count - 1] = 0xA5
            let response = try transport.fetch(HTTPRequest(method: "PUT", url: server.url("/echo"), body: .bytes(body)),
                                               maxBodyBytes: 2 << 20)
            #expect(response.status == 201)
            #expect(response.headers["X-Method"] == "PUT")
            #expect(response.headers["X-Content-Length"] == String(body.count))
            #expect(response.headers["X-Expect"] == "none")
            #expect(response.headers["X-Content-Type"] == "none")
            #expect(response.body == body)
        }
    }

    @Test func fileRangeBodiesAreSentByteExactWithoutChunkedFraming() throws {
        let bytes = (0..<(3 << 20) + 5).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("body-\(UUID().uuidString)").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let descriptor = open(path, O_RDONLY)
        #expect(descriptor >= 0)
        defer { close(descriptor) }
        try withFixtureServer { server throws in
            for (method, offset, length) in [("PUT", 0, bytes.count), ("PATCH", 1_000_001, 2 << 20), ("POST", 7, 1)] {
                let response = try transport.fetch(
                    HTTPRequest(method: method, url: server.url("/echo"),
                                body: .fileRange(descriptor: descriptor, offset: Int64(offset), length: Int64(length))),
                    maxBodyBytes: 4 << 20)
                #expect(response.headers["X-Method"] == method)
                #expect(response.headers["X-Content-Length"] == String(length))
                #expect(response.headers["X-Expect"] == "none")
                #expect(response.headers["X-Content-Type"] == "none")
                #expect(response.body == Array(bytes[offset..<offset + length]))
            }
        }
    }

    @Test func aFileShorterThanItsRangeFailsTheExchange() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("short-\(UUID().uuidString)").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 1, count: 1000)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let descriptor = open(path, O_RDONLY)
        defer { close(descriptor) }
        try withFixtureServer { server throws in
            #expect(throws: HTTPTransportError.self) {
                _ = try transport.fetch(HTTPRequest(method: "PUT", url: server.url("/echo"),
                                                    body: .fileRange(descriptor: descriptor, offset: 500, length: 1000)),
                                        maxBodyBytes: 1 << 20)
            }
            // The transport stays usable after the aborted upload.
            let after = try transport.fetch(HTTPRequest(url: server.url("/blob/10")), maxBodyBytes: 100)
            #expect(after.body == pattern(0..<10))
        }
    }

    @Test func bodylessMethodsAndEmptyBodies() throws {
        try withFixtureServer { server throws in
            func echo(_ method: String, _ body: [UInt8]?, headers: HTTPHeaders = HTTPHeaders()) throws -> HTTPResponse {
                try transport.fetch(HTTPRequest(method: method, url: server.url("/echo"), headers: headers, body: body.map { .bytes($0) }),
                                    maxBodyBytes: 1 << 20)
            }
            let emptyPut = try echo("PUT", [])
            #expect(emptyPut.headers["X-Method"] == "PUT")
            #expect(emptyPut.headers["X-Content-Length"] == "0")

            let nilPut = try echo("PUT", nil)
            #expect(nilPut.headers["X-Content-Length"] == "0")

            let emptyPost = try echo("POST", nil)
            #expect(emptyPost.headers["X-Method"] == "POST")
            #expect(emptyPost.headers["X-Content-Length"] == "0")
            #expect(emptyPost.headers["X-Content-Type"] == "none")

            let post = try echo("POST", Array("{\"a\":1}".utf8),
                                headers: HTTPHeaders([(name: "Content-Type", value: "application/json")]))
            #expect(post.headers["X-Content-Type"] == "application/json")
            #expect(post.body == Array("{\"a\":1}".utf8))

            let patch = try echo("PATCH", [1, 2, 3])
            #expect(patch.headers["X-Method"] == "PATCH")
            #expect(patch.body == [1, 2, 3])

            let delete = try echo("DELETE", nil)
            #expect(delete.status == 200)
            #expect(delete.headers["X-Method"] == "DELETE")
            #expect(delete.headers["X-Content-Length"] == "none")
            #expect(delete.body.isEmpty)

            // All of it over one kept-alive connection.
            #expect(try server.stats(via: transport).connections == 1)
        }
    }

    @Test func requestHeadersAreSent() throws {
        try withFixtureServer { server throws in
            var headers = HTTPHeaders()
            headers.add("Authorization", "Bearer abc.def")
            headers.add("X-Empty", "")
            headers.add("X-Multi", "one")
            headers.add("X-Multi", "two")
            let response = try transport.fetch(HTTPRequest(url: server.url("/headers"), headers: headers),
                                               maxBodyBytes: 1 << 16)
            let seen = try #require(try JSONSerialization.jsonObject(with: Data(response.body)) as? [[String]])
            let pairs = seen.map { ($0[0].lowercased(), $0[1]) }
            #expect(pairs.contains { $0 == ("authorization", "Bearer abc.def") })
            #expect(pairs.contains { $0 == ("x-empty", "") })
            #expect(pairs.filter { $0.0 == "x-multi" }.map(\.1) == ["one", "two"])
            #expect(!pairs.contains { $0.0 == "expect" })
            #expect(!pairs.contains { $0.0 == "accept-encoding" })
        }
    }

    @Test func headerInjectionIsRejectedWithoutEchoingTheValue() throws {
        try withFixtureServer { server throws in
            let secret = "s3cr3t\r\nX-Evil: 1"
            let error = transportError {
                _ = try transport.fetch(HTTPRequest(url: server.url("/blob/1"),
                                                    headers: HTTPHeaders([(name: "Authorization", value: secret)])),
                                        maxBodyBytes: 10)
            }
            guard case .invalidRequest(let message)? = error else {
                Issue.record("expected invalidRequest, got \(String(describing: error))")
                return
            }
            #expect(!message.contains("s3cr3t"))
            #expect(try server.stats(via: transport).requests == 0)
        }
    }

    @Test func connectionsAreReused() throws {
        try withFixtureServer { server throws in
            let requests = 6
            for i in 0..<requests {
                let response = try transport.fetch(HTTPRequest(url: server.url("/blob/\(100 + i)")), maxBodyBytes: 1000)
                #expect(response.body == pattern(0..<(100 + i)))
            }
            let stats = try server.stats(via: transport)
            #expect(stats.requests == requests)
            #expect(stats.connections == 1)
        }
    }

    @Test func concurrentRequestsShareTheTransportSafely() throws {
        try withFixtureServer { server throws in
            let transport = CurlTransport(maxIdleHandles: 4)
            let size = 300_000
            let workers = 8, perWorker = 4
            let failures = Mutex(0)
            DispatchQueue.concurrentPerform(iterations: workers) { worker in
                for round in 0..<perWorker {
                    let start = (worker * 7919 + round * 104_729) % (size - 5000)
                    let request = HTTPRequest(url: server.url("/blob/\(size)"),
                                              headers: HTTPHeaders([(name: "Range", value: "bytes=\(start)-\(start + 4999)")]))
                    let ok = (try? transport.fetch(request, maxBodyBytes: size))
                        .map { $0.status == 206 && $0.body == pattern(start..<start + 5000) } ?? false
                    if !ok { failures.withLock { $0 += 1 } }
                }
            }
            #expect(failures.withLock { $0 } == 0)
            let stats = try server.stats(via: transport)
            #expect(stats.requests == workers * perWorker)
            #expect(stats.connections < workers * perWorker)
        }
    }

    @Test func stallAfterHeadersTimesOut() throws {
        try withFixtureServer { server throws in
            for path in ["/stall-headers", "/stall-body"] {
                let recorder = Recorder()
                let (error, elapsed) = timed {
                    transportError {
                        try recorder.run(transport, HTTPRequest(url: server.url(path), stallTimeout: .seconds(1)))
                    }
                }
                guard case .timedOut? = error else {
                    Issue.record("\(path): expected timedOut, got \(String(describing: error))")
                    continue
                }
                #expect(elapsed >= 0.9, "\(path)")
                #expect(elapsed < 5, "\(path)")
                if path == "/stall-body" {
                    #expect(recorder.heads.count == 1)
                    #expect(recorder.body == pattern(0..<10))
                }
            }
        }
    }

    @Test func slowButSteadyTransferIsNotAStall() throws {
        try withFixtureServer { server throws in
            // 10 chunks 250 ms apart: 2.25 s in all, longer than the stall timeout, but never
            // 2 s without a byte (the margin absorbs a loaded test machine).
            let response = try transport.fetch(
                HTTPRequest(url: server.url("/slow?chunks=10&interval_ms=250"), stallTimeout: .seconds(2)),
                maxBodyBytes: 1000)
            #expect(response.status == 200)
            #expect(response.body == pattern(0..<100))
        }
    }

    @Test func totalTimeoutBoundsTheWholeExchange() throws {
        try withFixtureServer { server throws in
            let (error, elapsed) = timed {
                transportError {
                    _ = try transport.fetch(
                        HTTPRequest(url: server.url("/slow?chunks=20&interval_ms=100"), stallTimeout: .seconds(5),
                                    totalTimeout: .milliseconds(400)),
                        maxBodyBytes: 1000)
                }
            }
            guard case .timedOut? = error else {
                Issue.record("expected timedOut, got \(String(describing: error))")
                return
            }
            #expect(elapsed < 1.5)
        }
    }

    @Test func refusedConnectionIsConnectionFailed() throws {
        let port = try closedPort()
        let error = transportError {
            _ = try transport.fetch(
                HTTPRequest(url: "http://127.0.0.1:\(port)/x",
                            headers: HTTPHeaders([(name: "Authorization", value: "Bearer TOPSECRET")]),
                            stallTimeout: .seconds(2)),
                maxBodyBytes: 10)
        }
        guard case .connectionFailed(let message)? = error else {
            Issue.record("expected connectionFailed, got \(String(describing: error))")
            return
        }
        #expect(!message.isEmpty)
        #expect(!message.contains("TOPSECRET"))
    }

    @Test func tlsCertificatesAreVerified() throws {
        let tls = try makeSelfSignedCertificate()
        defer { try? FileManager.default.removeItem(atPath: tls.directory) }
        let server = try FixtureServer(tls: (tls.certificate, tls.key))
        defer { server.stop() }
        #expect(server.base.hasPrefix("https://"))
        let error = transportError {
            _ = try transport.fetch(HTTPRequest(url: server.url("/blob/10"), stallTimeout: .seconds(5)), maxBodyBytes: 100)
        }
        guard case .connectionFailed(let message)? = error else {
            Issue.record("expected connectionFailed, got \(String(describing: error))")
            return
        }
        #expect(message.contains("certificate"))
    }

    @Test func handlerErrorsAreRethrownUnchangedAndStopTheTransfer() throws {
        try withFixtureServer { server throws in
            let url = server.url("/blob/\(32 << 20)")
            var bodyCalls = 0
            #expect(throws: HandlerError(id: 1)) {
                try transport.execute(HTTPRequest(url: url), onResponse: { _ in }, onBody: { _ in
                    bodyCalls += 1
                    throw HandlerError(id: 1)
                })
            }
            #expect(bodyCalls == 1)

            var responseCalls = 0
            bodyCalls = 0
            #expect(throws: HandlerError(id: 2)) {
                try transport.execute(HTTPRequest(url: url), onResponse: { _ in
                    responseCalls += 1
                    throw HandlerError(id: 2)
                }, onBody: { _ in bodyCalls += 1 })
            }
            #expect(responseCalls == 1)
            #expect(bodyCalls == 0)

            // Thrown from onResponse when there is no body (called after the transfer).
            #expect(throws: HandlerError(id: 3)) {
                try transport.execute(HTTPRequest(method: "HEAD", url: url), onResponse: { _ in
                    throw HandlerError(id: 3)
                }, onBody: { _ in })
            }

            // fetch's own limit error passes through the same path.
            #expect(throws: HTTPTransportError.bodyTooLarge(limit: 1000)) {
                _ = try transport.fetch(HTTPRequest(url: url), maxBodyBytes: 1000)
            }

            // The transport (and its pooled handles) still work afterwards.
            let after = try transport.fetch(HTTPRequest(url: server.url("/blob/50")), maxBodyBytes: 100)
            #expect(after.body == pattern(0..<50))
        }
    }

    @Test func redirectsAreNotFollowed() throws {
        try withFixtureServer { server throws in
            let response = try transport.fetch(HTTPRequest(url: server.url("/redirect")), maxBodyBytes: 1000)
            #expect(response.status == 302)
            #expect(response.headers["Location"] == "/blob/10")
            #expect(response.body == Array("redirecting".utf8))
            #expect(try server.stats(via: transport).requests == 1)
        }
    }

    @Test func onlyTheFinalResponsesHeadersSurvive() throws {
        try withFixtureServer { server throws in
            let recorder = Recorder()
            try recorder.run(transport, HTTPRequest(url: server.url("/continue")))
            #expect(recorder.heads.count == 1)
            #expect(recorder.heads.first?.status == 200)
            #expect(recorder.heads.first?.headers["X-Final"] == "yes")
            #expect(recorder.heads.first?.headers["X-Interim"] == nil)
            #expect(recorder.body == Array("ok".utf8))
        }
    }

    @Test func nonSuccessStatusesAreResponsesNotErrors() throws {
        try withFixtureServer { server throws in
            for status in [404, 500, 503] {
                let response = try transport.fetch(HTTPRequest(url: server.url("/status/\(status)")), maxBodyBytes: 100)
                #expect(response.status == status)
                #expect(response.body == Array("status \(status)".utf8))
            }
        }
    }

    @Test func brokenResponsesAreProtocolErrors() throws {
        try withFixtureServer { server throws in
            for path in ["/truncated", "/nothing", "/garbage"] {
                let error = transportError {
                    _ = try transport.fetch(HTTPRequest(url: server.url(path), stallTimeout: .seconds(5)),
                                            maxBodyBytes: 10_000)
                }
                guard case .protocolError? = error else {
                    Issue.record("\(path): expected protocolError, got \(String(describing: error))")
                    continue
                }
            }
        }
    }

    @Test func invalidRequestsFailCleanly() throws {
        #expect(throws: HTTPTransportError.self) {
            _ = try transport.fetch(HTTPRequest(url: "file:///etc/passwd"), maxBodyBytes: 100)
        }
        #expect(throws: HTTPTransportError.self) {
            _ = try transport.fetch(HTTPRequest(method: "GET /x", url: "http://127.0.0.1:1/"), maxBodyBytes: 100)
        }
    }

    @Test func durationsRoundUpToMilliseconds() {
        #expect(CurlTransport.milliseconds(.seconds(2)) == 2000)
        #expect(CurlTransport.milliseconds(.microseconds(1500)) == 2)
        #expect(CurlTransport.milliseconds(.zero) == 1)
        #expect(CurlTransport.milliseconds(.seconds(-3)) == 1)
    }
}
