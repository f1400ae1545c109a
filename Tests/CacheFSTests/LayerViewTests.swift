import CacheFS
import ContentCache
import Foundation
import LayerView
import Logging
import OCI
import Synchronization
import Testing

// The `layers/` view through the core, in process, over the in-memory remote: sizes, reads,
// the index kept in the cache directory, eviction with the blob, and damaged layers.

/// `tool arguments` over `input` (gzip, zstd); fails the test when the tool fails or is missing.
private func compress(_ input: [UInt8], with tool: String, _ arguments: [String]) throws -> [UInt8] {
    let directory = NSTemporaryDirectory() + "layer-input-" + UUID().uuidString
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let inputPath = directory + "/input", outputPath = directory + "/output"
    try Data(input).write(to: URL(fileURLWithPath: inputPath))
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", "\(tool) \(arguments.joined(separator: " ")) < '\(inputPath)' > '\(outputPath)'"]
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw FSError.ioError }
    return try Array(Data(contentsOf: URL(fileURLWithPath: outputPath)))
}

/// Compressible and incompressible runs, like a layer's files.
private func tarLikeBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var bytes: [UInt8] = []
    var part: UInt64 = 0
    while bytes.count < count {
        bytes += part % 2 == 0 ? randomBytes(50_000, seed: seed &+ part) : Array(String(repeating: "layer line \(part)\n", count: 5_000).utf8)
        part += 1
    }
    return Array(bytes.prefix(count))
}

/// Whether `path` exists, once the pass that writes it has had its time: the index is saved
/// after the pass answers (behind the fsync of its spans).
private func appears(_ path: String) -> Bool {
    for _ in 0..<6000 where !FileManager.default.fileExists(atPath: path) { usleep(10_000) }
    return FileManager.default.fileExists(atPath: path)
}

@Suite struct LayerViewTests {
    @Test func aGzipLayerReadsAsItsTarAndItsIndexGoesWithItsBlob() throws {
        let tar = tarLikeBytes(6_000_000, seed: 40)
        let layer = try compress(tar, with: "gzip", ["-c"])
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        let digest = Digest.sha256(of: layer)
        let view = try fixture.inode("layers/sha256/" + digest.hex)
        #expect(try fixture.filesystem.getattr(view).get().attributes.size == Int64(tar.count))
        #expect(try fixture.filesystem.readdir(fixture.inode("layers/sha256")).get().map(\.name) == [".", "..", digest.hex])
        for (offset, count) in [(0, 4096), (3_333_333, 131_072), (Int(tar.count) - 100, 4096), (5_000_000, 1 << 20), (17, 1)] {
            let expected = Array(tar[offset..<min(tar.count, offset + count)])
            #expect(try fixture.read(view, offset: Int64(offset), count: count).get() == expected, "at \(offset)")
        }
        #expect(try fixture.read(view, offset: Int64(tar.count), count: 10).get().isEmpty)

        let indexPath = fixture.cacheDirectory + "/layers/" + digest.hex + ".index"
        let spansPath = fixture.cacheDirectory + "/layers/" + digest.hex + ".spans"
        #expect(appears(indexPath))
        // The pass kept the stream: the reads above copied it, decompressing nothing again.
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: spansPath))) == tar)
        fixture.fetcher.waitUntilIdle()
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let blobBytes = try #require(store.completeBlobs().first { $0.digest == digest }).size
        // The index counts with its blob, and goes with it.
        let removed = store.evict(toFit: CacheLimits(maxBytes: 0, minFreeBytes: 0))
        #expect(removed.map(\.digest).contains(digest))
        #expect(try #require(removed.first { $0.digest == digest }).size >= blobBytes + Int64(tar.count))
        #expect(!FileManager.default.fileExists(atPath: indexPath))
        #expect(!FileManager.default.fileExists(atPath: spansPath))
    }

    @Test func theNextMountReadsTheSavedIndexAndSurvivesADamagedWindow() throws {
        let tar = tarLikeBytes(5_000_000, seed: 43)
        let layer = try compress(tar, with: "gzip", ["-c"])
        let first = try Fixture(layers: [layer])
        defer { first.removeCache() }
        let hex = Digest.sha256(of: layer).hex
        #expect(try first.filesystem.getattr(first.inode("layers/sha256/" + hex)).get().attributes.size == Int64(tar.count))
        first.fetcher.waitUntilIdle()
        let indexPath = first.cacheDirectory + "/layers/" + hex + ".index"
        try #require(appears(indexPath))
        let saved = try Array(Data(contentsOf: URL(fileURLWithPath: indexPath)))
        let index = try #require(LayerIndex(serializedFile: saved))
        #expect(index.uncompressedSize == Int64(tar.count) && index.checkpoints.count >= 2)

        // Another mount of the same cache directory: no pass (the remote is not asked for the
        // blob, which is in the cache), reads from checkpoints, the spans being gone (as when
        // the disk had no room for them).
        let spansPath = first.cacheDirectory + "/layers/" + hex + ".spans"
        #expect(index.keepsSpans && FileManager.default.fileExists(atPath: spansPath))
        try FileManager.default.removeItem(atPath: spansPath)
        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory)
        let view = try second.inode("layers/sha256/" + hex)
        #expect(try second.filesystem.getattr(view).get().attributes.size == Int64(tar.count))
        #expect(second.source.bytesSent() == 0)
        let last = try #require(index.checkpoints.last)
        let at = Int(last.uncompressedOffset) + 10
        #expect(try second.read(view, offset: Int64(at), count: 4096).get() == Array(tar[at..<at + 4096]))

        // A window damaged on disk: the read still gets the right bytes (from the start).
        let location = try #require(last.windowLocation)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: indexPath))
        try handle.seek(toOffset: UInt64(location.offset + 100))
        try handle.write(contentsOf: Data([0xAB, 0xCD]))
        try handle.close()
        let third = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory)
        let thirdView = try third.inode("layers/sha256/" + hex)
        #expect(try third.read(thirdView, offset: Int64(at), count: 4096).get() == Array(tar[at..<at + 4096]))
    }

    /// Sequential readers, random readers and reads past the end all at once, as the kernel's
    /// readahead and several processes send them: every one gets exactly its bytes.
    @Test func manyReadsAtOnceEachGetTheirBytes() throws {
        let first = tarLikeBytes(4_000_000, seed: 44), second = tarLikeBytes(4_500_000, seed: 45)
        let layer = try compress(first, with: "gzip", ["-c", "-1"]) + compress(second, with: "gzip", ["-c", "-9"])
        let tar = first + second
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        // Found by listing, which makes no pass: the reads below wait for the first pass.
        let listing = try fixture.filesystem.readdir(fixture.inode("layers/sha256")).get()
        let view = try #require(listing.first { $0.name == Digest.sha256(of: layer).hex }).inode
        var ranges: [(offset: Int64, count: Int)] = []
        for reader in 0..<3 {
            var offset = Int64(reader) * 2_500_000
            for _ in 0..<40 {
                ranges.append((offset, 131_072))
                offset += 131_072
            }
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<150 {
            ranges.append((Int64.random(in: 0..<Int64(tar.count) + 1000, using: &generator), Int.random(in: 1...(1 << 20), using: &generator)))
        }
        ranges.append((Int64(tar.count) - 10, 4096))
        ranges.shuffle(using: &generator)
        let reads = ranges.map { fixture.startRead(view, offset: $0.offset, count: $0.count) }
        for (range, read) in zip(ranges, reads) {
            read.done.wait()
            let start = min(Int(range.offset), tar.count)
            let expected = Array(tar[start..<min(tar.count, start + range.count)])
            #expect(try read.result?.get() == expected, "read of \(range.count) at \(range.offset)")
        }
    }

    /// A sequential reader's readahead reaches past several checkpoints: decoders start from
    /// each at once (one per core), and every read still gets exactly its bytes.
    @Test func readsPastSeveralCheckpointsAreDecodedInParallel() throws {
        let tar = tarLikeBytes(12_000_000, seed: 46)
        let layer = try compress(tar, with: "gzip", ["-c"])
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        let spec = LayerSpec(digest: Digest.sha256(of: layer), size: Int64(layer.count), compression: .gzip,
                             diffID: Digest.sha256(of: tar))
        let reader = LayerReader(fetcher: fixture.fetcher, logger: Logger(label: "test"), spacing: 1 << 20)
        let index = try reader.index(of: spec).get()
        #expect(index.checkpoints.count >= 6)
        // Without the spans (as when the disk had no room for them), reads decode from checkpoints.
        try FileManager.default.removeItem(atPath: fixture.cacheDirectory + "/layers/" + spec.digest.hex + ".spans")
        let chunk = 1 << 20
        let offsets = Array(stride(from: 0, to: tar.count, by: chunk))
        let answers = Mutex<[Int: [UInt8]]>([:])
        let done = DispatchSemaphore(value: 0)
        for offset in offsets {
            reader.read(spec, offset: Int64(offset), count: chunk) { result in
                if case .success(let bytes) = result { answers.withLock { $0[offset] = Array(bytes) } }
                done.signal()
            }
        }
        for _ in offsets { done.wait() }
        for offset in offsets {
            #expect(answers.withLock { $0[offset] } == Array(tar[offset..<min(tar.count, offset + chunk)]), "at \(offset)")
        }
        #expect(reader.mostDriversAtOnce(of: spec) >= min(2, LayerReader.driversPerLayer))
    }

    /// A layer whose every fetched megabyte inflates to many megabytes has its whole stream
    /// checked against its diffID by the first pass, and a wrong diffID refuses it. The pass's
    /// decoder outruns its output stage (hashing, spans) and stops for its buffers again and
    /// again, over a blob fetched as it goes and over one already in the cache (answered at
    /// once): the spans it keeps are the stream, in order.
    @Test func thePassChecksTheDiffIDOfOutputMuchLargerThanItsInput() throws {
        var tar: [UInt8] = []
        for part in 0..<40 { tar += Array(String(repeating: "line \(part) of a very repetitive layer\n", count: 30_000).utf8) }
        tar += randomBytes(300_000, seed: 47)
        for compression in ["gzip", "zstd"] {
            let layer = try compress(tar, with: compression, ["-c", "-q"])
            #expect(layer.count < tar.count / 20)
            for diffID in [Digest.sha256(of: tar), Digest.sha256(of: Array(tar.dropLast()))] {
                let fixture = try Fixture(layers: [layer], layerMediaType: "application/vnd.oci.image.layer.v1.tar+" + compression)
                defer { fixture.removeCache() }
                let spec = LayerSpec(digest: Digest.sha256(of: layer), size: Int64(layer.count),
                                     compression: compression == "gzip" ? .gzip : .zstd, diffID: diffID)
                let reader = LayerReader(fetcher: fixture.fetcher, logger: Logger(label: "test"))
                switch reader.index(of: spec) {
                case .success(let index):
                    #expect(diffID == Digest.sha256(of: tar), "\(compression): a wrong diffID was accepted")
                    #expect(index.uncompressedSize == Int64(tar.count))
                    let layerFiles = fixture.cacheDirectory + "/layers/" + spec.digest.hex
                    #expect(index.keepsSpans)
                    #expect(try Array(Data(contentsOf: URL(fileURLWithPath: layerFiles + ".spans"))) == tar, "\(compression): spans")
                    // Again, from the blob now in the cache.
                    fixture.fetcher.waitUntilIdle()
                    try FileManager.default.removeItem(atPath: layerFiles + ".spans")
                    try FileManager.default.removeItem(atPath: layerFiles + ".index")
                    let again = try LayerReader(fetcher: fixture.fetcher, logger: Logger(label: "test")).index(of: spec).get()
                    #expect(again.uncompressedSize == Int64(tar.count) && again.keepsSpans)
                    #expect(try Array(Data(contentsOf: URL(fileURLWithPath: layerFiles + ".spans"))) == tar, "\(compression): spans again")
                case .failure(let error):
                    #expect(diffID != Digest.sha256(of: tar), "\(compression): \(error)")
                    #expect("\(error)".contains("diffID"), "\(compression): \(error)")
                }
            }
        }
    }

    @Test func aSingleFrameZstdLayerKeepsItsStreamAsSpans() throws {
        let tar = tarLikeBytes(9_000_000, seed: 41)
        let layer = try compress(tar, with: "zstd", ["-q", "-c"])
        let fixture = try Fixture(layers: [layer], layerMediaType: "application/vnd.oci.image.layer.v1.tar+zstd")
        defer { fixture.removeCache() }
        let digest = Digest.sha256(of: layer)
        let view = try fixture.inode("layers/sha256/" + digest.hex)
        #expect(try fixture.filesystem.getattr(view).get().attributes.size == Int64(tar.count))
        #expect(FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/layers/" + digest.hex + ".spans"))
        for offset in [8_000_000, 0, 4_500_000] {
            #expect(try fixture.read(view, offset: Int64(offset), count: 65_536).get() == Array(tar[offset..<offset + 65_536]))
        }
        // The spans count with their blob and are evicted with it.
        fixture.fetcher.waitUntilIdle()
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let removed = store.evict(toFit: CacheLimits(maxBytes: 0, minFreeBytes: 0))
        #expect(try #require(removed.first { $0.digest == digest }).size >= Int64(layer.count + tar.count))
        #expect(!FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/layers/" + digest.hex + ".spans"))
        #expect(!FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/layers/" + digest.hex + ".index"))
        // Without them, reads decompress from the frame start, fetching the blob again.
        #expect(try fixture.read(view, offset: 7_000_000, count: 65_536).get() == Array(tar[7_000_000..<7_065_536]))
    }

    /// A stream that would not fit in the cache beside its blob is not kept: the layer is read
    /// from its checkpoints.
    @Test func spansBeyondTheCacheSizeAreNotKept() throws {
        let tar = tarLikeBytes(6_000_000, seed: 48)
        let layer = try compress(tar, with: "gzip", ["-c"])
        let fixture = try Fixture(layers: [layer], limits: CacheLimits(maxBytes: Int64(layer.count + tar.count / 2), minFreeBytes: 0))
        defer { fixture.removeCache() }
        let hex = Digest.sha256(of: layer).hex
        let view = try fixture.inode("layers/sha256/" + hex)
        #expect(try fixture.filesystem.getattr(view).get().attributes.size == Int64(tar.count))
        try #require(appears(fixture.cacheDirectory + "/layers/" + hex + ".index"))
        let saved = try Array(Data(contentsOf: URL(fileURLWithPath: fixture.cacheDirectory + "/layers/" + hex + ".index")))
        #expect(try #require(LayerIndex(serializedFile: saved)).keepsSpans == false)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: fixture.cacheDirectory + "/layers")
        #expect(leftovers == [hex + ".index"])
        for offset in [5_000_000, 100, 2_500_000] {
            #expect(try fixture.read(view, offset: Int64(offset), count: 65_536).get() == Array(tar[offset..<offset + 65_536]))
        }
    }

    /// The pass checks every gzip member's CRC and size against its trailer (beside the
    /// decompression, not inside zlib): a layer that inflates cleanly but whose trailer lies is
    /// refused, with no diffID to catch it.
    @Test func aGzipMemberWhoseTrailerLiesIsRefused() throws {
        let first = tarLikeBytes(3_000_000, seed: 49), second = tarLikeBytes(2_000_000, seed: 50)
        let one = try compress(first, with: "gzip", ["-c"]), two = try compress(second, with: "gzip", ["-c"])
        func flipped(_ bytes: [UInt8], at position: Int) -> [UInt8] {
            var bytes = bytes
            bytes[position] ^= 0x01
            return bytes
        }
        let cases = [("intact", one + two), ("the first member's CRC", flipped(one, at: one.count - 8) + two),
                     ("the second member's size", one + flipped(two, at: two.count - 1))]
        for (name, layer) in cases {
            let fixture = try Fixture(layers: [layer])
            defer { fixture.removeCache() }
            let spec = LayerSpec(digest: Digest.sha256(of: layer), size: Int64(layer.count), compression: .gzip, diffID: nil)
            switch LayerReader(fetcher: fixture.fetcher, logger: Logger(label: "test")).index(of: spec) {
            case .success(let index):
                #expect(name == "intact", "\(name): accepted")
                #expect(index.uncompressedSize == Int64(first.count + second.count))
            case .failure(let error):
                #expect(name != "intact", "\(error)")
                #expect("\(error)".contains("CRC or size"), "\(name): \(error)")
            }
        }
    }

    @Test func aDamagedLayerIsAnIOErrorAndListsNothingElse() throws {
        var layer = try compress(tarLikeBytes(1_000_000, seed: 42), with: "gzip", ["-c"])
        layer[layer.count / 2] ^= 0x40
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        let layers = try fixture.inode("layers/sha256")
        let hex = Digest.sha256(of: layer).hex
        #expect(fixture.filesystem.lookup(parent: layers, name: hex) == .failure(.ioError))
        // Tried again on the next use (the remote may be back), refused again.
        #expect(fixture.filesystem.lookup(parent: layers, name: hex) == .failure(.ioError))
        #expect(!FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/layers/" + hex + ".index"))
        // Listing with attributes does not make the pass: the kernel looks up what it stats.
        let listed = try fixture.filesystem.readdirPlus(layers, offset: 0, limit: 10).get()
        #expect(listed.map(\.entry.name) == [".", "..", hex])
        #expect(listed.allSatisfy { $0.attributes == nil })
    }
}
