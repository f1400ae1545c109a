@testable import ContentCache
import Dispatch
import Foundation
import Logging
import OCI
import Synchronization
import Testing

/// An early upload that keeps what it read from its feed, and how it ended.
private final class RecordingEarlyUpload: EarlyBlobUpload {
    struct State {
        var received: [UInt8] = []
        var failure: String?
        var finishedAs: Digest?
        var abandoned = 0
    }
    let contents: any GrowingBlobContents
    let state = Mutex(State())
    private let ended = DispatchSemaphore(value: 0)

    init(_ contents: any GrowingBlobContents) { self.contents = contents }

    func run() {
        var piece = [UInt8](repeating: 0, count: 300_000)
        do {
            while true {
                let offset = Int64(state.withLock { $0.received.count })
                let got = try piece.withUnsafeMutableBytes { try contents.read(into: $0, at: offset) }
                if got == 0 { break }
                state.withLock { $0.received += piece[..<got] }
            }
        } catch {
            state.withLock { $0.failure = "\(error)" }
        }
        ended.signal()
    }

    func waitForRun() -> Bool {
        defer { ended.signal() }
        return ended.wait(timeout: .now() + .seconds(60)) == .success
    }

    func finish(as digest: Digest, size: Int64) throws -> BlobPublication {
        _ = waitForRun()
        let received = state.withLock { $0.received }
        guard Digest.sha256(of: received) == digest, Int64(received.count) == size else { throw CacheError("other bytes") }
        state.withLock { $0.finishedAs = digest }
        return .uploaded(bytes: size)
    }

    func abandon() {
        _ = waitForRun()
        state.withLock { $0.abandoned += 1 }
    }
}

/// A publisher that takes early uploads and records how each blob was published.
private final class EarlyTakingPublisher: CachePublisher {
    let started = Mutex<[RecordingEarlyUpload]>([])
    let publications = Mutex<[Digest: String]>([:])

    var displayName: String { "early-taking" }

    func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)? {
        let upload = RecordingEarlyUpload(contents)
        started.withLock { $0.append(upload) }
        return upload
    }

    func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        publications.withLock { $0[digest] = "ordinary" }
        return .uploaded(bytes: size)
    }

    func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                     sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication {
        guard let early else { return try publishBlob(digest, size: size, contentsAt: path) }
        let publication = try early.finish(as: digest, size: size)
        publications.withLock { $0[digest] = "early" }
        return publication
    }

    func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8], smallBlob: (Digest) -> [UInt8]?) throws {}
}

/// Staged files feeding uploads that begin before their commit (`UploadQueue.beginEarlyUpload`).
@Suite struct EarlyUploadFeedTests {
    let directory = NSTemporaryDirectory() + "early-feed-" + UUID().uuidString
    let threshold = Int(UploadQueue.earlyUploadThreshold)

    /// A content store, a staging area and a started queue publishing to an `EarlyTakingPublisher`.
    private func startedQueue() throws -> (ContentStore, StagingArea, EarlyTakingPublisher, UploadQueue) {
        let store = try ContentStore(directory: directory)
        let staging = try StagingArea(cacheDirectory: directory)
        let publisher = EarlyTakingPublisher()
        let queue = try UploadQueue(store: store, publisher: publisher, logger: Logger(label: "test"))
        queue.start()
        return (store, staging, publisher, queue)
    }

    private func bytes(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ ($0 >> 13)) }
    }

    /// Writes `bytes` at `offset` in 1 MiB pieces, asking the queue after each, as the mount does.
    private func write(_ bytes: ArraySlice<UInt8>, to file: StagedFile, at offset: Int, queue: UploadQueue) throws {
        var done = 0
        while done < bytes.count {
            let piece = bytes.dropFirst(done).prefix(1 << 20)
            try piece.withUnsafeBytes { try file.write($0, at: Int64(offset + done)) }
            queue.beginEarlyUpload(of: file)
            done += piece.count
        }
    }

    @Test func aFileWrittenInOrderIsReadWhileWrittenAndItsCommitHandsTheUploadToThePublication() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (store, staging, publisher, queue) = try startedQueue()
        defer { queue.stop() }

        let content = bytes(threshold + 3_000_000, seed: 1)
        let digest = Digest.sha256(of: content)
        let file = try staging.newFile()
        try write(content[..<(threshold - 1)], to: file, at: 0, queue: queue)
        #expect(publisher.started.withLock { $0.isEmpty }, "below the threshold nothing starts")
        try write(content[(threshold - 1)...], to: file, at: threshold - 1, queue: queue)
        let upload = try #require(publisher.started.withLock { $0.first })
        #expect(publisher.started.withLock { $0.count } == 1, "one early upload per file")

        let prepared = try file.whileUnchanging { actual, size throws(CacheError) -> Bool in
            #expect(actual == digest)
            let prepared = try queue.prepareUpload(actual, size: size)
            try file.moveIntoStore(store, as: actual)
            return prepared
        }
        #expect(prepared)
        let early = try #require(file.takeEarlyUpload(), "the commit sealed the feed")
        queue.startUpload(digest, sentEarlyBy: early)
        #expect(queue.drain().isEmpty)
        #expect(publisher.publications.withLock { $0 } == [digest: "early"])
        #expect(upload.state.withLock { $0.received } == content, "the feed gave the file's bytes, all of them")
        #expect(upload.state.withLock { $0.abandoned } == 0)
    }

    /// BuildKit writes four layers at once and starts the next four while the first four's
    /// uploads still trail: twice as many early uploads as workers run at once, and a file
    /// asked while none is free begins at a later write, once one ended.
    @Test func twiceTheWorkersBeginEarlyAndTheNextBeginsWhenOneEnds() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (_, staging, publisher, queue) = try startedQueue()
        defer { queue.stop() }
        let limit = 2 * UploadQueue.defaultWorkers
        let content = bytes(threshold, seed: 4)
        let files = try (0...limit).map { _ in try staging.newFile() }
        for file in files { try write(content[...], to: file, at: 0, queue: queue) }
        #expect(publisher.started.withLock { $0.count } == limit)
        #expect(!files[limit].earlyUploadTried, "the file asked while none was free was not claimed")

        files[0].removeName()
        let ended = try #require(publisher.started.withLock { $0.first })
        #expect(ended.waitForRun())
        var begun = false
        for piece in 0..<200 where !begun {
            // The slot frees once the ended upload's thread returns; the file grows in order.
            try write(content[..<(1 << 20)], to: files[limit], at: threshold + piece << 20, queue: queue)
            begun = publisher.started.withLock { $0.count } == limit + 1
            if !begun { usleep(10_000) }
        }
        #expect(begun, "the next file began once a slot was free")
    }

    @Test(arguments: ["written out of order", "truncated", "removed", "refused"])
    func aFileThatWillNotBeCommittedAsStreamedGivesItsUploadUp(_ change: String) async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (_, staging, publisher, queue) = try startedQueue()
        defer { queue.stop() }

        let content = bytes(threshold + 1_000_000, seed: 2)
        let file = try staging.newFile()
        try write(content[...], to: file, at: 0, queue: queue)
        let upload = try #require(publisher.started.withLock { $0.first })
        switch change {
        case "written out of order": try [UInt8(9)].withUnsafeBytes { try file.write($0, at: 5) }
        case "truncated": try file.truncate(to: 1000)
        case "removed": file.removeName()
        default: file.giveUpEarlyUpload("its rename was refused")
        }
        #expect(upload.waitForRun())
        #expect(upload.state.withLock { $0.failure } != nil, "the feed's read failed")
        #expect(await eventually { upload.state.withLock { $0.abandoned } == 1 }, "the queue abandons what it sent")
        #expect(file.takeEarlyUpload() == nil, "nothing for a commit to finish")
    }

    @Test func aReaderWaitsForWritesAndTheCommitsSealEndsItsStreamAtTheFilesSize() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let staging = try StagingArea(cacheDirectory: directory)
        let file = try staging.newFile()
        let content = bytes(1000, seed: 3)
        try content.withUnsafeBytes { try file.write($0, at: 0) }
        let announced = AnnouncedBlob(digest: Digest.sha256(of: content), size: 1000)
        let (feed, early) = try #require(file.attachEarlyUpload(announced: announced) { RecordingEarlyUpload($0) })
        let upload = try #require(early as? RecordingEarlyUpload)
        #expect(feed.announced == announced, "the announcement travels with the feed, unchecked")
        let runner = Thread { upload.run() }
        runner.start()
        // A write wakes the reader; the seal ends its stream at the file's size.
        try content.withUnsafeBytes { try file.write($0, at: 1000) }
        let store = try ContentStore(directory: directory)
        let digest = Digest.sha256(of: content + content)
        try file.whileUnchanging { _, _ throws(CacheError) in try file.moveIntoStore(store, as: digest) }
        #expect(upload.waitForRun())
        #expect(upload.state.withLock { $0.failure } == nil)
        #expect(upload.state.withLock { $0.received } == content + content)
        let committed = try feed.committed()
        #expect(committed.digest == digest && committed.size == 2000, "the digest and size the commit verified")
    }

    private func eventually(_ condition: () -> Bool) async -> Bool {
        for _ in 0..<3000 {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return condition()
    }
}
