import FoundationEssentials
import SystemSupport
import Logging
import OCI
import RemoteStore
import Synchronization

public enum BlobReadError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The remote failed or stalled past every retry.
    case remote(String)
    /// The bytes the remote sent do not hash to the blob's name.
    case digestMismatch(Digest)
    /// The local cache could not be read or written.
    case local(String)
    /// The mount is shutting down.
    case cancelled

    public var description: String {
        switch self {
        case .remote(let message): return message
        case .digestMismatch(let digest): return "blob \(digest): downloaded content does not match its digest; discarded"
        case .local(let message): return message
        case .cancelled: return "cancelled"
        }
    }
}

/// When a verified blob, already served from its partial file, is made durable (fsync, rename
/// into `blobs/`): once no read came for `quietPeriod` and nothing is being fetched, or when it
/// has waited `delayLimit`. Unmounting commits at once.
public struct CommitTiming: Sendable {
    public var quietPeriod: Duration
    public var delayLimit: Duration

    public init(quietPeriod: Duration = .seconds(1), delayLimit: Duration = .seconds(10)) {
        self.quietPeriod = quietPeriod
        self.delayLimit = delayLimit
    }
}

/// How a blob is cut up and read ahead.
public struct FetchTuning: Sendable, Equatable {
    /// The unit of presence: each block is fetched, recorded and checked as a whole.
    public var blockSize: Int64
    /// The largest range one request asks for; requests never cross a chunk boundary, so a
    /// long read is fetched as fixed-size chunks on several connections at once.
    public var chunkSize: Int64
    /// Read-ahead after a first or a random read, and its limit while reads stay sequential.
    public var initialReadAhead: Int64
    public var maximumReadAhead: Int64
    /// Range requests in flight at once for the whole process.
    public var connections: Int

    public init(blockSize: Int64 = 1 << 20, chunkSize: Int64 = 8 << 20, initialReadAhead: Int64 = 1 << 20,
                maximumReadAhead: Int64 = 64 << 20, connections: Int = 16) {
        self.blockSize = max(blockSize, 4096)
        self.chunkSize = max(chunkSize / self.blockSize, 1) * self.blockSize
        self.initialReadAhead = initialReadAhead
        self.maximumReadAhead = maximumReadAhead
        self.connections = max(connections, 1)
    }
}

/// Serves byte ranges of lazily downloaded blobs.
///
/// A blob is fetched block by block into a shared partial file: a read asks for the blocks it
/// covers plus a read-ahead window that doubles while reading stays sequential, and each block
/// is fetched once however many readers, in this process or in other mounts of the same
/// cache directory, want it. Readers are answered as soon as their blocks are on disk. The
/// blob's digest advances over the downloaded prefix; a read that reaches the end of a blob is
/// answered only once the whole blob matched it, so a reader can never receive a corrupt blob
/// whole. A matching blob is made durable and renamed into the cache's complete blobs.
public final class BlobFetcher: Sendable {
    /// The bytes are valid only during the call: they sit in a buffer that later reads reuse.
    public typealias Reply = @Sendable (Result<UnsafeRawBufferPointer, BlobReadError>) -> Void

    /// One open file handle on a blob. A handle that was answered with bytes of a download
    /// that later failed its digest is failed from then on, so no reader sees content switch.
    public struct ReaderID: Hashable, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
    }

    struct Waiter {
        var offset: Int64
        var end: Int64
        var reader: ReaderID?
        var reply: Reply
        /// When it began waiting; with the blob's last progress, what bounds the wait.
        var since = ContinuousClock.now
    }

    enum BlockState: Equatable {
        case absent
        /// In a job that has not started yet.
        case queued
        /// Being written by the running job with this ID, and by no other.
        case fetching(owner: Int)
        /// Another process claimed it; it is watched until it lands or the claim goes away.
        case elsewhere
        /// On disk from an earlier process, to be checked against its CRC before any use.
        case unverified(UInt32)
        case present

        var isOnDisk: Bool {
            switch self {
            case .present, .unverified: return true
            default: return false
            }
        }
    }

    /// One blob being fetched, changed only under the state lock. A class, so that changing one
    /// block does not copy every block's state (a struct taken out of the dictionary and put back
    /// copied its arrays each time: 32 KiB per read of a 4 GiB blob).
    final class Transfer {
        let data: OpenFile
        let journal: BlockJournal
        let size: Int64
        var blocks: [BlockState]
        var window: ReadAheadWindow
        var waiters: [Waiter] = []
        /// Blocks hashed into `verifier`, from the first; one thread hashes at a time.
        var hashedBlocks = 0
        var hashing = false
        var verifier = DigestVerifier()
        /// The whole blob matched its digest; it is served from `data` until it is committed.
        var verified = false
        var verifiedAt: ContinuousClock.Instant?
        /// Blocks came from an earlier process: a mismatch is worth one fetch from scratch.
        var usedEarlierBlocks = false
        /// The remote answers ranges with the whole blob: one stream fetches everything.
        var rangesIgnored = false
        /// Jobs queued or running for this transfer.
        var jobs = 0
        /// Queued blocks whose job waits behind readers' jobs.
        var queuedForReadAhead: Set<Int> = []
        /// When each block now `.elsewhere` was found claimed by another process.
        var elsewhereSince: [Int: ContinuousClock.Instant] = [:]
        var lastUse = ContinuousClock.now
        /// When a block last landed: a waiting read is failed after `readStallLimit` without any.
        var lastProgress = ContinuousClock.now
        /// When a fetch last failed its readers.
        var lastFailure: ContinuousClock.Instant?
        /// Handles answered with bytes of this download before it was verified.
        var unverifiedReaders: Set<ReaderID> = []

        init(data: OpenFile, journal: BlockJournal, size: Int64, blocks: [BlockState], window: ReadAheadWindow, usedEarlierBlocks: Bool) {
            self.data = data
            self.journal = journal
            self.size = size
            self.blocks = blocks
            self.window = window
            self.usedEarlierBlocks = usedEarlierBlocks
        }

        var isIdle: Bool { waiters.isEmpty && jobs == 0 && !hashing && !verified }

        func isFetching(_ index: Int) -> Bool {
            if case .fetching = blocks[index] { return true }
            return false
        }

        func blocks(covering range: Range<Int64>, blockSize: Int64) -> ClosedRange<Int> {
            Int(range.lowerBound / blockSize)...Int((range.upperBound - 1) / blockSize)
        }

        func canServe(_ waiter: Waiter, blockSize: Int64) -> Bool {
            if waiter.end == size && !verified { return false }
            return blocks(covering: waiter.offset..<waiter.end, blockSize: blockSize).allSatisfy { blocks[$0] == .present }
        }
    }

    struct State {
        var transfers: [Digest: Transfer] = [:]
        /// Blobs whose last fetch failed: the next one waits out a pause that grows with each
        /// failure in a row, shared by every reader (the kernel retries a failed readahead page
        /// by page). A read is never refused for an earlier failure: the remote may be back.
        var backoffs: [Digest: RetryBackoff] = [:]
        /// Blobs with open file handles: never evicted by this process.
        var pins: [Digest: Int] = [:]
        var nextReader: UInt64 = 1
        var nextJob = 1
        /// Handles that were answered with bytes of a download that then failed its digest.
        var poisonedReaders: Set<ReaderID> = []
        /// When each blob's use was last recorded on disk (for LRU), to record it rarely.
        var lastMarkedUsed: [Digest: ContinuousClock.Instant] = [:]
        var timerRunning = false
        var committing = false
        /// Callers of `waitUntilIdle`, who want verified blobs committed now.
        var commitsWanted = 0
        var lastRead = ContinuousClock.now
        var cancelled = false
        /// Blobs whose start was fetched ahead of any reader (at most once each), and those
        /// of them still waiting in the queue to open their transfer.
        var prefetched: Set<Digest> = []
        var prefetchesQueued = 0
    }

    /// Idle partial transfers kept open (two descriptors each) so that their blocks need no
    /// second check; older ones are closed and reopened from their journal when read again.
    static let idleTransfersKept = 64

    let store: ContentStore
    let source: any RemoteCacheSource
    let logger: Logger
    let maxAttempts: Int
    let otherProcessStall: Duration
    /// The longest a read waits while its blob makes no progress at all.
    let readStallLimit: Duration
    /// How long a fetch nobody waits for goes on after the blob's last read: read-ahead of a
    /// live sequential reader continues, a stream the reader left stops.
    let unwatchedFetchLimit: Duration
    let commitTiming: CommitTiming
    let limits: CacheLimits?
    let tuning: FetchTuning
    let queue: FetchQueue
    /// Buffers for answering reads and for checking blocks: reads arrive in at most 1 MiB (the
    /// FUSE mount's max_read), and more copies at once than the machine has cores gain nothing.
    let buffers: ReadBuffers
    let state = Mutex(State())
    /// Replies owed to readers; shutdown waits for it to reach zero so that nothing answers a
    /// request after the kernel session is gone.
    let owedReplies = Atomic<Int>(0)
    /// Verified blobs still being made durable; shutdown lets them finish.
    let commitsInFlight = Atomic<Int>(0)
    /// Range requests started, for tests and metrics.
    let requestsStarted = Atomic<Int>(0)
    /// Set once at shutdown; checked for every piece of body a fetch receives.
    let stopping = Atomic<Bool>(false)
    /// Told when a download that already answered reads failed its digest, so that the kernel
    /// drops the pages it cached from it.
    let withdrawnHandler = Mutex<(@Sendable (Digest, _ spared: [Range<Int64>]) -> Void)?>(nil)

    /// - Parameter otherProcessStall: how long a block that another mount of the same cache
    ///   directory claimed may take to land before this one fetches it regardless: a stopped
    ///   (not dead) process keeps its claims but makes no progress.
    /// - Parameter readStallLimit: how long a read may wait while its blob makes no progress;
    ///   by default what `maxAttempts` stalled requests and their pauses can take.
    public init(store: ContentStore, source: any RemoteCacheSource, logger: Logger, maxAttempts: Int = 3,
                otherProcessStall: Duration = .seconds(60), readStallLimit: Duration? = nil,
                unwatchedFetchLimit: Duration = .seconds(10),
                commitTiming: CommitTiming = CommitTiming(), limits: CacheLimits? = nil, tuning: FetchTuning = FetchTuning()) {
        self.store = store
        self.source = source
        self.logger = logger
        self.maxAttempts = max(maxAttempts, 1)
        self.otherProcessStall = otherProcessStall
        self.readStallLimit = readStallLimit ?? (otherProcessStall + RetryBackoff.maximum) * (max(maxAttempts, 1) + 1)
        self.unwatchedFetchLimit = unwatchedFetchLimit
        self.commitTiming = commitTiming
        self.limits = limits
        self.tuning = tuning
        self.queue = FetchQueue(workers: tuning.connections)
        self.buffers = ReadBuffers(size: max(Int(tuning.blockSize), 1 << 20), count: max(2, ProcessInfo.processInfo.activeProcessorCount))
    }

    // MARK: - Reading

    /// Reads `count` bytes at `offset` of a blob of `size` bytes for the handle `reader` (from
    /// `openReader`; nil for a read outside any handle). `reply` is called exactly once: on the
    /// calling thread when the bytes are already local, later from a fetch otherwise.
    public func read(_ digest: Digest, size: Int64, offset: Int64, count: Int, reader: ReaderID? = nil, reply: @escaping Reply) {
        let end = min(offset + Int64(count), size)
        if let reader, state.withLock({ $0.poisonedReaders.contains(reader) }) {
            return reply(.failure(.digestMismatch(digest)))
        }
        guard offset < end else { return reply(.success(UnsafeRawBufferPointer(start: nil, count: 0))) }
        read(Waiter(offset: offset, end: end, reader: reader, reply: reply), of: digest, size: size, attempts: 3)
    }

    /// A file handle on the blob opened: keep the blob out of eviction while it is open.
    public func openReader(_ digest: Digest) -> ReaderID {
        pin(digest)
        return state.withLock { state in
            defer { state.nextReader += 1 }
            return ReaderID(rawValue: state.nextReader)
        }
    }

    public func closeReader(_ reader: ReaderID, of digest: Digest) {
        unpin(digest)
        state.withLock { state in
            _ = state.poisonedReaders.remove(reader)
            for transfer in state.transfers.values { transfer.unverifiedReaders.remove(reader) }
        }
    }

    /// True when reads of the blob can only ever be answered with its verified content: the
    /// kernel may then keep the pages it caches across opens.
    public func isVerified(_ digest: Digest) -> Bool {
        if state.withLock({ $0.transfers[digest]?.verified == true }) { return true }
        return store.hasComplete(digest)
    }

    /// `handler` learns of every blob whose download answered reads and then failed its digest,
    /// before the reads still waiting on it (`spared`, their pages being read) are answered.
    public func onWithdrawnContent(_ handler: @escaping @Sendable (Digest, _ spared: [Range<Int64>]) -> Void) {
        withdrawnHandler.withLock { $0 = handler }
    }

    /// Starts fetching the start of a blob nobody reads yet, as much as a first read fetches,
    /// at read-ahead priority: BuildKit reads a chain's layers one after another, and the next
    /// one's first read then finds its bytes there or on their way. Opening the partial file
    /// (and making room for it) happens on a fetch worker, not in the caller's read.
    public func prefetch(_ digest: Digest, size: Int64) {
        let queued = state.withLock { state -> Bool in
            guard !state.cancelled, state.transfers[digest] == nil, state.prefetched.insert(digest).inserted else { return false }
            state.prefetchesQueued += 1
            return true
        }
        guard queued else { return }
        queue.enqueue(.readAhead) { [self] in startPrefetch(digest, size: size) }
    }

    /// A blob already opened, failing or complete is left alone.
    private func startPrefetch(_ digest: Digest, size: Int64) {
        // Counted until its jobs are, so that `waitUntilIdle` sees one or the other.
        defer { state.withLock { $0.prefetchesQueued -= 1 } }
        guard !store.hasComplete(digest), state.withLock({ $0.backoffs[digest] == nil }),
              case .success(nil) = openTransfer(digest, size: size) else { return }
        submit(state.withLock { state -> [Job] in
            guard !state.cancelled, let transfer = state.transfers[digest], !transfer.verified else { return [] }
            let first = 0..<min(size, tuning.initialReadAhead)
            return schedule(transfer, digest: digest, reading: first, ahead: tuning.initialReadAhead, speculative: true)
        })
    }

    func read(_ waiter: Waiter, of digest: Digest, size: Int64, attempts: Int) {
        enum Next {
            case serve(OpenFile, [Job])
            case check([Int: UInt32])
            case waiting([Job])
            case open
            case fail(BlobReadError)
        }
        let blockSize = tuning.blockSize
        let next: Next = state.withLock { state in
            if state.cancelled { return .fail(.cancelled) }
            state.lastRead = .now
            if let reader = waiter.reader, state.poisonedReaders.contains(reader) { return .fail(.digestMismatch(digest)) }
            guard let transfer = state.transfers[digest] else { return .open }
            transfer.lastUse = .now
            // Blocks an earlier process left are checked before they are used.
            var unchecked: [Int: UInt32] = [:]
            for index in transfer.blocks(covering: waiter.offset..<waiter.end, blockSize: blockSize) {
                if case .unverified(let crc) = transfer.blocks[index] { unchecked[index] = crc }
            }
            if !unchecked.isEmpty { return .check(unchecked) }
            let ahead = transfer.window.advance(offset: waiter.offset, end: waiter.end)
            var jobs = schedule(transfer, digest: digest, reading: waiter.offset..<waiter.end, ahead: ahead)
            if transfer.canServe(waiter, blockSize: blockSize) {
                if !transfer.verified, let reader = waiter.reader { transfer.unverifiedReaders.insert(reader) }
                return .serve(transfer.data, jobs)
            }
            transfer.waiters.append(waiter)
            owedReplies.add(1, ordering: .relaxed)
            jobs += promote(transfer, digest: digest, reading: waiter.offset..<waiter.end)
            startTimer(&state)
            return .waiting(jobs)
        }
        switch next {
        case .serve(let file, let jobs):
            submit(jobs)
            serve(waiter, from: file)
        case .check(let unchecked):
            adoptRecordedBlocks(digest, unchecked)
            read(waiter, of: digest, size: size, attempts: attempts)
        case .waiting(let jobs):
            submit(jobs)
        case .fail(let error):
            waiter.reply(.failure(error))
        case .open:
            guard attempts > 0 else { return waiter.reply(.failure(.local("blob \(digest): cannot open it in the cache"))) }
            switch openTransfer(digest, size: size) {
            case .success(let complete?):
                serve(waiter, from: complete)
            case .success(nil):
                read(waiter, of: digest, size: size, attempts: attempts - 1)
            case .failure(let error):
                waiter.reply(.failure(error))
            }
        }
    }

    /// A file handle on the blob opened: keep it out of eviction and record the use. No I/O
    /// beyond, at most once a minute per blob, one timestamp update.
    public func pin(_ digest: Digest) {
        let markNow = state.withLock { state -> Bool in
            state.pins[digest, default: 0] += 1
            if let last = state.lastMarkedUsed[digest], last.duration(to: .now) < .seconds(60) { return false }
            state.lastMarkedUsed[digest] = .now
            return true
        }
        if markNow { store.markUsed(digest) }
    }

    public func unpin(_ digest: Digest) {
        state.withLock { state in
            guard let count = state.pins[digest] else { return }
            state.pins[digest] = count > 1 ? count - 1 : nil
        }
    }

    /// True when the blob is in the local cache, complete and verified.
    public func isComplete(_ digest: Digest) -> Bool {
        store.hasComplete(digest)
    }

    /// Fails every waiting read and stops fetching; returns once no reply is owed any more.
    public func shutdown() {
        let waiters = state.withLock { state -> [Waiter] in
            state.cancelled = true
            stopping.store(true, ordering: .relaxed)
            var all: [Waiter] = []
            for digest in state.transfers.keys {
                all += state.transfers[digest]!.waiters
                state.transfers[digest]!.waiters = []
            }
            return all
        }
        queue.stop()
        for waiter in waiters { answer(waiter, failing: .cancelled) }
        // Replies already taken off the state are being sent right now; they finish quickly.
        while owedReplies.load(ordering: .acquiring) > 0 { SystemThread.sleep(for: .milliseconds(1)) }
        // Queued jobs were dropped; a verified blob being made durable is let finish.
        while commitsInFlight.load(ordering: .acquiring) > 0 || state.withLock({ $0.transfers.values.contains(where: \.verified) }) {
            SystemThread.sleep(for: .milliseconds(1))
        }
    }

    /// Returns once no fetch is queued or running, no blob is being hashed, and every verified
    /// blob is in `blobs/` (or failed to get there).
    public func waitUntilIdle() {
        state.withLock { $0.commitsWanted += 1 }
        defer { state.withLock { $0.commitsWanted -= 1 } }
        while commitsInFlight.load(ordering: .acquiring) > 0
            || state.withLock({ $0.prefetchesQueued > 0 || $0.transfers.values.contains { $0.verified || $0.hashing || $0.jobs > 0 } }) {
            SystemThread.sleep(for: .milliseconds(1))
        }
    }

    /// Answers a reader that was counted in `owedReplies`.
    func answer(_ waiter: Waiter, from file: OpenFile) {
        serve(waiter, from: file)
        owedReplies.subtract(1, ordering: .releasing)
    }

    func answer(_ waiter: Waiter, failing error: BlobReadError) {
        waiter.reply(.failure(error))
        owedReplies.subtract(1, ordering: .releasing)
    }

    func serve(_ waiter: Waiter, from file: OpenFile) {
        let failure: BlobReadError? = buffers.withBuffer(count: Int(waiter.end - waiter.offset)) { buffer in
            do throws(CacheError) {
                let filled = try file.read(into: buffer, offset: waiter.offset)
                waiter.reply(.success(UnsafeRawBufferPointer(rebasing: buffer[..<filled])))
                return nil
            } catch {
                return .local(error.description)
            }
        } ?? .local("no memory for a read of \(waiter.end - waiter.offset) bytes")
        if let failure { waiter.reply(.failure(failure)) }
    }

    // MARK: - Opening

    /// The complete blob when the cache has it; otherwise registers a transfer over the shared
    /// partial file and returns nil.
    private func openTransfer(_ digest: Digest, size: Int64) -> Result<OpenFile?, BlobReadError> {
        if let limits, size > limits.maxBytes, !store.hasComplete(digest) {
            return .failure(.local("blob \(digest) is \(size) bytes, more than the cache may hold (--cache-size \(limits.maxBytes))"))
        }
        let local: ContentStore.LocalBlob
        do {
            local = try store.openBlob(digest, size: size, blockSize: tuning.blockSize)
        } catch {
            return .failure(.local(error.description))
        }
        guard case .partial(let data, let journal) = local else {
            if case .complete(let file) = local { return .success(file) }
            return .success(nil)
        }
        // The new partial file counts at its full size: make room for it.
        makeRoom(for: digest)
        let recorded = journal.recordedChecksums()
        let blocks = recorded.map { crc in crc.map { BlockState.unverified($0) } ?? .absent }
        let presentBytes = recorded.indices.reduce(Int64(0)) { sum, index in
            recorded[index] == nil ? sum : sum + Int64(journal.range(ofBlock: index).count)
        }
        if presentBytes > 0 {
            logger.info("continuing an interrupted download", metadata: ["digest": "\(digest)", "bytes on disk": "\(presentBytes)"])
        }
        let window = ReadAheadWindow(initial: tuning.initialReadAhead, maximum: tuning.maximumReadAhead,
                                     tolerance: 4 * tuning.blockSize)
        state.withLock { state in
            guard state.transfers[digest] == nil else { return }
            state.transfers[digest] = Transfer(data: data, journal: journal, size: size, blocks: blocks, window: window,
                                               usedEarlierBlocks: presentBytes > 0)
            closeIdleTransfers(&state)
        }
        return .success(nil)
    }

    private func closeIdleTransfers(_ state: inout State) {
        let idle = state.transfers.filter { $0.value.isIdle && state.pins[$0.key] == nil }
        guard idle.count > Self.idleTransfersKept else { return }
        for (digest, _) in idle.sorted(by: { $0.value.lastUse < $1.value.lastUse }).prefix(idle.count - Self.idleTransfersKept) {
            state.transfers[digest] = nil
        }
    }

    /// Evicts least recently used blobs until the cache, this blob's partial file included,
    /// fits under the cap.
    private func makeRoom(for digest: Digest) {
        guard let limits else { return }
        let protected = state.withLock { state in Set(state.pins.keys).union(state.transfers.keys).union([digest]) }
        let removed = store.evict(toFit: limits, protected: { protected.contains($0) })
        if !removed.isEmpty {
            logger.info("evicted least recently used blobs", metadata: ["count": "\(removed.count)",
                                                                        "bytes": "\(removed.reduce(0) { $0 + $1.size })"])
        }
    }
}

// MARK: - Scheduling

extension BlobFetcher {
    /// Blocks `first...last` of one blob, fetched by one range request.
    struct Job: Sendable {
        var digest: Digest
        var blocks: ClosedRange<Int>
        var priority: FetchQueue.Priority
        /// Fetch even what another process claimed: its claim has stalled past the bound.
        var overridingClaims = false
    }

    /// Marks the absent blocks of the read and of the read-ahead after it as queued and
    /// returns the jobs that fetch them, cut at chunk boundaries.
    /// `speculative`: nobody reads `range` yet, so it too is read-ahead.
    func schedule(_ transfer: Transfer, digest: Digest, reading range: Range<Int64>, ahead: Int64, speculative: Bool = false) -> [Job] {
        let blockSize = tuning.blockSize, chunkSize = tuning.chunkSize
        var wantedEnd = min(transfer.size, range.upperBound + ahead)
        // Once the window spans chunks, fetch whole ones: fewer, evenly sized requests.
        if ahead >= chunkSize {
            wantedEnd = min(transfer.size, (wantedEnd + chunkSize - 1) / chunkSize * chunkSize)
        } else if range.upperBound < transfer.size {
            // A smaller window is topped up only once less than half of it remains ahead, so
            // that a sequential reader's ramp asks for its window in a few requests, not one
            // block per read.
            let halfWindow = transfer.blocks(covering: range.upperBound..<min(transfer.size, range.upperBound + max(ahead / 2, 1)),
                                             blockSize: blockSize)
            if halfWindow.allSatisfy({ transfer.blocks[$0] != .absent }) { wantedEnd = range.upperBound }
        }
        var reading = transfer.blocks(covering: range, blockSize: blockSize)
        // A read of the end is answered once the whole blob matched its digest: it needs all.
        if range.upperBound == transfer.size { reading = 0...reading.upperBound }
        let wanted = reading.lowerBound...transfer.blocks(covering: range.lowerBound..<wantedEnd, blockSize: blockSize).upperBound
        if transfer.rangesIgnored {
            // One stream brings every block; a job for the first absent one starts it, when
            // anything this read wants is missing.
            guard wanted.contains(where: { transfer.blocks[$0] == .absent }),
                  let first = transfer.blocks.firstIndex(of: .absent) else { return [] }
            transfer.blocks[first] = .queued
            transfer.jobs += 1
            return [Job(digest: digest, blocks: first...first, priority: .reader)]
        }
        let blocksPerChunk = Int(chunkSize / blockSize)
        var jobs: [Job] = []
        var runStart: Int?
        func closeRun(_ end: Int) {
            guard let start = runStart else { return }
            let priority: FetchQueue.Priority = start <= reading.upperBound && !speculative ? .reader : .readAhead
            jobs.append(Job(digest: digest, blocks: start...end, priority: priority))
            if priority == .readAhead { transfer.queuedForReadAhead.formUnion(start...end) }
            runStart = nil
        }
        for index in wanted {
            if transfer.blocks[index] == .absent {
                if runStart != nil && index % blocksPerChunk == 0 { closeRun(index - 1) }
                if runStart == nil { runStart = index }
                transfer.blocks[index] = .queued
            } else {
                closeRun(index - 1)
            }
        }
        closeRun(wanted.upperBound)
        transfer.jobs += jobs.count
        return jobs
    }

    /// A reader now waits on blocks still queued behind read-ahead: queue them again ahead of
    /// it. Whichever job starts first takes them; the other finds nothing left to do.
    func promote(_ transfer: Transfer, digest: Digest, reading range: Range<Int64>) -> [Job] {
        let queued = transfer.blocks(covering: range, blockSize: tuning.blockSize).filter {
            transfer.blocks[$0] == .queued && transfer.queuedForReadAhead.contains($0)
        }
        transfer.queuedForReadAhead.subtract(queued)
        guard let first = queued.first, let last = queued.last else { return [] }
        transfer.jobs += 1
        return [Job(digest: digest, blocks: first...last, priority: .reader)]
    }

    func submit(_ jobs: [Job]) {
        for job in jobs {
            queue.enqueue(job.priority) { [self] in run(job) }
        }
    }
}
