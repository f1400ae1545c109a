import FoundationEssentials
import SystemSupport
import OCI
import Synchronization
import Dispatch

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Where a writable mount keeps the bytes of the files clients write, until a blob's rename
/// moves them into the content store: `staging/<id>/` inside the cache directory, on the same
/// filesystem, so that the commit is a rename and never a copy.
///
/// Each live area holds an exclusive flock on `staging/<id>.lock`; an area whose lock nobody
/// holds belongs to a mount that died, and the next area made in the cache directory removes it.
public final class StagingArea: Sendable {
    public let directory: String
    private let lockPath: String
    private let lock: OpenFile
    private let nextName = Atomic<UInt64>(0)

    public init(cacheDirectory: String) throws(CacheError) {
        let root = cacheDirectory + "/staging"
        guard mkdir(cacheDirectory, 0o700) == 0 || errno == EEXIST, mkdir(root, 0o700) == 0 || errno == EEXIST else {
            throw CacheError.system("cannot create \(root)")
        }
        Self.removeAbandonedAreas(in: root)
        let id = "\(getpid())-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
        directory = root + "/" + id
        lockPath = directory + ".lock"
        // Locked under a name the cleanup ignores, then renamed: a lock file another start can
        // see is always already held.
        let temporary = root + "/." + id + ".lock.new"
        let fd = open(temporary, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(temporary)") }
        lock = OpenFile(fd: fd)
        guard flock(fd, LOCK_EX | LOCK_NB) == 0, rename(temporary, lockPath) == 0 else {
            let error = CacheError.system("cannot lock \(temporary)")
            unlink(temporary)
            throw error
        }
        guard mkdir(directory, 0o700) == 0 else {
            let error = CacheError.system("cannot create \(directory)")
            unlink(lockPath)
            throw error
        }
    }

    deinit {
        Self.removeTree(directory)
        unlink(lockPath)
    }

    /// A new empty file in the area, or one holding `initialBytes`.
    public func newFile(holding initialBytes: [UInt8] = []) throws(CacheError) -> StagedFile {
        let path = directory + "/" + String(nextName.add(1, ordering: .relaxed).newValue)
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(path)") }
        let file = StagedFile(path: path, file: OpenFile(fd: fd))
        if !initialBytes.isEmpty {
            let failure = initialBytes.withUnsafeBytes { bytes -> CacheError? in
                do throws(CacheError) {
                    try file.write(bytes, at: 0)
                    return nil
                } catch {
                    return error
                }
            }
            if let failure { throw failure }
        }
        return file
    }

    /// Removes the areas of dead mounts: those whose lock file nobody holds.
    static func removeAbandonedAreas(in root: String) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: root) else { return }
        let lockNames = Set(names.filter { $0.hasSuffix(".lock") })
        for name in names {
            let path = root + "/" + name
            if name.hasSuffix(".lock.new") {
                // Not yet locked by its owner: only a dead owner's is debris.
                let pid = name.dropFirst().split(separator: "-").first.flatMap { Int32($0) }
                if let pid, kill(pid, 0) != 0, errno == ESRCH { unlink(path) }
            } else if lockNames.contains(name) {
                let fd = open(path, O_RDWR | O_CLOEXEC)
                guard fd >= 0 else { continue }
                defer { close(fd) }
                guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { continue }
                // Its owner is gone. The directory goes first, so that none is ever left
                // without its lock while the owner might live.
                removeTree(root + "/" + name.dropLast(".lock".count))
                unlink(path)
            } else if !lockNames.contains(name + ".lock") {
                // A directory whose lock is gone: its owner died while removing it.
                removeTree(path)
            }
        }
    }

    private static func removeTree(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// A file a client writes in a writable mount, kept on disk in the staging area. Its sha256 is
/// computed as the bytes arrive while they arrive in order from offset 0 (BuildKit writes a
/// blob that way, in 1 MiB pieces, and truncates to 0 to start again); any other write or
/// truncation makes the commit read the file again instead.
public final class StagedFile: Sendable {
    let path: String
    let file: OpenFile
    /// The digest of the file's bytes so far, while every byte arrived in order; nil once one
    /// did not. Held while the file changes, so that size and digest always agree.
    private let hashing = Mutex<DigestVerifier?>(DigestVerifier())
    private let byteCount = Atomic<Int64>(0)
    /// Where the disk blocks allocated ahead of the writes end (changed under `hashing`).
    private let allocatedEnd = Atomic<Int64>(0)
    /// The file still has its name in the staging area: it was neither moved nor removed.
    private let named = Atomic<Bool>(true)
    /// Moved into the content store: its bytes are a committed blob's and never change again.
    /// Set under `hashing`, so that a write or truncation that looked the file up before the
    /// commit and runs after it is refused.
    private let committed = Atomic<Bool>(false)
    /// Whether an upload of the file before its commit was tried; at most once per file.
    private let earlyUploadClaimed = Atomic<Bool>(false)
    /// What an upload started before the commit reads, and the upload itself.
    private let early = Mutex<(feed: EarlyFeed, upload: any EarlyBlobUpload)?>(nil)

    init(path: String, file: OpenFile) {
        self.path = path
        self.file = file
    }

    deinit {
        early.withLock { $0?.feed.giveUp("the file was closed without a commit") }
        if named.load(ordering: .acquiring) { unlink(path) }
    }

    /// Its size in bytes, read without waiting for a write in progress.
    public var size: Int64 { byteCount.load(ordering: .acquiring) }

    /// Whether it became a committed blob (`moveIntoStore`): it takes no more writes.
    public var isCommitted: Bool { committed.load(ordering: .acquiring) }

    private func refuseIfCommitted() throws(CacheError) {
        guard !committed.load(ordering: .relaxed) else { throw CacheError("\(path) was committed as a blob: it changes no more") }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws(CacheError) {
        // As pwrite: nothing written, nothing extended.
        guard !bytes.isEmpty else { return }
        try hashing.withLock { verifier throws(CacheError) in
            try refuseIfCommitted()
            try file.write(bytes, at: offset)
            let size = byteCount.load(ordering: .relaxed)
            if verifier != nil, offset == size {
                verifier!.update(bytes)
            } else {
                verifier = nil
            }
            let newSize = max(size, offset + Int64(bytes.count))
            byteCount.store(newSize, ordering: .releasing)
            if verifier != nil { allocateAhead(of: newSize) }
            if let feed = early.withLock({ $0?.feed }) {
                if verifier != nil { feed.advance(to: newSize) } else { feed.giveUp("the file was written out of order") }
            }
        }
    }

    public func truncate(to newSize: Int64) throws(CacheError) {
        try hashing.withLock { verifier throws(CacheError) in
            try refuseIfCommitted()
            guard ftruncate(file.fd, off_t(newSize)) == 0 else { throw CacheError.system("cannot truncate \(path)") }
            let size = byteCount.load(ordering: .relaxed)
            if newSize == 0 {
                verifier = DigestVerifier()
            } else if newSize != size {
                verifier = nil
            }
            byteCount.store(newSize, ordering: .releasing)
            allocatedEnd.store(min(allocatedEnd.load(ordering: .relaxed), newSize), ordering: .relaxed)
            if newSize != size { early.withLock { $0?.feed.giveUp("the file was truncated") } }
        }
    }

    /// Files from this size on get their disk blocks allocated ahead of their writes (a blob on
    /// its way to `blobs/sha256`, most likely); smaller ones are left to delayed allocation.
    static let allocationStart: Int64 = 1 << 20
    /// The most allocated past the written bytes: the file's own size, at most this.
    static let allocationWindow: Int64 = 32 << 20

    /// Keeps disk blocks allocated ahead of a file written in order, as far again as it is long
    /// (at most `allocationWindow`): ext4 then skips its delayed allocation on every page
    /// written (docs/performance.md, "Measurements behind design choices"). Advisory, and
    /// bounded: a file that stops early holds at most a window it did not use, released at its
    /// commit or removal. Called under `hashing`.
    private func allocateAhead(of size: Int64) {
        guard size >= Self.allocationStart else { return }
        let window = min(size, Self.allocationWindow)
        let allocated = allocatedEnd.load(ordering: .relaxed)
        // In steps of a quarter window, not on every write.
        guard allocated - size < window * 3 / 4 else { return }
        let start = max(allocated, size)
        allocateKeepingSize(fd: file.fd, start..<(size + window))
        allocatedEnd.store(size + window, ordering: .relaxed)
    }

    /// Fills `buffer` from `offset`; fewer bytes only where the file ends.
    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws(CacheError) -> Int {
        try file.read(into: buffer, offset: offset)
    }

    /// All its bytes, when it holds at most `limit`; nil when it holds more.
    public func contents(limit: Int) throws(CacheError) -> [UInt8]? {
        let size = self.size
        guard size <= Int64(limit) else { return nil }
        return try file.read(offset: 0, count: Int(size))
    }

    public func sync(dataOnly: Bool) throws(CacheError) {
        guard (dataOnly ? fdatasync(file.fd) : fsync(file.fd)) == 0 else { throw CacheError.system("fsync of \(path) failed") }
    }

    /// Runs `body` while no write or truncation can change the file, with its digest and
    /// size: a commit happens inside, so that what was verified is what is committed.
    public func whileUnchanging<T>(_ body: (_ digest: Digest, _ size: Int64) throws(CacheError) -> T) throws(CacheError) -> T {
        try hashing.withLock { verifier throws(CacheError) in
            let size = byteCount.load(ordering: .relaxed)
            let digest: Digest
            if let verifier { digest = verifier.finalize() } else { digest = try hashWhole(size: size) }
            return try body(digest, size)
        }
    }

    private func hashWhole(size: Int64) throws(CacheError) -> Digest {
        var verifier = DigestVerifier()
        // SAFETY: used only within this call and freed when it returns.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        var offset: Int64 = 0
        while offset < size {
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[..<min(buffer.count, Int(size - offset))])
            let filled = try file.read(into: piece, offset: offset)
            guard filled > 0 else { break }
            verifier.update(UnsafeRawBufferPointer(rebasing: piece[..<filled]))
            offset += Int64(filled)
        }
        return verifier.finalize()
    }

    /// Moves the file, verified as `digest` and synced, into the content store as a complete
    /// blob. Called inside `whileUnchanging`.
    public func moveIntoStore(_ store: ContentStore, as digest: Digest) throws(CacheError) {
        // Blocks allocated ahead past its end, or bytes a write that failed part-way left past
        // it, would count as the blob's: a truncation to its size, the size verified, drops them.
        let size = byteCount.load(ordering: .relaxed)
        var info = stat()
        if allocatedEnd.load(ordering: .relaxed) > size || fstat(file.fd, &info) != 0 || Int64(info.st_size) != size {
            guard ftruncate(file.fd, off_t(size)) == 0 else { throw CacheError.system("cannot truncate \(path)") }
            allocatedEnd.store(0, ordering: .relaxed)
        }
        // Complete blobs are immutable; the mode says so to anyone looking at the cache.
        fchmod(file.fd, 0o444)
        guard rename(path, store.completePath(digest)) == 0 else {
            throw CacheError.system("cannot move \(path) into the cache as \(digest)")
        }
        named.store(false, ordering: .releasing)
        committed.store(true, ordering: .releasing)
        early.withLock { $0?.feed.seal(at: byteCount.load(ordering: .relaxed), as: digest) }
    }

    /// The file lost its last name in the mount: its bytes live on while it is open.
    public func removeName() {
        if named.exchange(false, ordering: .acquiringAndReleasing) { unlink(path) }
        giveUpEarlyUpload("the file was removed")
    }

    // MARK: Uploads before the commit

    /// Claims the file for an upload before its commit: true at the first call only, and only
    /// when its bytes so far arrived in order from its start (a file asked too late is never
    /// asked again).
    func claimEarlyUpload() -> Bool {
        guard !earlyUploadClaimed.exchange(true, ordering: .acquiringAndReleasing) else { return false }
        return hashing.withLock { $0 != nil }
    }

    /// Whether the file was claimed for an upload before its commit (`claimEarlyUpload`).
    public var earlyUploadTried: Bool { earlyUploadClaimed.load(ordering: .relaxed) }

    /// Starts `makeUpload`'s upload on a feed of the file's bytes, announced as `announced`;
    /// nil when the file is no longer written in order, or the publisher takes no early uploads.
    func attachEarlyUpload(announced: AnnouncedBlob?,
                           _ makeUpload: (EarlyFeed) -> (any EarlyBlobUpload)?) -> (feed: EarlyFeed, upload: any EarlyBlobUpload)? {
        hashing.withLock { verifier -> (feed: EarlyFeed, upload: any EarlyBlobUpload)? in
            guard verifier != nil else { return nil }
            let feed = EarlyFeed(file: file, written: byteCount.load(ordering: .relaxed), announced: announced)
            guard let upload = makeUpload(feed) else { return nil }
            early.withLock { $0 = (feed, upload) }
            return (feed, upload)
        }
    }

    /// The upload started before the commit, once the commit sealed its feed: the committer
    /// finishes or abandons it. nil when none was started or it was given up.
    public func takeEarlyUpload() -> (any EarlyBlobUpload)? {
        early.withLock { pair in
            guard let (feed, upload) = pair, feed.isSealed else { return nil }
            pair = nil
            return upload
        }
    }

    /// The file will not be committed as it is (its rename was refused): an upload started
    /// before the commit stops, and drops what it sent.
    public func giveUpEarlyUpload(_ reason: String) {
        early.withLock { $0?.feed.giveUp(reason) }
    }
}

/// A staged file's bytes for an upload that starts before the commit: readable as far as the
/// client wrote them in order, final once the commit seals them, and failing for good once the
/// file is rewritten, truncated, removed or no longer written for `stallLimit`.
final class EarlyFeed: GrowingBlobContents {
    /// How long a read waits for the client's next write before the early upload gives up (the
    /// blob is then uploaded after its commit, the ordinary way).
    static let stallLimit: Duration = .seconds(30)

    private struct State {
        var written: Int64
        /// Set when the commit seals the feed: the digest its bytes were verified as.
        var committed: Digest?
        var sealed: Bool { committed != nil }
        var givenUp: String?
        /// A reader sleeps on `wake`.
        var readerWaiting = false
    }

    private let file: OpenFile
    private let state: Mutex<State>
    private let wake = DispatchSemaphore(value: 0)
    let announced: AnnouncedBlob?

    init(file: OpenFile, written: Int64, announced: AnnouncedBlob? = nil) {
        self.file = file
        self.announced = announced
        state = Mutex(State(written: written))
    }

    var isSealed: Bool { state.withLock { $0.sealed && $0.givenUp == nil } }
    var wasGivenUp: Bool { state.withLock { $0.givenUp != nil } }

    func advance(to written: Int64) { change { $0.written = written } }
    func seal(at size: Int64, as digest: Digest) { change { if $0.givenUp == nil { $0.written = size; $0.committed = digest } } }
    func giveUp(_ reason: String) { change { if !$0.sealed, $0.givenUp == nil { $0.givenUp = reason } } }

    private func change(_ body: (inout State) -> Void) {
        let wakeReader = state.withLock { state -> Bool in
            body(&state)
            defer { state.readerWaiting = false }
            return state.readerWaiting
        }
        if wakeReader { wake.signal() }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
        let deadline = ContinuousClock.now + Self.stallLimit
        while true {
            let now = state.withLock { state -> State in
                if state.written <= offset, !state.sealed, state.givenUp == nil { state.readerWaiting = true }
                return state
            }
            if let reason = now.givenUp { throw CacheError("the upload before the commit stopped: \(reason)") }
            if now.written > offset {
                let wanted = UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(min(Int64(buffer.count), now.written - offset))])
                // A file truncated meanwhile reads short before its truncation gives the feed up:
                // either way the feed is given up before the reader hears of it, so that whoever
                // sees the upload end knows it is to be dropped.
                let got: Int
                do throws(CacheError) {
                    got = try file.read(into: wanted, offset: offset)
                } catch {
                    giveUp("the staged file could not be read: \(error)")
                    throw error
                }
                guard got > 0 else {
                    giveUp("the staged file ended before its written size")
                    throw CacheError("the upload before the commit stopped: the staged file ended before its written size")
                }
                return got
            }
            if now.sealed { return 0 }
            try sleep(until: deadline)
        }
    }

    func committed() throws -> (digest: Digest, size: Int64) {
        let deadline = ContinuousClock.now + Self.stallLimit
        while true {
            let now = state.withLock { state -> State in
                if !state.sealed, state.givenUp == nil { state.readerWaiting = true }
                return state
            }
            if let reason = now.givenUp { throw CacheError("the upload before the commit stopped: \(reason)") }
            if let digest = now.committed { return (digest, now.written) }
            try sleep(until: deadline)
        }
    }

    /// Sleeps until the feed changes; gives the feed up when `deadline` passes first.
    private func sleep(until deadline: ContinuousClock.Instant) throws(CacheError) {
        let left = ContinuousClock.now.duration(to: deadline)
        guard left > .zero, wake.wait(timeout: UploadQueue.deadline(after: left)) == .success else {
            giveUp("nothing was written or committed for \(Self.stallLimit)")
            throw CacheError("the upload before the commit stopped: nothing was written or committed for \(Self.stallLimit)")
        }
    }
}

extension ContentStore {
    /// Makes the renames into `blobs/sha256` durable.
    public func syncBlobsDirectory() {
        let fd = open(blobsDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }
}
