import Foundation
import Testing
@testable import RemoteStore

// MARK: - Fixtures

/// A temporary directory, removed by `cleanup()`.
private struct TempDir {
    let path: String

    init() throws {
        let base = FileManager.default.temporaryDirectory.path
        path = (base as NSString).appendingPathComponent("ocicachefs-creds-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func cleanup() {
        try? FileManager.default.removeItem(atPath: path)
    }

    func file(_ name: String) -> String {
        (path as NSString).appendingPathComponent(name)
    }

    func write(_ name: String, _ contents: String, mode: Int? = nil) throws {
        let target = file(name)
        try FileManager.default.createDirectory(
            atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data(contents.utf8).write(to: URL(fileURLWithPath: target))
        if let mode {
            try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: target)
        }
    }

    /// Writes `config.json` into this directory.
    func writeConfig(_ json: String) throws {
        try write("config.json", json)
    }

    /// Writes an executable `docker-credential-NAME` shell script into `bin/`.
    func writeHelper(_ name: String, _ body: String) throws {
        try write("bin/docker-credential-\(name)", "#!/bin/sh\n" + body + "\n", mode: 0o755)
    }

    /// An environment whose PATH finds the helpers in `bin/` first.
    var environment: [String: String] {
        ["PATH": "\(file("bin")):/usr/bin:/bin", "HOME": file("home")]
    }

    func store(helperTimeout: Duration = .seconds(10)) -> DockerCredentialStore {
        DockerCredentialStore(configDirectory: path, environment: environment, helperTimeout: helperTimeout)
    }
}

private func withTempDir(_ body: (TempDir) throws -> Void) throws {
    let dir = try TempDir()
    defer { dir.cleanup() }
    try body(dir)
}

private func base64(_ s: String) -> String {
    Data(s.utf8).base64EncodedString()
}

/// Everything a credential or error could reveal through the usual printers.
private func renderings<T>(_ value: T) -> [String] {
    var dumped = ""
    dump(value, to: &dumped)
    return [String(describing: value), String(reflecting: value), "\(value)", dumped]
}

private func expectNoSecret<T>(_ value: T, _ secrets: [String], sourceLocation: SourceLocation = #_sourceLocation) {
    for text in renderings(value) {
        for secret in secrets {
            #expect(!text.contains(secret), "\(secret) leaked", sourceLocation: sourceLocation)
        }
    }
}

// MARK: - RegistryCredential

@Suite("RegistryCredential")
struct RegistryCredentialTests {
    @Test func descriptionsRedactSecrets() {
        let basic = RegistryCredential.basic(username: "alice", password: "hunter2-secret")
        #expect(String(describing: basic) == "basic(user: alice, password: <redacted>)")
        #expect(String(reflecting: basic) == "basic(user: alice, password: <redacted>)")
        expectNoSecret(basic, ["hunter2-secret"])

        let token = RegistryCredential.identityToken("idtoken-very-secret")
        #expect(String(describing: token) == "identityToken(<redacted>)")
        expectNoSecret(token, ["idtoken-very-secret"])

        // Also inside containers.
        expectNoSecret([basic, token], ["hunter2-secret", "idtoken-very-secret"])
        expectNoSecret(Optional(basic), ["hunter2-secret"])
    }

    @Test func equality() {
        #expect(RegistryCredential.basic(username: "a", password: "b") == .basic(username: "a", password: "b"))
        #expect(RegistryCredential.basic(username: "a", password: "b") != .basic(username: "a", password: "c"))
        #expect(RegistryCredential.identityToken("x") != .basic(username: "x", password: "x"))
    }
}

// MARK: - Config directory and file

@Suite("DockerCredentialStore config file and auths")
struct DockerCredentialConfigTests {
    @Test func configDirectoryResolution() {
        let env = ["DOCKER_CONFIG": "/from/env", "HOME": "/home/u"]
        #expect(DockerCredentialStore(configDirectory: "/explicit", environment: env).configDirectory == "/explicit")
        #expect(DockerCredentialStore(configDirectory: "/explicit", environment: env).configFilePath == "/explicit/config.json")
        #expect(DockerCredentialStore(environment: env).configDirectory == "/from/env")
        #expect(DockerCredentialStore(environment: ["HOME": "/home/u"]).configDirectory == "/home/u/.docker")
        #expect(DockerCredentialStore(environment: ["DOCKER_CONFIG": "", "HOME": "/home/u"]).configDirectory == "/home/u/.docker")
        #expect(DockerCredentialStore(environment: [:]).configDirectory == nil)
    }

    @Test func storeDescriptionHidesTheEnvironment() {
        let store = DockerCredentialStore(
            configDirectory: "/cfg", environment: ["AWS_SECRET_ACCESS_KEY": "env-secret-value"], helperTimeout: .seconds(3))
        #expect(String(describing: store) == "DockerCredentialStore(config: /cfg/config.json, helperTimeout: 3s)")
        expectNoSecret(store, ["env-secret-value"])
    }

    @Test func noConfigDirectoryMeansNoCredentials() throws {
        #expect(try DockerCredentialStore(environment: [:]).credential(forHost: "registry.example.com") == nil)
    }

    @Test func dockerConfigAndHomeAreUsed() throws {
        try withTempDir { dir in
            let json = #"{"auths":{"r.example.com":{"auth":"\#(base64("u:p"))"}}}"#
            try dir.write("viaenv/config.json", json)
            try dir.write("home/.docker/config.json", json.replacingOccurrences(of: "r.example.com", with: "h.example.com"))
            let viaEnv = DockerCredentialStore(environment: ["DOCKER_CONFIG": dir.file("viaenv"), "HOME": dir.file("home")])
            #expect(try viaEnv.credential(forHost: "r.example.com") == .basic(username: "u", password: "p"))
            #expect(try viaEnv.credential(forHost: "h.example.com") == nil)
            let viaHome = DockerCredentialStore(environment: ["HOME": dir.file("home")])
            #expect(try viaHome.credential(forHost: "h.example.com") == .basic(username: "u", password: "p"))
        }
    }

    @Test func missingFileOrDirectoryMeansNoCredentials() throws {
        try withTempDir { dir throws in
            #expect(try dir.store().credential(forHost: "registry.example.com") == nil)
            let nowhere = DockerCredentialStore(configDirectory: dir.file("does/not/exist"), environment: [:])
            #expect(try nowhere.credential(forHost: "registry.example.com") == nil)
        }
    }

    @Test func emptyFileAndEmptyObjectMeanNoCredentials() throws {
        try withTempDir { dir in
            try dir.writeConfig("")
            #expect(try dir.store().credential(forHost: "registry.example.com") == nil)
            try dir.writeConfig("  \n")
            #expect(try dir.store().credential(forHost: "registry.example.com") == nil)
            try dir.writeConfig("{}")
            #expect(try dir.store().credential(forHost: "registry.example.com") == nil)
            try dir.writeConfig(#"{"auths":{}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == nil)
        }
    }

    @Test(arguments: [
        #"{"auths": {"registry.example.com": {"auth": "c3VwZXJzZWNyZXQ6cGFzcw==" "#,  // truncated JSON
        #"not json at all supersecret"#,
        #"["supersecret"]"#,
        #"{"auths": ["supersecret"]}"#,
        #"{"auths": {"registry.example.com": "supersecret"}}"#,
        #"{"auths": {"registry.example.com": {"auth": 42, "password": "supersecret"}}}"#,
        #"{"credsStore": {"supersecret": 1}}"#,
        #"{"credHelpers": {"registry.example.com": ["supersecret"]}}"#,
    ])
    func malformedFileIsAnErrorNamingTheFileButNotItsContents(json: String) throws {
        try withTempDir { dir in
            try dir.writeConfig(json)
            let error = #expect(throws: CredentialError.self) {
                try dir.store().credential(forHost: "registry.example.com")
            }
            guard let error else { return }
            #expect(error.kind == .invalidConfig)
            #expect(error.message.contains(dir.file("config.json")))
            #expect(!error.message.contains("\n"))
            expectNoSecret(error, ["supersecret", "c3VwZXJzZWNyZXQ"])
        }
    }

    /// Found by the docker-config fuzz target: "\r\n" is one Character, equal to neither
    /// "\r" nor "\n", and a key holding it reached the message whole.
    @Test func aKeyWithCRLFStaysOnOneLine() throws {
        try withTempDir { dir in
            try dir.writeConfig("{\"auths\":{\"x\\r\\ny\":1}}")
            let error = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "docker.io") }
            #expect(error.map { !$0.message.utf8.contains(where: { $0 == 0x0A || $0 == 0x0D }) } == true, "\(String(describing: error))")
        }
    }

    @Test func invalidAuthFieldIsAnErrorWithoutTheSecret() throws {
        try withTempDir { dir in
            // Not base64.
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"auth":"!!supersecret!!"}}}"#)
            let e1 = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(e1?.kind == .invalidConfig)
            if let e1 { expectNoSecret(e1, ["supersecret"]) }
            // Base64 without a colon.
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"auth":"\#(base64("supersecret"))"}}}"#)
            let e2 = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(e2?.message.contains("registry.example.com") == true)
            if let e2 { expectNoSecret(e2, ["supersecret", base64("supersecret")]) }
        }
    }

    @Test func configFileThatIsADirectoryIsAnError() throws {
        try withTempDir { dir in
            try FileManager.default.createDirectory(atPath: dir.file("config.json"), withIntermediateDirectories: true)
            let error = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(error?.message.contains(dir.file("config.json")) == true)
        }
    }

    @Test func authFieldSplitsAtFirstColon() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"auth":"\#(base64("alice:pa:ss:word"))"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "alice", password: "pa:ss:word"))
        }
    }

    @Test func authFieldWithoutPaddingIsAccepted() throws {
        try withTempDir { dir in
            let unpadded = base64("alice:pw").replacingOccurrences(of: "=", with: "")
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"auth":"\#(unpadded)"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "alice", password: "pw"))
        }
    }

    @Test func usernameAndPasswordFields() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"username":"bob","password":"pw-b"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "bob", password: "pw-b"))
        }
    }

    @Test func authFieldWinsOverUsernameAndPassword() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"auth":"\#(base64("a:b"))","username":"x","password":"y"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "a", password: "b"))
        }
    }

    @Test func identityTokenTakesPrecedence() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"registry.example.com":{"auth":"\#(base64("a:b"))","identitytoken":"idtok-123"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .identityToken("idtok-123"))
        }
    }

    @Test func keysAreMatchedCaseInsensitivelyLikeGo() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"Auths":{"registry.example.com":{"IdentityToken":"idtok-ci"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .identityToken("idtok-ci"))
        }
    }

    @Test func emptyEntryMeansNoCredential() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"registry.example.com":{}, "other.example.com": {"auth": ""}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == nil)
            #expect(try dir.store().credential(forHost: "other.example.com") == nil)
        }
    }

    @Test(arguments: [
        ("registry.example.com", "registry.example.com"),
        ("https://registry.example.com", "registry.example.com"),
        ("https://registry.example.com/v1/", "registry.example.com"),
        ("http://registry.example.com", "registry.example.com"),
        ("http://registry.example.com/v2/some/path", "registry.example.com"),
        ("REGISTRY.Example.com", "registry.example.com"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
        ("https://[::1]:5000/", "[::1]:5000"),
    ])
    func authsKeysMatchByHostAndPort(key: String, host: String) throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"\#(key)":{"auth":"\#(base64("u:p"))"}}}"#)
            #expect(try dir.store().credential(forHost: host) == .basic(username: "u", password: "p"))
        }
    }

    @Test func hostAndPortMustMatch() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"127.0.0.1:5000":{"auth":"\#(base64("u:p"))"}, "https://registry.example.com/v1/":{"auth":"\#(base64("r:s"))"}}}"#)
            #expect(try dir.store().credential(forHost: "127.0.0.1") == nil)
            #expect(try dir.store().credential(forHost: "127.0.0.1:5001") == nil)
            #expect(try dir.store().credential(forHost: "registry.example.com:5000") == nil)
            #expect(try dir.store().credential(forHost: "example.com") == nil)
            #expect(try dir.store().credential(forHost: "other.example.com") == nil)
        }
    }

    @Test func exactKeyIsPreferredOverNormalizedMatches() throws {
        try withTempDir { dir in
            try dir.writeConfig("""
            {"auths":{
              "https://registry.example.com/v1/": {"auth":"\(base64("url:1"))"},
              "registry.example.com": {"auth":"\(base64("bare:2"))"}
            }}
            """)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "bare", password: "2"))
        }
    }

    @Test(arguments: ["docker.io", "registry-1.docker.io", "index.docker.io", "DOCKER.IO"])
    func dockerHubHostsUseTheIndexKey(host: String) throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"https://index.docker.io/v1/":{"auth":"\#(base64("hubuser:hubpw"))"}}}"#)
            #expect(try dir.store().credential(forHost: host) == .basic(username: "hubuser", password: "hubpw"))
        }
    }

    @Test func dockerHubIsNotConfusedWithOtherHosts() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"auths":{"https://index.docker.io/v1/":{"auth":"\#(base64("hubuser:hubpw"))"}}}"#)
            #expect(try dir.store().credential(forHost: "ghcr.io") == nil)
            #expect(try dir.store().credential(forHost: "mirror.docker.io.example.com") == nil)
        }
    }
}

// MARK: - Credential helpers

@Suite("DockerCredentialStore credential helpers", .serialized)
struct DockerCredentialHelperTests {
    /// A helper that answers with a username derived from the server URL it
    /// read on stdin, so tests can see what was sent.
    static let echoingHelper = #"""
    [ "$1" = get ] || { echo "unexpected arguments: $*" >&2; exit 2; }
    IFS= read -r server
    printf '{"ServerURL":"%s","Username":"user-for-%s","Secret":"helper-secret-1"}\n' "$server" "$server"
    """#

    static let notFoundHelper = #"""
    cat >/dev/null
    echo "credentials not found in native keychain"
    exit 1
    """#

    @Test func credsStoreSuccess() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", Self.echoingHelper)
            try dir.writeConfig(#"{"credsStore":"fake","auths":{"registry.example.com":{}}}"#)
            let credential = try dir.store().credential(forHost: "registry.example.com")
            #expect(credential == .basic(username: "user-for-registry.example.com", password: "helper-secret-1"))
            expectNoSecret(credential, ["helper-secret-1"])
        }
    }

    @Test func helperGetsTheHubServerURL() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", Self.echoingHelper)
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            for host in ["docker.io", "registry-1.docker.io", "index.docker.io"] {
                #expect(try dir.store().credential(forHost: host)
                    == .basic(username: "user-for-https://index.docker.io/v1/", password: "helper-secret-1"))
            }
            #expect(try dir.store().credential(forHost: "127.0.0.1:5000")
                == .basic(username: "user-for-127.0.0.1:5000", password: "helper-secret-1"))
        }
    }

    @Test func identityTokenFromHelper() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", #"""
            cat >/dev/null
            echo '{"ServerURL":"registry.example.com","Username":"<token>","Secret":"refresh-token-secret"}'
            """#)
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            let credential = try dir.store().credential(forHost: "registry.example.com")
            #expect(credential == .identityToken("refresh-token-secret"))
            expectNoSecret(credential, ["refresh-token-secret"])
        }
    }

    @Test func credHelpersWinOverCredsStoreForTheirHostOnly() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", Self.echoingHelper)
            try dir.writeHelper("other", #"""
            cat >/dev/null
            echo '{"Username":"from-other","Secret":"other-secret"}'
            """#)
            try dir.writeConfig(#"{"credsStore":"other","credHelpers":{"registry.example.com":"fake"}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com")
                == .basic(username: "user-for-registry.example.com", password: "helper-secret-1"))
            #expect(try dir.store().credential(forHost: "ghcr.io") == .basic(username: "from-other", password: "other-secret"))
        }
    }

    @Test func credHelpersWithoutCredsStore() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", Self.echoingHelper)
            try dir.writeConfig(#"{"credHelpers":{"registry.example.com":"fake"},"auths":{"ghcr.io":{"auth":"\#(base64("g:h"))"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com")
                == .basic(username: "user-for-registry.example.com", password: "helper-secret-1"))
            // Other hosts use auths; the helper is not consulted.
            #expect(try dir.store().credential(forHost: "ghcr.io") == .basic(username: "g", password: "h"))
        }
    }

    @Test func emptyCredHelperNameMeansUseTheFile() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"credsStore":"missing","credHelpers":{"registry.example.com":""},"auths":{"registry.example.com":{"auth":"\#(base64("f:g"))"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "f", password: "g"))
        }
    }

    @Test func notFoundFallsThroughToAuths() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", Self.notFoundHelper)
            try dir.writeConfig(#"{"credsStore":"fake","auths":{"https://registry.example.com":{"auth":"\#(base64("fileuser:filepw"))"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "fileuser", password: "filepw"))
            // And nothing in auths: no credential, not an error.
            #expect(try dir.store().credential(forHost: "ghcr.io") == nil)
        }
    }

    @Test func notFoundFromCredHelperAlsoFallsThrough() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", Self.notFoundHelper)
            try dir.writeConfig(#"{"credHelpers":{"registry.example.com":"fake"},"auths":{"registry.example.com":{"username":"u","password":"p"}}}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "u", password: "p"))
        }
    }

    @Test func slowHelperIsKilledWithinTheTimeout() throws {
        try withTempDir { dir in
            // `sleep` runs as a grandchild that also holds stdout open, so this
            // checks that neither the wait nor the pipe reads outlive the timeout.
            try dir.writeHelper("fake", "sleep 30\necho '{\"Username\":\"late\",\"Secret\":\"late-secret\"}'")
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            let started = ContinuousClock.now
            let error = #expect(throws: CredentialError.self) {
                try dir.store(helperTimeout: .milliseconds(500)).credential(forHost: "registry.example.com")
            }
            let elapsed = ContinuousClock.now - started
            #expect(elapsed < .seconds(5), "took \(elapsed)")
            #expect(elapsed >= .milliseconds(450), "took \(elapsed)")
            #expect(error?.kind == .helperTimedOut)
            #expect(error?.message.contains("docker-credential-fake") == true)
            #expect(error?.message.contains("500ms") == true)
        }
    }

    @Test func helperThatClosesOutputButKeepsRunningTimesOut() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", "exec >/dev/null 2>&1\nexec sleep 30")
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            let started = ContinuousClock.now
            let error = #expect(throws: CredentialError.self) {
                try dir.store(helperTimeout: .milliseconds(300)).credential(forHost: "registry.example.com")
            }
            #expect(ContinuousClock.now - started < .seconds(5))
            #expect(error?.kind == .helperTimedOut)
        }
    }

    @Test func missingHelperIsAnErrorNamingIt() throws {
        try withTempDir { dir in
            try dir.writeConfig(#"{"credsStore":"nonexistent","auths":{"registry.example.com":{"auth":"\#(base64("u:p"))"}}}"#)
            let error = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(error?.kind == .helperNotFound)
            #expect(error?.message == "docker-credential-nonexistent not found in PATH")
        }
    }

    @Test func nonExecutableHelperIsNotFound() throws {
        try withTempDir { dir in
            try dir.write("bin/docker-credential-fake", "#!/bin/sh\necho hi\n", mode: 0o644)
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            let error = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(error?.message == "docker-credential-fake not found in PATH")
        }
    }

    @Test func failingHelperIsAnErrorWithoutSecrets() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", "cat >/dev/null\necho 'keychain is locked' >&2\nexit 3")
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            let error = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(error?.kind == .helperFailed)
            #expect(error?.message.contains("docker-credential-fake") == true)
            #expect(error?.message.contains("exit status 3") == true)
            #expect(error?.message.contains("keychain is locked") == true)

            // A helper that prints its payload and then fails must not leak it.
            try dir.writeHelper("fake", #"""
            cat >/dev/null
            echo '{"Username":"u","Secret":"leaky-secret"}'
            echo 'Secret: leaky-secret' >&2
            exit 1
            """#)
            let leaky = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(leaky?.kind == .helperFailed)
            if let leaky { expectNoSecret(leaky, ["leaky-secret"]) }
        }
    }

    @Test func malformedHelperOutputIsAnErrorWithoutSecrets() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", "cat >/dev/null\necho 'Username=u Secret=garbled-secret'")
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            let error = #expect(throws: CredentialError.self) { try dir.store().credential(forHost: "registry.example.com") }
            #expect(error?.kind == .helperOutputInvalid)
            if let error { expectNoSecret(error, ["garbled-secret"]) }
        }
    }

    @Test func helperThatIgnoresStdinAndExitsAtOnce() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", #"echo '{"Username":"quick","Secret":"q"}'"#)
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            #expect(try dir.store().credential(forHost: "registry.example.com") == .basic(username: "quick", password: "q"))
        }
    }

    @Test func largeOutputOnBothPipesDoesNotDeadlock() throws {
        try withTempDir { dir in
            // 512 KiB on stderr before anything on stdout: far past a pipe buffer.
            try dir.writeHelper("fake", #"""
            cat >/dev/null
            head -c 524288 /dev/zero | tr '\0' 'x' >&2
            echo '{"Username":"big","Secret":"b"}'
            """#)
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            #expect(try dir.store(helperTimeout: .seconds(20)).credential(forHost: "registry.example.com")
                == .basic(username: "big", password: "b"))
        }
    }

    @Test func helperSeesTheGivenEnvironment() throws {
        try withTempDir { dir in
            try dir.writeHelper("fake", #"""
            cat >/dev/null
            printf '{"Username":"%s","Secret":"s"}\n' "$FAKE_HELPER_MARK"
            """#)
            try dir.writeConfig(#"{"credsStore":"fake"}"#)
            var env = dir.environment
            env["FAKE_HELPER_MARK"] = "marked"
            let store = DockerCredentialStore(configDirectory: dir.path, environment: env)
            #expect(try store.credential(forHost: "registry.example.com") == .basic(username: "marked", password: "s"))
        }
    }

    @Test func concurrentLookupsAreSafe() async throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        try dir.writeHelper("fake", Self.echoingHelper)
        try dir.writeConfig(#"{"credsStore":"fake"}"#)
        let store = dir.store()
        let results = try await withThrowingTaskGroup(of: RegistryCredential?.self) { group in
            for i in 0..<8 {
                group.addTask { try store.credential(forHost: "r\(i).example.com") }
            }
            var all: [RegistryCredential?] = []
            for try await r in group { all.append(r) }
            return all
        }
        #expect(results.count == 8)
        #expect(results.allSatisfy { $0 != nil })
    }
}
