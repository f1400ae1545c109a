import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Additions to the integration harness for the S3 source: moto's S3 server started through
// scripts/testenv/s3.py (the PID we start is the server), BuildKit's S3 layout seeded with
// scripts/testenv/seed_s3_cache.py, moto's access log parsed for per-key request counts, and
// `ocicachefs mount` run with a controlled AWS environment (no inherited AWS_* variable, no
// ~/.aws, instance metadata disabled) so that nothing but 127.0.0.1 is ever contacted.

enum S3Prerequisites {
    /// python3 with moto's server and boto3, both S3 scripts, and a usable FUSE. Missing
    /// anything is a failure (thrown), never a skip.
    static func require(in ws: Workspace) async throws {
        for script in ["s3.py", "seed_s3_cache.py"] {
            guard FileManager.default.fileExists(atPath: Harness.testenv + "/" + script) else {
                throw HarnessError("test environment script missing: \(Harness.testenv)/\(script)")
            }
        }
        let python = try Harness.python()
        let probe = try await Processes.run(python, ["-c", "import moto.server, boto3, botocore"], timeout: 30, in: ws)
        guard probe.status == 0 else {
            throw HarnessError("prerequisite missing: python3 cannot import moto's server and boto3 (pip install 'moto[server]' boto3): \(probe)")
        }
        try Harness.requireFuse()
    }
}

/// One request line of moto's (werkzeug's) access log:
/// `127.0.0.1 - - [21/Nov/2026 14:59:58] "GET /bucket/blobs/sha256:… HTTP/1.1" 206 -`
struct MotoRequest: CustomStringConvertible {
    var method: String
    /// The request path with `%3A` shown as `:` (werkzeug already logs it decoded).
    var path: String
    var status: Int
    var description: String { "\(method) \(path) \(status)" }
}

/// `scripts/testenv/s3.py`: moto's S3 server on 127.0.0.1, its access log in `logPath`.
final class MotoS3: Sendable {
    let port: Int
    let server: BackgroundServer
    let logPath: String
    var endpoint: String { "http://127.0.0.1:\(port)" }

    init(port: Int, server: BackgroundServer, logPath: String) {
        self.port = port
        self.server = server
        self.logPath = logPath
    }

    /// Every request moto logged so far.
    func requests() -> [MotoRequest] {
        Processes.readText(logPath).split(separator: "\n").compactMap { line in
            guard let open = line.firstIndex(of: "\"") else { return nil }
            let rest = line[line.index(after: open)...]
            guard let close = rest.firstIndex(of: "\"") else { return nil }
            let fields = rest[..<close].split(separator: " ")
            guard fields.count == 3, fields[2].hasPrefix("HTTP/") else { return nil }
            let status = rest[rest.index(after: close)...].split(separator: " ").first.flatMap { Int($0) } ?? 0
            let path = String(fields[1]).replacingOccurrences(of: "%3A", with: ":").replacingOccurrences(of: "%3a", with: ":")
            return MotoRequest(method: String(fields[0]), path: path, status: status)
        }
    }

    /// Requests for one object (path style: `/BUCKET/KEY`, any query).
    func requests(_ method: String? = nil, bucket: String, key: String) -> [MotoRequest] {
        let path = "/\(bucket)/\(key)"
        return requests().filter { request in
            (method == nil || request.method == method) && (request.path == path || request.path.hasPrefix(path + "?"))
        }
    }

    /// Successful (200/206) GETs of an object: the transfers.
    func transfers(bucket: String, key: String) -> Int {
        requests("GET", bucket: bucket, key: key).filter { $0.status == 200 || $0.status == 206 }.count
    }

    /// Every request whose path is under `/BUCKET/PREFIX`.
    func requests(bucket: String, under prefix: String) -> [MotoRequest] {
        requests().filter { $0.path.hasPrefix("/\(bucket)/\(prefix)") }
    }

    /// `POST /moto-api/reset-auth`: `0` switches signature checking on, `inf` off.
    func resetAuth(_ body: String, in ws: Workspace) async throws {
        let script = """
            import sys, urllib.request
            request = urllib.request.Request(sys.argv[1] + "/moto-api/reset-auth", data=sys.argv[2].encode(),
                                             headers={"Content-Type": "text/plain"}, method="POST")
            print(urllib.request.urlopen(request, timeout=10).read().decode())
            """
        let result = try await Processes.run(try Harness.python(), ["-c", script, endpoint, body],
                                             environment: S3Environment.pythonEnvironment, timeout: 30, in: ws)
        guard result.status == 0, result.stdout.contains("\"ok\"") else { throw HarnessError("reset-auth \(body) failed: \(result)") }
    }

    /// Creates an IAM user allowed everything and an access key for it (through moto's IAM
    /// API, while checking is still off), then switches signature checking on. Returns the key.
    func enableSignatureChecking(user: String = "ci", in ws: Workspace) async throws -> (keyID: String, secret: String) {
        let script = """
            import json, sys, boto3
            iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                               aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
            iam.create_user(UserName=sys.argv[2])
            iam.put_user_policy(UserName=sys.argv[2], PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            key = iam.create_access_key(UserName=sys.argv[2])["AccessKey"]
            print(key["AccessKeyId"], key["SecretAccessKey"])
            """
        let result = try await Processes.run(try Harness.python(), ["-c", script, endpoint, user],
                                             environment: S3Environment.pythonEnvironment, timeout: 30, in: ws)
        let fields = result.stdout.split(whereSeparator: \.isWhitespace).map(String.init)
        guard result.status == 0, fields.count == 2 else { throw HarnessError("creating an IAM access key failed: \(result)") }
        try await resetAuth("0", in: ws)
        return (fields[0], fields[1])
    }

    /// A GET signed by botocore (the reference SigV4 implementation) of `key`; returns the
    /// S3 error code, or "OK" when moto accepted it. Tells moto's own limits from ours.
    func botocoreGet(bucket: String, key: String, keyID: String, secret: String, region: String, in ws: Workspace) async throws -> String {
        let script = """
            import sys, boto3, botocore.exceptions
            from botocore.config import Config
            s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name=sys.argv[5], aws_access_key_id=sys.argv[3],
                              aws_secret_access_key=sys.argv[4], config=Config(s3={"addressing_style": "path"}))
            try:
                s3.get_object(Bucket=sys.argv[2], Key=sys.argv[6])["Body"].read()
                print("OK")
            except botocore.exceptions.ClientError as error:
                print(error.response.get("Error", {}).get("Code", "?"))
            """
        let result = try await Processes.run(try Harness.python(), ["-c", script, endpoint, bucket, keyID, secret, region, key],
                                             environment: S3Environment.pythonEnvironment, timeout: 30, in: ws)
        guard result.status == 0 else { throw HarnessError("botocore GET failed to run: \(result)") }
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Stops moto now (by the PID we started) and makes sure nothing answers on its port.
    func stop() { server.stop() }
}

/// The seed summary of `seed_s3_cache.py --out`.
struct S3SeedSummary: Decodable {
    struct ManifestObject: Decodable {
        var key: String
        var digest: String
        var size: Int64
    }
    struct Layer: Decodable {
        var digest: String
        var size: Int64
        var diffID: String
        var key: String
        var hex: String { String(digest.dropFirst("sha256:".count)) }
        /// As the harness' blob checks want it.
        var blob: SeedSummary.Blob { .init(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: digest, size: size, role: "layer") }
    }

    var names: [String]
    var manifestObjects: [String: ManifestObject]
    var layers: [Layer]
    var bucket = ""
    var region = ""
    var prefix = ""

    enum CodingKeys: String, CodingKey {
        case names, layers
        case manifestObjects = "manifest_objects"
    }
}

/// The environment every child we start for S3 gets: no inherited AWS_* variable, no ~/.aws,
/// never instance metadata.
enum S3Environment {
    /// Variables removed from every `ocicachefs` child (plus any other AWS_* of ours).
    static let knownVariables = [
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY", "AWS_SECRET_KEY",
        "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
        "AWS_BUCKET", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
        "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CA_BUNDLE",
    ]

    static var variablesToUnset: [String] {
        let inherited = ProcessInfo.processInfo.environment.keys.filter { $0.hasPrefix("AWS_") }
        return Array(Set(knownVariables).union(inherited)).sorted()
    }

    /// For the Python helpers (they always get explicit keys): only instance metadata off.
    static let pythonEnvironment = ["AWS_EC2_METADATA_DISABLED": "true"]

    /// `/usr/bin/env -u … K=V … ` prefix: the only way to remove inherited variables, as
    /// ChildProcess merges its environment into ours.
    static func envArguments(_ settings: [String: String]) -> [String] {
        variablesToUnset.flatMap { ["-u", $0] } + settings.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
    }
}

extension Workspace {
    /// Starts moto's S3 server on a free port and waits until it answers.
    func startMoto(label: String = "moto") async throws -> MotoS3 {
        var lastError: (any Error)?
        // s3.py picks a free port and releases it before moto binds it: retry a failed start.
        for attempt in 1...3 {
            let logPath = path("\(label)-\(attempt).log")
            let server = try BackgroundServer(try Harness.python(), ["-u", Harness.testenv + "/s3.py", "--log", logPath],
                                              in: self, label: "\(label)-\(attempt)")
            do {
                let port = try await server.awaitNumber(after: "port")
                let deadline = Date().addingTimeInterval(20)
                while Date() < deadline {
                    if let answer = RawHTTP.get(port: port, path: "/"), answer.status == 200 {
                        return MotoS3(port: port, server: server, logPath: logPath)
                    }
                    guard server.isRunning else { break }
                    try await Task.sleep(for: .milliseconds(25))
                }
                throw HarnessError("moto on port \(port) did not answer (running: \(server.isRunning)); log: \(Processes.readText(logPath).suffix(1500))")
            } catch {
                lastError = error
                server.stop()
            }
        }
        throw lastError ?? HarnessError("moto did not start")
    }

    /// `seed_s3_cache.py`: BuildKit's S3 layout in `bucket`, and its summary.
    func seedS3(_ moto: MotoS3, bucket: String, region: String = "us-east-1", prefix: String = "", names: String,
                layers: Int = 2, layerSize: Int = 1_000_000, seed: Int = 1, omitSize: Bool = false) async throws -> S3SeedSummary {
        let out = path("s3seed-\(nextID()).json")
        var arguments = ["-u", Harness.testenv + "/seed_s3_cache.py", "--endpoint", moto.endpoint, "--bucket", bucket,
                         "--region", region, "--prefix", prefix, "--name", names, "--layers", String(layers),
                         "--layer-size", String(layerSize), "--seed", String(seed), "--out", out]
        if omitSize { arguments.append("--omit-size") }
        let result = try await Processes.run(try Harness.python(), arguments, environment: S3Environment.pythonEnvironment,
                                             timeout: 60, in: self)
        guard result.status == 0 else { throw HarnessError("seeding S3 failed: \(result)") }
        guard let data = FileManager.default.contents(atPath: out) else { throw HarnessError("seed summary \(out) missing") }
        var summary = try JSONDecoder().decode(S3SeedSummary.self, from: data)
        summary.bucket = bucket
        summary.region = region
        summary.prefix = prefix
        return summary
    }

    /// `ocicachefs mount` of an S3 source with a controlled environment: every AWS_* variable
    /// removed, HOME and the shared AWS files pointing into the workspace (nothing there unless
    /// `environment` says so), instance metadata disabled; `environment` added on top.
    /// Registers the unmount for the end of the test, like `mount`.
    func mountS3(_ source: String, cacheDir: String? = nil, environment: [String: String] = [:], timeout: Double = 10,
                 writable: Bool = false, options: [String] = [], label: String = "s3mnt") async throws -> MountHandle {
        try Harness.requireFuse()
        let binary = try Harness.binary()
        let mountpoint = try makeDirectory("\(label)-\(nextID())")
        let cache = try cacheDir ?? makeDirectory("cache-\(nextID())")
        let logFile = path("\(label)-\(nextID()).log")
        let home = try makeDirectory("home")
        var settings = ["HOME": home, "AWS_EC2_METADATA_DISABLED": "true", "DOCKER_CONFIG": try dockerConfig(),
                        "AWS_SHARED_CREDENTIALS_FILE": home + "/no-aws-credentials", "AWS_CONFIG_FILE": home + "/no-aws-config"]
        settings.merge(environment) { _, new in new }
        onCleanup("unmount \(mountpoint)") { [self] in forceUnmount(mountpoint) }
        let arguments = S3Environment.envArguments(settings)
            + [binary, "mount", "--cache-dir", cache, "--timeout", String(timeout), "--log-level", "debug", "--log-file", logFile]
            + (writable ? ["--writable"] : []) + options + [source, mountpoint]
        var result = try await Processes.run("/usr/bin/env", arguments, timeout: timeout * 4 + 40, in: self)
        result.command = "ocicachefs mount … \(source) \(mountpoint)"  // without the long env prefix
        return MountHandle(mountpoint: mountpoint, cacheDir: cache, logFile: logFile, result: result)
    }

    func mountS3ExpectingSuccess(_ source: String, cacheDir: String? = nil, environment: [String: String] = [:],
                                 timeout: Double = 10, writable: Bool = false, options: [String] = []) async throws -> MountHandle {
        let handle = try await mountS3(source, cacheDir: cacheDir, environment: environment, timeout: timeout, writable: writable,
                                       options: options)
        guard handle.result.status == 0, handle.isMounted else {
            throw HarnessError("mount failed: \(handle.result); mounted: \(handle.isMounted); daemon log: \(handle.log.suffix(3000))")
        }
        return handle
    }
}

enum S3Spec {
    /// `type=s3,bucket=…,region=…,endpoint_url=ENDPOINT,use_path_style=true[,name=…]`, `extra` appended.
    static func source(endpoint: String, bucket: String, region: String = "us-east-1", names: String? = nil,
                       extra: [String] = []) -> String {
        var fields = ["type=s3", "bucket=\(bucket)", "region=\(region)", "endpoint_url=\(endpoint)", "use_path_style=true"]
        if let names { fields.append("name=\(names)") }
        return (fields + extra).joined(separator: ",")
    }
}

extension MotoS3 {
    /// `type=s3,…` for this server, path style, with `extra` attributes appended.
    func source(bucket: String, region: String = "us-east-1", names: String? = nil, extra: [String] = []) -> String {
        S3Spec.source(endpoint: endpoint, bucket: bucket, region: region, names: names, extra: extra)
    }
}

/// Runs `body` in a fresh workspace (cleaned up whatever happens) after checking the S3
/// prerequisites: a missing one fails the test.
func withS3Workspace<T>(_ name: String, _ body: (Workspace) async throws -> T) async throws -> T {
    try await withWorkspace(name) { ws in
        try await S3Prerequisites.require(in: ws)
        return try await body(ws)
    }
}

// MARK: - A SigV4-verifying proxy in front of moto

/// A reverse proxy that checks every request's SigV4 signature with botocore's own signer
/// (over the path exactly as sent, `%3A` included, as S3 does) for ONE access key, and that a
/// body matches the `x-amz-content-sha256` it was signed with (as S3 does unless it says
/// UNSIGNED-PAYLOAD), then forwards it to moto (whose checking stays off) and relays the answer. Refused requests get
/// S3's 403 XML error (`SignatureDoesNotMatch`, `InvalidAccessKeyId`, ...). Exists because
/// moto's own checker rejects correctly signed requests for keys holding `:`, which every
/// BuildKit blob key (`blobs/sha256:<hex>`) does. Exits when its stdin closes.
final class VerifyingProxy: Sendable {
    static let script = #"""
    import hashlib, http.client, os, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    UPSTREAM, KEY, SECRET, REGION, LOG = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    OPTIONS = dict(zip(sys.argv[6::2], sys.argv[7::2]))
    TOKEN = OPTIONS.get("--token")
    CUT = int(OPTIONS.get("--cut-first-blob-get-at", "0"))
    lock = threading.Lock()
    blob_gets = {}

    def log(line):
        with lock, open(LOG, "a") as out:
            out.write(line + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def verdict(self, body):
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("AWS4-HMAC-SHA256 "):
                return "MissingAuthenticationToken", ""
            fields = dict(part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 "):].split(","))
            scope = fields.get("Credential", "").split("/")
            if len(scope) != 5 or scope[0] != KEY:
                return "InvalidAccessKeyId", ""
            date = self.headers.get("x-amz-date", "")
            if scope[1] != date[:8] or scope[2:] != [REGION, "s3", "aws4_request"]:
                return "AuthorizationHeaderMalformed", ""
            signed = fields.get("SignedHeaders", "").split(";")
            if not {"host", "x-amz-date", "x-amz-content-sha256"} <= set(signed) or signed != sorted(signed):
                return "SignedHeadersIncomplete", ""
            unsigned = [name for name in self.headers.keys() if name.lower().startswith("x-amz-") and name.lower() not in signed]
            if unsigned:
                return "UnsignedAmzHeader:" + unsigned[0], ""
            if self.headers.get("x-amz-security-token") != TOKEN:
                return "InvalidToken", ""
            headers = {}
            for name in signed:
                if self.headers.get(name) is None:
                    return "SignedHeaderMissing:" + name, ""
                headers[name] = self.headers[name]
            request = AWSRequest(method=self.command, url="http://" + self.headers["Host"] + self.path, headers=headers)
            request.context["timestamp"] = date
            signer = S3SigV4Auth(Credentials(KEY, SECRET), "s3", REGION)
            canonical = signer.canonical_request(request)
            expected = signer.signature(signer.string_to_sign(request, canonical), request)
            if expected != fields.get("Signature"):
                return "SignatureDoesNotMatch", canonical
            payload = self.headers.get("x-amz-content-sha256")
            if payload != "UNSIGNED-PAYLOAD" and payload != hashlib.sha256(body).hexdigest():
                return "XAmzContentSHA256Mismatch", canonical
            return "OK", canonical

        def error(self, code, send_body):
            body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>%s</Code>"
                    "<Message>refused by the verifying proxy</Message></Error>" % code).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def relay(self, send_body):
            body_in = self.rfile.read(int(self.headers.get("Content-Length", "0") or "0"))
            verdict, canonical = self.verdict(body_in)
            cut = 0
            if verdict == "OK" and CUT and self.command == "GET" and "/blobs/" in self.path:
                with lock:
                    blob_gets[self.path] = blob_gets.get(self.path, 0) + 1
                    cut = CUT if blob_gets[self.path] == 1 else 0
            log("%s %s %s %s%s" % (self.command, self.path, verdict, self.headers.get("Range", "-").replace(" ", ""),
                                  " cut@%d" % cut if cut else ""))
            if verdict != "OK":
                if canonical:
                    log("  canonical request: " + canonical.replace("\n", "\\n"))
                return self.error(verdict.split(":")[0], send_body)
            upstream = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body_in if body_in else None, headers=headers)
            answer = upstream.getresponse()
            body = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                    self.send_header(name, value)
            self.send_header("Content-Length", answer.getheader("Content-Length", str(len(body))) if not send_body else str(len(body)))
            self.end_headers()
            if send_body and cut:
                # The first GET of each blob: the promised length, then the connection drops.
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
            elif send_body:
                self.wfile.write(body)
            upstream.close()

        def do_GET(self):
            self.relay(True)

        def do_HEAD(self):
            self.relay(False)

        def do_PUT(self):
            self.relay(True)

        def do_POST(self):
            self.relay(True)

        def do_DELETE(self):
            self.relay(True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("port %d" % server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    os._exit(0)
    """#

    let port: Int
    let server: BackgroundServer
    let logPath: String
    var endpoint: String { "http://127.0.0.1:\(port)" }

    init(port: Int, server: BackgroundServer, logPath: String) {
        self.port = port
        self.server = server
        self.logPath = logPath
    }

    struct Verdict: CustomStringConvertible {
        var method: String
        /// The path exactly as sent (percent-encoding kept).
        var path: String
        var verdict: String
        /// The Range header, or "-".
        var range: String
        /// The answer was cut short on purpose (`cutFirstBlobGetAt`).
        var cut: Bool
        var description: String { "\(method) \(path) \(verdict) \(range)\(cut ? " cut" : "")" }
    }

    /// Every request the proxy saw, in order.
    func verdicts() -> [Verdict] {
        Processes.readText(logPath).split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count >= 4, !line.hasPrefix(" ") else { return nil }
            return Verdict(method: String(fields[0]), path: String(fields[1]), verdict: String(fields[2]), range: String(fields[3]),
                           cut: fields.count > 4 && fields[4].hasPrefix("cut@"))
        }
    }
}

extension Workspace {
    /// Starts a `VerifyingProxy` for `keyID`/`secret` in front of `moto`.
    /// With `sessionToken`, every request must carry it in a signed `x-amz-security-token`;
    /// without, none may carry one. With `cutFirstBlobGetAt`, the first GET of each blob key
    /// is answered with its full Content-Length but only that many bytes, then the connection
    /// is closed.
    func startVerifyingProxy(_ moto: MotoS3, keyID: String, secret: String, sessionToken: String? = nil,
                             cutFirstBlobGetAt: Int? = nil, region: String = "us-east-1") async throws -> VerifyingProxy {
        var options: [String] = []
        if let sessionToken { options += ["--token", sessionToken] }
        if let cutFirstBlobGetAt { options += ["--cut-first-blob-get-at", String(cutFirstBlobGetAt)] }
        let scriptPath = path("verifying_proxy.py")
        try VerifyingProxy.script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let logPath = path("verifying-proxy-\(nextID()).log")
        let server = try BackgroundServer(try Harness.python(), ["-u", scriptPath, String(moto.port), keyID, secret, region, logPath] + options,
                                          in: self, label: "verifying-proxy", keepStdinOpen: true)
        let port = try await server.awaitNumber(after: "port")
        return VerifyingProxy(port: port, server: server, logPath: logPath)
    }
}

extension MotoS3 {
    /// Moves objects (copy, then delete the original) with boto3, e.g. to lay a cache out
    /// under a non-default blobs_prefix/manifests_prefix.
    func moveObjects(bucket: String, _ moves: [(from: String, to: String)], in ws: Workspace) async throws {
        let script = """
            import sys, boto3
            from botocore.config import Config
            s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing", config=Config(s3={"addressing_style": "path"}))
            bucket, rest = sys.argv[2], sys.argv[3:]
            for source, target in zip(rest[::2], rest[1::2]):
                s3.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source})
                s3.delete_object(Bucket=bucket, Key=source)
            print("moved", len(rest) // 2)
            """
        let result = try await Processes.run(try Harness.python(), ["-c", script, endpoint, bucket] + moves.flatMap { [$0.from, $0.to] },
                                             environment: S3Environment.pythonEnvironment, timeout: 30, in: ws)
        guard result.status == 0, result.stdout.hasPrefix("moved \(moves.count)") else { throw HarnessError("moving objects failed: \(result)") }
    }
}

extension MotoS3 {
    /// Runs a boto3 snippet against this server (path style, moto's usual test keys; signature
    /// checking must be off) with `s3`, `bucket` and `argv` (the extra arguments) defined.
    private func boto3(_ snippet: String, bucket: String, _ arguments: [String] = [], in ws: Workspace) async throws -> String {
        let script = """
            import sys, boto3
            from botocore.config import Config
            s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing", config=Config(s3={"addressing_style": "path"}))
            bucket, argv = sys.argv[2], sys.argv[3:]

            """ + snippet
        let result = try await Processes.run(try Harness.python(), ["-c", script, endpoint, bucket] + arguments,
                                             environment: S3Environment.pythonEnvironment, timeout: 30, in: ws)
        guard result.status == 0 else { throw HarnessError("boto3 against moto failed: \(result)") }
        return result.stdout
    }

    func createBucket(_ bucket: String, in ws: Workspace) async throws {
        _ = try await boto3("s3.create_bucket(Bucket=bucket)", bucket: bucket, in: ws)
    }

    /// Each object's bytes (GetObject); a key with no object is left out.
    func objects(bucket: String, keys: [String], in ws: Workspace) async throws -> [String: [UInt8]] {
        let directory = try ws.makeDirectory("objects-\(ws.nextID())")
        let output = try await boto3("""
            for number, key in enumerate(argv[1:]):
                try:
                    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                except s3.exceptions.NoSuchKey:
                    print("absent")
                    continue
                path = "%s/%d" % (argv[0], number)
                with open(path, "wb") as out:
                    out.write(body)
                print(path)
            """, bucket: bucket, [directory] + keys, in: ws)
        let lines = output.split(separator: "\n").map(String.init)
        guard lines.count == keys.count else { throw HarnessError("GetObject of \(keys) printed \(lines)") }
        var objects: [String: [UInt8]] = [:]
        for (key, line) in zip(keys, lines) where line != "absent" {
            objects[key] = Array(try Data(contentsOf: URL(fileURLWithPath: line)))
        }
        return objects
    }

    /// The keys with a multipart upload in progress (ListMultipartUploads).
    func multipartUploads(bucket: String, in ws: Workspace) async throws -> [String] {
        let output = try await boto3("""
            for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                print(upload["Key"])
            """, bucket: bucket, in: ws)
        return output.split(separator: "\n").map(String.init)
    }

    /// Whether `key` exists (HeadObject), and its Last-Modified as S3 sends it.
    func lastModified(bucket: String, key: String, in ws: Workspace) async throws -> String? {
        let output = try await boto3("""
            try:
                print(s3.head_object(Bucket=bucket, Key=argv[0])["ResponseMetadata"]["HTTPHeaders"]["last-modified"])
            except s3.exceptions.ClientError as error:
                print("absent" if error.response["Error"]["Code"] in ("404", "NoSuchKey") else error)
            """, bucket: bucket, [key], in: ws).trimmingCharacters(in: .whitespacesAndNewlines)
        return output == "absent" ? nil : output
    }
}

// MARK: - A container credentials endpoint on 127.0.0.1

/// What AWS_CONTAINER_CREDENTIALS_FULL_URI points at in ECS/EKS: `GET /creds` with the
/// expected `Authorization` answers temporary credentials (one hour); anything else 401.
/// Logs `GET PATH STATUS` per request; exits when its stdin closes.
final class ContainerCredentialsServer: Sendable {
    static let script = #"""
    import datetime, json, os, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    KEY, SECRET, TOKEN, AUTHORIZATION, LOG = sys.argv[1:6]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            ok = self.path == "/creds" and self.headers.get("Authorization") == AUTHORIZATION
            expiration = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = json.dumps({"AccessKeyId": KEY, "SecretAccessKey": SECRET, "Token": TOKEN, "Expiration": expiration}
                              if ok else {"message": "unauthorized"}).encode()
            with open(LOG, "a") as out:
                out.write("GET %s %d\n" % (self.path, 200 if ok else 401))
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("port %d" % server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    os._exit(0)
    """#

    let port: Int
    let server: BackgroundServer
    let logPath: String
    var url: String { "http://127.0.0.1:\(port)/creds" }

    init(port: Int, server: BackgroundServer, logPath: String) {
        self.port = port
        self.server = server
        self.logPath = logPath
    }

    /// "GET PATH STATUS" lines.
    func requests() -> [String] { Processes.readText(logPath).split(separator: "\n").map(String.init) }
}

extension Workspace {
    func startContainerCredentials(keyID: String, secret: String, token: String, authorization: String) async throws -> ContainerCredentialsServer {
        let scriptPath = path("container_credentials.py")
        try ContainerCredentialsServer.script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let logPath = path("container-credentials-\(nextID()).log")
        let server = try BackgroundServer(try Harness.python(), ["-u", scriptPath, keyID, secret, token, authorization, logPath],
                                          in: self, label: "container-credentials", keepStdinOpen: true)
        let port = try await server.awaitNumber(after: "port")
        return ContainerCredentialsServer(port: port, server: server, logPath: logPath)
    }
}
