import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// A login from a credential helper expires during a long mount (ECR's and GCR's after hours):
// the registry starts answering 401, and the daemon must run the helper again and carry on
// with what it says now, without looping when the helper has nothing new.

/// `docker-credential-test` in a directory of its own, named for one registry in `credHelpers`:
/// it answers `get` with the password in a file, and adds a line to another file each run.
struct CredentialHelper {
    let directory: String
    let passwordFile: String
    let invocationsFile: String
    let dockerConfig: String
    let user: String

    /// For the daemon: the helper's directory first on PATH.
    var environment: [String: String] {
        ["PATH": directory + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")]
    }

    /// From now on the helper hangs (after counting its run), its PID in `hungPIDFile`.
    func hangFromNowOn() throws {
        try Data().write(to: URL(fileURLWithPath: directory + "/hang"))
    }

    var hungPIDFile: String { directory + "/hung-pid" }

    var invocations: Int {
        Processes.readText(invocationsFile).split(separator: "\n").count
    }

    /// Replaced in one rename, so a helper running meanwhile reads the old or the new one.
    func setPassword(_ password: String) throws {
        let staged = passwordFile + ".new"
        try Data(password.utf8).write(to: URL(fileURLWithPath: staged))
        guard rename(staged, passwordFile) == 0 else { throw HarnessError("rename \(staged): \(String(cString: strerror(errno)))") }
    }
}

extension Workspace {
    func credentialHelper(for host: String, user: String = "alice", password: String) throws -> CredentialHelper {
        let directory = try makeDirectory("helper-bin-\(nextID())")
        let helper = CredentialHelper(directory: directory, passwordFile: directory + "/password",
                                      invocationsFile: directory + "/invocations",
                                      dockerConfig: try makeDirectory("docker-config-\(nextID())"), user: user)
        try helper.setPassword(password)
        let script = """
            #!/bin/sh
            [ "$1" = get ] || exit 1
            read -r server
            echo "$server" >> '\(helper.invocationsFile)'
            if [ -e '\(directory)/hang' ]; then echo $$ > '\(helper.hungPIDFile)'; exec sleep 600; fi
            printf '{"ServerURL":"%s","Username":"\(user)","Secret":"%s"}\\n' "$server" "$(cat '\(helper.passwordFile)')"

            """
        let scriptPath = directory + "/docker-credential-test"
        try Data(script.utf8).write(to: URL(fileURLWithPath: scriptPath))
        guard chmod(scriptPath, 0o755) == 0 else { throw HarnessError("chmod \(scriptPath): \(String(cString: strerror(errno)))") }
        let config = try JSONSerialization.data(withJSONObject: ["credHelpers": [host: "test"]], options: [.sortedKeys])
        try config.write(to: URL(fileURLWithPath: helper.dockerConfig + "/config.json"))
        return helper
    }
}

extension Registry {
    /// Rewrites the htpasswd file; docker-registry reads it again when its modification time
    /// changes, at the next request.
    func changePassword(of user: String, to password: String, in ws: Workspace) async throws {
        let htpasswd = try Harness.tool("htpasswd", neededFor: "Basic auth (package apache2-utils)")
        let result = try await Processes.run(htpasswd, ["-Bbc", dir + "/htpasswd", user, password], in: ws)
        guard result.status == 0 else { throw HarnessError("htpasswd failed: \(result)") }
    }
}

@Suite("Credentials from a helper, asked for again when the registry refuses them")
struct CredentialHelperTests {
    private static let first = "first-PASSWORD-one"
    private static let second = "second-PASSWORD-two"

    /// Neither password, nor the Basic header of either, may be in the daemon's log.
    /// A registry behind Basic auth holding two layers, mounted with a credential helper that
    /// knows the password, and one layer read. The last layer is read: reading a layer to its
    /// end prefetches the next one, which would then be cached before the password changes.
    static func basicAuthMountWithALayerRead(_ ws: Workspace, timeout: Double = 10) async throws
        -> (registry: Registry, helper: CredentialHelper, mount: MountHandle, notYetRead: SeedSummary.Blob) {
        let registry = try await ws.startRegistry(auth: .basic(user: "alice", password: first))
        let seed = try await ws.seed(registry, variant: "index", layers: 2, layerSize: 300_000, user: "alice", password: first)
        let helper = try ws.credentialHelper(for: registry.host, password: first)
        let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), dockerConfig: helper.dockerConfig,
                                                       environment: helper.environment, timeout: timeout)
        let (read, notYetRead) = (seed.layers[1], seed.layers[0])
        Check.blobsVerify(mount, [read])
        #expect(registry.blobGets(repo: "cache", digest: notYetRead.digest) == 0)
        return (registry, helper, mount, notYetRead)
    }

    private func expectNoSecrets(in log: String, sourceLocation: SourceLocation = #_sourceLocation) {
        for password in [Self.first, Self.second] {
            #expect(!log.contains(password), "the daemon log shows a password", sourceLocation: sourceLocation)
            let basic = Data("alice:\(password)".utf8).base64EncodedString()
            #expect(!log.contains(basic), "the daemon log shows a Basic credential", sourceLocation: sourceLocation)
        }
    }

    @Test("Basic auth: after the password changes, the helper is run again and the read succeeds")
    func basicPasswordChangesDuringTheMount() async throws {
        try await withWorkspace("helper-basic") { ws in
            let (registry, helper, mount, notYetRead) = try await Self.basicAuthMountWithALayerRead(ws)
            let atMount = helper.invocations
            #expect(atMount == 1, "the mount runs the helper once")

            try await registry.changePassword(of: "alice", to: Self.second, in: ws)
            try helper.setPassword(Self.second)
            Check.blobsVerify(mount, [notYetRead])
            #expect(helper.invocations == atMount + 1, "the refused login is asked for again, once")
            // The registry logs a request after its response is sent: the line may trail the read.
            let fetchedOnce = await LifecycleTests.eventually(5) { registry.blobGets(repo: "cache", digest: notYetRead.digest) == 1 }
            #expect(fetchedOnce, "GETs of the layer: \(registry.blobGets(repo: "cache", digest: notYetRead.digest))")
            expectNoSecrets(in: mount.log)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("Basic auth: a helper that gives the refused password again fails the read with EIO, without a loop")
    func helperWithNothingNewFailsTheRead() async throws {
        try await withWorkspace("helper-same") { ws in
            let (registry, helper, mount, notYetRead) = try await Self.basicAuthMountWithALayerRead(ws)
            let atMount = helper.invocations

            try await registry.changePassword(of: "alice", to: Self.second, in: ws)
            let outcome = FileIO.readUntilFailure(mount.blobPath(notYetRead.digest))
            #expect(outcome.errno == EIO, "the read should fail with EIO: \(outcome)")
            #expect(helper.invocations == atMount + 1, "one failed read asks the helper once")
            let log = mount.log
            #expect(log.contains("asked again it gave the same ones"), "the log should say why: \(log.suffix(2000))")
            #expect(log.contains("docker-credential-test"), "the log should name the helper")
            expectNoSecrets(in: log)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("a helper that hangs when asked again is killed after --timeout, and the read fails with EIO")
    func hangingHelperIsKilledAfterTheTimeout() async throws {
        try await withWorkspace("helper-hang") { ws in
            let timeout = 3.0
            let (registry, helper, mount, notYetRead) = try await Self.basicAuthMountWithALayerRead(ws, timeout: timeout)

            try await registry.changePassword(of: "alice", to: Self.second, in: ws)
            try helper.hangFromNowOn()
            let (outcome, seconds) = await onThread { FileIO.readUntilFailure(mount.blobPath(notYetRead.digest)) }
            #expect(outcome.errno == EIO, "the read should fail with EIO: \(outcome)")
            #expect(seconds >= timeout - 0.5 && seconds < timeout + 10, "the read took \(seconds) s with --timeout \(timeout)")
            let hungPID = pid_t(Processes.readText(helper.hungPIDFile).trimmingCharacters(in: .whitespacesAndNewlines))
            #expect(hungPID != nil, "the helper should have been run again")
            if let hungPID { #expect(!Processes.isAlive(hungPID), "the hung helper \(hungPID) should have been killed") }
            let log = mount.log
            #expect(log.contains("did not finish within 3s and was killed"), "the log should say why: \(log.suffix(2000))")
            expectNoSecrets(in: log)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("token auth: after the password changes at the token server, the helper is run again")
    func tokenServerPasswordChangesDuringTheMount() async throws {
        try await withWorkspace("helper-token") { ws in
            let tokenLifetime = 2
            let issuer = try await ws.startTokenIssuer(user: "alice", password: Self.first, ttl: tokenLifetime)
            let registry = try await ws.startRegistry(auth: .token(issuer.endpoint))
            let seed = try await ws.seed(registry, variant: "index", layers: 2, layerSize: 300_000, user: "alice", password: Self.first)
            let helper = try ws.credentialHelper(for: registry.host, password: Self.first)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), dockerConfig: helper.dockerConfig,
                                                           environment: helper.environment)
            // The last layer first: reading a layer to its end prefetches the next one, which
            // would then be cached before the password changes.
            let (read, notYetRead) = (seed.layers[1], seed.layers[0])
            Check.blobsVerify(mount, [read])
            #expect(registry.blobGets(repo: "cache", digest: notYetRead.digest) == 0)
            let atMount = helper.invocations

            try issuer.changePassword(of: "alice", to: Self.second)
            try helper.setPassword(Self.second)
            let deniedBefore = issuer.stats()["denied"] ?? 0
            // The daemon's token, fetched at the latest during that read, must expire so that it
            // goes back to the token server: time passing is the event here.
            try await Task.sleep(for: .seconds(tokenLifetime))
            Check.blobsVerify(mount, [notYetRead])
            #expect(helper.invocations == atMount + 1, "the refused login is asked for again, once")
            #expect((issuer.stats()["denied"] ?? 0) == deniedBefore + 1, "the old password is refused once by the token server")
            expectNoSecrets(in: mount.log)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }
}
