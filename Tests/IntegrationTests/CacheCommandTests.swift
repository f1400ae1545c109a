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
            // A partial download (data and journal), used before everything else.
            let partialBytes = [UInt8](repeating: 9, count: 1000)
            let partial = Digest.sha256(of: partialBytes)
            try FileManager.default.createDirectory(atPath: cache + "/partial", withIntermediateDirectories: true)
            try Data(partialBytes).write(to: URL(fileURLWithPath: cache + "/partial/" + partial.hex))
            try Data().write(to: URL(fileURLWithPath: cache + "/partial/" + partial.hex + ".journal"))
            var early = [timespec(tv_sec: 500, tv_nsec: 0), timespec(tv_sec: 500, tv_nsec: 0)]
            utimensat(AT_FDCWD, cache + "/partial/" + partial.hex, &early, 0)
            let leastRecent = [partial, digests[1], digests[2], digests[0]]

            let listed = try #require(Processes.runSync(binary, ["cache", "ls", "--cache-dir", cache], in: ws))
            #expect(listed.status == 0, "\(listed)")
            let rows = listed.stdout.split(separator: "\n").filter { $0.hasPrefix("sha256:") }.map { String($0.prefix(71)) }
            #expect(rows == leastRecent.map(\.description), "\(listed.stdout)")
            #expect(listed.stdout.contains("3 blobs") && listed.stdout.contains("1 partial downloads"), "\(listed.stdout)")
            #expect(listed.stdout.split(separator: "\n").first { $0.hasPrefix(partial.description) }?.hasSuffix("partial download") == true)

            let pruned = try #require(Processes.runSync(binary, ["cache", "prune", "--cache-dir", cache, "--max-size", "2000"], in: ws))
            #expect(pruned.status == 0, "\(pruned)")
            #expect(pruned.stdout.contains("removed 2 blobs"), "\(pruned.stdout)")
            let remaining = Set(FileIO.listDirectory(cache + "/blobs/sha256"))
            #expect(remaining == Set([digests[0].hex, digests[2].hex]))
            #expect(FileIO.listDirectory(cache + "/partial").isEmpty, "the partial download and its journal went first")

            let emptied = try #require(Processes.runSync(binary, ["cache", "prune", "--cache-dir", cache, "--max-size", "0"], in: ws))
            #expect(emptied.status == 0, "\(emptied)")
            #expect(FileIO.listDirectory(cache + "/blobs/sha256").isEmpty)

            let missing = try #require(Processes.runSync(binary, ["cache", "ls", "--cache-dir", ws.path("nope")], in: ws))
            #expect(missing.status == 1)
            #expect(missing.stderrLines.count == 1 && missing.stderrLines[0].hasPrefix("ocicachefs: "), "\(missing)")
        }
    }
}
