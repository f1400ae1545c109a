import ContentCache
import OCI
import Synchronization

/// Why a mount cannot show a new resolution.
public struct RefreshRefusal: Error, CustomStringConvertible {
    public var description: String
}

extension CacheFilesystem {
    /// Shows `snapshot` from now on in place of what the mount showed (`ocicachefs refresh`):
    /// `index.json` gets the new tags (the kernel's cached pages and attributes of it are
    /// dropped), blobs the new resolution lists appear, and blobs it no longer lists leave
    /// `blobs/sha256`; `layers/sha256` and `files/sha256` follow the same way. A blob is content-addressed, so a file opened before keeps its inode and
    /// reads the same bytes until it is closed.
    ///
    /// A writable mount's `index.json` is its clients' file, staged and published as they write
    /// it: such a mount is not refreshed.
    public func show(_ snapshot: CacheSnapshot) throws(RefreshRefusal) {
        guard writable == nil else {
            throw RefreshRefusal(description: "a writable mount's index.json belongs to what clients export into it; "
                                 + "only read-only mounts are refreshed")
        }
        let index = state.withLock { state -> UInt64? in
            let now = Timestamp.now()
            /// Makes `directory` list exactly `wanted`: entries it still lists keep their inodes.
            func show(_ wanted: [String: Content], in directory: UInt64) {
                let shown = state.nodes[directory]!.children!
                for name in shown.orderedNames() where wanted[name] == nil {
                    Self.detach(shown[name]!, in: &state)
                }
                for (name, content) in wanted where shown[name] == nil {
                    let inode = state.nextInode
                    state.nextInode += 1
                    state.nodes[inode] = Node(parent: directory, name: name, content: content, permissions: 0o444, modified: now)
                    Self.setChild(directory, name, inode, in: &state)
                }
            }
            var blobs: [String: Content] = [:]
            blobs.reserveCapacity(snapshot.smallBlobs.count + snapshot.lazyBlobs.count)
            for (digest, bytes) in snapshot.smallBlobs { blobs[digest.hex] = .bytes(bytes) }
            for (digest, size) in snapshot.lazyBlobs { blobs[digest.hex] = .lazyBlob(digest, size: size) }
            show(blobs, in: blobsInode)
            let specs = Self.layerSpecs(snapshot)
            if let layers = state.nodes[Self.rootInode]!.children!["layers"].flatMap({ state.nodes[$0]?.children?["sha256"] }) {
                show(Dictionary(uniqueKeysWithValues: specs.values.map { ($0.digest.hex, Content.layer($0)) }), in: layers)
            }
            // A layer's tree is made on first use; one the new resolution drops leaves with it.
            if let files = state.nodes[Self.rootInode]!.children!["files"].flatMap({ state.nodes[$0]?.children?["sha256"] }) {
                let shown = state.nodes[files]!.children!
                let wanted = Set(specs.keys.map(\.hex))
                for name in shown.orderedNames() where !wanted.contains(name) {
                    state.unbuiltTrees[shown[name]!] = nil
                    Self.detach(shown[name]!, in: &state)
                }
                for spec in specs.values where shown[spec.digest.hex] == nil {
                    let inode = state.nextInode
                    state.nextInode += 1
                    state.nodes[inode] = Node(parent: files, name: spec.digest.hex, content: .directory(children: DirectoryEntries(), creatable: false),
                                              permissions: 0o555, modified: now)
                    Self.setChild(files, spec.digest.hex, inode, in: &state)
                    state.unbuiltTrees[inode] = spec
                }
            }
            guard let index = state.nodes[Self.rootInode]!.children!["index.json"] else { return nil }
            state.nodes[index]!.content = .bytes(OCILayout.indexFile(snapshot.tags))
            state.nodes[index]!.modified = now
            return index
        }
        chainAhead.withLock { $0.successors = Self.nextLayers(snapshot) }
        if let index, let invalidate = pageCacheInvalidator.withLock({ $0 }) { invalidate(index, []) }
    }
}
