import FoundationEssentials
import SystemSupport
import OCI
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// A tag to point at a manifest once every blob it reaches is on the remote, with everything
/// its publication reads: the manifest's exact bytes and the small blobs a remote may store the
/// tag in a format of its own from (S3 keeps the cache config), so that it can be published
/// after a restart even if the local cache lost them.
public struct TagPublication: Sendable, Equatable, Codable {
    public struct SmallBlob: Sendable, Equatable, Codable {
        public var digest: Digest
        public var bytes: Data
    }

    public var tag: String
    public var manifest: Descriptor
    public var manifestBytes: Data
    public var smallBlobs: [SmallBlob]
    /// Every blob the manifest reaches, itself included: the tag waits for those still to be
    /// uploaded.
    public var blobs: [Descriptor]

    public init(tag: String, manifest: Descriptor, manifestBytes: [UInt8], smallBlobs: [Digest: [UInt8]], blobs: [Descriptor]) {
        self.tag = tag
        self.manifest = manifest
        self.manifestBytes = Data(manifestBytes)
        self.smallBlobs = smallBlobs.sorted { $0.key < $1.key }.map { SmallBlob(digest: $0.key, bytes: Data($0.value)) }
        self.blobs = blobs
    }

    public func smallBlob(_ digest: Digest) -> [UInt8]? {
        if digest == manifest.digest { return Array(manifestBytes) }
        return smallBlobs.first { $0.digest == digest }.map { Array($0.bytes) }
    }
}

/// What a writable mount still has to publish to one remote, kept in the cache directory so
/// that a mount killed at any moment and started again finishes it: `uploads/<id>/`, where
/// `<id>` is the sha256 of the remote's name, holds `blob-<hex>` (the blob's size) for each
/// blob to upload and `tag-<sha256 of the tag>.json` for each tag to publish. Every entry is
/// written to a temporary name, synced, renamed into place and its directory synced; it is
/// removed once published. Blobs named here are never evicted from the content store, by any
/// process (`ContentStore.isAwaitingUpload`).
///
/// One mount at a time publishes a remote from one cache directory: the journal is locked
/// (flock on `uploads/<id>/lock`) while in use, and a dead mount's lock dies with it.
final class UploadJournal: Sendable {
    let directory: String
    private let lock: Mutex<OpenFile?>

    init(store: ContentStore, remoteName: String) throws(CacheError) {
        directory = store.uploadsDirectory + "/" + Digest.sha256(of: Array(remoteName.utf8)).hex
        for path in [store.uploadsDirectory, directory] where mkdir(path, 0o700) != 0 && errno != EEXIST {
            throw CacheError.system("cannot create \(path)")
        }
        let lockPath = directory + "/lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot open \(lockPath)") }
        let file = OpenFile(fd: fd)
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            if errno == EWOULDBLOCK {
                throw CacheError("another writable mount publishing to \(remoteName) uses the cache directory \(store.directory); "
                                 + "one mount at a time may publish to a remote from one cache directory")
            }
            throw CacheError.system("cannot lock \(lockPath)")
        }
        lock = Mutex(file)
        // A description for people looking at the cache directory; nothing reads it.
        try? writeDurably(Array((remoteName + "\n").utf8), as: "remote")
    }

    /// Lets another mount take the journal over; nothing is written to it afterwards.
    func unlock() {
        lock.withLock { $0 = nil }
    }

    private func blobName(_ digest: Digest) -> String { "blob-" + digest.hex }
    private func tagName(_ tag: String) -> String { "tag-" + Digest.sha256(of: Array(tag.utf8)).hex + ".json" }

    func recordBlob(_ digest: Digest, size: Int64) throws(CacheError) {
        try writeDurably(Array(String(size).utf8), as: blobName(digest))
    }

    func removeBlob(_ digest: Digest) { remove(blobName(digest)) }

    func recordTag(_ publication: TagPublication) throws(CacheError) {
        let bytes: [UInt8]
        do {
            bytes = Array(try JSONEncoder().encode(publication))
        } catch {
            throw CacheError("cannot encode the publication of tag \(publication.tag): \(error)")
        }
        try writeDurably(bytes, as: tagName(publication.tag))
    }

    func removeTag(_ tag: String) { remove(tagName(tag)) }

    struct Contents {
        var blobs: [Digest: Int64] = [:]
        var tags: [TagPublication] = []
        /// Entries that could not be read, for the log.
        var damaged: [String] = []
    }

    func load() -> Contents {
        var contents = Contents()
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        for name in names.sorted() {
            let path = directory + "/" + name
            if name.hasPrefix("blob-") {
                guard let digest = Digest(hex: String(name.dropFirst("blob-".count))),
                      let data = FileManager.default.contents(atPath: path),
                      let size = Int64(String(decoding: data, as: UTF8.self)), size >= 0 else {
                    contents.damaged.append(path)
                    continue
                }
                contents.blobs[digest] = size
            } else if name.hasPrefix("tag-") && name.hasSuffix(".json") {
                guard let data = FileManager.default.contents(atPath: path),
                      let publication = try? JSONDecoder().decode(TagPublication.self, from: data),
                      name == tagName(publication.tag) else {
                    contents.damaged.append(path)
                    continue
                }
                contents.tags.append(publication)
            }
        }
        return contents
    }

    /// Replaces the entry `name` whole: a reader finds the old entry or the new one, never a
    /// part, whenever the process or the machine stops.
    private func writeDurably(_ bytes: [UInt8], as name: String) throws(CacheError) {
        let path = directory + "/" + name
        let temporary = directory + "/." + name + ".new"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CacheError.system("cannot create \(temporary)") }
        let file = OpenFile(fd: fd)
        try file.write(bytes, at: 0)
        guard fsync(fd) == 0 else { throw CacheError.system("fsync of \(temporary) failed") }
        guard rename(temporary, path) == 0 else { throw CacheError.system("cannot rename \(temporary) to \(path)") }
        syncDirectory()
    }

    private func remove(_ name: String) {
        unlink(directory + "/" + name)
        syncDirectory()
    }

    private func syncDirectory() {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }
}

extension ContentStore {
    var uploadsDirectory: String { directory + "/uploads" }

    /// Whether a blob is still to be uploaded by a writable mount of any remote: such a blob
    /// exists nowhere else yet, and is never evicted.
    func awaitingUploadCheck() -> (Digest) -> Bool {
        let journals = ((try? FileManager.default.contentsOfDirectory(atPath: uploadsDirectory)) ?? [])
            .filter { Digest(hex: $0) != nil }
            .map { uploadsDirectory + "/" + $0 + "/blob-" }
        guard !journals.isEmpty else { return { _ in false } }
        return { digest in journals.contains { access($0 + digest.hex, F_OK) == 0 } }
    }

    /// Whether any writable mount still has to upload the blob.
    public func isAwaitingUpload(_ digest: Digest) -> Bool { awaitingUploadCheck()(digest) }
}
