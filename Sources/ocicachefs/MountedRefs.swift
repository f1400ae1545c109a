import ArgumentParser
import CacheFS
import ContentCache
import FoundationEssentials
import Logging
import OCI
import RemoteStore
import Synchronization

/// One remote cache a mount shows: its SOURCE (`name` nil: the tags the source itself names)
/// or a `--tag NAME=SOURCE` (shown as the tag NAME).
struct CacheRef: Sendable {
    var name: String?
    var spec: SourceSpec

    /// The tags this ref shows in `index.json` and takes from a writable mount.
    let tags: [String]

    /// The name its remote knows the ref by (the registry tag, the S3 cache name), for a ref
    /// shown under a name of its own.
    var remoteTags: [String: String] {
        guard let name else { return [:] }
        switch spec.type {
        case "registry": return [name: (try? RegistryReference(parsing: spec.attributes["ref"] ?? ""))?.layoutTag ?? name]
        default: return [name: spec.attributes["name"] ?? name]
        }
    }

    init(name: String?, source: String) throws {
        // The daemon reads its sources one a line.
        guard !source.contains(where: \.isNewline) else { throw CommandError("a source holds a line break: \(source.debugDescription)") }
        var spec = try SourceSpec(parsing: source)
        if let name {
            guard !name.isEmpty, !name.contains(where: { $0.isNewline || $0 == "=" }) else {
                throw CommandError("--tag \(name)=…: the tag name must be non-empty and hold no '=' or line break")
            }
            if spec.type == "s3" {
                // An S3 ref is one BuildKit cache name: by default the tag's.
                let names = (spec.attributes["name"] ?? name).split(separator: ";")
                guard names.count == 1 else {
                    throw CommandError("--tag \(name)=…: an S3 source given with --tag names one cache (name=N), not \(names.count)")
                }
                spec.attributes["name"] = String(names[0])
            }
            tags = [name]
        } else {
            switch spec.type {
            case "registry": tags = [try RegistryReference(parsing: spec.attributes["ref"] ?? "").layoutTag]
            case "s3": tags = (spec.attributes["name"] ?? "buildkit").split(separator: ";").map(String.init)
            default: tags = []
            }
        }
        self.name = name
        self.spec = spec
    }

    /// `--tag NAME=SOURCE`.
    static func parseTagOption(_ text: String) throws -> CacheRef {
        guard let equals = text.firstIndex(of: "=") else {
            throw CommandError("--tag \(text): expected NAME=SOURCE, e.g. --tag main=type=registry,ref=HOST/REPO:main")
        }
        return try CacheRef(name: String(text[..<equals]), source: String(text[text.index(after: equals)...]))
    }

    /// The mount's refs, its SOURCE first; a tag that two of them show is an error.
    static func refs(source: String, tagOptions: [String]) throws -> [CacheRef] {
        let refs = try [CacheRef(name: nil, source: source)] + tagOptions.map(parseTagOption)
        var seen: Set<String> = []
        for tag in refs.flatMap(\.tags) where !seen.insert(tag).inserted {
            throw CommandError("tag \(tag) is shown by two of the mount's sources; give each tag once (SOURCE and --tag NAME=SOURCE)")
        }
        return refs
    }

    /// `--tag NAME=SOURCE` without the source's secrets, for the daemon's command line.
    var shownOption: String { (name ?? "") + "=" + spec.withoutSecrets }
}

/// The refs of a running mount, each with its remote and the last resolution it gave: what
/// the mount shows is their merge, and `refresh` resolves them again.
final class MountedRefs: Sendable {
    struct Mounted: Sendable {
        var ref: CacheRef
        var remote: any RemoteCacheSource
        var publisher: (any CachePublisher)?
    }

    let refs: [Mounted]
    /// Where each blob is fetched from: a source that listed it.
    let blobs: RoutedBlobSource
    /// Each ref's last resolution, shown under its tags; nil while it has none.
    private let resolutions: Mutex<[CacheSnapshot?]>
    /// Resolutions to save for offline mounts once the mount is ready (a third of a large
    /// mount's CPU), with the source they are saved for.
    private let unsaved = Mutex<[Resolution]>([])

    struct Resolution: Sendable {
        var source: String
        var snapshot: CacheSnapshot
    }
    /// One refresh at a time.
    private let refreshing = Mutex(())

    init(_ refs: [Mounted]) {
        self.refs = refs
        self.blobs = RoutedBlobSource(sources: refs.map(\.remote))
        self.resolutions = Mutex(Array(repeating: nil, count: refs.count))
    }

    /// Resolves every ref, each falling back to its saved resolution on its own. The mount's
    /// SOURCE failing fails the mount; another ref failing leaves it out, with a warning.
    func resolveAtMount(store: ContentStore, logger: Logger, warn: (String) -> Void) throws -> CacheSnapshot {
        for (index, mounted) in refs.enumerated() {
            let remote = mounted.remote
            let snapshot: CacheSnapshot
            do {
                snapshot = try remote.loadSnapshot(remembering: { snapshot in
                    unsaved.withLock { $0.append(Resolution(source: remote.displayName, snapshot: snapshot)) }
                }, recalling: { store.savedResolution(for: remote.displayName) }, logger: logger)
            } catch {
                guard index > 0 else { throw error }
                let line = "tag \(mounted.ref.name ?? "?") is not shown: \(error)"
                logger.warning("\(line)", metadata: ["source": "\(remote.displayName)"])
                warn(line)
                continue
            }
            for warning in snapshot.warnings {
                logger.warning("\(warning)")
                warn(warning)
            }
            record(snapshot, of: index)
        }
        return merged
    }

    /// Saves what the mount resolved, for a later mount made while a remote is down.
    func saveResolutions(in store: ContentStore, logger: Logger) {
        let pending: [Resolution] = unsaved.withLock { pending in
            let taken = pending
            pending = []
            return taken
        }
        for resolution in pending {
            do {
                try store.save(resolution.snapshot, for: resolution.source)
            } catch {
                logger.warning("cannot save the resolution for offline mounts",
                               metadata: ["source": "\(resolution.source)", "error": "\(error)"])
            }
        }
    }

    /// What the mount shows: every ref's last resolution under its tags, the SOURCE's first.
    var merged: CacheSnapshot {
        resolutions.withLock { resolutions in
            var merged = CacheSnapshot()
            for snapshot in resolutions.compactMap({ $0 }) { merged.merge(snapshot) }
            merged.warnings = []
            return merged
        }
    }

    private func record(_ snapshot: CacheSnapshot, of index: Int) {
        let shown = refs[index].ref.name.map { snapshot.showingTags(as: $0) } ?? snapshot
        blobs.route(shown.lazyBlobs.keys, to: index)
        resolutions.withLock { $0[index] = shown }
    }

    /// What a writable mount publishes through: with one ref, every tag to its remote; with
    /// several, each ref's tags to its own remote (refs on one remote, such as two tags of a
    /// repository, share a queue), a committed blob queued at once for the SOURCE's, and a tag's
    /// blobs that its remote lacks copied there before the tag.
    func writableMount(store: ContentStore, statistics: MountStatistics, logger: Logger) throws -> WritableMount {
        guard refs.count > 1 else {
            return try WritableMount(store: store, publisher: CountedPublisher(refs[0].publisher!, statistics: statistics), logger: logger)
        }
        struct Remote {
            var publisher: any CachePublisher
            var remoteTags: [String: String] = [:]
            var tags: Set<String> = []
            var shown: [OCILayout.TaggedManifest] = []
            var blobs: Set<Digest> = []
        }
        var remotes: [Remote] = []
        for (index, mounted) in refs.enumerated() {
            let publisher = mounted.publisher!
            var remote = remotes.first { $0.publisher.displayName == publisher.displayName } ?? Remote(publisher: publisher)
            remote.remoteTags.merge(mounted.ref.remoteTags) { first, _ in first }
            remote.tags.formUnion(mounted.ref.tags)
            if let resolution = resolutions.withLock({ $0[index] }) {
                remote.shown += resolution.tags
                remote.blobs.formUnion(resolution.smallBlobs.keys)
                remote.blobs.formUnion(resolution.lazyBlobs.keys)
            }
            if let existing = remotes.firstIndex(where: { $0.publisher.displayName == publisher.displayName }) {
                remotes[existing] = remote
            } else {
                remotes.append(remote)
            }
        }
        let staging = try StagingArea(cacheDirectory: store.directory)
        let copySource = CountedBlobSource(blobs, statistics: statistics)
        let destinations = try remotes.map { remote in
            let publisher = TagRenamingPublisher(remote.publisher, remoteTags: remote.remoteTags)
            let queue = try UploadQueue(store: store, publisher: CountedPublisher(publisher, statistics: statistics), logger: logger)
            queue.noteRemoteTags(remote.shown)
            queue.copyMissingBlobs { digest, size in try Self.copy(digest, size: size, from: copySource, into: staging) }
            return TagDestination(queue: queue, tags: remote.tags, remoteBlobs: remote.blobs)
        }
        return WritableMount(staging: staging, uploads: destinations[0].queue, destinations: destinations)
    }

    /// A blob read from the mount's remotes into a staged file, checked against its digest.
    private static func copy(_ digest: Digest, size: Int64, from source: some BlobSource, into staging: StagingArea) throws -> StagedFile {
        let file = try staging.newFile()
        var written: Int64 = 0
        try source.streamBlob(digest, from: 0, onStart: { start in
            guard start == 0 else { throw CommandError("blob \(digest): the remote answered from byte \(start), not 0") }
        }, onBody: { bytes in
            guard written + Int64(bytes.count) <= size else { throw CommandError("blob \(digest) is longer than its \(size) bytes") }
            try file.write(bytes, at: written)
            written += Int64(bytes.count)
        })
        guard try file.whileUnchanging({ actual, length in actual == digest && length == size }) else {
            throw CommandError("blob \(digest) read from another remote of the mount does not match its digest")
        }
        return file
    }

    /// One ref's outcome of a refresh.
    struct RefreshLine: Sendable {
        var text: String
        var failed: Bool
    }

    /// Resolves every ref again; a ref that fails keeps showing what it showed. Returns the
    /// new merge (for the filesystem) and a line per tag saying what changed.
    func refresh(store: ContentStore, logger: Logger) -> (snapshot: CacheSnapshot, lines: [RefreshLine]) {
        refreshing.withLock { _ in
            var lines: [RefreshLine] = []
            for (index, mounted) in refs.enumerated() {
                let before = resolutions.withLock { $0[index]?.tagDigests } ?? [:]
                let label = mounted.ref.tags.joined(separator: ", ")
                do {
                    let snapshot = try mounted.remote.loadSnapshot()
                    do {
                        try store.save(snapshot, for: mounted.remote.displayName)
                    } catch {
                        logger.warning("cannot save the resolution for offline mounts", metadata: ["error": "\(error)"])
                    }
                    record(snapshot, of: index)
                    let after = resolutions.withLock { $0[index]?.tagDigests } ?? [:]
                    for tag in mounted.ref.tags {
                        let line: String
                        switch (before[tag], after[tag]) {
                        case (nil, nil): line = "\(tag): not on the remote (\(mounted.remote.displayName))"
                        case (let old?, nil): line = "\(tag): gone from the remote; was \(old)"
                        case (nil, let new?): line = "\(tag): now \(new)"
                        case (let old?, let new?) where old == new: line = "\(tag): unchanged (\(new))"
                        case (let old?, let new?): line = "\(tag): moved from \(old) to \(new)"
                        }
                        lines.append(RefreshLine(text: line, failed: false))
                    }
                    for warning in snapshot.warnings { logger.warning("\(warning)") }
                } catch {
                    logger.warning("refresh failed; the mount keeps showing the previous resolution",
                                   metadata: ["tags": "\(label)", "source": "\(mounted.remote.displayName)", "error": "\(error)"])
                    lines.append(RefreshLine(text: "\(label): failed, still shown as before: \(error)", failed: true))
                }
            }
            for line in lines { logger.info("refresh: \(line.text)") }
            return (merged, lines)
        }
    }
}
