import Foundation
import HTTPClient
import Logging
import OCI
import Synchronization
import Testing
@testable import RemoteStore

// A registry that stops accepting the credential a mount started with (an ECR or GCR login
// expires after hours): the credential source is asked again, once per burst of refusals,
// and the same credential again is an error rather than a loop.

private let quietLogger = Logger(label: "CredentialRenewalTests") { _ in SwiftLogNoOpLogHandler() }
private let oldPassword = "OLD-password-secret"
private let newPassword = "NEW-password-secret"

/// A credential source that hands out whatever `next` holds and counts how often it is asked.
/// `gate`, when set, runs before each answer: a test holds the answer back with it.
private final class ScriptedCredentialSource: Sendable {
    private struct State {
        var next: RegistryCredential?
        var failure: CredentialError?
        var lookUps = 0
    }

    private let state: Mutex<State>
    private let gate: (@Sendable () -> Void)?

    init(_ credential: RegistryCredential?, gate: (@Sendable () -> Void)? = nil) {
        state = Mutex(State(next: credential))
        self.gate = gate
    }

    func willAnswer(_ credential: RegistryCredential?) { state.withLock { $0.next = credential } }
    func willFail(_ failure: CredentialError) { state.withLock { $0.failure = failure } }
    var lookUps: Int { state.withLock { $0.lookUps } }

    var source: RegistryCredentialSource { source() }

    func source(failureStandsFor: Duration = .seconds(60)) -> RegistryCredentialSource {
        RegistryCredentialSource(name: "docker-credential-scripted", failureStandsFor: failureStandsFor) { [self] in
            gate?()
            return try state.withLock { state in
                state.lookUps += 1
                if let failure = state.failure { throw failure }
                return state.next
            }
        }
    }
}

/// A value shared with escaping closures (a Mutex cannot be captured by one).
private final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}

/// Counts the 401 answers passing through, and lets a thread wait until there were N.
private final class RefusalCounter: HTTPTransport {
    private let inner: any HTTPTransport
    private let refusals = Mutex(0)
    private let changed = NSCondition()

    init(wrapping inner: any HTTPTransport) { self.inner = inner }

    func execute(_ request: HTTPRequest, onResponse: (HTTPResponseHead) throws -> Void,
                 onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        try inner.execute(request, onResponse: { head in
            if head.status == 401 {
                refusals.withLock { $0 += 1 }
                changed.lock()
                changed.broadcast()
                changed.unlock()
            }
            try onResponse(head)
        }, onBody: onBody)
    }

    /// True once `count` 401s went through; false after `timeout` without.
    func waitForRefusals(_ count: Int, timeout: TimeInterval = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        changed.lock()
        defer { changed.unlock() }
        while refusals.withLock({ $0 }) < count {
            guard changed.wait(until: deadline) else { return refusals.withLock { $0 } >= count }
        }
        return true
    }
}

private struct BlobRegistry {
    let registry = FakeRegistry(repository: "team/cache")
    let blobs: [[UInt8]] = (0..<6).map { index in (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ index) } }
    var digests: [Digest] { blobs.map { Digest.sha256(of: $0) } }

    init() {
        for blob in blobs { registry.putBlob(blob) }
    }

    func source(credential: RegistryCredential?, from credentialSource: RegistryCredentialSource?,
                transport: (any HTTPTransport)? = nil) throws -> RegistrySource {
        RegistrySource(reference: try RegistryReference(parsing: "registry.test/team/cache:buildcache"), insecure: false,
                       credential: credential, credentialSource: credentialSource, transport: transport ?? registry,
                       timeout: .seconds(5), logger: quietLogger)
    }
}

private func read(_ source: RegistrySource, _ digest: Digest) throws -> [UInt8] {
    var bytes: [UInt8] = []
    try source.streamBlob(digest, from: 0, onStart: { _ in }, onBody: { bytes.append(contentsOf: $0) })
    return bytes
}

private func unauthorizedMessage(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> String? {
    do {
        try body()
        Issue.record("expected unauthorized, got success", sourceLocation: sourceLocation)
    } catch RemoteStoreError.unauthorized(let message) {
        return message
    } catch {
        Issue.record("expected unauthorized, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

private func expectNoSecrets(_ message: String?, sourceLocation: SourceLocation = #_sourceLocation) {
    guard let message else { return }
    #expect(!message.contains("\n"), "multi-line: \(message)", sourceLocation: sourceLocation)
    for secret in [oldPassword, newPassword, FakeRegistry.basicHeader("alice", oldPassword), FakeRegistry.basicHeader("alice", newPassword)] {
        #expect(!message.contains(secret), "shows a secret: \(message)", sourceLocation: sourceLocation)
        #expect(!message.contains(String(secret.dropFirst("Basic ".count))), "shows a secret: \(message)", sourceLocation: sourceLocation)
    }
}

@Suite("Credentials asked for again after a 401")
struct CredentialRenewalTests {
    private let old = RegistryCredential.basic(username: "alice", password: oldPassword)
    private let new = RegistryCredential.basic(username: "alice", password: newPassword)

    /// A registry that takes the old password, a source that gives it, and a first read done
    /// with it.
    private func loggedIn(failureStandsFor: Duration = .seconds(60)) throws
        -> (cache: BlobRegistry, scripted: ScriptedCredentialSource, source: RegistrySource) {
        let cache = BlobRegistry()
        cache.registry.setAuth(.basic(username: "alice", password: oldPassword))
        let scripted = ScriptedCredentialSource(old)
        let source = try cache.source(credential: old, from: scripted.source(failureStandsFor: failureStandsFor))
        _ = try read(source, cache.digests[0])
        return (cache, scripted, source)
    }

    @Test func refusedBasicCredentialIsReplacedOnceAndTheRequestRetried() throws {
        let cache = BlobRegistry()
        cache.registry.setAuth(.basic(username: "alice", password: oldPassword))
        let scripted = ScriptedCredentialSource(old)
        let source = try cache.source(credential: old, from: scripted.source)
        #expect(try read(source, cache.digests[0]) == cache.blobs[0])
        #expect(scripted.lookUps == 0, "an accepted credential is not asked for again")

        cache.registry.setAuth(.basic(username: "alice", password: newPassword))
        scripted.willAnswer(new)
        #expect(try read(source, cache.digests[1]) == cache.blobs[1])
        #expect(scripted.lookUps == 1)
        let sent = cache.registry.requests(pathContains: "/blobs/\(cache.digests[1])").map { $0.headers["Authorization"] }
        #expect(sent == [FakeRegistry.basicHeader("alice", oldPassword), FakeRegistry.basicHeader("alice", newPassword)])

        // The new credential is kept: later reads send it up front, and ask nobody.
        #expect(try read(source, cache.digests[2]) == cache.blobs[2])
        #expect(scripted.lookUps == 1)
        #expect(cache.registry.requests.last?.headers["Authorization"] == FakeRegistry.basicHeader("alice", newPassword))
    }

    @Test func theSameCredentialAgainFailsOnceWithoutALoop() throws {
        let (cache, scripted, source) = try loggedIn()

        cache.registry.setAuth(.basic(username: "alice", password: newPassword))
        let before = cache.registry.requests.count
        let message = unauthorizedMessage { _ = try read(source, cache.digests[1]) }
        #expect(scripted.lookUps == 1)
        #expect(cache.registry.requests.count == before + 1, "the refused credential is not sent again")
        #expect(message?.contains("registry.test") == true, "\(message ?? "")")
        #expect(message?.contains("docker-credential-scripted") == true, "\(message ?? "")")
        #expect(message?.contains("same") == true, "\(message ?? "")")
        expectNoSecrets(message)

        // A read soon after takes that failure rather than running the helper again.
        scripted.willAnswer(new)
        let again = unauthorizedMessage { _ = try read(source, cache.digests[1]) }
        #expect(again == message)
        #expect(scripted.lookUps == 1)
    }

    @Test func afterAFailureHasStoodTheSourceIsAskedAgain() throws {
        let (cache, scripted, source) = try loggedIn(failureStandsFor: .zero)

        cache.registry.setAuth(.basic(username: "alice", password: newPassword))
        _ = unauthorizedMessage { _ = try read(source, cache.digests[1]) }
        #expect(scripted.lookUps == 1)
        // The login was renewed meanwhile.
        scripted.willAnswer(new)
        #expect(try read(source, cache.digests[1]) == cache.blobs[1])
        #expect(scripted.lookUps == 2)
    }

    @Test func aNewCredentialAlsoRefusedIsNotAskedForTwice() throws {
        let (cache, scripted, source) = try loggedIn()

        cache.registry.setAuth(.basic(username: "alice", password: "a-THIRD-password"))
        scripted.willAnswer(new)
        let before = cache.registry.requests.count
        let message = unauthorizedMessage { _ = try read(source, cache.digests[1]) }
        #expect(scripted.lookUps == 1)
        #expect(cache.registry.requests.count == before + 2, "one try with the old credential, one with the new")
        expectNoSecrets(message)
    }

    @Test func aFailingSourceIsOneLineNamingIt() throws {
        let (cache, scripted, source) = try loggedIn()

        cache.registry.setAuth(.basic(username: "alice", password: newPassword))
        scripted.willFail(CredentialError(.helperTimedOut, "docker-credential-scripted did not finish within 5s and was killed"))
        let message = unauthorizedMessage { _ = try read(source, cache.digests[1]) }
        #expect(message?.contains("did not finish within 5s") == true, "\(message ?? "")")
        #expect(message?.contains("asking docker-credential-scripted again failed") == true, "\(message ?? "")")
        expectNoSecrets(message)
    }

    /// Concurrent reads refused together share one look-up: the source answers only once all of
    /// them have been refused, so each of them is in the burst.
    @Test(arguments: [true, false])
    func aBurstOfRefusalsAsksTheSourceOnce(sourceHasANewLogin: Bool) throws {
        let cache = BlobRegistry()
        cache.registry.setAuth(.basic(username: "alice", password: oldPassword))
        let counter = RefusalCounter(wrapping: cache.registry)
        let readers = 4
        // The first read answers the first challenge; from then on the header goes up front.
        let firstChallenge = 1
        let allRefused = Shared(false)
        let scripted = ScriptedCredentialSource(old, gate: {
            let refused = counter.waitForRefusals(firstChallenge + readers)
            allRefused.withLock { $0 = refused }
        })
        let source = try cache.source(credential: old, from: scripted.source, transport: counter)
        _ = try read(source, cache.digests[0])
        #expect(counter.waitForRefusals(firstChallenge, timeout: 0))

        cache.registry.setAuth(.basic(username: "alice", password: newPassword))
        scripted.willAnswer(sourceHasANewLogin ? new : old)
        let outcomes = Shared<[Int: Result<[UInt8], any Error>]>([:])
        let done = DispatchGroup()
        for reader in 1...readers {
            done.enter()
            Thread.detachNewThread {
                let outcome = Result { try read(source, cache.digests[reader]) }
                outcomes.withLock { $0[reader] = outcome }
                done.leave()
            }
        }
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(allRefused.withLock { $0 }, "all readers should have been refused before the source answered")
        #expect(scripted.lookUps == 1)
        let results = outcomes.withLock { $0 }
        for reader in 1...readers {
            switch results[reader] {
            case .success(let bytes)?:
                #expect(sourceHasANewLogin && bytes == cache.blobs[reader])
            case .failure(let error)?:
                #expect(!sourceHasANewLogin, "reader \(reader): \(error)")
                expectNoSecrets("\(error)")
            case nil:
                Issue.record("reader \(reader) did not finish")
            }
        }
    }

    @Test func tokenServerRefusalAsksAgainAndFetchesAToken() throws {
        let cache = BlobRegistry()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "alice", password: oldPassword, expiresIn: 300))
        let scripted = ScriptedCredentialSource(old)
        let source = try cache.source(credential: old, from: scripted.source)
        _ = try read(source, cache.digests[0])
        #expect(cache.registry.tokensIssued == 1)

        // The login behind the token expires, and the token with it.
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "alice", password: newPassword, expiresIn: 300))
        cache.registry.revokeTokens()
        scripted.willAnswer(new)
        #expect(try read(source, cache.digests[1]) == cache.blobs[1])
        #expect(scripted.lookUps == 1)
        #expect(cache.registry.tokenRequests.map(\.authorization) == [
            FakeRegistry.basicHeader("alice", oldPassword), FakeRegistry.basicHeader("alice", oldPassword),
            FakeRegistry.basicHeader("alice", newPassword),
        ])
    }

    @Test func tokenServerRefusingTheSameCredentialAgainFails() throws {
        let cache = BlobRegistry()
        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "alice", password: oldPassword, expiresIn: 300))
        let scripted = ScriptedCredentialSource(old)
        let source = try cache.source(credential: old, from: scripted.source)
        _ = try read(source, cache.digests[0])

        cache.registry.setAuth(.bearer(service: "registry.test", challengeScope: nil, username: "alice", password: newPassword, expiresIn: 300))
        cache.registry.revokeTokens()
        let message = unauthorizedMessage { _ = try read(source, cache.digests[1]) }
        #expect(scripted.lookUps == 1)
        #expect(cache.registry.tokenRequests.count == 2, "one token request refused, none after the same credential came back")
        #expect(message?.contains("same") == true, "\(message ?? "")")
        expectNoSecrets(message)
    }
}
