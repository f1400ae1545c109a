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
}
