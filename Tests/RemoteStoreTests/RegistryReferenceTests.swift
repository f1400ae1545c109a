import OCI
import Testing
@testable import RemoteStore

private let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
private let digest = Digest("sha256:" + hex)!

@Suite("RegistryReference")
struct RegistryReferenceTests {
    @Test func hostPortRepoTag() throws {
        let ref = try RegistryReference(parsing: "registry.example.com:5000/team/cache:buildcache")
        #expect(ref.host == "registry.example.com:5000")
        #expect(ref.hostName == "registry.example.com")
        #expect(ref.apiHost == "registry.example.com:5000")
        #expect(ref.repository == "team/cache")
        #expect(ref.tag == "buildcache")
        #expect(ref.digest == nil)
        #expect(ref.layoutTag == "buildcache")
        #expect(ref.manifestReference == "buildcache")
        #expect(!ref.isLoopback)
        #expect(ref.description == "registry.example.com:5000/team/cache:buildcache")
    }

    @Test func digestOnly() throws {
        let ref = try RegistryReference(parsing: "ghcr.io/org/app@sha256:\(hex)")
        #expect(ref.host == "ghcr.io")
        #expect(ref.repository == "org/app")
        #expect(ref.tag == nil)
        #expect(ref.digest == digest)
        #expect(ref.manifestReference == "sha256:\(hex)")
        #expect(ref.layoutTag == "latest")
        #expect(ref.description == "ghcr.io/org/app@sha256:\(hex)")
    }

    @Test func tagAndDigest() throws {
        let ref = try RegistryReference(parsing: "localhost:5000/app:v1@sha256:\(hex)")
        #expect(ref.host == "localhost:5000")
        #expect(ref.repository == "app")
        #expect(ref.tag == "v1")
        #expect(ref.digest == digest)
        // The digest pins what is fetched; the tag names it in index.json.
        #expect(ref.manifestReference == "sha256:\(hex)")
        #expect(ref.layoutTag == "v1")
        #expect(ref.description == "localhost:5000/app:v1@sha256:\(hex)")
    }

    @Test func localhostRepo() throws {
        let ref = try RegistryReference(parsing: "localhost/repo")
        #expect(ref.host == "localhost")
        #expect(ref.apiHost == "localhost")
        #expect(ref.repository == "repo")
        #expect(ref.tag == nil)
        #expect(ref.layoutTag == "latest")
        #expect(ref.manifestReference == "latest")
        #expect(ref.isLoopback)
    }

    @Test func officialImageShortName() throws {
        let ref = try RegistryReference(parsing: "alpine")
        #expect(ref.host == "docker.io")
        #expect(ref.repository == "library/alpine")
        #expect(ref.apiHost == "registry-1.docker.io")
        #expect(ref.tag == nil)
        #expect(ref.layoutTag == "latest")
        #expect(!ref.isLoopback)
        #expect(ref.description == "docker.io/library/alpine")
    }

    @Test func officialImageWithTag() throws {
        let ref = try RegistryReference(parsing: "alpine:3.19")
        #expect(ref.host == "docker.io")
        #expect(ref.repository == "library/alpine")
        #expect(ref.tag == "3.19")
    }

    @Test func userRepo() throws {
        let ref = try RegistryReference(parsing: "user/repo:cache")
        #expect(ref.host == "docker.io")
        #expect(ref.repository == "user/repo")
        #expect(ref.tag == "cache")
        #expect(ref.apiHost == "registry-1.docker.io")
    }

    /// Docker normalises `docker.io/alpine` (and `index.docker.io/alpine`) to
    /// `docker.io/library/alpine`; Docker Hub has no repository called plain `alpine`.
    @Test(arguments: ["docker.io/alpine", "index.docker.io/alpine"])
    func explicitDockerHubOfficialImage(_ text: String) throws {
        let ref = try RegistryReference(parsing: text)
        #expect(ref.apiHost == "registry-1.docker.io")
        #expect(ref.repository == "library/alpine")
    }

    @Test func explicitDockerHubUserRepo() throws {
        let ref = try RegistryReference(parsing: "docker.io/user/repo")
        #expect(ref.host == "docker.io")
        #expect(ref.repository == "user/repo")
        #expect(ref.apiHost == "registry-1.docker.io")
    }

    @Test func nestedRepositoryPaths() throws {
        let ref = try RegistryReference(parsing: "gitlab.example.com:4567/group/sub-group/project/cache_dir.v2:buildcache-1")
        #expect(ref.host == "gitlab.example.com:4567")
        #expect(ref.repository == "group/sub-group/project/cache_dir.v2")
        #expect(ref.tag == "buildcache-1")
        let hub = try RegistryReference(parsing: "a/b/c")
        #expect(hub.host == "docker.io")
        #expect(hub.repository == "a/b/c")
    }

    @Test func hostWithoutDotOrPortIsARepoComponent() throws {
        // "myhost/app" is Docker Hub's user "myhost" (as in Docker).
        let ref = try RegistryReference(parsing: "myhost/app")
        #expect(ref.host == "docker.io")
        #expect(ref.repository == "myhost/app")
    }

    @Test func hostWithPortButNoDot() throws {
        let ref = try RegistryReference(parsing: "registry:5000/app:v1")
        #expect(ref.host == "registry:5000")
        #expect(ref.hostName == "registry")
        #expect(ref.repository == "app")
        #expect(ref.tag == "v1")
    }

    // MARK: Loopback

    @Test(arguments: [
        "127.0.0.1/app", "127.0.0.1:5000/app:t", "127.1.2.3:8080/app", "127.255.255.254/app",
        "localhost/app", "localhost:5000/app", "[::1]:5000/app:tag", "[::1]/app",
    ])
    func loopbackHosts(_ text: String) throws {
        let ref = try RegistryReference(parsing: text)
        #expect(ref.isLoopback, "\(text) → host \(ref.host)")
        #expect(ref.apiHost == ref.host)
    }

    @Test func ipv6LoopbackParts() throws {
        let ref = try RegistryReference(parsing: "[::1]:5000/app:tag")
        #expect(ref.host == "[::1]:5000")
        #expect(ref.hostName == "[::1]")
        #expect(ref.repository == "app")
        #expect(ref.tag == "tag")
    }

    @Test(arguments: [
        "128.0.0.1/app", "10.0.0.1:5000/app", "192.168.1.127/app", "registry.example.com/app",
        "localhost.example.com/app", "alpine", "[::2]:5000/app", "myregistry.local:5000/app",
    ])
    func nonLoopbackHosts(_ text: String) throws {
        let ref = try RegistryReference(parsing: text)
        #expect(!ref.isLoopback, "\(text) → host \(ref.host)")
    }

    /// A DNS name that merely starts with "127." is not a loopback address: treating it as
    /// one sends requests (and credentials) over plain HTTP. containerd's MatchLocalhost
    /// only accepts "localhost" and IPs for which IsLoopback holds.
    @Test(arguments: ["127.example.com/app", "127.0.0.1.nip.io:5000/app"])
    func dnsNamesStartingWith127AreNotLoopback(_ text: String) throws {
        let ref = try RegistryReference(parsing: text)
        #expect(!ref.isLoopback, "\(text) → hostName \(ref.hostName) treated as loopback")
    }

    // MARK: Invalid

    @Test(arguments: [
        "",
        "reg.example.com/",
        "reg.example.com/App",
        "Upper/Repo",
        "reg.example.com/team/Repo:tag",
        "reg.example.com/../x",
        "reg.example.com/a/../b",
        "reg.example.com/a/..",
        "reg.example.com/a/./b",
        "reg.example.com/a//b",
        "reg.example.com/-a",
        "reg.example.com/a-",
        "reg.example.com/a b",
        "reg.example.com/a%2fb",
        "reg.example.com/a?x=1",
    ])
    func invalidRepositories(_ text: String) {
        let message = configurationMessage { _ = try RegistryReference(parsing: text) }
        #expect(message.contains("not a valid repository name"), "\(message)")
    }

    /// Hosts Docker's reference grammar rejects (and that do not make a URL): they must be a
    /// configuration error, not reach `RegistrySource`, whose init force-unwraps the base URL.
    @Test(arguments: [
        "../x",
        "a b.example.com/x",
        "reg.example.com:abc/x",
        "reg.example.com:/x",
        "[::1/x",
        "a#b.example.com/x",
        "a?b.example.com/x",
    ])
    func invalidHosts(_ text: String) {
        _ = configurationMessage { _ = try RegistryReference(parsing: text) }
    }

    /// libcurl would call such a URL malformed without naming the port, and only at the first
    /// request; parsing names it.
    @Test(arguments: [
        ("127.0.0.1:0/cache:main", "0"),
        ("127.0.0.1:65536/cache:main", "65536"),
        ("127.0.0.1:99999/cache:main", "99999"),
        ("localhost:00000/cache", "00000"),
        ("[::1]:70000/cache:main", "70000"),
        ("reg.example.com:65536/team/cache@sha256:" + hex, "65536"),
    ])
    func portsOutsideTheRangeAreRefused(_ text: String, _ port: String) {
        let message = configurationMessage { _ = try RegistryReference(parsing: text) }
        #expect(message.contains("port \(port) is outside 1-65535"), "\(message)")
        #expect(message.contains(text), "\(message)")
    }

    @Test(arguments: ["127.0.0.1:1/cache", "127.0.0.1:65535/cache", "[::1]:65535/cache", "localhost:05000/cache"])
    func portsAtTheEdgesOfTheRangeAreAccepted(_ text: String) throws {
        let reference = try RegistryReference(parsing: text)
        #expect(reference.repository == "cache")
        #expect(text.hasPrefix(reference.host))
    }

    @Test(arguments: [
        "reg.example.com/app:",
        "reg.example.com/app:-x",
        "reg.example.com/app:.x",
        "reg.example.com/app:a/b:c",
        "reg.example.com/app:a+b",
        "reg.example.com/app:" + String(repeating: "t", count: 129),
    ])
    func invalidTags(_ text: String) {
        _ = configurationMessage { _ = try RegistryReference(parsing: text) }
    }

    @Test func longestValidTag() throws {
        let tag = String(repeating: "t", count: 128)
        #expect(try RegistryReference(parsing: "reg.example.com/app:" + tag).tag == tag)
        #expect(try RegistryReference(parsing: "reg.example.com/app:_Tag.9-x").tag == "_Tag.9-x")
    }

    @Test(arguments: [
        "reg.example.com/app@sha256:abc",
        "reg.example.com/app@sha512:" + String(repeating: "a", count: 128),
        "reg.example.com/app@sha256:" + hex.uppercased(),
        "reg.example.com/app@",
        "reg.example.com/app:v1@latest",
    ])
    func invalidDigests(_ text: String) {
        let message = configurationMessage { _ = try RegistryReference(parsing: text) }
        #expect(message.contains("not a sha256 digest"), "\(message)")
    }

    @Test func errorNamesTheReference() {
        let message = configurationMessage { _ = try RegistryReference(parsing: "reg.example.com/Bad") }
        #expect(message.contains("reg.example.com/Bad"), "\(message)")
    }
}
