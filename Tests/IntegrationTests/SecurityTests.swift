import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Claims of docs/SECURITY.md about who can read what, through a real mount.
@Suite("Who can read the mount and the cache directory")
struct SecurityTests {
    /// Without --allow-other only the user who mounted reads the mount: the kernel refuses
    /// everyone else (FUSE's own rule), root included when another user mounted.
    @Test("another user cannot read the mount; the cache directory and its files are private")
    func privateByDefault() async throws {
        try await withWorkspace("private") { ws in
            let runuser = try Harness.tool("runuser", neededFor: "reading as another user")
            let registry = try await ws.startRegistry()
            let summary = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 1 << 20, seed: 97)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"))
            let blob = mount.blobPath(summary.layers[0].digest)
            #expect(FileManager.default.contents(atPath: blob)?.count == Int(summary.layers[0].size))

            // The workspace is root's; `nobody` may traverse to the mountpoint.
            _ = chmod(ws.dir, 0o755)
            for path in [mount.path("index.json"), blob] {
                let read = try await Processes.run(runuser, ["-u", "nobody", "--", "/bin/cat", path], timeout: 30, in: ws)
                #expect(read.status != 0 && read.stderr.contains("Permission denied"), "\(path): \(read)")
            }

            // The cache's directories are 0700 (the directory itself is the user's to choose):
            // a user who could write there could place bytes the mount serves as verified.
            let cache = mount.cacheDir
            for directory in [cache + "/blobs", cache + "/blobs/sha256", cache + "/partial", cache + "/locks"] {
                var info = stat()
                #expect(stat(directory, &info) == 0 && info.st_mode & 0o777 == 0o700, "\(directory): \(String(info.st_mode & 0o777, radix: 8))")
            }
            _ = try await mount.unmount(in: ws)
            _ = chmod(cache, 0o755)
            let complete = cache + "/blobs/sha256/" + summary.layers[0].hex
            #expect(FileManager.default.fileExists(atPath: complete))
            let read = try await Processes.run(runuser, ["-u", "nobody", "--", "/bin/cat", complete], timeout: 30, in: ws)
            #expect(read.status != 0 && read.stderr.contains("Permission denied"), "\(complete): \(read)")
        }
    }
}
