import FoundationEssentials
import SystemSupport
import Logging
import OCI

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// What a source resolved to at its last successful mount, so that a mount made while the
/// remote is unreachable can still show the cache it showed before (the decision is the
/// wiring's: `RemoteCacheSource.loadSnapshot(remembering:recalling:logger:)`). Small blobs are
/// stored in the content store like any blob; the resolution file names them.
extension ContentStore {
    private struct SavedResolution: Codable {
        struct LazyBlob: Codable {
            var digest: Digest
            var size: Int64
        }
        var source: String
        var resolvedAt: Date
        var tags: [OCILayout.TaggedManifest]
        var smallBlobs: [Digest]
        /// Written before the lazy blobs became `lazyBlobSizes`; still read.
        var lazyBlobs: [LazyBlob]?
        /// One "<hex> <size>" line per lazy blob: encoding 100,000 of them as JSON objects
        /// took a third of a large mount's CPU.
        var lazyBlobSizes: String?
    }

    var resolutionsDirectory: String { directory + "/resolutions" }

    /// Keeps `snapshot` as what `source` (a display name) resolved to, its small blobs stored
    /// as complete blobs.
    public func save(_ snapshot: CacheSnapshot, for source: String) throws(CacheError) {
        for (digest, bytes) in snapshot.smallBlobs where !hasComplete(digest) {
            try storeVerified(bytes, as: digest)
        }
        var sizes = ""
        sizes.reserveCapacity(snapshot.lazyBlobs.count * 76)
        for (digest, size) in snapshot.lazyBlobs {
            sizes += digest.hex
            sizes += " "
            sizes += String(size)
            sizes += "\n"
        }
        let record = SavedResolution(source: source, resolvedAt: Date(), tags: snapshot.tags,
                                     smallBlobs: snapshot.smallBlobs.keys.sorted(), lazyBlobSizes: sizes)
        let path = resolutionPath(for: source)
        let temporary = "\(path).\(getpid()).tmp"
        do {
            try FileManager.default.createDirectory(atPath: resolutionsDirectory, withIntermediateDirectories: true)
            try JSONEncoder().encode(record).write(to: URL(fileURLWithPath: temporary))
        } catch {
            throw CacheError("cannot write \(temporary): \(describeFileError(error))")
        }
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            throw CacheError.system("cannot write \(path)")
        }
    }

    /// What `source` resolved to when it was last saved, if its small blobs are all still here
    /// and intact.
    public func savedResolution(for source: String) -> (snapshot: CacheSnapshot, resolvedAt: Date)? {
        guard let data = FileManager.default.contents(atPath: resolutionPath(for: source)),
              let record = try? JSONDecoder().decode(SavedResolution.self, from: data),
              record.source == source else { return nil }
        var snapshot = CacheSnapshot()
        snapshot.tags = record.tags
        for digest in record.smallBlobs {
            // Small blobs are read whole and checked: a damaged one voids the resolution.
            guard let file = try? openComplete(digest), let bytes = try? file.read(offset: 0, count: 4 << 20),
                  Digest.sha256(of: bytes) == digest else { return nil }
            snapshot.addSmallBlob(digest, bytes)
        }
        for blob in record.lazyBlobs ?? [] { snapshot.addLazyBlob(Descriptor(mediaType: "", digest: blob.digest, size: blob.size)) }
        for line in (record.lazyBlobSizes ?? "").split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count == 2, let digest = Digest(hex: String(fields[0])), let size = Int64(fields[1]),
                  Descriptor.sizeProblem(size, of: digest) == nil else { return nil }
            snapshot.addLazyBlob(Descriptor(mediaType: "", digest: digest, size: size))
        }
        return (snapshot, record.resolvedAt)
    }

    private func resolutionPath(for source: String) -> String {
        resolutionsDirectory + "/" + Digest.sha256(of: Array(source.utf8)).hex + ".json"
    }
}
