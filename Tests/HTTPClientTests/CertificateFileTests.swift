import Foundation
@testable import HTTPClient
import Testing

/// `CurlTransport.checkCertificateFile`, which makes a bad `--ca-file` one line at mount.
@Suite("Certificate authority files are checked before use")
struct CertificateFileTests {
    /// Shaped like a certificate: PEM of base64 of a DER sequence (the check goes no deeper;
    /// libcurl parses the X.509 at the handshake).
    static let certificate = """
        -----BEGIN CERTIFICATE-----
        MIIBfTCCASOgAwIBAgIUJ3i9lq6f0vK8p8xWm3X3b4Uv2XgwCgYIKoZIzj0EAwIw
        FDESMBAGA1UEAwwJdGVzdC1jYS0xMB4XDTI2MDEwMTAwMDAwMFoXDTI2MDEwMjAw
        MDAwMFowFDESMBAGA1UEAwwJdGVzdC1jYS0xMFkwEwYHKoZIzj0CAQYIKoZIzj0D
        AQcDQgAE0o3Yd5m3fV0i9sQm9eX7m8m3oTq2bYx8m5kT3y3a8H4n1n3v7Q0s9d2g
        c3d9Yk7m5uYbq3oYz1l0m1n3Xx1bQqNTMFEwHQYDVR0OBBYEFA==
        -----END CERTIFICATE-----
        """

    private func write(_ text: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.path + "/ocicachefs-ca-\(UUID().uuidString).pem"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    private func problem(_ path: String) -> String? {
        do {
            try CurlTransport.checkCertificateFile(path)
            return nil
        } catch {
            return error.description
        }
    }

    @Test func pemCertificatesAreAccepted() throws {
        let one = try write(Self.certificate + "\n")
        let two = try write("# a comment\n" + Self.certificate + "\n\n" + Self.certificate + "\n")
        defer { for path in [one, two] { try? FileManager.default.removeItem(atPath: path) } }
        #expect(problem(one) == nil)
        #expect(problem(two) == nil)
    }

    /// A bundle the size of a system one (Debian's holds about 140), CRLF line ends included.
    @Test func aLargeBundleIsAcceptedWhole() throws {
        let bundle = try write(Array(repeating: Self.certificate, count: 150).joined(separator: "\n")
            .replacingOccurrences(of: "\n", with: "\r\n") + "\r\n")
        let lastBroken = try write(Array(repeating: Self.certificate, count: 150).joined(separator: "\n") + "\n"
            + String(Self.certificate.dropLast(30)))
        defer { for path in [bundle, lastBroken] { try? FileManager.default.removeItem(atPath: path) } }
        #expect(problem(bundle) == nil)
        #expect(problem(lastBroken)?.contains("certificate 151 has no END CERTIFICATE line") == true)
    }

    @Test func unusableFilesAreNamedWithTheReason() throws {
        let text = try write("not a certificate\n")
        let key = try write("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n")
        let truncated = try write(String(Self.certificate.dropLast(30)))
        let mangled = try write(Self.certificate.replacingOccurrences(of: "MIIBfTCC", with: "M!IBfTCC"))
        let notDER = try write("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n")
        let directory = FileManager.default.temporaryDirectory.path
        defer { for path in [text, key, truncated, mangled, notDER] { try? FileManager.default.removeItem(atPath: path) } }

        #expect(problem(text)?.contains("holds no PEM certificate") == true)
        #expect(problem(key)?.contains("holds no PEM certificate") == true)
        #expect(problem(truncated)?.contains("certificate 1 has no END CERTIFICATE line") == true)
        #expect(problem(mangled)?.contains("certificate 1 is not valid PEM") == true)
        #expect(problem(notDER)?.contains("not valid PEM") == true, "base64 of text, not of a DER sequence")
        #expect(problem(directory)?.contains("not a regular file") == true)
        #expect(problem(directory + "/absent-\(UUID().uuidString).pem")?.contains("No such file") == true)
        for path in [text, truncated] { #expect(problem(path)?.contains(path) == true, "the line names the file") }
    }

    @Test func base64Decoding() {
        #expect(CurlTransport.decodeBase64("aGVsbG8=") == Array("hello".utf8))
        #expect(CurlTransport.decodeBase64("aGVsbG8h") == Array("hello!".utf8))
        #expect(CurlTransport.decodeBase64("aGVsbA==") == Array("hell".utf8))
        #expect(CurlTransport.decodeBase64("aGVsbG8") == nil, "length not a multiple of four")
        #expect(CurlTransport.decodeBase64("aG=sbG8=") == nil, "padding inside")
        #expect(CurlTransport.decodeBase64("a===") == nil)
        #expect(CurlTransport.decodeBase64("") == nil)
    }
}
