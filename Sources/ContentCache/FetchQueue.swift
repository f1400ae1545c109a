import FoundationEssentials
import SystemSupport
import Dispatch
import Synchronization

/// The one budget of range requests in flight for a whole process: a fixed set of worker
/// threads, so connections, threads and buffers stay bounded however many blobs are read at
/// once. Work a reader is waiting for runs before read-ahead.
final class FetchQueue: Sendable {
    enum Priority: Sendable { case reader, readAhead }

    private struct Pending {
        var readers: [@Sendable () -> Void] = []
        var readAhead: [@Sendable () -> Void] = []
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

    func enqueue(_ priority: Priority, _ job: @escaping @Sendable () -> Void) {
        let accepted = pending.withLock { pending -> Bool in
            guard !pending.stopped else { return false }
            switch priority {
            case .reader: pending.readers.append(job)
            case .readAhead: pending.readAhead.append(job)
            }
            return true
        }
        if accepted { available.signal() }
    }

    /// Workers finish the job in hand and exit; queued jobs are dropped.
    func stop() {
        pending.withLock { pending in
            pending.stopped = true
            pending.readers = []
            pending.readAhead = []
        }
        for _ in 0..<workerCount { available.signal() }
    }

    private func work() {
        while true {
            available.wait()
            let job = pending.withLock { pending -> (@Sendable () -> Void)?? in
                if pending.stopped { return .some(nil) }
                if !pending.readers.isEmpty { return pending.readers.removeFirst() }
                if !pending.readAhead.isEmpty { return pending.readAhead.removeFirst() }
                return nil
            }
            switch job {
            case .some(nil): return
            case .some(let job?): job()
            case nil: continue
            }
        }
    }
}
