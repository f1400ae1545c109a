import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Downloads survive a killed daemon")
struct ResumeTests {
    /// A proxy in front of the registry that passes blob bodies through up to a limit and then
    /// holds the connection open without sending more: a download frozen half-way.
    static let stallingProxy = #"""
    import http.client, socket, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    upstream, limit = int(sys.argv[1]), int(sys.argv[2])
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args): pass
        def do_GET(self):
            connection = http.client.HTTPConnection("127.0.0.1", upstream)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            connection.request("GET", self.path, headers=headers)
            answer = connection.getresponse()
            body = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.end_headers()
            if "/blobs/" in self.path and len(body) > limit:
                self.wfile.write(body[:limit]); self.wfile.flush()
                threading.Event().wait()
            self.wfile.write(body)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print("port", server.server_address[1], flush=True)
    server.serve_forever()
    """#

    @Test("kill -9 mid-download: the next mount continues from the partial file with a range request")
    func killedDaemonsDownloadIsContinued() async throws {
        try await withWorkspace("resume") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "manifest", layers: 1, layerSize: 4_000_000, seed: 31)
            let layer = try #require(seed.layers.first)
            let script = ws.path("stalling_proxy.py")
            try Self.stallingProxy.write(toFile: script, atomically: true, encoding: .utf8)
            let proxy = try BackgroundServer(try Harness.python(), ["-u", script, String(registry.port), "1500000"],
                                             in: ws, label: "stalling-proxy", keepStdinOpen: true)
            let proxyPort = try await proxy.awaitNumber(after: "port")
            let cache = try ws.makeDirectory("shared-cache")

            // Mount through the proxy and read the start of the layer: it arrives, then the
            // download freezes at 1.5 MB.
            let first = try await ws.mountExpectingSuccess("type=registry,ref=127.0.0.1:\(proxyPort)/cache:main", cacheDir: cache, timeout: 60)
            let fd = open(first.blobPath(layer.digest), O_RDONLY)
            #expect(fd >= 0)
            var head = [UInt8](repeating: 0, count: 65536)
            #expect(pread(fd, &head, head.count, 0) == head.count)
            close(fd)
            let partials = FileIO.listDirectory(cache + "/partial")
            #expect(partials.sorted() == [layer.hex, layer.hex + ".journal"], "\(partials)")

            // The daemon dies without a chance to clean up.
            let daemons = first.daemonPIDs
            #expect(!daemons.isEmpty)
            for pid in daemons { kill(pid, SIGKILL) }
            ws.forceUnmount(first.mountpoint)
            proxy.stop()

            // A new mount, straight to the registry, over the same cache directory.
            let before = registry.blobBytesServed(repo: "cache", digest: layer.digest)
            let second = try await ws.mountExpectingSuccess(registry.source("cache:main"), cacheDir: cache)
            Check.blobsVerify(second, seed.blobs)
            // The first MiB block arrived whole before the freeze: only the rest is fetched.
            let served = registry.blobBytesServed(repo: "cache", digest: layer.digest) - before
            #expect(served == layer.size - (1 << 20), "\(served) of \(layer.size) bytes fetched again")
            let log = Processes.readText(registry.logPath)
            let rangeAnswers = log.split(separator: "\n").filter { $0.contains("GET /v2/cache/blobs/\(layer.digest)") && $0.contains("\" 206 ") }
            #expect(!rangeAnswers.isEmpty, "the layer was continued with a range request")
            #expect(second.log.contains("continuing an interrupted download"), "\(second.log.suffix(2000))")
            // Unmounting waits for the verified blob to be moved into blobs/.
            _ = try await second.unmount(in: ws)
            #expect(FileIO.listDirectory(cache + "/partial").isEmpty)
            #expect(FileIO.listDirectory(cache + "/blobs/sha256").contains(layer.hex))
        }
    }
}
