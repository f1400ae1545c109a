import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Registries and S3 endpoints behind a private certificate authority: a CA and a server
// certificate made with openssl for each test, Debian's docker-registry serving TLS with it
// (http.tls), and moto's S3 server serving TLS with it (-c/-k). Mounts verify the peer against
// --ca-file or SSL_CERT_FILE; without either, the system's authorities refuse it.

/// A throwaway CA and a server certificate it signed for `host` and 127.0.0.1.
private struct TestPKI {
    let caCertificate: String
    let serverCertificate: String
    let serverKey: String

    static func make(in ws: Workspace, host: String) async throws -> TestPKI {
        let openssl = try Harness.tool("openssl", neededFor: "the test certificate authority (package openssl)")
        let directory = try ws.makeDirectory("pki-\(ws.nextID())")
        let ca = directory + "/ca.crt", caKey = directory + "/ca.key"
        let key = directory + "/server.key", request = directory + "/server.csr", certificate = directory + "/server.crt"
        let extensions = directory + "/server.ext"
        try """
            subjectAltName = DNS:\(host), IP:127.0.0.1
            basicConstraints = CA:FALSE
            keyUsage = critical, digitalSignature, keyEncipherment
            extendedKeyUsage = serverAuth
            """.write(toFile: extensions, atomically: true, encoding: .utf8)
        let steps: [[String]] = [
            ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", caKey, "-out", ca,
             "-days", "2", "-subj", "/CN=ocicachefs test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", request,
             "-subj", "/CN=\(host)"],
            ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", caKey, "-CAcreateserial", "-out", certificate, "-days", "2",
             "-extfile", extensions],
        ]
        for arguments in steps {
            let result = try await Processes.run(openssl, arguments, timeout: 30, in: ws)
            guard result.status == 0 else { throw HarnessError("openssl failed: \(result)") }
        }
        return TestPKI(caCertificate: ca, serverCertificate: certificate, serverKey: key)
    }
}

/// A name of this machine that resolves only to loopback addresses but is not one the project
/// treats as loopback (localhost, 127.x.x.x, ::1), so that a registry reference with it is
/// reached over HTTPS, as a remote registry is. A machine without one (a container whose host
/// name is its network address) gets one in /etc/hosts for the test's duration, when root.
private func loopbackHostName(in ws: Workspace) throws -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    let own = gethostname(&buffer, buffer.count) == 0
        ? String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    let candidates = [own, "localhost.localdomain", "ip6-localhost"].filter { !$0.isEmpty && $0 != "localhost" }
    for name in candidates {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_INET
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(name, nil, &hints, &list) == 0, let first = list else { continue }
        defer { freeaddrinfo(first) }
        var allLoopback = true
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let entry = cursor {
            let address = entry.pointee.ai_addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
            if UInt32(bigEndian: address) >> 24 != 127 { allLoopback = false }
            cursor = entry.pointee.ai_next
        }
        if allLoopback { return name }
    }
    if getuid() == 0, let original = FileManager.default.contents(atPath: "/etc/hosts") {
        let name = "ocicachefs-tls-test"
        ws.onCleanup("restore /etc/hosts") { _ = FileManager.default.createFile(atPath: "/etc/hosts", contents: original) }
        var hosts = original
        if hosts.last != UInt8(ascii: "\n") { hosts.append(UInt8(ascii: "\n")) }
        hosts += Array("127.0.0.1 \(name)\n".utf8)
        if FileManager.default.createFile(atPath: "/etc/hosts", contents: hosts) { return name }
    }
    throw HarnessError("prerequisite missing: no name of this machine (tried \(candidates)) resolves only to 127.0.0.0/8; "
                       + "the TLS registry test needs one that is not 'localhost' (e.g. the host name in /etc/hosts)")
}


/// Waits until something accepts connections on 127.0.0.1:`port`.
private func awaitListening(_ port: Int, server: BackgroundServer, log: String) async throws {
    let deadline = Date().addingTimeInterval(20)
    while Date() < deadline {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        close(fd)
        if connected { return }
        guard server.isRunning else { break }
        try await Task.sleep(for: .milliseconds(25))
    }
    throw HarnessError("nothing listens on 127.0.0.1:\(port) (running: \(server.isRunning)); log: \(Processes.readText(log).suffix(1500))")
}

extension Workspace {
    /// docker-registry serving `storage` (a seeded registry's directory) over TLS on a free port.
    fileprivate func startTLSRegistry(storage: String, pki: TestPKI) async throws -> Int {
        let docker = try Harness.tool("docker-registry", neededFor: "the test OCI registry (package docker-registry)")
        var lastError: (any Error)?
        for attempt in 1...3 {
            let port = try closedPort()
            let config = path("tls-registry-\(attempt).yml")
            try """
                version: 0.1
                log:
                  level: info
                storage:
                  filesystem:
                    rootdirectory: "\(storage)"
                  cache:
                    blobdescriptor: inmemory
                  maintenance:
                    uploadpurging:
                      enabled: false
                http:
                  addr: "127.0.0.1:\(port)"
                  secret: "tls-registry-test-secret"
                  tls:
                    certificate: "\(pki.serverCertificate)"
                    key: "\(pki.serverKey)"
                """.write(toFile: config, atomically: true, encoding: .utf8)
            let server = try BackgroundServer(docker, ["serve", config], in: self, label: "tls-registry-\(attempt)")
            do {
                try await awaitListening(port, server: server, log: server.stderrPath)
                return port
            } catch {
                lastError = error
                server.stop()
            }
        }
        throw lastError ?? HarnessError("the TLS registry did not start")
    }

    /// moto's S3 server over TLS with the test PKI's certificate.
    fileprivate func startTLSMoto(pki: TestPKI) async throws -> Int {
        var lastError: (any Error)?
        for attempt in 1...3 {
            let port = try closedPort()
            let server = try BackgroundServer(try Harness.python(),
                                              ["-m", "moto.server", "-H", "127.0.0.1", "-p", String(port),
                                               "-c", pki.serverCertificate, "-k", pki.serverKey],
                                              in: self, label: "tls-moto-\(attempt)")
            do {
                try await awaitListening(port, server: server, log: server.stderrPath)
                return port
            } catch {
                lastError = error
                server.stop()
            }
        }
        throw lastError ?? HarnessError("moto over TLS did not start")
    }

    /// `ocicachefs mount` with `arguments` before SOURCE (as `mount` runs it otherwise).
    fileprivate func mount(_ source: String, arguments: [String], environment: [String: String] = [:],
                           timeout: Double = 10) async throws -> MountHandle {
        try Harness.requireFuse()
        let mountpoint = try makeDirectory("tls-mnt-\(nextID())")
        let cache = try makeDirectory("cache-\(nextID())")
        let logFile = path("tls-mnt-\(nextID()).log")
        let config = try dockerConfig()
        onCleanup("unmount \(mountpoint)") { [self] in forceUnmount(mountpoint) }
        let result = try await Processes.run(try Harness.binary(),
                                             ["mount", "--cache-dir", cache, "--timeout", String(timeout), "--log-level", "debug",
                                              "--log-file", logFile] + arguments + [source, mountpoint],
                                             environment: environment.merging(["DOCKER_CONFIG": config]) { $1 },
                                             timeout: timeout * 4 + 40, in: self)
        return MountHandle(mountpoint: mountpoint, cacheDir: cache, logFile: logFile, result: result)
    }
}

private func expectMounted(_ handle: MountHandle, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    let ok = handle.result.status == 0 && handle.isMounted
    #expect(ok, "mount failed: \(handle.result); daemon log: \(handle.log.suffix(2000))", sourceLocation: sourceLocation)
    return ok
}

@Suite("Registries and S3 endpoints behind a private CA: --ca-file and SSL_CERT_FILE", .serialized)
struct PrivateCATests {
    /// A TLS registry whose certificate a private CA signed: mounted with --ca-file (and with
    /// SSL_CERT_FILE), its blobs read and verified; without the CA the mount fails with one
    /// line naming the certificate problem; an unusable CA file fails at once, naming it.
    @Test func tlsRegistryWithAPrivateCA() async throws {
        try await withWorkspace("private-ca-registry") { ws in
            let host = try loopbackHostName(in: ws)
            let pki = try await TestPKI.make(in: ws, host: host)
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 2, layerSize: 400_000, seed: 17)
            let port = try await ws.startTLSRegistry(storage: registry.dir, pki: pki)
            let source = "type=registry,ref=\(host):\(port)/cache:main"

            let withFlag = try await ws.mount(source, arguments: ["--ca-file", pki.caCertificate])
            if expectMounted(withFlag) {
                try Check.indexJSON(withFlag, tag: "main", manifest: seed.manifest)
                try Check.blobsListedWithSizes(withFlag, seed)
                Check.blobsVerify(withFlag, seed.blobs)
            }
            let withVariable = try await ws.mount(source, arguments: [], environment: ["SSL_CERT_FILE": pki.caCertificate])
            if expectMounted(withVariable) { Check.blobsVerify(withVariable, seed.layers) }

            // Without the CA: curl's verification refuses the registry.
            let refused = try await ws.mount(source, arguments: [])
            Check.mountFailedCleanly(refused, within: 30)
            #expect(refused.result.stderr.contains("certificate"), "the line names the certificate problem: \(refused.result)")

            // The flag wins over the variable, and a file that is not a CA bundle is refused
            // before anything else, naming it.
            let garbage = ws.path("not-a-ca.pem")
            try "just some text\n".write(toFile: garbage, atomically: true, encoding: .utf8)
            let badFile = try await ws.mount(source, arguments: ["--ca-file", garbage], environment: ["SSL_CERT_FILE": pki.caCertificate])
            Check.mountFailedCleanly(badFile, within: 5)
            #expect(badFile.result.stderr.contains("--ca-file") && badFile.result.stderr.contains("not-a-ca.pem")
                    && badFile.result.stderr.contains("no PEM certificate"), "\(badFile.result)")
            let truncated = ws.path("truncated.pem")
            let caText = try String(contentsOfFile: pki.caCertificate, encoding: .utf8)
            try String(caText.prefix(caText.count - 40)).write(toFile: truncated, atomically: true, encoding: .utf8)
            let badPEM = try await ws.mount(source, arguments: ["--ca-file", truncated])
            Check.mountFailedCleanly(badPEM, within: 5)
            #expect(badPEM.result.stderr.contains("END CERTIFICATE"), "\(badPEM.result)")
            let missing = try await ws.mount(source, arguments: [], environment: ["SSL_CERT_FILE": ws.path("absent.pem")])
            Check.mountFailedCleanly(missing, within: 5)
            #expect(missing.result.stderr.contains("SSL_CERT_FILE") && missing.result.stderr.contains("No such file"), "\(missing.result)")
        }
    }

    /// The fstab helper turns `ca-file=FILE` into `--ca-file FILE` (an `ocicachefs` stand-in on
    /// OCICACHEFS prints the arguments it was given).
    @Test func mountHelperPassesCAFile() async throws {
        try await withWorkspace("private-ca-helper") { ws in
            let standIn = ws.path("ocicachefs-stand-in")
            try "#!/bin/sh\nfor argument in \"$@\"; do echo \"$argument\"; done\n".write(toFile: standIn, atomically: true, encoding: .utf8)
            chmod(standIn, 0o755)
            let result = try await Processes.run(
                "/bin/sh", [Harness.packageRoot + "/mount-helpers/mount.fuse.ocicachefs", "type=registry,ref=r.example/a:b", "/mnt/x",
                            "-o", "rw,_netdev,ca-file=/etc/company/ca.pem,cache-dir=/var/cache/c"],
                environment: ["OCICACHEFS": standIn], timeout: 30, in: ws)
            #expect(result.status == 0, "\(result)")
            #expect(result.stdout.split(separator: "\n").map(String.init)
                    == ["mount", "--ca-file", "/etc/company/ca.pem", "--cache-dir", "/var/cache/c", "type=registry,ref=r.example/a:b", "/mnt/x"],
                    "\(result)")
        }
    }

    /// moto's S3 over TLS with the same kind of CA: SSL_CERT_FILE lets the S3 source verify it;
    /// without, the mount fails with a certificate error.
    @Test func s3EndpointOverTLSWithAPrivateCA() async throws {
        try await withS3Workspace("private-ca-s3") { ws in
            let pki = try await TestPKI.make(in: ws, host: "127.0.0.1")
            let port = try await ws.startTLSMoto(pki: pki)
            let endpoint = "https://127.0.0.1:\(port)"
            let out = ws.path("tls-seed.json")
            let seeding = try await Processes.run(
                try Harness.python(),
                ["-u", Harness.testenv + "/seed_s3_cache.py", "--endpoint", endpoint, "--bucket", "bk-tls", "--region", "us-east-1",
                 "--prefix", "", "--name", "main", "--layers", "2", "--layer-size", "200000", "--seed", "3", "--out", out],
                environment: ["AWS_EC2_METADATA_DISABLED": "true", "AWS_CA_BUNDLE": pki.caCertificate], timeout: 60, in: ws)
            guard seeding.status == 0, let data = FileManager.default.contents(atPath: out) else {
                throw HarnessError("seeding moto over TLS failed: \(seeding)")
            }
            var seed = try JSONDecoder().decode(S3SeedSummary.self, from: data)
            seed.bucket = "bk-tls"
            seed.region = "us-east-1"
            let source = S3Spec.source(endpoint: endpoint, bucket: "bk-tls", names: "main",
                                       extra: ["access_key_id=AKIATLSTEST000000001", "secret_access_key=tls-secret"])

            let mounted = try await ws.mountS3ExpectingSuccess(source, environment: ["SSL_CERT_FILE": pki.caCertificate])
            try S3Check.layout(mounted, seed, names: ["main"])
            Check.blobsVerify(mounted, seed.layers.map(\.blob))

            let refused = try await ws.mountS3(source)
            Check.mountFailedCleanly(refused, within: 30)
            #expect(refused.result.stderr.contains("certificate"), "\(refused.result)")
        }
    }
}
