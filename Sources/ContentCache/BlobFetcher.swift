import FoundationEssentials
import SystemSupport
import Logging
import OCI
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
    /// A layer's verified bytes do not decompress to its tar (corrupt, truncated, or not the
    /// stream its diffID names): the `layers/` view answers EIO, never other bytes.
    case undecodable(Digest, String)

    public var description: String {
        switch self {
        case .remote(let message): return message
        case .digestMismatch(let digest): return "blob \(digest): downloaded content does not match its digest; discarded"
        case .local(let message): return message
        case .cancelled: return "cancelled"
        case .undecodable(let digest, let why): return "layer \(digest) cannot be decompressed: \(why)"
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
    /// The range one request asks for while the read-ahead window is small; requests never
    /// cross a chunk boundary, so a long read is fetched on several connections at once. Once
    /// the window holds 8 requests of twice the chunk (at 128 MiB), requests grow with it
    /// (`TransferMachine.requestSize`).
    public var chunkSize: Int64
    /// Read-ahead after a first or a random read, and its limit while reads stay sequential.
    public var initialReadAhead: Int64
    public var maximumReadAhead: Int64
    /// Range requests in flight at once for the whole process.
    public var connections: Int
    /// How much of a download stays in the page cache behind its hash; the rest is dropped as
    /// the hash passes. A 4 GiB cold read took 22-24 s keeping every page (30 CPU-s in the
    /// daemon, against 2.7 for 1 GiB) and 9-11 s with 1 GiB kept; reads of 1 GiB or less are
    /// untouched, and dropping from 256 MiB on made them no faster.
    public var cachedBehindHash: Int64

    public init(blockSize: Int64 = 1 << 20, chunkSize: Int64 = 8 << 20, initialReadAhead: Int64 = 1 << 20,
                maximumReadAhead: Int64 = 256 << 20, connections: Int = 16, cachedBehindHash: Int64 = 1 << 30) {
        self.blockSize = max(blockSize, 4096)
        self.chunkSize = max(chunkSize / self.blockSize, 1) * self.blockSize
        self.initialReadAhead = initialReadAhead
        self.maximumReadAhead = maximumReadAhead
        self.connections = max(connections, 1)
        self.cachedBehindHash = max(cachedBehindHash, 0)
    }
}

/// Serves byte ranges of lazily downloaded blobs: the executor of `TransferMachine`.
///
/// A blob is fetched block by block into a shared partial file: a read asks for the blocks it
/// covers plus a read-ahead window that doubles while reading stays sequential, and each block
/// is fetched once however many readers, in this process or in other mounts of the same
/// cache directory, want it. Readers are answered as soon as their blocks are on disk. The
/// blob's digest advances over the downloaded prefix; a read that reaches the end of a blob is
/// answered only once the whole blob matched it, so a reader can never receive a corrupt blob
/// whole. A matching blob is made durable and renamed into the cache's complete blobs.
///
/// Every decision is the machine's; this class holds one per blob under one lock, performs
/// the actions it returns outside the lock (requests, file reads and writes, replies) and
/// reports back what happened.
public final class BlobFetcher: Sendable {
    /// The bytes are valid only during the call: they sit in a buffer that later reads reuse.
    public typealias Reply = @Sendable (Result<UnsafeRawBufferPointer, BlobReadError>) -> Void

    /// One open file handle on a blob. A handle that was answered with bytes of a download
    /// that later failed its digest is failed from then on, so no reader sees content switch.
    public struct ReaderID: Hashable, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
    }

    typealias ReadID = TransferMachine.ReadID
    typealias JobID = TransferMachine.JobID

    /// A blob being fetched: its decisions, and the files they are about. A class, so that an
    /// event changes the machine in place rather than copying its arrays out of the dictionary
    /// and back (32 KiB per read of a 4 GiB blob).
    // SAFETY: `machine` and `movingToMemory` are read and changed only under the fetcher's state lock; the rest is immutable.
    final class Transfer: @unchecked Sendable {
        var machine: TransferMachine
        let data: OpenFile
        let journal: BlockJournal
        /// Held in memory, not in the cache directory: never committed, dropped once idle.
        let inMemory: Bool
        /// Its blocks are being copied into memory: the cache's filesystem is full.
        var movingToMemory = false

        init(machine: TransferMachine, data: OpenFile, journal: BlockJournal, inMemory: Bool = false) {
            self.machine = machine
            self.data = data
            self.journal = journal
            self.inMemory = inMemory
        }

        /// Verified, and to be made durable in the cache directory.
        var awaitsCommit: Bool { machine.verified && !inMemory }
    }

    struct PendingReply {
        var digest: Digest
        var read: TransferMachine.Read
        var reply: Reply
    }

    struct State {
        var transfers: [Digest: Transfer] = [:]
        /// Replies owed to reads that wait in a machine.
        var pending: [ReadID: PendingReply] = [:]
        var nextGeneration: UInt64 = 1
        /// Blobs whose last fetch failed: the next one waits out a pause that grows with each
        /// failure in a row, shared by every reader (the kernel retries a failed readahead page
        /// by page). A read is never refused for an earlier failure: the remote may be back.
        var backoffs: [Digest: RetryBackoff] = [:]
        /// Blobs with open file handles: never evicted by this process.
        var pins: [Digest: Int] = [:]
        var nextReader: UInt64 = 1
        /// Handles that were answered with bytes of a download that then failed its digest.
        var poisonedReaders: Set<UInt64> = []
        /// When each blob's use was last recorded on disk (for LRU), to record it rarely.
        var lastMarkedUsed: [Digest: ContinuousClock.Instant] = [:]
        var timerRunning = false
        var committing = false
        /// Callers of `waitUntilIdle`, who want verified blobs committed now.
        var commitsWanted = 0
        var lastRead = ContinuousClock.now
        var cancelled = false
        /// Blobs fetched ahead of any reader that wait for a worker to open their transfer.
        var prefetchesOpening: Set<Digest> = []
        /// Until when the cache's filesystem counts as full: new downloads are held in memory.
        var diskFullUntil: ContinuousClock.Instant?
        /// Room eviction made that downloads have not filled yet. Room is made as bytes
        /// arrive, a step at a time, so that a size a descriptor merely declares evicts nothing
        /// and the cache directory is not scanned for every block.
        var roomMade: Int64 = 0
    }

    /// Idle partial transfers kept open (two descriptors each) so that their blocks need no
    /// second check; older ones are closed and reopened from their journal when read again.
    static let idleTransfersKept = 64

    let store: ContentStore
    let source: any BlobSource
    let logger: Logger
    let maxAttempts: Int
    let machineLimits: TransferMachine.Limits
    let commitTiming: CommitTiming
    let limits: CacheLimits?
    let tuning: FetchTuning
    /// The most that downloads held in memory (see `Transfer.inMemory`) may take together.
    let memoryLimit: Int64
    let queue: FetchQueue
    /// Opening blobs (the blob's lock, making room) and checking recorded blocks: work that
    /// waits on the disk or another process, off the FUSE threads, and not behind fetches
    /// that wait on the network.
    let localQueue: FetchQueue
    /// Buffers for answering reads and for checking blocks: reads arrive in at most 1 MiB (the
    /// FUSE mount's max_read), and more copies at once than the machine has cores gain nothing.
    let buffers: ReadBuffers
    let state = Mutex(State())
    /// Replies taken off the state and being sent; shutdown waits for none so that nothing
    /// answers a request after the kernel session is gone.
    let sendingReplies = Atomic<Int>(0)
    /// Verified blobs still being made durable; shutdown lets them finish.
    let commitsInFlight = Atomic<Int>(0)
    /// Identifies each read given to a machine; taken without the state lock on every read.
    let nextRead = Atomic<UInt64>(0)
    /// Set once at shutdown; checked for every piece of body a fetch receives.
    let stopping = Atomic<Bool>(false)
    /// Told when a download that already answered reads failed its digest, so that the kernel
    /// drops the pages it cached from it.
    let withdrawnHandler = Mutex<(@Sendable (Digest, _ spared: [Range<Int64>]) -> Void)?>(nil)
    /// Where reads are counted as cache hits or misses.
    let statistics: MountStatistics?

    /// - Parameter otherProcessStall: how long a block that another mount of the same cache
    ///   directory claimed may take to land before this one fetches it regardless: a stopped
    ///   (not dead) process keeps its claims but makes no progress.
    /// - Parameter readStallLimit: how long a read may wait while its blob makes no progress;
    ///   by default what `maxAttempts` stalled requests and their pauses can take.
    /// - Parameter unwatchedFetchLimit: how long a fetch nobody waits for goes on after the
    ///   blob's last read: read-ahead of a live sequential reader continues, a stream the
    ///   reader left stops.
    public init(store: ContentStore, source: any BlobSource, logger: Logger, maxAttempts: Int = 3,
                otherProcessStall: Duration = .seconds(60), readStallLimit: Duration? = nil,
                unwatchedFetchLimit: Duration = .seconds(10),
                commitTiming: CommitTiming = CommitTiming(), limits: CacheLimits? = nil, tuning: FetchTuning = FetchTuning(),
                memoryLimit: Int64 = BlobFetcher.defaultMemoryLimit, statistics: MountStatistics? = nil) {
        self.statistics = statistics
        self.store = store
        self.source = source
        self.logger = logger
        self.maxAttempts = max(maxAttempts, 1)
        self.machineLimits = TransferMachine.Limits(
            blockSize: tuning.blockSize, chunkSize: tuning.chunkSize, initialReadAhead: tuning.initialReadAhead,
            maximumReadAhead: tuning.maximumReadAhead,
            readStallLimit: readStallLimit ?? (otherProcessStall + RetryBackoff.maximum) * (max(maxAttempts, 1) + 1),
            unwatchedFetchLimit: unwatchedFetchLimit, otherProcessStall: otherProcessStall)
        self.commitTiming = commitTiming
        self.limits = limits
        self.tuning = tuning
        self.memoryLimit = memoryLimit
        self.queue = FetchQueue(workers: tuning.connections, prefetchLimit: tuning.connections / 4)
        self.localQueue = FetchQueue(workers: 4)
        self.buffers = ReadBuffers(size: max(Int(tuning.blockSize), 1 << 20), count: max(2, ProcessInfo.processInfo.activeProcessorCount))
    }

    /// An eighth of the machine's memory, and at least 256 MiB.
    public static var defaultMemoryLimit: Int64 {
        max(Int64(clamping: ProcessInfo.processInfo.physicalMemory / 8), 256 << 20)
    }

    // MARK: - Reading

    /// Reads `count` bytes at `offset` of a blob of `size` bytes for the handle `reader` (from
    /// `openReader`; nil for a read outside any handle). `reply` is called exactly once: on the
    /// calling thread when the bytes are already local, later from a fetch otherwise.
    public func read(_ digest: Digest, size: Int64, offset: Int64, count: Int, reader: ReaderID? = nil, reply: @escaping Reply) {
        let end = min(offset + Int64(count), size)
        guard offset < end else { return reply(.success(UnsafeRawBufferPointer(start: nil, count: 0))) }
        let id = ReadID(rawValue: nextRead.add(1, ordering: .relaxed).newValue)
        // A poisoned handle is refused under the lock `read` takes anyway.
        self.read(TransferMachine.Read(id: id, range: offset..<end, reader: reader?.rawValue, since: .now),
                  of: digest, size: size, reply: reply, attempts: 3)
    }

    /// Gives a read to the blob's machine, opening the blob first when it has none. What may
    /// wait on the disk or on another process (a blob's lock, making room, checking blocks an
    /// earlier process recorded) happens on a fetch worker, never on the caller's thread: the
    /// caller is a FUSE thread, and sixteen of them stuck would stall the whole mount.
    func read(_ read: TransferMachine.Read, of digest: Digest, size: Int64, reply: @escaping Reply, attempts: Int,
              onWorker: Bool = false) {
        enum Next {
            case outcome(TransferMachine.ReadOutcome, Transfer)
            case open
            case fail(BlobReadError)
        }
        let now = ContinuousClock.now
        let next: Next = state.withLock { state in
            if state.cancelled { return .fail(.cancelled) }
            state.lastRead = now
            if let reader = read.reader, state.poisonedReaders.contains(reader) { return .fail(.digestMismatch(digest)) }
            guard let transfer = state.transfers[digest] else { return .open }
            let outcome = transfer.machine.read(read, now: now)
            if case .waiting = outcome {
                state.pending[read.id] = PendingReply(digest: digest, read: read, reply: reply)
                startTimer(&state)
            }
            return .outcome(outcome, transfer)
        }
        switch next {
        case .outcome(.serve(let actions), let transfer):
            statistics?.blobRead(digest, bytes: read.range.upperBound - read.range.lowerBound, hit: true)
            perform(actions, for: digest, on: transfer)
            serve(read, reply, from: transfer.data)
        case .outcome(.waiting(let actions), let transfer):
            statistics?.blobRead(digest, bytes: read.range.upperBound - read.range.lowerBound, hit: false)
            perform(actions, for: digest, on: transfer)
        case .outcome(.check(let recorded), let transfer):
            guard onWorker else { return readOnWorker(read, of: digest, size: size, reply: reply, attempts: attempts) }
            adoptRecordedBlocks(digest, recorded, on: transfer)
            self.read(read, of: digest, size: size, reply: reply, attempts: attempts, onWorker: true)
        case .fail(let error):
            reply(.failure(error))
        case .open:
            // A complete blob is served at once: it only ever appears by a rename, whole.
            if let complete = try? store.openComplete(digest) {
                statistics?.blobRead(digest, bytes: read.range.upperBound - read.range.lowerBound, hit: true)
                return serve(read, reply, from: complete)
            }
            guard onWorker else { return readOnWorker(read, of: digest, size: size, reply: reply, attempts: attempts) }
            guard attempts > 0 else { return reply(.failure(.local("blob \(digest): cannot open it in the cache"))) }
            switch openTransfer(digest, size: size) {
            case .success(let complete?):
                statistics?.blobRead(digest, bytes: read.range.upperBound - read.range.lowerBound, hit: true)
                serve(read, reply, from: complete)
            case .success(nil):
                self.read(read, of: digest, size: size, reply: reply, attempts: attempts - 1, onWorker: true)
            case .failure(let error):
                reply(.failure(error))
            }
        }
    }

    private func readOnWorker(_ read: TransferMachine.Read, of digest: Digest, size: Int64, reply: @escaping Reply, attempts: Int) {
        let queued = localQueue.enqueue(.reader, dropped: { reply(.failure(.cancelled)) }) { [self] in
            self.read(read, of: digest, size: size, reply: reply, attempts: attempts, onWorker: true)
        }
        if !queued { reply(.failure(.cancelled)) }
    }

    /// Fetches blobs nobody reads yet, whole, in order, at the lowest priority (at most a
    /// quarter of the connections): BuildKit imports a chain by reading its layers whole, one
    /// after another, and the layers after the one it reads then arrive meanwhile. Blobs are
    /// taken while they fit in a quarter of the cache's cap; complete ones cost nothing. Calling
    /// it again for a blob keeps its queued fetches wanted (see `unwatchedFetchLimit`). Opening
    /// a partial file (and making room for it) happens on a worker, not in the caller's read.
    public func prefetch(_ blobs: [(digest: Digest, size: Int64)]) {
        var budget = limits.map { $0.maxBytes / 4 } ?? .max
        let now = ContinuousClock.now
        for (digest, size) in blobs {
            enum Next { case touched, open, skip }
            let next = state.withLock { state -> Next in
                if state.cancelled || state.backoffs[digest] != nil || state.prefetchesOpening.contains(digest) { return .skip }
                if let transfer = state.transfers[digest] {
                    return transfer.machine.verified || transfer.inMemory ? .skip : .touched
                }
                return .open
            }
            if next == .skip || (next == .open && store.hasComplete(digest)) { continue }
            guard size <= budget else { return }
            budget -= size
            if next == .touched {
                event(digest) { $0.prefetch(now: now) }
                continue
            }
            let queued = state.withLock { state -> Bool in
                guard !state.cancelled, state.transfers[digest] == nil else { return false }
                return state.prefetchesOpening.insert(digest).inserted
            }
            guard queued else { continue }
            let started = localQueue.enqueue(.prefetch, dropped: { [self] in state.withLock { _ = $0.prefetchesOpening.remove(digest) } }) {
                [self] in startPrefetch(digest, size: size)
            }
            if !started { state.withLock { _ = $0.prefetchesOpening.remove(digest) } }
        }
    }

    /// A blob already opened, failing or complete, or held in memory for lack of room, is left
    /// alone.
    private func startPrefetch(_ digest: Digest, size: Int64) {
        // Counted until its jobs are, so that `waitUntilIdle` sees one or the other.
        defer { state.withLock { _ = $0.prefetchesOpening.remove(digest) } }
        let diskFull = state.withLock { state in state.diskFullUntil.map { ContinuousClock.now < $0 } ?? false }
        guard !diskFull, !store.hasComplete(digest), state.withLock({ $0.backoffs[digest] == nil }),
              case .success(nil) = openTransfer(digest, size: size) else { return }
        // Held in memory after all (the disk filled meanwhile): a prefetch takes no memory a
        // reader may need.
        guard state.withLock({ $0.transfers[digest].map { !$0.inMemory } ?? false }) else { return }
        event(digest) { $0.prefetch(now: .now) }
    }

    /// A file handle on the blob opened: kept out of eviction while it is open, its use
    /// recorded (at most once a minute per blob, one timestamp update). `verified`: reads of it
    /// can only ever be answered with its verified content, so the kernel may keep the pages it
    /// caches across opens. One lock and at most one `access`: buildctl opens a blob per 1 MiB.
    public func openReader(_ digest: Digest) -> (reader: ReaderID, verified: Bool) {
        let (reader, verifiedHere, markNow) = state.withLock { state -> (ReaderID, Bool, Bool) in
            defer { state.nextReader += 1 }
            state.pins[digest, default: 0] += 1
            var markNow = true
            if let last = state.lastMarkedUsed[digest], last.duration(to: .now) < .seconds(60) {
                markNow = false
            } else {
                state.lastMarkedUsed[digest] = .now
            }
            return (ReaderID(rawValue: state.nextReader), state.transfers[digest]?.machine.verified == true, markNow)
        }
        if markNow { store.markUsed(digest) }
        return (reader, verifiedHere || store.hasComplete(digest))
    }

    public func closeReader(_ reader: ReaderID, of digest: Digest) {
        state.withLock { state in
            if let count = state.pins[digest] { state.pins[digest] = count > 1 ? count - 1 : nil }
            _ = state.poisonedReaders.remove(reader.rawValue)
            state.transfers[digest]?.machine.forget(reader: reader.rawValue)
        }
    }

    /// `handler` learns of every blob whose download answered reads and then failed its digest,
    /// before the reads still waiting on it (`spared`, their pages being read) are answered.
    public func onWithdrawnContent(_ handler: @escaping @Sendable (Digest, _ spared: [Range<Int64>]) -> Void) {
        withdrawnHandler.withLock { $0 = handler }
    }

    /// True when the blob is in the local cache, complete and verified.
    package func isComplete(_ digest: Digest) -> Bool {
        store.hasComplete(digest)
    }

    /// Fails every waiting read and stops fetching; returns once no reply is owed any more.
    public func shutdown() {
        let owed = state.withLock { state -> [PendingReply] in
            state.cancelled = true
            stopping.store(true, ordering: .relaxed)
            for transfer in state.transfers.values { _ = transfer.machine.takeAllWaiters() }
            defer { state.pending = [:] }
            sendingReplies.add(state.pending.count, ordering: .relaxed)
            return Array(state.pending.values)
        }
        queue.stop()
        localQueue.stop()
        for pending in owed {
            pending.reply(.failure(.cancelled))
            sendingReplies.subtract(1, ordering: .releasing)
        }
        // Replies already taken off the state are being sent right now; they finish quickly.
        while sendingReplies.load(ordering: .acquiring) > 0 { SystemThread.sleep(for: .milliseconds(1)) }
        // Queued jobs were dropped; a verified blob being made durable is let finish.
        while commitsInFlight.load(ordering: .acquiring) > 0 || state.withLock({ $0.transfers.values.contains(where: \.awaitsCommit) }) {
            SystemThread.sleep(for: .milliseconds(1))
        }
    }

    /// Returns once no fetch is queued or running, no blob is being hashed, and every verified
    /// blob is in `blobs/` (or failed to get there).
    public func waitUntilIdle() {
        state.withLock { $0.commitsWanted += 1 }
        defer { state.withLock { $0.commitsWanted -= 1 } }
        while commitsInFlight.load(ordering: .acquiring) > 0
            || state.withLock({ !$0.prefetchesOpening.isEmpty || $0.transfers.values.contains { !$0.machine.jobs.isEmpty || $0.machine.hashing || $0.awaitsCommit } }) {
            SystemThread.sleep(for: .milliseconds(1))
        }
    }

    func serve(_ read: TransferMachine.Read, _ reply: Reply, from file: OpenFile) {
        let failure: BlobReadError? = buffers.withBuffer(count: read.range.count) { buffer in
            do throws(CacheError) {
                let filled = try file.read(into: buffer, offset: read.range.lowerBound)
                reply(.success(UnsafeRawBufferPointer(rebasing: buffer[..<filled])))
                return nil
            } catch {
                return .local(error.description)
            }
        } ?? .local("no memory for a read of \(read.range.count) bytes")
        if let failure { reply(.failure(failure)) }
    }

    // MARK: - Performing the machine's actions

    /// Performs, in order and outside the lock, what the machine of `transfer` decided: its
    /// replies are served from its file, even when another transfer of the blob took its place.
    func perform(_ actions: [TransferMachine.Action], for digest: Digest, on transfer: Transfer?) {
        guard !actions.isEmpty, let transfer else { return }
        let file = transfer.data, journal = transfer.journal
        // The replies a machine named, taken off the state in one go.
        let replies = state.withLock { state -> [ReadID: PendingReply] in
            var replies: [ReadID: PendingReply] = [:]
            for action in actions {
                switch action {
                case .serve(let id), .fail(let id, _):
                    if let pending = state.pending.removeValue(forKey: id) { replies[id] = pending }
                case .retry(let read):
                    if let pending = state.pending.removeValue(forKey: read.id) { replies[read.id] = pending }
                default:
                    break
                }
            }
            sendingReplies.add(replies.count, ordering: .relaxed)
            return replies
        }
        for action in actions {
            switch action {
            case .enqueue(let job, let priority):
                queue.enqueue(priority) { [self] in run(job, of: digest) }
            case .serve(let id):
                guard let pending = replies[id] else { continue }
                serve(pending.read, pending.reply, from: file)
                sendingReplies.subtract(1, ordering: .releasing)
            case .fail(let id, let error):
                guard let pending = replies[id] else { continue }
                pending.reply(.failure(error))
                sendingReplies.subtract(1, ordering: .releasing)
            case .withdraw(let spared, let poisoned):
                state.withLock { $0.poisonedReaders.formUnion(poisoned) }
                withdrawnHandler.withLock { $0 }?(digest, spared)
            case .discard:
                state.withLock { state in
                    state.backoffs[digest, default: RetryBackoff()].recordFailure()
                    if state.transfers[digest] === transfer { state.transfers[digest] = nil }
                }
                logger.error("blob download failed", metadata: ["digest": "\(digest)", "error": "\(BlobReadError.digestMismatch(digest))"])
                if !transfer.inMemory { store.discardPartial(digest, data: file) }
            case .forgetRecordedBlocks:
                logger.warning("blob does not match its digest; fetching it again from scratch", metadata: ["digest": "\(digest)"])
                for index in 0..<journal.blockCount { journal.forget(block: index) }
            case .retry(let read):
                guard let pending = replies[read.id] else { continue }
                // Counted again if it waits again before its old count is given back, so that
                // shutdown never sees none owed while one is still to be answered.
                self.read(read, of: digest, size: journal.blobSize, reply: pending.reply, attempts: 3)
                sendingReplies.subtract(1, ordering: .releasing)
            }
        }
    }
}
