import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("ocicachefs cache ls / prune")
struct CacheCommandTests {
    @Test("ls lists blobs least recently used first; prune removes them in that order")
    func listAndPrune() async throws {
        try await withWorkspace("cachecmd") { ws in
            let binary = try Harness.binary()
            let cache = try ws.makeDirectory("cache")
            try FileManager.default.createDirectory(atPath: cache + "/blobs/sha256", withIntermediateDirectories: true)
            var digests: [Digest] = []
            for (index, lastUsed) in [3_000, 1_000, 2_000].enumerated() {
                let bytes = [UInt8](repeating: UInt8(index), count: 1000)
                let digest = Digest.sha256(of: bytes)
                let path = cache + "/blobs/sha256/" + digest.hex
                try Data(bytes).write(to: URL(fileURLWithPath: path))
                var times = [timespec(tv_sec: lastUsed, tv_nsec: 0), timespec(tv_sec: lastUsed, tv_nsec: 0)]
                utimensat(AT_FDCWD, path, &times, 0)
                digests.append(digest)
            }
            let leastRecent = [digests[1], digests[2], digests[0]]

            let listed = try #require(Processes.runSync(binary, ["cache", "ls", "--cache-dir", cache], in: ws))
            #expect(listed.status == 0, "\(listed)")
            let rows = listed.stdout.split(separator: "\n").filter { $0.hasPrefix("sha256:") }.map { String($0.prefix(71)) }
            #expect(rows == leastRecent.map(\.description), "\(listed.stdout)")
            #expect(listed.stdout.contains("3 blobs"))

            let pruned = try #require(Processes.runSync(binary, ["cache", "prune", "--cache-dir", cache, "--max-size", "2000"], in: ws))
            #expect(pruned.status == 0, "\(pruned)")
            #expect(pruned.stdout.contains("removed 1 blobs"), "\(pruned.stdout)")
            let remaining = Set(FileIO.listDirectory(cache + "/blobs/sha256"))
            #expect(remaining == Set([digests[0].hex, digests[2].hex]))

            let emptied = try #require(Processes.runSync(binary, ["cache", "prune", "--cache-dir", cache, "--max-size", "0"], in: ws))
            #expect(emptied.status == 0, "\(emptied)")
            #expect(FileIO.listDirectory(cache + "/blobs/sha256").isEmpty)

            let missing = try #require(Processes.runSync(binary, ["cache", "ls", "--cache-dir", ws.path("nope")], in: ws))
            #expect(missing.status == 1)
            #expect(missing.stderrLines.count == 1 && missing.stderrLines[0].hasPrefix("ocicachefs: "), "\(missing)")
        }
    }
}
