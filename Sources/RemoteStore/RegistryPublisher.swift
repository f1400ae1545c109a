import FoundationEssentials
import HTTPClient
import Logging
import OCI
import Synchronization
import Dispatch
import SystemSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A repository in an OCI registry, written through the distribution API's push side: a blob
/// the registry holds is left alone, one that another repository of the registry holds is
/// mounted from it, and any other is uploaded (in one request, or in chunks that resume where
/// the registry says it stopped); a tag is a PUT of the manifest's exact bytes.
public final class RegistryPublisher: CachePublisher {
    /// Blobs up to this size go up in one request; a failure costs the whole of such a blob.
    public static let defaultMonolithicLimit: Int64 = defaultSingleRequestUploadLimit
    /// Bigger blobs go up in chunks of this size; a failure costs at most one of them.
    public static let defaultChunkSize: Int64 = 16 << 20
    /// Failed exchanges one publication meets before it gives up, as reads of manifests do:
    /// a registry that keeps failing ends the publication within a few seconds of pauses.
    public static let attempts = 4

    public let reference: RegistryReference
    private let connection: RegistryConnection
    private let mountFrom: [String]
    private let monolithicLimit: Int64
    private let chunkSize: Int64
    /// Whether an insecure registry's scheme was probed; the probe runs once, before the first request.
    private let schemeChosen = Mutex(false)

    public var displayName: String { "\(reference.host)/\(reference.repository)" }

    /// - Parameters:
    ///   - reference: the repository; its tag or digest, if any, plays no part.
    ///   - credential: what `credentialSource` gave (nil: none).
    ///   - credentialSource: asked again when the registry refuses the credential; nil: the
    ///     credential never changes.
    ///   - mountFrom: repositories of the same registry that may hold the blobs, tried in order
    ///     before an upload.
    public init(reference: RegistryReference, insecure: Bool, credential: RegistryCredential?,
                credentialSource: RegistryCredentialSource? = nil, mountFrom: [String] = [],
                monolithicLimit: Int64 = defaultMonolithicLimit, chunkSize: Int64 = defaultChunkSize,
                transport: any HTTPTransport, timeout: Duration, logger: Logger) {
        self.reference = reference
        self.connection = RegistryConnection(reference: reference, insecure: insecure, credential: credential,
                                             credentialSource: credentialSource, transport: transport,
                                             timeout: timeout, logger: logger)
        for invalid in mountFrom where !RegistryReference.isValidRepository(invalid) {
            logger.warning("not a repository name; blobs are not mounted from it",
                           metadata: ["repository": "\(invalid.escapingControlCharacters)"])
        }
        self.mountFrom = mountFrom.filter { RegistryReference.isValidRepository($0) && $0 != reference.repository }
        self.monolithicLimit = max(monolithicLimit, 0)
        self.chunkSize = max(chunkSize, 1)
    }

    private var logger: Logger { connection.logger }

    // MARK: Blobs

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        chooseSchemeOnce()
        let upload = BlobUpload(digest: digest, size: size, path: path)
        do {
            return try withAttempts("blob \(digest)") { () throws(RemoteStoreError) in
                try publish(upload)
            } afterFailure: {
                recover(upload)
            }
        } catch {
            throw error.about("publishing blob \(digest) to \(displayName)")
        }
    }

    /// One attempt, from wherever the last one left the upload.
    private func publish(_ upload: BlobUpload) throws(RemoteStoreError) -> BlobPublication {
        if upload.session == nil {
            if try blobExists(upload.digest) {
                // Found after an attempt that sent the bytes: they arrived, only the answer did not.
                return upload.sentBytes ? .uploaded(bytes: upload.size) : .alreadyPresent
            }
            switch try startUpload(upload.digest) {
            case .mounted(let repository): return .mountedFromRepository(repository)
            case .session(let session): upload.session = session
            }
        }
        if upload.size <= monolithicLimit {
            try uploadWhole(upload)
        } else {
            try uploadInChunks(upload)
        }
        return .uploaded(bytes: upload.size)
    }

    private func blobExists(_ digest: Digest) throws(RemoteStoreError) -> Bool {
        let answer = try send("HEAD", connection.apiURL("blobs/\(digest)"))
        switch answer.status {
        case 200..<300: return true
        case 404: return false
        default: throw refusal(answer, of: "HEAD")
        }
    }

    private enum UploadStart {
        case mounted(String)
        case session(UploadSession)
    }

    /// Mounts the blob from the first of `mountFrom` that holds it, else opens an upload session.
    private func startUpload(_ digest: Digest) throws(RemoteStoreError) -> UploadStart {
        let uploads = connection.apiURL("blobs/uploads/")
        for (index, from) in mountFrom.enumerated() {
            // Names are checked at init: both go into the query as they are.
            let mount = URL(string: uploads.absoluteString + "?mount=\(digest)&from=\(from)")!
            let answer: RegistryConnection.Answer
            do {
                answer = try send("POST", mount, scope: connection.pushScope + " repository:\(from):pull")
            } catch .unauthorized(let message) {
                // Not allowed to read `from`: the blob goes up another way.
                logger.debug("cannot mount from another repository", metadata: ["from": "\(from)", "error": "\(message)"])
                continue
            }
            switch answer.status {
            case 201:
                return .mounted(from)
            case 202:
                // `from` does not hold the blob, and the registry opened an ordinary upload instead.
                let session = try openedSession(answer)
                if index == mountFrom.count - 1 { return .session(session) }
                abandon(session)
            case 401, 403, 404:
                logger.debug("cannot mount from another repository", metadata: ["from": "\(from)", "status": "\(answer.status)"])
            default:
                throw refusal(answer, of: "POST")
            }
        }
        let answer = try send("POST", uploads)
        guard answer.status == 202 else { throw refusal(answer, of: "POST") }
        return .session(try openedSession(answer))
    }

    /// The whole blob in the request that closes the session. Nothing of a failed one is worth
    /// keeping: the next attempt starts over.
    private func uploadWhole(_ upload: BlobUpload) throws(RemoteStoreError) {
        guard let session = upload.session else { return }
        upload.session = nil
        let body: HTTPRequestBody? = upload.size > 0
            ? .fileRange(descriptor: try upload.file(), offset: 0, length: upload.size) : nil
        upload.sentBytes = true
        try finish(session, of: upload.digest, body: body)
    }

    /// One PATCH a chunk, each to the `Location` the last answer gave, then the closing PUT.
    private func uploadInChunks(_ upload: BlobUpload) throws(RemoteStoreError) {
        let descriptor = try upload.file()
        while var session = upload.session, session.offset < upload.size {
            let length = min(max(chunkSize, session.minimumChunk), upload.size - session.offset)
            let end = session.offset + length
            let headers = HTTPHeaders([("Content-Type", "application/octet-stream"),
                                       ("Content-Range", "\(session.offset)-\(end - 1)")])
            upload.sentBytes = true
            let answer = try send("PATCH", session.location, headers: headers,
                                  body: .fileRange(descriptor: descriptor, offset: session.offset, length: length))
            guard (200..<300).contains(answer.status) else {
                // The registry counts the upload otherwise than its last answer said: start over.
                if answer.status == 416 { upload.session = nil }
                throw sessionRefusal(answer, of: "PATCH")
            }
            // The registry's count, not ours, says where the next chunk starts.
            let held = Self.heldLength(answer.head.headers["Range"]) ?? end
            guard held <= end else {
                throw .invalidContent("\(reference.host) claims \(held) bytes of the upload after \(end) were sent")
            }
            guard held > session.offset else {
                throw .server("\(reference.host) kept none of the chunk at \(session.offset)")
            }
            session.offset = held
            session.location = try location(in: answer) ?? session.location
            upload.session = session
        }
        guard let session = upload.session else { return }
        try finish(session, of: upload.digest, body: nil)
    }

    /// `PUT <location>?digest=`: the registry checks what it received against the digest.
    private func finish(_ session: UploadSession, of digest: Digest, body: HTTPRequestBody?) throws(RemoteStoreError) {
        let separator = session.location.query == nil ? "?" : "&"
        // A digest is `sha256:` and hex: nothing in it needs escaping in a query.
        let url = URL(string: session.location.absoluteString + "\(separator)digest=\(digest)")!
        var headers = HTTPHeaders()
        if body != nil { headers.set("Content-Type", "application/octet-stream") }
        let answer = try send("PUT", url, headers: headers, body: body)
        guard (200..<300).contains(answer.status) else { throw sessionRefusal(answer, of: "PUT") }
        if let claimed = answer.head.headers["Docker-Content-Digest"], Digest(claimed) != digest {
            throw .invalidContent("\(reference.host) answered the upload with digest \(claimed.escapingControlCharacters)")
        }
    }

    /// After a failure, where a chunked upload stands, as the registry tells it (`GET
    /// <location>`: 204 with `Range: 0-<last>`). An upload whose session is gone, or that goes
    /// in one piece, starts over.
    private func recover(_ upload: BlobUpload) {
        guard let session = upload.session else { return }
        upload.session = nil
        guard let answer = try? send("GET", session.location), (200..<300).contains(answer.status),
              var held = Self.heldLength(answer.head.headers["Range"]), held <= upload.size,
              let next = try? location(in: answer) ?? session.location else {
            logger.info("upload session gone; starting the blob over", metadata: ["blob": "\(upload.digest)"])
            return
        }
        // distribution answers `0-0` for an empty upload as well as for one byte: take the
        // empty one, which a registry that holds the byte refuses (416) and the upload restarts.
        if held == 1 { held = 0 }
        upload.session = UploadSession(location: next, offset: held, minimumChunk: session.minimumChunk)
        logger.info("resuming the upload", metadata: ["blob": "\(upload.digest)", "offset": "\(held)"])
    }

    /// Ends a session that will not be used, as a courtesy: registries expire idle ones anyway.
    private func abandon(_ session: UploadSession) {
        _ = try? send("DELETE", session.location)
    }

    private func openedSession(_ answer: RegistryConnection.Answer) throws(RemoteStoreError) -> UploadSession {
        guard let location = try location(in: answer) else {
            throw .invalidContent("\(reference.host) opened an upload without a Location")
        }
        let minimumChunk = answer.head.headers["OCI-Chunk-Min-Length"].flatMap { Int64($0) } ?? 0
        return UploadSession(location: location, offset: 0, minimumChunk: max(minimumChunk, 0))
    }

    /// The answer's `Location`, resolved against the URL that gave it.
    private func location(in answer: RegistryConnection.Answer) throws(RemoteStoreError) -> URL? {
        guard let text = answer.head.headers["Location"] else { return nil }
        guard let url = URL(string: text, relativeTo: answer.url)?.absoluteURL,
              let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https" else {
            throw .invalidContent("\(reference.host) gave an unusable upload Location \(String(text.prefix(200)).escapingControlCharacters)")
        }
        return url
    }

    // MARK: Early uploads

    public func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)? {
        RegistryEarlyUpload(publisher: self, contents: contents)
    }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                            sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication {
        if let published = early?.finishOrAbandon(as: digest, size: size, logger: logger) { return published }
        return try publishBlob(digest, size: size, contentsAt: path)
    }

    /// One upload session fed while the file is written: a POST, PATCHes whose chunked bodies
    /// follow the file, each ending after at most `monolithicLimit` bytes (what a cut connection
    /// may cost, as for ordinary uploads), and, once the blob is committed and its digest known,
    /// the closing PUT (`finishEarly`).
    fileprivate func sendEarly(_ contents: any GrowingBlobContents) throws(RemoteStoreError) -> UploadSession {
        chooseSchemeOnce()
        let opened = try send("POST", connection.apiURL("blobs/uploads/"))
        guard opened.status == 202 else { throw refusal(opened, of: "POST") }
        var session = try openedSession(opened)
        do throws(RemoteStoreError) {
            while true {
                let body = GrowingContentsBody(contents, from: session.offset, limit: max(monolithicLimit, chunkSize))
                let answer = try send("PATCH", session.location,
                                      headers: HTTPHeaders([("Content-Type", "application/octet-stream")]), body: .stream(body))
                guard (200..<300).contains(answer.status) else { throw sessionRefusal(answer, of: "PATCH") }
                let end = session.offset + body.sent
                // distribution answers `0-0` for an empty upload as well as for one byte.
                guard let held = Self.heldLength(answer.head.headers["Range"]), held == end || (held == 1 && end == 0) else {
                    throw .invalidContent("\(reference.host) holds another count of bytes than the \(end) sent")
                }
                session.offset = end
                session.location = try location(in: answer) ?? session.location
                if let reason = body.givenUp {
                    // Deleted with the answer's Location: distribution refuses a session's older
                    // ones once it holds more bytes than they say.
                    throw .invalidContent("the bytes will not be a blob: \(reason)")
                }
                if body.reachedEnd { return session }
            }
        } catch {
            abandon(session)
            throw error
        }
    }

    fileprivate func finishEarly(_ session: UploadSession, as digest: Digest) throws(RemoteStoreError) {
        try finish(session, of: digest, body: nil)
    }

    fileprivate func abandonEarly(_ session: UploadSession) { abandon(session) }

    /// `0-<last>` (or with a `bytes=` prefix) → last + 1.
    static func heldLength(_ range: String?) -> Int64? {
        guard var text = range?.trimmingWhitespace() else { return nil }
        if text.hasPrefix("bytes=") || text.hasPrefix("bytes ") { text = String(text.dropFirst(6)) }
        let bounds = text.split(separator: "-", omittingEmptySubsequences: false)
        guard bounds.count == 2, bounds[0] == "0", let last = Int64(bounds[1]), last >= 0, last < Int64.max else { return nil }
        return last + 1
    }

    // MARK: Tags

    public func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8],
                           smallBlob: (Digest) -> [UInt8]?) throws {
        chooseSchemeOnce()
        do throws(RemoteStoreError) {
            guard RegistryReference.isValidTag(tag) else {
                throw .configuration("'\(tag.escapingControlCharacters)' is not a valid tag")
            }
            guard Digest.sha256(of: manifestBytes) == manifest.digest, Int64(manifestBytes.count) == manifest.size else {
                throw .invalidContent("the bytes given are not the manifest's (digest or size differ)")
            }
            try withAttempts("tag \(tag)") { () throws(RemoteStoreError) in
                let answer = try send("PUT", connection.apiURL("manifests/\(tag)"),
                                      headers: HTTPHeaders([("Content-Type", manifest.mediaType)]), body: .bytes(manifestBytes))
                guard (200..<300).contains(answer.status) else { throw refusal(answer, of: "PUT") }
                if let claimed = answer.head.headers["Docker-Content-Digest"], Digest(claimed) != manifest.digest {
                    throw .invalidContent("\(reference.host) answered with digest \(claimed.escapingControlCharacters), not the manifest's")
                }
            }
        } catch {
            throw error.about("publishing tag \(tag.escapingControlCharacters) (manifest \(manifest.digest)) to \(displayName)")
        }
    }

    // MARK: Exchanges

    private func chooseSchemeOnce() {
        guard connection.insecure else { return }
        schemeChosen.withLock { chosen in
            if !chosen { connection.chooseInsecureScheme() }
            chosen = true
        }
    }

    private func send(_ method: String, _ url: URL, headers: HTTPHeaders = HTTPHeaders(), body: HTTPRequestBody? = nil,
                      scope: String? = nil) throws(RemoteStoreError) -> RegistryConnection.Answer {
        // A body read from the blob's file may take long while it moves: the stall bound holds it.
        let totalTimeout: Duration? = switch body {
        case .fileRange?, .stream?: nil
        default: connection.timeout
        }
        do {
            return try connection.exchange(method, url, headers: headers, body: body, scope: scope ?? connection.pushScope,
                                           totalTimeout: totalTimeout)
        } catch let error as RemoteStoreError {
            throw error
        } catch {
            throw .transport("\(reference.host): \(error)")
        }
    }

    /// What a push answer that is not a success means: a refusal of what was sent (a digest
    /// that does not match, a blob too big) fails at once, as a denial does; a failure of the
    /// registry or the network may pass.
    private func refusal(_ answer: RegistryConnection.Answer, of method: String) -> RemoteStoreError {
        switch answer.status {
        case 401, 403, 404, 429, 500...599:
            return connection.failure(answer)
        case 408:
            return .server("\(reference.host): HTTP 408 for \(method) \(answer.url.path)")
        default:
            let summary = RegistrySource.registryErrorSummary(answer.errorBody)
            return .invalidContent("\(reference.host) refused \(method) \(answer.url.path) (HTTP \(answer.status)\(summary))")
        }
    }

    /// As `refusal`, for a request to an upload session: a session the registry no longer
    /// knows (404), or whose progress it counts otherwise (416), is recovered from, not refused.
    private func sessionRefusal(_ answer: RegistryConnection.Answer, of method: String) -> RemoteStoreError {
        guard answer.status == 404 || answer.status == 416 else { return refusal(answer, of: method) }
        let summary = RegistrySource.registryErrorSummary(answer.errorBody)
        return .server("\(reference.host): upload session lost or out of step (HTTP \(answer.status) for \(method)\(summary))")
    }

    /// Runs `attempt` until it succeeds, fails in a way that will not pass, or has failed
    /// `attempts` times, pausing between tries as reads do; `afterFailure` readies the next try.
    private func withAttempts<Result>(_ what: String, _ attempt: () throws(RemoteStoreError) -> Result,
                                      afterFailure: () -> Void = {}) throws(RemoteStoreError) -> Result {
        var failures = 0
        while true {
            do {
                return try attempt()
            } catch {
                failures += 1
                // A stall is tried again too, as for manifests: each try is bounded, and so is their number.
                let mayPass = if case .timedOut = error { true } else { error.isTransient }
                guard mayPass, failures < Self.attempts else { throw error }
                logger.warning("retrying", metadata: ["what": "\(what)", "attempt": "\(failures)", "error": "\(error)"])
                SystemThread.sleep(for: RetryBackoff.pause(afterFailures: failures))
                afterFailure()
            }
        }
    }
}

/// An upload that starts while the client still writes the blob (`beginEarlyUpload`).
private final class RegistryEarlyUpload: EarlyBlobUpload {
    let publisher: RegistryPublisher
    let contents: any GrowingBlobContents
    /// The session `run` filled, or why it could not.
    private let outcome = EarlyRunOutcome<UploadSession>()
    /// Finished or abandoned: the session is no one's any more.
    private let settled = Atomic<Bool>(false)

    init(publisher: RegistryPublisher, contents: any GrowingBlobContents) {
        self.publisher = publisher
        self.contents = contents
    }

    func run() { outcome.record { () throws(RemoteStoreError) in try publisher.sendEarly(contents) } }

    func finish(as digest: Digest, size: Int64) throws -> BlobPublication {
        let session = try outcome.wait().get()
        guard session.offset == size else {
            throw RemoteStoreError.invalidContent("\(session.offset) bytes were sent before the commit, the blob has \(size)")
        }
        guard !settled.exchange(true, ordering: .acquiringAndReleasing) else {
            throw RemoteStoreError.invalidContent("the early upload was already finished or abandoned")
        }
        try publisher.finishEarly(session, as: digest)
        return .uploaded(bytes: size)
    }

    func abandon() {
        guard case .success(let session) = outcome.wait(), !settled.exchange(true, ordering: .acquiringAndReleasing) else { return }
        publisher.abandonEarly(session)
    }
}

/// The request body of one PATCH of an early upload: the contents from `start` as they are
/// written, up to `limit` bytes.
private final class GrowingContentsBody: StreamedRequestBody {
    let contents: any GrowingBlobContents
    let start: Int64
    let limit: Int64
    private let count = Atomic<Int64>(0)
    private let ended = Atomic<Bool>(false)

    init(_ contents: any GrowingBlobContents, from start: Int64, limit: Int64) {
        self.contents = contents
        self.start = start
        self.limit = limit
    }

    /// Bytes handed to the transport so far.
    var sent: Int64 { count.load(ordering: .acquiring) }
    /// Whether the contents ended (they are final) within this body.
    var reachedEnd: Bool { ended.load(ordering: .acquiring) }
    /// Why the contents were given up, when they were: the body then ended early, but cleanly,
    /// so that the answer's Location can delete the session.
    var givenUp: String? { failure.withLock { $0 } }
    private let failure = Mutex<String?>(nil)

    func next(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let room = Int(min(Int64(buffer.count), limit - sent))
        guard room > 0, givenUp == nil else { return 0 }
        let got: Int
        do {
            got = try contents.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<room]), at: start + sent)
        } catch {
            failure.withLock { $0 = "\(error)" }
            return 0
        }
        if got == 0 { ended.store(true, ordering: .releasing) }
        count.add(Int64(got), ordering: .releasing)
        return got
    }
}

/// Where an upload session takes its next request, and how much of the blob the registry holds.
private struct UploadSession {
    var location: URL
    var offset: Int64
    /// The registry's smallest chunk (`OCI-Chunk-Min-Length`), 0 when it names none.
    var minimumChunk: Int64
}

/// One blob's way to the registry across attempts: its session, and its file, opened only
/// when bytes must be sent and closed when the publication ends.
private final class BlobUpload {
    let digest: Digest
    let size: Int64
    let path: String
    var session: UploadSession?
    /// Whether an attempt sent the bytes (so that the blob found present later is an upload).
    var sentBytes = false
    private var descriptor: Int32 = -1

    init(digest: Digest, size: Int64, path: String) {
        self.digest = digest
        self.size = size
        self.path = path
    }

    func file() throws(RemoteStoreError) -> Int32 {
        if descriptor >= 0 { return descriptor }
        let opened = open(path, O_RDONLY | O_CLOEXEC)
        guard opened >= 0 else {
            throw .invalidContent("cannot open \(path): \(Errno(rawValue: errno).description)")
        }
        var info = stat()
        guard fstat(opened, &info) == 0, Int64(info.st_size) == size else {
            close(opened)
            throw .invalidContent("\(path) is not the \(size) bytes of blob \(digest)")
        }
        descriptor = opened
        return opened
    }

    deinit {
        if descriptor >= 0 { close(descriptor) }
    }
}

extension RemoteStoreError {
    /// The same failure, its line led by what it befell.
    fileprivate func about(_ context: String) -> RemoteStoreError {
        switch self {
        case .unauthorized(let message): return .unauthorized("\(context): \(message)")
        case .notFound(let message): return .notFound("\(context): \(message)")
        case .invalidContent(let message): return .invalidContent("\(context): \(message)")
        case .server(let message): return .server("\(context): \(message)")
        case .transport(let message): return .transport("\(context): \(message)")
        case .timedOut(let message): return .timedOut("\(context): \(message)")
        case .configuration(let message): return .configuration("\(context): \(message)")
        }
    }
}
