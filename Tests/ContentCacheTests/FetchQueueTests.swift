import Dispatch
import Synchronization
import Testing

@testable import ContentCache

@Suite struct FetchQueueTests {
    /// Prefetches never take more than their share of the workers: a reader's job queued
    /// behind a dozen of them runs on a worker they leave free, and every prefetch still runs.
    @Test func prefetchesRunAtMostTheirLimitAtOnceAndReadersPassThem() {
        let queue = FetchQueue(workers: 4, prefetchLimit: 2)
        defer { queue.stop() }
        let release = DispatchSemaphore(value: 0)
        let running = Mutex((now: 0, most: 0, finished: 0))
        let allFinished = DispatchSemaphore(value: 0)
        let prefetches = 12
        for _ in 0..<prefetches {
            queue.enqueue(.prefetch) {
                running.withLock { $0.now += 1; $0.most = max($0.most, $0.now) }
                release.wait()
                let done = running.withLock { state -> Bool in
                    state.now -= 1
                    state.finished += 1
                    return state.finished == prefetches
                }
                if done { allFinished.signal() }
            }
        }
        let readerRan = DispatchSemaphore(value: 0)
        queue.enqueue(.reader) { readerRan.signal() }
        #expect(readerRan.wait(timeout: .now() + 10) == .success, "a reader's job waited behind prefetches")
        for _ in 0..<prefetches { release.signal() }
        #expect(allFinished.wait(timeout: .now() + 10) == .success, "a prefetch never ran: \(running.withLock { $0 })")
        #expect(running.withLock { $0.most } == 2)
    }
}
