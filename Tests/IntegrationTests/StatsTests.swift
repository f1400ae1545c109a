import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("ocicachefs stats and the Prometheus exports, checked against known reads through a real mount")
struct StatsTests {
    /// Prometheus text parsed by the `prometheus_client` package's own parser: each sample as
    /// `name{labels}` → value, and each family's type.
    static func parsePrometheus(_ text: String, in ws: Workspace) async throws -> (samples: [String: Double], types: [String: String]) {
        let input = ws.path("metrics-\(ws.nextID()).txt")
        try text.write(toFile: input, atomically: true, encoding: .utf8)
        let script = """
        import json, sys
        try:
            from prometheus_client.parser import text_string_to_metric_families
        except ImportError:
            sys.exit("prerequisite missing: the python package prometheus_client (scripts/setup.sh installs it with pip)")
        samples, types = {}, {}
        for family in text_string_to_metric_families(open(sys.argv[1]).read()):
            types[family.name] = family.type
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "mountpoint")
                samples[s.name + "{" + labels + "}"] = s.value
        print(json.dumps({"samples": samples, "types": types}))
        """
        let result = try await Processes.run(try Harness.python(), ["-c", script, input], in: ws)
        guard result.status == 0, let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any],
              let samples = object["samples"] as? [String: Double], let types = object["types"] as? [String: String] else {
            throw HarnessError("prometheus_client could not parse the metrics: \(result)\n\(text)")
        }
        return (samples, types)
    }

    static func stats(_ mountpoint: String, in ws: Workspace) async throws -> [String: Any] {
        let result = try await Processes.run(try Harness.binary(), ["stats", "--json", mountpoint], timeout: 30, in: ws)
        guard result.status == 0, let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw HarnessError("ocicachefs stats --json: \(result)")
        }
        return object
    }

    @Test("stats, the metrics file and /metrics count what was read: bytes, hits and misses, latencies, errors")
    func statsCountKnownReads() async throws {
        try await withWorkspace("stats") { ws in
            let registry = try await ws.startRegistry()
            let seeded = try await ws.seed(registry, variant: "manifest", layers: 2, layerSize: 900_000)
            let (good, bad) = (seeded.layers[0], seeded.layers[1])
            try await ws.corruptBlob(registry, digest: bad.digest)
            // An earlier mount of the cache directory fetched the good layer.
            let earlier = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let bytes = try FileIO.readAll(earlier.path("blobs/sha256/" + good.hex))
            #expect(try await earlier.unmount(in: ws).status == 0)

            let port = try closedPort()
            let metricsFile = ws.path("ocicachefs.prom")
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), cacheDir: earlier.cacheDir,
                                                           options: ["--metrics-file", metricsFile, "--metrics-listen", "127.0.0.1:\(port)"])
            // The good layer is in the cache (a hit), twice (the second time after the kernel
            // forgot its pages); the corrupt one is fetched (a miss) and fails.
            #expect(try FileIO.readAll(mount.path("blobs/sha256/" + good.hex)) == bytes)
            #expect(try FileIO.readAll(mount.path("blobs/sha256/" + good.hex), dropPageCache: true) == bytes)
            #expect(throws: (any Error).self, "the corrupt layer fails its read") { try FileIO.readAll(mount.path("blobs/sha256/" + bad.hex)) }

            let stats = try await Self.stats(mount.mountpoint, in: ws)
            let served = try #require(stats["servedBytes"] as? Int)
            // The corrupt layer's first blocks are answered before its end shows the mismatch.
            #expect(served >= 2 * Int(good.size) && served <= 2 * Int(good.size) + Int(bad.size), "\(stats)")
            let remote = try #require(stats["remoteBytes"] as? Int)
            #expect(remote >= Int(bad.size) && remote <= 3 * Int(bad.size), "only the corrupt layer, within its attempts: \(stats)")
            #expect(stats["cacheMissBlobs"] as? Int == 1, "the corrupt layer's first read waited: \(stats)")
            #expect(stats["cacheHitBlobs"] as? Int == 1, "the good layer was there: \(stats)")
            let hitBytes = try #require(stats["cacheHitBytes"] as? Int)
            // (Retries of the corrupt layer may find some of its blocks already there.)
            #expect(hitBytes >= 2 * Int(good.size) && hitBytes <= 2 * Int(good.size + bad.size), "\(stats)")
            let errors = try #require(stats["errors"] as? [String: Int])
            #expect((errors["read EIO"] ?? 0) >= 1, "\(stats)")
            let latency = try #require(stats["readLatency"] as? [String: Any])
            let reads = try #require(stats["reads"] as? Int)
            #expect(latency["count"] as? Int == reads && reads > 0)
            let counts = (latency["buckets"] as? [[String: Any]] ?? []).compactMap { $0["count"] as? Int }
            #expect(counts == counts.sorted() && (counts.last ?? 0) <= reads, "cumulative buckets: \(counts)")
            #expect(latency["p50Seconds"] is Double, "\(latency)")
            #expect(stats["downloadsInFlight"] as? Int == 0 && stats["uploadsInFlight"] as? Int == 0)
            let cache = try #require(stats["cache"] as? [String: Any])
            #expect(cache["directory"] as? String == mount.cacheDir && (cache["bytes"] as? Int ?? 0) >= Int(good.size), "\(cache)")

            let human = try await Processes.run(try Harness.binary(), ["stats", mount.mountpoint], in: ws)
            #expect(human.status == 0 && human.stdout.contains("cache misses 1 blob(s)") && human.stdout.contains("read EIO: "), "\(human)")

            // The HTTP listener, parsed by Prometheus' own client library.
            let scraped = try await Processes.run(try Harness.tool("curl", neededFor: "scraping /metrics"),
                                                  ["-sS", "-i", "http://127.0.0.1:\(port)/metrics"], in: ws)
            #expect(scraped.status == 0 && scraped.stdout.hasPrefix("HTTP/1.1 200") && scraped.stdout.contains("text/plain; version=0.0.4"), "\(scraped)")
            let body = String(scraped.stdout[(scraped.stdout.range(of: "\r\n\r\n")?.upperBound ?? scraped.stdout.startIndex)...])
            let parsed = try await Self.parsePrometheus(body, in: ws)
            #expect(parsed.types["ocicachefs_read_duration_seconds"] == "histogram", "\(parsed.types)")
            #expect(parsed.types["ocicachefs_remote_bytes"] == "counter", "\(parsed.types)")
            #expect(parsed.types["ocicachefs_downloads_in_flight"] == "gauge", "\(parsed.types)")
            #expect(parsed.samples["ocicachefs_served_bytes_total{}"] == Double(served), "\(parsed.samples)")
            #expect(parsed.samples["ocicachefs_read_duration_seconds_count{}"] == Double(reads), "\(parsed.samples)")
            #expect(parsed.samples["ocicachefs_errors_total{kind=read EIO}"] == Double(errors["read EIO"] ?? 0), "\(parsed.samples)")
            let missing = try await Processes.run(try Harness.tool("curl", neededFor: "scraping /metrics"),
                                                  ["-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(port)/other"], in: ws)
            #expect(missing.stdout == "404")

            // The socket is the owner's alone.
            let sockets = PIDFiles.directories.flatMap { directory in
                FileIO.listDirectory(directory).filter { $0.hasSuffix(".sock") }.map { directory + "/" + $0 }
            }
            #expect(!sockets.isEmpty, "the daemon's socket is in \(PIDFiles.directories)")
            for path in sockets {
                var info = stat()
                #expect(stat(path, &info) == 0 && info.st_mode & 0o077 == 0, "\(path) mode \(String(info.st_mode, radix: 8))")
            }

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
            // The file's last version is written as the daemon exits.
            let final = try await Self.parsePrometheus(Processes.readText(metricsFile), in: ws)
            #expect(final.samples["ocicachefs_served_bytes_total{}"] == Double(served), "\(final.samples)")
            #expect(final.samples["ocicachefs_cache_hit_blobs_total{}"] == 1)
            #expect(!FileManager.default.fileExists(atPath: metricsFile + ".tmp-\(mount.daemonPIDs.first ?? 0)"))
        }
    }

    /// Reads a blob as buildctl's import does (per 1 MiB chunk open, pread, close), expects
    /// exactly its bytes, and returns the number of chunks.
    static func readByChunks(_ path: String, expecting layer: SeedSummary.Blob,
                             sourceLocation: SourceLocation = #_sourceLocation) -> Int {
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var read: [UInt8] = []
        for offset in stride(from: 0, to: Int(layer.size), by: chunk.count) {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            #expect(fd >= 0, sourceLocation: sourceLocation)
            let got = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
            read += chunk[..<max(got, 0)]
            #expect(close(fd) == 0, sourceLocation: sourceLocation)
        }
        #expect(Digest.sha256(of: read).description == layer.digest, sourceLocation: sourceLocation)
        return (Int(layer.size) + chunk.count - 1) / chunk.count
    }

    @Test("buildctl's per-chunk opens of a blob cost the daemon an open and a release each, never a flush; the close of a written index.json still reaches it")
    func readOnlyClosesAreKeptByTheKernel() async throws {
        try await withWorkspace("stats-opens") { ws in
            let registry = try await ws.startRegistry()
            let seeded = try await ws.seed(registry, variant: "manifest", layers: 1, layerSize: 3 << 20)
            let layer = seeded.layers[0]
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), writable: true)
            let before = try #require(try await Self.stats(mount.mountpoint, in: ws)["fileRequests"] as? [String: Int])
            let chunks = Self.readByChunks(mount.path("blobs/sha256/" + layer.hex), expecting: layer)
            // Releases arrive after close returns: wait for them, within a bound.
            var after: [String: Int] = [:]
            for _ in 0..<200 {
                after = try #require(try await Self.stats(mount.mountpoint, in: ws)["fileRequests"] as? [String: Int])
                if (after["release"] ?? 0) - (before["release"] ?? 0) >= chunks { break }
                try await Task.sleep(for: .milliseconds(25))
            }
            #expect((after["open"] ?? 0) - (before["open"] ?? 0) == chunks, "\(before) → \(after)")
            #expect((after["release"] ?? 0) - (before["release"] ?? 0) == chunks, "\(before) → \(after)")
            #expect(after["flush"] == before["flush"], "no close of a blob waits for the daemon: \(before) → \(after)")

            // A file a client writes keeps its flush: the close of index.json commits tags.
            let index = open(mount.path("index.json"), O_RDWR | O_CLOEXEC)
            #expect(index >= 0 && close(index) == 0)
            let last = try #require(try await Self.stats(mount.mountpoint, in: ws)["fileRequests"] as? [String: Int])
            #expect((last["flush"] ?? 0) > (after["flush"] ?? 0), "\(after) → \(last)")
            #expect(try await mount.unmount(in: ws).status == 0)
        }
    }

    @Test("on a read-only mount the kernel opens, flushes and releases files without asking the daemon (after the first open's ENOSYS)")
    func readOnlyOpensStayInTheKernel() async throws {
        try await withWorkspace("stats-no-open") { ws in
            let registry = try await ws.startRegistry()
            let seeded = try await ws.seed(registry, variant: "manifest", layers: 1, layerSize: 3 << 20)
            let layer = seeded.layers[0]
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let path = mount.path("blobs/sha256/" + layer.hex)
            _ = Self.readByChunks(path, expecting: layer)
            // Scratch files still work: create, write, O_TRUNC (now a setattr), read back, unlink.
            let scratch = mount.path("ingest/probe")
            #expect(FileManager.default.createFile(atPath: scratch, contents: Data("0123456789".utf8)))
            let truncating = open(scratch, O_WRONLY | O_TRUNC | O_CLOEXEC)
            #expect(truncating >= 0 && write(truncating, "ab", 2) == 2 && close(truncating) == 0)
            #expect(try String(contentsOfFile: scratch, encoding: .utf8) == "ab")
            #expect(unlink(scratch) == 0)
            // A blob cannot be truncated or written through an open that now succeeds.
            let blob = open(path, O_WRONLY | O_CLOEXEC)
            if blob >= 0 {
                #expect(write(blob, "x", 1) == -1 && errno == EROFS)
                close(blob)
            }
            #expect(open(path, O_WRONLY | O_TRUNC | O_CLOEXEC) == -1 && errno == EROFS)
            let counts = try #require(try await Self.stats(mount.mountpoint, in: ws)["fileRequests"] as? [String: Int])
            // The mount's own readiness check opened index.json first: that open was the one answered ENOSYS.
            #expect((counts["open"] ?? 0) <= 1, "\(counts)")
            #expect((counts["flush"] ?? 0) <= 1, "\(counts)")
            #expect((counts["release"] ?? 0) == 0, "\(counts)")
            #expect(try await mount.unmount(in: ws).status == 0)
        }
    }

    @Test("stats of a directory that is not a mount is one line")
    func statsOfANonMount() async throws {
        try await withWorkspace("stats-none") { ws in
            let plain = try ws.makeDirectory("plain")
            let result = try await Processes.run(try Harness.binary(), ["stats", plain], in: ws)
            #expect(result.status != 0)
            #expect(result.stderrLines == ["ocicachefs: stats: \(plain) is not mounted"], "\(result)")
        }
    }
}
