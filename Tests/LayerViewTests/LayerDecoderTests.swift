import Foundation
import LayerView
import Testing

// The codecs of the `layers/` view against real gzip and zstd: whole passes give back the
// input, decoders started at any recorded checkpoint give back the same bytes from there,
// and damaged streams are refused.

/// Runs `tool arguments` with `input` on stdin and returns its stdout; fails the test when the
/// tool is missing or fails.
private func run(_ tool: String, _ arguments: [String], input: [UInt8]) throws -> [UInt8] {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [tool] + arguments
    let stdin = Pipe(), stdout = Pipe()
    process.standardInput = stdin
    process.standardOutput = stdout
    try process.run()
    let writer = Thread {
        stdin.fileHandleForWriting.write(Data(input))
        try? stdin.fileHandleForWriting.close()
    }
    writer.start()
    let output = stdout.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw CodecTestError("\(tool) \(arguments) failed (is it installed?)") }
    return Array(output)
}

struct CodecTestError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Bytes like a layer's: runs of text (compressible, with back references far apart) and of
/// noise, from a seed.
func layerLikeBytes(count: Int, seed: UInt64) -> [UInt8] {
    var state = seed | 1
    func next() -> UInt64 {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return state
    }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(count)
    let words = ["layer", "tar", "usr/lib/", "checkpoint", "\n", "0000644", "ocicachefs ", "zran "]
    while bytes.count < count {
        if next() % 3 == 0 {
            for _ in 0..<Int(next() % 4096) { bytes.append(UInt8(truncatingIfNeeded: next())) }
        } else {
            for _ in 0..<Int(next() % 2048) { bytes += Array(words[Int(next() % UInt64(words.count))].utf8) }
        }
    }
    return Array(bytes.prefix(count))
}

/// Decodes `compressed` whole in pieces of `piece` bytes, recording checkpoints.
func decodeWhole(_ compressed: [UInt8], _ compression: LayerCompression, spacing: Int64,
                 piece: Int = 100_000) throws -> (output: [UInt8], checkpoints: [LayerCheckpoint]) {
    let decoder = try LayerDecoder(compression: compression, recordingEvery: spacing)
    var output: [UInt8] = []
    var position = 0
    while position < compressed.count {
        let end = min(position + piece, compressed.count)
        try compressed[position..<end].withUnsafeBytes { chunk in
            try decoder.feed(chunk, ends: end == compressed.count) { output += $0; return true }
        }
        position = end
    }
    #expect(decoder.compressedPosition == Int64(compressed.count))
    return (output, [.start] + decoder.recorded)
}

/// Decodes `count` bytes at `offset` starting from the checkpoint before it, as a read does.
func decodeRange(_ compressed: [UInt8], _ compression: LayerCompression, checkpoints: [LayerCheckpoint],
                 offset: Int64, count: Int) throws -> [UInt8] {
    let index = LayerIndex(compression: compression, compressedSize: Int64(compressed.count), uncompressedSize: .max,
                           checkpoints: checkpoints)
    let checkpoint = index.checkpoint(before: offset)
    let decoder = try LayerDecoder(compression: compression, from: checkpoint)
    var result: [UInt8] = []
    var position = Int(checkpoint.compressedOffset)
    while result.count < count && position < compressed.count {
        let end = min(position + 50_000, compressed.count)
        try compressed[position..<end].withUnsafeBytes { chunk in
            try decoder.feed(chunk, ends: end == compressed.count) { piece in
                let pieceStart = decoder.uncompressedPosition - Int64(piece.count)
                for (index, byte) in piece.enumerated() {
                    let at = pieceStart + Int64(index)
                    if at >= offset && result.count < count { result.append(byte) }
                }
                return result.count < count
            }
        }
        position = Int(decoder.compressedPosition)
    }
    return result
}

@Suite struct LayerDecoderTests {
    @Test func multiMemberGzipDecodesWholeAndFromEveryCheckpoint() throws {
        let first = layerLikeBytes(count: 1_500_000, seed: 7)
        let second = layerLikeBytes(count: 900_000, seed: 8)
        let compressed = try run("gzip", ["-c", "-6"], input: first) + run("gzip", ["-c", "-1"], input: second)
        let (output, checkpoints) = try decodeWhole(compressed, .gzip, spacing: 100_000)
        #expect(output == first + second)
        #expect(checkpoints.count > 15, "checkpoints about every 100 kB of output")
        #expect(checkpoints.contains { $0.kind == .deflateBlock && $0.bits > 0 }, "some resume mid-byte")
        #expect(checkpoints.contains { $0.kind == .streamStart && $0.uncompressedOffset == Int64(first.count) }
                || checkpoints.contains { $0.uncompressedOffset > Int64(first.count) }, "checkpoints continue into the second member")
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<60 {
            let offset = Int64.random(in: 0..<Int64(output.count), using: &generator)
            let count = Int.random(in: 1...300_000, using: &generator)
            let expected = Array(output[Int(offset)..<min(output.count, Int(offset) + count)])
            #expect(try decodeRange(compressed, .gzip, checkpoints: checkpoints, offset: offset, count: count) == expected,
                    "range at \(offset) of \(count)")
        }
    }

    @Test(arguments: [1, 5])
    func zstdDecodesWholeAndFromFrameStarts(frames: Int) throws {
        var original: [UInt8] = []
        var compressed: [UInt8] = []
        for frame in 0..<frames {
            let part = layerLikeBytes(count: 2_000_000 / frames, seed: UInt64(frame + 20))
            original += part
            compressed += try run("zstd", ["-c", "-q", "-3"], input: part)
        }
        let (output, checkpoints) = try decodeWhole(compressed, .zstd, spacing: 100_000, piece: 77_777)
        #expect(output == original)
        // A frame start is a checkpoint (the last frame's end is the stream's end); inside a
        // frame there are none.
        #expect(checkpoints.filter { $0.uncompressedOffset < Int64(output.count) }.count == frames)
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<30 {
            let offset = Int64.random(in: 0..<Int64(output.count), using: &generator)
            let count = Int.random(in: 1...200_000, using: &generator)
            let expected = Array(output[Int(offset)..<min(output.count, Int(offset) + count)])
            #expect(try decodeRange(compressed, .zstd, checkpoints: checkpoints, offset: offset, count: count) == expected)
        }
    }

    @Test(arguments: [LayerCompression.gzip, .zstd])
    func truncatedStreamsAreRefused(compression: LayerCompression) throws {
        let original = layerLikeBytes(count: 400_000, seed: 3)
        let compressed = try run(compression == .gzip ? "gzip" : "zstd", ["-c"], input: original)
        for cut in [compressed.count - 1, compressed.count - 9, compressed.count / 2, 10] {
            #expect(throws: LayerDecodeError.self, "cut at \(cut)") {
                _ = try decodeWhole(Array(compressed.prefix(cut)), compression, spacing: 100_000)
            }
        }
    }

    @Test(arguments: [LayerCompression.gzip, .zstd])
    func flippedBitsAreRefused(compression: LayerCompression) throws {
        let original = layerLikeBytes(count: 400_000, seed: 4)
        let compressed = try run(compression == .gzip ? "gzip" : "zstd", compression == .gzip ? ["-c"] : ["-c", "--check"], input: original)
        // Headers, data and trailers: every damage is caught by the format's own checks.
        for position in [compressed.count / 3, compressed.count / 2, compressed.count - 3] {
            var damaged = compressed
            damaged[position] ^= 0x10
            #expect(throws: LayerDecodeError.self, "bit flipped at \(position)") {
                let (output, _) = try decodeWhole(damaged, compression, spacing: 100_000)
                // Were it decoded at all, never to the same bytes silently.
                if output != original { throw LayerDecodeError.corrupt("different output") }
            }
        }
    }

    @Test func trailingGarbageIsRefused() throws {
        let compressed = try run("gzip", ["-c"], input: layerLikeBytes(count: 10_000, seed: 5)) + [1, 2, 3]
        #expect(throws: LayerDecodeError.self) { _ = try decodeWhole(compressed, .gzip, spacing: 100_000) }
    }

    /// A table whose checksum holds but whose values cannot be (written on purpose, not by
    /// damage) is refused, not trapped on.
    @Test func aTableWithImpossibleValuesAndAValidChecksumIsRefused() {
        let start = LayerCheckpoint(kind: .streamStart, uncompressedOffset: 0, compressedOffset: 0)
        let header = Int64(LayerIndex.fileHeader.count)
        func parsed(_ index: LayerIndex) -> LayerIndex? {
            LayerIndex(serializedFile: LayerIndex.fileHeader + index.trailer(tableOffset: header))
        }
        #expect(parsed(LayerIndex(compression: .gzip, compressedSize: 10, uncompressedSize: 20, checkpoints: [start])) != nil)
        #expect(parsed(LayerIndex(compression: .gzip, compressedSize: 10, uncompressedSize: -1, checkpoints: [start])) == nil)
        #expect(parsed(LayerIndex(compression: .gzip, compressedSize: -1, uncompressedSize: 20, checkpoints: [start])) == nil)
        let farWindow = LayerCheckpoint(kind: .deflateBlock, uncompressedOffset: 0, compressedOffset: 0,
                                        windowLocation: .init(offset: Int64.max - 10, length: 100, crc: 0))
        #expect(parsed(LayerIndex(compression: .gzip, compressedSize: 10, uncompressedSize: 20, checkpoints: [farWindow])) == nil)
    }

    @Test func indexRoundTripsAndRefusesDamage() throws {
        let compressed = try run("gzip", ["-c"], input: layerLikeBytes(count: 600_000, seed: 6))
        let (output, checkpoints) = try decodeWhole(compressed, .gzip, spacing: 100_000)
        let index = LayerIndex(compression: .gzip, compressedSize: Int64(compressed.count), uncompressedSize: Int64(output.count),
                               checkpoints: checkpoints, keepsSpans: false)
        let bytes = index.serializedFile()
        var parsed = try #require(LayerIndex(serializedFile: bytes))
        #expect(parsed.checkpoints.filter { $0.kind == .deflateBlock }.allSatisfy { $0.windowLocation != nil })
        for position in parsed.checkpoints.indices { parsed.checkpoints[position].windowLocation = nil }
        #expect(parsed == index)
        for position in stride(from: 0, to: bytes.count, by: max(1, bytes.count / 50)) {
            var damaged = bytes
            damaged[position] ^= 1
            #expect(LayerIndex(serializedFile: damaged) == nil, "damage at \(position)")
        }
        #expect(LayerIndex(serializedFile: Array(bytes.dropLast())) == nil)
        #expect(index.checkpoint(before: 0) == .start)
        #expect(index.checkpoint(before: Int64(output.count - 1)) == checkpoints.last)
    }

    @Test func mediaTypes() {
        #expect(LayerCompression(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip") == .gzip)
        #expect(LayerCompression(mediaType: "application/vnd.docker.image.rootfs.diff.tar.gzip") == .gzip)
        #expect(LayerCompression(mediaType: "application/vnd.oci.image.layer.v1.tar+zstd") == .zstd)
        #expect(LayerCompression(mediaType: "application/vnd.oci.image.layer.v1.tar") == LayerCompression.none)
        #expect(LayerCompression(mediaType: "application/vnd.buildkit.cacheconfig.v0") == nil)
        #expect(LayerCompression(mediaType: "application/vnd.oci.image.config.v1+json") == nil)
    }
}
