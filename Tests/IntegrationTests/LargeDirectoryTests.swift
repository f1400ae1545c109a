import Foundation
import Testing

/// A directory of thousands of names through the kernel, which lists it a page at a time
/// (issue 13, item 4: the listing is paged, not rebuilt and sorted for every page).
@Suite("Large directories through a real mount")
struct LargeDirectoryTests {
    @Test("3,000 names in a scratch directory are listed once each, in order, with their attributes")
    func thousandsOfNames() async throws {
        try await withWorkspace("large-dir") { ws in
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 1 << 10, seed: 96)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let names = (0..<3000).map { String(format: "entry-%05d", $0) }
            for name in names {
                #expect(FileManager.default.createFile(atPath: mount.path("ingest/" + name), contents: nil))
            }
            let listed = try FileManager.default.contentsOfDirectory(atPath: mount.path("ingest"))
            #expect(listed.count == names.count)
            #expect(listed.sorted() == names)
            let ls = try await Processes.run("/bin/ls", ["-f", mount.path("ingest")], timeout: 30, in: ws)
            #expect(ls.stdout.split(separator: "\n").map(String.init) == [".", ".."] + names)

            // `ls -l` lists with attributes (readdirplus), which the kernel counts as lookups:
            // the names then go away cleanly and can be made again.
            let long = try await Processes.run("/bin/ls", ["-ln", mount.path("ingest")], timeout: 30, in: ws)
            #expect(long.status == 0 && long.stdout.split(separator: "\n").filter { $0.hasPrefix("-rw") }.count == names.count, "\(long.stderr)")
            for name in names { try FileManager.default.removeItem(atPath: mount.path("ingest/" + name)) }
            #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path("ingest")).isEmpty)
            #expect(!FileManager.default.fileExists(atPath: mount.path("ingest/" + names[0])))
            #expect(FileManager.default.createFile(atPath: mount.path("ingest/" + names[0]), contents: Data("again".utf8)))
            #expect(FileManager.default.contents(atPath: mount.path("ingest/" + names[0])) == Data("again".utf8))
        }
    }
}
