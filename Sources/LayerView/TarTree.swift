/// A layer's members as the directory tree `tar -x` would make of them, without following any
/// symlink: directories (also those only a path implies), and every other member under its
/// name, hard links as more names of the node they name. Members that cannot be placed (a path
/// leaving the tree, a parent that is not a directory, a hard link to nothing) are left out and
/// said in `problems`.
public struct TarTree: Sendable {
    public struct Node: Sendable {
        /// Its metadata; a directory only a path implied has mode 0755, owner 0:0 and the
        /// modification time of the member that implied it. Never `.hardLink`.
        public var entry: TarEntry
        /// Names of a directory's children, to node indexes.
        public var children: [String: Int]
        /// Names it has in the tree; a directory: 2 and one per subdirectory, as on disk.
        public var linkCount: Int
    }

    /// Node 0 is the layer's root.
    public private(set) var nodes: [Node]
    /// Why members were left out, the first `problemsKept` of them.
    public private(set) var problems: [String] = []
    public private(set) var problemCount = 0
    public static let problemsKept = 16
    /// The most nodes a tree holds. Far more than a real layer has (about a million files at
    /// most), and a bound on what a small hostile blob can cost: each member's path may imply
    /// thousands of directories, and gzip shrinks such a tar a thousandfold.
    public static let defaultNodeLimit = 4_000_000
    /// The members would make more than the node limit: the tree stops there, and is not the
    /// layer's tree.
    public private(set) var exceedsNodeLimit = false

    public init(entries: [TarEntry], nodeLimit: Int = TarTree.defaultNodeLimit) {
        let rootEntry = TarEntry(path: ".", kind: .directory, mode: 0o755)
        nodes = [Node(entry: rootEntry, children: [:], linkCount: 2)]
        for entry in entries {
            place(entry, nodeLimit: nodeLimit)
            if exceedsNodeLimit { break }
        }
        countLinks()
    }

    public var root: Node { nodes[0] }

    /// The node a path names, without following symlinks; nil when there is none.
    public func node(at path: String) -> Int? {
        guard let names = TarPath.components(path) else { return nil }
        var current = 0
        for name in names {
            guard let next = nodes[current].children[name] else { return nil }
            current = next
        }
        return current
    }

    private mutating func problem(_ message: String) {
        problemCount += 1
        if problems.count < Self.problemsKept { problems.append(message) }
    }

    private mutating func place(_ entry: TarEntry, nodeLimit: Int) {
        guard let names = TarPath.components(entry.path) else {
            return problem("\(entry.path.debugDescription) leaves the layer's tree or has a name too long to show: left out")
        }
        // A member adds at most one node per component of its path.
        guard nodes.count + names.count <= nodeLimit else {
            exceedsNodeLimit = true
            return
        }
        guard let name = names.last else {
            // `./`: the root's own metadata.
            guard entry.kind == .directory else { return problem("the layer's root is a \(entry.kind), not a directory: left out") }
            nodes[0].entry = TarEntry(path: ".", kind: .directory, mode: entry.mode, uid: entry.uid, gid: entry.gid,
                                      modifiedSeconds: entry.modifiedSeconds, modifiedNanoseconds: entry.modifiedNanoseconds)
            return
        }
        var parent = 0
        for directory in names.dropLast() {
            if let existing = nodes[parent].children[directory] {
                guard nodes[existing].entry.kind == .directory else {
                    return problem("\(entry.path.debugDescription) is below \(directory.debugDescription), which is not a directory: left out")
                }
                parent = existing
            } else {
                var implied = TarEntry(path: directory, kind: .directory, mode: 0o755)
                implied.modifiedSeconds = entry.modifiedSeconds
                parent = add(implied, named: directory, in: parent)
            }
        }
        let existing = nodes[parent].children[name]
        switch entry.kind {
        case .hardLink:
            guard let target = node(at: entry.linkTarget) else {
                return problem("hard link \(entry.path.debugDescription) names \(entry.linkTarget.debugDescription), which is not in the layer: left out")
            }
            guard nodes[target].entry.kind != .directory else {
                return problem("hard link \(entry.path.debugDescription) names a directory: left out")
            }
            if existing == target { return }
            nodes[parent].children[name] = target
        case .directory:
            if let existing, nodes[existing].entry.kind == .directory {
                // A directory seen again (or implied before): its own header's metadata wins.
                let children = nodes[existing].children
                nodes[existing].entry = entry
                nodes[existing].children = children
            } else {
                _ = add(entry, named: name, in: parent)
            }
        default:
            _ = add(entry, named: name, in: parent)
        }
    }

    private mutating func add(_ entry: TarEntry, named name: String, in parent: Int) -> Int {
        nodes.append(Node(entry: entry, children: [:], linkCount: 0))
        nodes[parent].children[name] = nodes.count - 1
        return nodes.count - 1
    }

    /// Members replaced by later ones of the same name stay in `nodes`, unreachable, with no
    /// links: only names in the tree count.
    private mutating func countLinks() {
        for index in nodes.indices { nodes[index].linkCount = 0 }
        nodes[0].linkCount = 2
        var pending = [0]
        while let directory = pending.popLast() {
            for child in nodes[directory].children.values {
                if nodes[child].entry.kind == .directory {
                    nodes[child].linkCount = 2
                    nodes[directory].linkCount += 1
                    pending.append(child)
                } else {
                    nodes[child].linkCount += 1
                }
            }
        }
    }
}
