import FoundationEssentials
import LayerView
import OCI

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// What the `layers/` view keeps in the cache directory, beside the blob it was computed from:
/// `layers/<hex>.index` (the layer's exact uncompressed size and checkpoints) and, for a layer
/// whose checkpoints are too far apart, `layers/<hex>.spans` (its uncompressed stream). Both
/// count against the cache's size and go when their blob is evicted.
extension ContentStore {
    var layersDirectory: String { directory + "/layers" }

    func layerIndexPath(_ digest: Digest) -> String { layersDirectory + "/" + digest.hex + ".index" }
    func layerSpansPath(_ digest: Digest) -> String { layersDirectory + "/" + digest.hex + ".spans" }

    /// The index a pass over this blob saved, or nil when there is none or it does not parse
    /// whole (a damaged file is removed, to be computed again).
    func loadLayerIndex(_ digest: Digest, compressedSize: Int64) -> LayerIndex? {
        let path = layerIndexPath(digest)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        let file = OpenFile(fd: fd)
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_size > 0, info.st_size < 1 << 30,
              let bytes = try? file.read(offset: 0, count: Int(info.st_size)) else { return nil }
        guard let index = LayerIndex(serialized: bytes), index.compressedSize == compressedSize else {
            unlink(path)
            return nil
        }
        // Used: eviction counts the layer files with their blob, by the blob's age.
        markUsed(digest)
        return index
    }

    /// Saves an index durably, whole or not at all (write, fsync, rename).
    func saveLayerIndex(_ index: LayerIndex, of digest: Digest) throws(CacheError) {
        let path = layerIndexPath(digest)
        let temporary = "\(path).\(getpid()).tmp"
        let fd = open(temporary, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(temporary)") }
        let file = OpenFile(fd: fd)
        do throws(CacheError) {
            try file.write(index.serialized(), at: 0)
            guard fsync(fd) == 0 else { throw CacheError.system("fsync of \(temporary) failed") }
            guard rename(temporary, path) == 0 else { throw CacheError.system("cannot rename \(temporary)") }
        } catch {
            unlink(temporary)
            throw error
        }
    }

    /// A fresh spans file for a pass to fill.
    func createLayerSpans(_ digest: Digest) throws(CacheError) -> OpenFile {
        let path = layerSpansPath(digest)
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(path)") }
        return OpenFile(fd: fd)
    }

    func openLayerSpans(_ digest: Digest) -> OpenFile? {
        let fd = open(layerSpansPath(digest), O_RDONLY | O_CLOEXEC)
        return fd >= 0 ? OpenFile(fd: fd) : nil
    }

    func removeLayerSpans(_ digest: Digest) { unlink(layerSpansPath(digest)) }

    /// Removes what the view computed from a blob: with the blob, when it is evicted.
    func removeLayerFiles(_ digest: Digest) {
        unlink(layerIndexPath(digest))
        unlink(layerSpansPath(digest))
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
            guard parts.count == 2, parts[1] == "index" || parts[1] == "spans", let digest = Digest(hex: String(parts[0])) else { continue }
            var info = stat()
            guard stat(layers + "/" + name, &info) == 0 else { continue }
            bytes[digest, default: 0] += Int64(info.st_blocks) * 512
        }
        return bytes
    }
}
