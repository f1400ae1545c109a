import CacheFS
import ContentCache
import Foundation
import Logging
import OCI
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The export path of a writable mount, replayed as BuildKit's clients perform it, against a
/// publisher double: commits, publication order, refusals, retries, crashes and eviction.
@Suite struct WritableMountTests {
    static func layers(_ sizes: [Int], seed: UInt64) -> [[UInt8]] {
        sizes.enumerated().map { randomBytes($1, seed: seed + UInt64($0)) }
    }

    /// Checks the publisher saw every blob of `cache` exactly once, then the tag, last, with
    /// the manifest's exact bytes and the cache config for remotes that need it.
    static func expectPublished(_ cache: ExportedCache, tag: String, by publisher: PublisherDouble,
                                sourceLocation: SourceLocation = #_sourceLocation) {
        let events = publisher.events
        #expect(Set(publisher.publishedBlobs) == Set(cache.digests), sourceLocation: sourceLocation)
        #expect(publisher.publishedBlobs.count == cache.digests.count, "every blob once", sourceLocation: sourceLocation)
        for case .blob(let digest, let bytes) in events {
            #expect(Digest.sha256(of: bytes) == digest, sourceLocation: sourceLocation)
        }
        guard case .tag(let published, let manifest, let manifestBytes, let small)? = events.last else {
            Issue.record("the tag is not the last publication: \(events)", sourceLocation: sourceLocation)
            return
        }
        #expect(published == tag, sourceLocation: sourceLocation)
        #expect(manifest.digest == cache.manifestDescriptor.digest, sourceLocation: sourceLocation)
        #expect(manifest.size == cache.manifestDescriptor.size, sourceLocation: sourceLocation)
        #expect(manifestBytes == cache.manifest, sourceLocation: sourceLocation)
        #expect(small == [Digest.sha256(of: cache.config): cache.config], sourceLocation: sourceLocation)
        #expect(publisher.publishedTags == [tag], sourceLocation: sourceLocation)
    }

    @Test(arguments: [ExportingClient.Version.v0_32_2, .v0_11_6])
    func aBuildKitExportPublishesEveryBlobOnceAndTheTagLast(_ version: ExportingClient.Version) throws {
        let source = RefusingSource()
        let fixture = try WritableFixture(source: source)
        defer { fixture.removeCache() }
        let cache = ExportedCache(layers: Self.layers([3_000_000, 2_000_000, 1 << 20, 10], seed: 40),
                                  variant: version == .v0_32_2 ? .imageManifest : .index)
        let client = fixture.client

        let outcomes = try client.export(cache, tag: "main", version: version)
        #expect(outcomes == Array(repeating: .written, count: cache.blobs.count))
        #expect(fixture.filesystem.drainUploads().isEmpty)
        Self.expectPublished(cache, tag: "main", by: fixture.publisher)

        // The mount shows what was exported, exactly, read from the local cache.
        for blob in cache.blobs {
            let entry = try client.step(client.lookup("blobs/sha256/" + Digest.sha256(of: blob).hex), "lookup")
            #expect(entry.attributes.size == Int64(blob.count))
            #expect(entry.attributes.permissions == 0o444)
            #expect(try client.readFile("blobs/sha256/" + Digest.sha256(of: blob).hex) == blob)
            #expect(fixture.store.hasComplete(Digest.sha256(of: blob)))
        }
        #expect(source.calls.load(ordering: .relaxed) == 0)
        let index = try client.readFile("index.json")
        #expect(String(decoding: index, as: UTF8.self).contains(cache.manifestDescriptor.digest.description))
        #expect(try client.readFile("oci-layout") == Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8))
        // BuildKit leaves an empty ingest/ behind; nothing else remains of the staging.
        #expect(try fixture.filesystem.readdir(client.step(client.lookup("ingest"), "ingest").attributes.inode).get().count == 2)
        #expect(try fixture.filesystem.readdir(CacheFilesystem.rootInode).get().map(\.name)
            == [".", "..", "blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
        // Nothing is left to upload, and nothing is journaled.
        #expect(fixture.uploads.pendingBlobs.isEmpty && fixture.uploads.pendingTags.isEmpty)
    }

    /// A re-export after a fresh daemon imported the cache: the layers exist (BuildKit stats
    /// them and writes nothing), a new config and manifest are written, and only they and the
    /// tag are published; a re-export of the same manifest publishes nothing at all.
    @Test func aReExportPublishesOnlyWhatChanged() throws {
        let remote = InMemorySource(layers: Self.layers([500_000, 300_000], seed: 50))
        let fixture = try WritableFixture(snapshot: remote.snapshot, source: remote)
        defer { fixture.removeCache() }
        let client = fixture.client
        let cache = ExportedCache(layers: Self.layers([500_000, 300_000], seed: 50), variant: .imageManifest, salt: "second build")

        let outcomes = try client.export(cache, tag: "latest", version: .v0_32_2)
        #expect(outcomes == [.alreadyExists, .alreadyExists, .written, .written])
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.publishedBlobs == [Digest.sha256(of: cache.config), cache.manifestDescriptor.digest])
        #expect(fixture.publisher.publishedTags == ["latest"])
        #expect(remote.requestedRanges.isEmpty)

        let before = fixture.publisher.events.count
        _ = try client.export(cache, tag: "latest", version: .v0_32_2)
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.events.count == before)
    }

    /// Another tag in the same index.json is left alone; a second tag is published on its own.
    @Test func onlyTheChangedTagIsPublished() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let first = ExportedCache(layers: Self.layers([70_000], seed: 60), variant: .imageManifest)
        let second = ExportedCache(layers: Self.layers([80_000], seed: 61), variant: .imageManifest)
        _ = try client.export(first, tag: "one", version: .v0_32_2)
        #expect(fixture.filesystem.drainUploads().isEmpty)
        _ = try client.export(second, tag: "two", version: .v0_32_2)
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.publishedTags == ["one", "two"])
        let index = String(decoding: try client.readFile("index.json"), as: UTF8.self)
        #expect(index.contains(first.manifestDescriptor.digest.description) && index.contains(second.manifestDescriptor.digest.description))
    }

    @Test func contentThatDoesNotMatchItsNameIsRefusedWithEIO() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let bytes = randomBytes(100_000, seed: 70)
        let wrongName = Digest.sha256(of: randomBytes(10, seed: 71)).hex
        try client.writeFile("ingest/data", bytes, flags: O_WRONLY | O_CREAT)
        let ingest = try client.step(client.lookup("ingest"), "ingest").attributes.inode
        let blobs = try client.step(client.lookup("blobs/sha256"), "blobs").attributes.inode

        for name in [wrongName, "not-a-digest", Digest.sha256(of: bytes).hex.uppercased()] {
            #expect(fixture.filesystem.rename(parent: ingest, name: "data", newParent: blobs, newName: name).failure == .ioError)
        }
        // The file stays where it was, whole; blobs/ gained nothing.
        #expect(try client.readFile("ingest/data") == bytes)
        #expect(try fixture.filesystem.readdir(blobs).get().count == 2)
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.events.isEmpty)
        #expect(fixture.store.completeBlobs().isEmpty)

        // Its right name commits it.
        try client.step(fixture.filesystem.rename(parent: ingest, name: "data", newParent: blobs, newName: Digest.sha256(of: bytes).hex), "commit")
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.publishedBlobs == [Digest.sha256(of: bytes)])
    }

    /// Writes out of order, and truncations, are checked by hashing the file at the rename.
    @Test func aBlobWrittenOutOfOrderIsVerifiedWhole() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let bytes = randomBytes(3_000_000, seed: 72)
        let ingest = try client.step(client.lookup("ingest"), "ingest").attributes.inode
        let blobs = try client.step(client.lookup("blobs/sha256"), "blobs").attributes.inode
        let digest = Digest.sha256(of: bytes)

        // Second half first, garbage at the start and past the end, overwritten and cut off.
        let data = try client.open("ingest/data", O_WRONLY | O_CREAT)
        try client.write(data, Array(bytes[1_500_000...]), at: 1_500_000, "second half")
        try client.write(data, randomBytes(1000, seed: 73), at: 0, "garbage")
        try client.write(data, randomBytes(1000, seed: 76), at: 3_000_000, "garbage past the end")
        try client.write(data, Array(bytes[..<1_500_000]), at: 0, "first half")
        _ = try client.step(fixture.filesystem.setattr(data, AttributeChanges(size: 3_000_000)), "truncate")
        try client.step(client.close(data), "close")
        try client.step(fixture.filesystem.rename(parent: ingest, name: "data", newParent: blobs, newName: digest.hex), "commit")

        // The restart case: O_TRUNC-free reopen, ftruncate(0), rewrite in order.
        let other = randomBytes(2_000_000, seed: 74)
        let otherData = try client.open("ingest/other", O_WRONLY | O_CREAT)
        try client.write(otherData, randomBytes(500_000, seed: 75), at: 0, "abandoned attempt")
        _ = try client.step(fixture.filesystem.setattr(otherData, AttributeChanges(size: 0)), "truncate to 0")
        try client.write(otherData, other, at: 0, "rewrite")
        try client.step(client.close(otherData), "close")
        try client.step(fixture.filesystem.rename(parent: ingest, name: "other", newParent: blobs, newName: Digest.sha256(of: other).hex), "commit")

        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(Set(fixture.publisher.publishedBlobs) == [digest, Digest.sha256(of: other)])
        #expect(try client.readFile("blobs/sha256/" + digest.hex) == bytes)
    }

    /// `blobs/` changes only by a commit; its blobs may be chmodded, touched and unlinked.
    @Test func blobsAreImmutableOutsideACommit() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let fs = fixture.filesystem
        let bytes = randomBytes(5000, seed: 80)
        #expect(try client.exportBlob(bytes, version: .v0_32_2) == .written)
        let hex = Digest.sha256(of: bytes).hex
        let blobs = try client.step(client.lookup("blobs"), "blobs").attributes.inode
        let sha256 = try client.step(client.lookup("blobs/sha256"), "sha256").attributes.inode
        let blob = try client.step(client.lookup("blobs/sha256/" + hex), "blob").attributes.inode

        #expect(fs.create(parent: sha256, name: String(repeating: "a", count: 64), permissions: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT)).failure == .notPermitted)
        #expect(fs.create(parent: blobs, name: "sha512", permissions: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT)).failure == .notPermitted)
        #expect(fs.mkdir(parent: blobs, name: "sha512", permissions: 0o755).failure == .notPermitted)
        #expect(fs.mkdir(parent: blobs, name: "sha256", permissions: 0o755).failure == .fileExists)
        #expect(fs.open(blob, flags: OpenFlags(O_WRONLY)).failure == .notPermitted)
        #expect(fs.open(blob, flags: OpenFlags(O_RDWR | O_TRUNC)).failure == .notPermitted)
        #expect(bytes.withUnsafeBytes { fs.write(blob, offset: 0, data: $0) }.failure == .notPermitted)
        #expect(fs.setattr(blob, AttributeChanges(size: 0)).failure == .notPermitted)
        #expect(fs.rename(parent: sha256, name: hex, newParent: CacheFilesystem.rootInode, newName: "stolen").failure == .notPermitted)
        #expect(fs.rmdir(parent: blobs, name: "sha256").failure == .notPermitted)
        #expect(fs.unlink(parent: blobs, name: "sha256").failure == .isDirectory)
        #expect(fs.rmdir(parent: CacheFilesystem.rootInode, name: "blobs").failure == .notPermitted)
        // A directory cannot be committed.
        _ = try client.step(client.mkdir("ingest/dir", 0o755), "mkdir")
        let ingest = try client.step(client.lookup("ingest"), "ingest").attributes.inode
        #expect(fs.rename(parent: ingest, name: "dir", newParent: sha256, newName: String(repeating: "b", count: 64)).failure == .notPermitted)
        // A rename of a blob onto itself changes nothing, as on any filesystem.
        try client.step(fs.rename(parent: sha256, name: hex, newParent: sha256, newName: hex), "rename onto itself")
        #expect(try client.readFile("blobs/sha256/" + hex) == bytes)
        #expect(try fs.getattr(blob).get().attributes.permissions == 0o444)
    }

    /// Two writers of the same content (parallel layers with one digest): the second rename
    /// replaces the first blob's name with identical bytes, and the blob is uploaded once.
    @Test func committingABlobTwiceUploadsItOnce() throws {
        let publisher = PublisherDouble(behaviour: .init(blockBlobs: true))
        let fixture = try WritableFixture(publisher: publisher)
        defer { fixture.removeCache() }
        let client = fixture.client
        let bytes = randomBytes(200_000, seed: 81)
        let digest = Digest.sha256(of: bytes)
        try client.writeFile("ingest/one", bytes, flags: O_WRONLY | O_CREAT)
        try client.writeFile("ingest/two", bytes, flags: O_WRONLY | O_CREAT)
        let ingest = try client.step(client.lookup("ingest"), "ingest").attributes.inode
        let blobs = try client.step(client.lookup("blobs/sha256"), "blobs").attributes.inode
        try client.step(fixture.filesystem.rename(parent: ingest, name: "one", newParent: blobs, newName: digest.hex), "first commit")
        publisher.waitUntilBlocked(1)
        try client.step(fixture.filesystem.rename(parent: ingest, name: "two", newParent: blobs, newName: digest.hex), "second commit")
        publisher.releaseBlocked()
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(publisher.publishedBlobs == [digest])
        #expect(try client.readFile("blobs/sha256/" + digest.hex) == bytes)
        #expect(client.lookup("ingest/one").failure == .noSuchFileOrDirectory)
        #expect(client.lookup("ingest/two").failure == .noSuchFileOrDirectory)
    }

    @Test func anInvalidIndexIsRefusedAtCloseAndNoTagPublished() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let cache = ExportedCache(layers: Self.layers([100_000], seed: 90), variant: .imageManifest)
        _ = try client.exportBlobs(of: cache, version: .v0_32_2)

        let garbage = try client.writeIndex(tag: "main", manifest: cache.manifestDescriptor, version: .v0_32_2) { bytes in
            Array(bytes.dropLast(3))
        }
        #expect(garbage.failure == .ioError)
        let notAnIndex = try client.writeIndex(tag: "main", manifest: cache.manifestDescriptor, version: .v0_32_2) { _ in cache.manifest }
        #expect(notAnIndex.failure == .ioError)
        // BuildKit ignores the close's error: the end of the mount reports it.
        #expect(fixture.filesystem.drainUploads() == [.index(reason: "an image manifest, not an OCI index")])
        #expect(fixture.publisher.publishedTags.isEmpty)
        #expect(fixture.publisher.publishedBlobs.count == cache.blobs.count)

        // A valid one then commits the tag.
        try client.step(client.writeIndex(tag: "main", manifest: cache.manifestDescriptor, version: .v0_32_2), "valid index")
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.publishedTags == ["main"])
    }

    @Test(arguments: ["manifest", "config", "layer", "size"])
    func aTagReachingAMissingBlobIsRefusedAtClose(_ missing: String) throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let cache = ExportedCache(layers: Self.layers([100_000, 50_000], seed: 91), variant: .imageManifest)
        for (index, blob) in cache.blobs.enumerated() {
            let role = index < cache.layers.count ? "layer" : index == cache.layers.count ? "config" : "manifest"
            if role != missing || index == 1 { try client.exportBlob(blob, version: .v0_32_2) }
        }
        var descriptor = cache.manifestDescriptor
        if missing == "size" { descriptor.size += 1 }
        #expect(try client.writeIndex(tag: "main", manifest: descriptor, version: .v0_32_2).failure == .ioError)
        let unpublished = fixture.filesystem.drainUploads()
        #expect(unpublished.count == 1)
        guard case .tag("main", let reason)? = unpublished.first else {
            Issue.record("expected the refused tag to be reported, got \(unpublished)")
            return
        }
        #expect(reason.contains(missing == "size" ? "has" : "neither committed"), "\(reason)")
        #expect(fixture.publisher.publishedTags.isEmpty)
    }

    /// The index variant (BuildKit before v0.21): every manifests[] entry must be in the mount.
    @Test func anIndexVariantReachingAMissingLayerIsRefused() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        let client = fixture.client
        let cache = ExportedCache(layers: Self.layers([10_000, 20_000], seed: 92), variant: .index)
        try client.exportBlob(cache.layers[1], version: .v0_11_6)
        try client.exportBlob(cache.config, version: .v0_11_6)
        try client.exportBlob(cache.manifest, version: .v0_11_6)
        #expect(try client.writeIndex(tag: "main", manifest: cache.manifestDescriptor, version: .v0_11_6).failure == .ioError)
        try client.exportBlob(cache.layers[0], version: .v0_11_6)
        try client.step(client.writeIndex(tag: "main", manifest: cache.manifestDescriptor, version: .v0_11_6), "complete")
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(fixture.publisher.publishedTags == ["main"])
        #expect(fixture.publisher.events.last.map { if case .tag = $0 { return true } else { return false } } == true)
    }

    @Test func transientFailuresAreRetriedABoundedNumberOfTimes() throws {
        let publisher = PublisherDouble(behaviour: .init(transientFailuresPerItem: 2))
        let fixture = try WritableFixture(publisher: publisher, maxAttempts: 3)
        defer { fixture.removeCache() }
        let cache = ExportedCache(layers: Self.layers([200_000, 30_000], seed: 100), variant: .imageManifest)
        _ = try fixture.client.export(cache, tag: "main", version: .v0_32_2)
        #expect(fixture.filesystem.drainUploads().isEmpty)
        Self.expectPublished(cache, tag: "main", by: publisher)
        for digest in cache.digests { #expect(publisher.attempts(digest) == 3) }
        #expect(publisher.attempts(tag: "main") == 3)
    }

    @Test func aBlobThatCannotBePublishedIsReportedAndItsTagNotPublished() throws {
        let publisher = PublisherDouble(behaviour: .init(blobsAlwaysFail: true))
        let fixture = try WritableFixture(publisher: publisher, maxAttempts: 4)
        defer { fixture.removeCache() }
        let cache = ExportedCache(layers: Self.layers([20_000], seed: 101), variant: .imageManifest)
        _ = try fixture.client.export(cache, tag: "main", version: .v0_32_2)

        let unpublished = fixture.filesystem.drainUploads()
        #expect(Set(unpublished.compactMap { if case .blob(let digest, _) = $0 { return digest } else { return nil } }) == Set(cache.digests))
        #expect(unpublished.contains { if case .tag("main", _) = $0 { return true } else { return false } })
        #expect(unpublished.count == cache.digests.count + 1)
        for digest in cache.digests { #expect(publisher.attempts(digest) == 4) }
        #expect(publisher.attempts(tag: "main") == 0)
        #expect(publisher.events.isEmpty)
        // Still journaled and kept: a later mount tries again.
        for digest in cache.digests { #expect(fixture.store.isAwaitingUpload(digest)) }

        // A refusal that is not transient is not tried again.
        let refusing = PublisherDouble(displayName: "double://refusing", behaviour: .init(blobsFailForGood: true))
        let other = try WritableFixture(publisher: refusing)
        defer { other.removeCache() }
        try other.client.exportBlob(randomBytes(100, seed: 102), version: .v0_32_2)
        #expect(other.filesystem.drainUploads().count == 1)
        #expect(refusing.attempts(Digest.sha256(of: randomBytes(100, seed: 102))) == 1)
    }

    @Test func drainReportsWhatIsLeftUntilEverythingIsPublished() throws {
        let publisher = PublisherDouble(behaviour: .init(blockBlobs: true))
        let fixture = try WritableFixture(publisher: publisher)
        defer { fixture.removeCache() }
        let cache = ExportedCache(layers: Self.layers([300_000, 200_000], seed: 103), variant: .imageManifest)
        _ = try fixture.client.export(cache, tag: "main", version: .v0_32_2)
        publisher.waitUntilBlocked(cache.blobs.count)

        let reports = Mutex<[UploadProgress]>([])
        let outcome = Mutex<[UnpublishedItem]?>(nil)
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            let unpublished = fixture.filesystem.drainUploads { progress in reports.withLock { $0.append(progress) } }
            outcome.withLock { $0 = unpublished }
            done.signal()
        }
        while reports.withLock({ $0.isEmpty }) { usleep(1000) }
        #expect(outcome.withLock { $0 } == nil)
        publisher.releaseBlocked()
        done.wait()
        #expect(outcome.withLock { $0 } == [])
        let seen = reports.withLock { $0 }
        #expect(seen.first == UploadProgress(blobsLeft: cache.blobs.count, bytesLeft: Int64(cache.blobs.reduce(0) { $0 + $1.count }), tagsLeft: 1))
        #expect(zip(seen, seen.dropFirst()).allSatisfy { $0.blobsLeft >= $1.blobsLeft && $0.bytesLeft >= $1.bytesLeft })
        Self.expectPublished(cache, tag: "main", by: publisher)
    }

    /// kill -9 in the middle of the uploads: the next mount of the same cache directory shows
    /// the committed blobs and the tag, and publishes them, blobs first, without the client
    /// exporting again.
    @Test func aKilledMountsUploadsAreFinishedByTheNextMount() throws {
        let blocked = PublisherDouble(behaviour: .init(blockBlobs: true))
        let first = try WritableFixture(publisher: blocked)
        defer { first.removeCache() }
        let cache = ExportedCache(layers: Self.layers([1_500_000, 700_000, 300_000], seed: 110), variant: .imageManifest)
        _ = try first.client.export(cache, tag: "main", version: .v0_32_2)
        blocked.waitUntilBlocked(UploadQueue.defaultWorkers)
        first.abandon()

        let publisher = PublisherDouble()
        let second = try WritableFixture(publisher: publisher, cacheDirectory: first.cacheDirectory)
        // The new mount shows what the dead one committed, and the tag it was publishing.
        for blob in cache.blobs {
            #expect(try second.client.readFile("blobs/sha256/" + Digest.sha256(of: blob).hex) == blob)
        }
        #expect(String(decoding: try second.client.readFile("index.json"), as: UTF8.self).contains(cache.manifestDescriptor.digest.description))
        #expect(second.filesystem.drainUploads().isEmpty)
        Self.expectPublished(cache, tag: "main", by: publisher)
        // The dead mount's upload, released now, changes nothing.
        blocked.releaseBlocked()
        #expect(blocked.publishedTags.isEmpty)
        #expect(!cache.digests.contains { second.store.isAwaitingUpload($0) })

        // A third mount has nothing left to do.
        second.abandon()
        let third = try WritableFixture(publisher: PublisherDouble(), cacheDirectory: first.cacheDirectory)
        #expect(third.uploads.pendingBlobs.isEmpty && third.uploads.pendingTags.isEmpty)
        #expect(third.filesystem.drainUploads().isEmpty)
        #expect(third.publisher.events.isEmpty)
    }

    @Test func oneMountAtATimePublishesARemoteFromACacheDirectory() throws {
        let fixture = try WritableFixture()
        defer { fixture.removeCache() }
        #expect(throws: CacheError.self) {
            _ = try UploadQueue(store: fixture.store, publisher: PublisherDouble(), logger: Logger(label: "test"))
        }
        // Another remote may.
        let other = try UploadQueue(store: fixture.store, publisher: PublisherDouble(displayName: "double://other"), logger: Logger(label: "test"))
        other.stop()
    }

    @Test func blobsWaitingForUploadAreNeverEvicted() throws {
        let remoteLayer = randomBytes(200_000, seed: 120)
        let remote = InMemorySource(layers: [remoteLayer])
        let publisher = PublisherDouble(behaviour: .init(blockBlobs: true))
        let limits = CacheLimits(maxBytes: 250_000, minFreeBytes: 0)
        let fixture = try WritableFixture(snapshot: remote.snapshot, source: remote, publisher: publisher, limits: limits)
        defer { fixture.removeCache() }
        let local = Self.layers([200_000, 200_000], seed: 121)
        for blob in local { try fixture.client.exportBlob(blob, version: .v0_32_2) }
        publisher.waitUntilBlocked(2)

        // Reading the remote's layer makes room for it: the pending blobs stay.
        #expect(try fixture.client.readFile("blobs/sha256/" + Digest.sha256(of: remoteLayer).hex) == remoteLayer)
        fixture.fetcher.waitUntilIdle()
        // So does an eviction by another process (the `cache` command) down to nothing.
        fixture.store.evict(toFit: CacheLimits(maxBytes: 0, minFreeBytes: 0))
        for blob in local { #expect(fixture.store.hasComplete(Digest.sha256(of: blob))) }

        publisher.releaseBlocked()
        #expect(fixture.filesystem.drainUploads().isEmpty)
        // Published, they are ordinary cached blobs.
        fixture.store.evict(toFit: limits)
        #expect(fixture.store.completeBlobs().reduce(0) { $0 + $1.size } <= limits.maxBytes)
    }

    /// BuildKit's `reset=true`: unreferenced blobs are unlinked. They leave the mount and the
    /// local cache, a pending one only after its upload; the remote keeps them.
    @Test func anUnlinkedBlobLeavesTheLocalCacheAfterItsUpload() throws {
        let publisher = PublisherDouble(behaviour: .init(blockBlobs: true))
        let fixture = try WritableFixture(publisher: publisher)
        defer { fixture.removeCache() }
        let client = fixture.client
        let pending = randomBytes(10_000, seed: 130)
        try client.exportBlob(pending, version: .v0_32_2)
        let sha256 = try client.step(client.lookup("blobs/sha256"), "sha256").attributes.inode
        publisher.waitUntilBlocked(1)
        try client.step(fixture.filesystem.unlink(parent: sha256, name: Digest.sha256(of: pending).hex), "unlink pending")
        #expect(client.lookup("blobs/sha256/" + Digest.sha256(of: pending).hex).failure == .noSuchFileOrDirectory)
        #expect(fixture.store.hasComplete(Digest.sha256(of: pending)))
        publisher.releaseBlocked()
        #expect(fixture.filesystem.drainUploads().isEmpty)
        #expect(publisher.publishedBlobs == [Digest.sha256(of: pending)])
        #expect(!fixture.store.hasComplete(Digest.sha256(of: pending)))

        let uploaded = randomBytes(10_000, seed: 131)
        try client.exportBlob(uploaded, version: .v0_32_2)
        #expect(fixture.filesystem.drainUploads().isEmpty)
        try client.step(fixture.filesystem.unlink(parent: sha256, name: Digest.sha256(of: uploaded).hex), "unlink uploaded")
        #expect(!fixture.store.hasComplete(Digest.sha256(of: uploaded)))
        #expect(try fixture.filesystem.readdir(sha256).get().count == 2)
    }

    /// A second publication of a tag while the first one waits: the tag ends at the newer one.
    @Test func aNewerTagPublicationReplacesAPendingOne() throws {
        let publisher = PublisherDouble(behaviour: .init(blockBlobs: true))
        let fixture = try WritableFixture(publisher: publisher)
        defer { fixture.removeCache() }
        let older = ExportedCache(layers: Self.layers([30_000], seed: 140), variant: .imageManifest)
        let newer = ExportedCache(layers: Self.layers([40_000], seed: 141), variant: .imageManifest)
        _ = try fixture.client.export(older, tag: "main", version: .v0_32_2)
        _ = try fixture.client.export(newer, tag: "main", version: .v0_32_2)
        #expect(fixture.uploads.pendingTags.map(\.manifest.digest) == [newer.manifestDescriptor.digest])
        publisher.releaseBlocked()
        #expect(fixture.filesystem.drainUploads().isEmpty)
        // The older export's own blobs may still be going up after the tag: a tag waits only
        // for the blobs it reaches.
        let tags = publisher.events.compactMap { event -> Digest? in
            guard case .tag(_, let manifest, _, _) = event else { return nil }
            return manifest.digest
        }
        #expect(tags == [newer.manifestDescriptor.digest], "\(publisher.events)")
    }

    @Test func theStagingAreaOfADeadMountIsRemovedAtTheNextStart() throws {
        let directory = NSTemporaryDirectory() + "staging-test-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let live = try StagingArea(cacheDirectory: directory)
        let file = try live.newFile(holding: [1, 2, 3])
        // What a killed mount leaves: its directory and a lock file nobody holds.
        let dead = directory + "/staging/12345-dead"
        try FileManager.default.createDirectory(atPath: dead + "/sub", withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: dead + "/1", contents: Data([9])))
        #expect(FileManager.default.createFile(atPath: dead + ".lock", contents: nil))
        let orphan = directory + "/staging/12346-orphan"
        try FileManager.default.createDirectory(atPath: orphan, withIntermediateDirectories: true)

        let next = try StagingArea(cacheDirectory: directory)
        #expect(!FileManager.default.fileExists(atPath: dead))
        #expect(!FileManager.default.fileExists(atPath: dead + ".lock"))
        #expect(!FileManager.default.fileExists(atPath: orphan))
        // The live one is untouched.
        #expect(FileManager.default.fileExists(atPath: live.directory))
        #expect(file.size == 3)
        withExtendedLifetime((live, next, file)) {}
    }

    /// Without `writable` the mount stays read-only exactly as before; the commit points answer
    /// success, as the binding did.
    @Test func aReadOnlyMountStaysReadOnly() throws {
        let fixture = try Fixture(layers: [randomBytes(1000, seed: 150)])
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let index = try fixture.inode("index.json")
        #expect(fs.open(index, flags: OpenFlags(O_RDWR)).failure == .readOnlyFileSystem)
        #expect(fs.setattr(index, AttributeChanges(permissions: 0o644)).failure == .readOnlyFileSystem)
        let blobs = try fixture.inode("blobs/sha256")
        #expect(fs.create(parent: blobs, name: "x", permissions: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT)).failure == .readOnlyFileSystem)
        #expect(fs.flush(index).success != nil)
        #expect(fs.fsync(index, dataOnly: false).success != nil)
        #expect(fs.fsyncdir(CacheFilesystem.rootInode, dataOnly: false).success != nil)
        #expect(fs.drainUploads().isEmpty)
    }
}

