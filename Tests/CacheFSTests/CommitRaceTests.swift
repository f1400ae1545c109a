@testable import CacheFS
import ContentCache
import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A write or truncation that looked a staged file up before its rename into `blobs/sha256`
/// and runs after it (the kernel does not order an open with O_TRUNC, or a write, against a
/// rename of the same file): refused, and the committed blob keeps its bytes.
@Suite struct CommitRaceTests {
    @Test func aChangeLookedUpBeforeTheCommitIsRefusedAfterIt() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let fs = fixture.filesystem
        let bytes = randomBytes(70_000, seed: 91)
        let hex = Digest.sha256(of: bytes).hex
        _ = try client.mkdir("ingest", 0o755)
        let data = try client.open("ingest/data", O_WRONLY | O_CREAT | O_EXCL)
        try client.write(data, bytes, at: 0, "data")
        let ingest = try client.step(client.lookup("ingest"), "ingest").attributes.inode
        // What an open with O_TRUNC, or a write, took from the namespace before the rename.
        let lookedUp = try #require(fs.stagedFile(named: "data", in: ingest))
        let sha256 = try client.step(client.lookup("blobs/sha256"), "sha256").attributes.inode
        try client.step(fs.rename(parent: ingest, name: "data", newParent: sha256, newName: hex), "commit")
        #expect(lookedUp.isCommitted)

        #expect(fs.truncate(lookedUp, to: 0).failure == .noSuchFileOrDirectory, "the truncation of an open with O_TRUNC")
        #expect(throws: CacheError.self, "a write") { try [UInt8(7)].withUnsafeBytes { try lookedUp.write($0, at: 0) } }
        #expect(try client.readFile("blobs/sha256/" + hex) == bytes, "the blob keeps its bytes")
        let committed = try Data(contentsOf: URL(fileURLWithPath: fixture.store.completePath(Digest(hex: hex)!)))
        #expect(committed == Data(bytes), "the cache's copy too")
    }
}
