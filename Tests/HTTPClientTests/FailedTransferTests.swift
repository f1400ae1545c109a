import Foundation
@testable import HTTPClient
import Testing

/// libcurl 7.88 keeps state of a transfer that failed before connecting (its receive buffer)
/// across `curl_easy_reset`, after which setting BUFFERSIZE on that handle fails with "A libcurl
/// function was given a bad argument" for every later request. With one pooled handle every
/// request below reuses the handle of the one before it, unless the failed one was dropped.
///
/// `a..b` cannot be resolved, and glibc refuses it without asking a name server, so the
/// "unknown host" case needs no network.
@Suite("CurlTransport after a failed transfer")
struct FailedTransferTests {
    /// One idle handle: a request after a failure gets the failed request's handle if it was kept.
    let transport = CurlTransport(maxIdleHandles: 1)

    /// URLs libcurl refuses before connecting, each of which used to poison its handle.
    static let unfetchable = [
        "file:///etc/passwd",
        "ftp://127.0.0.1:21/blob",
        "http://127.0.0.1:99999/blob",
        "http://127.0.0.1:8080 /blob",
    ]

    @Test(arguments: unfetchable)
    func theNextRequestSucceeds(_ url: String) throws {
        try withFixtureServer { server throws in
            // Puts a handle in the pool first, so the failing request runs on a reused handle too.
            #expect(try transport.fetch(HTTPRequest(url: server.url("/blob/10")), maxBodyBytes: 100).body == pattern(0..<10))
            let error = transportError { _ = try transport.fetch(HTTPRequest(url: url), maxBodyBytes: 100) }
            guard case .invalidRequest(let message)? = error else {
                Issue.record("\(url): expected invalidRequest, got \(String(describing: error))")
                return
            }
            #expect(!message.contains("cannot set"), "\(message)")
            #expect(error?.isTransient == false, "\(url): retrying cannot make it fetchable")

            for size in [100, 70_000] {
                let response = try transport.fetch(HTTPRequest(url: server.url("/blob/\(size)")), maxBodyBytes: size)
                #expect(response.status == 200)
                #expect(response.body == pattern(0..<size))
            }
        }
    }

    @Test func anUnresolvableHostDoesNotBreakLaterRequests() throws {
        try withFixtureServer { server throws in
            #expect(try transport.fetch(HTTPRequest(url: server.url("/blob/10")), maxBodyBytes: 100).body == pattern(0..<10))
            let error = transportError {
                _ = try transport.fetch(HTTPRequest(url: "http://a..b:\(server.port)/blob/10", stallTimeout: .seconds(5)),
                                        maxBodyBytes: 100)
            }
            guard case .connectionFailed(let message)? = error else {
                Issue.record("expected connectionFailed, got \(String(describing: error))")
                return
            }
            #expect(message.contains("resolve host") && message.contains("a..b"), "\(message)")
            #expect(error?.isTransient == true)

            let after = try transport.fetch(HTTPRequest(url: server.url("/blob/70000")), maxBodyBytes: 70_000)
            #expect(after.body == pattern(0..<70_000))
        }
    }

    /// The case as a registry produces it: a redirect to file://, followed by the caller.
    @Test func aRedirectToFileDoesNotBreakLaterRequests() throws {
        try withFixtureServer { server throws in
            let redirect = try transport.fetch(HTTPRequest(url: server.url("/redirect-to?url=file:///etc/passwd")),
                                               maxBodyBytes: 100)
            #expect(redirect.status == 302)
            let location = try #require(redirect.headers["Location"])
            #expect(location == "file:///etc/passwd")
            let error = transportError { _ = try transport.fetch(HTTPRequest(url: location), maxBodyBytes: 100) }
            guard case .invalidRequest? = error else {
                Issue.record("expected invalidRequest, got \(String(describing: error))")
                return
            }
            let after = try transport.fetch(HTTPRequest(url: server.url("/blob/50")), maxBodyBytes: 100)
            #expect(after.body == pattern(0..<50))
        }
    }

    /// A registry at an unknown host is asked again (the failure is transient): the retry must
    /// say what curl says, with the host and port, rather than an error from setting an option.
    @Test func aLaterConnectionFailureReportsCurlsOwnError() throws {
        let port = try closedPort()
        _ = transportError {
            _ = try transport.fetch(HTTPRequest(url: "http://a..b:\(port)/v2/", stallTimeout: .seconds(5)), maxBodyBytes: 100)
        }
        let error = transportError {
            _ = try transport.fetch(HTTPRequest(url: "http://127.0.0.1:\(port)/v2/", stallTimeout: .seconds(5)), maxBodyBytes: 100)
        }
        guard case .connectionFailed(let message)? = error else {
            Issue.record("expected connectionFailed, got \(String(describing: error))")
            return
        }
        #expect(message.contains("127.0.0.1") && message.contains("\(port)"), "\(message)")
        #expect(error?.isTransient == true)
    }
}
