internal import CCurl
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The real `HTTPTransport`: libcurl's easy interface, one blocking transfer per call on the
/// caller's thread.
///
/// Idle easy handles are pooled and reset between requests; a handle keeps its connection
/// cache across `curl_easy_reset`, so sequential requests to one host reuse keep-alive
/// connections. A handle belongs either to the pool or to exactly one running `execute`.
/// Only a handle whose last exchange succeeded goes back to the pool: `curl_easy_reset` does not
/// undo everything a failed transfer leaves behind (libcurl 7.88 keeps the receive buffer of a
/// transfer that failed before connecting, after which setting BUFFERSIZE fails forever).
public final class CurlTransport: HTTPTransport {
    /// `curl_global_init` runs once per process, on first use (a `static let` is initialised
    /// exactly once, thread-safely).
    private static let globalInitResult: CURLcode = curl_global_init(CCurl_GLOBAL_ALL())

    private let idleHandles = Mutex<[EasyHandle]>([])
    private let maxIdleHandles: Int
    private let receiveBufferSize: Int
    private let certificateAuthorities: String?
    /// libcurl's upload buffer: what one read of a request body fills and one send passes on.
    /// Against libcurl's 64 KiB it cost the daemon less CPU per exported GiB, for 192 KiB more
    /// per upload in flight (docs/performance.md, "Measurements behind design choices").
    static let uploadBufferSize = 256 * 1024

    /// - Parameters:
    ///   - maxIdleHandles: easy handles (each with its own connection cache) kept for reuse.
    ///   - receiveBufferSize: libcurl's receive buffer, the largest chunk `onBody` gets. Each
    ///     handle in use holds one: 64 KiB read a 1 GiB blob as fast as 256 KiB did on loopback,
    ///     with 3 MiB less peak RSS over 16 connections.
    ///   - certificateAuthorities: a PEM file of the certificate authorities that HTTPS peers
    ///     are verified against, in place of libcurl's default bundle (curl's CAINFO); check it
    ///     first with `checkCertificateFile`, since libcurl reads it only at a TLS handshake.
    public init(maxIdleHandles: Int = 8, receiveBufferSize: Int = 64 * 1024, certificateAuthorities: String? = nil) {
        _ = Self.globalInitResult
        self.maxIdleHandles = max(0, maxIdleHandles)
        self.receiveBufferSize = min(max(receiveBufferSize, 1024), 10 * 1024 * 1024)
        self.certificateAuthorities = certificateAuthorities
    }

    public func execute(
        _ request: HTTPRequest,
        onResponse: (HTTPResponseHead) throws -> Void,
        onBody: (UnsafeRawBufferPointer) throws -> Void
    ) throws {
        guard Self.globalInitResult == CURLE_OK else {
            throw HTTPTransportError.connectionFailed("libcurl initialisation failed")
        }
        let handle = try checkOut()
        var succeeded = false
        defer {
            // A handle that saw any error is dropped (curl_easy_cleanup), never reused as is.
            if succeeded { checkIn(handle) }
        }
        try withoutActuallyEscaping(onResponse) { onResponse in
            try withoutActuallyEscaping(onBody) { onBody in
                // The context (and the closures in it) dies before these scopes end: curl only
                // calls back inside `perform`, and the handle's pointers to it are reset on
                // checkIn or die with the handle.
                let context = TransferContext(onResponse: onResponse, onBody: onBody,
                                              stallTimeout: request.stallTimeout)
                try perform(request, handle: handle, context: context)
            }
        }
        succeeded = true
    }

    // MARK: - Handle pool

    private func checkOut() throws -> EasyHandle {
        if let handle = idleHandles.withLock({ $0.popLast() }) { return handle }
        guard let handle = EasyHandle() else {
            throw HTTPTransportError.connectionFailed("curl_easy_init failed")
        }
        return handle
    }

    private func checkIn(_ handle: EasyHandle) {
        // Drops every option, including the pointers to this transfer's context and body,
        // while keeping the handle's live connections.
        curl_easy_reset(handle.raw)
        let rejected: EasyHandle? = idleHandles.withLock { idle in
            guard idle.count < maxIdleHandles else { return handle }
            idle.append(handle)
            return nil
        }
        _ = rejected  // released (curl_easy_cleanup) here, outside the lock
    }

    // MARK: - One transfer

    private func perform(_ request: HTTPRequest, handle: EasyHandle, context: TransferContext) throws {
        let curl = handle.raw
        curl_easy_reset(curl)
        // SAFETY: the buffer has CURL_ERROR_SIZE bytes and this call owns the handle.
        handle.errorBuffer[0] = 0

        try Self.checkURL(request.url)
        // SAFETY: the list is freed after curl_easy_perform, and checkIn's reset drops curl's
        // pointer to it before the handle is used again (or the handle is dropped).
        var headerList = try Self.makeHeaderList(request.headers)
        defer { curl_slist_free_all(headerList) }

        try check(CCurl_easy_setopt_string(curl, CURLOPT_URL, request.url), "URL")
        try check(CCurl_easy_setopt_string(curl, CURLOPT_PROTOCOLS_STR, "http,https"), "protocols")
        // SAFETY: the error buffer lives as long as the handle (CURL_ERROR_SIZE bytes).
        try check(CCurl_easy_setopt_pointer(curl, CURLOPT_ERRORBUFFER, handle.errorBuffer), "error buffer")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_NOSIGNAL, 1), "NOSIGNAL")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_FOLLOWLOCATION, 0), "FOLLOWLOCATION")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_TCP_KEEPALIVE, 1), "TCP_KEEPALIVE")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_BUFFERSIZE, receiveBufferSize), "BUFFERSIZE")
        if !request.verifiesTLSPeer {
            try check(CCurl_easy_setopt_long(curl, CURLOPT_SSL_VERIFYPEER, 0), "SSL_VERIFYPEER")
            try check(CCurl_easy_setopt_long(curl, CURLOPT_SSL_VERIFYHOST, 0), "SSL_VERIFYHOST")
        } else if let certificateAuthorities {
            try check(CCurl_easy_setopt_string(curl, CURLOPT_CAINFO, certificateAuthorities), "CAINFO")
        }
        // Best effort: a libcurl built without HTTP/2 keeps speaking HTTP/1.1.
        _ = CCurl_easy_setopt_long(curl, CURLOPT_HTTP_VERSION, CCurl_HTTP_VERSION_2TLS())

        let stallMillis = Self.milliseconds(request.stallTimeout)
        try check(CCurl_easy_setopt_long(curl, CURLOPT_CONNECTTIMEOUT_MS, stallMillis), "CONNECTTIMEOUT_MS")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_LOW_SPEED_LIMIT, 1), "LOW_SPEED_LIMIT")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_LOW_SPEED_TIME, max(1, (stallMillis + 999) / 1000)),
                  "LOW_SPEED_TIME")
        if let total = request.totalTimeout {
            try check(CCurl_easy_setopt_long(curl, CURLOPT_TIMEOUT_MS, Self.milliseconds(total)), "TIMEOUT_MS")
        }

        // SAFETY: `context` outlives the transfer: `execute` holds it until `perform` returns,
        // curl calls back only inside `curl_easy_perform`, and checkIn resets the pointers.
        let contextPointer = Unmanaged.passUnretained(context).toOpaque()
        try check(CCurl_easy_setopt_write_callback(curl, CURLOPT_HEADERFUNCTION, curlHeaderCallback), "HEADERFUNCTION")
        try check(CCurl_easy_setopt_pointer(curl, CURLOPT_HEADERDATA, contextPointer), "HEADERDATA")
        try check(CCurl_easy_setopt_write_callback(curl, CURLOPT_WRITEFUNCTION, curlWriteCallback), "WRITEFUNCTION")
        try check(CCurl_easy_setopt_pointer(curl, CURLOPT_WRITEDATA, contextPointer), "WRITEDATA")
        // LOW_SPEED_* averages over several seconds, so a stall after some bytes is noticed late;
        // the progress callback enforces "no byte for stallTimeout" to about a second.
        try check(CCurl_easy_setopt_xferinfo_callback(curl, CURLOPT_XFERINFOFUNCTION, curlProgressCallback),
                  "XFERINFOFUNCTION")
        try check(CCurl_easy_setopt_pointer(curl, CURLOPT_XFERINFODATA, contextPointer), "XFERINFODATA")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_NOPROGRESS, 0), "NOPROGRESS")

        let method = request.method
        guard !method.isEmpty, method.utf8.allSatisfy(Self.isTokenByte) else {
            throw HTTPTransportError.invalidRequest("invalid request method")
        }
        let body: HTTPRequestBody? = method == "HEAD" ? nil : request.body
        let sendsBody = body != nil || method == "POST" || method == "PUT" || method == "PATCH"
        switch method {
        case "HEAD":
            try check(CCurl_easy_setopt_long(curl, CURLOPT_NOBODY, 1), "NOBODY")
        case "GET" where body == nil:
            try check(CCurl_easy_setopt_long(curl, CURLOPT_HTTPGET, 1), "HTTPGET")
        case "POST":
            break  // the body setup below makes it a POST
        default:
            try check(CCurl_easy_setopt_string(curl, CURLOPT_CUSTOMREQUEST, method), "CUSTOMREQUEST")
        }
        if sendsBody, request.headers["Content-Type"] == nil {
            // libcurl adds a form Content-Type to a POSTFIELDS body: suppress it unless the
            // caller chose one.
            headerList = try Self.append(headerList, "Content-Type:")
        }
        try check(CCurl_easy_setopt_slist(curl, CURLOPT_HTTPHEADER, headerList), "HTTPHEADER")

        let code: CURLcode
        switch body {
        case .bytes(let bytes)? where !bytes.isEmpty:
            code = try bytes.withUnsafeBytes { bytes in
                try check(CCurl_easy_setopt_off_t(curl, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(bytes.count)),
                          "POSTFIELDSIZE_LARGE")
                // SAFETY: `bytes` stays valid until this closure returns, after curl_easy_perform;
                // checkIn resets the option before the handle is used again.
                try check(CCurl_easy_setopt_const_pointer(curl, CURLOPT_POSTFIELDS, bytes.baseAddress), "POSTFIELDS")
                return curl_easy_perform(curl)
            }
        case .fileRange(let descriptor, let offset, let length)? where length > 0:
            guard descriptor >= 0, offset >= 0 else {
                throw HTTPTransportError.invalidRequest("request body from an invalid file range")
            }
            context.upload = .file(FileRangeReader(descriptor: descriptor, offset: offset, length: length))
            // UPLOAD sends the body through the read callback, as a PUT unless CUSTOMREQUEST
            // named another method; the known size gives a Content-Length, not chunked framing.
            try check(CCurl_easy_setopt_long(curl, CURLOPT_UPLOAD, 1), "UPLOAD")
            try check(CCurl_easy_setopt_off_t(curl, CURLOPT_INFILESIZE_LARGE, curl_off_t(length)), "INFILESIZE_LARGE")
            try readBodyThroughCallback(curl, method: method, context: contextPointer)
            code = curl_easy_perform(curl)
        case .stream(let stream)?:
            context.upload = .stream(stream)
            try check(CCurl_easy_setopt_long(curl, CURLOPT_UPLOAD, 1), "UPLOAD")
            // Without INFILESIZE an upload of unknown size goes with chunked framing.
            if let length = stream.length {
                try check(CCurl_easy_setopt_off_t(curl, CURLOPT_INFILESIZE_LARGE, curl_off_t(length)), "INFILESIZE_LARGE")
            }
            try readBodyThroughCallback(curl, method: method, context: contextPointer)
            code = curl_easy_perform(curl)
        default:
            if sendsBody { try check(CCurl_easy_set_empty_postfields(curl), "POSTFIELDS") }
            code = curl_easy_perform(curl)
        }

        if let error = context.handlerError { throw error }
        if context.stalled {
            throw HTTPTransportError.timedOut("no data moved for \(request.stallTimeout)")
        }
        guard code == CURLE_OK else {
            // SAFETY: curl NUL-terminates what it writes to the buffer, which was zeroed above.
            throw Self.mapError(code, detail: String(cString: handle.errorBuffer))
        }
        if !context.responded {
            context.responded = true
            var status = context.headParser.status
            if status == 0 {
                var fromCurl = 0
                _ = CCurl_easy_getinfo_long(curl, CURLINFO_RESPONSE_CODE, &fromCurl)
                status = fromCurl
            }
            try context.onResponse(HTTPResponseHead(status: status, headers: context.headParser.headers))
        }
    }

    /// The body goes through the read callback; a POST stays a POST (UPLOAD alone makes a PUT).
    private func readBodyThroughCallback(_ curl: UnsafeMutableRawPointer, method: String, context: UnsafeMutableRawPointer) throws {
        try check(CCurl_easy_setopt_read_callback(curl, CURLOPT_READFUNCTION, curlReadCallback), "READFUNCTION")
        try check(CCurl_easy_setopt_pointer(curl, CURLOPT_READDATA, context), "READDATA")
        try check(CCurl_easy_setopt_long(curl, CURLOPT_UPLOAD_BUFFERSIZE, Self.uploadBufferSize), "UPLOAD_BUFFERSIZE")
        if method == "POST" {
            try check(CCurl_easy_setopt_string(curl, CURLOPT_CUSTOMREQUEST, "POST"), "CUSTOMREQUEST")
        }
    }

    private func check(_ code: CURLcode, _ what: String) throws {
        guard code == CURLE_OK else {
            throw HTTPTransportError.protocolError("cannot set \(what): \(String(cString: curl_easy_strerror(code)))")
        }
    }

    // MARK: - Helpers

    /// Refuses a certificate authority file that libcurl could not use, with the reason, so a
    /// mount fails at once rather than at its first HTTPS handshake (or never, when its remote
    /// is plain HTTP): it must be a readable file holding at least one PEM certificate, and
    /// every certificate block in it must be valid base64 of a DER sequence.
    public static func checkCertificateFile(_ path: String) throws(CertificateFileProblem) {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw CertificateFileProblem("certificate file \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(descriptor) }
        var info = stat()
        guard fstat(descriptor, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
            throw CertificateFileProblem("certificate file \(path) is not a regular file")
        }
        let limit = 16 << 20
        guard info.st_size <= limit else { throw CertificateFileProblem("certificate file \(path) is larger than 16 MiB") }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var filled = 0
        while filled < bytes.count {
            let count = bytes.withUnsafeMutableBytes { read(descriptor, $0.baseAddress! + filled, $0.count - filled) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            filled += count
        }
        // Bytes, not String: a system bundle of 140 certificates took 30 ms as Characters.
        let begin = Array("-----BEGIN CERTIFICATE-----".utf8), end = Array("-----END CERTIFICATE-----".utf8)
        let text = bytes[..<filled]
        var position = text.startIndex
        var certificates = 0
        while let start = firstIndex(of: begin, in: text, from: position) {
            guard let stop = firstIndex(of: end, in: text, from: start + begin.count) else {
                throw CertificateFileProblem("certificate file \(path): certificate \(certificates + 1) has no END CERTIFICATE line")
            }
            let body = text[(start + begin.count)..<stop].filter { byte in
                byte != UInt8(ascii: " ") && byte != UInt8(ascii: "\n") && byte != UInt8(ascii: "\r") && byte != UInt8(ascii: "\t")
            }
            guard let der = decodeBase64(body), der.first == 0x30 else {
                throw CertificateFileProblem("certificate file \(path): certificate \(certificates + 1) is not valid PEM")
            }
            certificates += 1
            position = stop + end.count
        }
        guard certificates > 0 else {
            throw CertificateFileProblem("certificate file \(path) holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        }
    }

    /// Where `needle` first occurs in `haystack` at or after `from`.
    private static func firstIndex(of needle: [UInt8], in haystack: ArraySlice<UInt8>, from: Int) -> Int? {
        guard from < haystack.endIndex else { return nil }
        var candidate = from
        while let first = haystack[candidate...].firstIndex(of: needle[0]) {
            guard first + needle.count <= haystack.endIndex else { return nil }
            if haystack[first..<(first + needle.count)].elementsEqual(needle) { return first }
            candidate = first + 1
        }
        return nil
    }

    /// Standard base64 with padding; nil for anything else.
    static func decodeBase64(_ text: String) -> [UInt8]? {
        decodeBase64(Array(text.utf8))
    }

    static func decodeBase64(_ bytes: [UInt8]) -> [UInt8]? {
        guard !bytes.isEmpty, bytes.count % 4 == 0 else { return nil }
        func value(_ byte: UInt8) -> UInt32? {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): return UInt32(byte - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): return UInt32(byte - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(byte - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "+"): return 62
            case UInt8(ascii: "/"): return 63
            default: return nil
            }
        }
        let equals = UInt8(ascii: "=")
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count / 4 * 3)
        for start in stride(from: 0, to: bytes.count, by: 4) {
            let padding = bytes[start + 3] != equals ? 0 : bytes[start + 2] != equals ? 1 : bytes[start + 1] != equals ? 2 : 3
            guard padding <= 2, start + 4 == bytes.count || padding == 0 else { return nil }
            var group: UInt32 = 0
            for index in 0..<4 {
                var sextet: UInt32 = 0
                if index < 4 - padding {
                    guard let decoded = value(bytes[start + index]) else { return nil }
                    sextet = decoded
                }
                group = group << 6 | sextet
            }
            out.append(UInt8(group >> 16 & 0xFF))
            if padding < 2 { out.append(UInt8(group >> 8 & 0xFF)) }
            if padding < 1 { out.append(UInt8(group & 0xFF)) }
        }
        return out
    }

    /// Refuses, with libcurl's own parser, a URL that no retry can fetch: malformed (a port
    /// outside 0-65535, a space) or of a scheme other than http and https (a redirect to
    /// file:// or ftp://). libcurl would refuse it too, but as a failed transfer. The URL itself
    /// is not echoed: a redirect's may carry a signature.
    static func checkURL(_ url: String) throws {
        guard let parsed = curl_url() else { throw HTTPTransportError.invalidRequest("out of memory parsing the URL") }
        defer { curl_url_cleanup(parsed) }
        let code = curl_url_set(parsed, CURLUPART_URL, url, 0)
        guard code == CURLUE_OK else {
            throw HTTPTransportError.invalidRequest("malformed URL: \(String(cString: curl_url_strerror(code)))")
        }
        var scheme: UnsafeMutablePointer<CChar>? = nil
        guard curl_url_get(parsed, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK, let scheme else {
            throw HTTPTransportError.invalidRequest("URL without a scheme")
        }
        defer { curl_free(scheme) }
        let name = String(cString: scheme).lowercased()
        guard name == "http" || name == "https" else {
            throw HTTPTransportError.invalidRequest("URL scheme \(name.prefix(20)) is not http or https")
        }
    }

    /// The caller frees the list with curl_slist_free_all; on error it is freed here.
    private static func makeHeaderList(_ headers: HTTPHeaders) throws -> UnsafeMutablePointer<curl_slist>? {
        var list: UnsafeMutablePointer<curl_slist>? = nil
        do {
            for (name, value) in headers {
                guard !name.isEmpty, name.utf8.allSatisfy(isTokenByte) else {
                    throw HTTPTransportError.invalidRequest("invalid request header name")
                }
                // Never echo the value: it may be a credential.
                guard !value.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) else {
                    throw HTTPTransportError.invalidRequest("request header \(name) has a control character in its value")
                }
                let trimmed = value.trimmingHTTPWhitespace()
                // "Name:" would remove a header in libcurl; "Name;" sends it with an empty value.
                list = try append(list, trimmed.isEmpty ? "\(name);" : "\(name): \(trimmed)")
            }
            // Disable "Expect: 100-continue" for every body.
            return try append(list, "Expect:")
        } catch {
            curl_slist_free_all(list)
            throw error
        }
    }

    private static func append(_ list: UnsafeMutablePointer<curl_slist>?, _ line: String) throws
        -> UnsafeMutablePointer<curl_slist>?
    {
        guard let new = curl_slist_append(list, line) else {
            throw HTTPTransportError.protocolError("out of memory building request headers")
        }
        return new
    }

    /// RFC 9110 token characters (method and header names).
    private static func isTokenByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }

    /// Rounded up, at least 1 ms (0 means "no timeout" to libcurl).
    static func milliseconds(_ duration: Duration) -> Int {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0 else { return 1 }
        let perMilli: Int64 = 1_000_000_000_000_000
        let millis = seconds.multipliedReportingOverflow(by: 1000)
        guard !millis.overflow else { return Int.max / 2 }
        let fraction = (attoseconds + perMilli - 1) / perMilli
        return max(1, Int(clamping: millis.partialValue + fraction))
    }

    static func mapError(_ code: CURLcode, detail: String) -> HTTPTransportError {
        let reason = String(cString: curl_easy_strerror(code))
        let message = detail.isEmpty ? "\(reason) (curl \(code.rawValue))" : "\(detail) (curl \(code.rawValue))"
        switch code {
        case CURLE_OPERATION_TIMEDOUT:
            return .timedOut(message)
        case CURLE_COULDNT_RESOLVE_PROXY, CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_CONNECT,
             CURLE_SEND_ERROR, CURLE_RECV_ERROR, CURLE_PEER_FAILED_VERIFICATION, CURLE_USE_SSL_FAILED,
             CURLE_SSL_CONNECT_ERROR, CURLE_SSL_ENGINE_NOTFOUND, CURLE_SSL_ENGINE_SETFAILED,
             CURLE_SSL_CERTPROBLEM, CURLE_SSL_CIPHER, CURLE_SSL_ENGINE_INITFAILED, CURLE_SSL_CACERT_BADFILE,
             CURLE_SSL_SHUTDOWN_FAILED, CURLE_SSL_CRL_BADFILE, CURLE_SSL_ISSUER_ERROR,
             CURLE_SSL_PINNEDPUBKEYNOTMATCH, CURLE_SSL_INVALIDCERTSTATUS, CURLE_SSL_CLIENTCERT,
             CURLE_QUIC_CONNECT_ERROR, CURLE_PROXY:
            return .connectionFailed(message)
        case CURLE_ABORTED_BY_CALLBACK, CURLE_WRITE_ERROR, CURLE_READ_ERROR:
            return .aborted(message)
        case CURLE_URL_MALFORMAT:
            // The same URL fails the same way every time.
            return .invalidRequest(message)
        default:
            // CURLE_PARTIAL_FILE, CURLE_GOT_NOTHING, CURLE_WEIRD_SERVER_REPLY, CURLE_HTTP2,
            // CURLE_HTTP2_STREAM, CURLE_UNSUPPORTED_PROTOCOL (also a response in an unknown
            // HTTP version), ...
            return .protocolError(message)
        }
    }
}

/// Why a certificate authority file is unusable, in one line naming it.
public struct CertificateFileProblem: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

// MARK: - Easy handle

/// One libcurl easy handle and its error buffer.
// SAFETY: a handle is owned by the pool (under its Mutex) or by exactly one running `execute`,
// so the CURL pointer and the error buffer are never used by two threads at once.
private final class EasyHandle: @unchecked Sendable {
    let raw: UnsafeMutableRawPointer
    let errorBuffer: UnsafeMutablePointer<CChar>

    init?() {
        guard let raw = curl_easy_init() else { return nil }
        self.raw = raw
        // SAFETY: allocated with the size libcurl writes into (CURL_ERROR_SIZE), freed in deinit
        // after curl_easy_cleanup, the last call that may touch it.
        errorBuffer = .allocate(capacity: CCurl_ERROR_SIZE())
        errorBuffer.initialize(repeating: 0, count: CCurl_ERROR_SIZE())
    }

    deinit {
        curl_easy_cleanup(raw)
        errorBuffer.deallocate()
    }
}

// MARK: - Transfer state and C callbacks

/// State of one transfer, reached from curl's callbacks; used only on the transfer's thread.
private final class TransferContext {
    let onResponse: (HTTPResponseHead) throws -> Void
    let onBody: (UnsafeRawBufferPointer) throws -> Void
    var headParser = ResponseHeadParser()
    var responded = false
    /// The handler's error that stopped the transfer, rethrown unchanged.
    var handlerError: (any Error)?

    let stallTimeout: Duration
    var lastProgressAt = ContinuousClock.now
    var lastProgressBytes: Int64 = 0
    /// Set when the progress callback stopped a transfer that moved no byte for `stallTimeout`.
    var stalled = false
    /// The request body, when it is read as it is sent.
    var upload: BodyReader?

    init(onResponse: @escaping (HTTPResponseHead) throws -> Void,
         onBody: @escaping (UnsafeRawBufferPointer) throws -> Void,
         stallTimeout: Duration) {
        self.onResponse = onResponse
        self.onBody = onBody
        self.stallTimeout = stallTimeout
    }

    /// Returns false to stop a transfer that made no progress for `stallTimeout`.
    func progress(downloaded: Int64, uploaded: Int64) -> Bool {
        let bytes = downloaded &+ uploaded
        let now = ContinuousClock.now
        if bytes != lastProgressBytes {
            lastProgressBytes = bytes
            lastProgressAt = now
            return true
        }
        if now - lastProgressAt >= stallTimeout {
            stalled = true
            return false
        }
        return true
    }

    /// One raw header line as curl delivers it (with its CRLF).
    func receiveHeaderLine(_ line: UnsafeRawBufferPointer) {
        guard !responded else { return }  // trailers after the body: ignored
        headParser.receive(line: line)
    }

    /// Returns false to stop the transfer.
    func receiveBody(_ chunk: UnsafeRawBufferPointer) -> Bool {
        do {
            if !responded {
                responded = true
                try onResponse(headParser.head)
            }
            try onBody(chunk)
            return true
        } catch {
            handlerError = error
            return false
        }
    }
}

private let curlHeaderCallback: curl_write_callback = { buffer, size, count, userdata in
    let length = size * count
    guard let userdata else { return 0 }
    // SAFETY: userdata is the TransferContext passed unretained in `perform`, alive for the transfer.
    let context = Unmanaged<TransferContext>.fromOpaque(userdata).takeUnretainedValue()
    // SAFETY: curl guarantees `buffer` holds `length` bytes for the duration of this call.
    context.receiveHeaderLine(UnsafeRawBufferPointer(start: buffer, count: length))
    return length
}

private let curlWriteCallback: curl_write_callback = { buffer, size, count, userdata in
    let length = size * count
    guard let userdata else { return 0 }
    // SAFETY: userdata is the TransferContext passed unretained in `perform`, alive for the transfer.
    let context = Unmanaged<TransferContext>.fromOpaque(userdata).takeUnretainedValue()
    // SAFETY: curl guarantees `buffer` holds `length` bytes for the duration of this call; the
    // handler is told (by the protocol) not to keep the pointer.
    let chunk = UnsafeRawBufferPointer(start: buffer, count: length)
    // Returning a count other than `length` makes curl stop with CURLE_WRITE_ERROR.
    return context.receiveBody(chunk) ? length : 0
}

/// Where curl's read callback takes a request body from.
enum BodyReader {
    case file(FileRangeReader)
    case stream(any StreamedRequestBody)

    /// Fills `buffer` with the next bytes (0 at the end); throws to stop the exchange.
    mutating func next(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        switch self {
        case .file(var reader):
            defer { self = .file(reader) }
            guard let got = reader.read(into: buffer) else {
                throw HTTPTransportError.aborted("the request body's file ended early or could not be read")
            }
            return got
        case .stream(let stream):
            return try stream.next(into: buffer)
        }
    }
}

/// Reads a request body from a file range for curl's read callback.
struct FileRangeReader {
    let descriptor: Int32
    let offset: Int64
    let length: Int64
    var sent: Int64 = 0

    /// Fills `buffer` with the next bytes; nil when the file cannot be read or ended before the
    /// range did, which must fail the exchange rather than send a short body.
    mutating func read(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        let wanted = Int(min(Int64(buffer.count), length - sent))
        guard wanted > 0 else { return 0 }
        while true {
            let got = pread(descriptor, buffer.baseAddress, wanted, off_t(offset + sent))
            if got < 0, errno == EINTR { continue }
            guard got > 0 else { return nil }
            sent += Int64(got)
            return got
        }
    }
}

private let curlReadCallback: curl_read_callback = { buffer, size, count, userdata in
    guard let userdata, let buffer else { return CCurl_READFUNC_ABORT() }
    // SAFETY: userdata is the TransferContext passed unretained in `perform`, alive for the transfer.
    let context = Unmanaged<TransferContext>.fromOpaque(userdata).takeUnretainedValue()
    // SAFETY: curl guarantees `buffer` has room for `size * count` bytes during this call.
    let room = UnsafeMutableRawBufferPointer(start: buffer, count: size * count)
    do {
        guard let got = try context.upload?.next(into: room) else { return CCurl_READFUNC_ABORT() }
        return got
    } catch {
        context.handlerError = error
        return CCurl_READFUNC_ABORT()
    }
}

private let curlProgressCallback: curl_xferinfo_callback = { userdata, _, downloaded, _, uploaded in
    guard let userdata else { return 0 }
    // SAFETY: userdata is the TransferContext passed unretained in `perform`, alive for the transfer.
    let context = Unmanaged<TransferContext>.fromOpaque(userdata).takeUnretainedValue()
    // Non-zero aborts the transfer with CURLE_ABORTED_BY_CALLBACK.
    return context.progress(downloaded: Int64(downloaded), uploaded: Int64(uploaded)) ? 0 : 1
}
