import ContentCache
import LayerView
import Logging
import OCI
import Synchronization

/// The owner and link count the `files/` view gives what it shows of a layer, from the tar.
struct MemberAttributes {
    var uid: UInt32
    var gid: UInt32
    var linkCount: UInt32
}

extension CacheFilesystem {
    /// How long a lookup or listing in `files/sha256/<hex>` waits for the walk over the layer
    /// (and the pass before it, on a layer never read on this machine): past that it answers
    /// EIO, and the walk goes on for the next try.
    static let memberWalkWait: Duration = .seconds(600)

    static func fileType(of node: Node) -> FileType {
        switch node.content {
        case .layerMember(_, let member):
            switch member.kind {
            case .symlink: return .symlink
            case .characterDevice: return .characterDevice
            case .blockDevice: return .blockDevice
            case .fifo: return .fifo
            case .regular, .hardLink, .directory: return .regular
            }
        default:
            return node.children == nil ? .regular : .directory
        }
    }

    func fileType(of node: Node) -> FileType { Self.fileType(of: node) }

    /// glibc's `makedev`.
    static func deviceNumber(major: UInt32, minor: UInt32) -> UInt64 {
        let major = UInt64(major), minor = UInt64(minor)
        return (major & 0xFFF) << 8 | (major & ~0xFFF) << 32 | (minor & 0xFF) | (minor & ~0xFF) << 12
    }

    /// A symlink's target; EINVAL for anything else, as readlink(2) answers.
    public func readlink(_ inode: UInt64) -> Result<String, FSError> {
        state.withLock { state in
            guard let node = state.nodes[inode] else { return .failure(.noSuchFileOrDirectory) }
            guard case .layerMember(_, let member) = node.content, member.kind == .symlink else { return .failure(.invalidArgument) }
            return .success(member.linkTarget)
        }
    }

    /// Makes the tree of `files/sha256/<hex>` when `inode` is such a directory not made yet:
    /// the layer's members (from the cache directory, or a walk over the layer on the worker
    /// pool, which this thread waits for) placed as `tar -x` would place them.
    func buildFileTree(_ inode: UInt64) -> Result<Void, FSError> {
        guard let layer = state.withLock({ $0.unbuiltTrees[inode] }) else { return .success(()) }
        let entries: [TarEntry]
        switch members.members(of: layer, waitingAtMost: Self.memberWalkWait) {
        case .success(let found):
            entries = found
        case .failure(let error):
            if error != .cancelled {
                logger.warning("the files of a layer cannot be shown", metadata: ["digest": "\(layer.digest)", "error": "\(error)"])
            }
            return .failure(.ioError)
        }
        let tree = TarTree(entries: entries)
        guard !tree.exceedsNodeLimit else {
            logger.warning("the files of a layer cannot be shown: its members make more than \(TarTree.defaultNodeLimit) files and directories",
                           metadata: ["digest": "\(layer.digest)"])
            return .failure(.ioError)
        }
        if tree.problemCount > 0 {
            logger.warning("some members of a layer's tar cannot be shown", metadata: [
                "digest": "\(layer.digest)", "left out": "\(tree.problemCount)",
                "first": "\(tree.problems.prefix(3).joined(separator: "; "))",
            ])
        }
        state.withLock { state in
            // Another thread may have made it meanwhile.
            guard state.unbuiltTrees.removeValue(forKey: inode) != nil, state.nodes[inode] != nil else { return }
            Self.place(tree, of: layer, at: inode, in: &state)
        }
        return .success(())
    }

    /// Adds the tree's nodes below `root`; a node with several names (hard links) gets one
    /// inode. The root keeps the view's own attributes: the kernel may have cached them.
    private static func place(_ tree: TarTree, of layer: LayerSpec, at root: UInt64, in state: inout State) {
        var inodes: [Int: UInt64] = [0: root]
        var pending = [0]
        state.nodes.reserveCapacity(state.nodes.count + tree.nodes.count)
        while let directory = pending.popLast() {
            let parent = inodes[directory]!
            for (name, child) in tree.nodes[directory].children {
                if let existing = inodes[child] {
                    setChild(parent, name, existing, in: &state)
                    continue
                }
                let node = tree.nodes[child]
                let entry = node.entry
                let content: Content = entry.kind == .directory
                    ? .directory(children: DirectoryEntries(), creatable: false)
                    : .layerMember(layer, entry)
                let inode = state.nextInode
                state.nextInode += 1
                var added = Node(parent: parent, name: name, content: content, permissions: entry.mode & 0o7777,
                                 modified: Timestamp(seconds: Int(entry.modifiedSeconds), nanoseconds: Int(entry.modifiedNanoseconds)))
                added.member = MemberAttributes(uid: entry.uid, gid: entry.gid, linkCount: UInt32(clamping: node.linkCount))
                state.nodes[inode] = added
                setChild(parent, name, inode, in: &state)
                inodes[child] = inode
                if entry.kind == .directory { pending.append(child) }
            }
        }
    }

    /// A regular file of a layer: its range of the uncompressed stream, read through the
    /// `layers/` view's random access. A sparse member's bytes are not stored as they read:
    /// EIO rather than wrong bytes.
    func readMember(_ member: TarEntry, of layer: LayerSpec, offset: Int64, count: Int,
                    reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void) {
        guard member.kind == .regular else { return reply(.failure(.invalidArgument)) }
        guard !member.isSparse else {
            logger.warning("a sparse file of a layer is not read (its bytes are not stored as they read)",
                           metadata: ["digest": "\(layer.digest)", "path": "\(member.path)"])
            return reply(.failure(.ioError))
        }
        guard offset >= 0 else { return reply(.failure(.invalidArgument)) }
        let end = min(member.size, offset + Int64(count))
        guard offset < end else { return reply(.success(UnsafeRawBufferPointer(start: nil, count: 0))) }
        let wanted = Int(end - offset)
        let logger = self.logger
        layers.read(layer, offset: member.dataOffset + offset, count: wanted) { result in
            switch result {
            case .success(let bytes) where bytes.count == wanted:
                reply(.success(bytes))
            case .success:
                // The stream ends before the member's data: the tar lied about its size.
                logger.warning("a layer's file ends past its tar", metadata: ["digest": "\(layer.digest)", "path": "\(member.path)"])
                reply(.failure(.ioError))
            case .failure(let error):
                if case .cancelled = error {} else {
                    logger.warning("layer read failed", metadata: ["digest": "\(layer.digest)", "path": "\(member.path)", "error": "\(error)"])
                }
                reply(.failure(.ioError))
            }
        }
    }
}
