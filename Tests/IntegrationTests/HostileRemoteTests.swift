import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 12 through a real mount: a remote that lies, then recovers; one that ignores ranges
/// and breaks, sends too much, too little or an error page. The kernel keeps what it was
/// answered in its page cache, so these must be tested through it, not only in process.
@Suite("Hostile remotes through a real mount")
struct HostileRemoteTests {
    static let layerSize = 8 << 20

    /// A registry holding a cache of one layer, behind the fault proxy (passing for now).
    static func oneLayerBehindProxy(_ ws: Workspace, size: Int, seed: Int) async throws -> (FaultProxy, SeedSummary.Blob) {
        let registry = try await ws.startRegistry()
        let summary = try await ws.seed(registry, variant: "index", layers: 1, layerSize: size, seed: seed)
        return (try await ws.startFaultProxy(inFrontOf: registry), summary.layers[0])
    }

    /// `sha256sum PATH` as a separate process, killed past `timeout`: the digest, or nil when
    /// a read failed.
    static func sha256sum(_ path: String, timeout: Double, in ws: Workspace) async throws -> (digest: String?, result: ProcessResult) {
        let result = try await Processes.run("/usr/bin/sha256sum", [path], timeout: timeout, in: ws)
        guard result.status == 0, let hex = result.stdout.split(separator: " ").first else { return (nil, result) }
        return ("sha256:" + hex, result)
    }

    static func pread(_ fd: Int32, offset: Int, count: Int) -> (bytes: [UInt8], errno: Int32) {
        var buffer = [UInt8](repeating: 0, count: count)
        let n = buffer.withUnsafeMutableBytes { Glibc.pread(fd, $0.baseAddress!, count, off_t(offset)) }
        return n < 0 ? ([], errno) : (Array(buffer[0..<n]), 0)
    }

    /// The registry's first answers for the start of the layer are corrupt, later ones right.
    /// `cat` reads the whole blob: EIO while it is corrupt, then exactly the blob, never bytes
    /// that do not hash to its name (the kernel had kept the corrupt pages with keep_cache).
    /// A handle that was given corrupt bytes fails from then on instead of changing content.
    @Test("a remote that lies and then recovers: EIO, then exactly the blob, never other bytes")
    func lyingThenRecovering() async throws {
        try await withWorkspace("lie-recover") { ws in
            let (proxy, layer) = try await Self.oneLayerBehindProxy(ws, size: Self.layerSize, seed: 41)
            // Only the layer: the manifest and config must arrive intact for the mount.
            try proxy.set(#"{"mode": "corrupt", "digest": "\#(layer.digest)"}"#)
            let mount = try await ws.mountExpectingSuccess(proxy.source("cache:main"))
            let path = mount.blobPath(layer.digest)

            let corrupt = try await Self.sha256sum(path, timeout: 60, in: ws)
            #expect(corrupt.digest == nil, "reading a corrupt blob whole must fail: \(corrupt.result)")

            // A handle reads the start (answered before the blob is verified), then its end.
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            #expect(fd >= 0)
            let start = Self.pread(fd, offset: 0, count: 64 << 10)
            #expect(start.errno == 0 && start.bytes.count == 64 << 10, "errno \(start.errno)")
            let end = Self.pread(fd, offset: Int(layer.size) - 4096, count: 4096)
            #expect(end.errno == EIO, "the end of a corrupt blob: errno \(end.errno)")

            try proxy.set(#"{"mode": "pass"}"#)
            // The same handle must not now read other bytes at the start, nor the end: the
            // kernel's pages were dropped and the handle fails.
            let again = Self.pread(fd, offset: 0, count: 64 << 10)
            #expect(again.errno == EIO, "the handle that read corrupt bytes must fail, not read \(again.bytes.count) other bytes; log: \(mount.log.suffix(3000))")
            #expect(Self.pread(fd, offset: Int(layer.size) - 4096, count: 4096).errno == EIO)
            // The kernel opens files of a read-only mount without asking the daemon, so the
            // inode stands in for the handle: the name now leads to a new one.
            var held = stat(), named = stat()
            #expect(fstat(fd, &held) == 0 && stat(path, &named) == 0 && held.st_ino != named.st_ino,
                    "the retired inode \(held.st_ino) must not be what the name leads to (\(named.st_ino))")
            close(fd)

            // A new reader gets exactly the blob.
            let fixed = try await Self.sha256sum(path, timeout: 60, in: ws)
            #expect(fixed.digest == layer.digest, "after the remote recovered: \(fixed.result); log: \(mount.log.suffix(1500))")
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    /// An earlier daemon recorded blocks whose CRCs match but whose bytes were bad from the
    /// start (the remote lied then), and was killed. The next mount serves them to a handle,
    /// finds the digest wrong at the end and fetches the blob again: that handle fails rather
    /// than reading on into the new download; a new reader gets exactly the blob.
    @Test("bad blocks from a killed daemon's journal: the handle that read them fails, a new one gets the blob")
    func badJournalFromAnEarlierProcess() async throws {
        try await withWorkspace("bad-journal") { ws in
            let (proxy, layer) = try await Self.oneLayerBehindProxy(ws, size: Self.layerSize, seed: 42)
            let cache = try ws.makeDirectory("shared-cache")
            // Only the layer: the manifest and config must arrive intact for the mount.
            try proxy.set(#"{"mode": "corrupt", "digest": "\#(layer.digest)"}"#)

            let first = try await ws.mountExpectingSuccess(proxy.source("cache:main"), cacheDir: cache)
            let firstFD = open(first.blobPath(layer.digest), O_RDONLY | O_CLOEXEC)
            #expect(firstFD >= 0)
            #expect(Self.pread(firstFD, offset: 0, count: 1 << 20).errno == 0)
            close(firstFD)
            for pid in first.daemonPIDs { kill(pid, SIGKILL) }
            ws.forceUnmount(first.mountpoint)
            #expect(!FileIO.listDirectory(cache + "/partial").isEmpty, "the killed daemon leaves its partial download")

            try proxy.set(#"{"mode": "pass"}"#)
            let second = try await ws.mountExpectingSuccess(proxy.source("cache:main"), cacheDir: cache)
            let path = second.blobPath(layer.digest)
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            #expect(fd >= 0)
            #expect(Self.pread(fd, offset: 0, count: 64 << 10).errno == 0)
            let end = Self.pread(fd, offset: Int(layer.size) - 4096, count: 4096)
            #expect(end.errno == EIO, "a handle that read the earlier daemon's bad blocks must fail at the end, not read the new download")
            #expect(Self.pread(fd, offset: 0, count: 64 << 10).errno == EIO)
            close(fd)

            let fresh = try await Self.sha256sum(path, timeout: 60, in: ws)
            #expect(fresh.digest == layer.digest, "\(fresh.result); log: \(second.log.suffix(1500))")
            let unmounted = try await second.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    /// Remotes that ignore `Range` and misbehave: each read ends (bytes or EIO) within a bound
    /// set by `--timeout` and the retry count, causes a bounded number of requests, and nothing
    /// is fetched once the reader has gone. Before issue 12 the first of these had not returned
    /// after 120 s and had caused 21,877 requests.
    @Test("a remote that ignores ranges and misbehaves: every read ends, with bounded requests",
          arguments: [#"{"mode": "ignore-range-cut", "after": 4194304}"#, #"{"mode": "long"}"#, #"{"mode": "short"}"#,
                      #"{"mode": "truncated"}"#, #"{"mode": "endless"}"#, #"{"mode": "html"}"#])
    func ignoringRanges(fault: String) async throws {
        try await withWorkspace("ranges-ignored") { ws in
            let (proxy, layer) = try await Self.oneLayerBehindProxy(ws, size: 16 << 20, seed: 43)
            let mount = try await ws.mountExpectingSuccess(proxy.source("cache:main"), timeout: 5)
            try proxy.set(fault)

            let read = try await Self.sha256sum(mount.blobPath(layer.digest), timeout: 90, in: ws)
            // `long` and `endless` send the blob and then more: its bytes verify.
            if fault.contains("long") || fault.contains("endless") {
                #expect(read.digest == nil || read.digest == layer.digest, "\(read.result)")
            } else {
                #expect(read.digest == nil, "\(read.result)")
            }
            #expect(read.result.elapsed < 60, "the read took \(read.result.elapsed) s")
            // Requests sent as the read ended (a retry's pause is up to a second) reach the
            // proxy a little later: wait until the count has held still for a second.
            var requests = try proxy.blobRequests()
            var still = 0
            for _ in 0..<100 where still < 10 {
                try await Task.sleep(for: .milliseconds(100))
                let now = try proxy.blobRequests()
                still = now == requests ? still + 1 : 0
                requests = now
            }
            #expect(requests <= 60, "\(requests) blob requests for one read of a 16 MiB blob; log: \(mount.log.suffix(1500))")

            // Nothing goes on once the reader has gone.
            try await Task.sleep(for: .seconds(2))
            let later = try proxy.blobRequests()
            #expect(later == requests, "requests went on after the read ended: \(requests) then \(later); log: \(mount.log.suffix(4000))")
            #expect(mount.isMounted)
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }
}
