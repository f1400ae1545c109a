import ContentCache
import Dispatch
import Logging
import OCI
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// What makes a mount writable: where client files are staged and the queues that publish
/// what they commit. Both live in the cache directory of the mount's content store.
public struct WritableMount: Sendable {
    public var staging: StagingArea
    /// The queue of the mount's SOURCE: a committed blob is queued here at once.
    public var uploads: UploadQueue
    /// A mount of several refs: each remote with the tags it takes, the SOURCE's first (its
    /// queue is `uploads`). nil: a mount of one source, which takes every tag.
    public var destinations: [TagDestination]?
    /// Tags the last close of `index.json` did not queue, and why. BuildKit ignores the error
    /// that close returns, so they are reported again when the mount ends.
    let refusals = Refusals()
    /// Tags written that no source takes, each logged once.
    let localTags = LocalTags()

    public init(staging: StagingArea, uploads: UploadQueue, destinations: [TagDestination]? = nil) {
        precondition(destinations.map { $0.first?.queue === uploads } ?? true, "the SOURCE's queue comes first")
        self.staging = staging
        self.uploads = uploads
        self.destinations = destinations
    }

    /// Every queue of the mount.
    var queues: [UploadQueue] { destinations?.map(\.queue) ?? [uploads] }

    /// Where `tag` is published, with what its remote is known to hold (nil: everything the
    /// mount shows, as in a mount of one source); nil when no source takes the tag.
    func destination(of tag: String) -> (queue: UploadQueue, remoteBlobs: Set<Digest>?)? {
        guard let destinations else { return (uploads, nil) }
        return destinations.first { $0.tags.contains(tag) }.map { ($0.queue, $0.remoteBlobs) }
    }

    /// A staging area and an upload queue in the cache directory of `store`, the queue
    /// resuming what an earlier mount of the same remote left in its journal.
    public init(store: ContentStore, publisher: any CachePublisher, logger: Logger) throws(CacheError) {
        self.init(staging: try StagingArea(cacheDirectory: store.directory),
                  uploads: try UploadQueue(store: store, publisher: publisher, logger: logger))
    }
}

/// One remote of a writable mount of several refs (`--tag NAME=SOURCE`): the tags published
/// to it and what it holds. A tag it takes is published once every blob the tag reaches is on
/// this remote: a blob it does not hold is uploaded first, from the local cache or copied from
/// the remote that has it.
public struct TagDestination: Sendable {
    public var queue: UploadQueue
    public var tags: Set<String>
    /// The blobs its refs' resolutions listed.
    public var remoteBlobs: Set<Digest>

    public init(queue: UploadQueue, tags: Set<String>, remoteBlobs: Set<Digest>) {
        self.queue = queue
        self.tags = tags
        self.remoteBlobs = remoteBlobs
    }
}

/// Tags written that no source of the mount takes: they stay in the mount, and the log says
/// so once for each.
final class LocalTags: Sendable {
    private let logged = Mutex<Set<String>>([])

    func firstTime(_ tag: String) -> Bool { logged.withLock { $0.insert(tag).inserted } }
}

/// What the commit of `index.json` refused, as of its last close.
final class Refusals: Sendable {
    private let items = Mutex<[UnpublishedItem]>([])

    func replace(with refused: [UnpublishedItem]) { items.withLock { $0 = refused } }
    var all: [UnpublishedItem] { items.withLock { $0 } }
}

/// The files a writable layout starts with besides the snapshot's.
struct WritableLayout {
    var index: StagedFile
    var ociLayout: StagedFile
    /// Blobs committed by an earlier mount and not yet published, or reached by a tag not yet
    /// published: the layout shows them as the remote will.
    var unpublishedBlobs: [Digest: Int64]
}

/// A writable mount: local-filesystem semantics everywhere but in `blobs/`, whose blobs are
/// content-addressed and immutable.
///
/// - Every regular file a client makes (or rewrites: `index.json`, `oci-layout`) is a file in
///   the staging area; directories are in memory.
/// - `rename(<file>, blobs/sha256/<hex>)` commits a blob: the file's sha256 must be `<hex>`
///   (else EIO and nothing changes); it then moves into the content store, becomes immutable,
///   and its upload is journaled and queued. Onto an existing blob (the same bytes by
///   definition) the file replaces it in the namespace and nothing is uploaded again.
/// - Anything else that would change `blobs/` or a blob's bytes fails with EPERM: creating or
///   writing there, truncating a blob, moving a blob or a directory there, removing `blobs`
///   or `blobs/sha256`. chmod and utimens of a blob succeed (BuildKit makes blobs 0444).
/// - `unlink` of a blob (BuildKit's `reset=true`) removes it from the mount and from the local
///   cache (after its upload, if one is pending); never from the remote.
/// - The close (`flush`) of `index.json` after it changed commits its tags (`flush`).
extension CacheFilesystem {
    /// A writable mount of `snapshot`, showing also what its upload queue still has to
    /// publish (blobs committed before a crash, tags not yet published), and starting that
    /// queue.
    public convenience init(snapshot: CacheSnapshot, fetcher: BlobFetcher, logger: Logger,
                            writable: WritableMount) throws(CacheError) {
        let queues = writable.queues
        let pending = queues.flatMap(\.pendingTags)
        var tags = snapshot.tags.filter { tagged in !pending.contains { $0.tag == tagged.tag } }
        tags += pending.map { OCILayout.TaggedManifest(tag: $0.tag, manifest: $0.manifest) }
        var unpublished: [Digest: Int64] = [:]
        for queue in queues { unpublished.merge(queue.pendingBlobs) { first, _ in first } }
        for publication in pending {
            for blob in publication.blobs { unpublished[blob.digest] = blob.size }
        }
        let staged = WritableLayout(index: try writable.staging.newFile(holding: OCILayout.indexFile(tags)),
                                    ociLayout: try writable.staging.newFile(holding: OCILayout.ociLayoutFile),
                                    unpublishedBlobs: unpublished)
        let (state, blobsInode) = Self.layout(snapshot, staged: staged)
        self.init(state: state, blobsInode: blobsInode, snapshot: snapshot, fetcher: fetcher, logger: logger,
                  scratchCapacity: Self.defaultScratchCapacity, writable: writable)
        // A mount of several refs knows each remote's tags from its own refs (`destinations`).
        if writable.destinations == nil { writable.uploads.noteRemoteTags(snapshot.tags) }
        for queue in queues { queue.start() }
    }

    /// The errno for a failed operation on the staging area or the content store.
    private static func errno(of error: CacheError) -> FSError {
        error.isOutOfSpace ? .noSpace : .ioError
    }

    // MARK: Files

    func createStaged(parent: UInt64, name: String, permissions: UInt32, flags: OpenFlags,
                      in writable: WritableMount) -> Result<(Entry, OpenedFile), FSError> {
        // O_CREAT without O_EXCL on a name that exists (another thread made it after the
        // kernel looked) opens it.
        let existing = state.withLock { state -> Result<UInt64?, FSError> in
            guard let directory = state.nodes[parent], !directory.unlinked else { return .failure(.noSuchFileOrDirectory) }
            guard let children = directory.children else { return .failure(.notDirectory) }
            guard let inode = children[name] else { return .success(nil) }
            if flags.exclusive { return .failure(.fileExists) }
            if state.nodes[inode]!.children != nil { return .failure(.isDirectory) }
            state.nodes[inode]!.lookups += 1
            return .success(inode)
        }
        switch existing {
        case .failure(let error):
            return .failure(error)
        case .success(let inode?):
            switch open(inode, flags: flags) {
            case .success(let opened):
                return getattr(inode).map { ($0, opened) }
            case .failure(let error):
                forget(inode, count: 1)
                return .failure(error)
            }
        case .success(nil):
            break
        }
        let file: StagedFile
        do throws(CacheError) {
            file = try writable.staging.newFile()
        } catch {
            logger.error("cannot create a file in the staging area", metadata: ["error": "\(error)"])
            return .failure(Self.errno(of: error))
        }
        return state.withLock { state in
            Self.insert(parent: parent, name: name, content: .stagedFile(file), permissions: permissions, refusal: refusal, in: &state)
                .map { inode in
                    state.nodes[inode]!.lookups += 1
                    state.nodes[inode]!.opens += 1
                    return (entry(inode, state.nodes[inode]!), OpenedFile.stagedFile)
                }
        }
    }

    /// The staged file of `inode`, noted as changed now, or why it cannot be changed.
    private func stagedFileForChange(_ inode: UInt64, missing: FSError) -> Result<StagedFile, FSError> {
        state.withLock { state in
            guard var node = state.nodes[inode] else { return .failure(missing) }
            guard case .stagedFile(let file) = node.content else {
                return .failure(node.children == nil ? refusal : .isDirectory)
            }
            node.changed = true
            node.modified = .now()
            state.nodes[inode] = node
            return .success(file)
        }
    }

    func writeStaged(_ inode: UInt64, offset: Int64, data: UnsafeRawBufferPointer,
                     in writable: WritableMount) -> Result<Int, FSError> {
        guard offset >= 0 else { return .failure(.invalidArgument) }
        return stagedFileForChange(inode, missing: .badFileDescriptor).flatMap { file in
            do throws(CacheError) {
                try file.write(data, at: offset)
                // Most likely a blob on its way to `blobs/sha256`: its upload need not wait for the rename.
                writable.uploads.beginEarlyUpload(of: file) { ingestAnnouncement(of: inode) }
                return .success(data.count)
            } catch {
                // Committed by a rename since it was looked up: it is a blob now, as if the
                // rename had come first.
                if file.isCommitted { return .failure(.badFileDescriptor) }
                logger.error("write to the staging area failed", metadata: ["error": "\(error)"])
                return .failure(Self.errno(of: error))
            }
        }
    }

    /// The blob a client announced for the staged file `inode` when it is an ingest's `data`
    /// (BuildKit's exports: `ingest/<id>/{ref,total,data}`, see `AnnouncedBlob`).
    func ingestAnnouncement(of inode: UInt64) -> AnnouncedBlob? {
        let (ref, total) = state.withLock { state -> (StagedFile?, StagedFile?) in
            guard let node = state.nodes[inode], node.name == "data", let siblings = state.nodes[node.parent]?.children else {
                return (nil, nil)
            }
            func staged(_ name: String) -> StagedFile? {
                guard let sibling = siblings[name], case .stagedFile(let file)? = state.nodes[sibling]?.content else { return nil }
                return file
            }
            return (staged("ref"), staged("total"))
        }
        // Both are one short line; anything longer is no announcement.
        guard let ref = try? ref?.contents(limit: 4096), let total = try? total?.contents(limit: 64) else { return nil }
        return AnnouncedBlob(ingestRef: ref, total: total)
    }

    func truncate(_ file: StagedFile, to size: Int64) -> Result<Void, FSError> {
        do throws(CacheError) {
            try file.truncate(to: size)
            return .success(())
        } catch {
            // Committed by a rename since it was looked up: its name is gone from where it was.
            if file.isCommitted { return .failure(.noSuchFileOrDirectory) }
            logger.error("truncation in the staging area failed", metadata: ["error": "\(error)"])
            return .failure(Self.errno(of: error))
        }
    }

    func readStaged(_ file: StagedFile, offset: Int64, count: Int,
                    reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void) {
        guard offset >= 0, count >= 0 else { return reply(.failure(.invalidArgument)) }
        // SAFETY: freed when this call returns; `reply` must not keep the bytes (its contract).
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { buffer.deallocate() }
        do throws(CacheError) {
            let filled = try file.read(into: buffer, offset: offset)
            reply(.success(UnsafeRawBufferPointer(rebasing: buffer[..<filled])))
        } catch {
            logger.error("read from the staging area failed", metadata: ["error": "\(error)"])
            reply(.failure(.ioError))
        }
    }

    func setattrWritable(_ inode: UInt64, _ changes: AttributeChanges) -> Result<Entry, FSError> {
        if let size = changes.size {
            guard size >= 0 else { return .failure(.invalidArgument) }
            switch stagedFileForChange(inode, missing: .noSuchFileOrDirectory) {
            case .success(let file):
                if case .failure(let error) = truncate(file, to: size) { return .failure(error) }
            case .failure(let error):
                return .failure(error)
            }
        }
        return state.withLock { state in
            guard var node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
            // The `files/` view shows a layer as it is, on every mount.
            guard node.member == nil || changes.isEmpty else { return .failure(refusal) }
            if let permissions = changes.permissions { node.permissions = permissions & 0o7777 }
            if let modified = changes.modified { node.modified = modified }
            state.nodes[inode] = node
            return .success(entry(inode, node))
        }
    }

    // MARK: Names

    /// A blob unlinked from the mount leaves the local cache too, once uploaded if its upload
    /// is pending. The remote keeps it.
    func forgetBlob(_ digest: Digest, in writable: WritableMount) {
        let awaitingUpload = writable.queues.filter { $0.discardWhenPublished(digest) }
        if awaitingUpload.isEmpty { writable.uploads.store.discardComplete(digest) }
    }

    /// The staged file `name` in `parent`, if that is what it is.
    func stagedFile(named name: String, in parent: UInt64) -> StagedFile? {
        state.withLock { state in
            guard let inode = state.nodes[parent]?.children?[name], case .stagedFile(let file) = state.nodes[inode]!.content else { return nil }
            return file
        }
    }

    /// The commit point of a blob: `rename(<staged file>, blobs/sha256/<hex>)`.
    func commitBlob(_ file: StagedFile, from parent: UInt64, name: String, as hex: String,
                    in writable: WritableMount) -> Result<Void, FSError> {
        guard let digest = Digest(hex: hex) else {
            logger.error("a file renamed into blobs/sha256 must be named by the sha256 of its content; rename refused",
                         metadata: ["name": "\(hex)"])
            return .failure(.ioError)
        }
        let store = writable.uploads.store
        let outcome: Result<Bool?, FSError>
        do {
            // No write can change the file from its check until it is in the store.
            outcome = try file.whileUnchanging { actual, size throws(CacheError) -> Result<Bool?, FSError> in
                guard actual == digest else {
                    logger.error("a file renamed into blobs/sha256 does not match its name; rename refused, nothing uploaded",
                                 metadata: ["name": "\(digest)", "content": "\(actual)", "size": "\(size)"])
                    file.giveUpEarlyUpload("its rename into blobs/sha256 was refused")
                    return .failure(.ioError)
                }
                try file.sync(dataOnly: false)
                // A blob the mount shows already is on the remote or on its way there.
                let shown = state.withLock { $0.nodes[blobsInode]!.children![hex] != nil }
                let prepared = shown ? false : try writable.uploads.prepareUpload(digest, size: size)
                let placed = state.withLock { state -> Result<Void, FSError> in
                    guard let source = state.nodes[parent]?.children?[name], case .stagedFile(let current) = state.nodes[source]!.content,
                          current === file else { return .failure(.noSuchFileOrDirectory) }
                    do {
                        try file.moveIntoStore(store, as: digest)
                    } catch {
                        logger.error("cannot move a committed blob into the cache", metadata: ["digest": "\(digest)", "error": "\(error)"])
                        return .failure(.ioError)
                    }
                    if let target = state.nodes[blobsInode]!.children![hex] { Self.detach(target, in: &state) }
                    Self.move(source, from: parent, name, to: blobsInode, hex, in: &state)
                    state.nodes[source]!.content = .lazyBlob(digest, size: size)
                    state.nodes[source]!.changed = false
                    return .success(())
                }
                return placed.map { prepared }
                    .mapError { error in
                        if prepared { writable.uploads.cancelUpload(digest) }
                        return error
                    }
            }
        } catch {
            logger.error("cannot commit a blob", metadata: ["digest": "\(digest)", "error": "\(error)"])
            return .failure(Self.errno(of: error))
        }
        guard case .success(let prepared) = outcome else {
            file.giveUpEarlyUpload("its commit failed")
            return outcome.map { _ in () }
        }
        store.syncBlobsDirectory()
        let early = file.takeEarlyUpload()
        if prepared == true {
            writable.uploads.startUpload(digest, sentEarlyBy: early)
        } else if let early {
            writable.uploads.abandonInBackground(early)
        }
        return .success(())
    }

    // MARK: Commit points and durability

    /// The close of a file handle (FUSE's flush: its error is what close() returns). The close
    /// of `index.json` after it changed is the commit point of its tags: each tag that now
    /// points elsewhere than the remote's (or than the publication already queued) is queued
    /// for publication after the blobs it reaches, if all of them are in the mount. EIO when
    /// `index.json` is not a valid OCI index or a changed tag reaches a blob the mount lacks;
    /// such a tag is not published. Always succeeds in a read-only mount.
    public func flush(_ inode: UInt64, handle: UInt64 = 0) -> Result<Void, FSError> {
        // ENOSYS: the kernel stops sending flushes, as it stopped sending opens.
        guard let writable else { return opensSkipped.load(ordering: .relaxed) ? .failure(.notImplemented) : .success(()) }
        let index = state.withLock { state -> StagedFile? in
            guard var node = state.nodes[inode], node.changed, !node.unlinked, node.parent == Self.rootInode, node.name == "index.json",
                  case .stagedFile(let file) = node.content else { return nil }
            node.changed = false
            state.nodes[inode] = node
            return file
        }
        guard let index else { return .success(()) }
        return publishTags(in: index, to: writable)
    }

    /// fsync of a staged file syncs it; everything else is already as durable as it gets (the
    /// remote, the content store) or lives in memory. Always succeeds in a read-only mount.
    public func fsync(_ inode: UInt64, dataOnly: Bool) -> Result<Void, FSError> {
        guard writable != nil, case .stagedFile(let file)? = state.withLock({ $0.nodes[inode]?.content }) else { return .success(()) }
        do throws(CacheError) {
            try file.sync(dataOnly: dataOnly)
            return .success(())
        } catch {
            logger.error("fsync in the staging area failed", metadata: ["error": "\(error)"])
            return .failure(Self.errno(of: error))
        }
    }

    /// Directories live in memory; blob renames are synced as they commit.
    public func fsyncdir(_ inode: UInt64, dataOnly: Bool) -> Result<Void, FSError> { .success(()) }

    /// Waits for the upload queue to publish what it can (see `UploadQueue.drain`), and
    /// returns what it could not, with what the last close of `index.json` refused; nothing
    /// in a read-only mount.
    public func drainUploads(progress: (UploadProgress) -> Void = { _ in }) -> [UnpublishedItem] {
        guard let writable else { return [] }
        return writable.refusals.all + writable.queues.flatMap { $0.drain(progress: progress) }
    }

    // MARK: Tags

    /// The most `index.json` and a manifest may hold: far beyond what BuildKit writes (a
    /// registry takes manifests up to 4 MiB).
    static let indexLimit = 16 << 20
    static let manifestLimit = 4 << 20
    /// Cache configs larger than BuildKit reads (1 MiB) are still published whole.
    static let configLimit = 64 << 20

    private func publishTags(in index: StagedFile, to writable: WritableMount) -> Result<Void, FSError> {
        func refuseIndex(_ reason: String) -> Result<Void, FSError> {
            writable.refusals.replace(with: [.index(reason: reason)])
            return .failure(.ioError)
        }
        let manifests: [Descriptor]
        do {
            guard let bytes = try index.contents(limit: Self.indexLimit) else {
                logger.error("index.json is larger than \(Self.indexLimit) bytes; no tag published")
                return refuseIndex("larger than \(Self.indexLimit) bytes")
            }
            guard case .index(_, let entries) = try ManifestContent.parse(bytes) else {
                logger.error("index.json is an image manifest, not an OCI index; no tag published")
                return refuseIndex("an image manifest, not an OCI index")
            }
            manifests = entries
        } catch let error as ManifestError {
            logger.error("index.json is not a valid OCI index; no tag published", metadata: ["error": "\(error)"])
            return refuseIndex("not a valid OCI index: \(error)")
        } catch {
            logger.error("cannot read index.json", metadata: ["error": "\(error)"])
            return refuseIndex("cannot be read: \(error)")
        }
        // BuildKit's importer takes the first entry of a name.
        var tags: [String: Descriptor] = [:]
        for entry in manifests {
            guard let tag = entry.annotations?[Annotation.refName], tags[tag] == nil else { continue }
            tags[tag] = Descriptor(mediaType: entry.mediaType, digest: entry.digest, size: entry.size)
        }
        var refused: [UnpublishedItem] = []
        for (tag, manifest) in tags.sorted(by: { $0.key < $1.key }) {
            guard let (uploads, remoteBlobs) = writable.destination(of: tag) else {
                if writable.localTags.firstTime(tag) {
                    logger.notice("tag \(tag) is taken by none of the mount's sources; it stays local", metadata: ["tag": "\(tag)"])
                }
                continue
            }
            guard uploads.changedTags([tag: manifest.digest]).contains(tag) else { continue }
            switch publication(of: tag, manifest: manifest) {
            case .success(let publication):
                do {
                    let lacking = remoteBlobs.map { held in publication.blobs.filter { !held.contains($0.digest) } } ?? []
                    try uploads.enqueueTag(publication, uploadingFirst: lacking)
                } catch {
                    logger.error("cannot queue the publication of a tag", metadata: ["tag": "\(tag)", "error": "\(error)"])
                    refused.append(.tag(tag, reason: "cannot be queued: \(error)"))
                }
            case .failure(let problem):
                logger.error("tag not published: \(problem.message)", metadata: ["tag": "\(tag)"])
                refused.append(.tag(tag, reason: problem.message))
            }
        }
        writable.refusals.replace(with: refused)
        return refused.isEmpty ? .success(()) : .failure(.ioError)
    }

    private struct TagProblem: Error {
        var message: String
    }

    /// What publishing `tag` takes, once everything it reaches is known to be in the mount.
    private func publication(of tag: String, manifest: Descriptor) -> Result<TagPublication, TagProblem> {
        let manifestBytes: [UInt8]
        switch wholeBlob(manifest, limit: Self.manifestLimit, role: "manifest") {
        case .success(let bytes): manifestBytes = bytes
        case .failure(let problem): return .failure(problem)
        }
        let content: ManifestContent
        do {
            content = try ManifestContent.parse(manifestBytes, contentType: manifest.mediaType.isEmpty ? nil : manifest.mediaType)
        } catch {
            return .failure(TagProblem(message: "manifest \(manifest.digest) is not a valid manifest: \(error)"))
        }
        let reached: [Descriptor]
        let small: [Descriptor]
        switch content {
        case .image(_, let config, let layers):
            reached = [config] + layers
            small = [config]
        case .index(_, let entries):
            reached = entries
            small = content.buildkitCacheConfig.map { [$0] } ?? []
        }
        for blob in reached {
            if case .failure(let problem) = shownBlob(blob, role: "blob referenced by manifest \(manifest.digest)") { return .failure(problem) }
        }
        var smallBlobs: [Digest: [UInt8]] = [:]
        for blob in small {
            switch wholeBlob(blob, limit: Self.configLimit, role: "cache config") {
            case .success(let bytes): smallBlobs[blob.digest] = bytes
            case .failure(let problem): return .failure(problem)
            }
        }
        let blobs = ([manifest] + reached).map { Descriptor(mediaType: $0.mediaType, digest: $0.digest, size: $0.size) }
        return .success(TagPublication(tag: tag, manifest: manifest, manifestBytes: manifestBytes, smallBlobs: smallBlobs, blobs: blobs))
    }

    /// The node's content, when `blobs/sha256` shows the blob with the size `descriptor` gives.
    private func shownBlob(_ descriptor: Descriptor, role: String) -> Result<Content, TagProblem> {
        state.withLock { state in
            guard let inode = state.nodes[blobsInode]!.children![descriptor.digest.hex] else {
                return .failure(TagProblem(message: "\(role) \(descriptor.digest) is neither committed in the mount nor on the remote"))
            }
            let shownSize = entry(inode, state.nodes[inode]!).attributes.size
            guard shownSize == descriptor.size else {
                return .failure(TagProblem(message: "\(role) \(descriptor.digest) has \(shownSize) bytes, not the \(descriptor.size) its descriptor says"))
            }
            return .success(state.nodes[inode]!.content)
        }
    }

    /// A blob's bytes, from memory or through the content cache (local once committed here).
    private func wholeBlob(_ descriptor: Descriptor, limit: Int, role: String) -> Result<[UInt8], TagProblem> {
        let content: Content
        switch shownBlob(descriptor, role: role) {
        case .success(let shown): content = shown
        case .failure(let problem): return .failure(problem)
        }
        guard descriptor.size <= Int64(limit) else {
            return .failure(TagProblem(message: "\(role) \(descriptor.digest) has \(descriptor.size) bytes, more than the \(limit) a \(role) may have"))
        }
        switch content {
        case .bytes(let bytes):
            return .success(bytes)
        case .lazyBlob(let digest, let size):
            return readThroughCache(digest, size: size).mapError { error in
                TagProblem(message: "\(role) \(digest) cannot be read: \(error)")
            }
        default:
            return .failure(TagProblem(message: "\(role) \(descriptor.digest) is not a blob"))
        }
    }

    /// Reads a whole blob through the fetcher, 1 MiB at a time, waiting for each piece.
    private func readThroughCache(_ digest: Digest, size: Int64) -> Result<[UInt8], BlobReadError> {
        let piece = 1 << 20
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Int(size))
        while Int64(bytes.count) < size {
            let answer = Mutex<Result<[UInt8], BlobReadError>?>(nil)
            let done = DispatchSemaphore(value: 0)
            fetcher.read(digest, size: size, offset: Int64(bytes.count), count: piece) { result in
                answer.withLock { $0 = result.map { Array($0) } }
                done.signal()
            }
            done.wait()
            switch answer.withLock({ $0 })! {
            case .success(let part) where !part.isEmpty: bytes += part
            case .success: return .failure(.local("blob \(digest) ended after \(bytes.count) of \(size) bytes"))
            case .failure(let error): return .failure(error)
            }
        }
        return .success(bytes)
    }
}
