import OCI
import Testing

@testable import ContentCache

/// Single scenarios of the fetch state machine that the random model does not reach.
@Suite struct TransferMachineTests {
    static let limits = Simulation.limits

    /// Between a failed digest and the executor deleting the download, the kernel drops the
    /// file's cached pages and waits for every page being read; a read arriving then must fail
    /// at once, not wait on the dead download (it waited for the stall bound, a minute).
    @Test func aReadOfADownloadBeingDiscardedFailsAtOnce() throws {
        let now = ContinuousClock.now
        var machine = TransferMachine(digest: Simulation.digest, size: Self.limits.blockSize, limits: Self.limits, generation: 1,
                                      recorded: [nil], now: now)
        let first = TransferMachine.Read(id: .init(rawValue: 1), range: 0..<Self.limits.blockSize, reader: 1, since: now)
        guard case .waiting(let actions) = machine.read(first, now: now),
              case .enqueue(let job, _)? = actions.first(where: { if case .enqueue = $0 { return true } else { return false } })
        else { Issue.record("the first read should wait for a job"); return }
        let plan = machine.jobStarting(job)
        #expect(plan != nil)
        _ = machine.blockLanded(0, by: job, now: now)
        let started = machine.hashStarting()
        let work = try #require(started)
        #expect(machine.hashed(first: work.first, count: 1, damaged: nil, verifier: DigestVerifier()).finished)
        let verdict = machine.digestChecked(matched: false, now: now)
        #expect(verdict.contains(.discard))

        let late = TransferMachine.Read(id: .init(rawValue: 2), range: 0..<4096, reader: 2, since: now)
        #expect(machine.read(late, now: now) == .waiting([.fail(late.id, .digestMismatch(Simulation.digest))]))
        #expect(machine.waiters.isEmpty)
        #expect(!machine.isWanted(retrying: false, now: now))
    }

    /// A prefetch queues the whole blob in chunk-sized jobs at the lowest priority; a reader
    /// that arrives moves the jobs its window reaches to read-ahead, and what it waits on to
    /// the front, so the blob being read is never stuck behind blobs that may be read next.
    @Test func aReaderHastensThePrefetchOfTheBlobItReads() throws {
        let now = ContinuousClock.now
        let size = 4 * Self.limits.chunkSize
        var machine = TransferMachine(digest: Simulation.digest, size: size, limits: Self.limits, generation: 1,
                                      recorded: Array(repeating: nil, count: Int(size / Self.limits.blockSize)), now: now)
        let prefetched = machine.prefetch(now: now)
        #expect(prefetched.count == 4)
        #expect(prefetched.allSatisfy { if case .enqueue(_, .prefetch) = $0 { return true } else { return false } })
        #expect(machine.blocks.allSatisfy { if case .queued = $0 { return true } else { return false } })
        // Asked again, nothing more is queued: every block already has its job.
        #expect(machine.prefetch(now: now).isEmpty)

        let read = TransferMachine.Read(id: .init(rawValue: 1), range: 0..<Self.limits.blockSize, reader: 1, since: now)
        guard case .waiting(let actions) = machine.read(read, now: now) else { Issue.record("the read should wait"); return }
        let priorities = actions.compactMap { action -> FetchQueue.Priority? in
            if case .enqueue(_, let priority) = action { return priority } else { return nil }
        }
        #expect(priorities == [.readAhead, .reader], "\(actions)")
        guard case .queued(let owner) = machine.blocks[0], case .queued(let next) = machine.blocks[Int(Self.limits.chunkSize / Self.limits.blockSize) - 1]
        else { Issue.record("the first chunk should be queued"); return }
        #expect(machine.jobs[owner]?.priority == .reader)
        #expect(machine.jobs[next]?.priority == .reader, "the rest of the chunk comes along with the block waited on")
        guard case .queued(let later) = machine.blocks.last else { Issue.record("the last chunk should be queued"); return }
        #expect(machine.jobs[later]?.priority == .prefetch, "beyond the window the prefetch stays behind")
    }
}
