import Foundation
import HTTPClient
import Testing

#if canImport(Glibc)
import Glibc
#endif

struct FixtureError: Error, CustomStringConvertible {
    var description: String
}

/// The Python fixture server (`scripts/testservers/http_fixture.py`), one process per test.
/// It exits by itself when its stdin closes, so it cannot outlive the test process; `stop()`
/// kills it by the PID this object started.
final class FixtureServer: @unchecked Sendable {
    // SAFETY (@unchecked Sendable): all stored properties are set in init and never mutated,
    // except `stopped`, which is guarded by `lock`.
    let port: Int
    private let process: Process
    private let stdinPipe: Pipe
    private let lock = NSLock()
    private var stopped = false

    let scheme: String
    var base: String { "\(scheme)://127.0.0.1:\(port)" }
    func url(_ path: String) -> String { base + path }

    static let scriptPath: String = {
        // Tests/HTTPClientTests/FixtureServer.swift -> package root
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent("scripts/testservers/http_fixture.py").path
    }()

    /// A missing python3 is a failure (thrown), never a skip.
    static func findPython() throws -> String {
        var candidates = ["/usr/bin/python3", "/usr/local/bin/python3"]
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        candidates += path.split(separator: ":").map { "\($0)/python3" }
        for candidate in candidates where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        throw FixtureError(description: "python3 not found (needed for the HTTP fixture server); searched \(candidates)")
    }

    /// - Parameter tls: certificate and key PEM files to serve HTTPS with.
    init(tls: (certificate: String, key: String)? = nil) throws {
        guard FileManager.default.fileExists(atPath: Self.scriptPath) else {
            throw FixtureError(description: "fixture script missing at \(Self.scriptPath)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try Self.findPython())
        process.arguments = ["-u", Self.scriptPath] + (tls.map { ["--tls", $0.certificate, $0.key] } ?? [])
        let stdinPipe = Pipe()
        let stdoutPipe = Pipe()
        let stderrPipe = Pipe()
        process.standardInput = stdinPipe
        process.standardOutput = stdoutPipe
        process.standardError = stderrPipe
        try process.run()

        // Wait for "PORT <n>\n".
        var line = Data()
        let reader = stdoutPipe.fileHandleForReading
        while !line.contains(0x0A) {
            let chunk = reader.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard text.hasPrefix("PORT "), let port = Int(text.dropFirst(5)) else {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            let err = String(decoding: stderrPipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            throw FixtureError(description: "fixture server did not start: \(text) \(err)")
        }
        self.port = port
        self.scheme = tls == nil ? "http" : "https"
        self.process = process
        self.stdinPipe = stdinPipe
    }

    func stop() {
        let first = lock.withLock {
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        try? stdinPipe.fileHandleForWriting.close()
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { stop() }

    struct Stats: Decodable {
        var connections: Int
        var requests: Int
    }

    /// Accepted TCP connections and served requests (other than /stats), asked over `transport`
    /// (which may reuse one of its connections, or count one more).
    func stats(via transport: any HTTPTransport = CurlTransport()) throws -> Stats {
        let response = try transport.fetch(HTTPRequest(url: url("/stats"), stallTimeout: .seconds(5)),
                                           maxBodyBytes: 4096)
        return try JSONDecoder().decode(Stats.self, from: Data(response.body))
    }
}

/// Starts a fixture server for the duration of `body`.
func withFixtureServer<T>(_ body: (FixtureServer) throws -> T) throws -> T {
    let server = try FixtureServer()
    defer { server.stop() }
    return try body(server)
}

/// Writes a throw-away self-signed certificate for 127.0.0.1 into a new temporary directory
/// (with the openssl command; missing openssl is a failure). Returns the PEM paths.
func makeSelfSignedCertificate() throws -> (certificate: String, key: String, directory: String) {
    let directory = FileManager.default.temporaryDirectory
        .appendingPathComponent("httpclient-tls-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let certificate = directory + "/cert.pem", key = directory + "/key.pem"
    let openssl = Process()
    openssl.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    openssl.arguments = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                         "-nodes", "-keyout", key, "-out", certificate, "-days", "1", "-subj", "/CN=127.0.0.1",
                         "-addext", "subjectAltName=IP:127.0.0.1"]
    openssl.standardOutput = FileHandle.nullDevice
    openssl.standardError = FileHandle.nullDevice
    try openssl.run()
    openssl.waitUntilExit()
    guard openssl.terminationStatus == 0 else {
        throw FixtureError(description: "openssl could not make a certificate (status \(openssl.terminationStatus))")
    }
    return (certificate, key, directory)
}

/// Byte `i` of every `/blob/<size>` body.
func patternByte(_ offset: Int) -> UInt8 { UInt8(offset % 251) }

func pattern(_ range: Range<Int>) -> [UInt8] { range.map(patternByte) }

/// A TCP port on 127.0.0.1 with nothing listening (bound, then released).
func closedPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw FixtureError(description: "socket() failed") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            bind(fd, sa, length) == 0 && getsockname(fd, sa, &length) == 0
        }
    }
    guard bound else { throw FixtureError(description: "bind() failed") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Runs `body`, expecting an `HTTPTransportError`; records an issue and returns nil otherwise.
func transportError(sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) -> HTTPTransportError? {
    do {
        try body()
        Issue.record("expected an HTTPTransportError, got success", sourceLocation: sourceLocation)
    } catch let error as HTTPTransportError {
        return error
    } catch {
        Issue.record("expected an HTTPTransportError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

/// Seconds elapsed while running `body`.
func timed<T>(_ body: () throws -> T) rethrows -> (T, Double) {
    let clock = ContinuousClock()
    let start = clock.now
    let result = try body()
    let elapsed = clock.now - start
    let (seconds, attoseconds) = elapsed.components
    return (result, Double(seconds) + Double(attoseconds) / 1e18)
}
