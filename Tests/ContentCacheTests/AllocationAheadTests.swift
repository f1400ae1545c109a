@testable import ContentCache
import Foundation
import OCI
import Testing

/// Disk blocks a staged file gets ahead of its writes (`StagedFile.allocateAhead`), and that
/// its commit gives back what it did not use.
@Suite struct StagedFileAllocationTests {
    let directory = NSTemporaryDirectory() + "staged-allocation-" + UUID().uuidString

    private func allocatedBytes(_ path: String) throws -> Int64 {
        var info = stat()
        try #require(stat(path, &info) == 0, "cannot stat \(path)")
        return Int64(info.st_blocks) * 512
    }

    private func write(_ content: [UInt8], to file: StagedFile) throws {
        var done = 0
        while done < content.count {
            let piece = content[done..<min(done + (1 << 20), content.count)]
            try piece.withUnsafeBytes { try file.write($0, at: Int64(done)) }
            done += piece.count
        }
    }

    @Test func aFileWrittenInOrderHasBlocksAheadOfItsEndUntilItsCommit() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let staging = try StagingArea(cacheDirectory: directory)
        let content = (0..<(3 << 20) + 5000).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ ($0 >> 11)) }
        let file = try staging.newFile()
        try write(content, to: file)

        // 1 MiB pieces: at 1, 2 and 3 MiB the window grows to the file's size, so blocks reach 6 MiB.
        let ahead = try allocatedBytes(file.path)
        #expect(ahead >= 6 << 20,
                "\(ahead) bytes allocated for \(content.count) written: nothing ahead (does the test directory's filesystem take fallocate?)")

        let digest = Digest.sha256(of: content)
        try file.whileUnchanging { actual, size throws(CacheError) in
            #expect(actual == digest && size == Int64(content.count))
            try file.moveIntoStore(store, as: digest)
        }
        let committed = store.completePath(digest)
        let kept = try allocatedBytes(committed)
        #expect(kept < Int64(content.count) + (64 << 10), "the committed blob keeps \(kept) bytes of disk for \(content.count)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: committed)) == Data(content))
    }

    /// A write that failed part-way (ENOSPC after some bytes) can leave bytes past the size the
    /// file was verified at: the committed blob is the verified bytes alone.
    @Test func bytesPastTheVerifiedSizeDoNotReachTheCommittedBlob() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let staging = try StagingArea(cacheDirectory: directory)
        let content = Array("the verified bytes".utf8)
        let file = try staging.newFile()
        try content.withUnsafeBytes { try file.write($0, at: 0) }
        // What the failed write left, below the file's own bookkeeping.
        try file.file.write(Array("and some debris".utf8), at: Int64(content.count))
        let digest = Digest.sha256(of: content)
        try file.whileUnchanging { actual, size throws(CacheError) in
            #expect(actual == digest && size == Int64(content.count))
            try file.moveIntoStore(store, as: digest)
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: store.completePath(digest))) == Data(content))
    }

    @Test func aSmallFileIsLeftToDelayedAllocation() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let staging = try StagingArea(cacheDirectory: directory)
        let file = try staging.newFile()
        try write([UInt8](repeating: 1, count: 100_000), to: file)
        #expect(try allocatedBytes(file.path) < 200_000)
    }
}

/// The ranges a fetch allocates ahead: only the blocks it writes itself, never those in its
/// span that are present already or another fetch's.
@Suite struct FetchAllocationRunTests {
    @Test func runsCoverExactlyTheFetchsOwnBlocks() {
        #expect(BlobFetcher.runs(of: [3, 4, 5], within: 3...5) == [3...5])
        #expect(BlobFetcher.runs(of: [3, 5, 6, 9], within: 3...9) == [3...3, 5...6, 9...9])
        #expect(BlobFetcher.runs(of: [4, 5], within: 3...6) == [4...5])
        #expect(BlobFetcher.runs(of: [1, 7], within: 3...6) == [])
        #expect(BlobFetcher.runs(of: [], within: 0...0) == [])
    }
}
