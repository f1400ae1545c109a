import CacheFS
import ContentCache
import Foundation
import Logging
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Puts a verified blob into the store with a chosen last use.
private func storeBlob(_ store: ContentStore, _ bytes: [UInt8], lastUsed: Int) throws -> Digest {
    let digest = Digest.sha256(of: bytes)
    let path = store.completePath(digest)
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    var times = [timespec(tv_sec: lastUsed, tv_nsec: 0), timespec(tv_sec: lastUsed, tv_nsec: 0)]
    utimensat(AT_FDCWD, path, &times, 0)
    return digest
}

@Suite struct EvictionTests {
    @Test func leastRecentlyUsedBlobsGoFirstUntilTheCapHolds() throws {
        let directory = NSTemporaryDirectory() + "evict-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let old = try storeBlob(store, randomBytes(1000, seed: 1), lastUsed: 1_000)
        let middle = try storeBlob(store, randomBytes(1000, seed: 2), lastUsed: 2_000)
        let recent = try storeBlob(store, randomBytes(1000, seed: 3), lastUsed: 3_000)
        #expect(store.completeBlobs().map(\.digest) == [old, middle, recent])

        let removed = store.evict(toFit: CacheLimits(maxBytes: 2000, minFreeBytes: 0))
        #expect(removed.map(\.digest) == [old])
        #expect(store.completeBlobs().map(\.digest) == [middle, recent])

        // Making room for an incoming blob counts it against the cap.
        #expect(store.evict(toFit: CacheLimits(maxBytes: 2000, minFreeBytes: 0), making: 1000).map(\.digest) == [middle])
    }

    @Test func protectedAndLockedBlobsAreSpared() throws {
        let directory = NSTemporaryDirectory() + "evict-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let pinned = try storeBlob(store, randomBytes(1000, seed: 4), lastUsed: 1_000)
        let beingRead = try storeBlob(store, randomBytes(1000, seed: 5), lastUsed: 2_000)
        let idle = try storeBlob(store, randomBytes(1000, seed: 6), lastUsed: 3_000)

        // A reader elsewhere holds a shared lock, as readers do while they read.
        let reader = open(store.completePath(beingRead), O_RDONLY)
        defer { close(reader) }
        #expect(flock(reader, LOCK_SH) == 0)

        let removed = store.evict(toFit: CacheLimits(maxBytes: 0, minFreeBytes: 0), protected: { $0 == pinned })
        #expect(removed.map(\.digest) == [idle])
        #expect(Set(store.completeBlobs().map(\.digest)) == [pinned, beingRead])
    }

    @Test func theFetcherEvictsTheLeastRecentlyUsedUnpinnedBlobToFitANewOne() throws {
        let layers = (0..<3).map { randomBytes(100_000, seed: UInt64(10 + $0)) }
        let fixture = try Fixture(layers: layers, limits: CacheLimits(maxBytes: 250_000, minFreeBytes: 0))
        defer { fixture.removeCache() }
        let digests = layers.map { Digest.sha256(of: $0) }
        let inodes = try digests.map { try fixture.inode("blobs/sha256/" + $0.hex) }
        let store = try ContentStore(directory: fixture.cacheDirectory)

        for index in 0..<2 { #expect(try fixture.readWhole(inodes[index]).get() == layers[index]) }
        fixture.fetcher.waitUntilIdle()
        // Layer 0 was used before layer 1; layer 1 stays open (pinned) while layer 2 arrives.
        var old = [timespec(tv_sec: 1_000, tv_nsec: 0), timespec(tv_sec: 1_000, tv_nsec: 0)]
        utimensat(AT_FDCWD, store.completePath(digests[0]), &old, 0)
        _ = try fixture.filesystem.open(inodes[1], flags: OpenFlags(O_RDONLY)).get()
        #expect(try fixture.readWhole(inodes[2]).get() == layers[2])
        fixture.filesystem.release(inodes[1])
        fixture.fetcher.waitUntilIdle()

        #expect(Set(store.completeBlobs().map(\.digest)) == [digests[1], digests[2]])
        // An evicted blob is still served: it is fetched again.
        #expect(try fixture.readWhole(inodes[0]).get() == layers[0])
        fixture.fetcher.waitUntilIdle()
        #expect(store.completeBlobs().map(\.size).reduce(0, +) <= 250_000)
    }

    /// A blob larger than the cap is read through memory and never written to the cache.
    @Test func aBlobLargerThanTheCapIsServedFromMemoryAndNotKept() throws {
        let layer = randomBytes(300_000, seed: 20)
        let fixture = try Fixture(layers: [layer], limits: CacheLimits(maxBytes: 100_000, minFreeBytes: 0))
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(try fixture.readWhole(inode).get() == layer)
        fixture.fetcher.waitUntilIdle()
        #expect(store.completeBlobs().isEmpty)
        #expect(store.partialBlobs().isEmpty)
    }

    /// Beyond the memory downloads may take, such a blob is refused before any request.
    @Test func aBlobLargerThanTheCapAndTheMemoryLimitIsRefused() throws {
        let layer = randomBytes(300_000, seed: 21)
        let fixture = try Fixture(layers: [layer], limits: CacheLimits(maxBytes: 100_000, minFreeBytes: 0), memoryLimit: 200_000)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(fixture.read(inode, offset: 0, count: 4096).failure == .ioError)
        #expect(fixture.source.streamsStarted.isEmpty)
    }

    /// A descriptor that declares far more than the remote has (issue 13, item 3): its failed
    /// download evicts none of the cache's verified blobs, and leaves nothing that counts at the
    /// declared size.
    @Test func aLyingSizeEvictsNothing() throws {
        let kept = randomBytes(100_000, seed: 22)
        let lying = randomBytes(50_000, seed: 23)
        let limits = CacheLimits(maxBytes: 1 << 30, minFreeBytes: 0)
        let fixture = try Fixture(layers: [kept, lying], behaviour: .init(declaredSizes: [Digest.sha256(of: lying): 1 << 30 - 1]),
                                  limits: limits)
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        #expect(try fixture.readWhole(try fixture.inode("blobs/sha256/" + Digest.sha256(of: kept).hex)).get() == kept)
        fixture.fetcher.waitUntilIdle()
        #expect(store.completeBlobs().map(\.digest) == [Digest.sha256(of: kept)])

        let lyingInode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: lying).hex)
        #expect(fixture.read(lyingInode, offset: 0, count: 4096).failure == .ioError)
        fixture.fetcher.waitUntilIdle()
        #expect(store.completeBlobs().map(\.digest) == [Digest.sha256(of: kept)])
        #expect(store.partialBlobs().map(\.size).reduce(0, +) < 1 << 20)
    }

    @Test(arguments: [("1024", Int64(1024)), ("10K", 10 << 10), ("500M", 500 << 20), ("2GiB", 2 << 30), ("2gb", 2 << 30),
                      ("1.5G", 3 << 29), ("0", 0), (" 7 ", 7)])
    func sizesParse(_ text: String, _ bytes: Int64) {
        #expect(CacheLimits.parseSize(text) == bytes)
    }

    @Test(arguments: ["", "G", "-1", "ten", "1X", "1e400"])
    func badSizesAreRejected(_ text: String) {
        #expect(CacheLimits.parseSize(text) == nil)
    }
}
