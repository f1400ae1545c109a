import ContentCache
import Foundation
import Logging
import OCI
import Synchronization
import Testing

/// What a writable mount of several refs asks of a queue: a tag whose remote lacks some of the
/// blobs it reaches gets them there first, from the local cache or copied from elsewhere.
@Suite struct UploadQueueRoutingTests {
    let directory = NSTemporaryDirectory() + "upload-routing-" + UUID().uuidString
    let logger = Logger(label: "test")

    func manifest(_ text: String) -> (Descriptor, [UInt8]) {
        let bytes = Array(text.utf8)
        return (Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: bytes), size: Int64(bytes.count)), bytes)
    }

    @Test func blobsTheRemoteLacksGoFirstFromTheCacheOrCopiedAndOnlyOnce() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let staging = try StagingArea(cacheDirectory: directory)
        let publisher = QueueRecordingPublisher()
        let uploads = try UploadQueue(store: store, publisher: publisher, logger: logger, maxAttempts: 2, retryPause: { _ in .milliseconds(1) })
        defer { uploads.stop() }
        // In the local cache: committed by this mount for another remote.
        let localBytes = Array("committed here".utf8)
        let local = Descriptor(mediaType: "application/octet-stream", digest: Digest.sha256(of: localBytes), size: Int64(localBytes.count))
        try Data(localBytes).write(to: URL(fileURLWithPath: store.completePath(local.digest)))
        // Only on another remote: copied through the copier.
        let elsewhereBytes = Array("only on the other remote".utf8)
        let elsewhere = Descriptor(mediaType: "application/octet-stream", digest: Digest.sha256(of: elsewhereBytes),
                                   size: Int64(elsewhereBytes.count))
        let copies = Mutex<[Digest]>([])
        uploads.copyMissingBlobs { digest, size in
            copies.withLock { $0.append(digest) }
            let file = try staging.newFile()
            try elsewhereBytes.withUnsafeBytes { bytes in try file.write(bytes, at: 0) }
            return file
        }
        uploads.start()
        let (first, firstBytes) = manifest(#"{"schemaVersion":2,"n":1}"#)
        try Data(firstBytes).write(to: URL(fileURLWithPath: store.completePath(first.digest)))
        try uploads.enqueueTag(TagPublication(tag: "pr-42", manifest: first, manifestBytes: firstBytes, smallBlobs: [:],
                                              blobs: [first, local, elsewhere]),
                               uploadingFirst: [first, local, elsewhere])
        #expect(uploads.drain().isEmpty)
        let published = publisher.published
        #expect(Set(published.dropLast()) == [first.digest.hex, local.digest.hex, elsewhere.digest.hex], "\(published)")
        #expect(published.last == "tag pr-42", "the tag goes last: \(published)")
        #expect(copies.withLock { $0 } == [elsewhere.digest], "only the blob the cache lacks is copied")
        #expect(!store.hasComplete(elsewhere.digest), "a copy is not kept in the cache")

        // The next publication reaching them finds them published: nothing is sent again.
        let (second, secondBytes) = manifest(#"{"schemaVersion":2,"n":2}"#)
        try Data(secondBytes).write(to: URL(fileURLWithPath: store.completePath(second.digest)))
        try uploads.enqueueTag(TagPublication(tag: "pr-42", manifest: second, manifestBytes: secondBytes, smallBlobs: [:],
                                              blobs: [second, local, elsewhere]),
                               uploadingFirst: [second, local, elsewhere])
        #expect(uploads.drain().isEmpty)
        #expect(Array(publisher.published.dropFirst(published.count)) == [second.digest.hex, "tag pr-42"])
    }

    /// A mount killed (or stopped with the upload failed) before a blob shown from another
    /// remote reached this one: the next mount copies it again before the tag, or fails the
    /// tag; it never publishes a tag whose blob the remote lacks.
    @Test(arguments: [true, false])
    func aCopiedBlobLeftInTheJournalStillGoesBeforeItsTag(copiable: Bool) throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let staging = try StagingArea(cacheDirectory: directory)
        let elsewhereBytes = Array("only on the other remote".utf8)
        let elsewhere = Descriptor(mediaType: "application/octet-stream", digest: Digest.sha256(of: elsewhereBytes),
                                   size: Int64(elsewhereBytes.count))
        let (tagged, bytes) = manifest(#"{"schemaVersion":2}"#)
        try Data(bytes).write(to: URL(fileURLWithPath: store.completePath(tagged.digest)))
        let publication = TagPublication(tag: "pr-42", manifest: tagged, manifestBytes: bytes, smallBlobs: [:], blobs: [tagged, elsewhere])
        // The first mount journals the blob and the tag, and never runs them.
        let first = try UploadQueue(store: store, publisher: QueueRecordingPublisher(), logger: logger)
        try first.enqueueTag(publication, uploadingFirst: [tagged, elsewhere])
        first.stop()

        let publisher = QueueRecordingPublisher()
        let second = try UploadQueue(store: store, publisher: publisher, logger: logger, maxAttempts: 2, retryPause: { _ in .milliseconds(1) })
        defer { second.stop() }
        #expect(second.pendingBlobs[elsewhere.digest] == elsewhere.size, "the blob the cache never held is still to publish")
        if copiable {
            second.copyMissingBlobs { _, _ in
                let file = try staging.newFile()
                try elsewhereBytes.withUnsafeBytes { bytes in try file.write(bytes, at: 0) }
                return file
            }
        }
        second.start()
        let unpublished = second.drain()
        if copiable {
            #expect(unpublished.isEmpty, "\(unpublished)")
            #expect(Set(publisher.published.dropLast()) == [tagged.digest.hex, elsewhere.digest.hex])
            #expect(publisher.published.last == "tag pr-42", "the tag goes last: \(publisher.published)")
        } else {
            #expect(!publisher.published.contains("tag pr-42"), "a tag whose blob the remote lacks: \(publisher.published)")
            #expect(unpublished.contains { if case .tag("pr-42", _) = $0 { return true } else { return false } }, "\(unpublished)")
        }
    }

    @Test func aBlobNeitherCachedNorCopiableFailsItsTag() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ContentStore(directory: directory)
        let publisher = QueueRecordingPublisher()
        let uploads = try UploadQueue(store: store, publisher: publisher, logger: logger, maxAttempts: 2, retryPause: { _ in .milliseconds(1) })
        defer { uploads.stop() }
        uploads.start()
        let missing = Descriptor(mediaType: "application/octet-stream", digest: Digest.sha256(of: Array("gone".utf8)), size: 4)
        let (tagged, bytes) = manifest(#"{"schemaVersion":2}"#)
        try Data(bytes).write(to: URL(fileURLWithPath: store.completePath(tagged.digest)))
        try uploads.enqueueTag(TagPublication(tag: "pr-42", manifest: tagged, manifestBytes: bytes, smallBlobs: [:],
                                              blobs: [tagged, missing]), uploadingFirst: [missing])
        let unpublished = uploads.drain()
        #expect(unpublished.contains(.blob(missing.digest, reason: "it is no longer in the local cache \(directory)")), "\(unpublished)")
        #expect(unpublished.contains { if case .tag("pr-42", _) = $0 { return true } else { return false } }, "\(unpublished)")
        #expect(!publisher.published.contains("tag pr-42"))
    }
}

@Suite struct RoutingTests {
    struct NamedSource: BlobSource {
        let name: UInt8
        func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                        onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
            try onStart(0)
            try [name].withUnsafeBytes(onBody)
        }
    }

    func fetch(_ digest: Digest, from source: RoutedBlobSource) throws -> [UInt8] {
        var bytes: [UInt8] = []
        try source.streamBlob(digest, from: 0, onStart: { _ in }, onBody: { bytes += $0 })
        return bytes
    }

    @Test func eachBlobComesFromTheFirstSourceThatListedIt() throws {
        let shared = Digest.sha256(of: Array("shared".utf8))
        let onlySecond = Digest.sha256(of: Array("second".utf8))
        let unknown = Digest.sha256(of: Array("unknown".utf8))
        let routed = RoutedBlobSource(sources: [NamedSource(name: 0), NamedSource(name: 1), NamedSource(name: 2)])
        routed.route([onlySecond, shared], to: 1)
        routed.route([shared], to: 2)
        #expect(try fetch(shared, from: routed) == [1], "the first route stays")
        #expect(try fetch(onlySecond, from: routed) == [1])
        #expect(try fetch(unknown, from: routed) == [0], "a blob nobody listed is asked of the SOURCE")
    }

    @Test func aRenamingPublisherGivesTheRemoteItsOwnTagName() throws {
        let recording = QueueRecordingPublisher()
        let renaming = TagRenamingPublisher(recording, remoteTags: ["pr-42": "cache-pr-42"])
        let digest = Digest.sha256(of: Array("m".utf8))
        let manifest = Descriptor(mediaType: MediaType.ociManifest, digest: digest, size: 1)
        try renaming.publishTag("pr-42", manifest: manifest, manifestBytes: Array("m".utf8), smallBlob: { _ in nil })
        try renaming.publishTag("main", manifest: manifest, manifestBytes: Array("m".utf8), smallBlob: { _ in nil })
        #expect(recording.published == ["tag cache-pr-42", "tag main"])
        #expect(renaming.displayName == recording.displayName)
    }
}
