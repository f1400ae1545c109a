import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A registry that serves broken manifests (docker-registry itself refuses to store them).
/// Generated into the workspace; exits when its stdin closes, so it cannot outlive the test.
enum FakeRegistry {
    static let script = #"""
    import hashlib, json, os, re, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    GOOD = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.buildkit.cacheconfig.v0",
                                  "digest": "sha256:" + "1" * 64, "size": 2},
                       "layers": []}, separators=(",", ":")).encode()
    # A layer whose download stalls half way (tag "stall"): the registry sends half of it,
    # then nothing more, with the connection left open.
    STALL_LAYER = os.urandom(1_200_000)
    STALL_DIGEST = "sha256:" + hashlib.sha256(STALL_LAYER).hexdigest()
    CACHE_CONFIG = b'{"layers":[{"blob":"%s","parent":-1}],"records":[]}' % STALL_DIGEST.encode()
    CACHE_CONFIG_DIGEST = "sha256:" + hashlib.sha256(CACHE_CONFIG).hexdigest()
    STALL_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                 "config": {"mediaType": "application/vnd.buildkit.cacheconfig.v0",
                                            "digest": CACHE_CONFIG_DIGEST, "size": len(CACHE_CONFIG)},
                                 "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                             "digest": STALL_DIGEST, "size": len(STALL_LAYER),
                                             "annotations": {"containerd.io/uncompressed": STALL_DIGEST}}]},
                                separators=(",", ":")).encode()
    # Issue 13: a cache manifest whose one layer declares `layer_size` bytes (the config is
    # served; the layer never is).
    def sized_manifest(layer_size):
        return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.buildkit.cacheconfig.v0",
                                      "digest": CACHE_CONFIG_DIGEST, "size": len(CACHE_CONFIG)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": "sha256:" + "2" * 64, "size": layer_size}]},
                          separators=(",", ":")).encode()
    # A media type that would retitle the terminal (ESC ] 0 ; ... BEL) if printed raw.
    HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[31m"
    ESCAPE_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST + HOSTILE_TEXT, "layers": []}).encode()
    # tag -> (body, content type, Docker-Content-Digest override)
    TAGS = {
        "size-int64max": (sized_manifest(2**63 - 1), OCI_MANIFEST, None),
        "size-over-limit": (sized_manifest(2**62 + 1), OCI_MANIFEST, None),
        "size-at-limit": (sized_manifest(2**62), OCI_MANIFEST, None),
        "size-negative": (sized_manifest(-1), OCI_MANIFEST, None),
        "escape-mediatype": (ESCAPE_MANIFEST, OCI_MANIFEST, None),
        "stall": (STALL_MANIFEST, OCI_MANIFEST, None),
        "oops": (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":"oops"}', OCI_MANIFEST, None),
        "notjson": (b'{"schemaVersion":2, "mediaType": "application/vnd.oci.image.manifest.v1+json", this is not json', OCI_MANIFEST, None),
        "schema1": (b'{"schemaVersion":1,"name":"cache","tag":"schema1","fsLayers":[],"history":[]}',
                    "application/vnd.docker.distribution.manifest.v1+json", None),
        "digestlie": (GOOD, OCI_MANIFEST, "sha256:" + "f" * 64),
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status, body, content_type="application/json", extra=None, send_body=True):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def answer(self, send_body):
            if self.path == "/v2/":
                return self.reply(200, b"{}", send_body=send_body)
            match = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", self.path)
            if match and match.group(2) == "escape-denied":
                error = json.dumps({"errors": [{"code": "DENIED", "message": "no" + HOSTILE_TEXT}]}).encode()
                return self.reply(403, error, send_body=send_body)
            if match and match.group(2) in TAGS:
                body, content_type, claimed = TAGS[match.group(2)]
                digest = claimed or "sha256:" + hashlib.sha256(body).hexdigest()
                return self.reply(200, body, content_type, {"Docker-Content-Digest": digest}, send_body)
            if self.path.endswith("/blobs/" + CACHE_CONFIG_DIGEST):
                return self.reply(200, CACHE_CONFIG, "application/octet-stream", None, send_body)
            if self.path.endswith("/blobs/" + STALL_DIGEST):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(STALL_LAYER)))
                self.end_headers()
                if send_body:
                    self.wfile.write(STALL_LAYER[: len(STALL_LAYER) // 2])
                    self.wfile.flush()
                    time.sleep(600)
                return
            error = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}).encode()
            self.reply(404, error, send_body=send_body)

        def do_GET(self):
            self.answer(True)

        def do_HEAD(self):
            self.answer(False)

        def log_message(self, fmt, *args):
            sys.stderr.write("fake-registry %s\n" % (fmt % args))
            sys.stderr.flush()

    def watch_stdin():
        sys.stdin.read()
        os._exit(0)

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=watch_stdin, daemon=True).start()
    print("stall %s %d" % (STALL_DIGEST, len(STALL_LAYER)), flush=True)
    print("port %d" % server.server_address[1], flush=True)
    server.serve_forever()
    """#

    static func start(in ws: Workspace) async throws -> (server: BackgroundServer, port: Int) {
        let path = ws.path("fake_registry.py")
        try script.write(toFile: path, atomically: true, encoding: .utf8)
        let server = try BackgroundServer(try Harness.python(), ["-u", path], in: ws, label: "fake-registry", keepStdinOpen: true)
        let port = try await server.awaitNumber(after: "port")
        return (server, port)
    }
}

/// A TCP port on 127.0.0.1 that accepts connections (kernel backlog) but never answers.
final class SilentListener: @unchecked Sendable {
    // SAFETY (@unchecked Sendable): fd is set once in init and closed once in close().
    let fd: Int32
    let port: Int

    init(in ws: Workspace) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: \(String(cString: strerror(errno)))") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Bool in
                bind(fd, pointer, length) == 0 && listen(fd, 64) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else {
            let message = String(cString: strerror(errno))
            Glibc.close(fd)
            throw HarnessError("bind/listen: \(message)")
        }
        self.fd = fd
        port = Int(UInt16(bigEndian: address.sin_port))
        ws.onCleanup("close silent listener") { [fd] in Glibc.close(fd) }
    }
}

/// A port on 127.0.0.1 where nothing listens (bound to learn a free number, then closed).
func closedPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw HarnessError("socket failed") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard ok else { throw HarnessError("bind failed") }
    return Int(UInt16(bigEndian: address.sin_port))
}

@Suite("Errors at mount time")
struct MountErrorTests {
    static let timeout = 5.0

    @Test("unreachable registry (closed port)")
    func unreachableRegistry() async throws {
        try await withWorkspace("err-closed") { ws in
            let port = try closedPort()
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(port)/cache:main", timeout: Self.timeout)
            Check.mountFailedCleanly(mount, within: Self.timeout)
        }
    }

    @Test("wrong or missing Basic credentials")
    func wrongBasicPassword() async throws {
        try await withWorkspace("err-basic") { ws in
            let password = "correct-horse"
            let registry = try await ws.startRegistry(auth: .basic(user: "alice", password: password))
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 100_000, user: "alice", password: password)

            let wrongPassword = "wrong-battery-staple"
            let wrong = try await ws.mount(registry.source("cache:main"),
                                           dockerConfig: try ws.dockerConfig(host: registry.host, user: "alice", password: wrongPassword),
                                           timeout: Self.timeout)
            Check.mountFailedCleanly(wrong, within: Self.timeout)
            #expect(!wrong.result.stderr.contains(wrongPassword), "the password must never be printed")
            #expect(!wrong.log.contains(wrongPassword), "the password must never be logged")

            let anonymous = try await ws.mount(registry.source("cache:main"), timeout: Self.timeout)
            Check.mountFailedCleanly(anonymous, within: Self.timeout)
        }
    }

    @Test("wrong password at the token issuer")
    func wrongTokenPassword() async throws {
        try await withWorkspace("err-token") { ws in
            let issuer = try await ws.startTokenIssuer(user: "alice", password: "pw")
            let registry = try await ws.startRegistry(auth: .token(issuer.endpoint))
            let mount = try await ws.mount(registry.source("cache:main"),
                                           dockerConfig: try ws.dockerConfig(host: registry.host, user: "alice", password: "nope"),
                                           timeout: Self.timeout)
            Check.mountFailedCleanly(mount, within: Self.timeout)
        }
    }

    /// Broken manifests, served by a fake registry because docker-registry refuses to store
    /// them: a config that is a string, invalid JSON, schema 1, and bytes that do not match
    /// the registry's own Docker-Content-Digest.
    @Test("invalid manifest", arguments: ["oops", "notjson", "schema1", "digestlie"])
    func malformedManifest(tag: String) async throws {
        try await withWorkspace("err-manifest-\(tag)") { ws in
            let fake = try await FakeRegistry.start(in: ws)
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(fake.port)/cache:\(tag)", timeout: Self.timeout)
            Check.mountFailedCleanly(mount, within: Self.timeout)
            // The fake server did answer (so this is the manifest check, not a connection error).
            #expect(Processes.readText(fake.server.stderrPath).contains("/v2/cache/manifests/\(tag)"))
        }
    }

    @Test("registry that accepts connections but never answers: bounded by --timeout")
    func stalledRegistry() async throws {
        try await withWorkspace("err-stall") { ws in
            let listener = try SilentListener(in: ws)
            let timeout = 1.0
            let mount = try await ws.mount("type=registry,ref=127.0.0.1:\(listener.port)/cache:main", timeout: timeout)
            // Each network wait is bounded by --timeout; a few retries of the manifest request
            // are allowed, so the whole mount must give up within a small multiple of it.
            Check.mountFailedCleanly(mount, within: 4 * timeout + 2)
        }
    }

    /// A layer download that stalls half way: the read fails with EIO within the --timeout
    /// bound (a few bounded attempts), and the mount keeps answering other requests meanwhile.
    @Test("layer download that stalls: EIO within the --timeout bound, mount stays responsive")
    func stalledLayerDownload() async throws {
        try await withWorkspace("err-stall-blob") { ws in
            let fake = try await FakeRegistry.start(in: ws)
            let stallLine = Processes.readText(fake.server.stdoutPath).split(separator: "\n").first { $0.hasPrefix("stall ") }
            let fields = try #require(stallLine?.split(separator: " "))
            let digest = String(fields[1]), size = Int64(fields[2]) ?? 0
            let timeout = 1.0
            let mount = try await ws.mountExpectingSuccess("type=registry,ref=127.0.0.1:\(fake.port)/cache:stall", timeout: timeout)
            #expect(Int64(try FileIO.statFile(mount.blobPath(digest)).st_size) == size)

            let path = mount.blobPath(digest)
            async let read = onThread { FileIO.readUntilFailure(path) }
            // While that read waits on the stalled download (the server has been asked for the
            // blob), the mount answers at once.
            let asked = Date().addingTimeInterval(30)
            while !Processes.readText(fake.server.stderrPath).contains("/v2/cache/blobs/\(digest)") && Date() < asked {
                try await Task.sleep(for: .milliseconds(20))
            }
            let probeStart = Date()
            let index = try FileIO.readAll(mount.path("index.json"))
            _ = try FileIO.statFile(mount.path("blobs/sha256"))
            let listing = FileIO.listDirectory(mount.path("blobs/sha256"))
            let probeSeconds = Date().timeIntervalSince(probeStart)
            #expect(!index.isEmpty && listing.count == 3, "\(listing)")
            #expect(probeSeconds < 2, "metadata requests took \(probeSeconds) s during a stalled download")

            let (outcome, elapsed) = await read
            #expect(outcome.errno == EIO, "a stalled download must end in EIO: \(outcome); log: \(mount.log.suffix(1500))")
            #expect(Int64(outcome.bytes) < size)
            // Generous: a few bounded attempts of one download. Observed failure mode: every
            // kernel retry of the failed page starts a fresh multi-attempt download, so one
            // read() blocks for ~3 x (3 attempts x (timeout + backoff)).
            let gets = Processes.readText(fake.server.stderrPath).components(separatedBy: "GET /v2/cache/blobs/\(digest) ").count - 1
            #expect(elapsed <= 10 * timeout + 2,
                    "one failed read() took \(String(format: "%.1f", elapsed)) s with --timeout \(timeout) (\(gets) GETs of the stalled blob)")
            #expect(!FileIO.listDirectory(mount.cacheDir + "/blobs/sha256").contains(String(digest.dropFirst(7))))
            // What did arrive stays as a journaled partial download, for a later mount to continue.
            let hex = String(digest.dropFirst(7))
            #expect(Set(FileIO.listDirectory(mount.cacheDir + "/partial")).isSubset(of: [hex, hex + ".journal"]))
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    /// The first CI run has no cache yet: a tag (or repository) that does not exist mounts an
    /// empty layout, and says so in one line (issue 13: a typo in the tag looked like success).
    @Test("tag or repository that does not exist yet: empty index.json and one warning line")
    func missingTag() async throws {
        try await withWorkspace("err-missing") { ws in
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 100_000)
            for (reference, repository, tag) in [("cache:not-yet", "cache", "not-yet"), ("no-such-repo:main", "no-such-repo", "main")] {
                let mount = try await ws.mount(registry.source(reference), timeout: Self.timeout)
                #expect(mount.result.status == 0, "\(reference): \(mount.result); log: \(mount.log.suffix(1500))")
                #expect(mount.result.stderrLines == [
                    "ocicachefs: warning: no tag \(tag) at \(registry.host)/\(repository); the mount is empty until a cache is exported",
                ], "\(mount.result)")
                #expect(mount.result.stdout.isEmpty, "\(mount.result)")
                guard mount.result.status == 0 else { continue }
                let index = try FileIO.json(mount.path("index.json"))
                #expect(index["schemaVersion"] as? Int == 2)
                #expect((index["manifests"] as? [Any])?.isEmpty == true, "\(reference): manifests must be [] in \(index)")
                #expect(FileIO.listDirectory(mount.path("blobs/sha256")).isEmpty)
                #expect(FileIO.listDirectory(mount.mountpoint) == ["blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
                // buildctl's lock dance works on the empty layout too.
                #expect(try BuildctlImport.readIndexUnderLock(mount.mountpoint) == FileIO.readAll(mount.path("index.json")))
                let unmounted = try await mount.unmount(in: ws)
                #expect(unmounted.status == 0, "\(unmounted)")
            }
        }
    }
}
