import FoundationEssentials
import SystemSupport
import OCI
import RemoteStore
import Synchronization
import Logging

// MARK: - Running jobs

extension BlobFetcher {
    private struct RangesIgnored: Error {}
    /// Nobody waits for the blob's blocks and nobody has read it for a while.
    private struct Unwatched: Error {}

    func run(_ job: Job) {
        defer { finishJob(job.digest) }
        let digest = job.digest
        // A blob whose last fetch failed is tried again after a pause shared by all its readers.
        let pause = state.withLock { $0.backoffs[digest]?.remainingPause() }
        if let pause { SystemThread.sleep(for: pause) }
        let taken = state.withLock { state -> (OpenFile, BlockJournal, [Int], Bool, owner: Int)? in
            guard !state.cancelled, let transfer = state.transfers[digest] else { return nil }
            let owner = state.nextJob
            state.nextJob += 1
            var candidates = Array(job.blocks)
            if transfer.rangesIgnored { candidates = Array(transfer.blocks.indices) }
            let ours = candidates.filter { transfer.blocks[$0] == .queued || (transfer.rangesIgnored && transfer.blocks[$0] == .absent) }
            for index in ours { transfer.blocks[index] = .fetching(owner: owner) }
            transfer.queuedForReadAhead.subtract(ours)
            return (transfer.data, transfer.journal, ours, transfer.rangesIgnored, owner)
        }
        guard let (data, journal, ours, wholeStream, owner) = taken, !ours.isEmpty else { return }
        // Blocks this fetch left unfinished are free to be fetched again, by a new job for the
        // readers still waiting; blocks other fetches own are theirs to finish or give back.
        defer {
            let released = state.withLock { state -> Bool in
                guard let transfer = state.transfers[digest] else { return false }
                var released = false
                for index in ours where transfer.blocks[index] == .fetching(owner: owner) {
                    transfer.blocks[index] = .absent
                    released = true
                }
                return released && !state.cancelled
            }
            if released { rescheduleWaiters(digest) }
        }
        // After a failure only a read waiting now is worth a new attempt.
        if pause != nil && !isWanted(digest, retrying: true) { return }
        if wholeStream {
            // The remote sends the whole blob whatever is asked: take every block from it.
            _ = journal.tryClaim(0...(journal.blockCount - 1))
            defer { journal.release(0...(journal.blockCount - 1)) }
            fetch(digest, blocks: Set(ours), span: 0...(journal.blockCount - 1), data: data, journal: journal, wholeStream: true)
            return
        }
        // A reader's re-queued job may span a chunk boundary; requests never do.
        for run in Self.contiguousRuns(ours, blocksPerChunk: Int(tuning.chunkSize / tuning.blockSize)) {
            if job.overridingClaims {
                // Another process holds these blocks' claims without landing them; both may now
                // write the same bytes, which the digest check covers like any other.
                guard fetch(digest, blocks: Set(run), span: run, data: data, journal: journal, wholeStream: false) else { return }
                continue
            }
            // Claim the run across processes; what another mount is fetching is watched instead.
            let claimed: [ClosedRange<Int>]
            if journal.tryClaim(run) {
                claimed = [run]
            } else {
                let mine = run.filter { journal.tryClaim($0...$0) }
                let theirs = Set(run).subtracting(mine)
                setBlocks(digest, theirs, to: .elsewhere)
                claimed = Self.contiguousRuns(mine)
            }
            for piece in claimed {
                defer { journal.release(piece) }
                // A block another process recorded just before our claim needs no fetch.
                let recorded = piece.compactMap { index in journal.recordedChecksum(ofBlock: index).map { (index, $0) } }
                if !recorded.isEmpty { adoptRecordedBlocks(digest, Dictionary(uniqueKeysWithValues: recorded)) }
                let wanted = piece.filter { index in !recorded.contains { $0.0 == index } }
                for part in Self.contiguousRuns(wanted) {
                    guard fetch(digest, blocks: Set(part), span: part, data: data, journal: journal, wholeStream: false) else { return }
                }
            }
        }
    }

    private func finishJob(_ digest: Digest) {
        state.withLock { state in
            guard state.transfers[digest] != nil else { return }
            state.transfers[digest]!.jobs -= 1
        }
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

    /// Fetches the blocks of `span` with one range request, resumed within itself after a
    /// transient failure, and records each block as it completes. Only blocks in `ours` are
    /// written (a whole-blob stream passes over the others). False when the fetch failed.
    @discardableResult
    private func fetch(_ digest: Digest, blocks ours: Set<Int>, span: ClosedRange<Int>, data: OpenFile,
                       journal: BlockJournal, wholeStream: Bool) -> Bool {
        let first = journal.range(ofBlock: span.lowerBound).lowerBound
        let end = journal.range(ofBlock: span.upperBound).upperBound
        var position = first
        var blockChecksum: UInt32 = 0
        var writer = PageAlignedWriter(file: data)
        var lastError = BlobReadError.remote("blob \(digest): no attempt made")
        for attempt in 1...maxAttempts {
            do {
                requestsStarted.add(1, ordering: .relaxed)
                // A whole stream resumed from where it broke may start over from an earlier
                // byte (the remote ignores ranges): the bytes before are passed over.
                var passOver: Int64 = 0
                try source.streamBlob(digest, from: position, through: wholeStream ? nil : end - 1, onStart: { start in
                    if wholeStream && start < position {
                        passOver = position - start
                        return
                    }
                    guard start == position else {
                        if wholeStream { throw BlobReadError.remote("blob \(digest): asked for bytes from \(position), the remote sent from \(start)") }
                        throw RangesIgnored()
                    }
                }, onBody: { received in
                    if self.stopping.load(ordering: .relaxed) { throw BlobReadError.cancelled }
                    var chunk = received
                    if passOver > 0 {
                        let skipped = Int(min(passOver, Int64(chunk.count)))
                        passOver -= Int64(skipped)
                        chunk = UnsafeRawBufferPointer(rebasing: chunk[skipped...])
                        if chunk.isEmpty { return }
                    }
                    guard position + Int64(chunk.count) <= end else {
                        if wholeStream { throw BlobReadError.remote("blob \(digest): the remote sent more than its \(end) bytes") }
                        throw RangesIgnored()
                    }
                    var consumed = 0
                    while consumed < chunk.count {
                        let index = Int(position / journal.blockSize)
                        let blockEnd = journal.range(ofBlock: index).upperBound
                        let length = min(chunk.count - consumed, Int(blockEnd - position))
                        let piece = UnsafeRawBufferPointer(rebasing: chunk[consumed..<(consumed + length)])
                        if ours.contains(index) {
                            try writer.write(piece, at: position)
                            blockChecksum = crc32(blockChecksum, piece)
                        }
                        position += Int64(length)
                        consumed += length
                        if position == blockEnd {
                            if ours.contains(index) {
                                try writer.flush()
                                try journal.record(block: index, checksum: blockChecksum)
                                self.blockLanded(digest, index)
                            }
                            blockChecksum = 0
                            if position < end && !self.isWanted(digest, retrying: false) { throw Unwatched() }
                        }
                    }
                })
                guard position == end else {
                    throw BlobReadError.remote("blob \(digest): range at \(first) ended after \(position - first) of \(end - first) bytes")
                }
                return true
            } catch is RangesIgnored {
                switchToWholeStream(digest)
                return false
            } catch is Unwatched {
                logger.debug("no reader is left for a fetch; stopping it", metadata: ["digest": "\(digest)"])
                return false
            } catch let error as BlobReadError {
                if case .cancelled = error { return false }
                lastError = error
            } catch let error as CacheError {
                lastError = .local(error.description)
                break
            } catch let error as RemoteStoreError {
                lastError = .remote("blob \(digest): \(error)")
                guard error.isTransient else { break }
            } catch {
                lastError = .remote("blob \(digest): \(error)")
            }
            guard attempt < maxAttempts else { break }
            guard isWanted(digest, retrying: true) else { return false }
            logger.warning("retrying a range", metadata: ["digest": "\(digest)", "attempt": "\(attempt)", "error": "\(lastError)"])
            SystemThread.sleep(for: RetryBackoff.pause(afterFailures: attempt))
        }
        failBlocks(digest, error: lastError)
        return false
    }

    /// Whether a fetch of the blob should go on, or be tried again: the blob is neither verified
    /// nor dropped, and a read waits on it, or it is read-ahead of a live reader: one read it
    /// within `unwatchedFetchLimit`, and (for another attempt) after its last failure, since
    /// readers told of a failure are gone until they read again.
    func isWanted(_ digest: Digest, retrying: Bool) -> Bool {
        state.withLock { state in
            guard !state.cancelled, let transfer = state.transfers[digest], !transfer.verified else { return false }
            if !transfer.waiters.isEmpty { return true }
            if retrying, let failed = transfer.lastFailure, failed >= transfer.lastUse { return false }
            return transfer.lastUse.duration(to: .now) <= unwatchedFetchLimit
        }
    }

    // MARK: Block arrivals

    /// A block is on disk and recorded: answer whoever it completes, and hash onwards.
    func blockLanded(_ digest: Digest, _ index: Int) {
        let ready = state.withLock { state -> (OpenFile, [Waiter])? in
            guard let transfer = state.transfers[digest] else { return nil }
            transfer.blocks[index] = .present
            transfer.lastProgress = .now
            state.backoffs[digest] = nil
            return (transfer.data, takeReadyWaiters(transfer))
        }
        if let (data, waiters) = ready {
            for waiter in waiters { answer(waiter, from: data) }
        }
        advanceHash(digest)
    }

    func takeReadyWaiters(_ transfer: Transfer) -> [Waiter] {
        var ready: [Waiter] = [], waiting: [Waiter] = []
        for waiter in transfer.waiters {
            if transfer.canServe(waiter, blockSize: tuning.blockSize) { ready.append(waiter) } else { waiting.append(waiter) }
        }
        transfer.waiters = waiting
        if !transfer.verified { transfer.unverifiedReaders.formUnion(ready.compactMap(\.reader)) }
        return ready
    }

    func setBlocks(_ digest: Digest, _ indices: Set<Int>, to newState: BlockState) {
        guard !indices.isEmpty else { return }
        state.withLock { state in
            guard state.transfers[digest] != nil else { return }
            for index in indices { state.transfers[digest]!.blocks[index] = newState }
            if newState == .elsewhere {
                let now = ContinuousClock.now
                for index in indices where state.transfers[digest]!.elsewhereSince[index] == nil {
                    state.transfers[digest]!.elsewhereSince[index] = now
                }
                startTimer(&state)
            }
        }
    }

    /// Blocks another process recorded: checked against their CRC before they count.
    func adoptRecordedBlocks(_ digest: Digest, _ recorded: [Int: UInt32]) {
        guard let (data, journal) = state.withLock({ state in state.transfers[digest].map { ($0.data, $0.journal) } }) else { return }
        var intact: Set<Int> = [], damaged: Set<Int> = []
        for (index, crc) in recorded {
            let range = journal.range(ofBlock: index)
            let matches = buffers.withBuffer(count: range.count) { buffer in
                (try? data.read(into: buffer, offset: range.lowerBound)) == range.count && crc32(0, UnsafeRawBufferPointer(buffer)) == crc
            }
            if matches == true {
                intact.insert(index)
            } else {
                journal.forget(block: index)
                damaged.insert(index)
            }
        }
        setBlocks(digest, damaged, to: .absent)
        for index in intact { blockLanded(digest, index) }
        if !damaged.isEmpty { rescheduleWaiters(digest) }
    }

    /// Queues fetches for the blocks waiting readers still lack.
    func rescheduleWaiters(_ digest: Digest) {
        submit(state.withLock { state -> [Job] in
            guard let transfer = state.transfers[digest] else { return [] }
            var jobs: [Job] = []
            for waiter in transfer.waiters {
                jobs += schedule(transfer, digest: digest, reading: waiter.offset..<waiter.end, ahead: 0)
            }
            return jobs
        })
    }

    /// From now on one stream brings the blob. Blocks other fetches are writing stay theirs:
    /// those fetches see the same whole answer and give them back themselves. The caller's
    /// own blocks go back when its job ends, and the readers still waiting are queued again.
    private func switchToWholeStream(_ digest: Digest) {
        let switched = state.withLock { state -> Bool in
            guard let transfer = state.transfers[digest], !transfer.rangesIgnored else { return false }
            transfer.rangesIgnored = true
            return true
        }
        if switched {
            logger.info("the remote ignores ranges; fetching the blob as one stream", metadata: ["digest": "\(digest)"])
        }
    }

    /// A fetch failed past its retries: every reader of the blob is told, and the next fetch
    /// of it waits a pause first. Its blocks go back when its job ends.
    private func failBlocks(_ digest: Digest, error: BlobReadError) {
        logger.error("blob fetch failed", metadata: ["digest": "\(digest)", "error": "\(error)"])
        let waiters = state.withLock { state -> [Waiter] in
            state.backoffs[digest, default: RetryBackoff()].recordFailure()
            guard let transfer = state.transfers[digest] else { return [] }
            transfer.lastFailure = .now
            let waiters = transfer.waiters
            transfer.waiters = []
            return waiters
        }
        for waiter in waiters { answer(waiter, failing: error) }
    }

    // MARK: Making verified blobs durable

    /// Committing forces the blob's pages to disk. Done while a job still reads (BuildKit reading
    /// one layer after another), those writes competed with the next layers' downloads: reading
    /// a 204 MiB chain of four layers took about 490 ms with each fsync right after its blob
    /// verified, about 400 ms with the commits left until reading paused.
    func startCommitting(_ state: inout State) {
        guard !state.committing else { return }
        state.committing = true
        SystemThread.start(named: "ocicachefs-commit") { [self] in commitWhenQuiet() }
    }

    private func commitWhenQuiet() {
        while true {
            let due = state.withLock { state -> [Digest]? in
                let verified = state.transfers.filter { $0.value.verified }
                guard !verified.isEmpty else {
                    state.committing = false
                    return nil
                }
                let now = ContinuousClock.now
                let fetching = state.transfers.values.contains { $0.jobs > 0 || $0.hashing || !$0.waiters.isEmpty }
                let quiet = !fetching && state.lastRead.duration(to: now) >= commitTiming.quietPeriod
                let commitAll = state.cancelled || state.commitsWanted > 0 || quiet
                return verified.filter { commitAll || $0.value.verifiedAt!.duration(to: now) >= commitTiming.delayLimit }.map(\.key)
            }
            guard let due else { return }
            if due.isEmpty { SystemThread.sleep(for: .milliseconds(20)) }
            for digest in due { commit(digest) }
        }
    }

    private func commit(_ digest: Digest) {
        commitsInFlight.add(1, ordering: .relaxed)
        defer { commitsInFlight.subtract(1, ordering: .releasing) }
        guard let data = state.withLock({ $0.transfers[digest]?.data }) else { return }
        do {
            try store.commit(digest, data: data)
            logger.debug("blob complete", metadata: ["digest": "\(digest)"])
        } catch {
            logger.error("cannot keep a verified blob", metadata: ["digest": "\(digest)", "error": "\(error)"])
        }
        // Later reads open the complete blob; anything still queued finds nothing to do.
        let stragglers = state.withLock { state in state.transfers.removeValue(forKey: digest)?.waiters ?? [] }
        for waiter in stragglers { answer(waiter, from: data) }
    }

    // MARK: Waits and other processes

    /// Runs while any read waits or any block is claimed by another process.
    func startTimer(_ state: inout State) {
        guard !state.timerRunning else { return }
        state.timerRunning = true
        SystemThread.start(named: "ocicachefs-timer") { [self] in runTimer() }
    }

    /// Fails reads that waited `readStallLimit` while their blob made no progress, and follows
    /// blocks other mounts are fetching: each lands (recorded in the shared journal), or its
    /// claim goes away without a record (that process died or gave up) and is fetched here, or
    /// it stays claimed past `otherProcessStall` and is fetched here regardless.
    private func runTimer() {
        while true {
            SystemThread.sleep(for: .milliseconds(10))
            let now = ContinuousClock.now
            let deadline = now - otherProcessStall
            var overdue: [(Digest, Waiter)] = []
            let watched = state.withLock { state -> [(Digest, BlockJournal, waiting: [Int], stalled: [Job])]? in
                var watched: [(Digest, BlockJournal, waiting: [Int], stalled: [Job])] = []
                var anyWaiting = false
                for (digest, transfer) in state.transfers where !transfer.waiters.isEmpty {
                    let stalledSince = now - readStallLimit
                    let late = transfer.waiters.filter { max($0.since, transfer.lastProgress) < stalledSince }
                    if !late.isEmpty {
                        transfer.waiters.removeAll { max($0.since, transfer.lastProgress) < stalledSince }
                        overdue += late.map { (digest, $0) }
                    }
                    anyWaiting = anyWaiting || !transfer.waiters.isEmpty
                }
                for digest in Array(state.transfers.keys) where !state.transfers[digest]!.elsewhereSince.isEmpty {
                    let transfer = state.transfers[digest]!
                    transfer.elsewhereSince = transfer.elsewhereSince.filter { transfer.blocks[$0.key] == .elsewhere }
                    let stalled = transfer.elsewhereSince.filter { $0.value < deadline }.keys.sorted()
                    for index in stalled {
                        transfer.blocks[index] = .queued
                        transfer.elsewhereSince[index] = nil
                    }
                    let jobs = Self.contiguousRuns(stalled).map { Job(digest: digest, blocks: $0, priority: .reader, overridingClaims: true) }
                    transfer.jobs += jobs.count
                    watched.append((digest, transfer.journal, Array(transfer.elsewhereSince.keys), jobs))
                }
                if state.cancelled || (watched.isEmpty && !anyWaiting) {
                    state.timerRunning = false
                    return nil
                }
                return watched
            }
            for (digest, waiter) in overdue {
                let error = BlobReadError.remote("blob \(digest): no progress for \(readStallLimit); read failed")
                logger.error("read timed out", metadata: ["digest": "\(digest)", "offset": "\(waiter.offset)"])
                answer(waiter, failing: error)
            }
            guard let watched else { return }
            for (digest, _, _, stalled) in watched where !stalled.isEmpty {
                logger.warning("another mount of this cache directory made no progress on blocks it claimed; fetching them here",
                               metadata: ["digest": "\(digest)", "blocks": "\(stalled.reduce(0) { $0 + $1.blocks.count })"])
                submit(stalled)
            }
            for (digest, journal, indices, _) in watched {
                var recorded: [Int: UInt32] = [:]
                var abandoned: Set<Int> = []
                for index in indices {
                    if let crc = journal.recordedChecksum(ofBlock: index) {
                        recorded[index] = crc
                    } else if journal.tryClaim(index...index) {
                        journal.release(index...index)
                        abandoned.insert(index)
                    }
                }
                if !recorded.isEmpty { adoptRecordedBlocks(digest, recorded) }
                if !abandoned.isEmpty {
                    setBlocks(digest, abandoned, to: .absent)
                    rescheduleWaiters(digest)
                }
            }
        }
    }
}

// MARK: - Verifying the whole blob

extension BlobFetcher {
    /// Hashes every block that extends the hashed prefix. One thread hashes at a time; another
    /// that finds it busy leaves the work to it, and it looks again before it stops.
    func advanceHash(_ digest: Digest) {
        while let (data, journal, first, pending, verifier) = state.withLock({ state -> (OpenFile, BlockJournal, Int, [BlockState], DigestVerifier)? in
            guard let transfer = state.transfers[digest], !transfer.hashing, !transfer.verified else { return nil }
            var end = transfer.hashedBlocks
            while end < transfer.blocks.count && transfer.blocks[end].isOnDisk { end += 1 }
            guard end > transfer.hashedBlocks else { return nil }
            transfer.hashing = true
            return (transfer.data, transfer.journal, transfer.hashedBlocks, Array(transfer.blocks[transfer.hashedBlocks..<end]), transfer.verifier)
        }) {
            var verifier = verifier
            var hashed = 0
            var damaged: Int?
            for (offset, blockState) in pending.enumerated() {
                let index = first + offset
                let range = journal.range(ofBlock: index)
                let intact = buffers.withBuffer(count: range.count) { buffer -> Bool in
                    guard (try? data.read(into: buffer, offset: range.lowerBound)) == range.count else { return false }
                    let block = UnsafeRawBufferPointer(buffer)
                    if case .unverified(let crc) = blockState, crc32(0, block) != crc { return false }
                    verifier.update(block)
                    return true
                }
                guard intact == true else {
                    damaged = index
                    break
                }
                hashed += 1
            }
            if let damaged {
                logger.warning("a downloaded block no longer matches its checksum; fetching it again",
                               metadata: ["digest": "\(digest)", "block": "\(damaged)"])
                journal.forget(block: damaged)
            }
            let (finished, ready) = state.withLock { state -> (Bool, [Waiter]) in
                guard let transfer = state.transfers[digest] else { return (false, []) }
                transfer.verifier = verifier
                for index in first..<(first + hashed) where transfer.blocks[index] != .present { transfer.blocks[index] = .present }
                transfer.hashedBlocks = first + hashed
                if let damaged { transfer.blocks[damaged] = .absent }
                // Still busy until `complete` has decided, so that nobody sees it idle between.
                let finished = transfer.hashedBlocks == transfer.blocks.count
                transfer.hashing = finished
                return (finished, takeReadyWaiters(transfer))
            }
            for waiter in ready { answer(waiter, from: data) }
            if damaged != nil { rescheduleWaiters(digest) }
            if finished {
                complete(digest, matched: verifier.finalize() == digest)
                return
            }
        }
    }

    /// Every block is hashed: a match is served at once and committed later; a mismatch is
    /// fetched once more from scratch when earlier processes' blocks may be the cause, and
    /// discarded otherwise.
    private func complete(_ digest: Digest, matched: Bool) {
        if matched {
            let (ready, data) = state.withLock { state -> ([Waiter], OpenFile?) in
                guard let transfer = state.transfers[digest] else { return ([], nil) }
                transfer.verified = true
                transfer.verifiedAt = .now
                transfer.hashing = false
                let waiters = transfer.waiters
                transfer.waiters = []
                startCommitting(&state)
                return (waiters, transfer.data)
            }
            guard let data else { return }
            for waiter in ready { answer(waiter, from: data) }
            return
        }
        // Whoever was answered with bytes of this download must not see other bytes now: those
        // handles fail from here on. Bad blocks an earlier process recorded are worth one fetch
        // from scratch; otherwise the download is discarded.
        let outcome = state.withLock { state -> (failed: [Waiter], retried: [Waiter], discarded: OpenFile?, journal: BlockJournal)? in
            guard let transfer = state.transfers[digest] else { return nil }
            state.poisonedReaders.formUnion(transfer.unverifiedReaders)
            transfer.unverifiedReaders = []
            let waiters = transfer.waiters
            transfer.waiters = []
            guard transfer.usedEarlierBlocks else {
                state.transfers[digest] = nil
                state.backoffs[digest, default: RetryBackoff()].recordFailure()
                return (waiters, [], transfer.data, transfer.journal)
            }
            transfer.usedEarlierBlocks = false
            transfer.hashing = false
            transfer.blocks = Array(repeating: .absent, count: transfer.blocks.count)
            transfer.hashedBlocks = 0
            transfer.verifier = DigestVerifier()
            let poisonedReaders = state.poisonedReaders
            let poisoned = { (waiter: Waiter) in waiter.reader.map(poisonedReaders.contains) == true }
            return (waiters.filter(poisoned), waiters.filter { !poisoned($0) }, nil, transfer.journal)
        }
        guard let outcome else { return }
        // The kernel forgets the pages it cached from this download before any reader hears of
        // the failure, so that none reads them afterwards. The pages of the reads still waiting
        // are being read (locked): they are spared, or the kernel would wait for their answers.
        withdrawnHandler.withLock { $0 }?(digest, (outcome.failed + outcome.retried).map { $0.offset..<$0.end })
        let error = BlobReadError.digestMismatch(digest)
        if let data = outcome.discarded {
            logger.error("blob download failed", metadata: ["digest": "\(digest)", "error": "\(error)"])
            store.discardPartial(digest, data: data)
        } else {
            logger.warning("blob does not match its digest; fetching it again from scratch", metadata: ["digest": "\(digest)"])
            for index in 0..<outcome.journal.blockCount { outcome.journal.forget(block: index) }
        }
        for waiter in outcome.failed { answer(waiter, failing: error) }
        // Each is counted again if it waits again, before its old count is given back, so that
        // shutdown never sees none owed while one is still to be answered.
        for waiter in outcome.retried {
            read(waiter, of: digest, size: outcome.journal.blobSize, attempts: 3)
            owedReplies.subtract(1, ordering: .releasing)
        }
    }
}
