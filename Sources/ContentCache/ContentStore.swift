import Foundation
import OCI

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// The on-disk, content-addressed cache shared by every mount that names the same directory.
///
/// `blobs/sha256/<hex>` holds only blobs whose whole content matched their digest: a download
/// is written under `partial/` and renamed into place after verification and fsync, so a crash
/// at any moment leaves at worst an orphaned partial file, which the next store removes.
public final class ContentStore: Sendable {
    public let directory: String

    public init(directory: String) throws(CacheError) {
        self.directory = directory
        for path in [directory, blobsDirectory, partialDirectory, locksDirectory] {
            try Self.makeDirectory(path)
        }
        removeOrphanedPartials()
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
            throw CacheError("cannot open cached blob \(digest): \(String(cString: strerror(errno)))")
        }
        // Held until the file is closed: eviction spares blobs being read. Were the blob
        // evicted between open and lock, this descriptor still reads its (verified) content.
        _ = flock(fd, LOCK_SH)
        return OpenFile(fd: fd)
    }

    /// A new partial file, named so that its owner can be recognised after a crash.
    func createPartial(_ digest: Digest) throws(CacheError) -> (path: String, file: OpenFile) {
        let path = newPartialPath(digest)
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError("cannot create \(path): \(String(cString: strerror(errno)))") }
        return (path, OpenFile(fd: fd))
    }

    /// The partial file a crashed or killed process left for this blob, taken over (renamed,
    /// so no two processes can adopt it), to be continued rather than downloaded again. Its
    /// bytes are unverified: the digest of the whole blob decides, as for any download.
    func adoptOrphanedPartial(_ digest: Digest) -> (path: String, file: OpenFile, length: Int64)? {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: partialDirectory)) ?? []
        for name in names where name.hasPrefix(digest.hex + ".") && Self.ownerIsGone(name) {
            let path = newPartialPath(digest)
            guard rename(partialDirectory + "/" + name, path) == 0 else { continue }
            let fd = open(path, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { continue }
            var info = stat()
            fstat(fd, &info)
            return (path, OpenFile(fd: fd), Int64(info.st_size))
        }
        return nil
    }

    /// Held by the one process downloading a blob, so that mounts sharing this cache do not
    /// download it again: nil while another process holds it. Released when the file closes
    /// (a killed holder releases it too).
    func tryDownloadLock(_ digest: Digest) -> OpenFile? {
        let fd = open("\(locksDirectory)/\(digest.hex)", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return nil }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            return nil
        }
        return OpenFile(fd: fd)
    }

    private func newPartialPath(_ digest: Digest) -> String {
        "\(partialDirectory)/\(digest.hex).\(getpid()).\(UInt32.random(in: 0...UInt32.max))"
    }

    /// `<hex>.<pid>.<random>` whose writer process no longer exists.
    private static func ownerIsGone(_ name: String) -> Bool {
        let parts = name.split(separator: ".")
        guard parts.count == 3, let pid = Int32(parts[1]) else { return false }
        return kill(pid, 0) != 0 && errno == ESRCH
    }

    /// Makes a verified partial file the complete blob, durably.
    func commit(partialPath: String, file: OpenFile, digest: Digest) throws(CacheError) {
        guard fsync(file.fd) == 0 else { throw CacheError("fsync of \(partialPath) failed: \(String(cString: strerror(errno)))") }
        // Complete blobs are immutable; make that visible to anyone looking at the cache.
        fchmod(file.fd, 0o444)
        guard rename(partialPath, completePath(digest)) == 0 else {
            throw CacheError("cannot move \(digest) into the cache: \(String(cString: strerror(errno)))")
        }
        let directoryFD = open(blobsDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryFD >= 0 {
            fsync(directoryFD)
            close(directoryFD)
        }
    }

    func discardPartial(_ path: String) { unlink(path) }

    /// Partial files whose writer died are kept for a day, for a later mount to continue;
    /// after that they are debris.
    private func removeOrphanedPartials() {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: partialDirectory) else { return }
        let dayAgo = time(nil) - 86_400
        for name in names where Self.ownerIsGone(name) {
            var info = stat()
            let path = partialDirectory + "/" + name
            if stat(path, &info) == 0, info.st_mtim.tv_sec < dayAgo { unlink(path) }
        }
    }

    private static func makeDirectory(_ path: String) throws(CacheError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw CacheError("cannot create cache directory \(path): \(error.localizedDescription)")
        }
    }
}

public struct CacheError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// An open file descriptor, closed when the last reference goes.
final class OpenFile: Sendable {
    let fd: Int32

    init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    /// Reads exactly `count` bytes at `offset` unless the file ends first.
    func read(offset: Int64, count: Int) throws(CacheError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var filled = 0
        while filled < count {
            let n = bytes.withUnsafeMutableBytes { buffer in
                pread(fd, buffer.baseAddress! + filled, count - filled, off_t(offset) + off_t(filled))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw CacheError("read failed: \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            filled += n
        }
        if filled < count { bytes.removeLast(count - filled) }
        return bytes
    }

    func write(_ chunk: UnsafeRawBufferPointer, at offset: Int64) throws(CacheError) {
        var written = 0
        while written < chunk.count {
            let n = pwrite(fd, chunk.baseAddress! + written, chunk.count - written, off_t(offset) + off_t(written))
            if n < 0 {
                if errno == EINTR { continue }
                throw CacheError("write to the cache failed: \(String(cString: strerror(errno)))")
            }
            written += n
        }
    }

    func truncate() { _ = ftruncate(fd, 0) }
}
