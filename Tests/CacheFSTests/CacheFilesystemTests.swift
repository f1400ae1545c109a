import ContentCache
import Foundation
import Logging
import OCI
import RemoteStore
import Synchronization
import SystemSupport
import Testing

@testable import CacheFS

#if canImport(Glibc)
import Glibc
#endif

/// A core over an in-memory remote and a private cache directory.
final class Fixture: Sendable {
    let source: InMemorySource
    let cacheDirectory: String
    let filesystem: CacheFilesystem
    let fetcher: BlobFetcher

    init(layers: [[UInt8]], behaviour: InMemorySource.Behaviour = .init(), cacheDirectory: String? = nil,
         otherProcessStall: Duration = .seconds(60), readStallLimit: Duration? = nil,
         unwatchedFetchLimit: Duration = .seconds(10), commitTiming: CommitTiming = .init(),
         limits: CacheLimits? = nil, tuning: FetchTuning = .init(), memoryLimit: Int64 = 256 << 20,
         chained: Bool = false, layerMediaType: String = "application/vnd.oci.image.layer.v1.tar+gzip") throws {
        source = InMemorySource(layers: layers, behaviour: behaviour, chained: chained, layerMediaType: layerMediaType)
        self.cacheDirectory = cacheDirectory ?? NSTemporaryDirectory() + "cachefs-test-" + UUID().uuidString
        let store = try ContentStore(directory: self.cacheDirectory)
        fetcher = BlobFetcher(store: store, source: source, logger: Logger(label: "test"), maxAttempts: 3,
                              otherProcessStall: otherProcessStall, readStallLimit: readStallLimit,
                              unwatchedFetchLimit: unwatchedFetchLimit, commitTiming: commitTiming, limits: limits, tuning: tuning,
                              memoryLimit: memoryLimit)
        filesystem = CacheFilesystem(snapshot: source.snapshot, fetcher: fetcher, logger: Logger(label: "test"))
    }

    func removeCache() { try? FileManager.default.removeItem(atPath: cacheDirectory) }

    func inode(_ path: String) throws -> UInt64 {
        var inode = CacheFilesystem.rootInode
        for component in path.split(separator: "/") {
            inode = try filesystem.lookup(parent: inode, name: String(component)).get().attributes.inode
        }
        return inode
    }

    func read(_ inode: UInt64, handle: UInt64 = 0, offset: Int64, count: Int) -> Result<[UInt8], FSError> {
        let pending = startRead(inode, handle: handle, offset: offset, count: count)
        pending.done.wait()
        return pending.result!
    }

    /// A read whose answer may come later.
    func startRead(_ inode: UInt64, handle: UInt64 = 0, offset: Int64, count: Int) -> PendingRead {
        let pending = PendingRead()
        filesystem.read(inode, handle: handle, offset: offset, count: count) { result in
            pending.answer.withLock { $0 = result.map { Array($0) } }
            pending.done.signal()
        }
        return pending
    }

    /// Reads a file the way BuildKit's content store does: 1 MiB preads until a short one.
    func readWhole(_ inode: UInt64, handle: UInt64 = 0, chunk: Int = 1 << 20) -> Result<[UInt8], FSError> {
        var bytes: [UInt8] = []
        while true {
            switch read(inode, handle: handle, offset: Int64(bytes.count), count: chunk) {
            case .success(let part):
                bytes += part
                if part.count < chunk { return .success(bytes) }
            case .failure(let error):
                return .failure(error)
            }
        }
    }
}

final class PendingRead: Sendable {
    let answer = Mutex<Result<[UInt8], FSError>?>(nil)
    let done = DispatchSemaphore(value: 0)

    var result: Result<[UInt8], FSError>? { answer.withLock { $0 } }

    /// True once answered within `seconds`.
    func wait(seconds: Double) -> Bool { done.wait(timeout: .now() + seconds) == .success }
}

@Suite struct LayoutTests {
    @Test func showsTheLayoutWithExactSizesBeforeAnyDownload() throws {
        let layers = [randomBytes(3_000_000, seed: 1), randomBytes(10, seed: 2)]
        let fixture = try Fixture(layers: layers)
        defer { fixture.removeCache() }
        let fs = fixture.filesystem

        let rootNames = try fs.readdir(CacheFilesystem.rootInode).get().map(\.name)
        #expect(rootNames == [".", "..", "blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
        let blobNames = Set(try fs.readdir(fixture.inode("blobs/sha256")).get().map(\.name).filter { !$0.hasPrefix(".") })
        let expected = Set(fixture.source.snapshot.smallBlobs.keys.map(\.hex) + fixture.source.snapshot.lazyBlobs.keys.map(\.hex))
        #expect(blobNames == expected)
        for layer in layers {
            let entry = try fs.lookup(parent: fixture.inode("blobs/sha256"), name: Digest.sha256(of: layer).hex).get()
            #expect(entry.attributes.size == Int64(layer.count))
            #expect(entry.attributes.permissions == 0o444)
        }
        #expect(fixture.source.streamsStarted.isEmpty)

        let index = try fixture.readWhole(fixture.inode("index.json")).get()
        let tag = fixture.source.snapshot.tags[0]
        #expect(index == OCILayout.indexFile([tag]))
        let text = String(decoding: index, as: UTF8.self)
        #expect(text.contains(#""org.opencontainers.image.ref.name":"latest""#))
        #expect(text.contains(tag.manifest.digest.description))
        #expect(try fixture.readWhole(fixture.inode("oci-layout")).get() == Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8))
    }

    @Test func unknownNamesAreNotFoundAndFixedFilesAreReadOnly() throws {
        let fixture = try Fixture(layers: [randomBytes(100, seed: 3)])
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let sha256 = try fixture.inode("blobs/sha256")
        #expect(fs.lookup(parent: sha256, name: String(repeating: "0", count: 64)).failure == .noSuchFileOrDirectory)
        #expect(fs.lookup(parent: sha256, name: "..").failure == .noSuchFileOrDirectory)
        #expect(fs.lookup(parent: sha256, name: "not-a-digest").failure == .noSuchFileOrDirectory)

        let index = try fixture.inode("index.json")
        #expect(fs.open(index, flags: OpenFlags(O_WRONLY)).failure == .readOnlyFileSystem)
        #expect(fs.open(index, flags: OpenFlags(O_RDONLY | O_TRUNC)).failure == .readOnlyFileSystem)
        let blob = fixture.source.snapshot.lazyBlobs.keys.first!.hex
        let blobInode = try fixture.inode("blobs/sha256/" + blob)
        #expect(fs.open(blobInode, flags: OpenFlags(O_RDWR)).failure == .readOnlyFileSystem)
        #expect(fs.setattr(blobInode, AttributeChanges(size: 0)).failure == .readOnlyFileSystem)
        #expect(fs.unlink(parent: sha256, name: blob).failure == .readOnlyFileSystem)
        #expect(fs.unlink(parent: CacheFilesystem.rootInode, name: "index.json").failure == .readOnlyFileSystem)
        #expect(fs.create(parent: sha256, name: String(repeating: "a", count: 64), permissions: 0o644,
                          flags: OpenFlags(O_WRONLY | O_CREAT)).failure == .readOnlyFileSystem)
        #expect(fs.mkdir(parent: CacheFilesystem.rootInode, name: "blobs", permissions: 0o755).failure == .fileExists)
        #expect(fs.rename(parent: sha256, name: blob, newParent: CacheFilesystem.rootInode, newName: "x").failure == .readOnlyFileSystem)
        // Only verified bytes may stay in the kernel's page cache across opens.
        #expect(fs.open(blobInode, flags: OpenFlags(O_RDONLY)).success?.keepCache == false)
        #expect(fs.open(index, flags: OpenFlags(O_RDONLY)).success?.keepCache == true)
    }
}

@Suite struct ScratchTests {
    /// buildctl's import: create, flock (kernel-local), read, unlink `index.json.lock`; older
    /// clients `mkdir ingest`; containerd v2 probes fs-verity in a scratch directory.
    @Test func clientsImportWritesSucceedLocally() throws {
        let fixture = try Fixture(layers: [randomBytes(100, seed: 4)])
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let root = CacheFilesystem.rootInode

        let (lock, opened) = try fs.create(parent: root, name: "index.json.lock", permissions: 0o600, flags: OpenFlags(O_RDONLY | O_CREAT)).get()
        #expect(opened.keepCache == false)
        #expect(lock.attributes.size == 0)
        fs.release(lock.attributes.inode)
        try fs.unlink(parent: root, name: "index.json.lock").get()
        #expect(fs.lookup(parent: root, name: "index.json.lock").failure == .noSuchFileOrDirectory)

        #expect(fs.mkdir(parent: root, name: "ingest", permissions: 0o755).failure == .fileExists)

        let probe = try fs.mkdir(parent: root, name: ".fsverity-check-123", permissions: 0o700).get().attributes.inode
        let (supported, _) = try fs.create(parent: probe, name: "supported", permissions: 0o600, flags: OpenFlags(O_WRONLY | O_CREAT)).get()
        let payload: [UInt8] = Array("x".utf8)
        #expect(try payload.withUnsafeBytes { fs.write(supported.attributes.inode, offset: 0, data: $0) }.get() == 1)
        #expect(fs.rmdir(parent: root, name: ".fsverity-check-123").failure == .directoryNotEmpty)
        fs.release(supported.attributes.inode)
        try fs.unlink(parent: probe, name: "supported").get()
        try fs.rmdir(parent: root, name: ".fsverity-check-123").get()
        #expect(try fs.readdir(root).get().map(\.name) == [".", "..", "blobs", "files", "index.json", "ingest", "layers", "oci-layout"])
    }

    @Test func scratchFilesBehaveLikeFiles() throws {
        let fixture = try Fixture(layers: [randomBytes(100, seed: 5)])
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let ingest = try fixture.inode("ingest")
        let directory = try fs.mkdir(parent: ingest, name: "ref-1", permissions: 0o755).get().attributes.inode
        let (file, _) = try fs.create(parent: directory, name: "updatedat.tmp", permissions: 0o644, flags: OpenFlags(O_RDWR | O_CREAT)).get()
        let inode = file.attributes.inode
        _ = try Array("hello world".utf8).withUnsafeBytes { fs.write(inode, offset: 0, data: $0) }.get()
        _ = try Array("HELLO".utf8).withUnsafeBytes { fs.write(inode, offset: 0, data: $0) }.get()
        #expect(try fixture.readWhole(inode).get() == Array("HELLO world".utf8))
        #expect(try fs.setattr(inode, AttributeChanges(size: 5)).get().attributes.size == 5)
        #expect(try fixture.readWhole(inode).get() == Array("HELLO".utf8))
        try fs.rename(parent: directory, name: "updatedat.tmp", newParent: directory, newName: "updatedat").get()
        #expect(try fs.lookup(parent: directory, name: "updatedat").get().attributes.inode == inode)
        #expect(fs.lookup(parent: directory, name: "updatedat.tmp").failure == .noSuchFileOrDirectory)
        #expect(fs.rename(parent: directory, name: "updatedat", newParent: try fixture.inode("blobs/sha256"), newName: "x").failure == .readOnlyFileSystem)
        // An unlinked file stays readable through its open handle.
        try fs.unlink(parent: directory, name: "updatedat").get()
        #expect(try fixture.readWhole(inode).get() == Array("HELLO".utf8))
        fs.release(inode)
        // create and the later lookup each gave the kernel one reference.
        fs.forget(inode, count: 1)
        #expect(fs.getattr(inode).success != nil)
        fs.forget(inode, count: 1)
        #expect(fs.getattr(inode).failure == .noSuchFileOrDirectory)
        #expect(fs.rename(parent: ingest, name: "ref-1", newParent: directory, newName: "inside").failure == .invalidArgument)
    }

    /// The kernel lists a directory a page at a time, each from the offset the last one ended
    /// at: the pages cover it exactly once, in name order, and a change shows in the next listing.
    @Test func directoryPagesCoverEveryEntryOnce() throws {
        let fixture = try Fixture(layers: [randomBytes(100, seed: 6)])
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let ingest = try fixture.inode("ingest")
        let names = (0..<500).map { "file-\($0)" }
        for name in names.shuffled() {
            let (file, _) = try fs.create(parent: ingest, name: name, permissions: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT)).get()
            fs.release(file.attributes.inode)
        }
        func listInPages(of size: Int) throws -> [String] {
            var listed: [String] = []
            while true {
                let page = try fs.readdir(ingest, offset: listed.count, limit: size).get()
                #expect(page.count <= size)
                if page.isEmpty { return listed }
                listed += page.map(\.name)
            }
        }
        let whole = try fs.readdir(ingest).get().map(\.name)
        #expect(whole == [".", ".."] + names.sorted())
        for size in [1, 2, 3, 7, 129] { #expect(try listInPages(of: size) == whole) }

        try fs.unlink(parent: ingest, name: "file-7").get()
        _ = try fs.mkdir(parent: ingest, name: "a-directory", permissions: 0o755).get()
        #expect(try listInPages(of: 64) == [".", "..", "a-directory"] + names.filter { $0 != "file-7" }.sorted())
    }

    @Test func scratchSpaceIsBounded() throws {
        let fixture = try Fixture(layers: [randomBytes(100, seed: 6)])
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let (file, _) = try fs.create(parent: CacheFilesystem.rootInode, name: "big", permissions: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT)).get()
        #expect(fs.setattr(file.attributes.inode, AttributeChanges(size: Int64(fs.scratchCapacity) + 1)).failure == .noSpace)
        let byte: [UInt8] = [1]
        #expect(byte.withUnsafeBytes { fs.write(file.attributes.inode, offset: Int64(fs.scratchCapacity), data: $0) }.failure == .noSpace)

        // Offsets and sizes up to the largest file size the kernel allows, while another scratch
        // file holds bytes: refused, not an overflow.
        let (other, _) = try fs.create(parent: CacheFilesystem.rootInode, name: "small", permissions: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT)).get()
        #expect(byte.withUnsafeBytes { fs.write(other.attributes.inode, offset: 0, data: $0) }.success == 1)
        #expect(byte.withUnsafeBytes { fs.write(file.attributes.inode, offset: Int64.max - 1, data: $0) }.failure == .noSpace)
        #expect(byte.withUnsafeBytes { fs.write(file.attributes.inode, offset: Int64.max, data: $0) }.failure == .noSpace)
        #expect(fs.setattr(file.attributes.inode, AttributeChanges(size: Int64.max)).failure == .noSpace)
        #expect(byte.withUnsafeBytes { fs.write(file.attributes.inode, offset: 0, data: $0) }.success == 1, "the area still takes what fits")
    }
}

@Suite struct LazyReadTests {
    @Test func buildctlChunkPatternReadsTheRightBytesFetchingEachOnce() throws {
        let layer = randomBytes(5 * (1 << 20) + 123, seed: 7)
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        for _ in 0..<2 {
            var bytes: [UInt8] = []
            while true {
                _ = try fixture.filesystem.open(inode, flags: OpenFlags(O_RDONLY)).get()
                let part = try fixture.read(inode, offset: Int64(bytes.count), count: 1 << 20).get()
                fixture.filesystem.release(inode)
                bytes += part
                if part.isEmpty { break }
            }
            #expect(bytes == layer)
        }
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.maximumSendsPerByte() == 1)
        #expect(fixture.source.bytesSent() == Int64(layer.count))
        fixture.fetcher.waitUntilIdle()
        #expect(FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/blobs/sha256/" + Digest.sha256(of: layer).hex))
    }

    @Test func sixtyFourConcurrentReadersShareOneDownload() throws {
        let layer = randomBytes(4 << 20, seed: 8)
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        let results = Mutex<[Int: [UInt8]]>([:])
        DispatchQueue.concurrentPerform(iterations: 64) { reader in
            if case .success(let bytes) = fixture.readWhole(inode, chunk: 128 << 10 + reader * 4096) {
                results.withLock { $0[reader] = bytes }
            }
        }
        let all = results.withLock { $0 }
        #expect(all.count == 64)
        #expect(all.values.allSatisfy { $0 == layer })
        fixture.fetcher.waitUntilIdle()
        #expect(fixture.source.maximumSendsPerByte() == 1)
    }

    /// Committing forces the blob's pages to disk, so it waits for reading to pause; the verified
    /// blob is served from its partial file meanwhile.
    @Test func aVerifiedBlobIsCommittedOnlyWhenAsked() throws {
        let layer = randomBytes(3 << 20, seed: 21)
        let never = CommitTiming(quietPeriod: .seconds(3600), delayLimit: .seconds(3600))
        let fixture = try Fixture(layers: [layer], commitTiming: never)
        defer { fixture.removeCache() }
        let hex = Digest.sha256(of: layer).hex
        let inode = try fixture.inode("blobs/sha256/" + hex)
        #expect(try fixture.readWhole(inode).get() == layer)
        usleep(300_000)
        let complete = fixture.cacheDirectory + "/blobs/sha256/" + hex
        #expect(!FileManager.default.fileExists(atPath: complete), "committed before reading paused")
        #expect(try fixture.read(inode, offset: 1 << 20, count: 4096).get() == Array(layer[(1 << 20)..<((1 << 20) + 4096)]))
        fixture.fetcher.waitUntilIdle()
        #expect(FileManager.default.fileExists(atPath: complete))
        #expect(fixture.source.bytesSent() == Int64(layer.count))
    }

    @Test(arguments: [CommitTiming(quietPeriod: .milliseconds(200), delayLimit: .seconds(3600)),
                      CommitTiming(quietPeriod: .seconds(3600), delayLimit: .milliseconds(200))])
    func aVerifiedBlobIsCommittedAfterAQuietPeriodOrTheDelayLimit(_ timing: CommitTiming) throws {
        let layer = randomBytes(2 << 20, seed: 22)
        let fixture = try Fixture(layers: [layer], commitTiming: timing)
        defer { fixture.removeCache() }
        let hex = Digest.sha256(of: layer).hex
        #expect(try fixture.readWhole(try fixture.inode("blobs/sha256/" + hex)).get() == layer)
        let complete = fixture.cacheDirectory + "/blobs/sha256/" + hex
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: complete) && Date() < deadline { usleep(20_000) }
        #expect(FileManager.default.fileExists(atPath: complete), "not committed within 10 s")
    }

    @Test func aRangeIsServedBeforeTheBlobCompletesButTheEndWaitsForVerification() throws {
        let layer = randomBytes(2 << 20, seed: 9)
        let fixture = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 1 << 20))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        // The stream is held after 1 MiB; the first 4 KiB must arrive anyway.
        #expect(try fixture.read(inode, offset: 0, count: 4096).get() == Array(layer[0..<4096]))
        let tail = fixture.startRead(inode, offset: Int64(layer.count - 100), count: 4096)
        #expect(!tail.wait(seconds: 0.3))
        fixture.source.resume()
        tail.done.wait()
        #expect(try tail.result?.get() == Array(layer[(layer.count - 100)...]))
    }

    @Test func aLyingRemoteIsNeverServedWholeNorCached() throws {
        let layer = randomBytes(3 << 20, seed: 10)
        let digest = Digest.sha256(of: layer)
        var lie = layer
        lie[lie.count / 2] ^= 0xFF
        let fixture = try Fixture(layers: [layer], behaviour: .init(substitutes: [digest: lie]))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + digest.hex)
        #expect(fixture.readWhole(inode).failure == .ioError)
        #expect(!FileManager.default.fileExists(atPath: fixture.cacheDirectory + "/blobs/sha256/" + digest.hex))
        #expect((try? FileManager.default.contentsOfDirectory(atPath: fixture.cacheDirectory + "/partial"))?.isEmpty == true)

        // Once the remote tells the truth, the blob is served.
        fixture.source.update { $0.substitutes = [:] }
        #expect(try fixture.readWhole(inode).get() == layer)
    }

    /// Issue 12, defect 6: a failure was remembered for 5 s and every read in that time failed
    /// at once, although the remote was back. A new read tries again, after a shared pause.
    @Test func aRemoteThatRecoversIsTriedAgainByTheNextRead() throws {
        let layer = randomBytes(1 << 20, seed: 16)
        let fixture = try Fixture(layers: [layer], behaviour: .init(failEverything: true))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(fixture.read(inode, offset: 0, count: 4096).failure == .ioError)
        fixture.source.update { $0.failEverything = false }
        #expect(try fixture.read(inode, offset: 4096, count: 4096).get() == Array(layer[4096..<8192]))
    }

    /// The kernel retries a failed readahead page by page: each retry may try the remote again,
    /// but only after the pause, and with a bounded number of requests.
    @Test func readsOfAnUnreachableRemoteCauseBoundedRequests() throws {
        let layer = randomBytes(1 << 20, seed: 17)
        let fixture = try Fixture(layers: [layer], behaviour: .init(failEverything: true))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        let start = ContinuousClock.now
        for page in 0..<3 {
            #expect(fixture.read(inode, offset: Int64(page) * 4096, count: 4096).failure == .ioError)
        }
        #expect(fixture.source.streamsStarted.count == 3 * 3)
        // Three pauses inside each read's attempts, and one growing pause before each later read.
        #expect(start.duration(to: .now) >= RetryBackoff.pause(afterFailures: 1) * 3)
    }

    @Test func aBrokenStreamResumesWithARangeRequest() throws {
        let layer = randomBytes(3 << 20, seed: 11)
        let fixture = try Fixture(layers: [layer], behaviour: .init(breakNextStreamAfter: 1 << 20))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(try fixture.readWhole(inode).get() == layer)
        // The cut request was continued exactly where it broke, and nothing was fetched twice.
        #expect(fixture.source.streamsStarted.filter { $0 == 1 << 20 }.count == 1)
        #expect(fixture.source.maximumSendsPerByte() == 1)
    }

    @Test func aServerIgnoringRangesIsRestartedFromZero() throws {
        let layer = randomBytes(3 << 20, seed: 12)
        let fixture = try Fixture(layers: [layer], behaviour: .init(breakNextStreamAfter: 1 << 20, ignoresRanges: true))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(try fixture.readWhole(inode).get() == layer)
        // Range requests in flight when the remote showed it ignores ranges stop at their first
        // byte; then one stream from zero brings the blob.
        #expect(fixture.source.streamsStarted.last == 0)
        #expect(fixture.source.streamsStarted.count <= 6)
    }

    @Test func anUnreachableRemoteFailsReadsWithEIOAfterBoundedRetries() throws {
        let layer = randomBytes(1000, seed: 13)
        let fixture = try Fixture(layers: [layer], behaviour: .init(failEverything: true))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        #expect(fixture.read(inode, offset: 0, count: 10).failure == .ioError)
        #expect(fixture.source.streamsStarted.count == 3)
    }

    @Test func completeBlobsAreReusedByALaterMountWithoutTheNetwork() throws {
        let layer = randomBytes(2 << 20, seed: 14)
        let first = try Fixture(layers: [layer])
        defer { first.removeCache() }
        let digest = Digest.sha256(of: layer)
        #expect(try first.readWhole(try first.inode("blobs/sha256/" + digest.hex)).get() == layer)
        first.fetcher.waitUntilIdle()

        let second = try Fixture(layers: [layer], behaviour: .init(failEverything: true), cacheDirectory: first.cacheDirectory)
        #expect(try second.readWhole(try second.inode("blobs/sha256/" + digest.hex)).get() == layer)
        #expect(second.source.streamsStarted.isEmpty)
        #expect(second.fetcher.isComplete(digest))
    }

    @Test func shutdownAnswersWaitingReaders() throws {
        let layer = randomBytes(2 << 20, seed: 15)
        let fixture = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 64 << 10))
        defer { fixture.removeCache() }
        let inode = try fixture.inode("blobs/sha256/" + Digest.sha256(of: layer).hex)
        let answer = fixture.startRead(inode, offset: 1 << 20, count: 4096)
        fixture.filesystem.shutdown()
        #expect(answer.wait(seconds: 5))
        #expect(answer.result?.failure == .ioError)
        fixture.source.resume()
    }

    /// A mount stopped without dying (SIGSTOP, a hung disk) keeps its claims on the blocks it
    /// was fetching: another mount waits for them only as long as its bound, then fetches them.
    @Test func blocksClaimedByAStalledMountAreFetchedAfterTheBound() throws {
        let layer = randomBytes(2 << 20, seed: 23)
        let digest = Digest.sha256(of: layer)
        let first = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 1 << 20))
        defer { first.removeCache() }
        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory, otherProcessStall: .milliseconds(500))
        let firstInode = try first.inode("blobs/sha256/" + digest.hex)
        let secondInode = try second.inode("blobs/sha256/" + digest.hex)
        // The first mount claimed the first two blocks and stalls after landing one.
        #expect(try first.read(firstInode, offset: 0, count: 4096).get() == Array(layer[0..<4096]))

        let answer = second.startRead(secondInode, offset: 0, count: layer.count)
        #expect(!answer.wait(seconds: 0.2))
        #expect(answer.wait(seconds: 10))
        #expect(try answer.result?.get() == layer)
        // The landed block came from the shared file; only the stalled one was fetched again.
        #expect(second.source.bytesSent() == 1 << 20)
        first.source.resume()
        first.fetcher.waitUntilIdle()
        second.fetcher.waitUntilIdle()
    }

    /// Two mounts on one cache directory: the second waits for the blocks the first is
    /// fetching, and takes the ones it already has from the shared partial file.
    @Test func mountsSharingACacheDownloadABlobOnce() throws {
        let layer = randomBytes(2 << 20, seed: 19)
        let digest = Digest.sha256(of: layer)
        let first = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 1 << 20))
        defer { first.removeCache() }
        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory)
        let firstInode = try first.inode("blobs/sha256/" + digest.hex)
        let secondInode = try second.inode("blobs/sha256/" + digest.hex)
        // The first mount's download is under way (held half-way).
        #expect(try first.read(firstInode, offset: 0, count: 4096).get() == Array(layer[0..<4096]))

        let answer = second.startRead(secondInode, offset: 0, count: layer.count)
        #expect(!answer.wait(seconds: 0.3))
        first.source.resume()
        #expect(answer.wait(seconds: 10))
        #expect(try answer.result?.get() == layer)
        #expect(second.source.streamsStarted.isEmpty)
        first.fetcher.waitUntilIdle()
        #expect(first.source.maximumSendsPerByte() == 1)
    }

    @Test func leftoversOfDeadProcessesAreRemovedButPartialDownloadsKept() throws {
        let directory = NSTemporaryDirectory() + "cachefs-orphans-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        _ = try ContentStore(directory: directory)
        let hex = String(repeating: "a", count: 64)
        let leftover = directory + "/partial/\(hex).999999999.small"
        let ours = directory + "/partial/\(hex).\(getpid()).small"
        let download = directory + "/partial/" + hex
        for path in [leftover, ours, download, download + ".journal"] {
            FileManager.default.createFile(atPath: path, contents: Data([1]))
        }
        _ = try ContentStore(directory: directory)
        #expect(!FileManager.default.fileExists(atPath: leftover))
        #expect(FileManager.default.fileExists(atPath: ours))
        #expect(FileManager.default.fileExists(atPath: download))
        #expect(FileManager.default.fileExists(atPath: download + ".journal"))
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }

    var success: Success? {
        if case .success(let value) = self { return value }
        return nil
    }
}
