import CacheFS
import ContentCache
import Foundation
import Logging
import ModelTesting
import OCI
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Drives the scratch namespace of `CacheFilesystem` (where clients make lock files, probe
/// directories and `ingest/`) through random sequences of create, mkdir, open, write,
/// truncate, release, rename, unlink, rmdir, lookup and forget, and checks every step against
/// a plain in-memory directory tree:
///
/// - every call answers what the model answers, errno included;
/// - every directory lists the model's names in order, with their types;
/// - every file reads the model's bytes, by its name and through handles still open on it
///   after it was renamed or unlinked;
/// - the scratch capacity counts exactly the bytes files hold: a write past it fails with
///   ENOSPC exactly when the model says so;
/// - an inode goes away exactly when it is unlinked, closed and forgotten, and a directory
///   that was removed takes no new names.
///
/// A failing sequence is shrunk to a minimal one and printed with its seed.
@Suite struct ScratchNamespaceModelTests {
    /// `OCICACHEFS_MODEL_SEQUENCES` runs more (`scripts/model-check.sh`).
    static var sequences: Int {
        ProcessInfo.processInfo.environment["OCICACHEFS_MODEL_SEQUENCES"].flatMap(Int.init) ?? 1500
    }

    @Test func randomOperationsMatchTheModel() throws {
        let firstSeed = ProcessInfo.processInfo.environment["OCICACHEFS_MODEL_SEED"].flatMap(UInt64.init) ?? 1
        for seed in firstSeed..<(firstSeed + UInt64(Self.sequences)) {
            let steps = randomSteps(seed: seed, count: 5...60)
            var simulation = try NamespaceSimulation()
            guard let failure = simulation.run(steps) else { continue }
            let minimal = shrink(steps) { candidate in
                guard var simulation = try? NamespaceSimulation() else { return false }
                return simulation.run(candidate) != nil
            }
            var replay = try NamespaceSimulation()
            let trace = replay.trace(minimal)
            Issue.record("seed \(seed): \(failure)\nminimal sequence (\(minimal.count) steps):\n\(trace.joined(separator: "\n"))")
            return
        }
    }

    /// The model must catch a namespace that misbehaves: one that lists a removed name.
    @Test func theModelCatchesAWrongAnswer() throws {
        var caught = false
        for seed in 1...UInt64(300) where !caught {
            var simulation = try NamespaceSimulation()
            simulation.forgetUnlinkInModel = true
            caught = simulation.run(randomSteps(seed: seed, count: 30...30)) != nil
        }
        #expect(caught)
    }
}

/// The model: a tree of directories and files, each known by the inode the real namespace
/// gave it.
final class ModelNode {
    enum Kind: Equatable {
        /// Made by the mount: `creatable` directories take new scratch names.
        case fixedDirectory(creatable: Bool)
        case fixedFile
        case scratchDirectory
        case scratchFile
    }

    let inode: UInt64
    let kind: Kind
    var children: [String: ModelNode] = [:]
    var bytes: [UInt8] = []
    weak var parent: ModelNode?
    var lookups = 0
    var opens = 0
    var unlinked = false

    init(inode: UInt64, kind: Kind, parent: ModelNode?) {
        self.inode = inode
        self.kind = kind
        self.parent = parent
    }

    var isDirectory: Bool {
        switch kind {
        case .fixedDirectory, .scratchDirectory: return true
        default: return false
        }
    }

    var isScratch: Bool {
        switch kind {
        case .scratchDirectory, .scratchFile: return true
        default: return false
        }
    }

    var acceptsNewNames: Bool {
        switch kind {
        case .fixedDirectory(let creatable): return creatable && !unlinked
        case .scratchDirectory: return !unlinked
        default: return false
        }
    }

    /// Still referenced by the kernel: the real namespace must still know the inode.
    var alive: Bool { !unlinked || lookups > 0 || opens > 0 }
}

struct NamespaceSimulation {
    static let capacity = 96
    static let names = ["a", "b", "lock", "ingest", "blobs", "index.json", "", String(repeating: "x", count: 256)]

    let filesystem: CacheFilesystem
    let root: ModelNode
    /// Every node the model knows, live or gone, by inode.
    var nodes: [UInt64: ModelNode] = [:]
    /// Open handles, by the inode they are on.
    var handles: [ModelNode] = []
    var scratchBytes = 0
    var log: [String] = []
    /// A broken model for the self-check: unlinked names stay listed in it.
    var forgetUnlinkInModel = false

    /// One remote and fetcher for every run: scratch operations never reach them. An
    /// uncompressed layer, so that its `layers/` entry needs no pass over it to be stat'ed; an
    /// empty tar (its end-of-archive blocks), so that its `files/` tree lists.
    static let source = InMemorySource(layers: [[UInt8](repeating: 0, count: 1024)], layerMediaType: "application/vnd.oci.image.layer.v1.tar")
    static let fetcher: BlobFetcher? = {
        // Kept while the tests run (the `files/` view reads the layer through it), and made
        // afresh by the next run under the same name, so runs leave one small directory.
        let directory = NSTemporaryDirectory() + "scratch-model-cache"
        try? FileManager.default.removeItem(atPath: directory)
        return (try? ContentStore(directory: directory)).map { BlobFetcher(store: $0, source: source, logger: Logger(label: "model")) }
    }()

    init() throws {
        guard let fetcher = Self.fetcher else { throw FSError.ioError }
        filesystem = CacheFilesystem(snapshot: Self.source.snapshot, fetcher: fetcher, logger: Logger(label: "model"),
                                     scratchCapacity: Self.capacity)
        root = ModelNode(inode: CacheFilesystem.rootInode, kind: .fixedDirectory(creatable: true), parent: nil)
        nodes[root.inode] = root
        try adoptFixedTree(root)
    }

    /// The mount's own entries, as the namespace lists them (tested elsewhere).
    private mutating func adoptFixedTree(_ directory: ModelNode) throws {
        for entry in try filesystem.readdir(directory.inode).get() where entry.name != "." && entry.name != ".." {
            let creatable = entry.name == "ingest" && directory === root
            let node = ModelNode(inode: entry.inode, kind: entry.type == .directory ? .fixedDirectory(creatable: creatable) : .fixedFile,
                                 parent: directory)
            directory.children[entry.name] = node
            nodes[node.inode] = node
            if node.isDirectory { try adoptFixedTree(node) }
        }
    }

    /// The first difference from the model, or nil.
    mutating func run(_ steps: [UInt32]) -> String? {
        for step in steps {
            if let failure = apply(step) ?? checkEverything() { return failure }
        }
        return nil
    }

    mutating func trace(_ steps: [UInt32]) -> [String] {
        for step in steps {
            if let failure = apply(step) ?? checkEverything() {
                log.append("  ✘ \(failure)")
                break
            }
        }
        return log
    }

    // MARK: Steps

    private func directories() -> [ModelNode] {
        nodes.values.filter { $0.isDirectory && $0.alive }.sorted { $0.inode < $1.inode }
    }

    private func pick<T>(_ options: [T], _ bits: UInt32) -> T? {
        options.isEmpty ? nil : options[Int(bits % UInt32(options.count))]
    }

    private func name(_ bits: UInt32) -> String { Self.names[Int(bits % UInt32(Self.names.count))] }

    mutating func apply(_ step: UInt32) -> String? {
        let a = step >> 4, b = step >> 12, c = step >> 20
        switch step % 12 {
        case 0, 1:
            guard let parent = pick(directories(), a) else { return nil }
            return create(parent, name(b), directory: step % 12 == 1)
        case 2:
            guard let node = pick(handles, a) else { return nil }
            return write(node, offset: Int(b % 48), count: Int(c % 40), fill: UInt8(truncatingIfNeeded: step))
        case 3:
            guard let node = pick(nodes.values.filter { $0.alive }.sorted { $0.inode < $1.inode }, a) else { return nil }
            return truncate(node, to: Int(b % 64))
        case 4:
            guard let parent = pick(directories(), a), let (name, node) = pick(parent.children.sorted { $0.key < $1.key }, b) else { return nil }
            return open(node, named: name, truncating: c % 3 == 0)
        case 5:
            guard !handles.isEmpty else { return nil }
            return release(Int(a % UInt32(handles.count)))
        case 6, 7:
            guard let parent = pick(directories(), a) else { return nil }
            let existing = parent.children.keys.sorted()
            let victim = c % 4 == 0 ? name(b) : (pick(existing, b) ?? name(b))
            return remove(parent, victim, directory: step % 12 == 7)
        case 8, 9:
            let directories = directories()
            guard let from = pick(directories, a), let to = pick(directories, c) else { return nil }
            let existing = from.children.keys.sorted()
            return rename(from, pick(existing, b) ?? name(b), to, name(c >> 4))
        case 10:
            guard let parent = pick(directories(), a) else { return nil }
            return lookup(parent, name(b))
        default:
            guard let node = pick(nodes.values.filter { $0.lookups > 0 }.sorted { $0.inode < $1.inode }, a) else { return nil }
            return forget(node)
        }
    }

    private func describe(_ node: ModelNode) -> String { "#\(node.inode)" }

    private func compare<T>(_ what: String, _ real: Result<T, FSError>, _ expected: FSError?) -> String? {
        switch (real, expected) {
        case (.success, nil): return nil
        case (.failure(let error), let expected?) where error == expected: return nil
        case (.failure(let error), nil): return "\(what): got \(error), the model expects success"
        case (.success, let expected?): return "\(what): succeeded, the model expects \(expected)"
        case (.failure(let error), let expected?): return "\(what): got \(error), the model expects \(expected)"
        }
    }

    /// What inserting `name` into `parent` must fail with, if anything.
    private func insertionError(_ parent: ModelNode, _ name: String) -> FSError? {
        if parent.unlinked { return .noSuchFileOrDirectory }
        if parent.children[name] != nil { return .fileExists }
        if !parent.acceptsNewNames { return .readOnlyFileSystem }
        if name.isEmpty || name.utf8.count > 255 { return .nameTooLong }
        return nil
    }

    mutating func create(_ parent: ModelNode, _ name: String, directory: Bool) -> String? {
        let what = "\(directory ? "mkdir" : "create") \(describe(parent))/\(name.prefix(8))"
        log.append(what)
        let expected = insertionError(parent, name)
        let result: Result<Entry, FSError> = directory
            ? filesystem.mkdir(parent: parent.inode, name: name, permissions: 0o755)
            : filesystem.create(parent: parent.inode, name: name, permissions: 0o644, flags: OpenFlags(O_RDWR | O_CREAT)).map(\.0)
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success(let entry) = result else { return nil }
        let node = ModelNode(inode: entry.attributes.inode, kind: directory ? .scratchDirectory : .scratchFile, parent: parent)
        node.lookups = 1
        if !directory {
            node.opens = 1
            handles.append(node)
        }
        parent.children[name] = node
        nodes[node.inode] = node
        return nil
    }

    mutating func write(_ node: ModelNode, offset: Int, count: Int, fill: UInt8) -> String? {
        let what = "write \(describe(node)) \(count)@\(offset)"
        log.append(what)
        let data = [UInt8](repeating: fill, count: count)
        let growth = max(0, offset + count - node.bytes.count)
        let expected: FSError? = scratchBytes + growth > Self.capacity ? .noSpace : nil
        let result = data.withUnsafeBytes { filesystem.write(node.inode, offset: Int64(offset), data: $0) }
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success(let written) = result else { return nil }
        if written != count { return "\(what): wrote \(written) bytes" }
        if offset + count > node.bytes.count { node.bytes += [UInt8](repeating: 0, count: offset + count - node.bytes.count) }
        node.bytes.replaceSubrange(offset..<(offset + count), with: data)
        scratchBytes += growth
        return nil
    }

    mutating func truncate(_ node: ModelNode, to size: Int) -> String? {
        let what = "truncate \(describe(node)) to \(size)"
        log.append(what)
        let expected: FSError?
        switch node.kind {
        case .fixedFile, .fixedDirectory: expected = .readOnlyFileSystem
        case .scratchDirectory: expected = .isDirectory
        case .scratchFile: expected = scratchBytes + max(0, size - node.bytes.count) > Self.capacity ? .noSpace : nil
        }
        let result = filesystem.setattr(node.inode, AttributeChanges(size: Int64(size)))
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success = result else { return nil }
        scratchBytes += size - node.bytes.count
        node.bytes = size < node.bytes.count ? Array(node.bytes[..<size]) : node.bytes + [UInt8](repeating: 0, count: size - node.bytes.count)
        return nil
    }

    mutating func open(_ node: ModelNode, named name: String, truncating: Bool) -> String? {
        let what = "open \(describe(node)) (\(name.prefix(8)))\(truncating ? " truncating" : "")"
        log.append(what)
        let expected: FSError?
        switch node.kind {
        case .fixedDirectory, .scratchDirectory: expected = .isDirectory
        case .fixedFile: expected = truncating ? .readOnlyFileSystem : nil
        case .scratchFile: expected = nil
        }
        let flags = OpenFlags(truncating ? O_WRONLY | O_TRUNC : O_RDONLY)
        let result = filesystem.open(node.inode, flags: flags)
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success(let opened) = result else { return nil }
        if node.kind == .scratchFile {
            if truncating {
                scratchBytes -= node.bytes.count
                node.bytes = []
            }
            node.opens += 1
            handles.append(node)
        } else {
            // Handles on the mount's files are not modelled: released at once.
            filesystem.release(node.inode, handle: opened.handle)
        }
        return nil
    }

    mutating func release(_ index: Int) -> String? {
        let node = handles.remove(at: index)
        log.append("release \(describe(node))")
        filesystem.release(node.inode)
        node.opens -= 1
        if node.unlinked && !node.alive { scratchBytes -= node.bytes.count }
        return nil
    }

    mutating func remove(_ parent: ModelNode, _ name: String, directory: Bool) -> String? {
        let what = "\(directory ? "rmdir" : "unlink") \(describe(parent))/\(name.prefix(8))"
        log.append(what)
        let expected: FSError?
        if let node = parent.children[name] {
            if !node.isScratch {
                expected = .readOnlyFileSystem
            } else if directory {
                expected = !node.isDirectory ? .notDirectory : (!node.children.isEmpty ? .directoryNotEmpty : nil)
            } else {
                expected = node.isDirectory ? .isDirectory : nil
            }
        } else {
            expected = .noSuchFileOrDirectory
        }
        let result = directory ? filesystem.rmdir(parent: parent.inode, name: name) : filesystem.unlink(parent: parent.inode, name: name)
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success = result else { return nil }
        detach(parent, name)
        return nil
    }

    private mutating func detach(_ parent: ModelNode, _ name: String) {
        guard let node = parent.children[name] else { return }
        if !forgetUnlinkInModel { parent.children[name] = nil }
        node.unlinked = true
        if node.kind == .scratchFile && !node.alive { scratchBytes -= node.bytes.count }
    }

    mutating func rename(_ from: ModelNode, _ name: String, _ to: ModelNode, _ newName: String) -> String? {
        let what = "rename \(describe(from))/\(name.prefix(8)) -> \(describe(to))/\(newName.prefix(8))"
        log.append(what)
        let expected: FSError?
        let source = from.children[name]
        let target = to.children[newName]
        if let source {
            var ancestor: ModelNode? = to
            var belowItself = false
            while let current = ancestor {
                if current === source { belowItself = true }
                ancestor = current.parent
            }
            if to.unlinked {
                expected = .noSuchFileOrDirectory
            } else if !source.isScratch || !to.acceptsNewNames {
                expected = .readOnlyFileSystem
            } else if newName.isEmpty || newName.utf8.count > 255 {
                expected = .nameTooLong
            } else if let target, target === source {
                expected = nil
            } else if let target, !target.isScratch {
                expected = .readOnlyFileSystem
            } else if let target, target.isDirectory, !source.isDirectory {
                expected = .isDirectory
            } else if let target, target.isDirectory, !target.children.isEmpty {
                expected = .directoryNotEmpty
            } else if let target, !target.isDirectory, source.isDirectory {
                expected = .notDirectory
            } else if belowItself {
                expected = .invalidArgument
            } else {
                expected = nil
            }
        } else {
            expected = .noSuchFileOrDirectory
        }
        let result = filesystem.rename(parent: from.inode, name: name, newParent: to.inode, newName: newName)
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success = result, let source, target !== source else { return nil }
        if target != nil { detach(to, newName) }
        from.children[name] = nil
        to.children[newName] = source
        source.parent = to
        return nil
    }

    mutating func lookup(_ parent: ModelNode, _ name: String) -> String? {
        let what = "lookup \(describe(parent))/\(name.prefix(8))"
        log.append(what)
        let node = parent.children[name]
        let result = filesystem.lookup(parent: parent.inode, name: name)
        if let mismatch = compare(what, result, node == nil ? .noSuchFileOrDirectory : nil) { return mismatch }
        guard case .success(let entry) = result, let node else { return nil }
        if entry.attributes.inode != node.inode { return "\(what): inode \(entry.attributes.inode), the model has \(node.inode)" }
        node.lookups += 1
        return nil
    }

    mutating func forget(_ node: ModelNode) -> String? {
        log.append("forget \(describe(node)) ×\(node.lookups)")
        filesystem.forget(node.inode, count: node.lookups)
        node.lookups = 0
        if node.kind == .scratchFile && node.unlinked && !node.alive { scratchBytes -= node.bytes.count }
        return nil
    }

    // MARK: Checks

    /// The whole namespace against the model: listings, attributes, contents, dead inodes.
    func checkEverything() -> String? {
        for node in nodes.values.sorted(by: { $0.inode < $1.inode }) {
            let attributes = filesystem.getattr(node.inode)
            guard node.alive else {
                if case .success = attributes { return "#\(node.inode) was unlinked, closed and forgotten, yet it is still there" }
                continue
            }
            guard case .success(let entry) = attributes else { return "#\(node.inode) is gone; the model still has it" }
            if node.isDirectory {
                guard case .success(let listing) = filesystem.readdir(node.inode) else { return "#\(node.inode) cannot be listed" }
                let listed = listing.dropFirst(2).map { "\($0.name):\($0.type == .directory ? "d" : "f"):\($0.inode)" }
                let modelled = node.children.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value.isDirectory ? "d" : "f"):\($0.value.inode)" }
                if listed != modelled { return "#\(node.inode) lists \(listed), the model \(modelled)" }
            } else if node.kind == .scratchFile {
                if entry.attributes.size != Int64(node.bytes.count) { return "#\(node.inode) has \(entry.attributes.size) bytes, the model \(node.bytes.count)" }
                let answer = Mutex<[UInt8]?>(nil)
                filesystem.read(node.inode, offset: 0, count: 4096) { result in answer.withLock { $0 = try? result.map { Array($0) }.get() } }
                let read = answer.withLock { $0 }
                if read != node.bytes { return "#\(node.inode) reads \(read.map { "\($0.count) bytes" } ?? "an error"), not the model's \(node.bytes.count)" }
            }
        }
        return nil
    }
}
