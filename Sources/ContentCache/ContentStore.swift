import FoundationEssentials
import SystemSupport
import OCI

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// The on-disk, content-addressed cache shared by every mount that names the same directory.
///
/// `blobs/sha256/<hex>` holds only blobs whose whole content matched their digest: a download
/// is written under `partial/<hex>`, block by block with a journal beside it, and renamed into
/// place after verification and fsync, so a crash at any moment leaves at worst a partial
/// download, which the next mount continues.
public final class ContentStore: Sendable {
    public let directory: String
    /// The longest a blob's lock is waited for: a stopped process may hold it.
    let lockWait: Duration

    public init(directory: String, lockWait: Duration = .seconds(60)) throws(CacheError) {
        self.directory = directory
        self.lockWait = lockWait
        for path in [directory, blobsDirectory, partialDirectory, locksDirectory, layersDirectory] {
            try Self.makeDirectory(path)
        }
        removeOrphanedPartials()
        removeOrphanedLayerFiles()
    }

    var blobsDirectory: String { directory + "/blobs/sha256" }
    var partialDirectory: String { directory + "/partial" }
    /// One empty file per blob ever downloaded here, only ever flocked.
    var locksDirectory: String { directory + "/locks" }

    public func completePath(_ digest: Digest) -> String { blobsDirectory + "/" + digest.hex }

    public func hasComplete(_ digest: Digest) -> Bool { access(completePath(digest), F_OK) == 0 }

    /// Opens a verified blob for reading, or nil when it is not in the cache.
    func openComplete(_ digest: Digest) throws(CacheError) -> OpenFile? {
        let fd = open(completePath(digest), O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw CacheError.system("cannot open cached blob \(digest)")
        }
        // Held until the file is closed: eviction spares blobs being read. Were the blob
        // evicted between open and lock, this descriptor still reads its (verified) content.
        _ = flock(fd, LOCK_SH)
        return OpenFile(fd: fd)
    }

    public func partialPath(_ digest: Digest) -> String { partialDirectory + "/" + digest.hex }
    func journalPath(_ digest: Digest) -> String { partialPath(digest) + ".journal" }

    enum LocalBlob {
        case complete(OpenFile)
        /// The shared partial file (sparse, the blob's full size) and its block journal.
        case partial(OpenFile, BlockJournal)
    }

    /// The complete blob if the cache has it, otherwise the partial download every process
    /// shares, created if needed. Both come with a shared flock, held while they are open, so
    /// that eviction spares them.
    func openBlob(_ digest: Digest, size: Int64, blockSize: Int64) throws(CacheError) -> LocalBlob {
        // Creating a partial and committing one both happen under the blob's lock, so no
        // partial is ever made for a blob just committed.
        let lock = try blobLock(digest)
        defer { withExtendedLifetime(lock) {} }
        if let complete = try openComplete(digest) { return .complete(complete) }
        let path = partialPath(digest)
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot open \(path)") }
        let data = OpenFile(fd: fd)
        _ = flock(fd, LOCK_SH)
        var info = stat()
        if fstat(fd, &info) == 0, Int64(info.st_size) != size {
            guard ftruncate(fd, off_t(size)) == 0 else {
                throw CacheError.system("cannot size \(path)")
            }
        }
        let journal = try BlockJournal(path: journalPath(digest), blobSize: size, blockSize: blockSize)
        return .partial(data, journal)
    }

    /// A download kept only in memory, which no other process sees: for a blob the cache's
    /// filesystem has no room for. Its pages are allocated as blocks land.
    func openInMemory(_ digest: Digest, size: Int64, blockSize: Int64) throws(CacheError) -> (data: OpenFile, journal: BlockJournal) {
        func memoryFile(_ role: String) throws(CacheError) -> OpenFile {
            switch createMemoryFile(named: "ocicachefs-\(role)-\(digest.hex.prefix(12))") {
            case .success(let fd): return OpenFile(fd: fd)
            case .failure(let error): throw CacheError.system("cannot hold blob \(digest) in memory", code: error.rawValue)
            }
        }
        let data = try memoryFile("data")
        guard ftruncate(data.fd, off_t(size)) == 0 else { throw CacheError.system("cannot hold blob \(digest) in memory") }
        return (data, try BlockJournal(file: memoryFile("journal"), blobSize: size, blockSize: blockSize))
    }

    /// Held briefly by whoever creates, commits or evicts a blob's partial file. Released when
    /// the returned file closes (a killed holder releases it too; a stopped one does not, so
    /// the wait is bounded by `lockWait`).
    func blobLock(_ digest: Digest) throws(CacheError) -> OpenFile {
        let path = "\(locksDirectory)/\(digest.hex)"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot open the lock of \(digest)") }
        let deadline = ContinuousClock.now + lockWait
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            guard code == EWOULDBLOCK || code == EINTR else {
                close(fd)
                throw CacheError.system("cannot lock \(digest)", code: code)
            }
            guard ContinuousClock.now < deadline else {
                close(fd)
                throw CacheError("\(path) stayed locked by another process for \(lockWait); is a mount of this cache directory stopped?")
            }
            SystemThread.sleep(for: .milliseconds(5))
        }
        return OpenFile(fd: fd)
    }

    /// Makes a verified partial file the complete blob, durably, unless another process
    /// already did (it renamed the same file: every process's descriptor still reads it).
    func commit(_ digest: Digest, data: OpenFile) throws(CacheError) {
        guard fsync(data.fd) == 0 else { throw CacheError.system("fsync of blob \(digest) failed") }
        let lock = try blobLock(digest)
        defer { withExtendedLifetime(lock) {} }
        var ours = stat(), named = stat()
        guard fstat(data.fd, &ours) == 0, stat(partialPath(digest), &named) == 0,
              ours.st_ino == named.st_ino, ours.st_dev == named.st_dev else { return }
        // Complete blobs are immutable; make that visible to anyone looking at the cache.
        fchmod(data.fd, 0o444)
        guard rename(partialPath(digest), completePath(digest)) == 0 else {
            throw CacheError.system("cannot move \(digest) into the cache")
        }
        unlink(journalPath(digest))
        let directoryFD = open(blobsDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryFD >= 0 {
            fsync(directoryFD)
            close(directoryFD)
        }
    }

    /// Stores bytes already known to match `digest` (manifests and configs) as a complete blob.
    func storeVerified(_ bytes: [UInt8], as digest: Digest) throws(CacheError) {
        let path = "\(partialDirectory)/\(digest.hex).\(getpid()).small"
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(path)") }
        let file = OpenFile(fd: fd)
        do throws(CacheError) {
            try file.write(bytes, at: 0)
            guard fsync(fd) == 0 else { throw CacheError.system("fsync of \(path) failed") }
            fchmod(fd, 0o444)
            guard rename(path, completePath(digest)) == 0 else {
                throw CacheError.system("cannot move \(digest) into the cache")
            }
        } catch {
            unlink(path)
            throw error
        }
    }

    /// Removes a partial download whose content proved wrong, unless it was replaced meanwhile.
    func discardPartial(_ digest: Digest, data: OpenFile) {
        guard let lock = try? blobLock(digest) else { return }
        defer { withExtendedLifetime(lock) {} }
        var ours = stat(), named = stat()
        guard fstat(data.fd, &ours) == 0, stat(partialPath(digest), &named) == 0,
              ours.st_ino == named.st_ino, ours.st_dev == named.st_dev else { return }
        unlink(partialPath(digest))
        unlink(journalPath(digest))
    }

    /// Partial downloads are kept, to be continued, until eviction takes them. Files named
    /// `<hex>.<pid>.<anything>` (small blobs being stored, and the one-writer-per-file layout
    /// of earlier versions) whose process is gone are debris.
    private func removeOrphanedPartials() {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: partialDirectory) else { return }
        for name in names {
            let parts = name.split(separator: ".")
            guard parts.count == 3, let pid = Int32(parts[1]), kill(pid, 0) != 0, errno == ESRCH else { continue }
            unlink(partialDirectory + "/" + name)
        }
    }

    private static func makeDirectory(_ path: String) throws(CacheError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw CacheError("cannot create cache directory \(path): \(describeFileError(error))")
        }
    }
}

public struct CacheError: Error, Sendable, CustomStringConvertible {
    public var description: String
    /// The errno of the system call that failed, when one did.
    public var code: Int32?

    public init(_ description: String, code: Int32? = nil) {
        self.description = description
        self.code = code
    }

    /// `what` failed with `code` (the current errno by default): "what: No space left on device".
    static func system(_ what: String, code: Int32 = errno) -> CacheError {
        CacheError("\(what): \(String(cString: strerror(code)))", code: code)
    }

    /// The cache's filesystem is full, or the user's quota there is used up: evicting may
    /// help, and a download can go on in memory.
    public var isOutOfSpace: Bool { code == ENOSPC || code == EDQUOT }
}

/// An open file descriptor, closed when the last reference goes.
// SAFETY: `fd` is immutable; the write lock is a pthread mutex, made for sharing between threads.
final class OpenFile: @unchecked Sendable {
    let fd: Int32
    /// Held around each write. The connections of one download write into one file, and the
    /// kernel serializes them on the inode's lock by spinning while its holder runs: with a lock
    /// that sleeps instead (no spinning, unlike `Mutex`), a cold read cost the daemon about 7%
    /// less CPU (docs/performance.md, "Measurements behind design choices").
    private let writeLock: UnsafeMutablePointer<pthread_mutex_t>

    init(fd: Int32) {
        self.fd = fd
        writeLock = .allocate(capacity: 1)
        pthread_mutex_init(writeLock, nil)
    }

    deinit {
        close(fd)
        pthread_mutex_destroy(writeLock)
        writeLock.deallocate()
    }

    /// Reads exactly `count` bytes at `offset` unless the file ends first.
    func read(offset: Int64, count: Int) throws(CacheError) -> [UInt8] {
        var failure: CacheError?
        let bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            do throws(CacheError) {
                initialized = try read(into: UnsafeMutableRawBufferPointer(buffer), offset: offset)
            } catch {
                failure = error
                initialized = 0
            }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Fills `buffer` from `offset` and returns how many bytes it got: fewer only where the
    /// file ends.
    func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws(CacheError) -> Int {
        var filled = 0
        while filled < buffer.count {
            let n = pread(fd, buffer.baseAddress! + filled, buffer.count - filled, off_t(offset) + off_t(filled))
            if n < 0 {
                if errno == EINTR { continue }
                throw CacheError.system("read failed")
            }
            if n == 0 { break }
            filled += n
        }
        return filled
    }

    /// Starts writing the range's dirty pages to disk without waiting for it: a long download
    /// then never piles up dirty pages until the kernel throttles every writer.
    func startWriteBack(_ range: Range<Int64>) {
        SystemSupport.startWriteBack(fd: fd, range)
    }

    /// Allocates the range's disk blocks ahead of its writes, which then need no delayed
    /// allocation (docs/performance.md, "Measurements behind design choices"). Advisory: where
    /// it fails, the writes allocate as they go.
    func allocateAhead(_ range: Range<Int64>) {
        SystemSupport.allocateKeepingSize(fd: fd, range)
    }

    /// Gives back the range's disk blocks; it then reads as zeros.
    func free(_ range: Range<Int64>) {
        SystemSupport.freeKeepingSize(fd: fd, range)
    }

    /// Lets the kernel drop the range's clean pages (what is dirty or being written stays).
    /// Advisory: a failure changes nothing.
    func dropCachedPages(_ range: Range<Int64>) {
        _ = posix_fadvise(fd, off_t(range.lowerBound), off_t(range.count), POSIX_FADV_DONTNEED)
    }

    func write(_ bytes: [UInt8], at offset: Int64) throws(CacheError) {
        let failure = bytes.withUnsafeBytes { raw -> CacheError? in
            do throws(CacheError) {
                try write(raw, at: offset)
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw failure }
    }

    /// Writes all of `bytes` at `offset`.
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws(CacheError) {
        guard !bytes.isEmpty else { return }
        pthread_mutex_lock(writeLock)
        defer { pthread_mutex_unlock(writeLock) }
        var written = 0
        while written < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + written, bytes.count - written, off_t(offset) + off_t(written))
            if n < 0 {
                if errno == EINTR { continue }
                throw CacheError.system("write to the cache failed")
            }
            written += n
        }
    }
}
