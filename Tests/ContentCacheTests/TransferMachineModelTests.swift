import Foundation
import ModelTesting
import OCI
import Testing

@testable import ContentCache

/// Drives `TransferMachine` through random interleavings (reads at random offsets from a few
/// handles, jobs starting, blocks landing in any order, fetches failing, a remote that lies
/// until it recovers, blocks an earlier process recorded, the clock, hashing) and checks every
/// step against a simple model of what may be answered:
///
/// - no read is answered twice, and at the end none is left unanswered;
/// - a read of the blob's end is answered only with every block good (verified);
/// - a handle that was answered with bad bytes is never answered again once it is poisoned,
///   and never answered the end;
/// - a block in flight belongs to a running job, and a job lands only blocks it owns;
/// - a read that sees no progress for the stall bound is failed.
///
/// A failing sequence is shrunk to a minimal one and printed with its seed.
@Suite struct TransferMachineModelTests {
    /// `OCICACHEFS_MODEL_SEQUENCES` runs more (`scripts/model-check.sh` runs a million).
    static var sequences: Int {
        ProcessInfo.processInfo.environment["OCICACHEFS_MODEL_SEQUENCES"].flatMap(Int.init) ?? 3000
    }

    @Test func randomInterleavingsKeepEveryInvariant() {
        let firstSeed = ProcessInfo.processInfo.environment["OCICACHEFS_MODEL_SEED"].flatMap(UInt64.init) ?? 1
        for seed in firstSeed..<(firstSeed + UInt64(Self.sequences)) {
            let steps = randomSteps(seed: seed, count: 10...80)
            let scenario = Scenario(seed: seed)
            var simulation = Simulation(scenario)
            guard let failure = simulation.run(steps) else { continue }
            let minimal = shrink(steps) { candidate in
                var simulation = Simulation(scenario)
                return simulation.run(candidate) != nil
            }
            var replay = Simulation(scenario)
            let trace = replay.trace(minimal)
            Issue.record("seed \(seed): \(failure)\nminimal sequence (\(minimal.count) steps):\n\(trace.joined(separator: "\n"))")
            return
        }
    }

    /// The model itself must catch a broken rule: an executor that answers reads of the end
    /// before the machine says so is caught.
    @Test func theModelCatchesABrokenRule() {
        var caught = false
        for seed in 1...UInt64(500) where !caught {
            var generator = SeededGenerator(seed: seed)
            let steps = (0..<60).map { _ in UInt32.random(in: 0...UInt32.max, using: &generator) }
            var scenario = Scenario(seed: seed)
            scenario.serveTheEndUnverified = true
            var simulation = Simulation(scenario)
            caught = simulation.run(steps) != nil
        }
        #expect(caught)
    }
}

/// What a run is about, fixed by its seed.
struct Scenario {
    var blockCount: Int
    var tail: Int64
    /// The remote sends bad bytes for these blocks until it recovers.
    var lyingBlocks: Set<Int>
    /// An earlier process recorded these blocks: bad from the start (their CRCs match), or
    /// damaged on disk since (their CRCs do not).
    var recordedBad: Set<Int>
    var recordedDamaged: Set<Int>
    var recordedGood: Set<Int>
    /// Requests of one block that grow to two and four as the window does, instead of chunks
    /// of four blocks.
    var growingRequests: Bool
    /// Breaks the model's executor on purpose (it serves waiting reads of the end as soon as
    /// a job is queued), to show the checks catch it.
    var serveTheEndUnverified = false

    static let blockSize: Int64 = 4096

    init(seed: UInt64) {
        var generator = SeededGenerator(seed: seed ^ 0xABCDEF)
        blockCount = Int.random(in: 1...12, using: &generator)
        tail = Int64.random(in: 1...Self.blockSize, using: &generator)
        growingRequests = Bool.random(using: &generator)
        let blocks = Array(0..<blockCount)
        lyingBlocks = Bool.random(using: &generator) ? Set(blocks.filter { _ in Int.random(in: 0..<4, using: &generator) == 0 }) : []
        recordedBad = []
        recordedDamaged = []
        recordedGood = []
        if Bool.random(using: &generator) {
            for block in blocks {
                switch Int.random(in: 0..<6, using: &generator) {
                case 0: recordedBad.insert(block)
                case 1: recordedDamaged.insert(block)
                case 2, 3: recordedGood.insert(block)
                default: break
                }
            }
        }
    }

    var size: Int64 { Int64(blockCount - 1) * Self.blockSize + tail }

    static let chunkLimits = TransferMachine.Limits(blockSize: blockSize, chunkSize: 4 * blockSize,
                                                    initialReadAhead: blockSize, maximumReadAhead: 8 * blockSize,
                                                    readStallLimit: .seconds(30), unwatchedFetchLimit: .seconds(10),
                                                    otherProcessStall: .seconds(60))

    var limits: TransferMachine.Limits {
        var limits = Self.chunkLimits
        if growingRequests {
            limits.chunkSize = Self.blockSize
            limits.requestsPerWindow = 2
        }
        return limits
    }
}

/// The machine, a model executor around it, and the rules checked after every step.
struct Simulation {
    enum Content { case good, bad }

    struct RunningJob {
        var blocks: [Int]
        var landed = 0
    }

    let scenario: Scenario
    var machine: TransferMachine
    var generation: UInt64 = 1
    var now = ContinuousClock.now
    var remoteLies: Bool
    /// What the partial file holds for each block.
    var disk: [Int: Content] = [:]
    /// Checksums as recorded: what an earlier process's CRC says (true: matches the disk).
    var recordedIntact: [Int: Bool] = [:]
    var queued: [TransferMachine.JobID] = []
    var running: [TransferMachine.JobID: RunningJob] = [:]
    var pending: [TransferMachine.ReadID: TransferMachine.Read] = [:]
    var answered: Set<TransferMachine.ReadID> = []
    var nextRead: UInt64 = 1
    var poisoned: Set<UInt64> = []
    var sawBadBytes: Set<UInt64> = []
    var log: [String] = []
    var failure: String?

    static let limits = Scenario.chunkLimits
    static let digest = Digest.sha256(of: [0])

    init(_ scenario: Scenario) {
        self.scenario = scenario
        remoteLies = !scenario.lyingBlocks.isEmpty
        var recorded = [UInt32?](repeating: nil, count: scenario.blockCount)
        for block in scenario.recordedBad.union(scenario.recordedDamaged).union(scenario.recordedGood) {
            recorded[block] = 1
            disk[block] = scenario.recordedGood.contains(block) ? .good : .bad
            recordedIntact[block] = !scenario.recordedDamaged.contains(block)
        }
        machine = TransferMachine(digest: Self.digest, size: scenario.size, limits: scenario.limits, generation: 1,
                                  recorded: recorded, now: now)
    }

    /// The first rule broken, or nil.
    mutating func run(_ steps: [UInt32]) -> String? {
        for step in steps {
            apply(step)
            if failure != nil { return failure }
        }
        drain()
        return failure
    }

    mutating func trace(_ steps: [UInt32]) -> [String] {
        _ = run(steps)
        return log
    }

    private mutating func fail(_ message: String) {
        if failure == nil { failure = message + " (after: \(log.suffix(3).joined(separator: "; ")))" }
    }

    // MARK: Steps

    mutating func apply(_ step: UInt32) {
        let argument = Int(step >> 8)
        switch step % 10 {
        case 0, 1, 2: read(argument)
        case 3: startJob(argument)
        case 4, 5: landBlock(argument)
        case 6: failJob(argument, rangesIgnored: argument % 3 == 0)
        case 7: hashStep()
        case 8: advanceClock(seconds: Int64(argument % 40))
        default:
            if argument % 3 == 0 {
                log.append("remote recovers")
                remoteLies = false
            } else if argument % 3 == 1 {
                log.append("prefetch")
                perform(machine.prefetch(now: now))
            } else {
                let reader = UInt64(argument % 3 + 1)
                log.append("close reader \(reader)")
                machine.forget(reader: reader)
                poisoned.remove(reader)
                sawBadBytes.remove(reader)
            }
        }
        checkOwnership()
    }

    mutating func read(_ argument: Int) {
        let reader = UInt64(argument % 3 + 1)
        let size = scenario.size
        let offset: Int64, end: Int64
        if argument % 4 == 0 {
            end = size
            offset = max(0, size - Int64(argument % 3000 + 1))
        } else {
            offset = Int64(argument) % size
            end = min(size, offset + Int64(argument % 9000 + 1))
        }
        let read = TransferMachine.Read(id: TransferMachine.ReadID(rawValue: nextRead), range: offset..<end, reader: reader, since: now)
        nextRead += 1
        log.append("read \(offset)..<\(end) by \(reader)")
        submit(read)
    }

    private mutating func submit(_ read: TransferMachine.Read) {
        // The executor refuses poisoned handles before the machine sees them.
        if let reader = read.reader, poisoned.contains(reader) {
            answered.insert(read.id)
            return
        }
        switch machine.read(read, now: now) {
        case .serve(let actions):
            served(read)
            perform(actions)
        case .waiting(let actions):
            pending[read.id] = read
            perform(actions)
        case .check(let recorded):
            let intact = Set(recorded.keys.filter { recordedIntact[$0] == true })
            let damaged = Set(recorded.keys).subtracting(intact)
            for block in damaged { disk[block] = nil }
            log.append("check recorded \(recorded.keys.sorted()): damaged \(damaged.sorted())")
            perform(machine.adopted(intact: intact, damaged: damaged, now: now))
            submit(read)
        }
    }

    mutating func startJob(_ argument: Int) {
        guard !queued.isEmpty else { return }
        let job = queued.remove(at: argument % queued.count)
        guard let plan = machine.jobStarting(job) else { return }
        log.append("job \(job.rawValue) starts: \(plan.blocks)\(plan.wholeStream ? " (stream)" : "")")
        running[job] = RunningJob(blocks: plan.blocks)
    }

    mutating func landBlock(_ argument: Int) {
        guard let job = running.keys.sorted(by: { $0.rawValue < $1.rawValue }).dropFirst(argument % max(running.count, 1)).first,
              var work = running[job] else { return }
        guard work.landed < work.blocks.count else {
            log.append("job \(job.rawValue) ends")
            running[job] = nil
            if job.generation == generation { perform(machine.jobEnded(job)) }
            return
        }
        let block = work.blocks[work.landed]
        work.landed += 1
        running[job] = work
        guard job.generation == generation else { return }  // writes into a discarded file
        if machine.blocks[block] != .fetching(job) { fail("job \(job.rawValue) lands block \(block), which it does not own") }
        disk[block] = remoteLies && scenario.lyingBlocks.contains(block) ? .bad : .good
        recordedIntact[block] = true
        log.append("job \(job.rawValue) lands \(block) (\(disk[block]!))")
        perform(machine.blockLanded(block, by: job, now: now))
    }

    mutating func failJob(_ argument: Int, rangesIgnored: Bool) {
        guard let job = running.keys.sorted(by: { $0.rawValue < $1.rawValue }).dropFirst(argument % max(running.count, 1)).first else { return }
        running[job] = nil
        guard job.generation == generation else { return }
        if rangesIgnored {
            log.append("job \(job.rawValue): remote ignores ranges")
            _ = machine.remoteIgnoresRanges(by: job)
        } else {
            log.append("job \(job.rawValue) fails")
            perform(machine.fetchFailed(.remote("model"), by: job, now: now))
        }
        perform(machine.jobEnded(job))
    }

    @discardableResult
    mutating func hashStep() -> Bool {
        guard let work = machine.hashStarting() else { return false }
        var count = 0
        var damaged: Int?
        for (offset, expected) in work.expectedCRCs.enumerated() {
            let block = work.first + offset
            if expected != nil && recordedIntact[block] != true {
                damaged = block
                disk[block] = nil
                break
            }
            count += 1
        }
        log.append("hash \(work.first)..<\(work.first + count)\(damaged.map { ", block \($0) damaged" } ?? "")")
        let (actions, finished) = machine.hashed(first: work.first, count: count, damaged: damaged, verifier: DigestVerifier())
        perform(actions)
        guard finished else { return true }
        let matched = (0..<scenario.blockCount).allSatisfy { disk[$0] == .good }
        log.append("digest \(matched ? "matches" : "does not match")")
        perform(machine.digestChecked(matched: matched, now: now))
        return true
    }

    mutating func advanceClock(seconds: Int64) {
        now += .seconds(seconds)
        log.append("clock +\(seconds) s")
        perform(machine.tick(now: now))
    }

    // MARK: Actions

    private mutating func perform(_ actions: [TransferMachine.Action]) {
        for action in actions {
            switch action {
            case .enqueue(let job, _):
                queued.append(job)
                if scenario.serveTheEndUnverified {
                    for read in pending.values where read.range.upperBound == scenario.size {
                        pending[read.id] = nil
                        served(read)
                    }
                }
            case .serve(let id):
                guard let read = pending.removeValue(forKey: id) else {
                    fail("read \(id.rawValue) served but not waiting (answered twice?)")
                    continue
                }
                served(read)
            case .fail(let id, _):
                guard pending.removeValue(forKey: id) != nil else {
                    fail("read \(id.rawValue) failed but not waiting (answered twice?)")
                    continue
                }
                answered.insert(id)
            case .withdraw(_, let readers):
                poisoned.formUnion(readers)
                if !sawBadBytes.isSubset(of: poisoned) && !machine.verified {
                    let missed = sawBadBytes.subtracting(poisoned)
                    fail("readers \(missed.sorted()) saw bad bytes but are not poisoned")
                }
            case .discard:
                // The executor drops the transfer; the next read opens a new one.
                log.append("download discarded")
                disk = [:]
                recordedIntact = [:]
                generation += 1
                machine = TransferMachine(digest: Self.digest, size: scenario.size, limits: scenario.limits, generation: generation,
                                          recorded: Array(repeating: nil, count: scenario.blockCount), now: now)
                queued.removeAll { $0.generation != generation }
            case .forgetRecordedBlocks:
                log.append("fetch again from scratch")
                disk = [:]
                recordedIntact = [:]
            case .retry(let read):
                guard pending.removeValue(forKey: read.id) != nil else {
                    fail("read \(read.id.rawValue) retried but not waiting")
                    continue
                }
                submit(read)
            }
        }
    }

    private mutating func served(_ read: TransferMachine.Read) {
        if answered.contains(read.id) { fail("read \(read.id.rawValue) answered twice") }
        answered.insert(read.id)
        let blocks = Int(read.range.lowerBound / Scenario.blockSize)...Int((read.range.upperBound - 1) / Scenario.blockSize)
        let contents = blocks.map { disk[$0] }
        if contents.contains(where: { $0 == nil }) { fail("read \(read.range) served from blocks not on disk: \(blocks)") }
        let bad = contents.contains { $0 == .bad }
        if let reader = read.reader {
            if poisoned.contains(reader) { fail("poisoned reader \(reader) was answered") }
            if bad { sawBadBytes.insert(reader) }
            if read.range.upperBound == scenario.size && sawBadBytes.contains(reader) {
                fail("reader \(reader) got the end after bad bytes: the blob whole would not match its digest")
            }
        }
        if read.range.upperBound == scenario.size && (bad || !machine.verified) {
            fail("the end was answered unverified (bad bytes: \(bad))")
        }
        log.append("  served \(read.range) to \(read.reader.map(String.init) ?? "-")\(bad ? " (bad bytes)" : "")")
    }

    private mutating func checkOwnership() {
        for (index, block) in machine.blocks.enumerated() {
            if case .fetching(let job) = block, running[job] == nil {
                fail("block \(index) is fetching by job \(job.rawValue), which is not running")
            }
        }
    }

    /// Lets everything finish with a truthful remote: with nothing left in flight, every read
    /// must have its answer (nothing may hang on a block nobody fetches); the stall bound is
    /// checked after.
    mutating func drain() {
        remoteLies = false
        var rounds = 0
        while failure == nil {
            rounds += 1
            if rounds > 10_000 {
                fail("the work never ends")
                return
            }
            if !running.isEmpty {
                landBlock(0)
            } else if !queued.isEmpty {
                startJob(0)
            } else if !hashStep() {
                break
            }
        }
        guard failure == nil else { return }
        if !pending.isEmpty {
            fail("reads wait with nothing in flight for them: \(pending.values.map(\.range))")
        }
        advanceClock(seconds: 31)
        if failure == nil, !pending.isEmpty {
            fail("reads still waiting after the stall bound: \(pending.values.map(\.range))")
        }
    }
}
