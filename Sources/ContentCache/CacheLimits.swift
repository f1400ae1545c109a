import FoundationEssentials
import SystemSupport
import OCI

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// How much room the content cache may take: a hard cap on its complete blobs, and a floor of
/// free space on its filesystem that it never eats into.
public struct CacheLimits: Sendable, Equatable {
    public var maxBytes: Int64
    public var minFreeBytes: Int64

    public init(maxBytes: Int64, minFreeBytes: Int64) {
        self.maxBytes = maxBytes
        self.minFreeBytes = minFreeBytes
    }

    /// A quarter of the cache's filesystem and 5% of it kept free, as peers default to.
    public static func defaults(forDirectory directory: String) -> CacheLimits {
        var statistics = statvfs()
        var path = directory
        // The directory may not exist yet: measure the nearest existing parent.
        while statvfs(path, &statistics) != 0 && path != "/" {
            path = parentPath(path)
            if path.isEmpty { path = "/" }
        }
        let total = Int64(statistics.f_blocks) * Int64(statistics.f_frsize)
        return CacheLimits(maxBytes: max(total / 4, 1 << 30), minFreeBytes: total / 20)
    }

    /// `10G`, `500M`, `2GiB`, `1.5T`, or plain bytes; K/M/G/T are powers of 1024.
    public static func parseSize(_ text: String) -> Int64? {
        var number = text.trimmingWhitespace().uppercased()
        for suffix in ["IB", "B"] where number.hasSuffix(suffix) && number.count > suffix.count {
            number.removeLast(suffix.count)
            break
        }
        var multiplier: Double = 1
        if let unit = number.last, let power = "KMGT".firstIndex(of: unit) {
            multiplier = pow(1024, Double("KMGT".distance(from: "KMGT".startIndex, to: power) + 1))
            number.removeLast()
        }
        guard let value = Double(number), value >= 0, value.isFinite else { return nil }
        let bytes = value * multiplier
        return bytes < Double(Int64.max) ? Int64(bytes) : nil
    }
}

/// A complete blob in the content store, as `cache ls` shows it.
public struct CachedBlob: Sendable, Equatable {
    public var digest: Digest
    public var size: Int64
    public var lastUsed: Date
}

extension ContentStore {
    /// Every complete blob, least recently used first.
    public func completeBlobs() -> [CachedBlob] {
        Self.completeBlobs(inCache: directory)
    }

    /// `completeBlobs` of the cache at `directory`, read without opening (and so creating or
    /// tidying) the store: for listing a cache that may be another user's or read-only.
    public static func completeBlobs(inCache directory: String) -> [CachedBlob] {
        listBlobs(in: directory + "/blobs/sha256", allocatedSize: false)
            .sorted { ($0.lastUsed, $0.digest) < ($1.lastUsed, $1.digest) }
    }

    /// `partialBlobs` of the cache at `directory`, read without opening the store.
    public static func partialBlobs(inCache directory: String) -> [CachedBlob] {
        listBlobs(in: directory + "/partial", allocatedSize: true)
    }

    /// The files of `directory` named by a digest; a missing directory holds none.
    private static func listBlobs(in directory: String, allocatedSize: Bool) -> [CachedBlob] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.compactMap { name -> CachedBlob? in
            guard let digest = Digest(hex: name) else { return nil }
            var info = stat()
            guard stat(directory + "/" + name, &info) == 0 else { return nil }
            let lastUsed = Date(timeIntervalSince1970: Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9)
            return CachedBlob(digest: digest, size: allocatedSize ? Int64(info.st_blocks) * 512 : Int64(info.st_size), lastUsed: lastUsed)
        }
    }

    /// Records a use: eviction takes the least recently used first. The modification time
    /// serves, since complete blobs never change and atime is often not kept.
    public func markUsed(_ digest: Digest) {
        _ = utimensat(AT_FDCWD, completePath(digest), nil, 0)
    }

    /// Bytes free on the cache's filesystem.
    public func freeBytes() -> Int64 {
        var statistics = statvfs()
        guard statvfs(directory, &statistics) == 0 else { return .max }
        return Int64(statistics.f_bavail) * Int64(statistics.f_frsize)
    }

    /// Partial downloads, at the bytes they take on disk (a partial file is sparse: a blob's
    /// declared size costs nothing until its bytes arrive), and when a block last landed.
    public func partialBlobs() -> [CachedBlob] {
        Self.partialBlobs(inCache: directory)
    }

    /// Removes least recently used blobs, complete or partial, until they take at most
    /// `maxBytes` and at least `minFreeBytes` are free, sparing `protected` blobs and any a
    /// reader holds (a shared flock, in this or another process) and any a writable mount has
    /// still to upload. Returns what was removed.
    @discardableResult
    public func evict(toFit limits: CacheLimits, making room: Int64 = 0,
                      protected: (Digest) -> Bool = { _ in false }) -> [CachedBlob] {
        evictMeasuringSlack(toFit: limits, making: room, protected: protected).removed
    }

    /// `evict`, also returning the slack left after `room`: how many more bytes fit under the
    /// cap and above the free-space floor (negative when eviction could not make the room).
    func evictMeasuringSlack(toFit limits: CacheLimits, making room: Int64,
                             protected: (Digest) -> Bool) -> (removed: [CachedBlob], slack: Int64) {
        let complete = completeBlobs()
        let partial = partialBlobs()
        // The `layers/` view's files count with their blob and go with it; those of a blob not
        // here (its index outlived it, or was copied in) are a candidate of their own.
        var layerFiles = layerFileBytes()
        var candidates: [(CachedBlob, EvictionCandidate)] = (complete.map { ($0, .complete) } + partial.map { ($0, .partial) })
            .map { blob, kind in
                var counted = blob
                counted.size += layerFiles.removeValue(forKey: blob.digest) ?? 0
                return (counted, kind)
            }
        for (digest, bytes) in layerFiles {
            var info = stat()
            let lastUsed = stat(layerIndexPath(digest), &info) == 0
                ? Date(timeIntervalSince1970: Double(info.st_mtim.tv_sec)) : Date(timeIntervalSince1970: 0)
            candidates.append((CachedBlob(digest: digest, size: bytes, lastUsed: lastUsed), .layerFilesOnly))
        }
        candidates.sort { ($0.0.lastUsed, $0.0.digest) < ($1.0.lastUsed, $1.0.digest) }
        var total = candidates.reduce(0) { $0 + $1.0.size } + room
        var free = freeBytes() - room
        var removed: [CachedBlob] = []
        let awaitingUpload = awaitingUploadCheck()
        for (blob, kind) in candidates {
            guard total > limits.maxBytes || free < limits.minFreeBytes else { break }
            guard !protected(blob.digest), !awaitingUpload(blob.digest) else { continue }
            if kind == .layerFilesOnly {
                removeLayerFiles(blob.digest)
            } else {
                guard removeUnlessInUse(blob.digest, partial: kind == .partial) else { continue }
            }
            total -= blob.size
            free += blob.size
            removed.append(blob)
        }
        return (removed, min(limits.maxBytes - total, free - limits.minFreeBytes))
    }

    private enum EvictionCandidate { case complete, partial, layerFilesOnly }

    /// Removes a complete blob from the cache unless some reader holds it or a writable mount
    /// still has to upload it; true when it is gone.
    @discardableResult
    public func discardComplete(_ digest: Digest) -> Bool {
        guard !isAwaitingUpload(digest) else { return false }
        return removeUnlessInUse(digest, partial: false)
    }

    /// Removes a blob unless some reader holds it: the exclusive lock fails while any shared
    /// one exists. A partial one goes with its journal, under the blob's lock, so that no
    /// process opens it in between.
    private func removeUnlessInUse(_ digest: Digest, partial: Bool) -> Bool {
        let path = partial ? partialPath(digest) : completePath(digest)
        let lock = partial ? try? blobLock(digest) : nil
        defer { withExtendedLifetime(lock) {} }
        if partial && lock == nil { return false }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0, unlink(path) == 0 else { return false }
        if partial { unlink(journalPath(digest)) }
        removeLayerFiles(digest)
        return true
    }
}
