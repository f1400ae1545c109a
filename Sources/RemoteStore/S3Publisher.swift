import Dispatch
import FoundationEssentials
import HTTPClient
import Logging
import OCI
import Synchronization
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Publishes what a client exported into a writable mount to BuildKit's `type=s3` cache, as
/// BuildKit's own S3 exporter does (`cache/remotecache/s3/s3.go`): a blob at `blobKey` is sent
/// once, and later only refreshed (copied onto itself) when older than `touchRefresh`, so that
/// a bucket's lifecycle rules expire only blobs no export uses; a tag is the S3 manifest object
/// at `manifestKey`, written last. Every byte sent is covered by the SHA-256 its request is
/// signed with, so S3 itself refuses a body damaged on the way.
public final class S3Publisher: CachePublisher {
    public let location: S3Location
    private let client: S3Client
    private let logger: Logger
    private let touchRefresh: Duration
    private let multipartThreshold: Int64
    private let partSize: Int64
    private let partParallelism: Int
    private let largestCopy: Int64

    /// S3's multipart limits: every part but the last at least 5 MiB, at most 10,000 parts.
    static let minimumPartSize: Int64 = 5 << 20
    static let maximumParts: Int64 = 10_000
    /// CopyObject takes sources below 5 GiB; a larger blob is refreshed part by part.
    static let largestSingleCopy: Int64 = 5 << 30
    /// Attempts per request, as for the reads of small documents.
    static let attempts = 3
    /// The XML answers of these requests are a few hundred bytes.
    static let maximumAnswerSize = 1 << 20

    public var displayName: String { location.displayName }

    /// - Parameters:
    ///   - touchRefresh: a blob already on S3 and older than this is copied onto itself
    ///     (BuildKit's `touch_refresh`, 24 hours).
    ///   - multipartThreshold: larger blobs are sent in parts.
    ///   - partSize: the size of those parts; S3 wants at least 5 MiB, and a blob too large for
    ///     10,000 parts gets larger ones.
    ///   - partParallelism: parts in flight at once, each on its own thread (BuildKit's
    ///     `upload_parallelism`, 4).
    public convenience init(location: S3Location, credentials: any AWSCredentialProvider, transport: any HTTPTransport,
                            timeout: Duration, logger: Logger, touchRefresh: Duration = .seconds(24 * 60 * 60),
                            multipartThreshold: Int64 = defaultSingleRequestUploadLimit, partSize: Int64 = 16 << 20, partParallelism: Int = 4) {
        self.init(location: location, credentials: credentials, transport: transport, timeout: timeout, logger: logger,
                  touchRefresh: touchRefresh, multipartThreshold: multipartThreshold, partSize: partSize,
                  partParallelism: partParallelism, largestCopy: Self.largestSingleCopy)
    }

    /// `largestCopy` lowers the size above which a refresh copies part by part, for tests.
    package init(location: S3Location, credentials: any AWSCredentialProvider, transport: any HTTPTransport,
                 timeout: Duration, logger: Logger, touchRefresh: Duration, multipartThreshold: Int64, partSize: Int64,
                 partParallelism: Int, largestCopy: Int64) {
        self.location = location
        self.client = S3Client(location: location, credentials: credentials, transport: transport, timeout: timeout)
        self.logger = logger
        self.touchRefresh = touchRefresh
        self.multipartThreshold = max(multipartThreshold, 0)
        self.partSize = max(partSize, Self.minimumPartSize)
        self.partParallelism = max(partParallelism, 1)
        self.largestCopy = min(max(largestCopy, Self.minimumPartSize), Self.largestSingleCopy)
    }

    // MARK: Blobs

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        let key = location.blobKey(digest.description)
        if let existing = try existingObject(key) {
            if existing.size == size {
                if existing.isOlder(than: touchRefresh) { try refresh(key, size: size) }
                return .alreadyPresent
            }
            // Not the blob (a failed write of another tool?): what the mount sends replaces it.
            logger.warning("replacing an S3 object whose size is not the blob's", metadata: [
                "key": "\(key)", "objectSize": "\(existing.size.map(String.init) ?? "unknown")", "blobSize": "\(size)",
            ])
        }
        try upload(digest, size: size, from: path, to: key)
        logger.debug("uploaded blob", metadata: ["key": "\(key)", "bytes": "\(size)"])
        return .uploaded(bytes: size)
    }

    private struct ExistingObject {
        var size: Int64?
        var lastModified: Date?

        /// An object of unknown age is refreshed: a refresh is cheap, an expired blob is not.
        func isOlder(than age: Duration) -> Bool {
            guard let lastModified else { return true }
            let (seconds, attoseconds) = age.components
            return Date().timeIntervalSince(lastModified) >= Double(seconds) + Double(attoseconds) / 1e18
        }
    }

    /// HeadObject: nil when there is no such object.
    private func existingObject(_ key: String) throws(RemoteStoreError) -> ExistingObject? {
        let head: HTTPResponseHead
        do {
            head = try request("HEAD", key: key, totalTimeout: client.timeout).head
        } catch .notFound {
            return nil
        }
        return ExistingObject(size: head.headers["Content-Length"].flatMap { Int64($0) },
                              lastModified: head.headers["Last-Modified"].flatMap(Self.httpDate))
    }

    /// CopyObject of the object onto itself, which S3 allows only with new metadata: the object
    /// is rewritten and its age starts again.
    private func refresh(_ key: String, size: Int64) throws(RemoteStoreError) {
        let source = SigV4.uriEncode(location.bucket + "/" + key, encodeSlash: false)
        if size < largestCopy {
            var headers = HTTPHeaders()
            headers.add("x-amz-copy-source", source)
            headers.add("x-amz-metadata-directive", "REPLACE")
            headers.add("x-amz-meta-updated-at", Self.timestamp(Date()))
            _ = try request("PUT", key: key, headers: headers, totalTimeout: nil)
        } else {
            try multipartUpload(key, size: size, partSize: largestCopy) { [self] uploadID, number, range throws(RemoteStoreError) in
                var headers = HTTPHeaders()
                headers.add("x-amz-copy-source", source)
                headers.add("x-amz-copy-source-range", "bytes=\(range.lowerBound)-\(range.upperBound - 1)")
                let answer = try request("PUT", key: key, query: Self.partQuery(number, uploadID), headers: headers, totalTimeout: nil)
                guard let etag = S3XML.text(of: "ETag", in: answer.body) else {
                    throw .invalidContent("\(displayName): UploadPartCopy \(number) of \(key) answered no ETag")
                }
                return etag
            }
        }
        logger.debug("refreshed blob", metadata: ["key": "\(key)", "bytes": "\(size)"])
    }

    /// PutObject of the whole blob, signed with its digest, or a multipart upload of its parts,
    /// each signed with its own SHA-256. The file is read while it is sent.
    private func upload(_ digest: Digest, size: Int64, from path: String, to key: String) throws(RemoteStoreError) {
        let file = open(path, O_RDONLY | O_CLOEXEC)
        guard file >= 0 else { throw .invalidContent("\(displayName): cannot open blob \(digest) at \(path): \(Self.errnoText())") }
        defer { close(file) }
        var info = stat()
        guard fstat(file, &info) == 0 else { throw .invalidContent("\(displayName): cannot stat \(path): \(Self.errnoText())") }
        guard Int64(info.st_size) == size else {
            throw .invalidContent("\(displayName): \(path) holds \(info.st_size) bytes, not the \(size) of blob \(digest)")
        }
        if size <= multipartThreshold {
            _ = try request("PUT", key: key, body: .fileRange(descriptor: file, offset: 0, length: size), payloadHash: digest.hex,
                            totalTimeout: nil)
            return
        }
        let parts = max(partSize, (size + Self.maximumParts - 1) / Self.maximumParts)
        try multipartUpload(key, size: size, partSize: parts) { [self] uploadID, number, range throws(RemoteStoreError) in
            let hash = try Self.sha256Hex(of: file, range: range, path: path)
            let answer = try request("PUT", key: key, query: Self.partQuery(number, uploadID),
                                     body: .fileRange(descriptor: file, offset: range.lowerBound, length: Int64(range.count)),
                                     payloadHash: hash, totalTimeout: nil)
            guard let etag = answer.head.headers["ETag"] else {
                throw .invalidContent("\(displayName): UploadPart \(number) of \(key) answered no ETag")
            }
            return etag
        }
    }

    // MARK: Early uploads

    /// A blob the client announced (`AnnouncedBlob`) that fits in one request is sent while it
    /// is written: the PutObject of the announced key, signed with the announced digest. Its
    /// last byte waits for the commit, and goes only when the commit verified the bytes as the
    /// announced blob; otherwise the request is cut short and S3 stores nothing, whether or not
    /// the server checks the hash the request was signed with.
    public func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)? {
        guard let announced = contents.announced, announced.size > 0, announced.size <= multipartThreshold else { return nil }
        return S3EarlyUpload(publisher: self, contents: contents, announced: announced)
    }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                            sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication {
        if let published = early?.finishOrAbandon(as: digest, size: size, logger: logger) { return published }
        return try publishBlob(digest, size: size, contentsAt: path)
    }

    /// `S3EarlyUpload.run`: false when S3 already holds an object of the announced size (the
    /// commit then publishes the ordinary way, refreshing it if it is old).
    fileprivate func sendEarly(_ contents: any GrowingBlobContents, announced: AnnouncedBlob) throws(RemoteStoreError) -> Bool {
        let key = location.blobKey(announced.digest.description)
        if let existing = try existingObject(key), existing.size == announced.size { return false }
        // One attempt: the body cannot be made again, and the commit's ordinary upload retries.
        _ = try request("PUT", key: key, body: .stream(AnnouncedBlobBody(contents, announced: announced)),
                        payloadHash: announced.digest.hex, totalTimeout: nil, attempts: 1)
        logger.debug("uploaded blob while it was written", metadata: ["key": "\(key)", "bytes": "\(announced.size)"])
        return true
    }

    // MARK: Multipart uploads

    /// CreateMultipartUpload, `send` for every part (numbered from 1, `partParallelism` at a
    /// time, each on a thread of its own), CompleteMultipartUpload with their ETags; when any of
    /// it fails for good, AbortMultipartUpload, so that no part stays stored (and billed).
    private func multipartUpload(_ key: String, size: Int64, partSize: Int64,
                                 send: @escaping @Sendable (_ uploadID: String, _ number: Int, _ range: Range<Int64>)
                                     throws(RemoteStoreError) -> String) throws(RemoteStoreError) {
        let created = try request("POST", key: key, query: [("uploads", "")], totalTimeout: client.timeout)
        guard let uploadID = S3XML.text(of: "UploadId", in: created.body), !uploadID.isEmpty else {
            throw .invalidContent("\(displayName): CreateMultipartUpload of \(key) answered no UploadId")
        }
        do {
            let count = Int((size + partSize - 1) / partSize)
            let etags = try sendParts(count: count) { index throws(RemoteStoreError) in
                let start = Int64(index) * partSize
                return try send(uploadID, index + 1, start..<min(start + partSize, size))
            }
            let parts = etags.enumerated().map { index, etag in
                "<Part><PartNumber>\(index + 1)</PartNumber><ETag>\(S3XML.escaped(etag))</ETag></Part>"
            }
            let document = #"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#
                + parts.joined() + "</CompleteMultipartUpload>"
            _ = try request("POST", key: key, query: [("uploadId", uploadID)], body: .bytes(Array(document.utf8)),
                            totalTimeout: nil)
        } catch {
            do {
                _ = try request("DELETE", key: key, query: [("uploadId", uploadID)], totalTimeout: client.timeout)
            } catch let abortError {
                logger.warning("cannot abort the multipart upload; its parts stay until a bucket lifecycle rule removes them",
                               metadata: ["key": "\(key)", "uploadId": "\(uploadID)", "error": "\(abortError)"])
            }
            throw error
        }
    }

    /// Runs `send(0..<count)` on up to `partParallelism` threads; after a failure no new part
    /// starts, and the first failure is thrown once every thread has stopped.
    private func sendParts(count: Int, _ send: @escaping @Sendable (Int) throws(RemoteStoreError) -> String)
        throws(RemoteStoreError) -> [String] {
        let queue = PartQueue(count: count)
        let stopped = DispatchSemaphore(value: 0)
        let workers = min(partParallelism, count)
        for _ in 0..<workers {
            SystemThread.start(named: "ocicachefs-part") {
                defer { stopped.signal() }
                while let index = queue.next() {
                    do throws(RemoteStoreError) {
                        queue.finish(index, etag: try send(index))
                    } catch {
                        queue.fail(error)
                        return
                    }
                }
            }
        }
        // Each thread stops within its requests' bounds.
        for _ in 0..<workers { stopped.wait() }
        return try queue.etags()
    }

    private final class PartQueue: Sendable {
        private struct State {
            var next = 0
            var etags: [String?]
            var failure: RemoteStoreError?
        }
        private let state: Mutex<State>

        init(count: Int) { state = Mutex(State(etags: Array(repeating: nil, count: count))) }

        func next() -> Int? {
            state.withLock { state in
                guard state.failure == nil, state.next < state.etags.count else { return nil }
                defer { state.next += 1 }
                return state.next
            }
        }

        func finish(_ index: Int, etag: String) { state.withLock { $0.etags[index] = etag } }

        func fail(_ error: RemoteStoreError) { state.withLock { if $0.failure == nil { $0.failure = error } } }

        func etags() throws(RemoteStoreError) -> [String] {
            let (etags, failure) = state.withLock { ($0.etags, $0.failure) }
            if let failure { throw failure }
            return etags.map { $0 ?? "" }
        }
    }

    private static func partQuery(_ number: Int, _ uploadID: String) -> [(String, String)] {
        [("partNumber", String(number)), ("uploadId", uploadID)]
    }

    // MARK: Tags

    public func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8],
                           smallBlob: (Digest) -> [UInt8]?) throws {
        let object = try Self.manifestObject(tag: tag, manifest: manifest, manifestBytes: manifestBytes,
                                             smallBlob: smallBlob, source: displayName)
        let key = location.manifestKey(tag)
        _ = try request("PUT", key: key, body: .bytes(object), totalTimeout: client.timeout)
        logger.debug("published tag", metadata: ["key": "\(key)", "manifest": "\(manifest.digest)"])
    }

    /// BuildKit's S3 manifest object for a manifest of either BuildKit variant and its cache
    /// config (from `smallBlob`, checked against its descriptor); anything BuildKit's S3 cache
    /// cannot hold is refused in one line.
    package static func manifestObject(tag: String, manifest: Descriptor, manifestBytes: [UInt8],
                                       smallBlob: (Digest) -> [UInt8]?, source: String) throws(RemoteStoreError) -> [UInt8] {
        func refused(_ reason: String) -> RemoteStoreError {
            .invalidContent("\(source): tag \(tag.escapingControlCharacters): manifest \(manifest.digest) "
                            + "cannot be published to S3: \(reason)")
        }
        // Keys are concatenated and sent as URL paths, where `.` and `..` segments would be
        // resolved away (curl does) and land outside the manifests prefix.
        let segments = tag.split(separator: "/", omittingEmptySubsequences: false)
        guard !tag.isEmpty, !segments.contains(where: { $0 == "." || $0 == ".." }) else { throw refused("the tag is not a usable key") }
        guard Digest.sha256(of: manifestBytes) == manifest.digest, Int64(manifestBytes.count) == manifest.size else {
            throw refused("the bytes given for it are not that manifest")
        }
        let layers: [Descriptor], config: Descriptor
        do {
            (layers, config) = try BuildKitS3Cache.parts(of: ManifestContent.parse(manifestBytes, contentType: manifest.mediaType))
        } catch {
            throw refused(error.description)
        }
        guard let configBytes = smallBlob(config.digest) else { throw refused("its cache config \(config.digest) is not available") }
        guard Digest.sha256(of: configBytes) == config.digest, Int64(configBytes.count) == config.size else {
            throw refused("the bytes given for its cache config \(config.digest) are not that blob")
        }
        do {
            return try BuildKitS3Cache.manifestObject(cacheConfig: configBytes, layers: layers)
        } catch {
            throw refused(error.description)
        }
    }

    // MARK: Requests

    /// One request, tried again after failures that may pass (within `attempts`, pausing as
    /// `RetryBackoff` says); the answer's body, always small here, is collected. An error
    /// document in a 2xx answer is a failure like any other.
    private func request(_ method: String, key: String, query: [(String, String)] = [], headers: HTTPHeaders = HTTPHeaders(),
                         body: HTTPRequestBody? = nil, payloadHash: String? = nil, totalTimeout: Duration?,
                         attempts: Int = attempts) throws(RemoteStoreError) -> HTTPResponse {
        let what = "\(displayName): \(method) \(key)"
        var failures = 0
        while true {
            let failure: RemoteStoreError
            do {
                var answer: [UInt8] = []
                let head = try client.perform(method, key: key, query: query, headers: headers, body: body, payloadHash: payloadHash,
                                              totalTimeout: totalTimeout, onBody: { chunk in
                    guard answer.count + chunk.count <= Self.maximumAnswerSize else {
                        throw RemoteStoreError.invalidContent("\(what): answer larger than \(Self.maximumAnswerSize) bytes")
                    }
                    answer.append(contentsOf: chunk)
                })
                if S3ErrorResponse.isErrorDocument(answer) {
                    throw S3ErrorResponse(status: head.status, headers: head.headers, body: answer)
                        .remoteStoreError(context: "\(location.bucket)/\(key)", region: location.region)
                }
                return HTTPResponse(head: head, body: answer)
            } catch let error as RemoteStoreError {
                failure = error
            } catch {
                failure = .transport("\(what): \(error)")
            }
            failures += 1
            guard failure.isTransient, failures < attempts else { throw failure }
            logger.warning("retrying", metadata: ["what": "\(what)", "attempt": "\(failures)", "error": "\(failure)"])
            SystemThread.sleep(for: RetryBackoff.pause(afterFailures: failures))
        }
    }

    // MARK: Helpers

    /// The SHA-256 of a part, read before it is sent, for its signature.
    private static func sha256Hex(of file: Int32, range: Range<Int64>, path: String) throws(RemoteStoreError) -> String {
        var verifier = DigestVerifier()
        var buffer = [UInt8](repeating: 0, count: 256 << 10)
        var offset = range.lowerBound
        while offset < range.upperBound {
            let wanted = Int(min(Int64(buffer.count), range.upperBound - offset))
            let count = buffer.withUnsafeMutableBytes { pread(file, $0.baseAddress, wanted, off_t(offset)) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else {
                throw .invalidContent("cannot read \(path) at \(offset): \(count == 0 ? "end of file" : errnoText())")
            }
            buffer.withUnsafeBytes { verifier.update(UnsafeRawBufferPointer(rebasing: $0[..<count])) }
            offset += Int64(count)
        }
        return verifier.finalize().hex
    }

    private static func errnoText() -> String { String(cString: strerror(errno)) }

    private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    /// `Wed, 21 Oct 2015 07:28:00 GMT`, the only date form S3 sends (RFC 9110's IMF-fixdate).
    static func httpDate(_ text: String) -> Date? {
        let fields = text.split(separator: " ")
        guard fields.count == 6, fields[5] == "GMT", let day = Int(fields[1]), let year = Int(fields[3]),
              let month = months.firstIndex(of: String(fields[2])) else { return nil }
        let time = fields[4].split(separator: ":").compactMap { Int($0) }
        guard time.count == 3 else { return nil }
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .gmt
        return calendar.date(from: DateComponents(year: year, month: month + 1, day: day,
                                                  hour: time[0], minute: time[1], second: time[2]))
    }

    /// `2025-06-01T10:00:00Z`, for the metadata a refresh sets.
    private static func timestamp(_ date: Date) -> String {
        date.formatted(Date.ISO8601FormatStyle())
    }
}

/// An upload of an announced blob while the client writes it (`S3Publisher.beginEarlyUpload`).
private final class S3EarlyUpload: EarlyBlobUpload {
    let publisher: S3Publisher
    let contents: any GrowingBlobContents
    let announced: AnnouncedBlob
    /// Whether `run` stored the blob (false: S3 already held it), or why it could not.
    private let outcome = EarlyRunOutcome<Bool>()

    init(publisher: S3Publisher, contents: any GrowingBlobContents, announced: AnnouncedBlob) {
        self.publisher = publisher
        self.contents = contents
        self.announced = announced
    }

    func run() { outcome.record { () throws(RemoteStoreError) in try publisher.sendEarly(contents, announced: announced) } }

    func finish(as digest: Digest, size: Int64) throws -> BlobPublication {
        guard try outcome.wait().get() else { throw EarlyUploadNotSent() }
        // The last byte went only once the commit verified the bytes as the announced blob.
        guard digest == announced.digest, size == announced.size else {
            throw RemoteStoreError.invalidContent("blob \(announced.digest) was sent before the commit, not \(digest)")
        }
        return .uploaded(bytes: size)
    }

    /// What a cut request sent, S3 does not keep; what a whole one sent is the announced blob.
    func abandon() { _ = outcome.wait() }
}

/// The body of an announced blob's PutObject: the contents as they are written, the last byte
/// only once the commit verified them as that blob.
private final class AnnouncedBlobBody: StreamedRequestBody {
    let contents: any GrowingBlobContents
    let announced: AnnouncedBlob
    private let count = Atomic<Int64>(0)

    init(_ contents: any GrowingBlobContents, announced: AnnouncedBlob) {
        self.contents = contents
        self.announced = announced
    }

    var length: Int64? { announced.size }

    func next(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let sent = count.load(ordering: .relaxed)
        guard sent < announced.size else { return 0 }
        let lastByte = sent == announced.size - 1
        if lastByte {
            let committed = try contents.committed()
            guard committed.digest == announced.digest, committed.size == announced.size else {
                throw RemoteStoreError.invalidContent(
                    "the bytes were committed as \(committed.digest) (\(committed.size) bytes), not as the announced \(announced.digest) (\(announced.size) bytes)")
            }
        }
        let room = lastByte ? 1 : Int(min(Int64(buffer.count), announced.size - 1 - sent))
        let got = try contents.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<room]), at: sent)
        guard got > 0 else {
            throw RemoteStoreError.invalidContent("the contents ended after \(sent) bytes; \(announced.size) were announced")
        }
        count.add(Int64(got), ordering: .relaxed)
        return got
    }
}
