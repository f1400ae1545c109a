#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// A test double around another transport: logs every request it sees and injects faults
/// chosen by rules matched on the request.
///
/// Rules are tried in the order they were added; the first that matches and still has
/// occurrences left applies (and uses one up). A request no rule matches is passed through.
package final class FaultInjectingTransport: HTTPTransport {
    package enum Fault: Sendable, Equatable {
        /// Throws `.connectionFailed` without contacting the inner transport.
        case failConnection
        /// Passes the response through but stops after this many body bytes and throws
        /// `.protocolError`, as a connection dropped mid-body would. No effect on shorter bodies.
        case truncateBody(afterBytes: Int)
        /// Passes the response through with the body byte at this offset inverted (XOR 0xFF).
        case corruptByte(atOffset: Int)
        /// Answers with this status and body (and a matching Content-Length) without
        /// contacting the inner transport.
        case status(Int, body: [UInt8])
        /// Sleeps this long, then passes the request through.
        case delay(Duration)
        /// Sleeps for the request's `stallTimeout`, then throws `.timedOut` without contacting
        /// the inner transport.
        case stall
    }

    private struct Rule: Sendable {
        var fault: Fault
        /// Occurrences left; nil means unlimited.
        var remaining: Int?
        var matches: @Sendable (HTTPRequest) -> Bool
    }

    /// One request as the double saw it, with the fault it received (nil: passed through).
    package struct LoggedRequest: Sendable, Equatable {
        public var method: String
        public var url: String
        public var headers: HTTPHeaders
        public var fault: Fault?
    }

    private struct State {
        var rules: [Rule] = []
        var log: [LoggedRequest] = []
    }

    package let inner: any HTTPTransport
    private let state = Mutex(State())

    package init(wrapping inner: any HTTPTransport) {
        self.inner = inner
    }

    // MARK: Rules

    /// Adds a rule for requests whose URL contains `urlContains` (nil: any URL) and whose
    /// method is `method` (nil: any method), applied at most `times` times (nil: always).
    package func inject(_ fault: Fault, method: String? = nil, urlContains: String? = nil, times: Int? = nil) {
        inject(fault, times: times) { request in
            (method == nil || request.method == method)
                && (urlContains.map { request.url.contains($0) } ?? true)
        }
    }

    /// Adds a rule with an arbitrary predicate.
    package func inject(_ fault: Fault, times: Int? = nil, where matches: @escaping @Sendable (HTTPRequest) -> Bool) {
        let rule = Rule(fault: fault, remaining: times, matches: matches)
        state.withLock { $0.rules.append(rule) }
    }

    package func removeAllFaults() {
        state.withLock { $0.rules.removeAll() }
    }

    // MARK: Request log

    /// Every request seen, in order, including the ones that got a fault.
    package var requests: [LoggedRequest] { state.withLock { $0.log } }

    /// How many requests were seen with this method (nil: any) whose URL contains `urlContains`
    /// (nil: any URL).
    package func requestCount(method: String? = nil, urlContains: String? = nil) -> Int {
        state.withLock { state in
            state.log.count(where: { entry in
                (method == nil || entry.method == method)
                    && (urlContains.map { entry.url.contains($0) } ?? true)
            })
        }
    }

    /// Requests seen per exact URL.
    package var requestCountsByURL: [String: Int] {
        state.withLock { state in
            state.log.reduce(into: [:]) { counts, entry in counts[entry.url, default: 0] += 1 }
        }
    }

    package func clearLog() {
        state.withLock { $0.log.removeAll() }
    }

    // MARK: HTTPTransport

    package func execute(
        _ request: HTTPRequest,
        onResponse: (HTTPResponseHead) throws -> Void,
        onBody: (UnsafeRawBufferPointer) throws -> Void
    ) throws {
        let fault: Fault? = state.withLock { state in
            var chosen: Fault?
            if let index = state.rules.firstIndex(where: { ($0.remaining ?? 1) > 0 && $0.matches(request) }) {
                chosen = state.rules[index].fault
                if let remaining = state.rules[index].remaining {
                    if remaining <= 1 {
                        state.rules.remove(at: index)
                    } else {
                        state.rules[index].remaining = remaining - 1
                    }
                }
            }
            state.log.append(LoggedRequest(method: request.method, url: request.url,
                                           headers: request.headers, fault: chosen))
            return chosen
        }

        switch fault {
        case nil:
            try inner.execute(request, onResponse: onResponse, onBody: onBody)

        case .failConnection:
            throw HTTPTransportError.connectionFailed("injected fault: connection failed")

        case .status(let status, let body):
            try onResponse(HTTPResponseHead(status: status,
                                            headers: HTTPHeaders([(name: "Content-Length", value: String(body.count))])))
            if !body.isEmpty {
                // SAFETY: the pointer is valid for the handler call only, as the protocol says.
                try body.withUnsafeBytes { try onBody($0) }
            }

        case .delay(let duration):
            Self.sleep(duration)
            try inner.execute(request, onResponse: onResponse, onBody: onBody)

        case .stall:
            Self.sleep(request.stallTimeout)
            throw HTTPTransportError.timedOut("injected fault: no progress for the stall timeout")

        case .truncateBody(let limit):
            let stop = Truncated()
            var delivered = 0
            do {
                try inner.execute(request, onResponse: onResponse, onBody: { chunk in
                    let room = max(0, limit - delivered)
                    if chunk.count <= room {
                        delivered += chunk.count
                        try onBody(chunk)
                        return
                    }
                    if room > 0 {
                        delivered += room
                        // SAFETY: a prefix of the inner transport's chunk, valid during this call.
                        try onBody(UnsafeRawBufferPointer(rebasing: chunk[..<room]))
                    }
                    throw stop
                })
            } catch let error as Truncated where error === stop {
                throw HTTPTransportError.protocolError("injected fault: body truncated after \(delivered) bytes")
            }

        case .corruptByte(let target):
            var offset = 0
            try inner.execute(request, onResponse: onResponse, onBody: { chunk in
                defer { offset += chunk.count }
                guard target >= offset, target < offset + chunk.count else {
                    try onBody(chunk)
                    return
                }
                var copy = [UInt8](chunk)
                copy[target - offset] ^= 0xFF
                // SAFETY: the copy's pointer is valid for the handler call only.
                try copy.withUnsafeBytes { try onBody($0) }
            })
        }
    }

    /// Identifies the double's own stop signal, so a handler's errors still pass unchanged.
    private final class Truncated: Error, Sendable {}

    private static func sleep(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        guard seconds > 0 || attoseconds > 0 else { return }
        var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR {
            request = remaining
        }
    }
}
