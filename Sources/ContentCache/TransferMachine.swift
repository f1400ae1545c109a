import OCI

/// One blob's download as decisions only: which blocks are fetched by which job, which reads
/// are answered or failed and when, when to hash, what a digest mismatch takes back. Events
/// come in as calls, actions go out as return values; there are no files, threads, clocks or
/// network here (time is an argument). `BlobFetcher` performs the actions and reports what
/// happened. The invariants live here:
///
/// - a block in flight has one owner, the job fetching it, and only that job gives it back;
/// - a read is answered exactly once: served when its blocks are present (a read of the end
///   only once the whole blob matched its digest), or failed;
/// - a read that waits is failed once its blob made no progress for `readStallLimit`;
/// - a handle served bytes of a download that then fails its digest is named for poisoning.
struct TransferMachine: Sendable {
    struct ReadID: Hashable, Sendable {
        let rawValue: UInt64
    }

    /// Unique across every machine of a process: a job of a download that was discarded or
    /// committed can change nothing in the blob's next machine.
    struct JobID: Hashable, Sendable {
        let generation: UInt64
        let rawValue: Int
    }

    struct Read: Sendable, Equatable {
        var id: ReadID
        var range: Range<Int64>
        /// The file handle it came through, if any.
        var reader: UInt64?
        var since: ContinuousClock.Instant
    }

    enum Block: Equatable, Sendable {
        case absent
        /// In a job that has not started.
        case queued(JobID)
        /// Being written by the running job with this ID, and by no other.
        case fetching(JobID)
        /// Claimed by another process since then; watched until it lands or the claim goes.
        case elsewhere(since: ContinuousClock.Instant)
        /// On disk from an earlier process, to be checked against its CRC before any use.
        case unverified(crc: UInt32)
        case present

        var isOnDisk: Bool {
            switch self {
            case .present, .unverified: return true
            default: return false
            }
        }
    }

    /// What a job is to fetch once a worker starts it.
    struct Job: Sendable, Equatable {
        var blocks: ClosedRange<Int>
        var priority: FetchQueue.Priority
        /// Fetch even what another process claimed: its claim stalled past the bound.
        var overridingClaims = false
    }

    /// A started job's work: the blocks it owns, and whether one stream from the blob's start
    /// brings them (the remote ignores ranges).
    struct JobPlan: Sendable, Equatable {
        var blocks: [Int]
        var wholeStream: Bool
        var overridingClaims: Bool
    }

    enum Action: Sendable, Equatable {
        /// Queue the job on the fetch queue.
        case enqueue(JobID, FetchQueue.Priority)
        /// Answer the read from the partial file.
        case serve(ReadID)
        case fail(ReadID, BlobReadError)
        /// The kernel must drop what it cached of this blob except the pages of `spared` reads
        /// (being read, so locked), before the reads that follow hear of the failure; and the
        /// handles in `poisoned` fail from now on.
        case withdraw(spared: [Range<Int64>], poisoned: Set<UInt64>)
        /// The download is over and wrong: delete it.
        case discard
        /// Forget every recorded block: the blob is fetched again from scratch.
        case forgetRecordedBlocks
        /// The read starts over: give it to `read` again.
        case retry(Read)
    }

    enum ReadOutcome: Sendable, Equatable {
        /// Answer it now from the partial file; then perform the actions.
        case serve([Action])
        /// Check these blocks an earlier process recorded, report them, and read again.
        case check([Int: UInt32])
        /// It waits; perform the actions.
        case waiting([Action])
    }

    /// Blocks to hash next, from `first`, each with the CRC it must have when an earlier
    /// process recorded it.
    struct HashWork: Sendable, Equatable {
        var first: Int
        var expectedCRCs: [UInt32?]
    }

    struct Limits: Sendable {
        var blockSize: Int64
        var chunkSize: Int64
        var initialReadAhead: Int64
        var maximumReadAhead: Int64
        var readStallLimit: Duration
        var unwatchedFetchLimit: Duration
        var otherProcessStall: Duration
        /// Requests in flight for a window that has outgrown the chunk: a long read keeps this
        /// many streams going (what a per-connection cap needs) with requests that grow with
        /// the window (`TransferMachine.requestSize`).
        var requestsPerWindow: Int64 = 8
    }

    let digest: Digest
    let size: Int64
    let limits: Limits
    /// Different for each machine the process makes.
    let generation: UInt64
    private(set) var blocks: [Block]
    private(set) var waiters: [Read] = []
    private(set) var jobs: [JobID: Job] = [:]
    private var nextJob = 1
    private var window: ReadAheadWindow
    /// Blocks hashed into `verifier`, from the first; one hash runs at a time.
    private(set) var hashedBlocks = 0
    private(set) var hashing = false
    private(set) var verifier = DigestVerifier()
    /// The whole blob matched its digest.
    private(set) var verified = false
    private(set) var verifiedAt: ContinuousClock.Instant?
    /// Blocks came from an earlier process: a mismatch is worth one fetch from scratch.
    private(set) var usedEarlierBlocks: Bool
    /// The remote answers ranges with the whole blob: one stream fetches everything.
    private(set) var rangesIgnored = false
    private(set) var lastUse: ContinuousClock.Instant
    private(set) var lastProgress: ContinuousClock.Instant
    private(set) var lastFailure: ContinuousClock.Instant?
    /// Handles answered with bytes of this download before it was verified.
    private(set) var unverifiedReaders: Set<UInt64> = []
    /// The download failed its digest and is being deleted: reads fail at once.
    private(set) var discarded = false

    /// `recorded`: each block's CRC where an earlier process recorded it.
    init(digest: Digest, size: Int64, limits: Limits, generation: UInt64, recorded: [UInt32?], now: ContinuousClock.Instant) {
        self.digest = digest
        self.generation = generation
        self.size = size
        self.limits = limits
        self.blocks = recorded.map { $0.map { Block.unverified(crc: $0) } ?? .absent }
        self.usedEarlierBlocks = recorded.contains { $0 != nil }
        self.window = ReadAheadWindow(initial: limits.initialReadAhead, maximum: limits.maximumReadAhead,
                                      tolerance: 4 * limits.blockSize)
        self.lastUse = now
        self.lastProgress = now
    }

    var isIdle: Bool { waiters.isEmpty && jobs.isEmpty && !hashing && !verified }

    /// Blocks another process claims, to be watched in its journal.
    var blocksElsewhere: [Int] {
        blocks.indices.filter { if case .elsewhere = blocks[$0] { return true } else { return false } }
    }

    // MARK: Reads

    mutating func read(_ read: Read, now: ContinuousClock.Instant) -> ReadOutcome {
        lastUse = now
        // Until the executor has dropped this download, a read must not wait on it: the kernel
        // is dropping the inode's pages meanwhile, and waits for every page being read.
        if discarded { return .waiting([.fail(read.id, .digestMismatch(digest))]) }
        var unchecked: [Int: UInt32] = [:]
        for index in covering(read.range) {
            if case .unverified(let crc) = blocks[index] { unchecked[index] = crc }
        }
        if !unchecked.isEmpty { return .check(unchecked) }
        let ahead = window.advance(offset: read.range.lowerBound, end: read.range.upperBound)
        var actions = schedule(reading: read.range, ahead: ahead)
        actions += hasten(read.range.lowerBound..<min(size, read.range.upperBound + ahead))
        if canServe(read) {
            if !verified, let reader = read.reader { unverifiedReaders.insert(reader) }
            return .serve(actions)
        }
        waiters.append(read)
        actions += promote(reading: read.range)
        return .waiting(actions)
    }

    /// The whole of a blob nobody reads yet, at the lowest priority: what is absent is queued,
    /// and a fetch already queued counts as watched from now (see `isWanted`). A blob whose
    /// last fetch failed is left to its readers.
    mutating func prefetch(now: ContinuousClock.Instant) -> [Action] {
        guard !verified, !discarded, lastFailure == nil else { return [] }
        lastUse = max(lastUse, now)
        return schedule(reading: 0..<size, ahead: 0, speculative: .prefetch)
    }

    /// Whether a fetch should go on, or be tried again: the blob is not verified, and a read
    /// waits on it, or it is read-ahead of a live reader: one read it within
    /// `unwatchedFetchLimit` and (for another attempt) after its last failure, since readers
    /// told of a failure are gone until they read again.
    func isWanted(retrying: Bool, now: ContinuousClock.Instant) -> Bool {
        guard !verified, !discarded else { return false }
        if !waiters.isEmpty { return true }
        if retrying, let lastFailure, lastFailure >= lastUse { return false }
        return lastUse.duration(to: now) <= limits.unwatchedFetchLimit
    }

    /// A handle was closed.
    mutating func forget(reader: UInt64) {
        unverifiedReaders.remove(reader)
    }

    // MARK: Jobs

    /// A worker starts the job: it takes the blocks still queued for it (in one stream, every
    /// block nobody is fetching). Nil when nothing is left for it; the job is then over.
    mutating func jobStarting(_ id: JobID) -> JobPlan? {
        guard let job = jobs[id] else { return nil }
        let candidates: [Int] = rangesIgnored ? Array(blocks.indices) : Array(job.blocks)
        let ours = candidates.filter { index in
            switch blocks[index] {
            case .queued(let owner): return owner == id || rangesIgnored
            case .absent: return rangesIgnored
            default: return false
            }
        }
        guard !ours.isEmpty else {
            jobs[id] = nil
            return nil
        }
        for index in ours { blocks[index] = .fetching(id) }
        return JobPlan(blocks: ours, wholeStream: rangesIgnored, overridingClaims: job.overridingClaims)
    }

    /// The job found these of its blocks claimed by another process.
    mutating func claimedElsewhere(_ indices: [Int], by id: JobID, now: ContinuousClock.Instant) {
        for index in indices where blocks[index] == .fetching(id) { blocks[index] = .elsewhere(since: now) }
    }

    /// The job wrote and recorded a block it owns; anything else it reports is ignored.
    mutating func blockLanded(_ index: Int, by id: JobID, now: ContinuousClock.Instant) -> [Action] {
        guard blocks[index] == .fetching(id) else { return [] }
        blocks[index] = .present
        lastProgress = now
        return serveReady()
    }

    /// The job's fetch failed past its retries: every read of the blob is told.
    mutating func fetchFailed(_ error: BlobReadError, by id: JobID, now: ContinuousClock.Instant) -> [Action] {
        guard jobs[id] != nil else { return [] }
        lastFailure = now
        let failed = waiters
        waiters = []
        return failed.map { .fail($0.id, error) }
    }

    /// The remote answered the job's range with the whole blob. True the first time.
    mutating func remoteIgnoresRanges(by id: JobID) -> Bool {
        guard jobs[id] != nil else { return false }
        defer { rangesIgnored = true }
        return !rangesIgnored
    }

    /// The job is over: what it did not land is free again, for new jobs for whoever waits.
    mutating func jobEnded(_ id: JobID) -> [Action] {
        jobs[id] = nil
        var released = false
        for index in blocks.indices where blocks[index] == .fetching(id) {
            blocks[index] = .absent
            released = true
        }
        return released ? rescheduleWaiters() : []
    }

    // MARK: Blocks of earlier and other processes

    /// Recorded blocks were checked against their CRCs.
    mutating func adopted(intact: Set<Int>, damaged: Set<Int>, now: ContinuousClock.Instant) -> [Action] {
        for index in damaged { blocks[index] = .absent }
        for index in intact { blocks[index] = .present }
        if !intact.isEmpty { lastProgress = now }
        var actions = serveReady()
        if !damaged.isEmpty { actions += rescheduleWaiters() }
        return actions
    }

    /// Blocks whose claim another process gave up without recording them.
    mutating func abandonedElsewhere(_ indices: Set<Int>) -> [Action] {
        for index in indices {
            if case .elsewhere = blocks[index] { blocks[index] = .absent }
        }
        return rescheduleWaiters()
    }

    // MARK: Time

    /// Fails reads that waited `readStallLimit` without progress, and queues blocks another
    /// process has claimed for `otherProcessStall` without landing them.
    mutating func tick(now: ContinuousClock.Instant) -> [Action] {
        let stalledSince = now - limits.readStallLimit
        let late = waiters.filter { max($0.since, lastProgress) < stalledSince }
        waiters.removeAll { max($0.since, lastProgress) < stalledSince }
        var actions = late.map { Action.fail($0.id, .remote("blob \(digest): no progress for \(limits.readStallLimit); read failed")) }
        let claimDeadline = now - limits.otherProcessStall
        let stalled = blocks.indices.filter { index in
            if case .elsewhere(let since) = blocks[index] { return since < claimDeadline }
            return false
        }
        for run in Self.contiguousRuns(stalled) {
            let id = newJob(Job(blocks: run, priority: .reader, overridingClaims: true))
            for index in run { blocks[index] = .queued(id) }
            actions.append(.enqueue(id, .reader))
        }
        return actions
    }

    // MARK: Verifying

    /// The blocks that extend the hashed prefix, when no hash runs; the hash then runs until
    /// `hashed` reports it.
    mutating func hashStarting() -> HashWork? {
        guard !hashing, !verified else { return nil }
        var end = hashedBlocks
        while end < blocks.count && blocks[end].isOnDisk { end += 1 }
        guard end > hashedBlocks else { return nil }
        hashing = true
        return HashWork(first: hashedBlocks, expectedCRCs: blocks[hashedBlocks..<end].map { block in
            if case .unverified(let crc) = block { return crc }
            return nil
        })
    }

    /// `count` blocks from `first` were hashed into `verifier`; the one after, `damaged`, was
    /// not what was recorded. True when every block is hashed: `digestChecked` comes next.
    mutating func hashed(first: Int, count: Int, damaged: Int?, verifier: DigestVerifier) -> (actions: [Action], finished: Bool) {
        self.verifier = verifier
        for index in first..<(first + count) where blocks[index] != .present { blocks[index] = .present }
        hashedBlocks = first + count
        if let damaged { blocks[damaged] = .absent }
        // Still busy until the digest is decided, so that nobody sees the blob idle between.
        let finished = hashedBlocks == blocks.count
        hashing = finished
        var actions = serveReady()
        if damaged != nil { actions += rescheduleWaiters() }
        return (actions, finished)
    }

    /// The whole blob was hashed. A match answers every read; a mismatch takes back what this
    /// download answered and fetches it again from scratch once if an earlier process's blocks
    /// may be the cause, or discards it.
    mutating func digestChecked(matched: Bool, now: ContinuousClock.Instant) -> [Action] {
        hashing = false
        let taken = waiters
        waiters = []
        if matched {
            verified = true
            verifiedAt = now
            return taken.map { .serve($0.id) }
        }
        let poisoned = unverifiedReaders
        unverifiedReaders = []
        lastFailure = now
        var actions: [Action] = [.withdraw(spared: taken.map(\.range), poisoned: poisoned)]
        guard usedEarlierBlocks else {
            discarded = true
            return actions + [.discard] + taken.map { .fail($0.id, .digestMismatch(digest)) }
        }
        usedEarlierBlocks = false
        blocks = Array(repeating: .absent, count: blocks.count)
        hashedBlocks = 0
        verifier = DigestVerifier()
        actions.append(.forgetRecordedBlocks)
        for read in taken {
            if let reader = read.reader, poisoned.contains(reader) {
                actions.append(.fail(read.id, .digestMismatch(digest)))
            } else {
                actions.append(.retry(read))
            }
        }
        return actions
    }

    /// Handles an earlier download of the blob answered with bytes this one holds too (copied
    /// from it): a mismatch fails them as well.
    mutating func inherit(unverifiedReaders readers: Set<UInt64>) {
        unverifiedReaders.formUnion(readers)
    }

    /// Every read still waiting, for shutdown.
    mutating func takeAllWaiters() -> [Read] {
        defer { waiters = [] }
        return waiters
    }

    // MARK: Scheduling

    private func covering(_ range: Range<Int64>) -> ClosedRange<Int> {
        Int(range.lowerBound / limits.blockSize)...Int((range.upperBound - 1) / limits.blockSize)
    }

    private func canServe(_ read: Read) -> Bool {
        if read.range.upperBound == size && !verified { return false }
        return covering(read.range).allSatisfy { blocks[$0] == .present }
    }

    private mutating func newJob(_ job: Job) -> JobID {
        let id = JobID(generation: generation, rawValue: nextJob)
        nextJob += 1
        jobs[id] = job
        return id
    }

    private mutating func serveReady() -> [Action] {
        var ready: [Read] = [], waiting: [Read] = []
        for read in waiters {
            if canServe(read) { ready.append(read) } else { waiting.append(read) }
        }
        waiters = waiting
        if !verified { unverifiedReaders.formUnion(ready.compactMap(\.reader)) }
        return ready.map { .serve($0.id) }
    }

    /// Queues the absent blocks of the read and of the read-ahead after it, as jobs cut where
    /// requests start (`requestSize`). `speculative`: nobody reads `range` yet, so all of it is
    /// fetched at that priority.
    private mutating func schedule(reading range: Range<Int64>, ahead: Int64, speculative: FetchQueue.Priority? = nil) -> [Action] {
        var wantedEnd = min(size, range.upperBound + ahead)
        // Once the window spans chunks, fetch whole requests: fewer, evenly sized ones.
        if ahead >= limits.chunkSize {
            let request = requestSize(at: wantedEnd, window: ahead)
            wantedEnd = min(size, (wantedEnd + request - 1) / request * request)
        } else if range.upperBound < size {
            // A smaller window is topped up only once less than half of it remains ahead, so
            // that a sequential reader's ramp asks for its window in a few requests, not one
            // block per read.
            let halfWindow = covering(range.upperBound..<min(size, range.upperBound + max(ahead / 2, 1)))
            if halfWindow.allSatisfy({ blocks[$0] != .absent }) { wantedEnd = range.upperBound }
        }
        var reading = covering(range)
        // A read of the end is answered once the whole blob matched its digest: it needs all.
        if range.upperBound == size { reading = 0...reading.upperBound }
        let wanted = reading.lowerBound...covering(range.lowerBound..<wantedEnd).upperBound
        if rangesIgnored {
            // One stream brings every block; a job for the first absent one starts it, when
            // anything this read wants is missing.
            guard wanted.contains(where: { blocks[$0] == .absent }), let first = blocks.firstIndex(of: .absent) else { return [] }
            let priority = speculative ?? .reader
            let id = newJob(Job(blocks: first...first, priority: priority))
            blocks[first] = .queued(id)
            return [.enqueue(id, priority)]
        }
        var actions: [Action] = []
        var runStart: Int?
        func closeRun(_ end: Int, _ machine: inout TransferMachine) {
            guard let start = runStart else { return }
            let priority = speculative ?? (start <= reading.upperBound ? .reader : .readAhead)
            let id = machine.newJob(Job(blocks: start...end, priority: priority))
            for index in start...end { machine.blocks[index] = .queued(id) }
            actions.append(.enqueue(id, priority))
            runStart = nil
        }
        for index in wanted {
            if blocks[index] == .absent {
                if runStart != nil && startsRequest(index, window: ahead) { closeRun(index - 1, &self) }
                if runStart == nil { runStart = index }
            } else {
                closeRun(index - 1, &self)
            }
        }
        closeRun(wanted.upperBound, &self)
        return actions
    }

    /// A read now waits on blocks queued behind read-ahead or a prefetch: they move to a new
    /// job ahead of it.
    private mutating func promote(reading range: Range<Int64>) -> [Action] {
        let behind = covering(range).filter { index in
            guard case .queued(let owner) = blocks[index] else { return false }
            return jobs[owner].map { $0.priority != .reader } ?? false
        }
        guard let first = behind.first, var last = behind.last, case .queued(let owner) = blocks[last] else { return [] }
        // The rest of that read-ahead job comes along: one request instead of two for bytes
        // about to be fetched anyway.
        while last + 1 < blocks.count && blocks[last + 1] == .queued(owner) { last += 1 }
        let id = newJob(Job(blocks: first...last, priority: .reader))
        for index in first...last where behind.contains(index) || blocks[index] == .queued(owner) { blocks[index] = .queued(id) }
        return [.enqueue(id, .reader)]
    }

    /// A reader's window reached blocks a prefetch queued: their jobs, whole, become read-ahead,
    /// so that the blob being read comes before those that may be read next.
    private mutating func hasten(_ range: Range<Int64>) -> [Action] {
        guard !verified, !range.isEmpty else { return [] }
        var owners: [JobID] = []
        for index in covering(range) {
            if case .queued(let owner) = blocks[index], jobs[owner]?.priority == .prefetch, owners.last != owner {
                owners.append(owner)
            }
        }
        return owners.compactMap { owner in
            guard let job = jobs[owner] else { return nil }
            let id = newJob(Job(blocks: job.blocks, priority: .readAhead))
            for index in job.blocks where blocks[index] == .queued(owner) { blocks[index] = .queued(id) }
            return .enqueue(id, .readAhead)
        }
    }

    /// Queues fetches for the blocks waiting reads still lack.
    private mutating func rescheduleWaiters() -> [Action] {
        var actions: [Action] = []
        for read in waiters {
            actions += schedule(reading: read.range, ahead: 0)
        }
        return actions
    }

    /// The size of the request that holds `offset`: the chunk size, doubled while the window
    /// holds `perWindow` of the doubled size and the blob has that many left from where one
    /// would start. Sizes are powers of two times the chunk and requests start at a multiple
    /// of their size, so boundaries of larger requests are boundaries of smaller ones.
    /// A server pays for every request: docker-registry used 0.82 to 1.55 CPU-s serving a GiB as
    /// 8 MiB ranges on 8 connections, 0.58 to 0.63 as 32 MiB ranges, 0.50 to 0.55 as one GET.
    /// Toward the blob's end requests shrink again: the streams of a long read then end nearly
    /// together, where 32 MiB requests behind a 26 MB/s per-connection cap left the last ones
    /// running alone for over a second.
    static func requestSize(at offset: Int64, blobSize: Int64, chunkSize: Int64, window: Int64, perWindow: Int64) -> Int64 {
        var size = chunkSize
        while true {
            let doubled = size * 2
            let needed = doubled * max(perWindow, 1)
            guard needed <= window, blobSize - offset / doubled * doubled >= needed else { return size }
            size = doubled
        }
    }

    func requestSize(at offset: Int64, window: Int64) -> Int64 {
        Self.requestSize(at: offset, blobSize: size, chunkSize: limits.chunkSize, window: window, perWindow: limits.requestsPerWindow)
    }

    /// Whether a request for a read with this window must start at block `index`.
    private func startsRequest(_ index: Int, window: Int64) -> Bool {
        let offset = Int64(index) * limits.blockSize
        return offset % requestSize(at: offset, window: window) == 0
    }

    /// Runs of consecutive blocks, cut where a chunk starts when `blocksPerChunk` is given.
    static func contiguousRuns(_ indices: [Int], blocksPerChunk: Int = .max) -> [ClosedRange<Int>] {
        var runs: [ClosedRange<Int>] = []
        for index in indices.sorted() {
            if let last = runs.last, last.upperBound + 1 == index, index % blocksPerChunk != 0 {
                runs[runs.count - 1] = last.lowerBound...index
            } else {
                runs.append(index...index)
            }
        }
        return runs
    }
}
