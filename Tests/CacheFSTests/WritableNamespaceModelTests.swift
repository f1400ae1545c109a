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

/// Drives a writable mount through random sequences of create (with and without O_EXCL and
/// O_TRUNC), mkdir, open, write at any offset, truncate, chmod, release, rename (within and
/// across directories, replacing targets), commit into `blobs/sha256`, unlink, rmdir, lookup,
/// forget and flush, and checks every step against a model of a local filesystem whose
/// `blobs/` changes only by commits (see `CacheFilesystem+Writable.swift`):
///
/// - every call answers what the model answers, errno included;
/// - every directory lists the model's names in order, with their types;
/// - every file and blob has the model's size, permissions and bytes, by its name and
///   through handles still open on it after it was renamed, committed or unlinked;
/// - an inode goes away exactly when it is unlinked, closed and forgotten.
///
/// A failing sequence is shrunk to a minimal one and printed with its seed.
@Suite struct WritableNamespaceModelTests {
    /// `OCICACHEFS_MODEL_SEQUENCES` runs more (`scripts/model-check.sh`).
    static var sequences: Int {
        ProcessInfo.processInfo.environment["OCICACHEFS_MODEL_SEQUENCES"].flatMap(Int.init) ?? 400
    }

    @Test func randomOperationsMatchALocalFilesystem() throws {
        let firstSeed = ProcessInfo.processInfo.environment["OCICACHEFS_MODEL_SEED"].flatMap(UInt64.init) ?? 1
        for seed in firstSeed..<(firstSeed + UInt64(Self.sequences)) {
            let steps = randomSteps(seed: seed, count: 5...60)
            guard let failure = try WritableNamespaceSimulation().run(steps) else { continue }
            let minimal = shrink(steps) { candidate in
                (try? WritableNamespaceSimulation().run(candidate)) != nil
            }
            let trace = try WritableNamespaceSimulation().trace(minimal)
            Issue.record("seed \(seed): \(failure)\nminimal sequence (\(minimal.count) steps):\n\(trace.joined(separator: "\n"))")
            return
        }
    }

    /// The model must catch a namespace that misbehaves: one whose commits accept any name.
    @Test func theModelCatchesAWrongAnswer() throws {
        var caught = false
        for seed in 1...UInt64(300) where !caught {
            let simulation = try WritableNamespaceSimulation()
            simulation.commitsAlwaysSucceedInModel = true
            caught = simulation.run(randomSteps(seed: seed, count: 30...30)) != nil
        }
        #expect(caught)
    }
}

/// A remote holding what the publisher received: a blob unlinked from the mount after its
/// upload is read from there.
final class PublishedSource: BlobSource {
    let publisher: PublisherDouble
    init(publisher: PublisherDouble) { self.publisher = publisher }

    func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                    onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        guard case .blob(_, let bytes)? = publisher.events.first(where: { if case .blob(digest, _) = $0 { return true } else { return false } }) else {
            throw PublishFailure(isTransient: false)
        }
        try onStart(offset)
        let end = min(bytes.count, last.map { Int($0) + 1 } ?? bytes.count)
        try bytes[Int(offset)..<end].withUnsafeBytes { try onBody($0) }
    }
}

final class WritableModelNode {
    enum Kind: Equatable {
        /// Root, `blobs`, `blobs/sha256`: never removed; only the root takes new names.
        case fixedDirectory(creatable: Bool)
        case directory
        case file
        /// Committed: immutable bytes.
        case blob
    }

    let inode: UInt64
    var kind: Kind
    var children: [String: WritableModelNode] = [:]
    var bytes: [UInt8] = []
    var permissions: UInt32
    weak var parent: WritableModelNode?
    var name: String
    var lookups = 0
    var opens = 0
    var unlinked = false
    /// Written since its last flush.
    var changed = false

    init(inode: UInt64, kind: Kind, parent: WritableModelNode?, name: String, permissions: UInt32) {
        self.inode = inode
        self.kind = kind
        self.parent = parent
        self.name = name
        self.permissions = permissions
    }

    var isDirectory: Bool {
        switch kind {
        case .fixedDirectory, .directory: return true
        default: return false
        }
    }

    /// Clients may move, replace and remove it.
    var isMutable: Bool { kind == .directory || kind == .file }

    var acceptsNewNames: Bool {
        switch kind {
        case .fixedDirectory(let creatable): return creatable && !unlinked
        case .directory: return !unlinked
        default: return false
        }
    }

    var alive: Bool { !unlinked || lookups > 0 || opens > 0 }
}

final class WritableNamespaceSimulation {
    static let emptyHex = Digest.sha256(of: [UInt8]()).hex
    static let names = ["a", "b", "ingest", "index.json", "blobs", "sha256", emptyHex, "", String(repeating: "x", count: 256)]

    let directory = NSTemporaryDirectory() + "writable-model-" + UUID().uuidString
    let publisher = PublisherDouble(displayName: "model://remote")
    let fetcher: BlobFetcher
    let uploads: UploadQueue
    let filesystem: CacheFilesystem
    let root: WritableModelNode
    var nodes: [UInt64: WritableModelNode] = [:]
    var handles: [WritableModelNode] = []
    var log: [String] = []
    /// A broken model for the self-check: a commit under any name succeeds in it.
    var commitsAlwaysSucceedInModel = false

    init() throws {
        let logger = Logger(label: "model")
        let store = try ContentStore(directory: directory)
        fetcher = BlobFetcher(store: store, source: PublishedSource(publisher: publisher), logger: logger,
                              tuning: FetchTuning(connections: 1))
        uploads = try UploadQueue(store: store, publisher: publisher, logger: logger, workers: 1, retryPause: { _ in .milliseconds(1) })
        filesystem = try CacheFilesystem(snapshot: CacheSnapshot(), fetcher: fetcher, logger: logger,
                                         writable: WritableMount(staging: StagingArea(cacheDirectory: directory), uploads: uploads))
        root = WritableModelNode(inode: CacheFilesystem.rootInode, kind: .fixedDirectory(creatable: true), parent: nil, name: "",
                                 permissions: 0o755)
        nodes[root.inode] = root
        try adoptFixedTree(root)
    }

    deinit {
        uploads.stop()
        fetcher.shutdown()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The mount's own entries: `blobs`, `layers`, `files` and their `sha256` fixed, the rest ordinary.
    private func adoptFixedTree(_ directory: WritableModelNode) throws {
        for entry in try filesystem.readdir(directory.inode).get() where entry.name != "." && entry.name != ".." {
            let kind: WritableModelNode.Kind
            switch entry.name {
            case "blobs", "layers", "files", "sha256": kind = .fixedDirectory(creatable: false)
            default: kind = entry.type == .directory ? .directory : .file
            }
            let attributes = try filesystem.getattr(entry.inode).get().attributes
            let node = WritableModelNode(inode: entry.inode, kind: kind, parent: directory, name: entry.name,
                                         permissions: attributes.permissions)
            if kind == .file { node.bytes = try read(entry.inode).get() }
            directory.children[entry.name] = node
            nodes[node.inode] = node
            if node.isDirectory { try adoptFixedTree(node) }
        }
    }

    var sha256: WritableModelNode { root.children["blobs"]!.children["sha256"]! }

    func run(_ steps: [UInt32]) -> String? {
        for step in steps {
            if let failure = apply(step) ?? checkEverything() { return failure }
        }
        return nil
    }

    func trace(_ steps: [UInt32]) -> [String] {
        for step in steps {
            if let failure = apply(step) ?? checkEverything() {
                log.append("  ✘ \(failure)")
                break
            }
        }
        return log
    }

    // MARK: Steps

    private func directories() -> [WritableModelNode] {
        nodes.values.filter { $0.isDirectory && $0.alive }.sorted { $0.inode < $1.inode }
    }

    private func pick<T>(_ options: [T], _ bits: UInt32) -> T? {
        options.isEmpty ? nil : options[Int(bits % UInt32(options.count))]
    }

    private func name(_ bits: UInt32) -> String { Self.names[Int(bits % UInt32(Self.names.count))] }

    func apply(_ step: UInt32) -> String? {
        let a = step >> 4, b = step >> 12, c = step >> 20
        switch step % 14 {
        case 0, 1:
            guard let parent = pick(directories(), a) else { return nil }
            if step % 14 == 1 { return mkdir(parent, name(b)) }
            return create(parent, name(b), exclusive: c % 3 == 0, truncating: c % 3 == 1)
        case 2:
            guard let node = pick(handles, a) else { return nil }
            return write(node, offset: Int(b % 48), count: Int(c % 40), fill: UInt8(truncatingIfNeeded: step))
        case 3:
            guard let node = pick(nodes.values.filter { $0.alive }.sorted { $0.inode < $1.inode }, a) else { return nil }
            return truncate(node, to: Int(b % 64))
        case 4:
            guard let parent = pick(directories(), a), let (name, node) = pick(parent.children.sorted { $0.key < $1.key }, b) else { return nil }
            return open(node, named: name, flags: [O_RDONLY, O_WRONLY | O_TRUNC, O_RDWR][Int(c % 3)])
        case 5:
            guard !handles.isEmpty else { return nil }
            return release(Int(a % UInt32(handles.count)))
        case 6, 7:
            guard let parent = pick(directories(), a) else { return nil }
            let existing = parent.children.keys.sorted()
            let victim = c % 4 == 0 ? name(b) : (pick(existing, b) ?? name(b))
            return remove(parent, victim, directory: step % 14 == 7)
        case 8, 9:
            let directories = directories()
            guard let from = pick(directories, a), let to = pick(directories, c) else { return nil }
            let existing = from.children.keys.sorted()
            return rename(from, pick(existing, b) ?? name(b), to, name(c >> 4))
        case 10:
            guard let parent = pick(directories(), a) else { return nil }
            return lookup(parent, name(b))
        case 11:
            guard let node = pick(nodes.values.filter { $0.lookups > 0 }.sorted { $0.inode < $1.inode }, a) else { return nil }
            return forget(node)
        case 12:
            // A commit: a file renamed into blobs/sha256 under its digest, or a wrong one.
            let files = nodes.values.filter { $0.kind == .file && !$0.unlinked }.sorted { $0.inode < $1.inode }
            guard let file = pick(files, a), let parent = file.parent else { return nil }
            let hex = c % 4 == 0 ? Digest.sha256(of: file.bytes + [1]).hex : Digest.sha256(of: file.bytes).hex
            return rename(parent, file.name, sha256, hex)
        default:
            guard let node = pick(nodes.values.filter { $0.alive }.sorted { $0.inode < $1.inode }, a) else { return nil }
            return c % 2 == 0 ? chmod(node, UInt32(b % 0o1000)) : flush(node)
        }
    }

    private func describe(_ node: WritableModelNode) -> String { "#\(node.inode)" }

    private func compare<T>(_ what: String, _ real: Result<T, FSError>, _ expected: FSError?) -> String? {
        switch (real, expected) {
        case (.success, nil): return nil
        case (.failure(let error), let expected?) where error == expected: return nil
        case (.failure(let error), nil): return "\(what): got \(error), the model expects success"
        case (.success, let expected?): return "\(what): succeeded, the model expects \(expected)"
        case (.failure(let error), let expected?): return "\(what): got \(error), the model expects \(expected)"
        }
    }

    private func insertionError(_ parent: WritableModelNode, _ name: String) -> FSError? {
        if parent.unlinked { return .noSuchFileOrDirectory }
        if parent.children[name] != nil { return .fileExists }
        if !parent.acceptsNewNames { return .notPermitted }
        if name.isEmpty || name.utf8.count > 255 { return .nameTooLong }
        return nil
    }

    func mkdir(_ parent: WritableModelNode, _ name: String) -> String? {
        let what = "mkdir \(describe(parent))/\(name.prefix(8))"
        log.append(what)
        let result = filesystem.mkdir(parent: parent.inode, name: name, permissions: 0o750)
        if let mismatch = compare(what, result, insertionError(parent, name)) { return mismatch }
        guard case .success(let entry) = result else { return nil }
        let node = WritableModelNode(inode: entry.attributes.inode, kind: .directory, parent: parent, name: name, permissions: 0o750)
        node.lookups = 1
        parent.children[name] = node
        nodes[node.inode] = node
        return nil
    }

    /// open(O_RDWR|O_CREAT): an existing name is opened unless O_EXCL.
    func create(_ parent: WritableModelNode, _ name: String, exclusive: Bool, truncating: Bool) -> String? {
        let what = "create\(exclusive ? " excl" : "")\(truncating ? " trunc" : "") \(describe(parent))/\(name.prefix(8))"
        log.append(what)
        let flags = O_RDWR | O_CREAT | (exclusive ? O_EXCL : 0) | (truncating ? O_TRUNC : 0)
        let existing = parent.unlinked ? nil : parent.children[name]
        let expected: FSError?
        if let existing {
            expected = exclusive ? .fileExists : existing.isDirectory ? .isDirectory : existing.kind == .blob ? .notPermitted : nil
        } else {
            expected = insertionError(parent, name)
        }
        let result = filesystem.create(parent: parent.inode, name: name, permissions: 0o640, flags: OpenFlags(flags))
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success(let (entry, _)) = result else { return nil }
        let node: WritableModelNode
        if let existing {
            node = existing
            if entry.attributes.inode != node.inode { return "\(what): opened #\(entry.attributes.inode), the model has \(describe(node))" }
            if truncating {
                node.bytes = []
                node.changed = true
            }
        } else {
            node = WritableModelNode(inode: entry.attributes.inode, kind: .file, parent: parent, name: name, permissions: 0o640)
            parent.children[name] = node
            nodes[node.inode] = node
        }
        node.lookups += 1
        node.opens += 1
        handles.append(node)
        return nil
    }

    func write(_ node: WritableModelNode, offset: Int, count: Int, fill: UInt8) -> String? {
        let what = "write \(describe(node)) \(count)@\(offset)"
        log.append(what)
        let data = [UInt8](repeating: fill, count: count)
        let result = data.withUnsafeBytes { filesystem.write(node.inode, offset: Int64(offset), data: $0) }
        if let mismatch = compare(what, result, node.kind == .blob ? .notPermitted : nil) { return mismatch }
        guard case .success(let written) = result else { return nil }
        if written != count { return "\(what): wrote \(written) bytes" }
        // As pwrite(2): a write of nothing extends nothing.
        if count > 0 && offset + count > node.bytes.count { node.bytes += [UInt8](repeating: 0, count: offset + count - node.bytes.count) }
        if count > 0 { node.bytes.replaceSubrange(offset..<(offset + count), with: data) }
        node.changed = true
        return nil
    }

    func truncate(_ node: WritableModelNode, to size: Int) -> String? {
        let what = "truncate \(describe(node)) to \(size)"
        log.append(what)
        let expected: FSError? = node.isDirectory ? .isDirectory : node.kind == .blob ? .notPermitted : nil
        let result = filesystem.setattr(node.inode, AttributeChanges(size: Int64(size)))
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success = result else { return nil }
        node.bytes = size < node.bytes.count ? Array(node.bytes[..<size]) : node.bytes + [UInt8](repeating: 0, count: size - node.bytes.count)
        node.changed = true
        return nil
    }

    func chmod(_ node: WritableModelNode, _ permissions: UInt32) -> String? {
        let what = "chmod \(describe(node)) \(String(permissions, radix: 8))"
        log.append(what)
        let result = filesystem.setattr(node.inode, AttributeChanges(permissions: permissions))
        if let mismatch = compare(what, result, nil) { return mismatch }
        node.permissions = permissions
        return nil
    }

    func open(_ node: WritableModelNode, named name: String, flags: Int32) -> String? {
        let what = "open \(describe(node)) (\(name.prefix(8))) flags \(flags)"
        log.append(what)
        let writes = flags & O_ACCMODE != O_RDONLY
        let truncates = writes && flags & O_TRUNC != 0
        let expected: FSError? = node.isDirectory ? .isDirectory : node.kind == .blob && (writes || flags & O_TRUNC != 0) ? .notPermitted : nil
        let result = filesystem.open(node.inode, flags: OpenFlags(flags))
        if let mismatch = compare(what, result, expected) { return mismatch }
        guard case .success(let opened) = result else { return nil }
        if node.kind == .file {
            if truncates {
                node.bytes = []
                node.changed = true
            }
            node.opens += 1
            handles.append(node)
        } else {
            // Handles on blobs are not modelled: released at once.
            filesystem.release(node.inode, handle: opened.handle)
        }
        return nil
    }

    func release(_ index: Int) -> String? {
        let node = handles.remove(at: index)
        log.append("release \(describe(node))")
        filesystem.release(node.inode)
        node.opens -= 1
        return nil
    }

    func flush(_ node: WritableModelNode) -> String? {
        let what = "flush \(describe(node))"
        log.append(what)
        var expected: FSError?
        if node.changed && !node.unlinked && node.parent === root && node.name == "index.json" && node.kind == .file {
            node.changed = false
            // Random bytes never name a tag: only a valid index without tags closes cleanly.
            if case .index? = try? ManifestContent.parse(node.bytes) {} else { expected = .ioError }
        }
        return compare(what, filesystem.flush(node.inode), expected)
    }

    func remove(_ parent: WritableModelNode, _ name: String, directory: Bool) -> String? {
        let what = "\(directory ? "rmdir" : "unlink") \(describe(parent))/\(name.prefix(8))"
        log.append(what)
        let expected: FSError?
        if let node = parent.children[name] {
            if directory {
                expected = !node.isDirectory ? .notDirectory : !node.isMutable ? .notPermitted : !node.children.isEmpty ? .directoryNotEmpty : nil
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

    private func detach(_ parent: WritableModelNode, _ name: String) {
        guard let node = parent.children[name] else { return }
        parent.children[name] = nil
        node.unlinked = true
    }

    func rename(_ from: WritableModelNode, _ name: String, _ to: WritableModelNode, _ newName: String) -> String? {
        let what = "rename \(describe(from))/\(name.prefix(8)) -> \(describe(to))/\(newName.prefix(8))"
        log.append(what)
        let source = from.children[name]
        let target = to.children[newName]
        var commits = false
        let expected: FSError?
        if let source {
            var ancestor: WritableModelNode? = to
            var belowItself = false
            while let current = ancestor {
                if current === source { belowItself = true }
                ancestor = current.parent
            }
            if to === sha256 && source.kind == .file {
                // The commit point of a blob.
                commits = true
                let matches = Digest(hex: newName) == Digest.sha256(of: source.bytes)
                expected = matches || commitsAlwaysSucceedInModel ? nil : .ioError
            } else if to.unlinked {
                expected = .noSuchFileOrDirectory
            } else if let target, target === source {
                expected = nil
            } else if !source.isMutable || !to.acceptsNewNames {
                expected = .notPermitted
            } else if newName.isEmpty || newName.utf8.count > 255 {
                expected = .nameTooLong
            } else if let target, !target.isMutable {
                expected = .notPermitted
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
        source.name = newName
        if commits {
            source.kind = .blob
            source.changed = false
        }
        return nil
    }

    func lookup(_ parent: WritableModelNode, _ name: String) -> String? {
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

    func forget(_ node: WritableModelNode) -> String? {
        log.append("forget \(describe(node)) ×\(node.lookups)")
        filesystem.forget(node.inode, count: node.lookups)
        node.lookups = 0
        return nil
    }

    // MARK: Checks

    private func read(_ inode: UInt64) -> Result<[UInt8], FSError> {
        let answer = Mutex<Result<[UInt8], FSError>?>(nil)
        let done = DispatchSemaphore(value: 0)
        filesystem.read(inode, offset: 0, count: 4096) { result in
            answer.withLock { $0 = result.map { Array($0) } }
            done.signal()
        }
        done.wait()
        return answer.withLock { $0 }!
    }

    func checkEverything() -> String? {
        for node in nodes.values.sorted(by: { $0.inode < $1.inode }) {
            let attributes = filesystem.getattr(node.inode)
            guard node.alive else {
                if case .success = attributes { return "#\(node.inode) was unlinked, closed and forgotten, yet it is still there" }
                continue
            }
            guard case .success(let entry) = attributes else { return "#\(node.inode) is gone; the model still has it" }
            if entry.attributes.permissions != node.permissions {
                return "#\(node.inode) has permissions \(String(entry.attributes.permissions, radix: 8)), the model \(String(node.permissions, radix: 8))"
            }
            if node.isDirectory {
                guard case .success(let listing) = filesystem.readdir(node.inode) else { return "#\(node.inode) cannot be listed" }
                let listed = listing.dropFirst(2).map { "\($0.name.prefix(8)):\($0.type == .directory ? "d" : "f"):\($0.inode)" }
                let modelled = node.children.sorted { $0.key < $1.key }.map { "\($0.key.prefix(8)):\($0.value.isDirectory ? "d" : "f"):\($0.value.inode)" }
                if listed != modelled { return "#\(node.inode) lists \(listed), the model \(modelled)" }
            } else {
                if entry.attributes.size != Int64(node.bytes.count) { return "#\(node.inode) has \(entry.attributes.size) bytes, the model \(node.bytes.count)" }
                let read = try? read(node.inode).get()
                if read != node.bytes { return "#\(node.inode) reads \(read.map { "\($0.count) bytes" } ?? "an error"), not the model's \(node.bytes.count)" }
            }
        }
        return nil
    }
}
