import Testing
@testable import OCI

@Suite("CacheChains.successors")
struct CacheChainsTests {
    static let blobs = ["a", "b", "c", "d"].map { Digest(hex: String(repeating: $0, count: 64))! }

    @Test func aChainMapsEachLayerToTheOneBuiltOnIt() throws {
        // BuildKit's encoding: -1 for a base layer, no `parent` (Go's omitempty) for entry 0.
        let config = #"{"layers":[{"blob":"\#(Self.blobs[0])","parent":-1},{"blob":"\#(Self.blobs[1])"},{"blob":"\#(Self.blobs[2])","parent":1}],"records":[]}"#
        let successors = try #require(CacheChains.successors(inConfig: Array(config.utf8)))
        #expect(successors == [Self.blobs[0]: Self.blobs[1], Self.blobs[1]: Self.blobs[2]])
    }

    @Test func aLayerTwoChainsContinueDifferentlyHasNoSuccessor() throws {
        let config = #"{"layers":[{"blob":"\#(Self.blobs[0])","parent":-1},{"blob":"\#(Self.blobs[1])"},{"blob":"\#(Self.blobs[2])"},{"blob":"\#(Self.blobs[3])","parent":2}]}"#
        let successors = try #require(CacheChains.successors(inConfig: Array(config.utf8)))
        #expect(successors == [Self.blobs[2]: Self.blobs[3]])
    }

    @Test(arguments: [
        "not json", #"{"records":[]}"#, #"{"layers":[{"parent":-1}]}"#,
    ])
    func anythingElseIsNotAConfig(text: String) {
        #expect(CacheChains.successors(inConfig: Array(text.utf8)) == nil)
    }

    @Test func badEntriesAreSkipped() throws {
        // A parent index out of range, a layer naming itself, a blob that is not a digest.
        let config = #"{"layers":[{"blob":"\#(Self.blobs[0])","parent":7},{"blob":"\#(Self.blobs[1])","parent":1},{"blob":"sha256:nope","parent":0}]}"#
        #expect(try #require(CacheChains.successors(inConfig: Array(config.utf8))).isEmpty)
    }

    @Test func aChainEndingAtALayerIsItsAncestryBaseFirst() throws {
        let config = #"{"layers":[{"blob":"\#(Self.blobs[0])","parent":-1},{"blob":"\#(Self.blobs[1])"},{"blob":"\#(Self.blobs[2])","parent":1},{"blob":"\#(Self.blobs[3])","parent":-1}]}"#
        let bytes = Array(config.utf8)
        #expect(CacheChains.chain(endingAt: Self.blobs[2], inConfig: bytes) == [Self.blobs[0], Self.blobs[1], Self.blobs[2]])
        #expect(CacheChains.chain(endingAt: Self.blobs[1], inConfig: bytes) == [Self.blobs[0], Self.blobs[1]])
        #expect(CacheChains.chain(endingAt: Self.blobs[3], inConfig: bytes) == [Self.blobs[3]], "a base layer of its own")
    }

    @Test func aChainOfAnUnlistedLayerOrALoopEnds() throws {
        let missing = Digest(hex: String(repeating: "e", count: 64))!
        let looped = #"{"layers":[{"blob":"\#(Self.blobs[0])","parent":1},{"blob":"\#(Self.blobs[1])","parent":0}]}"#
        #expect(CacheChains.chain(endingAt: missing, inConfig: Array(looped.utf8)) == nil)
        #expect(CacheChains.chain(endingAt: Self.blobs[1], inConfig: Array(looped.utf8)) == [Self.blobs[0], Self.blobs[1]])
        #expect(CacheChains.chain(endingAt: Self.blobs[1], inConfig: Array("not json".utf8)) == nil)
    }
}
