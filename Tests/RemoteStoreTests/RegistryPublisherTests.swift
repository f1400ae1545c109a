import Foundation
import HTTPClient
import Logging
import OCI
import Synchronization
import Dispatch
import Testing
@testable import RemoteStore

// RegistryPublisher against FakeRegistry (the distribution push API in memory), with
// FaultInjectingTransport in between for answers the fake would not give on its own.

private let quietLogger = Logger(label: "RegistryPublisherTests") { _ in SwiftLogNoOpLogHandler() }
private let deniedBody = Array(#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#.utf8)

/// A blob's bytes in a file of its own, as the mount hands them to the publisher.
private final class BlobFile {
    let bytes: [UInt8]
    let digest: Digest
    let path: String

    init(count: Int, seed: Int) throws {
        bytes = (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 7 &+ seed &* 101) }
        digest = Digest.sha256(of: bytes)
        path = NSTemporaryDirectory() + "registry-publisher-\(UUID().uuidString)"
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw CocoaError(.fileWriteUnknown)
        }
    }

    var size: Int64 { Int64(bytes.count) }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A fake registry for `team/cache`, reached through a fault injector that logs every request.
private struct PushSetup {
    let registry = FakeRegistry(repository: "team/cache")
    let network: FaultInjectingTransport

    init() { network = FaultInjectingTransport(wrapping: registry) }

    func publisher(insecure: Bool = false, monolithicLimit: Int64 = 4096, chunkSize: Int64 = 1000, mountFrom: [String] = [],
                   credential: RegistryCredential? = nil, credentialSource: RegistryCredentialSource? = nil,
                   timeout: Duration = .seconds(5), transport: (any HTTPTransport)? = nil) throws -> RegistryPublisher {
        RegistryPublisher(reference: try RegistryReference(parsing: "registry.test/team/cache:buildcache"), insecure: insecure,
                          credential: credential, credentialSource: credentialSource, mountFrom: mountFrom,
                          monolithicLimit: monolithicLimit, chunkSize: chunkSize,
                          transport: transport ?? network, timeout: timeout, logger: quietLogger)
    }

    var methods: [String] { network.requests.map(\.method) }

    /// The Content-Range of every PATCH the registry saw.
    var patchRanges: [String] { registry.requests.filter { $0.method == "PATCH" }.map { $0.headers["Content-Range"] ?? "none" } }
}

/// Loses the answer to the first request of `method` after the registry acted on it, as a
/// connection that drops just then would.
private final class LostAnswerTransport: HTTPTransport {
    private let inner: any HTTPTransport
    private let method: String
    private let lost = Mutex(false)

    init(wrapping inner: any HTTPTransport, method: String) {
        self.inner = inner
        self.method = method
    }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        let loses = request.method == method && !lost.withLock { lost in defer { lost = true }; return lost }
        guard loses else { return try inner.execute(request, onResponse: onResponse, onBody: onBody) }
        try inner.execute(request, onResponse: { _ in }, onBody: { _ in })
        throw HTTPTransportError.connectionFailed("the answer was lost")
    }
}

/// A RemoteStoreError's case, by name (`unauthorized`, `server`...).
private func kind(_ error: RemoteStoreError) -> String? { Mirror(reflecting: error).children.first?.label }

@Suite("RegistryPublisher blobs")
struct RegistryPublisherBlobTests {
    @Test func blobTheRegistryHoldsIsLeftAloneAndItsFileNeverRead() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 1)
        setup.registry.putBlob(blob.bytes)
        let publication = try setup.publisher().publishBlob(blob.digest, size: blob.size, contentsAt: "/nonexistent/blob")
        #expect(publication == .alreadyPresent)
        #expect(setup.methods == ["HEAD"])
    }

    @Test func smallBlobGoesUpInOneRequestToTheSessionsLocation() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 2)
        let publication = try setup.publisher().publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["HEAD", "POST", "PUT"])
        let put = try #require(setup.registry.requests.last)
        // The session's Location was relative: resolved against the registry, its query kept.
        #expect(put.url == "https://registry.test/v2/team/cache/blobs/uploads/upload-1?_state=upload-1-0&digest=\(blob.digest)")
        #expect(put.body?.count == 3000)
        #expect(put.headers["Content-Type"] == "application/octet-stream")
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    @Test func emptyBlobGoesUpWithAnEmptyBody() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 0, seed: 0)
        #expect(try setup.publisher().publishBlob(blob.digest, size: 0, contentsAt: blob.path) == .uploaded(bytes: 0))
        #expect(setup.registry.blob(blob.digest) == [])
    }

    @Test func bigBlobGoesUpInChunksThenAnEmptyPut() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3500, seed: 3)
        let publication = try setup.publisher(monolithicLimit: 1000).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3500))
        #expect(setup.methods == ["HEAD", "POST", "PATCH", "PATCH", "PATCH", "PATCH", "PUT"])
        #expect(setup.patchRanges == ["0-999", "1000-1999", "2000-2999", "3000-3499"])
        let put = try #require(setup.registry.requests.last)
        #expect(put.body == nil)
        #expect(put.url.hasSuffix("&digest=\(blob.digest)"))
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    struct ChunkCut: Sendable, CustomTestStringConvertible {
        var testDescription: String
        var bytesKept: Int
        var session: FakeRegistry.CutSession
        var patchRanges: [String]
        var sessionsOpened: Int
    }

    static let chunkCuts = [
        ChunkCut(testDescription: "resumed from what the registry holds", bytesKept: 300, session: .keepsWhatArrived,
                 patchRanges: ["0-999", "300-1299", "1300-2299", "2300-3299", "3300-3499"], sessionsOpened: 1),
        ChunkCut(testDescription: "session lost: the blob starts over", bytesKept: 300, session: .isLost,
                 patchRanges: ["0-999", "0-999", "1000-1999", "2000-2999", "3000-3499"], sessionsOpened: 2),
        // distribution's `Range: 0-0` means no byte as well as one: taken as none, the registry
        // refuses the next chunk (416) and the blob starts over rather than looping.
        ChunkCut(testDescription: "one byte kept: refused, the blob starts over", bytesKept: 1, session: .keepsWhatArrived,
                 patchRanges: ["0-999", "0-999", "0-999", "1000-1999", "2000-2999", "3000-3499"], sessionsOpened: 2),
    ]

    @Test("a chunk cut midway", arguments: chunkCuts)
    func chunkCutMidway(_ cut: ChunkCut) throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3500, seed: 4)
        setup.registry.cutPatches(afterBytes: cut.bytesKept, session: cut.session)
        let publication = try setup.publisher(monolithicLimit: 1000).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3500))
        #expect(setup.patchRanges == cut.patchRanges)
        #expect(setup.registry.uploadsOpened == cut.sessionsOpened)
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    @Test func serverErrorIsTriedAgain() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 7)
        setup.network.inject(.status(500, body: []), method: "PUT", times: 1)
        let publication = try setup.publisher().publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["HEAD", "POST", "PUT", "HEAD", "POST", "PUT"])
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    @Test func bytesThatArrivedDespiteAFailedAnswerAreAnUpload() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 8)
        let publisher = try setup.publisher(transport: LostAnswerTransport(wrapping: setup.network, method: "PUT"))
        let publication = try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["HEAD", "POST", "PUT", "HEAD"])
    }

    @Test func deniedPushFailsAtOnceInOneLine() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 9)
        setup.network.inject(.status(403, body: deniedBody), method: "POST")
        let error = try #require(throws: RemoteStoreError.self) { _ = try setup.publisher().publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) }
        #expect(kind(error) == "unauthorized")
        #expect(error.description.contains(blob.digest.description))
        #expect(error.description.contains("DENIED requested access to the resource is denied"))
        #expect(error.description.contains("registry.test/team/cache"))
        #expect(!error.description.contains("\n"))
        #expect(error.isTransient == false)
        #expect(setup.methods == ["HEAD", "POST"])
    }

    @Test func digestTheRegistryRejectsFailsAtOnce() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 10)
        let other = try BlobFile(count: 3000, seed: 11)
        let error = try #require(throws: RemoteStoreError.self) { _ = try setup.publisher().publishBlob(other.digest, size: blob.size, contentsAt: blob.path) }
        #expect(kind(error) == "invalidContent")
        #expect(error.description.contains(other.digest.description))
        #expect(error.description.contains("HTTP 400: DIGEST_INVALID"))
        #expect(setup.methods == ["HEAD", "POST", "PUT"])
    }

    @Test func fileOfTheWrongSizeIsRefusedBeforeItIsSent() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 12)
        let error = try #require(throws: RemoteStoreError.self) { _ = try setup.publisher().publishBlob(blob.digest, size: 2999, contentsAt: blob.path) }
        #expect(error.description.contains(blob.path))
        #expect(!setup.methods.contains("PUT"))
    }

    @Test func registryThatKeepsFailingEndsWithinTheBound() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 13)
        setup.network.inject(.status(503, body: []))
        let error = try #require(throws: RemoteStoreError.self) { _ = try setup.publisher().publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) }
        #expect(kind(error) == "server")
        #expect(error.isTransient == true, "the caller may try again later")
        #expect(setup.network.requests.count == RegistryPublisher.attempts)
    }

    @Test func chunksThatKeepFailingEndWithinTheBound() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3500, seed: 14)
        setup.network.inject(.failConnection, method: "PATCH")
        let error = try #require(throws: RemoteStoreError.self) {
            _ = try setup.publisher(monolithicLimit: 1000).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        }
        #expect(kind(error) == "transport")
        #expect(setup.methods.filter { $0 == "PATCH" }.count == RegistryPublisher.attempts)
        #expect(setup.network.requests.count <= 3 * RegistryPublisher.attempts)
    }

    @Test func stallsAreTriedWithinTheBound() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 15)
        setup.network.inject(.stall, method: "PUT")
        let error = try #require(throws: RemoteStoreError.self) {
            _ = try setup.publisher(timeout: .milliseconds(20)).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        }
        #expect(kind(error) == "timedOut")
        #expect(setup.methods.filter { $0 == "PUT" }.count == RegistryPublisher.attempts)
    }

    @Test func insecureRegistryIsProbedOnceThenSpokenToOverHTTP() throws {
        let setup = PushSetup()
        setup.registry.setRefusesHTTPS(true)
        let publisher = try setup.publisher(insecure: true)
        for seed in [24, 25] {
            let blob = try BlobFile(count: 100, seed: seed)
            #expect(try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .uploaded(bytes: 100))
        }
        let urls = setup.network.requests.map(\.url)
        #expect(urls.first == "https://registry.test/v2/")
        #expect(urls.dropFirst().allSatisfy { $0.hasPrefix("http://registry.test/v2/team/cache/") }, "\(urls)")
        #expect(urls.count == 7)
    }

    @Test func refusedCredentialIsAskedForAgain() throws {
        let setup = PushSetup()
        setup.registry.setAuth(.basic(username: "ci", password: "new-password"))
        let blob = try BlobFile(count: 3000, seed: 16)
        let source = RegistryCredentialSource(name: "docker-credential-test") { .basic(username: "ci", password: "new-password") }
        let publisher = try setup.publisher(credential: .basic(username: "ci", password: "old-password"), credentialSource: source)
        #expect(try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .uploaded(bytes: 3000))
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    @Test func bearerTokenIsAskedForPushAccess() throws {
        let setup = PushSetup()
        setup.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: nil, password: nil, expiresIn: nil))
        let blob = try BlobFile(count: 3000, seed: 17)
        #expect(try setup.publisher().publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .uploaded(bytes: 3000))
        #expect(setup.registry.tokenRequests.map(\.scopes) == [["repository:team/cache:pull,push"]])
    }

    @Test func challengeNamingTwoScopesAsksForBoth() throws {
        let setup = PushSetup()
        setup.registry.setAuth(.bearer(service: "registry.test", challengeScope: "repository:team/cache:pull,push repository:team/base:pull",
                                       username: nil, password: nil, expiresIn: nil))
        let blob = try BlobFile(count: 10, seed: 18)
        setup.registry.putBlob(blob.bytes, inRepository: "team/base")
        #expect(try setup.publisher(mountFrom: ["team/base"]).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
            == .alreadyPresent, "the fake's blobs are one store")
        #expect(setup.registry.tokenRequests.map(\.scopes) == [["repository:team/cache:pull,push", "repository:team/base:pull"]])
    }
}

@Suite("RegistryPublisher mounts")
struct RegistryPublisherMountTests {
    /// A blob only `team/base` holds: HEAD in team/cache says 404.
    private func blobInBase(_ setup: PushSetup, seed: Int) throws -> BlobFile {
        let blob = try BlobFile(count: 3000, seed: seed)
        setup.registry.putBlob(blob.bytes, inRepository: "team/base")
        setup.network.inject(.status(404, body: []), method: "HEAD", times: 1)
        return blob
    }

    @Test func blobAnotherRepositoryHoldsIsMountedNotSent() throws {
        let setup = PushSetup()
        let blob = try blobInBase(setup, seed: 20)
        let publication = try setup.publisher(mountFrom: ["team/base"]).publishBlob(blob.digest, size: blob.size, contentsAt: "/nonexistent")
        #expect(publication == .mountedFromRepository("team/base"))
        #expect(setup.methods == ["HEAD", "POST"])
        #expect(setup.network.requests.last?.url == "https://registry.test/v2/team/cache/blobs/uploads/?mount=\(blob.digest)&from=team/base")
    }

    @Test func mountTheRegistryAnswersWithASessionUploadsIntoIt() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 21)
        let publication = try setup.publisher(mountFrom: ["team/other"]).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["HEAD", "POST", "PUT"])
        #expect(setup.registry.uploadsOpened == 1)
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    @Test func eachRepositoryIsTriedAndUnusedSessionsAreEnded() throws {
        let setup = PushSetup()
        let blob = try blobInBase(setup, seed: 22)
        let publisher = try setup.publisher(mountFrom: ["team/other", "team/base"])
        #expect(try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path) == .mountedFromRepository("team/base"))
        #expect(setup.methods == ["HEAD", "POST", "DELETE", "POST"])
    }

    @Test func repositoryThatMayNotBeReadIsPassedOver() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 23)
        setup.network.inject(.status(403, body: deniedBody), method: "POST", times: 1)
        let publication = try setup.publisher(mountFrom: ["team/secret"]).publishBlob(blob.digest, size: blob.size, contentsAt: blob.path)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["HEAD", "POST", "POST", "PUT"])
    }
}

@Suite("RegistryPublisher tags")
struct RegistryPublisherTagTests {
    private let manifestBytes = Array(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#.utf8)
    private var manifest: Descriptor {
        Descriptor(mediaType: MediaType.ociIndex, digest: Digest.sha256(of: manifestBytes), size: Int64(manifestBytes.count))
    }

    @Test func tagIsAPutOfTheManifestsExactBytes() throws {
        let setup = PushSetup()
        try setup.publisher().publishTag("main", manifest: manifest, manifestBytes: manifestBytes, smallBlob: { _ in nil })
        let stored = try #require(setup.registry.manifest("main"))
        #expect(stored.bytes == manifestBytes)
        #expect(stored.contentType == MediaType.ociIndex)
        #expect(setup.methods == ["PUT"])
        #expect(setup.network.requests.first?.url == "https://registry.test/v2/team/cache/manifests/main")
    }

    @Test func lyingDigestAnswerIsReported() throws {
        let setup = PushSetup()
        let lie = "sha256:" + String(repeating: "0", count: 64)
        setup.registry.setManifestDigestAnswer(lie)
        let error = try #require(throws: RemoteStoreError.self) {
            try setup.publisher().publishTag("main", manifest: manifest, manifestBytes: manifestBytes, smallBlob: { _ in nil })
        }
        #expect(kind(error) == "invalidContent")
        #expect(error.description.contains(lie))
        #expect(error.description.contains(manifest.digest.description))
        #expect(setup.methods == ["PUT"])
    }

    @Test func serverErrorIsTriedAgain() throws {
        let setup = PushSetup()
        setup.network.inject(.status(502, body: []), method: "PUT", times: 2)
        try setup.publisher().publishTag("main", manifest: manifest, manifestBytes: manifestBytes, smallBlob: { _ in nil })
        #expect(setup.methods == ["PUT", "PUT", "PUT"])
        #expect(setup.registry.manifest("main")?.bytes == manifestBytes)
    }

    @Test func bytesThatAreNotTheManifestsAreNeverSent() throws {
        let setup = PushSetup()
        let error = try #require(throws: RemoteStoreError.self) {
            try setup.publisher().publishTag("main", manifest: manifest, manifestBytes: manifestBytes + [0x0A], smallBlob: { _ in nil })
        }
        #expect(kind(error) == "invalidContent")
        #expect(setup.methods.isEmpty)
    }

    @Test func invalidTagIsRefusedBeforeAnyRequest() throws {
        let setup = PushSetup()
        let error = try #require(throws: RemoteStoreError.self) {
            try setup.publisher().publishTag("../main", manifest: manifest, manifestBytes: manifestBytes, smallBlob: { _ in nil })
        }
        #expect(kind(error) == "configuration")
        #expect(setup.methods.isEmpty)
    }

    @Test func rangeHeaderGivesTheLengthTheRegistryHolds() {
        #expect(RegistryPublisher.heldLength("0-99") == 100)
        #expect(RegistryPublisher.heldLength("bytes=0-99") == 100)
        #expect(RegistryPublisher.heldLength("0-0") == 1)
        #expect(RegistryPublisher.heldLength("5-99") == nil)
        #expect(RegistryPublisher.heldLength("0-") == nil)
        #expect(RegistryPublisher.heldLength("0-9223372036854775807") == nil)
        #expect(RegistryPublisher.heldLength(nil) == nil)
    }
}

/// Bytes a test writes while an early upload reads them, as a staged file feeds one.
final class TestGrowingContents: GrowingBlobContents {
    private struct State {
        var bytes: [UInt8] = []
        var sealed = false
        var committed: Digest?
        var failure: String?
    }
    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    let announced: AnnouncedBlob?

    init(announced: AnnouncedBlob? = nil) { self.announced = announced }

    func append(_ more: [UInt8]) { change { $0.bytes += more } }
    /// Committed as `digest`, or as the digest of what was appended.
    func seal(as digest: Digest? = nil) { change { $0.sealed = true; $0.committed = digest ?? Digest.sha256(of: $0.bytes) } }
    func fail(_ reason: String) { change { $0.failure = reason } }

    private func change(_ body: (inout State) -> Void) {
        state.withLock { body(&$0) }
        wake.signal()
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
        while true {
            let now = state.withLock { $0 }
            if let failure = now.failure { throw HTTPTransportError.aborted(failure) }
            if now.bytes.count > Int(offset) {
                let piece = now.bytes[Int(offset)...].prefix(buffer.count)
                piece.withUnsafeBytes { buffer.copyMemory(from: $0) }
                return piece.count
            }
            if now.sealed { return 0 }
            guard wake.wait(timeout: .now() + .seconds(10)) == .success else { throw HTTPTransportError.timedOut("test contents stalled") }
        }
    }

    func committed() throws -> (digest: Digest, size: Int64) {
        while true {
            let now = state.withLock { $0 }
            if let failure = now.failure { throw HTTPTransportError.aborted(failure) }
            if let committed = now.committed { return (committed, Int64(now.bytes.count)) }
            guard wake.wait(timeout: .now() + .seconds(10)) == .success else { throw HTTPTransportError.timedOut("test contents stalled") }
        }
    }
}

/// An early upload of contents the test writes, run on a thread of its own as the upload queue
/// runs it; `ran` is signalled when `run` returns.
private func startedEarlyUpload(_ publisher: RegistryPublisher) throws
    -> (contents: TestGrowingContents, upload: any EarlyBlobUpload, ran: DispatchSemaphore) {
    let contents = TestGrowingContents()
    let upload = try #require(publisher.beginEarlyUpload(of: contents))
    let ran = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        upload.run()
        ran.signal()
    }
    return (contents, upload, ran)
}

@Suite("RegistryPublisher uploads begun before the commit")
struct RegistryPublisherEarlyUploadTests {
    @Test func bytesGoUpWhileWrittenAndTheCommitSendsOnlyTheClosingPut() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 21)
        let publisher = try setup.publisher(monolithicLimit: 4096)
        let (contents, upload, ran) = try startedEarlyUpload(publisher)
        contents.append(Array(blob.bytes[..<1000]))
        contents.append(Array(blob.bytes[1000...]))
        contents.seal()
        #expect(ran.wait(timeout: .now() + .seconds(20)) == .success)
        #expect(setup.methods == ["POST", "PATCH"], "nothing but the stream before the commit")
        let patch = try #require(setup.registry.requests.last)
        #expect(patch.headers["Content-Range"] == nil, "a streamed PATCH")
        let publication = try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: "/nonexistent/blob", sentEarlyBy: upload)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["POST", "PATCH", "PUT"])
        #expect(setup.registry.requests.last?.body == nil)
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
        #expect(setup.registry.uploadsOpen == 0)
    }

    @Test func aBlobOverTheCutoffStreamsInSeveralPatches() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 2500, seed: 22)
        let publisher = try setup.publisher(monolithicLimit: 1000, chunkSize: 500)
        let (contents, upload, ran) = try startedEarlyUpload(publisher)
        contents.append(blob.bytes)
        contents.seal()
        #expect(ran.wait(timeout: .now() + .seconds(20)) == .success)
        #expect(try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: "/nonexistent/blob", sentEarlyBy: upload)
                == .uploaded(bytes: 2500))
        #expect(setup.methods == ["POST", "PATCH", "PATCH", "PATCH", "PUT"], "at most the cutoff per request")
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
    }

    @Test func aCutStreamFallsBackToAnOrdinaryUploadAtTheCommit() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 23)
        let publisher = try setup.publisher(monolithicLimit: 4096)
        setup.registry.cutPatches(afterBytes: 700, session: .keepsWhatArrived)
        let (contents, upload, ran) = try startedEarlyUpload(publisher)
        contents.append(blob.bytes)
        contents.seal()
        #expect(ran.wait(timeout: .now() + .seconds(20)) == .success)
        let publication = try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path, sentEarlyBy: upload)
        #expect(publication == .uploaded(bytes: 3000))
        #expect(setup.methods == ["POST", "PATCH", "DELETE", "HEAD", "POST", "PUT"],
                "the cut session is deleted, and the blob goes up the ordinary way")
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
        #expect(setup.registry.uploadsOpen == 0)
    }

    @Test func otherBytesThanTheCommittedBlobAreDroppedAndTheBlobSentAgain() throws {
        let setup = PushSetup()
        let blob = try BlobFile(count: 3000, seed: 24)
        let publisher = try setup.publisher(monolithicLimit: 4096)
        let (contents, upload, ran) = try startedEarlyUpload(publisher)
        contents.append(Array(blob.bytes[..<2000]))  // the commit says 3000
        contents.seal()
        #expect(ran.wait(timeout: .now() + .seconds(20)) == .success)
        #expect(try publisher.publishBlob(blob.digest, size: blob.size, contentsAt: blob.path, sentEarlyBy: upload)
                == .uploaded(bytes: 3000))
        #expect(setup.methods == ["POST", "PATCH", "DELETE", "HEAD", "POST", "PUT"])
        #expect(setup.registry.blob(blob.digest) == blob.bytes)
        #expect(setup.registry.uploadsOpen == 0)
    }

    @Test func contentsGivenUpEndTheStreamAndAbandonDeletesTheSession() throws {
        let setup = PushSetup()
        let publisher = try setup.publisher(monolithicLimit: 4096)
        let (contents, upload, ran) = try startedEarlyUpload(publisher)
        contents.append([UInt8](repeating: 7, count: 1500))
        contents.fail("the file was removed")
        #expect(ran.wait(timeout: .now() + .seconds(20)) == .success)
        upload.abandon()
        upload.abandon()  // once is enough: the second does nothing
        #expect(setup.methods == ["POST", "PATCH", "DELETE"])
        #expect(setup.registry.uploadsOpen == 0)
        #expect(throws: (any Error).self) {
            try upload.finish(as: Digest.sha256(of: [UInt8](repeating: 7, count: 1500)), size: 1500)
        }
    }
}
