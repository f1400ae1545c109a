import FoundationEssentials
import SystemSupport
import Dispatch
import Synchronization

/// The one budget of range requests in flight for a whole process: a fixed set of worker
/// threads, so connections, threads and buffers stay bounded however many blobs are read at
/// once. Work a reader is waiting for runs before read-ahead, and read-ahead before
/// prefetches of blobs nobody reads yet, of which at most `prefetchLimit` run at once so that
/// the rest of the budget stays free for readers.
final class FetchQueue: Sendable {
    enum Priority: Sendable { case reader, readAhead, prefetch }

    private struct Job {
        var run: @Sendable () -> Void
        /// Called instead when the queue stops before the job started.
        var dropped: (@Sendable () -> Void)?
    }

    private struct Pending {
        var readers: [Job] = []
        var readAhead: [Job] = []
        var prefetches: [Job] = []
        var prefetchesRunning = 0
        var stopped = false
    }

    private let pending = Mutex(Pending())
    private let available = DispatchSemaphore(value: 0)
    let workerCount: Int
    let prefetchLimit: Int

    init(workers: Int, prefetchLimit: Int = 1) {
        workerCount = max(workers, 1)
        self.prefetchLimit = min(max(prefetchLimit, 1), workerCount)
        for _ in 0..<workerCount {
            SystemThread.start(named: "ocicachefs-fetch") { [self] in work() }
        }
    }

    /// False when the queue is stopped and the job was not taken. `dropped` is called instead
    /// of `job` when the queue stops before the job started.
    @discardableResult
    func enqueue(_ priority: Priority, dropped: (@Sendable () -> Void)? = nil, _ job: @escaping @Sendable () -> Void) -> Bool {
        let accepted = pending.withLock { pending -> Bool in
            guard !pending.stopped else { return false }
            switch priority {
            case .reader: pending.readers.append(Job(run: job, dropped: dropped))
            case .readAhead: pending.readAhead.append(Job(run: job, dropped: dropped))
            case .prefetch: pending.prefetches.append(Job(run: job, dropped: dropped))
            }
            return true
        }
        if accepted { available.signal() }
        return accepted
    }

    /// Workers finish the job in hand and exit; queued jobs are dropped.
    func stop() {
        let dropped = pending.withLock { pending -> [Job] in
            pending.stopped = true
            defer {
                pending.readers = []
                pending.readAhead = []
                pending.prefetches = []
            }
            return pending.readers + pending.readAhead + pending.prefetches
        }
        for _ in 0..<workerCount { available.signal() }
        for job in dropped { job.dropped?() }
    }

    private func work() {
        while true {
            available.wait()
            let taken = pending.withLock { pending -> (job: Job, prefetch: Bool)?? in
                if pending.stopped { return .some(nil) }
                if !pending.readers.isEmpty { return (pending.readers.removeFirst(), false) }
                if !pending.readAhead.isEmpty { return (pending.readAhead.removeFirst(), false) }
                // A prefetch passed over here took a wake-up it is owed: the end of a running
                // prefetch gives one back.
                if !pending.prefetches.isEmpty && pending.prefetchesRunning < prefetchLimit {
                    pending.prefetchesRunning += 1
                    return (pending.prefetches.removeFirst(), true)
                }
                return nil
            }
            switch taken {
            case .some(nil): return
            case .some(let taken?):
                taken.job.run()
                guard taken.prefetch else { continue }
                let owed = pending.withLock { pending -> Bool in
                    pending.prefetchesRunning -= 1
                    return !pending.prefetches.isEmpty
                }
                if owed { available.signal() }
            case nil: continue
            }
        }
    }
}
