import ContentCache
import OCI
import Synchronization

/// Zero-message opens: a read-only mount lets the kernel open, flush and release files without
/// a request each (buildctl opens a blob once per 1 MiB chunk, and waited for every OPEN).
///
/// The fetcher's integrity rules were kept per open file handle: a handle answered with bytes
/// of a download that then failed its digest fails from then on, and the kernel kept no pages
/// of an unverified blob across opens. Without opens the kernel keeps every file's pages across
/// opens and gives reads no handle, so a lazy blob's inode stands in for the handle: its reads
/// carry one reader of the fetcher (its `Incarnation`), and when a download that answered it
/// fails, the inode is retired (its reads fail; its cached pages are dropped) and its name
/// leads to a new inode, whose page cache starts empty.
struct Incarnation {
    /// Names this inode's reads to the fetcher.
    let reader: BlobFetcher.ReaderID
    /// Keeps the blob out of eviction while the kernel may hold pages of it that are not
    /// verified yet: a partial download evicted before its digest is checked could never take
    /// back what it answered.
    var pin: BlobFetcher.ReaderID?
    /// A download that answered it failed its digest: every read fails.
    var retired = false
}

extension CacheFilesystem {
    /// Whether the kernel may open files without asking: only a read-only mount, whose closes
    /// commit nothing.
    public var acceptsSkippedOpens: Bool { writable == nil }

    /// The kernel opens files without asking from now on (called by the binding when the
    /// kernel offers it, before any file is opened). `open` and `flush` answer ENOSYS, which
    /// the kernel takes as "do not send these again".
    public func skipOpens() {
        precondition(acceptsSkippedOpens, "a writable mount commits tags at the close of index.json")
        opensSkipped.store(true, ordering: .relaxed)
    }

    /// `invalidate` is called with a name whose inode was retired: the kernel must look it up
    /// again.
    public func onEntryInvalid(_ invalidate: @escaping @Sendable (_ parent: UInt64, _ name: String) -> Void) {
        entryInvalidator.withLock { $0 = invalidate }
    }

    /// The reader a read of the lazy blob at `inode` goes with, pinning the blob unless it is
    /// verified; nil when the inode is retired.
    func incarnationReader(_ inode: UInt64, of digest: Digest) -> BlobFetcher.ReaderID? {
        enum Known { case retired, pinned(BlobFetcher.ReaderID), unpinned }
        let known = state.withLock { state -> Known in
            guard let incarnation = state.nodes[inode]?.incarnation else { return .unpinned }
            if incarnation.retired { return .retired }
            return incarnation.pin == nil ? .unpinned : .pinned(incarnation.reader)
        }
        switch known {
        case .retired: return nil
        case .pinned(let reader): return reader
        case .unpinned: break
        }
        // One lock and at most one `access`, as an open cost before.
        let (opened, verified) = fetcher.openReader(digest)
        let (reader, unneeded) = state.withLock { state -> (BlobFetcher.ReaderID?, BlobFetcher.ReaderID?) in
            guard var node = state.nodes[inode] else { return (opened, opened) }
            var incarnation = node.incarnation ?? Incarnation(reader: opened)
            if incarnation.retired { return (nil, opened) }
            var unneeded: BlobFetcher.ReaderID? = opened
            if !verified && incarnation.pin == nil {
                incarnation.pin = opened
                unneeded = nil
            }
            node.incarnation = incarnation
            state.nodes[inode] = node
            return (incarnation.reader, unneeded)
        }
        if let unneeded { fetcher.closeReader(unneeded, of: digest) }
        return reader
    }

    /// A read of the inode reached the blob's end, so the blob is verified: the kernel's pages
    /// of it are right, and need no pin.
    func incarnationVerified(_ inode: UInt64, of digest: Digest) {
        let pin = state.withLock { state -> BlobFetcher.ReaderID? in
            guard let pin = state.nodes[inode]?.incarnation?.pin, state.nodes[inode]?.incarnation?.retired == false else { return nil }
            state.nodes[inode]!.incarnation!.pin = nil
            return pin
        }
        if let pin { fetcher.closeReader(pin, of: digest) }
    }

    /// Gives the name of a lazy blob the kernel has read through a new inode, and retires the
    /// old one: the name and the retired inode's parent, or nil when it was never read.
    static func retire(_ inode: UInt64, in state: inout State) -> (parent: UInt64, name: String)? {
        guard var node = state.nodes[inode], var incarnation = node.incarnation, !incarnation.retired, !node.unlinked,
              state.nodes[node.parent]?.children?[node.name] == inode else { return nil }
        let renewed = state.nextInode
        state.nextInode += 1
        state.nodes[renewed] = Node(parent: node.parent, name: node.name, content: node.content, permissions: node.permissions,
                                    modified: node.modified)
        setChild(node.parent, node.name, renewed, in: &state)
        incarnation.retired = true
        node.incarnation = incarnation
        // Gone once the kernel forgets it; its pin goes then too.
        node.unlinked = true
        state.nodes[inode] = node
        return (node.parent, node.name)
    }
}
