import CacheFS
import ContentCache
import Foundation
import OCI
import Synchronization
import Testing

/// Issue 12's integrity and hang defects, in process. The kernel's side of them (page cache,
/// `keep_cache`) is tested through a real mount in `IntegrationTests/HostileRemoteTests`.
@Suite struct FetchIntegrityTests {
    static let tuning = FetchTuning(blockSize: 64 << 10, chunkSize: 512 << 10, initialReadAhead: 64 << 10,
                                    maximumReadAhead: 1 << 20, connections: 8)

    func blobInode(_ fixture: Fixture, _ layer: [UInt8]) throws -> UInt64 {
        try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
    }

    /// Defect 1: a handle answered with bytes of a download that then failed its digest fails
    /// from then on, even once the remote tells the truth; the kernel is told to drop its pages;
    /// a new open gets the real blob.
    @Test func aHandleServedBytesOfAFailedDownloadFailsFromThenOn() throws {
        let layer = randomBytes(1 << 20, seed: 120)
        var lie = layer
        for index in 0..<(64 << 10) { lie[index] ^= 0xFF }
        let fixture = try Fixture(layers: [layer], behaviour: .init(substitutes: [Digest.sha256(of: layer): lie]), tuning: Self.tuning)
        defer { fixture.removeCache() }
        let invalidated = Mutex<[UInt64]>([])
        fixture.filesystem.onPageCacheInvalid { inode, _ in invalidated.withLock { $0.append(inode) } }
        let inode = try blobInode(fixture, layer)
        let opened = try fixture.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get()
        #expect(!opened.keepCache, "an unverified blob must not be opened with keep_cache")
        // The start is answered before the blob is verified: with the lie.
        #expect(try fixture.read(inode, handle: opened.handle, offset: 0, count: 4096).get() == Array(lie[0..<4096]))
        #expect(fixture.read(inode, handle: opened.handle, offset: Int64(layer.count - 4096), count: 4096).failure == .ioError)
        #expect(invalidated.withLock { $0 } == [inode])

        fixture.source.update { $0.substitutes = [:] }
        for offset in [0, layer.count / 2, layer.count - 4096] {
            #expect(fixture.read(inode, handle: opened.handle, offset: Int64(offset), count: 4096).failure == .ioError,
                    "the handle that saw the lie must not now see other bytes (offset \(offset))")
        }
        fixture.filesystem.release(inode, handle: opened.handle)

        let fresh = try fixture.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get()
        #expect(try fixture.readWhole(inode, handle: fresh.handle).get() == layer)
        fixture.filesystem.release(inode, handle: fresh.handle)
        let verified = try fixture.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get()
        #expect(verified.keepCache, "a verified blob is opened with keep_cache")
        fixture.filesystem.release(inode, handle: verified.handle)
    }

    /// Defect 1 with zero-message opens (read-only mounts): reads carry no handle and the
    /// kernel keeps pages across opens, so the inode answered with bytes of a download that
    /// then failed its digest is retired: it fails from then on, the kernel is told to drop its
    /// pages and its lookup of the name, and the name leads to a new inode with the real blob.
    @Test func withoutOpensAnInodeServedBytesOfAFailedDownloadIsRetired() throws {
        let layer = randomBytes(1 << 20, seed: 122)
        var lie = layer
        for index in 0..<(64 << 10) { lie[index] ^= 0xFF }
        let digest = Digest.sha256(of: layer)
        let fixture = try Fixture(layers: [layer], behaviour: .init(substitutes: [digest: lie]), tuning: Self.tuning)
        defer { fixture.removeCache() }
        fixture.filesystem.skipOpens()
        let invalidatedPages = Mutex<[UInt64]>([])
        let invalidatedNames = Mutex<[String]>([])
        fixture.filesystem.onPageCacheInvalid { inode, _ in invalidatedPages.withLock { $0.append(inode) } }
        fixture.filesystem.onEntryInvalid { _, name in invalidatedNames.withLock { $0.append(name) } }
        let inode = try blobInode(fixture, layer)
        #expect(fixture.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).failure == .notImplemented)
        #expect(fixture.filesystem.flush(inode).failure == .notImplemented)

        #expect(try fixture.read(inode, offset: 0, count: 4096).get() == Array(lie[0..<4096]))
        #expect(fixture.read(inode, offset: Int64(layer.count - 4096), count: 4096).failure == .ioError)
        #expect(invalidatedPages.withLock { $0 } == [inode])
        #expect(invalidatedNames.withLock { $0 } == [digest.hex])

        fixture.source.update { $0.substitutes = [:] }
        for offset in [0, layer.count / 2, layer.count - 4096] {
            #expect(fixture.read(inode, offset: Int64(offset), count: 4096).failure == .ioError,
                    "the inode that saw the lie must not now see other bytes (offset \(offset))")
        }
        #expect(try fixture.filesystem.getattr(inode).get().attributes.size == Int64(layer.count),
                "the kernel may still stat the retired inode")
        let renewed = try blobInode(fixture, layer)
        #expect(renewed != inode)
        #expect(try fixture.readWhole(renewed).get() == layer)
        // Verified now: no retirement without a failed download.
        #expect(try fixture.read(renewed, offset: 0, count: 4096).get() == Array(layer[0..<4096]))
        #expect(invalidatedNames.withLock { $0 } == [digest.hex])

        // The kernel forgets the retired inode: it goes.
        fixture.filesystem.forget(inode, count: 1)
        #expect(fixture.filesystem.getattr(inode).failure == .noSuchFileOrDirectory)
        #expect(try blobInode(fixture, layer) == renewed)
    }

    /// Defect 1 without the kernel: blocks an earlier process recorded with matching CRCs but
    /// bad from the start. The blob is fetched again from scratch, and the handle that was
    /// answered from the bad blocks fails instead of reading on into the new download.
    @Test func aHandleServedBadBlocksOfAnEarlierProcessFailsWhenTheyAreFound() throws {
        let layer = randomBytes(1 << 20, seed: 121)
        var lie = layer
        for index in 0..<(64 << 10) { lie[index] ^= 0x5A }
        let digest = Digest.sha256(of: layer)
        let first = try Fixture(layers: [layer], behaviour: .init(substitutes: [digest: lie]), tuning: Self.tuning)
        _ = try first.read(try blobInode(first, layer), offset: 0, count: 64 << 10).get()
        first.fetcher.waitUntilIdle()
        first.fetcher.shutdown()

        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory, tuning: Self.tuning)
        defer { second.removeCache() }
        let inode = try blobInode(second, layer)
        let reader = try second.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get()
        #expect(try second.read(inode, handle: reader.handle, offset: 0, count: 4096).get() == Array(lie[0..<4096]))
        #expect(second.read(inode, handle: reader.handle, offset: Int64(layer.count - 4096), count: 4096).failure == .ioError)
        #expect(second.read(inode, handle: reader.handle, offset: 4096, count: 4096).failure == .ioError)
        second.filesystem.release(inode, handle: reader.handle)

        let fresh = try second.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get()
        #expect(try second.readWhole(inode, handle: fresh.handle).get() == layer)
        second.filesystem.release(inode, handle: fresh.handle)
    }

    /// Defect 2: a remote that ignores ranges and breaks every response at the same offset.
    /// The resumed stream started over from byte 0, was taken for "ranges ignored" again and
    /// rescheduled, forever. Now the read ends in EIO after a bounded number of requests.
    @Test func aRemoteIgnoringRangesThatAlwaysBreaksAtOneOffsetEndsTheRead() throws {
        let layer = randomBytes(2 << 20, seed: 122)
        let fixture = try Fixture(layers: [layer], behaviour: .init(breakEveryStreamAt: 1 << 20, ignoresRanges: true),
                                  tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        let pending = fixture.startRead(inode, offset: Int64(layer.count - 4096), count: 4096)
        #expect(pending.wait(seconds: 30), "the read must end")
        #expect(pending.result?.failure == .ioError)
        // The read's four chunk requests each show the remote ignores ranges; each hands its
        // blocks to a stream, which tries a bounded number of times.
        #expect(fixture.source.streamsStarted.count <= 4 + 4 * 3, "requests: \(fixture.source.streamsStarted)")
        // Reads of the part that arrived are answered; nothing loops in the background.
        #expect(try fixture.read(inode, offset: 0, count: 4096).get() == Array(layer[0..<4096]))
        // A job already under way when the read ended may still start its last attempt (on a
        // loaded machine, late): let the count settle, boundedly, then check that it stays.
        var requests = fixture.source.streamsStarted.count
        for _ in 0..<20 {
            Thread.sleep(forTimeInterval: 0.25)
            let now = fixture.source.streamsStarted.count
            if now == requests { break }
            requests = now
        }
        #expect(requests <= 4 + 4 * 3)
        Thread.sleep(forTimeInterval: 1)
        #expect(fixture.source.streamsStarted.count == requests)
    }

    /// Defect 2: whole answers longer or shorter than the descriptor, or a small error page
    /// answered with 200, end the read after a bounded number of requests: with EIO, or with the
    /// blob when the bytes it needs arrived and verify (a longer answer's first bytes).
    @Test(arguments: [1000, -1000, -((1 << 20) - 18)])
    func aWholeAnswerOfTheWrongLengthEndsTheRead(lengthChange: Int) throws {
        let layer = randomBytes(1 << 20, seed: 123)
        let wrong = lengthChange > 0 ? layer + randomBytes(lengthChange, seed: 1) : Array(layer[0..<(layer.count + lengthChange)])
        let fixture = try Fixture(layers: [layer], behaviour: .init(substitutes: [Digest.sha256(of: layer): wrong], ignoresRanges: true),
                                  tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        let result = fixture.readWhole(inode)
        if lengthChange < 0 {
            #expect(result.failure == .ioError)
        } else {
            #expect(result.failure == .ioError || (try? result.get()) == layer)
        }
        #expect(fixture.source.streamsStarted.count <= 2 + 2 * 3, "requests: \(fixture.source.streamsStarted)")
    }

    /// A read waits at most `readStallLimit` while its blob makes no progress at all.
    @Test func aReadThatSeesNoProgressFailsAfterTheBound() throws {
        let layer = randomBytes(1 << 20, seed: 124)
        let fixture = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 0), readStallLimit: .milliseconds(300),
                                  tuning: Self.tuning)
        defer {
            fixture.source.resume()
            fixture.removeCache()
        }
        let pending = fixture.startRead(try blobInode(fixture, layer), offset: 0, count: 4096)
        #expect(pending.wait(seconds: 10))
        #expect(pending.result?.failure == .ioError)
    }

    /// Fetching stops once no reader waits and nobody read the blob for a while: a stream the
    /// reader left does not go on to the blob's end.
    @Test func aStreamNobodyReadsAnyMoreStops() throws {
        let layer = randomBytes(8 << 20, seed: 125)
        let fixture = try Fixture(layers: [layer], behaviour: .init(ignoresRanges: true), unwatchedFetchLimit: .zero,
                                  tuning: Self.tuning)
        defer { fixture.removeCache() }
        // Past the first chunk: the remote's whole answer becomes one stream from byte 0.
        let offset = 1 << 20
        #expect(try fixture.read(try blobInode(fixture, layer), offset: Int64(offset), count: 4096).get() == Array(layer[offset..<(offset + 4096)]))
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.bytesSent() < Int64(layer.count), "sent \(fixture.source.bytesSent()) bytes")
    }
}
