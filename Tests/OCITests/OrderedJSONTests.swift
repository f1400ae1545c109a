import Foundation
import Testing
@testable import OCI

/// Documents BuildKit itself wrote (v0.11.6 and v0.32.2, the fixtures kept in Fuzz/corpus).
enum BuildKitDocuments {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Fuzz/corpus").standardized

    static func read(_ path: String) throws -> [UInt8] {
        Array(try Data(contentsOf: corpus.appendingPathComponent(path)))
    }

    /// v0.11.6, `--export-cache type=local`: the index variant, blob sha256:b2e4eecc…
    static var localIndexV0116: [UInt8] { get throws { try read("manifest/v0.11.6-index-variant.json") } }
    /// …and the cache config it lists, sha256:6f5d555f…
    static var localConfigV0116: [UInt8] { get throws { try read("cache-config/v0.11.6.json") } }
    /// The same build, `--export-cache type=s3`: the object BuildKit wrote at manifests/main.
    static var s3ObjectV0116: [UInt8] { get throws { try read("s3-cache-config/v0.11.6-main.json") } }
    /// v0.32.2, `--export-cache type=local`: the image-manifest variant, sha256:8abca3a1…
    static var localImageManifestV0322: [UInt8] { get throws { try read("manifest/v0.32.2-image-manifest.json") } }
    /// …and its cache config, sha256:35ad4a49…
    static var localConfigV0322: [UInt8] { get throws { try read("cache-config/v0.32.2.json") } }
}

@Suite("OrderedJSON")
struct OrderedJSONTests {
    /// Parsing and writing again gives BuildKit's bytes back, for every document it wrote here.
    @Test func buildKitDocumentsRoundTripByteForByte() throws {
        for document in [try BuildKitDocuments.localIndexV0116, try BuildKitDocuments.localConfigV0116,
                         try BuildKitDocuments.s3ObjectV0116, try BuildKitDocuments.localImageManifestV0322,
                         try BuildKitDocuments.localConfigV0322] {
            #expect(try OrderedJSON.parse(document).serialized == document)
        }
    }

    @Test func membersKeepTheirOrderAndNumbersTheirText() throws {
        let value = try OrderedJSON.parse(Array(#" { "z" : [1.50, -0, 2e+3, true, false, null] , "a" : {} , "m":[] } "#.utf8))
        #expect(value == .object([
            .init("z", .array([.number("1.50"), .number("-0"), .number("2e+3"), .bool(true), .bool(false), .null])),
            .init("a", .object([])),
            .init("m", .array([])),
        ]))
        #expect(value.serialized == Array(#"{"z":[1.50,-0,2e+3,true,false,null],"a":{},"m":[]}"#.utf8))
        #expect(value["a"] == .object([]))
        #expect(value["missing"] == nil)
        #expect(value.setting("a", to: .string("x")).serialized == Array(#"{"z":[1.50,-0,2e+3,true,false,null],"a":"x","m":[]}"#.utf8))
        #expect(value.setting("new", to: .null).serialized == Array(#"{"z":[1.50,-0,2e+3,true,false,null],"a":{},"m":[],"new":null}"#.utf8))
    }

    /// Go's json.Marshal escapes `<`, `>`, `&`, U+2028 and U+2029, and control characters.
    @Test func stringsAreEscapedAsGoEscapesThem() throws {
        let text = "a<b>&c\u{2028}\u{2029}\"\\/\n\r\t\u{08}\u{0C}\u{01}\u{1F}é😀"
        let written = String(decoding: OrderedJSON.string(text).serialized, as: UTF8.self)
        #expect(written == #""a\u003cb\u003e\u0026c\u2028\u2029\"\\/\n\r\t\b\f\u0001\u001fé😀""#)
        #expect(try OrderedJSON.parse(Array(written.utf8)) == .string(text))
        // Escapes a JSON writer may use for anything, surrogate pairs included.
        #expect(try OrderedJSON.parse(Array(#""\u0041\/\ud83d\ude00\u00e9""#.utf8)) == .string("A/😀é"))
        // A lone surrogate becomes U+FFFD, as in Go.
        #expect(try OrderedJSON.parse(Array(#""\ud83dx""#.utf8)) == .string("\u{FFFD}x"))
    }

    @Test(arguments: [
        "", "{", "[1,]", "{\"a\"}", "{\"a\":1,}", "01", "1.", "-", "1e", "tru", "\"abc", "\"a\u{01}\"", #""\x""#,
        #""\u12""#, "{} {}", "[1] x", "{'a':1}", "nul",
    ])
    func malformedDocumentsAreRefused(_ text: String) {
        #expect(throws: ManifestError.self) { try OrderedJSON.parse(Array(text.utf8)) }
    }

    @Test func nestingIsBounded() throws {
        let levels = OrderedJSON.maximumDepth
        let deep = String(repeating: "[", count: levels + 1) + String(repeating: "]", count: levels + 1)
        #expect(throws: ManifestError.self) { try OrderedJSON.parse(Array(deep.utf8)) }
        let allowed = String(repeating: "[", count: levels) + String(repeating: "]", count: levels)
        #expect(try OrderedJSON.parse(Array(allowed.utf8)).serialized == Array(allowed.utf8))
        // Far deeper input fails with an error, not a stack overflow.
        let hostile = String(repeating: "[", count: 100_000)
        #expect(throws: ManifestError.self) { try OrderedJSON.parse(Array(hostile.utf8)) }
    }
}
