import CacheFS
import ContentCache
import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A tmpfs of a few MiB for a cache directory: real ENOSPC, from the kernel. Needs root, as
/// the whole suite does; a failed mount fails the test.
final class SmallFilesystem {
    let path: String

    init(bytes: Int) throws {
        path = NSTemporaryDirectory() + "small-fs-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let mount = Process()
        mount.executableURL = URL(fileURLWithPath: "/bin/mount")
        mount.arguments = ["-t", "tmpfs", "-o", "size=\(bytes)", "tmpfs", path]
        try mount.run()
        mount.waitUntilExit()
        guard mount.terminationStatus == 0 else {
            throw CocoaError(.fileWriteNoPermission, userInfo: [NSLocalizedDescriptionKey: "cannot mount a tmpfs at \(path) (root needed)"])
        }
    }

    deinit {
        _ = umount2(path, Int32(MNT_DETACH))
        try? FileManager.default.removeItem(atPath: path)
    }

    /// Fills what is left with a file, so that the next write fails with ENOSPC.
    func fill() {
        let fd = open(path + "/filler", O_WRONLY | O_CREAT, 0o600)
        defer { close(fd) }
        let chunk = [UInt8](repeating: 1, count: 64 << 10)
        while chunk.withUnsafeBytes({ write(fd, $0.baseAddress!, $0.count) }) > 0 {}
    }
}

/// Issue 12, defect 5: a full cache directory degrades reads instead of failing them.
@Suite(.serialized) struct FullDiskTests {
    static let limits = CacheLimits(maxBytes: 1 << 30, minFreeBytes: 0)

    /// No room at all, nothing to evict: the blob is read whole through memory, exactly, with
    /// no byte fetched more than twice, and the next blob too.
    @Test func aFullCacheDirectoryServesReadsFromMemory() throws {
        let small = try SmallFilesystem(bytes: 2 << 20)
        let layers = [randomBytes(6 << 20, seed: 90), randomBytes(3 << 20, seed: 91)]
        let fixture = try Fixture(layers: layers, cacheDirectory: small.path + "/cache", limits: Self.limits)
        small.fill()
        for layer in layers {
            let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
            #expect(try fixture.readWhole(inode).get() == layer)
        }
        fixture.fetcher.waitUntilIdle()
        // At most what was in flight when the disk was found full is fetched twice.
        #expect(fixture.source.bytesSent() <= 2 * Int64(layers.map(\.count).reduce(0, +)))
        let store = try ContentStore(directory: fixture.cacheDirectory)
        #expect(store.completeBlobs().isEmpty)
    }

    /// The disk fills during a download that already answered reads: the blocks on disk move
    /// to memory, the reader goes on with the same handle and gets exactly the blob.
    @Test func aDiskThatFillsMidDownloadMovesItToMemory() throws {
        let small = try SmallFilesystem(bytes: 4 << 20)
        let layer = randomBytes(8 << 20, seed: 92)
        let fixture = try Fixture(layers: [layer], cacheDirectory: small.path + "/cache", limits: Self.limits)
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        let handle = try fixture.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get().handle
        var bytes: [UInt8] = []
        while bytes.count < layer.count {
            let piece = try fixture.read(inode, handle: handle, offset: Int64(bytes.count), count: 1 << 20).get()
            #expect(!piece.isEmpty)
            if piece.isEmpty { break }
            bytes += piece
        }
        fixture.filesystem.release(inode, handle: handle)
        #expect(bytes == layer)
        // Half of it could be on disk before it filled; those blocks were copied, not fetched
        // again. Only what was in flight to the full disk is fetched a second time.
        #expect(fixture.source.maximumSendsPerByte() <= 2, "\(fixture.source.requestedRanges)")
    }

    /// A verified blob that nobody reads is evicted to make room, and the new blob is kept.
    @Test func aFullDiskEvictsTheLeastRecentlyUsedBlobAndKeepsTheNewOne() throws {
        let small = try SmallFilesystem(bytes: 4 << 20)
        let layers = [randomBytes(5 << 19, seed: 93), randomBytes(5 << 19, seed: 94)]
        let fixture = try Fixture(layers: layers, cacheDirectory: small.path + "/cache", limits: Self.limits)
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let digests = layers.map { Digest.sha256(of: $0) }
        #expect(try fixture.readWhole(try fixture.inode("blobs/sha256/" + digests[0].hex)).get() == layers[0])
        fixture.fetcher.waitUntilIdle()
        #expect(store.completeBlobs().map(\.digest) == [digests[0]])

        #expect(try fixture.readWhole(try fixture.inode("blobs/sha256/" + digests[1].hex)).get() == layers[1])
        fixture.fetcher.waitUntilIdle()
        #expect(store.completeBlobs().map(\.digest) == [digests[1]])
    }
}
