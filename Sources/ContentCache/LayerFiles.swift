import FoundationEssentials
import LayerView
import OCI
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// What the `layers/` view keeps in the cache directory, beside the blob it was computed from:
/// `layers/<hex>.index` (the layer's exact uncompressed size and checkpoints) and, for a layer
/// whose checkpoints are too far apart, `layers/<hex>.spans` (its uncompressed stream); and
/// what the `files/` view keeps: `layers/<hex>.files` (the layer's tar members, `TarEntryList`).
/// All count against the cache's size and go when their blob is evicted.
extension ContentStore {
    var layersDirectory: String { directory + "/layers" }

    func layerIndexPath(_ digest: Digest) -> String { layersDirectory + "/" + digest.hex + ".index" }
    func layerSpansPath(_ digest: Digest) -> String { layersDirectory + "/" + digest.hex + ".spans" }
    func layerMembersPath(_ digest: Digest) -> String { layersDirectory + "/" + digest.hex + ".files" }

    /// The members a walk over this layer saved; nil when there are none or the file is not
    /// whole (then it is removed, to be made again).
    func loadLayerMembers(_ digest: Digest) -> [TarEntry]? {
        let path = layerMembersPath(digest)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        let file = OpenFile(fd: fd)
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_size < 1 << 32, let bytes = try? file.read(offset: 0, count: Int(info.st_size)),
              let entries = TarEntryList.parse(bytes) else {
            unlink(path)
            return nil
        }
        markUsed(digest)
        return entries
    }

    /// Writes the members under a name of its own, then fsync and rename: the file appears
    /// whole or not at all, for this mount and any other on the machine.
    /// Returns the bytes the file takes.
    func saveLayerMembers(_ entries: [TarEntry], of digest: Digest) throws(CacheError) -> Int64 {
        let path = layerMembersPath(digest)
        let temporaryPath = "\(path).\(getpid()).tmp"
        let fd = open(temporaryPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(temporaryPath)") }
        let file = OpenFile(fd: fd)
        let bytes = TarEntryList.serialized(entries)
        do throws(CacheError) {
            try file.write(bytes, at: 0)
            guard fsync(fd) == 0 else { throw CacheError.system("fsync of \(temporaryPath) failed") }
            guard rename(temporaryPath, path) == 0 else { throw CacheError.system("cannot rename \(temporaryPath)") }
        } catch {
            unlink(temporaryPath)
            throw error
        }
        return Int64(bytes.count)
    }

    /// The index a pass over this blob saved, with the file it reads windows from, or nil when
    /// there is none or its table does not parse whole (a damaged file is removed, to be
    /// computed again).
    func loadLayerIndex(_ digest: Digest, compressedSize: Int64) -> (index: LayerIndex, windows: OpenFile)? {
        let path = layerIndexPath(digest)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        let file = OpenFile(fd: fd)
        var info = stat()
        let footerSize = LayerIndex.footerSize
        guard fstat(fd, &info) == 0, Int64(info.st_size) >= Int64(LayerIndex.fileHeader.count + footerSize),
              let header = try? file.read(offset: 0, count: LayerIndex.fileHeader.count), header == LayerIndex.fileHeader,
              let footer = try? file.read(offset: Int64(info.st_size) - Int64(footerSize), count: footerSize),
              let tableOffset = LayerIndex.tableOffset(footer: footer, fileSize: Int64(info.st_size)),
              Int64(info.st_size) - tableOffset < 1 << 30,
              let trailer = try? file.read(offset: tableOffset, count: Int(Int64(info.st_size) - tableOffset)),
              let index = LayerIndex(trailer: trailer, tableOffset: tableOffset), index.compressedSize == compressedSize else {
            unlink(path)
            return nil
        }
        // Used: eviction counts the layer files with their blob, by the blob's age.
        markUsed(digest)
        return (index, file)
    }

    /// A checkpoint with its window read back from the index file; nil when the bytes there
    /// are not the ones recorded.
    func loadWindow(of checkpoint: LayerCheckpoint, from windows: OpenFile?) -> LayerCheckpoint? {
        guard let location = checkpoint.windowLocation else { return checkpoint }
        guard let windows, let bytes = try? windows.read(offset: location.offset, count: location.length) else { return nil }
        return checkpoint.withWindow(bytes)
    }

    /// An index file being written by a pass: the header now, windows as they are recorded,
    /// the table at the end (`finish`), then fsync and rename, so it appears whole or not at all.
    final class LayerIndexFile: Sendable {
        let file: OpenFile
        let temporaryPath: String
        let path: String
        /// Where the next window goes; only the pass that owns the file moves it.
        let end: Mutex<Int64>

        init(store: ContentStore, digest: Digest) throws(CacheError) {
            path = store.layerIndexPath(digest)
            temporaryPath = "\(path).\(getpid()).tmp"
            let fd = open(temporaryPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw CacheError.system("cannot create \(temporaryPath)") }
            file = OpenFile(fd: fd)
            try file.write(LayerIndex.fileHeader, at: 0)
            end = Mutex(Int64(LayerIndex.fileHeader.count))
        }

        /// Writes the checkpoint's window to the file and returns the checkpoint pointing there.
        func place(_ checkpoint: LayerCheckpoint) throws(CacheError) -> LayerCheckpoint {
            guard checkpoint.kind == .deflateBlock else { return checkpoint }
            let offset = end.withLock { $0 }
            try file.write(checkpoint.window, at: offset)
            end.withLock { $0 += Int64(checkpoint.window.count) }
            var placed = checkpoint
            placed.windowLocation = .init(offset: offset, length: checkpoint.window.count,
                                          crc: LayerCheckpoint.crc32(of: checkpoint.window))
            placed.window = []
            return placed
        }

        func finish(_ index: LayerIndex) throws(CacheError) {
            let tableOffset = end.withLock { $0 }
            try file.write(index.trailer(tableOffset: tableOffset), at: tableOffset)
            guard fsync(file.fd) == 0 else { throw CacheError.system("fsync of \(temporaryPath) failed") }
            guard rename(temporaryPath, path) == 0 else { throw CacheError.system("cannot rename \(temporaryPath)") }
        }

        func abandon() { unlink(temporaryPath) }
    }

    /// A spans file a pass fills under a name of its own and renames into place once whole,
    /// so that a reader (in this or another mount) never sees one being written.
    final class LayerSpansFile: Sendable {
        let file: OpenFile
        let temporaryPath: String
        let path: String

        init(store: ContentStore, digest: Digest) throws(CacheError) {
            path = store.layerSpansPath(digest)
            temporaryPath = "\(path).\(getpid()).tmp"
            let fd = open(temporaryPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw CacheError.system("cannot create \(temporaryPath)") }
            file = OpenFile(fd: fd)
        }

        /// Durable and in place; false when it could not be (it is then removed).
        func keep() -> Bool {
            guard fsync(file.fd) == 0, rename(temporaryPath, path) == 0 else {
                abandon()
                return false
            }
            return true
        }

        func abandon() { unlink(temporaryPath) }
    }

    func openLayerSpans(_ digest: Digest) -> OpenFile? {
        let fd = open(layerSpansPath(digest), O_RDONLY | O_CLOEXEC)
        return fd >= 0 ? OpenFile(fd: fd) : nil
    }

    /// Removes what the view computed from a blob: with the blob, when it is evicted.
    func removeLayerFiles(_ digest: Digest) {
        unlink(layerIndexPath(digest))
        unlink(layerSpansPath(digest))
        unlink(layerMembersPath(digest))
    }

    /// Index files a pass was writing when its process died.
    func removeOrphanedLayerFiles() {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: layersDirectory) else { return }
        for name in names where name.hasSuffix(".tmp") {
            let parts = name.split(separator: ".")
            guard parts.count == 4, let pid = Int32(parts[2]), kill(pid, 0) != 0, errno == ESRCH else { continue }
            unlink(layersDirectory + "/" + name)
        }
    }

    /// Bytes the layer files of each blob take on disk.
    func layerFileBytes() -> [Digest: Int64] {
        Self.layerFileBytes(inCache: directory)
    }

    static func layerFileBytes(inCache directory: String) -> [Digest: Int64] {
        let layers = directory + "/layers"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: layers)) ?? []
        var bytes: [Digest: Int64] = [:]
        for name in names {
            let parts = name.split(separator: ".")
            guard parts.count == 2, ["index", "spans", "files"].contains(parts[1]), let digest = Digest(hex: String(parts[0])) else { continue }
            var info = stat()
            guard stat(layers + "/" + name, &info) == 0 else { continue }
            bytes[digest, default: 0] += Int64(info.st_blocks) * 512
        }
        return bytes
    }
}
