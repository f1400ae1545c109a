import ContentCache
import Foundation
import Logging
import OCI
import Synchronization
import Testing

struct Refusal: BlobSourceFailure {
    var isTransient: Bool
}

/// Records publications in order; tags may fail.
final class QueueRecordingPublisher: CachePublisher {
    let displayName: String
    let tagsFail: Bool
    private let order = Mutex<[String]>([])

    init(displayName: String = "recording://remote", tagsFail: Bool = false) {
        self.displayName = displayName
        self.tagsFail = tagsFail
    }

    var published: [String] { order.withLock { $0 } }

    func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        guard let bytes = FileManager.default.contents(atPath: path), Digest.sha256(of: Array(bytes)) == digest else {
            throw Refusal(isTransient: false)
        }
        order.withLock { $0.append(digest.hex) }
        return .uploaded(bytes: size)
    }

    func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8], smallBlob: (Digest) -> [UInt8]?) throws {
        if tagsFail { throw Refusal(isTransient: true) }
        order.withLock { $0.append("tag " + tag) }
    }
}

@Suite struct UploadQueueTests {
    let directory = NSTemporaryDirectory() + "upload-queue-" + UUID().uuidString
    let logger = Logger(label: "test")

    func store() throws -> ContentStore { try ContentStore(directory: directory) }

    /// A blob as a commit leaves it: complete in the store.
    func commit(_ bytes: [UInt8], into store: ContentStore) throws -> Descriptor {
        let digest = Digest.sha256(of: bytes)
        try Data(bytes).write(to: URL(fileURLWithPath: store.completePath(digest)))
        return Descriptor(mediaType: "application/octet-stream", digest: digest, size: Int64(bytes.count))
    }

    func queue(_ store: ContentStore, _ publisher: QueueRecordingPublisher, maxAttempts: Int = 3, started: Bool = true) throws -> UploadQueue {
        let queue = try UploadQueue(store: store, publisher: publisher, logger: logger, maxAttempts: maxAttempts,
                                    retryPause: { _ in .milliseconds(1) })
        if started { queue.start() }
        return queue
    }

    func journalEntries() -> [String] {
        let uploads = directory + "/uploads"
        return ((try? FileManager.default.contentsOfDirectory(atPath: uploads)) ?? []).flatMap { journal in
            ((try? FileManager.default.contentsOfDirectory(atPath: uploads + "/" + journal)) ?? []).filter { $0 != "lock" && $0 != "remote" }
        }.sorted()
    }

    @Test func aTagWaitsForEveryBlobItReaches() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let publisher = QueueRecordingPublisher()
        let uploads = try queue(store, publisher)
        defer { uploads.stop() }
        let early = try commit(Array("early".utf8), into: store)
        #expect(try uploads.prepareUpload(early.digest, size: early.size))
        uploads.startUpload(early.digest)
        // The late blob is journaled but its bytes are not in the store yet.
        let lateBytes = Array("late".utf8)
        let late = Descriptor(mediaType: "application/octet-stream", digest: Digest.sha256(of: lateBytes), size: 4)
        #expect(try uploads.prepareUpload(late.digest, size: late.size))
        let manifest = Array(#"{"schemaVersion":2}"#.utf8)
        let manifestDescriptor = Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: manifest), size: Int64(manifest.count))
        try uploads.enqueueTag(TagPublication(tag: "main", manifest: manifestDescriptor, manifestBytes: manifest, smallBlobs: [:],
                                              blobs: [manifestDescriptor, early, late]))
        while publisher.published.isEmpty { usleep(1000) }
        #expect(publisher.published == [early.digest.hex])
        #expect(uploads.changedTags(["main": manifestDescriptor.digest]).isEmpty)

        _ = try commit(lateBytes, into: store)
        uploads.startUpload(late.digest)
        #expect(uploads.drain().isEmpty)
        #expect(publisher.published == [early.digest.hex, late.digest.hex, "tag main"])
        #expect(journalEntries().isEmpty)
    }

    /// The journal is written before a blob's rename: a mount that died in between leaves an
    /// entry without bytes, which the next start drops; blobs whose bytes are there are uploaded.
    @Test func resumingDropsEntriesWhoseBytesNeverReachedTheCache() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let first = try queue(store, QueueRecordingPublisher())
        let lost = Digest.sha256(of: Array("never renamed".utf8))
        #expect(try first.prepareUpload(lost, size: 13))
        let kept = try commit(Array("renamed, not started".utf8), into: store)
        #expect(try first.prepareUpload(kept.digest, size: kept.size))
        #expect(store.isAwaitingUpload(lost) && store.isAwaitingUpload(kept.digest))
        first.stop()

        let publisher = QueueRecordingPublisher()
        let second = try queue(store, publisher, started: false)
        defer { second.stop() }
        #expect(second.pendingBlobs == [kept.digest: kept.size])
        #expect(!store.isAwaitingUpload(lost))
        second.start()
        #expect(second.drain().isEmpty)
        #expect(publisher.published == [kept.digest.hex])
        #expect(journalEntries().isEmpty)
    }

    @Test func aCancelledUploadLeavesNothingJournaled() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let uploads = try queue(store, QueueRecordingPublisher())
        defer { uploads.stop() }
        let digest = Digest.sha256(of: Array("x".utf8))
        #expect(try uploads.prepareUpload(digest, size: 1))
        #expect(try !uploads.prepareUpload(digest, size: 1))
        #expect(journalEntries() == ["blob-" + digest.hex])
        uploads.cancelUpload(digest)
        #expect(journalEntries().isEmpty)
        #expect(uploads.drain().isEmpty)
    }

    @Test func damagedEntriesAreLeftAloneAndTheRestResumed() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let publisher = QueueRecordingPublisher()
        let first = try queue(store, publisher)
        let blob = try commit(Array("blob".utf8), into: store)
        #expect(try first.prepareUpload(blob.digest, size: blob.size))
        first.stop()
        let journal = directory + "/uploads/" + Digest.sha256(of: Array(publisher.displayName.utf8)).hex
        let damagedBlob = journal + "/blob-" + Digest.sha256(of: Array("other".utf8)).hex
        let damagedTag = journal + "/tag-" + Digest.sha256(of: Array("t".utf8)).hex + ".json"
        #expect(FileManager.default.createFile(atPath: damagedBlob, contents: Data("not a size".utf8)))
        #expect(FileManager.default.createFile(atPath: damagedTag, contents: Data("{".utf8)))

        let second = try queue(store, publisher)
        defer { second.stop() }
        #expect(second.drain().isEmpty)
        #expect(publisher.published == [blob.digest.hex])
        #expect(FileManager.default.fileExists(atPath: damagedBlob) && FileManager.default.fileExists(atPath: damagedTag))
    }

    /// A tag whose publication keeps failing is reported, stays journaled, and is shown as
    /// still to publish by the next start.
    @Test func aTagThatCannotBePublishedIsReportedAndKept() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let failing = QueueRecordingPublisher(tagsFail: true)
        let first = try queue(store, failing, maxAttempts: 2)
        let manifest = Array(#"{"schemaVersion":2}"#.utf8)
        let descriptor = Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: manifest), size: Int64(manifest.count))
        try first.enqueueTag(TagPublication(tag: "main", manifest: descriptor, manifestBytes: manifest, smallBlobs: [:], blobs: [descriptor]))
        let unpublished = first.drain()
        #expect(unpublished.count == 1)
        #expect(unpublished.first.map { if case .tag("main", _) = $0 { return true } else { return false } } == true)
        // The remote still points elsewhere: the same tag counts as changed again.
        #expect(first.changedTags(["main": descriptor.digest]) == ["main"])
        first.stop()
        #expect(journalEntries() == ["tag-" + Digest.sha256(of: Array("main".utf8)).hex + ".json"])

        let publisher = QueueRecordingPublisher()
        let second = try queue(store, publisher, started: false)
        defer { second.stop() }
        #expect(second.pendingTags.map(\.manifest.digest) == [descriptor.digest])
        second.start()
        #expect(second.drain().isEmpty)
        #expect(publisher.published == ["tag main"])
        #expect(journalEntries().isEmpty)
    }
}
