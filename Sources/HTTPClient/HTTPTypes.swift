/// The one seam between the project and the network: every remote store speaks HTTP through
/// `HTTPTransport`, so tests can put a fault-injecting double where libcurl would be.

/// Header fields in order, looked up case-insensitively.
public struct HTTPHeaders: Sendable, Equatable, Sequence {
    public private(set) var fields: [(name: String, value: String)]

    public init(_ fields: [(name: String, value: String)] = []) { self.fields = fields }

    public subscript(name: String) -> String? {
        let lower = name.lowercased()
        return fields.first { $0.name.lowercased() == lower }?.value
    }

    public func values(_ name: String) -> [String] {
        let lower = name.lowercased()
        return fields.filter { $0.name.lowercased() == lower }.map(\.value)
    }

    public mutating func add(_ name: String, _ value: String) { fields.append((name, value)) }

    public mutating func set(_ name: String, _ value: String) {
        remove(name)
        fields.append((name, value))
    }

    public mutating func remove(_ name: String) {
        let lower = name.lowercased()
        fields.removeAll { $0.name.lowercased() == lower }
    }

    public func makeIterator() -> IndexingIterator<[(name: String, value: String)]> { fields.makeIterator() }

    public static func == (lhs: HTTPHeaders, rhs: HTTPHeaders) -> Bool {
        lhs.fields.elementsEqual(rhs.fields) { $0.name == $1.name && $0.value == $1.value }
    }
}

/// What a request sends.
public enum HTTPRequestBody: Sendable, Equatable {
    case bytes([UInt8])
    /// `length` bytes of an open file from `offset`, read while they are sent: an upload never
    /// holds a blob in memory. The descriptor stays open, and the range unchanged, until the
    /// exchange ends; a file shorter than the range fails the exchange.
    case fileRange(descriptor: Int32, offset: Int64, length: Int64)
    /// Bytes produced while they are sent: with a Content-Length when the stream knows its
    /// length, else with chunked framing.
    case stream(any StreamedRequestBody)

    /// The body's length, when it is known before it is sent.
    public var count: Int64? {
        switch self {
        case .bytes(let bytes): return Int64(bytes.count)
        case .fileRange(_, _, let length): return length
        case .stream(let stream): return stream.length
        }
    }

    /// The body's bytes when they are in memory.
    public var bytes: [UInt8]? {
        if case .bytes(let bytes) = self { return bytes }
        return nil
    }

    public static func == (lhs: HTTPRequestBody, rhs: HTTPRequestBody) -> Bool {
        switch (lhs, rhs) {
        case (.bytes(let a), .bytes(let b)): return a == b
        case (.fileRange(let d1, let o1, let l1), .fileRange(let d2, let o2, let l2)): return d1 == d2 && o1 == o2 && l1 == l2
        case (.stream(let a), .stream(let b)): return a === b
        default: return false
        }
    }
}

/// A request body made while it is sent (an upload that follows a file still being written).
public protocol StreamedRequestBody: AnyObject, Sendable {
    /// Fills the start of `buffer` with the next bytes, waiting for them within the stream's
    /// own bound; 0 once the body is complete. Throwing stops the exchange with that error.
    func next(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// How many bytes the body will hold, when that is known before they are made; a stream
    /// that ends short of it fails the exchange.
    var length: Int64? { get }
}

extension StreamedRequestBody {
    public var length: Int64? { nil }
}

public struct HTTPRequest: Sendable {
    public var method: String
    public var url: String
    public var headers: HTTPHeaders
    public var body: HTTPRequestBody?
    /// Bound on connecting and on any stall: a transfer that moves no byte for this long fails.
    public var stallTimeout: Duration
    /// Bound on the whole exchange, for small requests (tokens, manifests); nil for streams.
    public var totalTimeout: Duration?
    /// False only for registries the user marked insecure (BuildKit's `registry.insecure`).
    public var verifiesTLSPeer = true

    public init(method: String = "GET", url: String, headers: HTTPHeaders = HTTPHeaders(),
                body: HTTPRequestBody? = nil, stallTimeout: Duration = .seconds(60), totalTimeout: Duration? = nil) {
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.stallTimeout = stallTimeout
        self.totalTimeout = totalTimeout
    }
}

public struct HTTPResponseHead: Sendable {
    public var status: Int
    public var headers: HTTPHeaders

    public init(status: Int, headers: HTTPHeaders) {
        self.status = status
        self.headers = headers
    }
}

public struct HTTPResponse: Sendable {
    public var head: HTTPResponseHead
    public var body: [UInt8]
    public var status: Int { head.status }
    public var headers: HTTPHeaders { head.headers }

    public init(head: HTTPResponseHead, body: [UInt8]) {
        self.head = head
        self.body = body
    }
}

public enum HTTPTransportError: Error, Sendable, Equatable, CustomStringConvertible {
    /// DNS, refused or reset connection, TLS handshake or verification failure.
    case connectionFailed(String)
    /// No progress within `stallTimeout`, or the whole exchange exceeded `totalTimeout`.
    case timedOut(String)
    /// A response body larger than the caller allowed.
    case bodyTooLarge(limit: Int)
    /// The server broke the protocol (truncated body, bad framing).
    case protocolError(String)
    /// The caller's body handler threw; the transfer was stopped.
    case aborted(String)
    /// Refused before anything was sent: a malformed URL, a scheme other than http and https,
    /// an invalid method or header.
    case invalidRequest(String)

    /// Worth another try: the network or the server may do better in a moment. A request that
    /// cannot be made, or an answer the caller refused, fails the same way every time.
    public var isTransient: Bool {
        switch self {
        case .connectionFailed, .timedOut, .protocolError: return true
        case .bodyTooLarge, .aborted, .invalidRequest: return false
        }
    }

    public var description: String {
        switch self {
        case .connectionFailed(let m): return "connection failed: \(m)"
        case .timedOut(let m): return "timed out: \(m)"
        case .bodyTooLarge(let limit): return "response body larger than \(limit) bytes"
        case .protocolError(let m): return "protocol error: \(m)"
        case .aborted(let m): return "transfer aborted: \(m)"
        case .invalidRequest(let m): return "invalid request: \(m)"
        }
    }
}

public protocol HTTPTransport: Sendable {
    /// Performs one exchange on the calling thread, blocking until it ends. Redirects are not
    /// followed (callers decide what a redirect may carry). `onResponse` is called once with the
    /// final status and headers before any body byte; `onBody` receives the body in order.
    /// Either handler may throw to stop the transfer; that error is rethrown unchanged.
    /// Transport failures throw `HTTPTransportError`.
    func execute(
        _ request: HTTPRequest,
        onResponse: (HTTPResponseHead) throws -> Void,
        onBody: (UnsafeRawBufferPointer) throws -> Void
    ) throws
}

extension HTTPTransport {
    /// Collects a whole (small) response, refusing bodies over `maxBodyBytes`.
    public func fetch(_ request: HTTPRequest, maxBodyBytes: Int) throws -> HTTPResponse {
        var head = HTTPResponseHead(status: 0, headers: HTTPHeaders())
        var body: [UInt8] = []
        try execute(request, onResponse: { head = $0 }, onBody: { chunk in
            guard body.count + chunk.count <= maxBodyBytes else {
                throw HTTPTransportError.bodyTooLarge(limit: maxBodyBytes)
            }
            body.append(contentsOf: chunk)
        })
        return HTTPResponse(head: head, body: body)
    }
}

extension HTTPTransport {
    /// One exchange in which only a successful (2xx) answer's head and body reach the handlers;
    /// of any other answer the first `errorBodyLimit` bytes are kept for its error message.
    public func executeExpectingSuccess(
        _ request: HTTPRequest, errorBodyLimit: Int = 16 << 10,
        onSuccess: (HTTPResponseHead) throws -> Void,
        onBody: (UnsafeRawBufferPointer) throws -> Void
    ) throws -> (head: HTTPResponseHead, errorBody: [UInt8]) {
        var head = HTTPResponseHead(status: 0, headers: HTTPHeaders())
        var errorBody: [UInt8] = []
        try execute(request, onResponse: { response in
            head = response
            if (200..<300).contains(response.status) { try onSuccess(response) }
        }, onBody: { chunk in
            if (200..<300).contains(head.status) {
                try onBody(chunk)
            } else if errorBody.count < errorBodyLimit {
                errorBody.append(contentsOf: chunk.prefix(errorBodyLimit - errorBody.count))
            }
        })
        return (head, errorBody)
    }
}
