import FoundationEssentials
import SystemSupport
import HTTPClient
import Logging
import OCI

/// A remote cache (a registry repository, an S3 prefix): its layout, resolved at mount time,
/// and its blobs. Calls block the calling thread and every wait inside them is bounded.
public protocol RemoteCacheSource: BlobSource {
    /// For logs and error messages; never contains credentials.
    var displayName: String { get }

    /// Resolves the tags and fetches every manifest and config.
    func loadSnapshot() throws(RemoteStoreError) -> CacheSnapshot
}

extension RemoteCacheSource {
    /// Resolves the source and hands the result to `remember`; when the remote is unavailable
    /// (not when it refuses us), serves what `recall` remembers of its last resolution, so that
    /// a mount made while the remote is down still shows the cache it showed before.
    public func loadSnapshot(remembering remember: (CacheSnapshot) throws -> Void,
                             recalling recall: () -> (snapshot: CacheSnapshot, resolvedAt: Date)?,
                             logger: Logger) throws(RemoteStoreError) -> CacheSnapshot {
        do {
            let snapshot = try loadSnapshot()
            do {
                try remember(snapshot)
            } catch {
                logger.warning("cannot save the resolution for offline mounts", metadata: ["error": "\(error)"])
            }
            return snapshot
        } catch {
            guard error.isUnavailability, let (snapshot, resolvedAt) = recall() else { throw error }
            logger.warning("remote unavailable; serving the resolution saved at its last mount",
                           metadata: ["source": "\(displayName)", "resolvedAt": "\(resolvedAt)", "error": "\(error)"])
            return snapshot
        }
    }
}

/// HTTP byte ranges as both remote stores ask for them.
package enum ByteRange {
    /// The Range header for a request, or nil when the whole body is wanted.
    static func header(from offset: Int64, through last: Int64?) -> String? {
        if let last { return "bytes=\(offset)-\(last)" }
        return offset > 0 ? "bytes=\(offset)-" : nil
    }

    /// Where the answer's body starts: the range's start for a 206 (checked), 0 otherwise.
    static func start(of head: HTTPResponseHead, requested offset: Int64, context: String) throws -> Int64 {
        guard head.status == 206 else { return 0 }
        guard let start = contentRangeStart(head.headers["Content-Range"]), start == offset else {
            throw RemoteStoreError.invalidContent("\(context): range answer does not start at \(offset)")
        }
        return start
    }

    /// "bytes 100-199/1000" → 100.
    package static func contentRangeStart(_ value: String?) -> Int64? {
        guard let value, value.hasPrefix("bytes ") else { return nil }
        let range = value.dropFirst("bytes ".count).split(separator: "/").first ?? ""
        return range.split(separator: "-").first.flatMap { Int64($0) }
    }
}

/// One readable line per failure; never contains credentials.
public enum RemoteStoreError: Error, Sendable, Equatable, CustomStringConvertible {
    case unauthorized(String)
    case notFound(String)
    case invalidContent(String)
    case server(String)
    case transport(String)
    /// Nothing moved for the whole `--timeout`: not retried, so every wait keeps its bound.
    case timedOut(String)
    case configuration(String)

    /// Names the failing exchange; a stall becomes `.timedOut`, anything else `.transport`.
    public init(_ error: HTTPTransportError, context: String) {
        if case .timedOut = error {
            self = .timedOut("\(context): \(error)")
        } else {
            self = .transport("\(context): \(error)")
        }
    }

    public var description: String {
        switch self {
        case .unauthorized(let m), .notFound(let m), .invalidContent(let m), .server(let m),
             .transport(let m), .timedOut(let m), .configuration(let m):
            return m
        }
    }
}

/// Manifests, configs and cache configs are read whole at mount time: bounded in size, and
/// tried again, with a growing pause, after a failure that may pass: a transient error, a
/// stall, or a document that arrived damaged. Within `attempts`, like a blob request.
enum SmallDocument {
    static let maxSize = 4 << 20
    static let attempts = 3

    /// `exchange` performs one request, handing each body chunk to the closure it is given.
    static func fetch(_ what: String, logger: Logger,
                      _ exchange: (_ onBody: (UnsafeRawBufferPointer) throws -> Void) throws -> HTTPResponseHead)
        throws(RemoteStoreError) -> HTTPResponse {
        try fetch(what, logger: logger, exchange, check: { response throws(RemoteStoreError) in response })
    }

    /// `check` judges each document that arrives; what it throws (a digest or a size that does
    /// not match, bytes that do not parse) may be damage in transit, so it is tried again too.
    static func fetch<Document>(_ what: String, logger: Logger,
                                _ exchange: (_ onBody: (UnsafeRawBufferPointer) throws -> Void) throws -> HTTPResponseHead,
                                check: (HTTPResponse) throws(RemoteStoreError) -> Document) throws(RemoteStoreError) -> Document {
        var attempt = 1
        while true {
            let failure: RemoteStoreError
            var mayPass: Bool
            do {
                var body: [UInt8] = []
                let head = try exchange { chunk in
                    guard body.count + chunk.count <= maxSize else {
                        throw RemoteStoreError.invalidContent("\(what) is larger than \(maxSize) bytes; refused")
                    }
                    body.append(contentsOf: chunk)
                }
                do throws(RemoteStoreError) {
                    return try check(HTTPResponse(head: head, body: body))
                } catch {
                    failure = error
                    mayPass = true
                }
            } catch let error as RemoteStoreError {
                failure = error
                mayPass = error.isTransient
                if case .timedOut = error { mayPass = true }
            } catch {
                throw .transport("\(what): \(error)")
            }
            guard attempt < attempts, mayPass else { throw failure }
            logger.warning("retrying", metadata: ["what": "\(what)", "attempt": "\(attempt)", "error": "\(failure)"])
            SystemThread.sleep(for: RetryBackoff.pause(afterFailures: attempt))
            attempt += 1
        }
    }
}
