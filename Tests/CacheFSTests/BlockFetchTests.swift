import CacheFS
import ContentCache
import Foundation
import OCI
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct ReadAheadWindowTests {
    static let mebibyte: Int64 = 1 << 20

    @Test func startsSmallAndDoublesAsTheRunConsumesIt() {
        var window = ReadAheadWindow(initial: Self.mebibyte, maximum: 8 * Self.mebibyte, tolerance: 4 * Self.mebibyte)
        var sizes: [Int64] = []
        for index in 0..<20 {
            sizes.append(window.advance(offset: Int64(index) * Self.mebibyte, end: Int64(index + 1) * Self.mebibyte) / Self.mebibyte)
        }
        // The window never reaches further than the run has read, and stops at its maximum.
        let expected: [Int64] = [1, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]
        #expect(sizes == expected)
    }

    @Test func aJumpStartsOverButReorderedNeighboursDoNot() {
        var window = ReadAheadWindow(initial: Self.mebibyte, maximum: 64 * Self.mebibyte, tolerance: 4 * Self.mebibyte)
        _ = window.advance(offset: 0, end: Self.mebibyte)
        _ = window.advance(offset: Self.mebibyte, end: 2 * Self.mebibyte)
        // The kernel's readahead requests may arrive out of order.
        #expect(window.advance(offset: 3 * Self.mebibyte, end: 4 * Self.mebibyte) == 4 * Self.mebibyte)
        #expect(window.advance(offset: 2 * Self.mebibyte, end: 3 * Self.mebibyte) == 4 * Self.mebibyte)
        #expect(window.lastEnd == 4 * Self.mebibyte)
        #expect(window.advance(offset: 500 * Self.mebibyte, end: 501 * Self.mebibyte) == Self.mebibyte)
        #expect(window.runStart == 500 * Self.mebibyte)
        #expect(window.advance(offset: 10 * Self.mebibyte, end: 11 * Self.mebibyte) == Self.mebibyte)
    }
}

/// Issue 4's read path: block fetches scheduled by a read-ahead window, shared across readers
/// and mounts, persisted block by block and checked before use.
@Suite struct BlockFetchTests {
    static let tuning = FetchTuning(blockSize: 64 << 10, chunkSize: 512 << 10, initialReadAhead: 64 << 10,
                                    maximumReadAhead: 1 << 20, connections: 8)

    func blobInode(_ fixture: Fixture, _ layer: [UInt8]) throws -> UInt64 {
        try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
    }

    /// A mount that read the blob's first block and was then stopped, leaving a partial download.
    func stoppedAfterFirstBlock(_ layer: [UInt8]) throws -> Fixture {
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        _ = try fixture.read(try blobInode(fixture, layer), offset: 0, count: 64 << 10).get()
        fixture.fetcher.waitUntilIdle()
        fixture.fetcher.shutdown()
        return fixture
    }

    @Test func aSequentialReadGrowsItsRequestsToWholeChunks() throws {
        let layer = randomBytes(8 << 20, seed: 60)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        #expect(try fixture.readWhole(try blobInode(fixture, layer), chunk: 64 << 10).get() == layer)
        fixture.fetcher.waitUntilIdle()
        let ranges = fixture.source.requestedRanges.sorted { $0.lowerBound < $1.lowerBound }
        let chunk = Self.tuning.chunkSize
        #expect(fixture.source.maximumSendsPerByte() == 1)
        #expect(fixture.source.bytesSent() == Int64(layer.count))
        #expect(ranges.allSatisfy { $0.lowerBound / chunk == $0.upperBound / chunk })
        // Small at first, then whole chunks once the window reaches a chunk.
        #expect(ranges.first!.count == 2 * Int(Self.tuning.blockSize))
        let wholeChunks = ranges.filter { $0.count == Int(chunk) }.count
        #expect(wholeChunks >= 12, "requests: \(ranges.map(\.count))")
    }

    /// While the window is smaller than a chunk it is topped up only once less than half of it
    /// remains ahead: the ramp asks in a few requests, not one block per read.
    @Test func aSequentialRampAsksForItsWindowInFewRequests() throws {
        let layer = randomBytes(4 << 20, seed: 63)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        let block = Int(Self.tuning.blockSize)
        for index in 0..<8 {
            #expect(try fixture.read(inode, offset: Int64(index * block), count: block).get() == Array(layer[(index * block)..<((index + 1) * block)]))
            // Each read finds the fetches the previous one started finished: the requests are
            // the schedule's alone.
            fixture.fetcher.waitUntilIdle()
        }
        let ramp = fixture.source.requestedRanges.filter { $0.lowerBound < 2 * Int64(Self.tuning.chunkSize) }
            .sorted { $0.lowerBound < $1.lowerBound }
        // Windows of 1, 2, 4 and then 8 blocks (a chunk): [0, 2), [2, 4), [4, 8), [8, 11), [11, 16).
        #expect(ramp.map { $0.count / block } == [2, 2, 4, 3, 5], "requests in blocks: \(ramp.map { $0.count / block })")
    }

    /// BuildKit reads a chain's layers whole, base first: a read of a layer fetches every
    /// layer after it in its chain, whole, in chunk-sized requests; their reader then finds
    /// them there, each byte fetched once.
    @Test func readingALayerFetchesTheRestOfItsChainAhead() throws {
        let layers = (0..<3).map { randomBytes(1 << 20, seed: 64 + UInt64($0)) }
        let fixture = try Fixture(layers: layers, tuning: Self.tuning, chained: true)
        defer { fixture.removeCache() }
        let digests = layers.map { Digest.sha256(of: $0) }
        #expect(try fixture.read(try blobInode(fixture, layers[0]), offset: 0, count: 4096).get() == Array(layers[0][0..<4096]))
        fixture.fetcher.waitUntilIdle()
        for index in 1...2 {
            let ranges = fixture.source.requestedRanges(of: digests[index]).sorted { $0.lowerBound < $1.lowerBound }
            #expect(ranges.count == layers[index].count / Int(Self.tuning.chunkSize), "layer \(index): \(ranges)")
            #expect(ranges.allSatisfy { Int64($0.count) <= Self.tuning.chunkSize })
            #expect(zip(ranges, ranges.dropFirst()).allSatisfy { $0.upperBound + 1 == $1.lowerBound }, "layer \(index): \(ranges)")
            #expect(ranges.reduce(0) { $0 + $1.count } == layers[index].count)
        }
        let before = fixture.source.bytesSent()
        for index in 1...2 {
            #expect(try fixture.readWhole(try blobInode(fixture, layers[index]), chunk: 64 << 10).get() == layers[index])
        }
        #expect(fixture.source.bytesSent() == before, "the layers fetched ahead are read without another request")
    }

    /// A layer fetched ahead from a lying remote is discarded unread and nothing of it is kept;
    /// its reader, fetching it again, is never served it whole (EIO at its end); once the
    /// remote tells the truth it is served.
    @Test func aLayerFetchedAheadFromALyingRemoteIsNeverServed() throws {
        let layers = (0..<2).map { randomBytes(1 << 20, seed: 80 + UInt64($0)) }
        let digests = layers.map { Digest.sha256(of: $0) }
        var lie = layers[1]
        lie[lie.count / 3] ^= 0x01
        let fixture = try Fixture(layers: layers, behaviour: .init(substitutes: [digests[1]: lie]), tuning: Self.tuning,
                                  chained: true)
        defer { fixture.removeCache() }
        #expect(try fixture.read(try blobInode(fixture, layers[0]), offset: 0, count: 4096).get() == Array(layers[0][0..<4096]))
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.requestedRanges(of: digests[1]).reduce(0) { $0 + $1.count } == layers[1].count, "fetched ahead whole")
        #expect(!FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/blobs/sha256/" + digests[1].hex))
        let inode = try blobInode(fixture, layers[1])
        #expect(fixture.readWhole(inode, chunk: 64 << 10).failure == .ioError)
        fixture.source.update { $0.substitutes = [:] }
        #expect(try fixture.readWhole(inode, chunk: 64 << 10).get() == layers[1])
    }

    /// What is fetched ahead stays within a quarter of the cache's cap, nearest layer first.
    @Test func theChainAheadStopsAtAQuarterOfTheCacheCap() throws {
        let layers = (0..<3).map { randomBytes(1 << 20, seed: 70 + UInt64($0)) }
        let fixture = try Fixture(layers: layers, limits: CacheLimits(maxBytes: 6 << 20, minFreeBytes: 0), tuning: Self.tuning,
                                  chained: true)
        defer { fixture.removeCache() }
        let digests = layers.map { Digest.sha256(of: $0) }
        #expect(try fixture.read(try blobInode(fixture, layers[0]), offset: 0, count: 4096).get() == Array(layers[0][0..<4096]))
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.requestedRanges(of: digests[1]).reduce(0) { $0 + $1.count } == layers[1].count)
        #expect(fixture.source.requestedRanges(of: digests[2]).isEmpty, "1.5 MiB of room ahead holds one layer of 1 MiB")
    }

    /// A download drops its pages far behind its hash; a reader that far behind gets its bytes
    /// from disk, the same bytes.
    @Test func aReaderFarBehindTheHashReadsTheDroppedPagesFromDisk() throws {
        let layer = randomBytes(4 << 20, seed: 75)
        var tuning = Self.tuning
        tuning.cachedBehindHash = 256 << 10
        let fixture = try Fixture(layers: [layer], tuning: tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        let ahead = try fixture.readWhole(inode, chunk: 64 << 10)
        #expect(try ahead.get() == layer)
        #expect(try fixture.read(inode, offset: 0, count: 1 << 20).get() == Array(layer[0..<(1 << 20)]))
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.bytesSent() == Int64(layer.count), "nothing fetched twice")
    }

    @Test func layersOutsideAChainAreNotFetchedAhead() throws {
        let layers = [randomBytes(1 << 20, seed: 67), randomBytes(1 << 20, seed: 68)]
        let fixture = try Fixture(layers: layers, tuning: Self.tuning)
        defer { fixture.removeCache() }
        #expect(try fixture.readWhole(try blobInode(fixture, layers[0]), chunk: 64 << 10).get() == layers[0])
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.requestedRanges(of: Digest.sha256(of: layers[1])).isEmpty)
    }

    @Test func scatteredReadsFetchLittleMoreThanTheyRead() throws {
        let layer = randomBytes(16 << 20, seed: 61)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        for quarter in 0..<4 {
            let offset = Int64(quarter) * Int64(layer.count) / 4 + 1000
            #expect(try fixture.read(inode, offset: offset, count: 4096).get() == Array(layer[Int(offset)..<Int(offset) + 4096]))
        }
        fixture.fetcher.waitUntilIdle()
        // Each read costs its block and one block of read-ahead, nothing like the 16 MiB blob.
        #expect(fixture.source.bytesSent() == 4 * 2 * Self.tuning.blockSize)
    }

    @Test func aPartialSequentialReadStopsFetchingSoonAfterIt() throws {
        let layer = randomBytes(32 << 20, seed: 62)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        for index in 0..<32 {
            _ = try fixture.read(inode, offset: Int64(index) << 16, count: 64 << 10).get()
        }
        fixture.fetcher.waitUntilIdle()
        // 2 MiB read; the window (at most 1 MiB) and its rounding to a chunk bound the rest.
        let read = Int64(2 << 20)
        #expect(fixture.source.bytesSent() <= read + Self.tuning.maximumReadAhead + Self.tuning.chunkSize)
        #expect(fixture.source.bytesSent() < Int64(layer.count) / 8)
    }

    @Test func sixtyFourReadersOfOneBlobShareEveryBlock() throws {
        let layer = randomBytes(6 << 20 + 777, seed: 64)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try blobInode(fixture, layer)
        let results = Mutex<[Int: [UInt8]]>([:])
        DispatchQueue.concurrentPerform(iterations: 64) { reader in
            // Different chunk sizes and starting points: readers overlap at random.
            let start = Int64(reader % 8) * Int64(layer.count) / 8
            var bytes: [UInt8] = []
            var offset = start
            while offset < Int64(layer.count) {
                guard case .success(let part) = fixture.read(inode, offset: offset, count: 40_000 + reader * 1000) else { return }
                bytes += part
                offset += Int64(part.count)
            }
            results.withLock { $0[reader] = bytes }
        }
        let all = results.withLock { $0 }
        #expect(all.count == 64)
        fixture.fetcher.waitUntilIdle()
        for (reader, bytes) in all {
            let start = Int(Int64(reader % 8) * Int64(layer.count) / 8)
            #expect(bytes == Array(layer[start...]), "reader \(reader)")
        }
        #expect(fixture.source.maximumSendsPerByte() == 1)
        fixture.fetcher.waitUntilIdle()
        #expect(FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/blobs/sha256/" + Digest.sha256(of: layer).hex))
    }

    /// A mount stopped half-way (as by `kill -9`: nothing is cleaned up) leaves its blocks and
    /// journal; the next mount fetches only what is missing and still verifies the whole blob.
    @Test func aStoppedDownloadIsContinuedBlockByBlock() throws {
        let layer = randomBytes(4 << 20, seed: 65)
        let first = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { first.removeCache() }
        let firstInode = try blobInode(first, layer)
        for index in 0..<16 { _ = try first.read(firstInode, offset: Int64(index) << 16, count: 64 << 10).get() }
        first.fetcher.waitUntilIdle()
        let fetchedFirst = first.source.requestedRanges
        let firstEnd = fetchedFirst.map(\.upperBound).max()! + 1
        #expect(firstEnd < Int64(layer.count))
        first.fetcher.shutdown()

        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory, tuning: Self.tuning)
        #expect(try second.readWhole(try blobInode(second, layer)).get() == layer)
        second.fetcher.waitUntilIdle()
        #expect(second.source.requestedRanges.allSatisfy { $0.lowerBound >= firstEnd })
        #expect(second.source.bytesSent() == Int64(layer.count) - firstEnd)
        let hex = Digest.sha256(of: layer).hex
        #expect(FileManager.default.fileExists(atPath: first.cacheDirectory + "/blobs/sha256/" + hex))
        #expect(!FileManager.default.fileExists(atPath: first.cacheDirectory + "/partial/" + hex + ".journal"))
    }

    @Test func aCorruptBlockOnDiskIsDetectedBeforeUseAndFetchedAgain() throws {
        let layer = randomBytes(2 << 20, seed: 66)
        let hex = Digest.sha256(of: layer).hex
        let first = try stoppedAfterFirstBlock(layer)
        defer { first.removeCache() }

        // One byte of the first block changes on disk.
        let partial = open(first.cacheDirectory + "/partial/" + hex, O_RDWR)
        #expect(partial >= 0)
        var byte: UInt8 = layer[100] ^ 0xFF
        #expect(pwrite(partial, &byte, 1, 100) == 1)
        close(partial)

        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory, tuning: Self.tuning)
        let inode = try blobInode(second, layer)
        #expect(try second.read(inode, offset: 0, count: 4096).get() == Array(layer[0..<4096]))
        #expect(second.source.requestedRanges.first?.lowerBound == 0)
        #expect(try second.readWhole(inode).get() == layer)
    }

    @Test func aCorruptJournalHeaderStartsTheBlobAfresh() throws {
        let layer = randomBytes(1 << 20, seed: 67)
        let hex = Digest.sha256(of: layer).hex
        let first = try stoppedAfterFirstBlock(layer)
        defer { first.removeCache() }
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: first.cacheDirectory + "/partial/" + hex + ".journal"))

        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory, tuning: Self.tuning)
        #expect(try second.readWhole(try blobInode(second, layer)).get() == layer)
        second.fetcher.waitUntilIdle()
        #expect(second.source.bytesSent() == Int64(layer.count))
    }

    /// Two mounts on one cache directory, each reading blobs under a shared cap: the cap holds
    /// at the end and the least recently used blobs are the ones gone.
    @Test func theCapHoldsUnderConcurrentMounts() throws {
        let layers = (0..<6).map { randomBytes(300_000, seed: UInt64(70 + $0)) }
        let limits = CacheLimits(maxBytes: 1_000_000, minFreeBytes: 0)
        let first = try Fixture(layers: layers, limits: limits, tuning: Self.tuning)
        defer { first.removeCache() }
        let second = try Fixture(layers: layers, cacheDirectory: first.cacheDirectory, limits: limits, tuning: Self.tuning)
        let store = try ContentStore(directory: first.cacheDirectory)
        // Old blobs first: each mount reads three, one at a time, both at once.
        DispatchQueue.concurrentPerform(iterations: 2) { mount in
            let fixture = mount == 0 ? first : second
            for index in stride(from: mount, to: 6, by: 2) {
                let inode = try! fixture.inode("blobs/sha256/" + Digest.sha256(of: layers[index]).hex)
                #expect(try! fixture.readWhole(inode).get() == layers[index])
                fixture.fetcher.waitUntilIdle()
                let path = store.completePath(Digest.sha256(of: layers[index]))
                var used = [timespec(tv_sec: 1_000 + index, tv_nsec: 0), timespec(tv_sec: 1_000 + index, tv_nsec: 0)]
                utimensat(AT_FDCWD, path, &used, 0)
            }
        }
        let kept = store.completeBlobs() + store.partialBlobs()
        #expect(kept.map(\.size).reduce(0, +) <= limits.maxBytes)
        // The most recently used blob is kept, the least recently used ones are gone.
        let keptDigests = Set(kept.map(\.digest))
        #expect(keptDigests.contains(Digest.sha256(of: layers[5])))
        #expect(!keptDigests.contains(Digest.sha256(of: layers[0])))
        #expect(!keptDigests.contains(Digest.sha256(of: layers[1])))
    }
}
