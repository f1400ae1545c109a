import Foundation
import HTTPClient
import Testing

private struct CallerError: Error, Equatable {}

/// Each fault, observed through the real curl transport against the fixture server (whose
/// request counter shows whether the request reached the network).
@Suite("FaultInjectingTransport")
struct FaultInjectingTransportTests {
    let curl = CurlTransport()

    @Test func failConnectionDoesNotReachTheServerAndIsLimitedToNOccurrences() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            faulty.inject(.failConnection, urlContains: "/blob/", times: 2)
            let request = HTTPRequest(url: server.url("/blob/10"))
            for _ in 0..<2 {
                let error = transportError { _ = try faulty.fetch(request, maxBodyBytes: 100) }
                guard case .connectionFailed? = error else {
                    Issue.record("expected connectionFailed, got \(String(describing: error))")
                    return
                }
            }
            #expect(try server.stats(via: curl).requests == 0)
            let third = try faulty.fetch(request, maxBodyBytes: 100)
            #expect(third.body == pattern(0..<10))
            #expect(try server.stats(via: curl).requests == 1)

            #expect(faulty.requests.count == 3)
            #expect(faulty.requests.map(\.fault) == [.failConnection, .failConnection, nil])
            #expect(faulty.requestCount(method: "GET", urlContains: "/blob/10") == 3)
            #expect(faulty.requestCountsByURL == [server.url("/blob/10"): 3])
        }
    }

    @Test func truncateBodyDeliversThePrefixThenFails() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            faulty.inject(.truncateBody(afterBytes: 70_001))
            var received: [UInt8] = []
            var status = 0
            let error = transportError {
                try faulty.execute(HTTPRequest(url: server.url("/blob/1000000")),
                                   onResponse: { status = $0.status },
                                   onBody: { received.append(contentsOf: $0) })
            }
            guard case .protocolError? = error else {
                Issue.record("expected protocolError, got \(String(describing: error))")
                return
            }
            #expect(status == 200)
            #expect(received == pattern(0..<70_001))
        }
    }

    @Test func truncateBodyLeavesCallerErrorsUnchanged() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            faulty.inject(.truncateBody(afterBytes: 500_000))
            #expect(throws: CallerError()) {
                try faulty.execute(HTTPRequest(url: server.url("/blob/1000000")),
                                   onResponse: { _ in }, onBody: { _ in throw CallerError() })
            }
        }
    }

    @Test func corruptByteFlipsExactlyOneByte() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            let size = 300_000, target = 200_003
            faulty.inject(.corruptByte(atOffset: target), times: 1)
            let corrupted = try faulty.fetch(HTTPRequest(url: server.url("/blob/\(size)")), maxBodyBytes: size)
            let expected = pattern(0..<size)
            #expect(corrupted.body.count == size)
            let differing = zip(corrupted.body, expected).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
            #expect(differing == [target])
            #expect(corrupted.body[target] == expected[target] ^ 0xFF)

            let clean = try faulty.fetch(HTTPRequest(url: server.url("/blob/\(size)")), maxBodyBytes: size)
            #expect(clean.body == expected)
        }
    }

    @Test func statusFaultAnswersWithoutTheServer() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            faulty.inject(.status(503, body: Array("busy".utf8)), method: "GET")
            let response = try faulty.fetch(HTTPRequest(url: server.url("/blob/10")), maxBodyBytes: 100)
            #expect(response.status == 503)
            #expect(response.body == Array("busy".utf8))
            #expect(response.headers["Content-Length"] == "4")

            // Only GETs match: a HEAD passes through.
            let head = try faulty.fetch(HTTPRequest(method: "HEAD", url: server.url("/blob/10")), maxBodyBytes: 100)
            #expect(head.status == 200)
            #expect(try server.stats(via: curl).requests == 1)
        }
    }

    @Test func delayFaultDelaysThenPassesThrough() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            faulty.inject(.delay(.milliseconds(300)), times: 1)
            let (response, elapsed) = try timed {
                try faulty.fetch(HTTPRequest(url: server.url("/blob/10")), maxBodyBytes: 100)
            }
            #expect(response.body == pattern(0..<10))
            #expect(elapsed >= 0.3)
            #expect(try server.stats(via: curl).requests == 1)
        }
    }

    @Test func stallFaultWaitsTheStallTimeoutThenTimesOut() throws {
        let faulty = FaultInjectingTransport(wrapping: curl)
        faulty.inject(.stall, where: { $0.url.hasSuffix("/slow-thing") })
        let (error, elapsed) = timed {
            transportError {
                _ = try faulty.fetch(HTTPRequest(url: "http://127.0.0.1:1/slow-thing", stallTimeout: .milliseconds(200)),
                                     maxBodyBytes: 100)
            }
        }
        guard case .timedOut? = error else {
            Issue.record("expected timedOut, got \(String(describing: error))")
            return
        }
        #expect(elapsed >= 0.2)
        #expect(elapsed < 2)
    }

    @Test func rulesApplyInOrderAndCanBeRemoved() throws {
        try withFixtureServer { server throws in
            let faulty = FaultInjectingTransport(wrapping: curl)
            faulty.inject(.status(500, body: []), urlContains: "/blob/1", times: 1)
            faulty.inject(.status(404, body: []), urlContains: "/blob/")
            #expect(try faulty.fetch(HTTPRequest(url: server.url("/blob/1")), maxBodyBytes: 10).status == 500)
            #expect(try faulty.fetch(HTTPRequest(url: server.url("/blob/1")), maxBodyBytes: 10).status == 404)
            #expect(try faulty.fetch(HTTPRequest(url: server.url("/blob/2")), maxBodyBytes: 10).status == 404)
            #expect(try faulty.fetch(HTTPRequest(url: server.url("/status/202")), maxBodyBytes: 100).status == 202)
            faulty.removeAllFaults()
            #expect(try faulty.fetch(HTTPRequest(url: server.url("/blob/2")), maxBodyBytes: 10).status == 200)

            #expect(faulty.requestCount() == 5)
            #expect(faulty.requestCount(urlContains: "/blob/1") == 2)
            #expect(faulty.requestCountsByURL[server.url("/blob/2")] == 2)
            faulty.clearLog()
            #expect(faulty.requests.isEmpty)
            #expect(try server.stats(via: curl).requests == 2)
        }
    }
}
