import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A reverse proxy in front of a registry or moto that holds the requests matching a pattern
/// (uploads, typically) until told to let them go, so that a test can catch a daemon in the
/// middle of an upload. A held request whose client goes away (a killed daemon) is dropped,
/// never forwarded. Everything else is forwarded as is (Host included, so a registry's upload
/// locations point back at the proxy), and logged as `METHOD PATH STATUS`; held requests also
/// log `HELD`, `RELEASED` or `DROPPED` lines. Exits when its stdin closes.
final class UploadHoldingProxy: Sendable {
    static let script = #"""
    import http.client, json, os, re, select, socket, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    UPSTREAM, LOG = int(sys.argv[1]), sys.argv[2]
    HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
                  "transfer-encoding", "upgrade", "expect", "proxy-connection", "content-length"}
    lock = threading.Lock()
    state = {"pattern": None, "held": 0, "dropped": 0}

    def log(line):
        with lock, open(LOG, "a") as out:
            out.write(line + "\n")

    def holding(line):
        with lock:
            return state["pattern"] is not None and re.search(state["pattern"], line) is not None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def body(self):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():
                    pass
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def reply(self, status, body):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def client_gone(self):
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if not readable:
                return False
            try:
                if self.connection.recv(1, socket.MSG_PEEK):
                    time.sleep(0.05)
                    return False
                return True
            except OSError:
                return True

        def hold(self, line):
            with lock:
                state["held"] += 1
            log("HELD " + line)
            try:
                while holding(line):
                    if self.client_gone():
                        with lock:
                            state["dropped"] += 1
                        log("DROPPED " + line)
                        self.close_connection = True
                        return False
                log("RELEASED " + line)
                return True
            finally:
                with lock:
                    state["held"] -= 1

        def relay(self):
            body = self.body()
            if self.path == "/_hold":
                if self.command == "POST":
                    pattern = json.loads(body or b"{}").get("pattern")
                    with lock:
                        state["pattern"] = pattern
                with lock:
                    current = dict(state)
                return self.reply(200, json.dumps(current).encode())
            line = "%s %s" % (self.command, self.path)
            if holding(line) and not self.hold(line):
                return
            upstream = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=60)
            headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException) as error:
                log("%s 502 %s" % (line, error))
                upstream.close()
                return self.reply(502, b"{}")
            upstream.close()
            log("%s %d" % (line, answer.status))
            self.send_response_only(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            head = self.command == "HEAD"
            self.send_header("Content-Length", answer.getheader("Content-Length", "0") if head else str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = relay

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("port %d" % server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    os._exit(0)
    """#

    struct State: Equatable, CustomStringConvertible {
        /// Requests being held now.
        var held: Int
        /// Held requests whose client went away; never forwarded.
        var dropped: Int
        var description: String { "\(held) held, \(dropped) dropped" }
    }

    let port: Int
    let server: BackgroundServer
    let logPath: String
    var host: String { "127.0.0.1:\(port)" }
    var endpoint: String { "http://\(host)" }

    init(port: Int, server: BackgroundServer, logPath: String) {
        self.port = port
        self.server = server
        self.logPath = logPath
    }

    /// Holds every request whose `METHOD PATH` matches `pattern` (a Python regular expression)
    /// from now on; nil lets the held ones go on and holds nothing more.
    @discardableResult
    func hold(_ pattern: String?) throws -> State {
        let body = String(decoding: try JSONSerialization.data(withJSONObject: ["pattern": pattern.map { $0 as Any } ?? NSNull()]), as: UTF8.self)
        guard let answer = RawHTTP.post(port: port, path: "/_hold", json: body), answer.status == 200 else {
            throw HarnessError("the holding proxy refused \(body)")
        }
        return try Self.state(from: answer.body)
    }

    func state() throws -> State {
        guard let answer = RawHTTP.get(port: port, path: "/_hold"), answer.status == 200 else {
            throw HarnessError("the holding proxy does not answer")
        }
        return try Self.state(from: answer.body)
    }

    private static func state(from body: [UInt8]) throws -> State {
        guard let object = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
              let held = object["held"] as? Int, let dropped = object["dropped"] as? Int else {
            throw HarnessError("the holding proxy answered \(String(decoding: body, as: UTF8.self))")
        }
        return State(held: held, dropped: dropped)
    }

    /// Waits until `condition` holds for the proxy's state; throws after `timeout` seconds.
    @discardableResult
    func waitFor(_ what: String, timeout: Double = 20, _ condition: (State) -> Bool) async throws -> State {
        let deadline = Date().addingTimeInterval(timeout)
        var current = try state()
        while !condition(current) {
            guard Date() < deadline else { throw HarnessError("the holding proxy never had \(what) (now \(current)); log: \(log.suffix(2000))") }
            try await Task.sleep(for: .milliseconds(20))
            current = try state()
        }
        return current
    }

    var log: String { Processes.readText(logPath) }
}

extension Workspace {
    /// Starts an `UploadHoldingProxy` in front of the HTTP server on 127.0.0.1:`upstreamPort`.
    func startHoldingProxy(upstreamPort: Int) async throws -> UploadHoldingProxy {
        let scriptPath = path("holding_proxy.py")
        if !FileManager.default.fileExists(atPath: scriptPath) {
            try UploadHoldingProxy.script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        }
        let logPath = path("holding-proxy-\(nextID()).log")
        let server = try BackgroundServer(try Harness.python(), ["-u", scriptPath, String(upstreamPort), logPath],
                                          in: self, label: "holding-proxy-\(nextID())", keepStdinOpen: true)
        let port = try await server.awaitNumber(after: "port")
        return UploadHoldingProxy(port: port, server: server, logPath: logPath)
    }
}
