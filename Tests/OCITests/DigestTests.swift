import Foundation
import Testing
@testable import OCI

private let hexA = String(repeating: "a", count: 64)
private let emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
private let abcSHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// FIPS 180-2 two-block vector.
private let twoBlockInput = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
private let twoBlockSHA256 = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"

@Suite("Digest")
struct DigestTests {
    // MARK: Parsing

    @Test func parsesAWellFormedSha256Digest() throws {
        let digest = try #require(Digest("sha256:" + emptySHA256))
        #expect(digest.hex == emptySHA256)
        #expect(digest.description == "sha256:" + emptySHA256)
        #expect(Digest(hex: emptySHA256) == digest)
    }

    @Test(arguments: [
        "",
        "sha256:",
        "sha256",
        emptySHA256,                                       // bare hex, no algorithm
        "sha256:" + emptySHA256.uppercased(),              // uppercase hex
        "sha256:E3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "SHA256:" + emptySHA256,                           // uppercase algorithm
        "sha256:" + String(emptySHA256.dropLast()),        // 63 characters
        "sha256:" + emptySHA256 + "0",                     // 65 characters
        "sha256:" + String(repeating: "g", count: 64),     // not hex
        "sha512:" + String(repeating: "a", count: 128),    // another algorithm
        "sha384:" + String(repeating: "a", count: 96),
        "blake3:" + hexA,
        "sha256:" + hexA + "\n",
        " sha256:" + hexA,
        "sha256: " + String(hexA.dropLast()),
        "../x",
        "sha256:../x",
        "sha256:../" + String(repeating: "a", count: 61),  // 64 characters after the prefix
        "sha256:" + String(repeating: "a", count: 60) + "/../",
        "sha256:" + String(repeating: "a", count: 63) + "/",
    ])
    func rejectsAnythingButLowercaseSha256(_ text: String) {
        #expect(Digest(text) == nil)
    }

    @Test(arguments: [
        "",
        String(emptySHA256.dropLast()),
        emptySHA256 + "a",
        emptySHA256.uppercased(),
        "../" + String(repeating: "a", count: 61),
        "sha256:" + String(repeating: "a", count: 57),
    ])
    func rejectsBadBareHex(_ hex: String) {
        #expect(Digest(hex: hex) == nil)
    }

    @Test func embeddedNULIsRejected() {
        #expect(Digest("sha256:" + String(repeating: "a", count: 62) + "\u{0}a") == nil)
        #expect(Digest(hex: String(repeating: "a", count: 63) + "\u{0}") == nil)
    }

    @Test func nonASCIIHexOfTheRightCharacterCountIsRejected() {
        // 64 characters but not 64 UTF-8 bytes of [0-9a-f].
        let text = String(repeating: "a", count: 63) + "é"
        #expect(Digest(hex: text) == nil)
        #expect(Digest("sha256:" + text) == nil)
    }

    // MARK: Hashing

    @Test func sha256KnownVectors() {
        #expect(Digest.sha256(of: [UInt8]()).hex == emptySHA256)
        #expect(Digest.sha256(of: Array("abc".utf8)).hex == abcSHA256)
        #expect(Digest.sha256(of: "abc".utf8).hex == abcSHA256)
        #expect(Digest.sha256(of: Array(twoBlockInput.utf8)).hex == twoBlockSHA256)
        // Leading zero bytes of the hash must keep their "0" nibble.
        #expect(Digest.sha256(of: Array("abc".utf8)).hex.utf8.count == 64)
    }

    @Test func hexKeepsLeadingZeroNibbles() {
        // Many inputs; every rendering must be 64 lowercase hex characters and parse back.
        for i in 0..<300 {
            let digest = Digest.sha256(of: Array("input \(i)".utf8))
            #expect(digest.hex.utf8.count == 64)
            #expect(Digest(digest.description) == digest)
        }
    }

    @Test func verifierIncrementalEqualsOneShot() {
        let bytes = (0..<100_003).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let oneShot = Digest.sha256(of: bytes)
        for chunkSize in [1, 7, 63, 64, 65, 4096, 100_003, 200_000] {
            var verifier = DigestVerifier()
            var index = 0
            while index < bytes.count {
                let end = min(index + chunkSize, bytes.count)
                bytes[index..<end].withUnsafeBytes { verifier.update($0) }
                index = end
            }
            #expect(verifier.finalize() == oneShot, "chunk size \(chunkSize)")
            #expect(verifier.byteCount == Int64(bytes.count))
        }
    }

    @Test func verifierOfNothingIsTheEmptyDigest() {
        let verifier = DigestVerifier()
        #expect(verifier.finalize().hex == emptySHA256)
        #expect(verifier.byteCount == 0)
    }

    @Test func verifierFinalizeDoesNotConsumeState() {
        var verifier = DigestVerifier()
        Array("ab".utf8).withUnsafeBytes { verifier.update($0) }
        _ = verifier.finalize()
        Array("c".utf8).withUnsafeBytes { verifier.update($0) }
        #expect(verifier.finalize().hex == abcSHA256)
        #expect(verifier.byteCount == 3)
    }

    // MARK: Ordering

    @Test func comparesByHex() throws {
        let low = try #require(Digest("sha256:" + String(repeating: "0", count: 64)))
        let high = try #require(Digest("sha256:" + String(repeating: "f", count: 64)))
        #expect(low < high)
        #expect(!(high < low))
        #expect([high, low].sorted() == [low, high])
    }

    // MARK: Codable

    @Test func codableRoundTripAsAPlainString() throws {
        let digest = Digest.sha256(of: Array("abc".utf8))
        let encoded = try JSONEncoder().encode([digest])
        #expect(String(decoding: encoded, as: UTF8.self) == #"["sha256:\#(abcSHA256)"]"#)
        let decoded = try JSONDecoder().decode([Digest].self, from: encoded)
        #expect(decoded == [digest])
    }

    @Test(arguments: [
        #"["sha512:\#(String(repeating: "a", count: 128))"]"#,
        #"["sha256:\#(emptySHA256.uppercased())"]"#,
        #"["\#(emptySHA256)"]"#,
        #"["../x"]"#,
        #"[""]"#,
        #"[42]"#,
        #"[null]"#,
        #"[{"hex":"\#(emptySHA256)"}]"#,
    ])
    func decodingRejectsInvalidDigests(_ json: String) {
        #expect(throws: DecodingError.self) {
            _ = try JSONDecoder().decode([Digest].self, from: Data(json.utf8))
        }
    }

    @Test func decodingErrorQuotesABoundedPrefixOfTheBadValue() {
        let long = "sha256:" + String(repeating: "z", count: 10_000)
        do {
            _ = try JSONDecoder().decode([Digest].self, from: Data(#"["\#(long)"]"#.utf8))
            Issue.record("expected a decoding error")
        } catch let DecodingError.dataCorrupted(context) {
            #expect(context.debugDescription.contains("not a sha256 digest"))
            #expect(context.debugDescription.count < 200)
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }
}

@Suite("Descriptor")
struct DescriptorTests {
    @Test func codableRoundTripKeepsAnnotations() throws {
        let descriptor = Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
                                    digest: Digest("sha256:" + hexA)!, size: 3_623_807,
                                    annotations: ["containerd.io/uncompressed": "sha256:" + emptySHA256])
        let data = try JSONEncoder().encode(descriptor)
        #expect(try JSONDecoder().decode(Descriptor.self, from: data) == descriptor)
    }

    @Test func nilAnnotationsAreOmittedWhenEncoded() throws {
        let descriptor = Descriptor(mediaType: "m", digest: Digest("sha256:" + hexA)!, size: 1)
        let text = String(decoding: OCILayout.canonicalJSON(descriptor), as: UTF8.self)
        #expect(text == #"{"digest":"sha256:\#(hexA)","mediaType":"m","size":1}"#)
    }

    @Test func missingMediaTypeDecodesAsEmpty() throws {
        let json = #"{"digest":"sha256:\#(hexA)","size":5}"#
        let descriptor = try JSONDecoder().decode(Descriptor.self, from: Data(json.utf8))
        #expect(descriptor.mediaType == "")
        #expect(descriptor.size == 5)
        #expect(descriptor.annotations == nil)
    }

    @Test func unknownFieldsAreIgnored() throws {
        let json = #"{"mediaType":"m","digest":"sha256:\#(hexA)","size":5,"platform":{"os":"linux","architecture":"amd64"},"artifactType":"x","urls":["https://x"]}"#
        let descriptor = try JSONDecoder().decode(Descriptor.self, from: Data(json.utf8))
        #expect(descriptor == Descriptor(mediaType: "m", digest: Digest("sha256:" + hexA)!, size: 5))
    }

    @Test(arguments: [
        #"{"mediaType":"m","digest":"sha256:\#(hexA)","size":-1}"#,
        #"{"mediaType":"m","digest":"sha256:\#(hexA)"}"#,
        #"{"mediaType":"m","size":1}"#,
        #"{"mediaType":"m","digest":"sha512:\#(hexA)\#(hexA)","size":1}"#,
        #"{"mediaType":"m","digest":"sha256:\#(hexA)","size":"1"}"#,
        #"{"mediaType":"m","digest":"sha256:\#(hexA)","size":1.5}"#,
    ])
    func invalidDescriptorsAreRejected(_ json: String) {
        #expect(throws: DecodingError.self) {
            _ = try JSONDecoder().decode(Descriptor.self, from: Data(json.utf8))
        }
    }
}

@Suite struct AnnouncedBlobTests {
    let hex = String(repeating: "ab", count: 32)

    @Test func containerdIngestRefsNameTheirDigest() {
        let announced = AnnouncedBlob(digest: Digest(hex: hex)!, size: 4096)
        for ref in ["layer-sha256:\(hex)", "config-sha256:\(hex)", "unknown-sha256:\(hex)",
                    "main@sha256:\(hex)", "sha256:\(hex)"] {
            #expect(AnnouncedBlob(ingestRef: Array(ref.utf8), total: Array("4096".utf8)) == announced, "\(ref)")
        }
    }

    @Test func anythingElseIsNoAnnouncement() {
        let cases: [(ref: String, total: String)] = [
            ("layer-sha256:\(hex.uppercased())", "1"), ("layer-sha256:\(hex.dropLast())", "1"), ("layer-sha512:\(hex)", "1"),
            ("layer-sha256:\(hex)\n", "1"), ("", "1"), ("layer-sha256:\(hex)", ""), ("layer-sha256:\(hex)", "12x"),
            ("layer-sha256:\(hex)", "-1"), ("layer-sha256:\(hex)", " 1"), ("layer-sha256:\(hex)", "99999999999999999999"),
        ]
        for (ref, total) in cases {
            #expect(AnnouncedBlob(ingestRef: Array(ref.utf8), total: Array(total.utf8)) == nil, "\(ref) \(total)")
        }
    }
}
