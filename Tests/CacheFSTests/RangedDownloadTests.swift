import CacheFS
import ContentCache
import Foundation
import OCI
import Synchronization
import Testing

/// Blobs larger than a chunk are fetched as several ranges at once.
@Suite struct RangedDownloadTests {
    static let chunk: Int64 = 256 << 10
    static let tuning = FetchTuning(blockSize: 64 << 10, chunkSize: chunk, initialReadAhead: 64 << 10, maximumReadAhead: 1 << 20)

    @Test func everyRangeIsFetchedOnceAndTheBlobVerifies() throws {
        let layer = randomBytes(3 << 20 + 12_345, seed: 40)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(try fixture.readWhole(inode).get() == layer)
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.maximumSendsPerByte() == 1)
        #expect(fixture.source.bytesSent() == Int64(layer.count))
        // No request crosses a chunk boundary.
        #expect(fixture.source.requestedRanges.allSatisfy { $0.lowerBound / Self.chunk == $0.upperBound / Self.chunk })
        #expect(FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/blobs/sha256/" + Digest.sha256(of: layer).hex))
    }

    @Test func sixtyFourReadersShareTheRanges() throws {
        let layer = randomBytes(2 << 20, seed: 41)
        let fixture = try Fixture(layers: [layer], tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        let results = Mutex<[Int: [UInt8]]>([:])
        DispatchQueue.concurrentPerform(iterations: 64) { reader in
            if case .success(let bytes) = fixture.readWhole(inode, chunk: 64 << 10 + reader * 512) {
                results.withLock { $0[reader] = bytes }
            }
        }
        #expect(results.withLock { $0.count == 64 && $0.values.allSatisfy { $0 == layer } })
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.maximumSendsPerByte() == 1)
    }

    @Test func aLyingRemoteIsCaughtAcrossRanges() throws {
        let layer = randomBytes(1 << 20, seed: 42)
        let digest = Digest.sha256(of: layer)
        var lie = layer
        lie[700_000] ^= 1
        let fixture = try Fixture(layers: [layer], behaviour: .init(substitutes: [digest: lie]), tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + digest.hex)
        #expect(fixture.readWhole(inode).failure == .ioError)
        #expect(!FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/blobs/sha256/" + digest.hex))
    }

    @Test func aRemoteIgnoringRangesIsStreamedInstead() throws {
        let layer = randomBytes(1 << 20, seed: 43)
        let fixture = try Fixture(layers: [layer], behaviour: .init(ignoresRanges: true), tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(try fixture.readWhole(inode).get() == layer)
    }

    @Test func aBrokenRangeResumesWithinItself() throws {
        let layer = randomBytes(1 << 20, seed: 44)
        let fixture = try Fixture(layers: [layer], behaviour: .init(breakNextStreamAfter: 100_000), tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(try fixture.readWhole(inode).get() == layer)
        // One range was cut and continued; no byte was asked for twice.
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.maximumSendsPerByte() == 1)
        #expect(fixture.source.streamsStarted.count == Set(fixture.source.streamsStarted).count)
    }

    @Test func anEarlyRangeIsServedBeforeTheBlobCompletes() throws {
        let layer = randomBytes(2 << 20, seed: 45)
        let fixture = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 128 << 10), tuning: Self.tuning)
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        let tail = fixture.startRead(inode, offset: Int64(layer.count - 10), count: 10)
        // Every range stream holds at 128 KiB until resumed; the end waits for all of them.
        #expect(!tail.wait(seconds: 0.3))
        for _ in 0..<64 { fixture.source.resume() }
        #expect(tail.wait(seconds: 10))
        #expect(try tail.result?.get() == Array(layer[(layer.count - 10)...]))
    }
}
