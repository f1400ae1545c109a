@testable import ContentCache
import Foundation
import Testing

@Suite struct PageAlignedWriterTests {
    private static let page = Int(PageAlignedWriter.pageSize)

    private func withScratchFile(_ body: (OpenFile, String) throws -> Void) throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ocfs-aligned-\(UUID().uuidString)").path
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o600)
        try #require(fd >= 0)
        defer { unlink(path) }
        try body(OpenFile(fd: fd), path)
    }

    private func write(_ bytes: [UInt8], at offset: Int, with writer: inout PageAlignedWriter) throws {
        let failure = bytes.withUnsafeBytes { raw -> CacheError? in
            do throws(CacheError) { try writer.write(raw, at: Int64(offset)) } catch { return error }
            return nil
        }
        if let failure { throw failure }
    }

    private func fileSize(_ path: String) throws -> Int {
        try #require(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int)
    }

    /// Pieces of awkward sizes through a writer holding three pages: the file only ever ends on
    /// a page boundary until the flush, never trails the stream by more than what is held, and
    /// then holds exactly the stream.
    @Test(arguments: [0, 4096 * 3, 1000])
    func writesStopAtPageBoundariesUntilFlushed(start: Int) throws {
        var generator = SystemRandomNumberGenerator()
        let stream = (0..<(5 * Self.page + 777)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let pieceSizes = [1, 100, Self.page - 1, 3, Self.page + 5, 2 * Self.page, 17, 4000, 1, 10_000]
        let capacity = 3 * Self.page
        try withScratchFile { file, path in
            var writer = PageAlignedWriter(file: file, capacity: capacity)
            var position = 0
            var everWritten = false
            for size in pieceSizes where position < stream.count {
                let piece = Array(stream[position..<min(position + size, stream.count)])
                try write(piece, at: start + position, with: &writer)
                position += piece.count
                let written = try fileSize(path)
                let end = start + position
                everWritten = everWritten || written > 0
                #expect(written % Self.page == 0 && written <= end, "after \(position) bytes the file was \(written) bytes long")
                #expect(written == 0 && end - start < capacity || written > end - capacity,
                        "after \(position) bytes the file was \(written) bytes long, more than \(capacity) held")
            }
            try #require(position == stream.count)
            #expect(everWritten)
            try writer.flush()
            #expect(try fileSize(path) == start + stream.count)
            #expect(try file.read(offset: Int64(start), count: stream.count) == stream)
        }
    }

    /// The socket's small pieces are gathered: nothing is written until the writer is full or
    /// flushed, and what continues after a flush lands right behind it.
    @Test func smallPiecesAreGatheredIntoOneWrite() throws {
        try withScratchFile { file, path in
            var writer = PageAlignedWriter(file: file)
            let piece = [UInt8](repeating: 7, count: 16 * 1024)
            for i in 0..<8 { try write(piece, at: i * piece.count, with: &writer) }
            #expect(try fileSize(path) == 0)
            try writer.flush()
            #expect(try fileSize(path) == 8 * piece.count)
            try write([1, 2, 3], at: 8 * piece.count, with: &writer)
            try writer.flush()
            #expect(try file.read(offset: Int64(8 * piece.count), count: 3) == [1, 2, 3])
        }
    }

    /// A piece that does not continue the held bytes lands where it belongs, and so do they.
    @Test func aGapFlushesTheHeldBytesFirst() throws {
        try withScratchFile { file, _ in
            var writer = PageAlignedWriter(file: file)
            let first = [UInt8](repeating: 1, count: 10), second = [UInt8](repeating: 2, count: 10)
            try write(first, at: 0, with: &writer)
            try write(second, at: 100, with: &writer)
            try writer.flush()
            let bytes = try file.read(offset: 0, count: 110)
            #expect(Array(bytes[0..<10]) == first)
            #expect(Array(bytes[10..<100]) == [UInt8](repeating: 0, count: 90))
            #expect(Array(bytes[100..<110]) == second)
        }
    }
}
