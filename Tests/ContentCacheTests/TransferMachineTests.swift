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

    /// Every request costs the server: docker-registry spent about twice the CPU serving a GiB
    /// as 8 MiB ranges as it did as 32 MiB ranges. With the default tuning a long sequential
    /// read starts with chunk-sized requests and, once the window holds 8 of twice the chunk,
    /// asks for larger aligned ones, still 8 or more in flight; a short read keeps small ones,
    /// and the last requests shrink again so that the streams end nearly together.
    @Test func aLongSequentialReadAsksForLargerRequestsAsItsWindowGrows() throws {
        let tuning = FetchTuning()
        let limits = TransferMachine.Limits(blockSize: tuning.blockSize, chunkSize: tuning.chunkSize,
                                            initialReadAhead: tuning.initialReadAhead, maximumReadAhead: tuning.maximumReadAhead,
                                            readStallLimit: .seconds(30), unwatchedFetchLimit: .seconds(10), otherProcessStall: .seconds(60))
        let now = ContinuousClock.now
        let size: Int64 = 1 << 30
        var machine = TransferMachine(digest: Simulation.digest, size: size, limits: limits, generation: 1,
                                      recorded: Array(repeating: nil, count: Int(size / limits.blockSize)), now: now)
        for index in 0..<Int64(size / limits.blockSize) {
            let range = index * limits.blockSize..<(index + 1) * limits.blockSize
            let read = TransferMachine.Read(id: .init(rawValue: UInt64(index + 1)), range: range, reader: 1, since: now)
            if case .check = machine.read(read, now: now) { Issue.record("nothing was recorded by an earlier process"); return }
        }
        // What each job asks for when it starts: the runs of blocks it owns by then (a read
        // that reaches a read-ahead job moves the job's blocks to a new one).
        var requests: [(offset: Int64, length: Int64)] = []
        var owner: TransferMachine.JobID?
        for (index, block) in machine.blocks.enumerated() {
            guard case .queued(let id) = block else { Issue.record("block \(index) is not queued: \(block)"); return }
            if id == owner {
                requests[requests.count - 1].length += limits.blockSize
            } else {
                requests.append((Int64(index) * limits.blockSize, limits.blockSize))
                owner = id
            }
        }
        let largest = TransferMachine.requestSize(at: 0, blobSize: .max, chunkSize: limits.chunkSize,
                                                  window: limits.maximumReadAhead, perWindow: limits.requestsPerWindow)
        #expect(largest == 32 << 20)
        #expect(limits.maximumReadAhead / largest >= limits.requestsPerWindow)
        #expect(requests.reduce(0) { $0 + $1.length } == size)
        for request in requests {
            #expect(request.length <= largest)
            // The ramp's first requests are shorter than a chunk and stay within one.
            let aligned = request.length < limits.chunkSize
                ? request.offset / limits.chunkSize == (request.offset + request.length - 1) / limits.chunkSize
                : request.offset % request.length == 0
            #expect(aligned, "a request starts at a multiple of its size: \(request)")
        }
        // A reader that stops after 64 MiB has a window of 64 MiB: what it caused, up to 128 MiB,
        // was asked for in chunk-sized requests.
        #expect(requests.filter { $0.offset < 128 << 20 }.allSatisfy { $0.length <= limits.chunkSize })
        // From 512 MiB the window is at its maximum: the largest requests while 8 of them fit
        // in what is left of the blob, then 16 MiB ones while 8 of those fit, then chunks.
        func lengths(_ offsets: Range<Int64>) -> Set<Int64> {
            Set(requests.filter { offsets.contains($0.offset) }.map(\.length))
        }
        #expect(lengths((512 << 20)..<(800 << 20)) == [largest])
        #expect(lengths((800 << 20)..<(912 << 20)) == [16 << 20])
        #expect(lengths((912 << 20)..<size) == [limits.chunkSize])
    }
}
