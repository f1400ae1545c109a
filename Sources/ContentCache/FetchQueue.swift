import FoundationEssentials
import SystemSupport
import Dispatch
import Synchronization

/// The one budget of range requests in flight for a whole process: a fixed set of worker
/// threads, so connections, threads and buffers stay bounded however many blobs are read at
/// once. Work a reader is waiting for runs before read-ahead.
final class FetchQueue: Sendable {
    enum Priority: Sendable { case reader, readAhead }

    private struct Job {
        var run: @Sendable () -> Void
        /// Called instead when the queue stops before the job started.
        var dropped: (@Sendable () -> Void)?
    }

    private struct Pending {
        var readers: [Job] = []
        var readAhead: [Job] = []
        var stopped = false
    }

    private let pending = Mutex(Pending())
    private let available = DispatchSemaphore(value: 0)
    let workerCount: Int

    init(workers: Int) {
        workerCount = max(workers, 1)
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
            }
            return pending.readers + pending.readAhead
        }
        for _ in 0..<workerCount { available.signal() }
        for job in dropped { job.dropped?() }
    }

    private func work() {
        while true {
            available.wait()
            let job = pending.withLock { pending -> Job?? in
                if pending.stopped { return .some(nil) }
                if !pending.readers.isEmpty { return pending.readers.removeFirst() }
                if !pending.readAhead.isEmpty { return pending.readAhead.removeFirst() }
                return nil
            }
            switch job {
            case .some(nil): return
            case .some(let job?): job.run()
            case nil: continue
            }
        }
    }
}
