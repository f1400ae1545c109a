import Foundation
import Testing

/// A directory of thousands of names through the kernel, which lists it a page at a time
/// (issue 13, item 4: the listing is paged, not rebuilt and sorted for every page).
@Suite("Large directories through a real mount")
struct LargeDirectoryTests {
    @Test("3,000 names in a scratch directory are listed once each, in order")
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
        }
    }
}
