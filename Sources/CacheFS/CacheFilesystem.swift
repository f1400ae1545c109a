import ContentCache
import LayerView
import Logging
import OCI
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// The filesystem core: an OCI image layout over a remote cache, plus a local scratch area for
/// the small writes that clients make even when they only import (lock files, probe
/// directories, `ingest/`). It knows nothing of libfuse; the binding forwards kernel requests
/// to these methods and tests call them directly.
///
/// A writable mount (`WritableMount`, see CacheFilesystem+Writable.swift) also takes exports:
/// what clients write is staged on disk, a rename into `blobs/sha256` commits a blob and the
/// close of a changed `index.json` commits its tags, both published by an upload queue.
public final class CacheFilesystem: Sendable {
    public static let rootInode: UInt64 = 1
    /// Immutable content: the kernel may cache names and attributes for a long time.
    static let immutableCacheSeconds = 86_400.0
    /// Scratch entries change under the kernel's eyes only through us, but stay modest.
    static let scratchCacheSeconds = 1.0
    /// Scratch data lives in memory; clients write a few bytes, so a small cap is plenty.
    public static let defaultScratchCapacity = 64 << 20
    /// The most bytes all scratch files may hold together.
    public let scratchCapacity: Int

    enum Content {
        /// `creatable`: new names may be made here (they become scratch entries).
        case directory(children: DirectoryEntries, creatable: Bool)
        case bytes([UInt8])
        case lazyBlob(Digest, size: Int64)
        /// `layers/sha256/<hex>`: the uncompressed tar of a layer blob.
        case layer(LayerSpec)
        /// Below `files/sha256/<hex>`: a member of the layer's tar that is no directory (a
        /// regular file's bytes are at `dataOffset` of the uncompressed stream).
        case layerMember(LayerSpec, TarEntry)
        case scratchFile([UInt8])
        case scratchDirectory(children: DirectoryEntries)
        /// A regular file of a writable mount: its bytes are on disk, in the staging area.
        case stagedFile(StagedFile)
    }

    struct Node {
        var parent: UInt64
        var name: String
        var content: Content
        var permissions: UInt32
        var modified: Timestamp
        var lookups = 0
        var opens = 0
        var unlinked = false
        /// Written or truncated since its last flush (the commit point of `index.json`).
        var changed = false
        /// Set for what the `files/` view shows of a layer: its owner and link count.
        var member: MemberAttributes?
        /// A lazy blob read while the kernel skips opens: see CacheFilesystem+ZeroMessageOpens.
        var incarnation: Incarnation?

        /// Made by clients: they may change and remove it.
        var isScratch: Bool {
            switch content {
            case .scratchFile, .scratchDirectory, .stagedFile: return true
            default: return false
            }
        }

        var children: DirectoryEntries? {
            switch content {
            case .directory(let children, _), .scratchDirectory(let children): return children
            default: return nil
            }
        }

        /// New names may be created in this directory.
        var acceptsNewEntries: Bool {
            switch content {
            case .directory(_, let creatable): return creatable
            case .scratchDirectory: return true
            default: return false
            }
        }
    }

    struct State {
        var nodes: [UInt64: Node] = [:]
        var nextInode: UInt64 = CacheFilesystem.rootInode + 1
        var scratchBytes = 0
        /// `files/sha256/<hex>` directories whose trees are not made yet: the first lookup or
        /// listing in one makes it.
        var unbuiltTrees: [UInt64: LayerSpec] = [:]
    }

    let state: Mutex<State>
    let fetcher: BlobFetcher
    /// The `layers/` view's decompression.
    let layers: LayerReader
    /// The `files/` view's lists of each layer's members.
    let members: LayerMemberIndex
    /// Drops what the kernel cached of an inode's content; set by the binding.
    let pageCacheInvalidator = Mutex<(@Sendable (UInt64, _ spared: [Range<Int64>]) -> Void)?>(nil)
    /// Drops the kernel's cached lookup of a name; set by the binding.
    let entryInvalidator = Mutex<(@Sendable (_ parent: UInt64, _ name: String) -> Void)?>(nil)
    /// True once the kernel opens, flushes and releases files without telling us.
    let opensSkipped = Atomic<Bool>(false)
    let logger: Logger
    private let uid: UInt32
    private let gid: UInt32

    /// What a read of a layer fetches ahead of BuildKit.
    let chainAhead: Mutex<ChainAhead>
    /// Set when the mount takes exports.
    let writable: WritableMount?
    /// What refuses a change the mount does not allow: the whole filesystem is read-only
    /// without `writable`; with it, only the content-addressed blobs and the fixed directories
    /// holding them are immutable.
    let refusal: FSError
    /// `blobs/sha256`, where a rename commits a blob.
    let blobsInode: UInt64

    /// A read-only mount.
    public convenience init(snapshot: CacheSnapshot, fetcher: BlobFetcher, logger: Logger,
                            scratchCapacity: Int = CacheFilesystem.defaultScratchCapacity) {
        let (state, blobsInode) = Self.layout(snapshot)
        self.init(state: state, blobsInode: blobsInode, snapshot: snapshot, fetcher: fetcher, logger: logger,
                  scratchCapacity: scratchCapacity, writable: nil)
    }

    init(state: sending State, blobsInode: UInt64, snapshot: CacheSnapshot, fetcher: BlobFetcher, logger: Logger,
         scratchCapacity: Int, writable: WritableMount?) {
        self.scratchCapacity = scratchCapacity
        self.fetcher = fetcher
        self.layers = LayerReader(fetcher: fetcher, logger: logger)
        self.members = LayerMemberIndex(layers: layers, logger: logger)
        self.logger = logger
        self.chainAhead = Mutex(ChainAhead(successors: Self.nextLayers(snapshot)))
        self.uid = getuid()
        self.gid = getgid()
        self.state = Mutex(state)
        self.blobsInode = blobsInode
        self.writable = writable
        self.refusal = writable == nil ? .readOnlyFileSystem : .notPermitted
        fetcher.onWithdrawnContent { [weak self] digest, spared in self?.withdraw(digest, sparing: spared) }
    }

    /// `invalidate` is called with an inode whose cached pages must go (they came from a
    /// download that then failed its digest), except those of `spared` byte ranges: reads of
    /// them are waiting for their answer, which comes once `invalidate` returns.
    public func onPageCacheInvalid(_ invalidate: @escaping @Sendable (UInt64, _ spared: [Range<Int64>]) -> Void) {
        pageCacheInvalidator.withLock { $0 = invalidate }
    }

    private func withdraw(_ digest: Digest, sparing spared: [Range<Int64>]) {
        let (inodes, retired) = state.withLock { state in
            let inodes = state.nodes.filter { _, node in
                if case .lazyBlob(digest, _) = node.content { return true }
                return false
            }.map(\.key)
            return (inodes, inodes.compactMap { Self.retire($0, in: &state) })
        }
        if let invalidate = pageCacheInvalidator.withLock({ $0 }) {
            for inode in inodes { invalidate(inode, spared) }
        }
        if let invalidate = entryInvalidator.withLock({ $0 }) {
            for name in retired { invalidate(name.parent, name.name) }
        }
    }

    // MARK: Layout

    /// The layout and the inode of `blobs/sha256`. A writable mount's `staged` gives the files
    /// clients may rewrite (`index.json`, `oci-layout`) and the blobs and tags it still has to
    /// publish.
    static func layout(_ snapshot: CacheSnapshot, staged: WritableLayout? = nil) -> (State, UInt64) {
        var state = State()
        let now = Timestamp.now()
        func add(_ parent: UInt64, _ name: String, _ content: Content, permissions: UInt32) -> UInt64 {
            let inode = state.nextInode
            state.nextInode += 1
            state.nodes[inode] = Node(parent: parent, name: name, content: content, permissions: permissions, modified: now)
            state.nodes[parent]?.children?[name] = inode
            return inode
        }
        let root = rootInode
        state.nodes[root] = Node(parent: root, name: "", content: .directory(children: DirectoryEntries(), creatable: true),
                                 permissions: 0o755, modified: now)
        if let staged {
            _ = add(root, "oci-layout", .stagedFile(staged.ociLayout), permissions: 0o644)
            _ = add(root, "index.json", .stagedFile(staged.index), permissions: 0o644)
            _ = add(root, "ingest", .scratchDirectory(children: DirectoryEntries()), permissions: 0o755)
        } else {
            _ = add(root, "oci-layout", .bytes(OCILayout.ociLayoutFile), permissions: 0o444)
            _ = add(root, "index.json", .bytes(OCILayout.indexFile(snapshot.tags)), permissions: 0o444)
            // containerd 1.x clients MkdirAll ingest/ on every open; it is scratch space.
            _ = add(root, "ingest", .directory(children: DirectoryEntries(), creatable: true), permissions: 0o755)
        }
        let blobs = add(root, "blobs", .directory(children: DirectoryEntries(), creatable: false), permissions: 0o755)
        let sha256 = add(blobs, "sha256", .directory(children: DirectoryEntries(), creatable: false), permissions: 0o755)
        // In no particular order: listings sort names themselves, and sorting 100,000 digests
        // here cost 6% of such a mount.
        state.nodes.reserveCapacity(state.nodes.count + snapshot.smallBlobs.count + snapshot.lazyBlobs.count)
        state.nodes[sha256]!.children!.reserveCapacity(snapshot.smallBlobs.count + snapshot.lazyBlobs.count)
        for (digest, bytes) in snapshot.smallBlobs {
            _ = add(sha256, digest.hex, .bytes(bytes), permissions: 0o444)
        }
        for (digest, size) in snapshot.lazyBlobs {
            _ = add(sha256, digest.hex, .lazyBlob(digest, size: size), permissions: 0o444)
        }
        for (digest, size) in staged?.unpublishedBlobs ?? [:] where state.nodes[sha256]!.children![digest.hex] == nil {
            _ = add(sha256, digest.hex, .lazyBlob(digest, size: size), permissions: 0o444)
        }
        // Beside the layout, never part of it: the uncompressed tar of every layer the tags reach.
        let layers = add(root, "layers", .directory(children: DirectoryEntries(), creatable: false), permissions: 0o555)
        let layersSHA256 = add(layers, "sha256", .directory(children: DirectoryEntries(), creatable: false), permissions: 0o555)
        let specs = layerSpecs(snapshot)
        for spec in specs.values {
            _ = add(layersSHA256, spec.digest.hex, .layer(spec), permissions: 0o444)
        }
        // And the files inside each of those layers, as a tree made on first use.
        let files = add(root, "files", .directory(children: DirectoryEntries(), creatable: false), permissions: 0o555)
        let filesSHA256 = add(files, "sha256", .directory(children: DirectoryEntries(), creatable: false), permissions: 0o555)
        for spec in specs.values {
            let tree = add(filesSHA256, spec.digest.hex, .directory(children: DirectoryEntries(), creatable: false), permissions: 0o555)
            state.unbuiltTrees[tree] = spec
        }
        return (state, sha256)
    }

    /// Successors from every tag's cache config; a layer that two configs continue differently
    /// has none.
    static func nextLayers(_ snapshot: CacheSnapshot) -> [Digest: (digest: Digest, size: Int64)] {
        var successors: [Digest: Digest?] = [:]
        for tag in snapshot.tags {
            guard let bytes = snapshot.smallBlobs[tag.manifest.digest],
                  let manifest = try? ManifestContent.parse(bytes, contentType: tag.manifest.mediaType) else { continue }
            var config = manifest.buildkitCacheConfig
            if case .image(_, let imageConfig, _) = manifest, imageConfig.mediaType == MediaType.buildkitCacheConfig {
                config = imageConfig
            }
            guard let config, let configBytes = snapshot.smallBlobs[config.digest],
                  let chains = CacheChains.successors(inConfig: configBytes) else { continue }
            for (layer, next) in chains {
                if let known = successors[layer], known != next { successors[layer] = .some(nil) } else { successors[layer] = next }
            }
        }
        return successors.compactMapValues { next in next.flatMap { next in snapshot.lazyBlobs[next].map { (next, $0) } } }
    }

    // MARK: Reading the tree

    public func lookup(parent: UInt64, name: String) -> Result<Entry, FSError> {
        if case .failure(let error) = buildFileTree(parent) { return .failure(error) }
        let layer = state.withLock { state in state.nodes[parent]?.children?[name].flatMap { Self.layerSpec(of: $0, in: state) } }
        if let layer, case .failure(let error) = indexLayer(layer) { return .failure(error) }
        return state.withLock { state in
            guard let directory = state.nodes[parent] else { return .failure(.noSuchFileOrDirectory) }
            guard let children = directory.children else { return .failure(.notDirectory) }
            guard let inode = children[name] else { return .failure(.noSuchFileOrDirectory) }
            state.nodes[inode]!.lookups += 1
            return .success(entry(inode, state.nodes[inode]!))
        }
    }

    /// The kernel dropped `count` references to an inode; unlinked scratch entries go away.
    public func forget(_ inode: UInt64, count: Int) {
        let unpinned = state.withLock { state -> (BlobFetcher.ReaderID, Digest)? in
            guard var node = state.nodes[inode] else { return nil }
            node.lookups = max(0, node.lookups - count)
            // The kernel dropped the inode, and its cached pages with it.
            let incarnation = node.lookups == 0 ? node.incarnation : nil
            if node.lookups == 0 { node.incarnation = nil }
            state.nodes[inode] = node
            Self.dropIfUnreferenced(inode, in: &state)
            guard let pin = incarnation?.pin, case .lazyBlob(let digest, _) = node.content else { return nil }
            return (pin, digest)
        }
        if let (pin, digest) = unpinned { fetcher.closeReader(pin, of: digest) }
    }

    public func getattr(_ inode: UInt64) -> Result<Entry, FSError> {
        if let layer = state.withLock({ Self.layerSpec(of: inode, in: $0) }), case .failure(let error) = indexLayer(layer) {
            return .failure(error)
        }
        return state.withLock { state in
            guard let node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
            return .success(entry(inode, node))
        }
    }

    /// The directory's entries in name order after `.` and `..`, from the `offset`-th, at most
    /// `limit` of them: the kernel lists a large directory a page at a time.
    public func readdir(_ inode: UInt64, offset: Int = 0, limit: Int = .max) -> Result<[DirectoryEntry], FSError> {
        if case .failure(let error) = buildFileTree(inode) { return .failure(error) }
        return state.withLock { state in Self.listing(inode, offset: offset, limit: limit, in: state) }
    }

    /// `readdir` with each entry's attributes, so that the kernel needs no lookup per name
    /// (readdirplus: `ls -l` of 100,000 blobs made 100,000 LOOKUP round trips). The kernel counts
    /// every entry but `.` and `..` as looked up; so does this, and `forget` takes back those
    /// that did not fit in the kernel's buffer.
    public func readdirPlus(_ inode: UInt64, offset: Int, limit: Int) -> Result<[(entry: DirectoryEntry, attributes: Entry?)], FSError> {
        if case .failure(let error) = buildFileTree(inode) { return .failure(error) }
        return state.withLock { state in
            Self.listing(inode, offset: offset, limit: limit, in: state).map { entries in
                entries.map { entry in
                    guard entry.name != "." && entry.name != ".." else { return (entry, nil) }
                    // A layer's size may need a pass over it: without attributes here, the
                    // kernel asks for them (getattr, lookup) only when a tool stats the file.
                    // Layer entries are never removed, so the lookup count the kernel keeps
                    // for them need not be mirrored.
                    if let layer = Self.layerSpec(of: entry.inode, in: state), self.layers.knownSize(of: layer) == nil { return (entry, nil) }
                    state.nodes[entry.inode]!.lookups += 1
                    return (entry, self.entry(entry.inode, state.nodes[entry.inode]!))
                }
            }
        }
    }

    private static func listing(_ inode: UInt64, offset: Int, limit: Int, in state: State) -> Result<[DirectoryEntry], FSError> {
        guard let node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
        guard let children = node.children else { return .failure(.notDirectory) }
        let dots = [DirectoryEntry(name: ".", inode: inode, type: .directory),
                    DirectoryEntry(name: "..", inode: node.parent, type: .directory)]
        let start = max(offset, 0)
        var entries = Array(dots.dropFirst(start).prefix(limit))
        let names = children.orderedNames()
        let first = min(max(start - dots.count, 0), names.count)
        for name in names[first..<min(names.count, first + max(limit - entries.count, 0))] {
            let child = children[name]!
            entries.append(DirectoryEntry(name: name, inode: child, type: fileType(of: state.nodes[child]!)))
        }
        return .success(entries)
    }

    /// Whether the inode is a directory, for opendir.
    public func isDirectory(_ inode: UInt64) -> Result<Void, FSError> {
        if case .failure(let error) = buildFileTree(inode) { return .failure(error) }
        return state.withLock { state in
            guard let node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
            return node.children == nil ? .failure(.notDirectory) : .success(())
        }
    }

    /// Opens a file. No network I/O happens here: clients open a blob once per 1 MiB chunk.
    /// The kernel may keep its page cache for a blob across opens only once every byte it can
    /// be given is verified: until then a download that fails its digest must take back what
    /// it answered.
    public func open(_ inode: UInt64, flags: OpenFlags) -> Result<OpenedFile, FSError> {
        // The kernel takes ENOSYS as "open every file without asking from now on".
        if opensSkipped.load(ordering: .relaxed) { return .failure(.notImplemented) }
        if let layer = state.withLock({ Self.layerSpec(of: inode, in: $0) }), !flags.wantsWrite, !flags.truncates,
           case .failure(let error) = indexLayer(layer) {
            return .failure(error)
        }
        return openNode(inode, flags: flags).flatMap { opened, then in
            switch then {
            case .nothing:
                return .success(opened)
            case .openReader(let lazyBlob):
                let reader = fetcher.openReader(lazyBlob)
                return .success(OpenedFile(keepCache: reader.verified, handle: reader.reader.rawValue, needsFlush: opened.needsFlush))
            case .truncate(let file):
                if case .failure(let error) = truncate(file, to: 0) {
                    release(inode)
                    return .failure(error)
                }
                return .success(opened)
            }
        }
    }

    private func lazyBlobDigest(_ inode: UInt64) -> Digest? {
        state.withLock { state in
            switch state.nodes[inode]?.content {
            case .lazyBlob(let digest, _)?: return digest
            case .layer(let spec)?: return spec.digest
            default: return nil
            }
        }
    }

    static func layerSpec(of inode: UInt64, in state: State) -> LayerSpec? {
        guard case .layer(let spec)? = state.nodes[inode]?.content else { return nil }
        return spec
    }

    /// Makes sure the layer's index exists, making the pass over it on the worker pool when no
    /// mount of this cache directory made it before; this thread waits for it.
    private func indexLayer(_ layer: LayerSpec) -> Result<Void, FSError> {
        guard layers.knownSize(of: layer) == nil else { return .success(()) }
        return layers.index(of: layer).map { _ in () }.mapError { error in
            if case .cancelled = error {} else {
                logger.warning("layer cannot be presented", metadata: ["digest": "\(layer.digest)", "error": "\(error)"])
            }
            return .ioError
        }
    }

    /// What an open has still to do once the state is unlocked.
    private enum AfterOpen {
        case nothing
        /// Keep the blob out of eviction while it is open.
        case openReader(Digest)
        /// O_TRUNC of a staged file.
        case truncate(StagedFile)
    }

    private func openNode(_ inode: UInt64, flags: OpenFlags) -> Result<(OpenedFile, AfterOpen), FSError> {
        state.withLock { state in
            guard var node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
            switch node.content {
            case .directory, .scratchDirectory:
                return .failure(.isDirectory)
            case .layerMember(_, let member) where member.kind != .regular:
                // The kernel opens devices and fifos itself and follows symlinks: never here.
                return .failure(.invalidArgument)
            case .bytes, .lazyBlob, .layer, .layerMember:
                if flags.wantsWrite || flags.truncates { return .failure(refusal) }
                node.opens += 1
                state.nodes[inode] = node
                let opened = OpenedFile(keepCache: true, needsFlush: false)
                if case .lazyBlob(let digest, _) = node.content { return .success((opened, .openReader(digest))) }
                if case .layer(let spec) = node.content { return .success((opened, .openReader(spec.digest))) }
                return .success((opened, .nothing))
            case .stagedFile(let file):
                node.opens += 1
                let truncates = flags.truncates && flags.wantsWrite
                if truncates {
                    node.changed = true
                    node.modified = .now()
                }
                state.nodes[inode] = node
                return .success((OpenedFile.stagedFile, truncates ? .truncate(file) : .nothing))
            case .scratchFile(let bytes):
                if flags.truncates && flags.wantsWrite {
                    state.scratchBytes -= bytes.count
                    node.content = .scratchFile([])
                    node.modified = .now()
                }
                node.opens += 1
                state.nodes[inode] = node
                return .success((OpenedFile(keepCache: false), .nothing))
            }
        }
    }

    /// `handle` is what `open` returned.
    public func release(_ inode: UInt64, handle: UInt64 = 0) {
        if let digest = lazyBlobDigest(inode), handle != 0 {
            fetcher.closeReader(BlobFetcher.ReaderID(rawValue: handle), of: digest)
        }
        state.withLock { state in
            guard state.nodes[inode] != nil else { return }
            state.nodes[inode]!.opens = max(0, state.nodes[inode]!.opens - 1)
            Self.dropIfUnreferenced(inode, in: &state)
        }
    }

    /// Reads `count` bytes at `offset`. `reply` is called exactly once, on this thread when the
    /// bytes are local, later when they must come from the remote; the bytes it gets are valid
    /// only during the call.
    /// `handle` is what `open` returned (0 for a read outside any open).
    public func read(_ inode: UInt64, handle: UInt64 = 0, offset: Int64, count: Int,
                     reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void) {
        let content: Content? = state.withLock { $0.nodes[inode]?.content }
        switch content {
        case nil:
            reply(.failure(.badFileDescriptor))
        case .directory?, .scratchDirectory?:
            reply(.failure(.isDirectory))
        case .bytes(let bytes)?, .scratchFile(let bytes)?:
            bytes.withUnsafeBytes { all in
                let start = (0..<Int64(all.count)).contains(offset) ? Int(offset) : all.count
                reply(.success(UnsafeRawBufferPointer(rebasing: all[start..<min(all.count, start + count)])))
            }
        case .stagedFile(let file)?:
            readStaged(file, offset: offset, count: count, reply: reply)
        case .layer(let layer)?:
            readLayer(layer, offset: offset, count: count, reply: reply)
        case .layerMember(let layer, let member)?:
            readMember(member, of: layer, offset: offset, count: count, reply: reply)
        case .lazyBlob(let digest, let size)?:
            if let ahead = chainAhead.withLock({ $0.layers(after: digest, now: .now) }) {
                fetcher.prefetch(ahead)
            }
            let logger = self.logger
            var reader = handle == 0 ? nil : BlobFetcher.ReaderID(rawValue: handle)
            let incarnation = handle == 0 && opensSkipped.load(ordering: .relaxed)
            if incarnation {
                guard let read = incarnationReader(inode, of: digest) else { return reply(.failure(.ioError)) }
                reader = read
            }
            fetcher.read(digest, size: size, offset: offset, count: count, reader: reader) { [self] result in
                // Only a verified blob answers a read that reaches its end.
                if incarnation, case .success(let bytes) = result, bytes.count > 0, offset + Int64(bytes.count) >= size {
                    incarnationVerified(inode, of: digest)
                }
                reply(result.mapError { error in
                    if case .cancelled = error {} else {
                        logger.warning("read failed", metadata: ["digest": "\(digest)", "offset": "\(offset)", "error": "\(error)"])
                    }
                    return .ioError
                })
            }
        }
    }

    private func readLayer(_ layer: LayerSpec, offset: Int64, count: Int,
                           reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void) {
        let logger = self.logger
        layers.read(layer, offset: offset, count: count) { result in
            reply(result.mapError { error in
                if case .cancelled = error {} else {
                    logger.warning("layer read failed", metadata: ["digest": "\(layer.digest)", "offset": "\(offset)", "error": "\(error)"])
                }
                return .ioError
            })
        }
    }

    // MARK: Scratch writes

    public func create(parent: UInt64, name: String, permissions: UInt32, flags: OpenFlags) -> Result<(Entry, OpenedFile), FSError> {
        if let writable { return createStaged(parent: parent, name: name, permissions: permissions, flags: flags, in: writable) }
        return state.withLock { state in
            switch Self.insert(parent: parent, name: name, content: .scratchFile([]), permissions: permissions, refusal: refusal, in: &state) {
            case .success(let inode):
                state.nodes[inode]!.lookups += 1
                // Without opens the kernel sends no release either.
                if !opensSkipped.load(ordering: .relaxed) { state.nodes[inode]!.opens += 1 }
                return .success((entry(inode, state.nodes[inode]!), OpenedFile(keepCache: false)))
            case .failure(let error):
                return .failure(error)
            }
        }
    }

    public func mkdir(parent: UInt64, name: String, permissions: UInt32) -> Result<Entry, FSError> {
        state.withLock { state in
            Self.insert(parent: parent, name: name, content: .scratchDirectory(children: DirectoryEntries()), permissions: permissions,
                        refusal: refusal, in: &state)
                .map { inode in
                    state.nodes[inode]!.lookups += 1
                    return entry(inode, state.nodes[inode]!)
                }
        }
    }

    public func write(_ inode: UInt64, offset: Int64, data: UnsafeRawBufferPointer) -> Result<Int, FSError> {
        if let writable { return writeStaged(inode, offset: offset, data: data, in: writable) }
        return state.withLock { state in
            guard var node = state.nodes[inode] else { return .failure(.badFileDescriptor) }
            guard case .scratchFile(var bytes) = node.content else {
                return .failure(node.children == nil ? .readOnlyFileSystem : .isDirectory)
            }
            guard offset >= 0 else { return .failure(.invalidArgument) }
            // The kernel allows offsets up to Int64.max: the room left is compared, not the sum,
            // so that a write far past the end is refused instead of overflowing.
            let (end, overflowed) = Int(offset).addingReportingOverflow(data.count)
            let growth = overflowed ? Int.max : max(0, end - bytes.count)
            guard growth <= scratchCapacity - state.scratchBytes else { return .failure(.noSpace) }
            if end > bytes.count { bytes.append(contentsOf: repeatElement(0, count: end - bytes.count)) }
            bytes.replaceSubrange(Int(offset)..<end, with: data)
            node.content = .scratchFile(bytes)
            node.modified = .now()
            state.scratchBytes += growth
            state.nodes[inode] = node
            return .success(data.count)
        }
    }

    public func setattr(_ inode: UInt64, _ changes: AttributeChanges) -> Result<Entry, FSError> {
        if writable != nil { return setattrWritable(inode, changes) }
        return state.withLock { state in
            guard var node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
            guard node.isScratch || changes.isEmpty else { return .failure(.readOnlyFileSystem) }
            if let size = changes.size {
                guard case .scratchFile(var bytes) = node.content else { return .failure(.isDirectory) }
                guard size >= 0 else { return .failure(.invalidArgument) }
                guard max(0, Int(size) - bytes.count) <= scratchCapacity - state.scratchBytes else { return .failure(.noSpace) }
                state.scratchBytes += Int(size) - bytes.count
                if Int(size) < bytes.count {
                    bytes.removeLast(bytes.count - Int(size))
                } else {
                    bytes.append(contentsOf: repeatElement(0, count: Int(size) - bytes.count))
                }
                node.content = .scratchFile(bytes)
                node.modified = .now()
            }
            if let permissions = changes.permissions { node.permissions = permissions & 0o7777 }
            if let modified = changes.modified { node.modified = modified }
            state.nodes[inode] = node
            return .success(entry(inode, node))
        }
    }

    public func unlink(parent: UInt64, name: String) -> Result<Void, FSError> {
        remove(parent: parent, name: name, directory: false)
    }

    public func rmdir(parent: UInt64, name: String) -> Result<Void, FSError> {
        remove(parent: parent, name: name, directory: true)
    }

    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String) -> Result<Void, FSError> {
        if let writable, newParent == blobsInode, let file = stagedFile(named: name, in: parent) {
            return commitBlob(file, from: parent, name: name, as: newName, in: writable)
        }
        return state.withLock { state in
            guard let source = state.nodes[parent]?.children?[name], state.nodes[newParent]?.unlinked == false else {
                return .failure(.noSuchFileOrDirectory)
            }
            // A name renamed onto itself changes nothing, as on any filesystem, blobs included;
            // a read-only mount refuses to rename its own entries at all.
            if writable != nil && state.nodes[newParent]!.children?[newName] == source { return .success(()) }
            guard state.nodes[source]!.isScratch, state.nodes[newParent]!.acceptsNewEntries else {
                return .failure(refusal)
            }
            guard Self.isValidName(newName) else { return .failure(.nameTooLong) }
            // A directory may not move below itself. The new parent is attached, so every
            // ancestor up to the root is too.
            var ancestor = newParent
            var belowItself = false
            while ancestor != Self.rootInode {
                if ancestor == source { belowItself = true }
                ancestor = state.nodes[ancestor]!.parent
            }
            if let target = state.nodes[newParent]?.children?[newName] {
                if target == source { return .success(()) }
                let targetNode = state.nodes[target]!
                guard targetNode.isScratch else { return .failure(refusal) }
                let sourceIsDirectory = state.nodes[source]!.children != nil
                if let children = targetNode.children {
                    guard sourceIsDirectory else { return .failure(.isDirectory) }
                    guard children.isEmpty else { return .failure(.directoryNotEmpty) }
                } else if sourceIsDirectory {
                    return .failure(.notDirectory)
                }
            }
            // Only once nothing can fail does anything change.
            if belowItself { return .failure(.invalidArgument) }
            if let target = state.nodes[newParent]!.children?[newName] { Self.detach(target, in: &state) }
            Self.move(source, from: parent, name, to: newParent, newName, in: &state)
            return .success(())
        }
    }

    public func statfs() -> FilesystemStatistics {
        let files = state.withLock { UInt64($0.nodes.count) }
        return FilesystemStatistics(blockSize: 4096, files: files, nameMax: 255)
    }

    // MARK: Helpers

    func entry(_ inode: UInt64, _ node: Node) -> Entry {
        let type = fileType(of: node)
        let size: Int64
        var device: UInt64 = 0
        switch node.content {
        case .bytes(let bytes), .scratchFile(let bytes): size = Int64(bytes.count)
        case .stagedFile(let file): size = file.size
        case .lazyBlob(_, let blobSize): size = blobSize
        case .layer(let layer): size = layers.knownSize(of: layer) ?? 0
        case .layerMember(_, let member):
            // A symlink's size is its target's length, as lstat gives it.
            size = member.kind == .symlink ? Int64(member.linkTarget.utf8.count) : member.size
            device = Self.deviceNumber(major: member.deviceMajor, minor: member.deviceMinor)
        case .directory, .scratchDirectory: size = 4096
        }
        var attributes = FileAttributes(inode: inode, type: type, permissions: node.permissions,
                                        linkCount: node.member?.linkCount ?? (type == .directory ? 2 : (node.unlinked ? 0 : 1)),
                                        size: size, modified: node.modified, uid: node.member?.uid ?? uid, gid: node.member?.gid ?? gid)
        attributes.device = device
        return Entry(attributes: attributes, cacheSeconds: node.isScratch ? Self.scratchCacheSeconds : Self.immutableCacheSeconds)
    }

    private func remove(parent: UInt64, name: String, directory: Bool) -> Result<Void, FSError> {
        let removed = state.withLock { state -> Result<Digest?, FSError> in
            guard let inode = state.nodes[parent]?.children?[name] else { return .failure(.noSuchFileOrDirectory) }
            let node = state.nodes[inode]!
            // A writable mount's blobs may go too (BuildKit's `reset=true` prunes them); the
            // `layers/` view is never changed.
            guard node.isScratch || writable != nil else { return .failure(refusal) }
            if case .layer = node.content { return .failure(refusal) }
            if node.member != nil { return .failure(refusal) }
            if directory {
                guard let children = node.children else { return .failure(.notDirectory) }
                guard node.isScratch else { return .failure(refusal) }
                guard children.isEmpty else { return .failure(.directoryNotEmpty) }
            } else if node.children != nil {
                return .failure(.isDirectory)
            }
            Self.detach(inode, in: &state)
            switch node.content {
            case .lazyBlob(let digest, _): return .success(digest)
            case .bytes: return .success(Digest(hex: name))
            default: return .success(nil)
            }
        }
        if let writable, case .success(let digest?) = removed { forgetBlob(digest, in: writable) }
        return removed.map { _ in () }
    }

    /// `refusal` answers a directory that takes no new names.
    static func insert(parent: UInt64, name: String, content: Content, permissions: UInt32, refusal: FSError,
                       in state: inout State) -> Result<UInt64, FSError> {
        // A removed directory the kernel still references takes no new names.
        guard let directory = state.nodes[parent], !directory.unlinked else { return .failure(.noSuchFileOrDirectory) }
        guard let children = directory.children else { return .failure(.notDirectory) }
        guard children[name] == nil else { return .failure(.fileExists) }
        guard directory.acceptsNewEntries else { return .failure(refusal) }
        guard isValidName(name) else { return .failure(.nameTooLong) }
        let inode = state.nextInode
        state.nextInode += 1
        state.nodes[inode] = Node(parent: parent, name: name, content: content, permissions: permissions & 0o7777, modified: .now())
        setChild(parent, name, inode, in: &state)
        return .success(inode)
    }

    static func move(_ inode: UInt64, from parent: UInt64, _ name: String, to newParent: UInt64, _ newName: String,
                     in state: inout State) {
        setChild(parent, name, nil, in: &state)
        setChild(newParent, newName, inode, in: &state)
        state.nodes[inode]!.parent = newParent
        state.nodes[inode]!.name = newName
    }

    static func setChild(_ parent: UInt64, _ name: String, _ child: UInt64?, in state: inout State) {
        state.nodes[parent]!.children?[name] = child
    }

    static func detach(_ inode: UInt64, in state: inout State) {
        let node = state.nodes[inode]!
        setChild(node.parent, node.name, nil, in: &state)
        // Its bytes live on in the open file while the kernel still references the inode.
        if case .stagedFile(let file) = node.content { file.removeName() }
        state.nodes[inode]!.unlinked = true
        dropIfUnreferenced(inode, in: &state)
    }

    static func dropIfUnreferenced(_ inode: UInt64, in state: inout State) {
        guard let node = state.nodes[inode], node.unlinked, node.lookups == 0, node.opens == 0 else { return }
        if case .scratchFile(let bytes) = node.content { state.scratchBytes -= bytes.count }
        state.nodes[inode] = nil
    }

    static func isValidName(_ name: String) -> Bool { !name.isEmpty && name.utf8.count <= 255 }
}

/// A directory's names and their inodes. A class, changed in place: adding the 100,000th blob
/// must not copy the other 99,999 (a struct in an enum payload is copied out and back).
/// Touched only under the filesystem's state lock.
final class DirectoryEntries {
    private var byName: [String: UInt64] = [:]
    /// The names in order, for listings; made by the first listing after a change.
    private var ordered: [String]?

    subscript(name: String) -> UInt64? {
        get { byName[name] }
        set {
            byName[name] = newValue
            ordered = nil
        }
    }

    var isEmpty: Bool { byName.isEmpty }

    /// Growing the table name by name rehashed it 17 times on the way to 100,000 blobs.
    func reserveCapacity(_ count: Int) { byName.reserveCapacity(count) }

    func orderedNames() -> [String] {
        if let ordered { return ordered }
        let names = byName.keys.sorted()
        ordered = names
        return names
    }
}

public struct OpenedFile: Sendable, Equatable {
    /// Immutable, verified content: the kernel may keep cached pages across opens.
    public var keepCache: Bool
    /// Given back with every read and the release of this open.
    public var handle: UInt64 = 0
    /// Whether its close must reach the filesystem (`flush`): only files a client may write
    /// need it, and a close the kernel keeps to itself saves every 1 MiB chunk a round trip.
    public var needsFlush = true
    /// Reads and writes bypass the kernel's page cache of the mount's file: a file a client
    /// writes in a writable mount is staged on disk, and a second copy of its bytes in the
    /// mount's page cache would cost the writer a copy and the machine its memory.
    public var directIO = false

    /// An open of a file staged in a writable mount.
    static let stagedFile = OpenedFile(keepCache: false, directIO: true)
}

public struct FilesystemStatistics: Sendable {
    public var blockSize: UInt64
    public var files: UInt64
    public var nameMax: UInt64
}

extension CacheFilesystem {
    /// Fails reads still waiting on the network and returns once none is owed a reply.
    public func shutdown() { fetcher.shutdown() }
}
