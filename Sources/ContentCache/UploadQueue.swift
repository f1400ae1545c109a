import FoundationEssentials
import SystemSupport
import Dispatch
import Logging
import OCI
import Synchronization

/// How much a queue still has to publish.
public struct UploadProgress: Sendable, Equatable, CustomStringConvertible {
    public var blobsLeft: Int
    public var bytesLeft: Int64
    public var tagsLeft: Int

    public init(blobsLeft: Int, bytesLeft: Int64, tagsLeft: Int) {
        self.blobsLeft = blobsLeft
        self.bytesLeft = bytesLeft
        self.tagsLeft = tagsLeft
    }

    public var description: String { "\(blobsLeft) blobs (\(bytesLeft) bytes) and \(tagsLeft) tags left to publish" }
}

/// Something a queue could not publish, and why.
public enum UnpublishedItem: Sendable, Equatable, CustomStringConvertible {
    case blob(Digest, reason: String)
    case tag(String, reason: String)
    /// The last `index.json` a client wrote could not be read, so none of its tags was published.
    case index(reason: String)

    public var description: String {
        switch self {
        case .blob(let digest, let reason): return "blob \(digest): \(reason)"
        case .tag(let tag, let reason): return "tag \(tag): \(reason)"
        case .index(let reason): return "index.json: \(reason)"
        }
    }
}

/// Publishes what a writable mount committed: blobs first, each as soon as it is committed,
/// and a tag once every blob it reaches is on the remote. A few worker threads call the
/// `CachePublisher`; a transient failure is tried again after a growing pause, a bounded number
/// of times. Everything still to publish is in the journal (`UploadJournal`) before it is
/// queued and until it is published, so a queue started on the same cache directory after a
/// crash finishes it. Blobs still to upload stay in the content store: eviction spares them.
public final class UploadQueue: Sendable {
    public static let defaultWorkers = 4
    public static let defaultMaxAttempts = 5

    enum Phase: Equatable {
        /// Journaled; its bytes are not in the content store yet.
        case preparing
        case queued
        case running
        case failed(String)

        var isFailed: Bool {
            if case .failed = self { return true }
            return false
        }
    }

    struct BlobUpload {
        var size: Int64
        var phase: Phase
        var failures = 0
        var notBefore: ContinuousClock.Instant?
        /// Unlinked from the mount while waiting: removed from the content store once uploaded.
        var discardWhenPublished = false
        /// Arrival order: blobs are uploaded first come, first served.
        var sequence: UInt64
    }

    struct TagEntry {
        var publication: TagPublication
        var phase: Phase
        var failures = 0
        var notBefore: ContinuousClock.Instant?
        /// A later publication of the same tag that arrived while this one was running.
        var newer: TagPublication?
    }

    struct State {
        var blobs: [Digest: BlobUpload] = [:]
        var tags: [String: TagEntry] = [:]
        /// What each tag points at on the remote, as far as this mount knows.
        var remoteTags: [String: Digest] = [:]
        /// Blobs this queue published since it started.
        var published: Set<Digest> = []
        var nextSequence: UInt64 = 0
        var stopped = false
        /// Uploads that began before their blob's commit, waiting for its publication.
        var earlyUploads: [Digest: any EarlyBlobUpload] = [:]
        /// Early uploads still sending (at most `earlyUploadLimit`).
        var earlySending = 0
    }

    public let store: ContentStore
    let publisher: any CachePublisher
    let logger: Logger
    let journal: UploadJournal
    let maxAttempts: Int
    let retryPause: @Sendable (Int) -> Duration
    let workerCount: Int
    /// Early uploads sending at once: twice the workers. BuildKit writes four layers at once,
    /// and the next four start while the first four's uploads still trail their writes; with
    /// one per worker those missed their early start and went up after their commit, and a
    /// 1 GiB export to a registry took 4.39 s instead of 4.19 s (medians of 6 alternating
    /// runs, the client's first write to the unmount's return).
    let earlyUploadLimit: Int
    private let state = Mutex(State())
    /// Held while a tag's journal entry and its state change together, so that a publication
    /// finishing never removes the entry of a newer one being recorded.
    private let tagJournal = Mutex(())
    /// Signalled when work may have become runnable.
    private let available = DispatchSemaphore(value: 0)
    /// Signalled when something was published or failed, for `drain`.
    private let changed = DispatchSemaphore(value: 0)
    private let started = Atomic<Bool>(false)
    private let copier = Mutex<BlobCopier?>(nil)

    /// Brings a blob that the local cache does not hold (it is on another remote of the mount)
    /// into a staged file, its bytes checked against the digest, to be published from there.
    public typealias BlobCopier = @Sendable (_ digest: Digest, _ size: Int64) throws -> StagedFile

    /// - Parameter remoteName: names the remote in the journal; by default the publisher's
    ///   display name.
    /// - Parameter retryPause: the pause after the n-th failure in a row of an item.
    public init(store: ContentStore, publisher: any CachePublisher, logger: Logger, remoteName: String? = nil,
                workers: Int = UploadQueue.defaultWorkers, maxAttempts: Int = UploadQueue.defaultMaxAttempts,
                retryPause: @escaping @Sendable (Int) -> Duration = RetryBackoff.pause(afterFailures:)) throws(CacheError) {
        self.store = store
        self.publisher = publisher
        self.logger = logger
        self.maxAttempts = max(maxAttempts, 1)
        self.retryPause = retryPause
        self.workerCount = max(workers, 1)
        self.earlyUploadLimit = 2 * workerCount
        journal = try UploadJournal(store: store, remoteName: remoteName ?? publisher.displayName)
        resume(journal.load())
    }

    /// Starts publishing. What an earlier mount left is published from here on: a mount reads
    /// `pendingBlobs` and `pendingTags` to show them before it starts its queue.
    public func start() {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for _ in 0..<workerCount {
            SystemThread.start(named: "ocicachefs-upload") { [self] in work() }
        }
    }

    /// Takes up what a previous mount left in the journal.
    private func resume(_ contents: UploadJournal.Contents) {
        for path in contents.damaged {
            logger.warning("an upload journal entry cannot be read; it is left alone", metadata: ["path": "\(path)"])
        }
        var lost: [Digest] = []
        let reachedByTags = Set(contents.tags.flatMap { $0.blobs.map(\.digest) })
        state.withLock { state in
            for (digest, size) in contents.blobs.sorted(by: { $0.key < $1.key }) {
                // The journal is written before the blob's rename: a mount that died between
                // the two never told its client the blob was committed. A blob a journaled tag
                // reaches was committed, or shown from another remote of the mount
                // (`enqueueTag(_:uploadingFirst:)`): it stays, for the copier to bring here or
                // for its failure to fail the tag.
                guard store.hasComplete(digest) || reachedByTags.contains(digest) else {
                    lost.append(digest)
                    continue
                }
                state.blobs[digest] = BlobUpload(size: size, phase: .queued, sequence: state.nextSequence)
                state.nextSequence += 1
            }
            for publication in contents.tags {
                state.tags[publication.tag] = TagEntry(publication: publication, phase: .queued)
            }
        }
        for digest in lost { journal.removeBlob(digest) }
        if !contents.blobs.isEmpty || !contents.tags.isEmpty {
            logger.notice("resuming uploads an earlier mount left unfinished",
                          metadata: ["blobs": "\(contents.blobs.count - lost.count)", "tags": "\(contents.tags.count)",
                                     "remote": "\(publisher.displayName)"])
        }
    }

    // MARK: - What the mount asks

    /// Records the tags the remote held when the mount resolved it: a tag is published only
    /// when a client points it elsewhere.
    public func noteRemoteTags(_ tags: [OCILayout.TaggedManifest]) {
        state.withLock { state in
            for tagged in tags { state.remoteTags[tagged.tag] = tagged.manifest.digest }
        }
    }

    /// Blobs still to upload, with their sizes: they exist nowhere but in the local cache.
    public var pendingBlobs: [Digest: Int64] {
        state.withLock { state in state.blobs.filter { $0.value.phase != .preparing }.mapValues(\.size) }
    }

    /// The latest publication of each tag still to publish.
    public var pendingTags: [TagPublication] {
        state.withLock { state in state.tags.values.map { $0.newer ?? $0.publication }.sorted { $0.tag < $1.tag } }
    }

    /// The tags among `tags` that point somewhere other than the remote does or is about to.
    public func changedTags(_ tags: [String: Digest]) -> Set<String> {
        state.withLock { state in
            Set(tags.filter { tag, digest in
                let entry = state.tags[tag]
                let wanted = entry?.newer?.manifest.digest
                    ?? (entry?.phase.isFailed == false ? entry?.publication.manifest.digest : nil)
                    ?? state.remoteTags[tag]
                return wanted != digest
            }.keys)
        }
    }

    /// Journals a blob about to enter the content store; `startUpload` queues it once it is
    /// there, `cancelUpload` forgets it if it never gets there. False when the blob is already
    /// to be uploaded (nothing to start or cancel).
    public func prepareUpload(_ digest: Digest, size: Int64) throws(CacheError) -> Bool {
        let isNew = state.withLock { state -> Bool in
            if var upload = state.blobs[digest] {
                upload.discardWhenPublished = false
                if upload.phase.isFailed {
                    upload.phase = .queued
                    upload.failures = 0
                    upload.notBefore = nil
                }
                state.blobs[digest] = upload
                return false
            }
            state.blobs[digest] = BlobUpload(size: size, phase: .preparing, sequence: state.nextSequence)
            state.nextSequence += 1
            return true
        }
        guard isNew else {
            available.signal()
            return false
        }
        do throws(CacheError) {
            try journal.recordBlob(digest, size: size)
        } catch {
            state.withLock { state in _ = state.blobs.removeValue(forKey: digest) }
            throw error
        }
        return true
    }

    /// Queues a prepared blob; `early`, an upload of its bytes begun before the commit, is
    /// finished by its publication.
    public func startUpload(_ digest: Digest, sentEarlyBy early: (any EarlyBlobUpload)? = nil) {
        let replaced = state.withLock { state -> (any EarlyBlobUpload)? in
            if state.blobs[digest]?.phase == .preparing { state.blobs[digest]!.phase = .queued }
            guard let early else { return nil }
            guard state.blobs[digest] != nil else { return early }
            defer { state.earlyUploads[digest] = early }
            return state.earlyUploads[digest]
        }
        if let replaced { abandonInBackground(replaced) }
        available.signal()
    }

    public func cancelUpload(_ digest: Digest) {
        let cancelled = state.withLock { state -> Bool in
            guard state.blobs[digest]?.phase == .preparing else { return false }
            state.blobs[digest] = nil
            return true
        }
        if cancelled { journal.removeBlob(digest) }
    }

    /// Files at least this big, written in order from their start, begin their upload before
    /// their commit, when the remote can take them (a registry takes bytes of unknown digest;
    /// S3 takes a blob whose digest and size the client announced): a client's rename then
    /// waits for nothing, and the upload overlaps the client's writes.
    public static let earlyUploadThreshold: Int64 = 8 << 20

    /// Starts sending `file` while the client writes it, if it qualifies (see
    /// `earlyUploadThreshold`) and fewer than `earlyUploadLimit` such uploads are sending; asked
    /// only then, `announced` says what the client announced the file will be. Its commit
    /// hands the upload to `startUpload`; a file given up (rewritten, removed, never committed)
    /// has what it sent dropped.
    public func beginEarlyUpload(of file: StagedFile, announced: () -> AnnouncedBlob? = { nil }) {
        guard file.size >= Self.earlyUploadThreshold, !file.earlyUploadTried else { return }
        let admitted = state.withLock { state -> Bool in
            guard started.load(ordering: .relaxed), !state.stopped, state.earlySending < earlyUploadLimit else { return false }
            state.earlySending += 1
            return true
        }
        guard admitted else { return }
        guard file.claimEarlyUpload(),
              let (feed, upload) = file.attachEarlyUpload(announced: announced(), { publisher.beginEarlyUpload(of: $0) }) else {
            state.withLock { $0.earlySending -= 1 }
            return
        }
        SystemThread.start(named: "ocicachefs-early-upload") { [self] in
            upload.run()
            // A sealed feed belongs to the commit, which finishes or abandons its upload.
            if feed.wasGivenUp { upload.abandon() }
            state.withLock { $0.earlySending -= 1 }
        }
    }

    /// Drops what an early upload sent, off the caller's thread (it waits for the upload's
    /// last request).
    public func abandonInBackground(_ early: any EarlyBlobUpload) {
        SystemThread.start(named: "ocicachefs-early-upload") { early.abandon() }
    }

    /// The mount no longer shows the blob: it leaves the content store once uploaded. False
    /// when it is not to be uploaded (the caller may remove it now).
    public func discardWhenPublished(_ digest: Digest) -> Bool {
        state.withLock { state in
            guard state.blobs[digest] != nil else { return false }
            state.blobs[digest]!.discardWhenPublished = true
            return true
        }
    }

    /// How a blob the local cache does not hold is brought here to be published (see
    /// `enqueueTag(_:uploadingFirst:)`); without one such a blob fails.
    public func copyMissingBlobs(with copy: @escaping BlobCopier) {
        copier.withLock { $0 = copy }
    }

    /// Journals a tag's publication and queues it; it runs once every blob it reaches is
    /// uploaded, and fails if one of them failed. It replaces any earlier publication of the
    /// same tag not yet made. `uploadingFirst` names blobs the tag reaches that this remote
    /// may lack (the mount shows them from another remote): those not published or queued
    /// here yet are journaled and queued before the tag, so the tag waits for them.
    public func enqueueTag(_ publication: TagPublication, uploadingFirst candidates: [Descriptor] = []) throws(CacheError) {
        let missing = state.withLock { state in
            candidates.filter { state.blobs[$0.digest] == nil && !state.published.contains($0.digest) }
        }
        for blob in missing {
            if try prepareUpload(blob.digest, size: blob.size) { startUpload(blob.digest) }
        }
        try tagJournal.withLock { _ throws(CacheError) in
            try journal.recordTag(publication)
            record(publication)
        }
        available.signal()
    }

    private func record(_ publication: TagPublication) {
        state.withLock { state in
            if var entry = state.tags[publication.tag], entry.phase == .running {
                entry.newer = publication
                state.tags[publication.tag] = entry
            } else {
                state.tags[publication.tag] = TagEntry(publication: publication, phase: .queued)
            }
        }
    }

    // MARK: - Stopping

    /// Waits until nothing is left to publish but what failed for good, calling `progress`
    /// whenever what is left changes (and at least every `progressInterval` while it does not),
    /// and returns what could not be published. Failed items stay in the journal: the next
    /// mount of the remote from this cache directory tries them again.
    public func drain(progressInterval: Duration = .seconds(1), progress: (UploadProgress) -> Void = { _ in }) -> [UnpublishedItem] {
        start()
        var reported: UploadProgress?
        var lastReport = ContinuousClock.now
        while true {
            let (left, failed, stopped) = state.withLock { state in (Self.progress(state), Self.unpublished(state), state.stopped) }
            if left.blobsLeft == 0 && left.tagsLeft == 0 { return failed }
            if stopped {
                return failed + state.withLock { state in Self.outstanding(state, reason: "the upload queue stopped first") }
            }
            if left != reported || ContinuousClock.now - lastReport >= progressInterval {
                progress(left)
                reported = left
                lastReport = .now
            }
            _ = changed.wait(timeout: Self.deadline(after: progressInterval))
        }
    }

    /// Stops the workers after the item each has in hand, without waiting for them, and
    /// unlocks the journal: what is not published stays in it for the next start.
    public func stop() {
        state.withLock { $0.stopped = true }
        journal.unlock()
        for _ in 0..<workerCount { available.signal() }
        changed.signal()
    }

    private static func progress(_ state: State) -> UploadProgress {
        let blobs = state.blobs.values.filter { !$0.phase.isFailed }
        return UploadProgress(blobsLeft: blobs.count, bytesLeft: blobs.reduce(0) { $0 + $1.size },
                              tagsLeft: state.tags.values.filter { !$0.phase.isFailed || $0.newer != nil }.count)
    }

    private static func unpublished(_ state: State) -> [UnpublishedItem] {
        var items: [UnpublishedItem] = []
        for (digest, upload) in state.blobs.sorted(by: { $0.key < $1.key }) {
            if case .failed(let reason) = upload.phase { items.append(.blob(digest, reason: reason)) }
        }
        for (tag, entry) in state.tags.sorted(by: { $0.key < $1.key }) {
            if case .failed(let reason) = entry.phase { items.append(.tag(tag, reason: reason)) }
        }
        return items
    }

    private static func outstanding(_ state: State, reason: String) -> [UnpublishedItem] {
        state.blobs.filter { !$0.value.phase.isFailed }.keys.sorted().map { .blob($0, reason: reason) }
            + state.tags.filter { !$0.value.phase.isFailed }.keys.sorted().map { .tag($0, reason: reason) }
    }

    static func deadline(after duration: Duration) -> DispatchTime {
        let (seconds, attoseconds) = duration.components
        return .now() + .nanoseconds(Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000))
    }

    // MARK: - Workers

    private enum Job {
        case blob(Digest, size: Int64)
        case tag(TagPublication)
    }

    private func work() {
        while true {
            let next = state.withLock { state -> (job: Job?, wait: Duration?) in
                if state.stopped { return (nil, nil) }
                return takeJob(&state, now: .now)
            }
            if let job = next.job {
                run(job)
                continue
            }
            guard let wait = next.wait else { return }
            _ = available.wait(timeout: Self.deadline(after: wait))
        }
    }

    /// The next runnable item, else how long until one may be (a retry's pause).
    private func takeJob(_ state: inout State, now: ContinuousClock.Instant) -> (job: Job?, wait: Duration?) {
        var soonest: ContinuousClock.Instant = now + .seconds(1)
        let candidates = state.blobs.filter { $0.value.phase == .queued }.sorted { $0.value.sequence < $1.value.sequence }
        for (digest, upload) in candidates {
            if let notBefore = upload.notBefore, notBefore > now {
                soonest = min(soonest, notBefore)
                continue
            }
            state.blobs[digest]!.phase = .running
            return (.blob(digest, size: upload.size), nil)
        }
        for (tag, entry) in state.tags.sorted(by: { $0.key < $1.key }) where entry.phase == .queued {
            // Always last: not before every blob the manifest reaches is on the remote.
            let missing = entry.publication.blobs.compactMap { blob in state.blobs[blob.digest].map { (blob.digest, $0.phase) } }
            if let (digest, phase) = missing.first(where: { $0.1.isFailed }), case .failed(let reason) = phase {
                state.tags[tag]!.phase = .failed("blob \(digest) could not be published (\(reason))")
                logger.error("tag not published: a blob it needs could not be published",
                             metadata: ["tag": "\(tag)", "blob": "\(digest)", "remote": "\(publisher.displayName)"])
                changed.signal()
                continue
            }
            guard missing.isEmpty else { continue }
            if let notBefore = entry.notBefore, notBefore > now {
                soonest = min(soonest, notBefore)
                continue
            }
            state.tags[tag]!.phase = .running
            return (.tag(entry.publication), nil)
        }
        return (nil, now.duration(to: soonest))
    }

    private func run(_ job: Job) {
        switch job {
        case .blob(let digest, let size):
            let outcome: Result<BlobPublication, any Error>
            let early = state.withLock { $0.earlyUploads.removeValue(forKey: digest) }
            if store.hasComplete(digest) {
                outcome = Result {
                    try publisher.publishBlob(digest, size: size, contentsAt: store.completePath(digest), sentEarlyBy: early)
                }
            } else if let early {
                abandonInBackground(early)
                outcome = .failure(CacheError("it is no longer in the local cache \(store.directory)"))
            } else if let copy = copier.withLock({ $0 }) {
                outcome = Result {
                    let copied = try copy(digest, size)
                    return try withExtendedLifetime(copied) { try publisher.publishBlob(digest, size: size, contentsAt: copied.path) }
                }
            } else {
                outcome = .failure(CacheError("it is no longer in the local cache \(store.directory)"))
            }
            finishBlob(digest, outcome.map { _ in () })
        case .tag(let publication):
            let outcome = Result {
                try publisher.publishTag(publication.tag, manifest: publication.manifest,
                                         manifestBytes: Array(publication.manifestBytes), smallBlob: publication.smallBlob)
            }
            finishTag(publication, outcome)
        }
        // What was waiting on this (a tag on its blobs) may run now.
        for _ in 0..<workerCount { available.signal() }
        changed.signal()
    }

    /// The phase after a failure: queued again after a pause while the failure is transient
    /// and attempts remain, failed otherwise.
    private func afterFailure(_ error: any Error, failures: Int) -> (Phase, ContinuousClock.Instant?) {
        let transient = (error as? any BlobSourceFailure)?.isTransient ?? false
        guard transient, failures < maxAttempts else {
            return (.failed(transient ? "\(error) (\(failures) attempts)" : "\(error)"), nil)
        }
        return (.queued, .now + retryPause(failures))
    }

    private func finishBlob(_ digest: Digest, _ outcome: Result<Void, any Error>) {
        switch outcome {
        case .success:
            // Out of the journal before out of the table: a tag never goes out while its blob
            // could still be missing after a restart.
            guard !state.withLock({ $0.stopped }) else { return }
            journal.removeBlob(digest)
            let discard = state.withLock { state -> Bool in
                let discard = state.blobs[digest]?.discardWhenPublished ?? false
                state.blobs[digest] = nil
                state.published.insert(digest)
                return discard
            }
            if discard { store.discardComplete(digest) }
            logger.debug("blob published", metadata: ["digest": "\(digest)", "remote": "\(publisher.displayName)"])
        case .failure(let error):
            let phase = state.withLock { state -> Phase? in
                guard !state.stopped, var upload = state.blobs[digest] else { return nil }
                upload.failures += 1
                (upload.phase, upload.notBefore) = afterFailure(error, failures: upload.failures)
                state.blobs[digest] = upload
                return upload.phase
            }
            switch phase {
            case .failed(let reason)?:
                logger.error("blob not published", metadata: ["digest": "\(digest)", "remote": "\(publisher.displayName)", "error": "\(reason)"])
            case .queued?:
                logger.warning("blob upload failed; trying again", metadata: ["digest": "\(digest)", "error": "\(error)"])
            default:
                break
            }
        }
    }

    private func finishTag(_ publication: TagPublication, _ outcome: Result<Void, any Error>) {
        let tag = publication.tag
        switch outcome {
        case .success:
            // Out of the journal before out of the table, as a blob: `drain` may return as soon
            // as the table is empty. No newer publication arrives meanwhile: it would need the
            // journal's lock, held here.
            let recorded = tagJournal.withLock { _ -> Bool in
                let done = state.withLock { state -> Bool? in
                    guard !state.stopped, let entry = state.tags[tag] else { return nil }
                    return entry.newer == nil
                }
                guard let done else { return false }
                if done { journal.removeTag(tag) }
                state.withLock { state in
                    state.remoteTags[tag] = publication.manifest.digest
                    if let newer = state.tags[tag]?.newer {
                        state.tags[tag] = TagEntry(publication: newer, phase: .queued)
                    } else {
                        state.tags[tag] = nil
                    }
                }
                return true
            }
            guard recorded else { return }
            logger.notice("tag published", metadata: ["tag": "\(tag)", "manifest": "\(publication.manifest.digest)",
                                                      "remote": "\(publisher.displayName)"])
        case .failure(let error):
            let phase = state.withLock { state -> Phase? in
                guard !state.stopped, var entry = state.tags[tag] else { return nil }
                if let newer = entry.newer {
                    // The newer publication replaces this one: it is tried afresh.
                    state.tags[tag] = TagEntry(publication: newer, phase: .queued)
                    return nil
                }
                entry.failures += 1
                (entry.phase, entry.notBefore) = afterFailure(error, failures: entry.failures)
                state.tags[tag] = entry
                return entry.phase
            }
            switch phase {
            case .failed(let reason)?:
                logger.error("tag not published", metadata: ["tag": "\(tag)", "remote": "\(publisher.displayName)", "error": "\(reason)"])
            case .queued?:
                logger.warning("tag publication failed; trying again", metadata: ["tag": "\(tag)", "error": "\(error)"])
            default:
                break
            }
        }
    }
}
