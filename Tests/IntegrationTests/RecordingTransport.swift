import HTTPClient
import Synchronization

/// Passes every exchange on and notes what a publisher sent: each request, the bytes of its
/// body, how it was answered, and how many were in flight at once.
final class RecordingTransport: HTTPTransport {
    struct Exchange: Sendable {
        var method: String
        var url: String
        var headers: HTTPHeaders
        var bodyBytes: Int64
        var status: Int?
        var contentRange: String? { headers["Content-Range"] }
    }

    private struct State {
        var exchanges: [Exchange] = []
        var inFlight = 0
        var mostInFlight = 0
    }

    let inner: any HTTPTransport
    private let state = Mutex(State())

    init(wrapping inner: any HTTPTransport) { self.inner = inner }

    var exchanges: [Exchange] { state.withLock { $0.exchanges } }
    var bodyBytes: Int64 { exchanges.reduce(0) { $0 + $1.bodyBytes } }
    var mostInFlight: Int { state.withLock { $0.mostInFlight } }
    func count(_ method: String) -> Int { exchanges.count { $0.method == method } }
    func reset() { state.withLock { $0 = State() } }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        let index = state.withLock { state in
            state.exchanges.append(Exchange(method: request.method, url: request.url, headers: request.headers,
                                            bodyBytes: request.body?.count ?? 0))
            state.inFlight += 1
            state.mostInFlight = max(state.mostInFlight, state.inFlight)
            return state.exchanges.count - 1
        }
        defer { state.withLock { $0.inFlight -= 1 } }
        try inner.execute(request, onResponse: { head in
            state.withLock { $0.exchanges[index].status = head.status }
            try onResponse(head)
        }, onBody: onBody)
    }
}
