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

    /// What a running job reports back, one event at a time.
    private func event(_ digest: Digest, _ change: (inout TransferMachine) -> [TransferMachine.Action]) {
        perform(state.withLock { state in
            guard let transfer = state.transfers[digest] else { return [] }
            return change(&transfer.machine)
        }, for: digest)
    }

    func run(_ job: JobID, of digest: Digest) {
        // A blob whose last fetch failed is tried again after a pause shared by all its readers.
        let pause = state.withLock { $0.backoffs[digest]?.remainingPause() }
        if let pause { SystemThread.sleep(for: pause) }
        let started = state.withLock { state -> (TransferMachine.JobPlan, OpenFile, BlockJournal)?? in
            guard !state.cancelled, let transfer = state.transfers[digest] else { return nil }
            // After a failure only a read waiting now is worth a new attempt.
            if pause != nil && !transfer.machine.isWanted(retrying: true, now: .now) {
                return .some(nil)
            }
            return transfer.machine.jobStarting(job).map { ($0, transfer.data, transfer.journal) }
        }
        guard case .some(let plan) = started else { return }
        // Whatever this job did not land goes back, for new jobs for the reads still waiting.
        defer { event(digest) { $0.jobEnded(job) } }
        guard let (plan, data, journal) = plan else { return }
        let ours = plan.blocks
        if plan.wholeStream {
            // The remote sends the whole blob whatever is asked: take every block from it.
            _ = journal.tryClaim(0...(journal.blockCount - 1))
            defer { journal.release(0...(journal.blockCount - 1)) }
            fetch(digest, job: job, blocks: Set(ours), span: 0...(journal.blockCount - 1), data: data, journal: journal, wholeStream: true)
            return
        }
        // A reader's promoted job may span a chunk boundary; requests never do.
        for run in TransferMachine.contiguousRuns(ours, blocksPerChunk: Int(tuning.chunkSize / tuning.blockSize)) {
            if plan.overridingClaims {
                // Another process holds these blocks' claims without landing them; both may now
                // write the same bytes, which the digest check covers like any other.
                guard fetch(digest, job: job, blocks: Set(run), span: run, data: data, journal: journal, wholeStream: false) else { return }
                continue
            }
            // Claim the run across processes; what another mount is fetching is watched instead.
            let claimed: [ClosedRange<Int>]
            if journal.tryClaim(run) {
                claimed = [run]
            } else {
                let mine = run.filter { journal.tryClaim($0...$0) }
                let theirs = run.filter { !mine.contains($0) }
                let now = ContinuousClock.now
                state.withLock { state in
                    guard let transfer = state.transfers[digest] else { return }
                    transfer.machine.claimedElsewhere(theirs, by: job, now: now)
                    startTimer(&state)
                }
                claimed = TransferMachine.contiguousRuns(mine)
            }
            for piece in claimed {
                defer { journal.release(piece) }
                // A block another process recorded just before our claim needs no fetch.
                let recorded = piece.compactMap { index in journal.recordedChecksum(ofBlock: index).map { (index, $0) } }
                if !recorded.isEmpty { adoptRecordedBlocks(digest, Dictionary(uniqueKeysWithValues: recorded)) }
                let wanted = piece.filter { index in !recorded.contains { $0.0 == index } }
                for part in TransferMachine.contiguousRuns(wanted) {
                    guard fetch(digest, job: job, blocks: Set(part), span: part, data: data, journal: journal, wholeStream: false) else { return }
                }
            }
        }
    }

    /// Fetches the blocks of `span` with one range request, resumed within itself after a
    /// transient failure, and records each block as it completes. Only blocks in `ours` are
    /// written (a whole-blob stream passes over the others). False when the fetch failed.
    @discardableResult
    private func fetch(_ digest: Digest, job: JobID, blocks ours: Set<Int>, span: ClosedRange<Int>, data: OpenFile,
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
                                self.blockLanded(digest, index, by: job)
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
                let switched = state.withLock { $0.transfers[digest]?.machine.remoteIgnoresRanges(by: job) ?? false }
                if switched {
                    logger.info("the remote ignores ranges; fetching the blob as one stream", metadata: ["digest": "\(digest)"])
                }
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
        logger.error("blob fetch failed", metadata: ["digest": "\(digest)", "error": "\(lastError)"])
        let now = ContinuousClock.now
        perform(state.withLock { state in
            state.backoffs[digest, default: RetryBackoff()].recordFailure(at: now)
            return state.transfers[digest]?.machine.fetchFailed(lastError, by: job, now: now) ?? []
        }, for: digest)
        return false
    }

    private func isWanted(_ digest: Digest, retrying: Bool) -> Bool {
        state.withLock { state in
            guard !state.cancelled, let transfer = state.transfers[digest] else { return false }
            return transfer.machine.isWanted(retrying: retrying, now: .now)
        }
    }

    // MARK: Block arrivals

    /// A block is on disk and recorded: answer whoever it completes, and hash onwards.
    func blockLanded(_ digest: Digest, _ index: Int, by job: JobID) {
        let now = ContinuousClock.now
        perform(state.withLock { state in
            state.backoffs[digest] = nil
            return state.transfers[digest]?.machine.blockLanded(index, by: job, now: now) ?? []
        }, for: digest)
        advanceHash(digest)
    }

    /// Blocks an earlier or another process recorded: checked against their CRC before they
    /// count.
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
        let now = ContinuousClock.now
        event(digest) { $0.adopted(intact: intact, damaged: damaged, now: now) }
        advanceHash(digest)
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
                let verified = state.transfers.filter { $0.value.machine.verified }
                guard !verified.isEmpty else {
                    state.committing = false
                    return nil
                }
                let now = ContinuousClock.now
                let fetching = state.transfers.values.contains { !$0.machine.jobs.isEmpty || $0.machine.hashing || !$0.machine.waiters.isEmpty }
                let quiet = !fetching && state.lastRead.duration(to: now) >= commitTiming.quietPeriod
                let commitAll = state.cancelled || state.commitsWanted > 0 || quiet
                return verified.filter { commitAll || $0.value.machine.verifiedAt!.duration(to: now) >= commitTiming.delayLimit }.map(\.key)
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
        // Later reads open the complete blob; a verified machine holds no waiting read.
        state.withLock { state in _ = state.transfers.removeValue(forKey: digest) }
    }

    // MARK: Waits and other processes

    /// Runs while any read waits or any block is claimed by another process.
    func startTimer(_ state: inout State) {
        guard !state.timerRunning else { return }
        state.timerRunning = true
        SystemThread.start(named: "ocicachefs-timer") { [self] in runTimer() }
    }

    /// Gives each machine the time (it fails reads that waited too long without progress, and
    /// re-queues blocks another mount claimed and stalled on), and follows blocks other mounts
    /// are fetching: each lands (recorded in the shared journal), or its claim goes away
    /// without a record (that process died or gave up) and is fetched here.
    private func runTimer() {
        while true {
            SystemThread.sleep(for: .milliseconds(10))
            let now = ContinuousClock.now
            let ticks = state.withLock { state -> [(Digest, [TransferMachine.Action], BlockJournal, watched: [Int])]? in
                var ticks: [(Digest, [TransferMachine.Action], BlockJournal, watched: [Int])] = []
                for (digest, transfer) in state.transfers {
                    let elsewhere = transfer.machine.blocksElsewhere
                    guard !transfer.machine.waiters.isEmpty || !elsewhere.isEmpty else { continue }
                    ticks.append((digest, transfer.machine.tick(now: now), transfer.journal, transfer.machine.blocksElsewhere))
                }
                if state.cancelled || ticks.isEmpty {
                    state.timerRunning = false
                    return nil
                }
                return ticks
            }
            guard let ticks else { return }
            for (digest, actions, journal, watched) in ticks {
                if actions.contains(where: { if case .enqueue = $0 { return true } else { return false } }) {
                    logger.warning("another mount of this cache directory made no progress on blocks it claimed; fetching them here",
                                   metadata: ["digest": "\(digest)"])
                }
                for case .fail(_, let error) in actions {
                    logger.error("read timed out", metadata: ["digest": "\(digest)", "error": "\(error)"])
                }
                perform(actions, for: digest)
                var recorded: [Int: UInt32] = [:]
                var abandoned: Set<Int> = []
                for index in watched {
                    if let crc = journal.recordedChecksum(ofBlock: index) {
                        recorded[index] = crc
                    } else if journal.tryClaim(index...index) {
                        journal.release(index...index)
                        abandoned.insert(index)
                    }
                }
                if !recorded.isEmpty { adoptRecordedBlocks(digest, recorded) }
                if !abandoned.isEmpty { event(digest) { $0.abandonedElsewhere(abandoned) } }
            }
        }
    }
}

// MARK: - Verifying the whole blob

extension BlobFetcher {
    /// Hashes every block that extends the hashed prefix. One thread hashes at a time; another
    /// that finds it busy leaves the work to it, and it looks again before it stops.
    func advanceHash(_ digest: Digest) {
        while let (work, data, journal, verifier) = state.withLock({ state -> (TransferMachine.HashWork, OpenFile, BlockJournal, DigestVerifier)? in
            guard let transfer = state.transfers[digest], let work = transfer.machine.hashStarting() else { return nil }
            return (work, transfer.data, transfer.journal, transfer.machine.verifier)
        }) {
            var verifier = verifier
            var hashed = 0
            var damaged: Int?
            for (offset, expectedCRC) in work.expectedCRCs.enumerated() {
                let index = work.first + offset
                let range = journal.range(ofBlock: index)
                let intact = buffers.withBuffer(count: range.count) { buffer -> Bool in
                    guard (try? data.read(into: buffer, offset: range.lowerBound)) == range.count else { return false }
                    let block = UnsafeRawBufferPointer(buffer)
                    if let expectedCRC, crc32(0, block) != expectedCRC { return false }
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
            let (actions, finished) = state.withLock { state -> ([TransferMachine.Action], Bool) in
                guard let transfer = state.transfers[digest] else { return ([], false) }
                return transfer.machine.hashed(first: work.first, count: hashed, damaged: damaged, verifier: verifier)
            }
            perform(actions, for: digest)
            if finished {
                let matched = verifier.finalize() == digest
                perform(state.withLock { state -> [TransferMachine.Action] in
                    guard let transfer = state.transfers[digest] else { return [] }
                    let actions = transfer.machine.digestChecked(matched: matched, now: .now)
                    if matched { startCommitting(&state) }
                    return actions
                }, for: digest)
                return
            }
        }
    }
}
