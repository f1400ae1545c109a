import FoundationEssentials
import SystemSupport
import OCI
import Synchronization
import Logging

// MARK: - Running jobs

extension BlobFetcher {
    private struct RangesIgnored: Error {}
    /// Nobody waits for the blob's blocks and nobody has read it for a while.
    private struct Unwatched: Error {}

    /// What happened to a blob's transfer, given to its machine, whose actions are then
    /// performed. Nothing happens when another transfer of the blob took its place.
    func event(_ digest: Digest, on transfer: Transfer? = nil, _ change: (inout TransferMachine) -> [TransferMachine.Action]) {
        let (actions, current) = state.withLock { state -> ([TransferMachine.Action], Transfer?) in
            guard let current = state.transfers[digest], transfer == nil || current === transfer else { return ([], nil) }
            return (change(&current.machine), current)
        }
        perform(actions, for: digest, on: current)
    }

    func run(_ job: JobID, of digest: Digest) {
        // A blob whose last fetch failed is tried again after a pause shared by all its readers.
        let pause = state.withLock { $0.backoffs[digest]?.remainingPause() }
        if let pause { SystemThread.sleep(for: pause) }
        waitWhileMovingToMemory(digest)
        let started = state.withLock { state -> (TransferMachine.JobPlan?, Transfer)? in
            guard !state.cancelled, let transfer = state.transfers[digest] else { return nil }
            // After a failure only a read waiting now is worth a new attempt.
            if pause != nil && !transfer.machine.isWanted(retrying: true, now: .now) {
                return (nil, transfer)
            }
            return (transfer.machine.jobStarting(job), transfer)
        }
        guard let (plan, transfer) = started else { return }
        // Whatever this job did not land goes back, for new jobs for the reads still waiting.
        defer { event(digest, on: transfer) { $0.jobEnded(job) } }
        guard let plan else { return }
        let journal = transfer.journal
        let ours = plan.blocks
        if plan.wholeStream {
            // The remote sends the whole blob whatever is asked: take every block from it.
            _ = journal.tryClaim(0...(journal.blockCount - 1))
            defer { journal.release(0...(journal.blockCount - 1)) }
            fetch(digest, job: job, blocks: Set(ours), span: 0...(journal.blockCount - 1), into: transfer, wholeStream: true)
            return
        }
        // A reader's promoted job may span the boundary of the largest requests; requests never do.
        let largestRequest = TransferMachine.requestSize(at: 0, blobSize: .max, chunkSize: machineLimits.chunkSize,
                                                         window: machineLimits.maximumReadAhead, perWindow: machineLimits.requestsPerWindow)
        for run in TransferMachine.contiguousRuns(ours, blocksPerChunk: Int(largestRequest / tuning.blockSize)) {
            if plan.overridingClaims {
                // Another process holds these blocks' claims without landing them; both may now
                // write the same bytes, which the digest check covers like any other.
                guard fetch(digest, job: job, blocks: Set(run), span: run, into: transfer, wholeStream: false) else { return }
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
                    transfer.machine.claimedElsewhere(theirs, by: job, now: now)
                    startTimer(&state)
                }
                claimed = TransferMachine.contiguousRuns(mine)
            }
            for piece in claimed {
                defer { journal.release(piece) }
                // A block another process recorded just before our claim needs no fetch.
                let recorded = piece.compactMap { index in journal.recordedChecksum(ofBlock: index).map { (index, $0) } }
                if !recorded.isEmpty { adoptRecordedBlocks(digest, Dictionary(uniqueKeysWithValues: recorded), on: transfer) }
                let wanted = piece.filter { index in !recorded.contains { $0.0 == index } }
                for part in TransferMachine.contiguousRuns(wanted) {
                    guard fetch(digest, job: job, blocks: Set(part), span: part, into: transfer, wholeStream: false) else { return }
                }
            }
        }
    }

    /// Fetches the blocks of `span` with one range request, resumed within itself after a
    /// transient failure, and records each block as it completes. Only blocks in `ours` are
    /// written (a whole-blob stream passes over the others). False when the fetch failed.
    ///
    /// A full cache directory costs no read: least recently used blobs are evicted and the
    /// block written again, and when nothing more can go the download moves to memory.
    ///
    /// The disk blocks of the blocks it writes are allocated before the request, and those of
    /// the ones a failed fetch did not record are given back, so a remote that sends less than
    /// it declared leaves no allocation behind.
    @discardableResult
    private func fetch(_ digest: Digest, job: JobID, blocks ours: Set<Int>, span: ClosedRange<Int>, into transfer: Transfer,
                       wholeStream: Bool) -> Bool {
        let journal = transfer.journal
        if !transfer.inMemory {
            makeRoom(for: digest, bytes: Int64(ours.count) * journal.blockSize)
            for run in Self.runs(of: ours, within: span) {
                transfer.data.allocateAhead(journal.range(ofBlock: run.lowerBound).lowerBound..<journal.range(ofBlock: run.upperBound).upperBound)
            }
        }
        let fetched = fetchAllocated(digest, job: job, blocks: ours, span: span, into: transfer, wholeStream: wholeStream)
        if !fetched && !transfer.inMemory {
            for index in ours.sorted() where journal.recordedChecksum(ofBlock: index) == nil {
                transfer.data.free(journal.range(ofBlock: index))
            }
        }
        return fetched
    }

    private func fetchAllocated(_ digest: Digest, job: JobID, blocks ours: Set<Int>, span: ClosedRange<Int>, into transfer: Transfer,
                                wholeStream: Bool) -> Bool {
        let data = transfer.data, journal = transfer.journal
        let first = journal.range(ofBlock: span.lowerBound).lowerBound
        let end = journal.range(ofBlock: span.upperBound).upperBound
        var position = first
        var blockChecksum: UInt32 = 0
        var writer = PageAlignedWriter(file: data)
        var lastError = BlobReadError.remote("blob \(digest): no attempt made")
        var evictedForRoom = false
        var attempt = 0
        while attempt < maxAttempts {
            attempt += 1
            do {
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
                            blockChecksum = crc32c(blockChecksum, piece)
                        }
                        position += Int64(length)
                        consumed += length
                        if position == blockEnd {
                            if ours.contains(index) {
                                try writer.flush()
                                data.startWriteBack(journal.range(ofBlock: index))
                                try journal.record(block: index, checksum: blockChecksum)
                                self.blockLanded(digest, index, by: job, on: transfer)
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
                guard error.isOutOfSpace else { break }
                // The block is written again from its start, with nothing held back.
                position = journal.range(ofBlock: Int(position / journal.blockSize)).lowerBound
                blockChecksum = 0
                writer = PageAlignedWriter(file: data)
                if !evictedForRoom {
                    evictedForRoom = true
                    if makeRoom(for: digest, bytes: end - position, rescan: true) > 0 {
                        attempt -= 1
                        continue
                    }
                }
                noteDiskFull(error)
                guard let failure = moveToMemory(digest, from: transfer) else {
                    // Ended once the memory transfer has taken over: ended before, its blocks
                    // would go back to the full disk's machine, which would fetch them again.
                    waitWhileMovingToMemory(digest)
                    return false
                }
                lastError = failure
                break
            } catch let error as any BlobSourceFailure {
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
        state.withLock { $0.backoffs[digest, default: RetryBackoff()].recordFailure(at: now) }
        event(digest, on: transfer) { $0.fetchFailed(lastError, by: job, now: now) }
        return false
    }

    /// Waits while the blob's download is being moved into memory (as long as copying its
    /// blocks takes): a job that started meanwhile would write to the full disk again.
    private func waitWhileMovingToMemory(_ digest: Digest) {
        while state.withLock({ $0.transfers[digest]?.movingToMemory == true }) { SystemThread.sleep(for: .milliseconds(2)) }
    }

    private func isWanted(_ digest: Digest, retrying: Bool) -> Bool {
        state.withLock { state in
            guard !state.cancelled, let transfer = state.transfers[digest] else { return false }
            return transfer.machine.isWanted(retrying: retrying, now: .now)
        }
    }

    // MARK: Block arrivals

    /// A block is on disk and recorded: answer whoever it completes, and hash onwards.
    func blockLanded(_ digest: Digest, _ index: Int, by job: JobID, on transfer: Transfer) {
        let now = ContinuousClock.now
        state.withLock { $0.backoffs[digest] = nil }
        event(digest, on: transfer) { $0.blockLanded(index, by: job, now: now) }
        advanceHash(digest, on: transfer)
    }

    /// Blocks an earlier or another process recorded: checked against their CRC before they
    /// count.
    func adoptRecordedBlocks(_ digest: Digest, _ recorded: [Int: UInt32], on transfer: Transfer) {
        let data = transfer.data, journal = transfer.journal
        var intact: Set<Int> = [], damaged: Set<Int> = []
        for (index, crc) in recorded {
            let range = journal.range(ofBlock: index)
            let matches = buffers.withBuffer(count: range.count) { buffer in
                (try? data.read(into: buffer, offset: range.lowerBound)) == range.count && crc32c(0, UnsafeRawBufferPointer(buffer)) == crc
            }
            if matches == true {
                intact.insert(index)
            } else {
                journal.forget(block: index)
                damaged.insert(index)
            }
        }
        let now = ContinuousClock.now
        event(digest, on: transfer) { $0.adopted(intact: intact, damaged: damaged, now: now) }
        advanceHash(digest, on: transfer)
    }

    // MARK: Making verified blobs durable

    /// Committing forces the blob's pages to disk. Done while a job still reads (BuildKit reading
    /// one layer after another), those writes competed with the next layers' downloads
    /// (docs/performance.md, "Measurements behind design choices").
    func startCommitting(_ state: inout State) {
        guard !state.committing else { return }
        state.committing = true
        SystemThread.start(named: "ocicachefs-commit") { [self] in commitWhenQuiet() }
    }

    private func commitWhenQuiet() {
        while true {
            let due = state.withLock { state -> [Digest]? in
                let verified = state.transfers.filter { $0.value.awaitsCommit }
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
            if let last = due.last { makeRoom(for: last, bytes: 0, rescan: true) }
        }
    }

    private func commit(_ digest: Digest) {
        commitsInFlight.add(1, ordering: .relaxed)
        defer { commitsInFlight.subtract(1, ordering: .releasing) }
        guard let transfer = state.withLock({ $0.transfers[digest] }) else { return }
        do {
            try store.commit(digest, data: transfer.data)
            logger.debug("blob complete", metadata: ["digest": "\(digest)"])
        } catch {
            logger.error("cannot keep a verified blob", metadata: ["digest": "\(digest)", "error": "\(error)"])
        }
        // Later reads open the complete blob; a verified machine holds no waiting read.
        state.withLock { state in
            if state.transfers[digest] === transfer { state.transfers[digest] = nil }
        }
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
            let ticks = state.withLock { state -> [(Digest, [TransferMachine.Action], Transfer, watched: [Int])]? in
                var ticks: [(Digest, [TransferMachine.Action], Transfer, watched: [Int])] = []
                for (digest, transfer) in state.transfers {
                    let elsewhere = transfer.machine.blocksElsewhere
                    guard !transfer.machine.waiters.isEmpty || !elsewhere.isEmpty else { continue }
                    ticks.append((digest, transfer.machine.tick(now: now), transfer, transfer.machine.blocksElsewhere))
                }
                if state.cancelled || ticks.isEmpty {
                    state.timerRunning = false
                    return nil
                }
                return ticks
            }
            guard let ticks else { return }
            for (digest, actions, transfer, watched) in ticks {
                let journal = transfer.journal
                if actions.contains(where: { if case .enqueue = $0 { return true } else { return false } }) {
                    logger.warning("another mount of this cache directory made no progress on blocks it claimed; fetching them here",
                                   metadata: ["digest": "\(digest)"])
                }
                for case .fail(_, let error) in actions {
                    logger.error("read timed out", metadata: ["digest": "\(digest)", "error": "\(error)"])
                }
                perform(actions, for: digest, on: transfer)
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
                if !recorded.isEmpty { adoptRecordedBlocks(digest, recorded, on: transfer) }
                if !abandoned.isEmpty { event(digest, on: transfer) { $0.abandonedElsewhere(abandoned) } }
            }
        }
    }

    /// The runs of consecutive blocks of `blocks` inside `span`, in order.
    static func runs(of blocks: Set<Int>, within span: ClosedRange<Int>) -> [ClosedRange<Int>] {
        var runs: [ClosedRange<Int>] = []
        var start: Int?
        for index in span {
            if blocks.contains(index) {
                if start == nil { start = index }
            } else if let first = start {
                runs.append(first...(index - 1))
                start = nil
            }
        }
        if let first = start { runs.append(first...span.upperBound) }
        return runs
    }
}

// MARK: - Verifying the whole blob

extension BlobFetcher {
    /// Hashes every block that extends the hashed prefix. One thread hashes at a time; another
    /// that finds it busy leaves the work to it, and it looks again before it stops.
    func advanceHash(_ digest: Digest, on transfer: Transfer) {
        let data = transfer.data, journal = transfer.journal
        while let (work, verifier) = state.withLock({ state -> (TransferMachine.HashWork, DigestVerifier)? in
            guard state.transfers[digest] === transfer, let work = transfer.machine.hashStarting() else { return nil }
            return (work, transfer.machine.verifier)
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
                    if let expectedCRC, crc32c(0, block) != expectedCRC { return false }
                    verifier.update(block)
                    return true
                }
                guard intact == true else {
                    damaged = index
                    break
                }
                hashed += 1
                // Readers far behind the hash read from disk; the mount's page cache holds a
                // second copy of what they read.
                let lag = Int((tuning.cachedBehindHash + journal.blockSize - 1) / journal.blockSize)
                if !transfer.inMemory && index >= lag { data.dropCachedPages(journal.range(ofBlock: index - lag)) }
            }
            if let damaged {
                logger.warning("a downloaded block no longer matches its checksum; fetching it again",
                               metadata: ["digest": "\(digest)", "block": "\(damaged)"])
                journal.forget(block: damaged)
            }
            // The machine is told even when another transfer took its place: its hash is over.
            let (actions, finished) = state.withLock { _ in
                transfer.machine.hashed(first: work.first, count: hashed, damaged: damaged, verifier: verifier)
            }
            perform(actions, for: digest, on: transfer)
            if finished {
                let matched = verifier.finalize() == digest
                perform(state.withLock { state -> [TransferMachine.Action] in
                    let actions = transfer.machine.digestChecked(matched: matched, now: .now)
                    if matched && transfer.awaitsCommit { startCommitting(&state) }
                    return actions
                }, for: digest, on: transfer)
                return
            }
        }
    }
}
