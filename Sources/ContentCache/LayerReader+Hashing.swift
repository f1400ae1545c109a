import LayerView
import OCI
import Synchronization

/// Hashes a first pass's uncompressed stream on the worker pool while the pass decodes on, so
/// that inflating and hashing take a core each instead of taking turns on one. The output goes
/// through two buffers: the pass fills one while a job hashes the other, in order. Memory is
/// the two buffers, whatever the layer's size.
// SAFETY: `state` is under its lock; a buffer belongs either to the pass filling it or, once handed over, to the one hashing job that runs at a time (`verifier` too), and goes back under the lock.
final class PassHasher: @unchecked Sendable {
    /// Output the pass gathers before handing a buffer over; the decoder's pieces are at most
    /// `LayerDecoder.outputBufferSize`, so a buffer holds this plus one piece.
    static let fill = 1 << 20
    private static let capacity = fill + LayerDecoder.outputBufferSize

    private struct State {
        var free: [Int] = [1]
        var queued: [(buffer: Int, count: Int)] = []
        var hashing = false
        /// The queue dropped a hashing job (shutdown): nothing more is hashed.
        var dropped = false
        /// The pass, waiting for a free buffer.
        var waitingForBuffer: (@Sendable () -> Void)?
        /// The pass's end, waiting for everything to be hashed.
        var waitingForAll: (@Sendable () -> Void)?
    }

    private let buffers: [UnsafeMutableRawBufferPointer]
    private var verifier = DigestVerifier()
    private let state = Mutex(State())
    private let queue: FetchQueue

    /// The buffer the pass fills, and how much it holds.
    private(set) var current = 0
    private(set) var filled = 0

    init(queue: FetchQueue) {
        self.queue = queue
        buffers = (0..<2).map { _ in .allocate(byteCount: Self.capacity, alignment: 16) }
    }

    deinit { for buffer in buffers { buffer.deallocate() } }

    /// Copies a piece of output in; returns whether the buffer still wants more.
    func append(_ piece: UnsafeRawBufferPointer) -> Bool {
        UnsafeMutableRawBufferPointer(rebasing: buffers[current][filled..<filled + piece.count]).copyMemory(from: piece)
        filled += piece.count
        return filled < Self.fill
    }

    var isFull: Bool { filled >= Self.fill }

    /// Hands the current buffer over to be hashed and takes the other one; false when the
    /// other is still being hashed: then `resume` runs (on a worker) once it is free, with it
    /// taken, or with nothing taken when hashing was stopped (`wasDropped`).
    func handOver(resume: @escaping @Sendable () -> Void) -> Bool {
        let handed = (current, filled)
        let (start, next) = state.withLock { state -> (Bool, Int?) in
            state.queued.append(handed)
            let start = !state.hashing && !state.dropped
            if start { state.hashing = true }
            guard let next = state.free.popLast() else {
                state.waitingForBuffer = resume
                return (start, nil)
            }
            return (start, next)
        }
        if let next {
            current = next
            filled = 0
        }
        if start { startHashing() }
        return next != nil
    }

    /// Takes the buffer a `handOver` that returned false was waiting for.
    func takeFreed() -> Bool {
        guard let next = state.withLock({ $0.free.popLast() }) else { return false }
        current = next
        filled = 0
        return true
    }

    /// Hands over what is left and calls `body` with the stream's digest once all is hashed
    /// (nil when hashing was stopped).
    func finish(_ body: @escaping @Sendable (Digest?) -> Void) {
        let handed = (current, filled)
        let (start, now) = state.withLock { state -> (Bool, Bool) in
            if handed.1 > 0 { state.queued.append(handed) }
            filled = 0
            if state.dropped { return (false, true) }
            if state.queued.isEmpty && !state.hashing { return (false, true) }
            let start = !state.hashing
            state.hashing = true
            state.waitingForAll = { [self] in body(wasDropped ? nil : verifier.finalize()) }
            return (start, false)
        }
        if now { return body(wasDropped ? nil : verifier.finalize()) }
        if start { startHashing() }
    }

    var wasDropped: Bool { state.withLock { $0.dropped } }

    private func startHashing() {
        let queued = queue.enqueue(.reader, dropped: { [self] in stopHashing() }) { [self] in hashQueued() }
        if !queued { stopHashing() }
    }

    private func stopHashing() {
        let waiters = state.withLock { state -> [@Sendable () -> Void] in
            state.dropped = true
            state.hashing = false
            defer { state.waitingForBuffer = nil; state.waitingForAll = nil }
            return [state.waitingForBuffer, state.waitingForAll].compactMap { $0 }
        }
        for waiter in waiters { waiter() }
    }

    /// Hashes every buffer handed over, in order, waking the pass as each is freed.
    private func hashQueued() {
        while true {
            // Deciding that all is hashed and taking the end's waiter happen under one lock, so
            // a `finish` either finds hashing still on or finds it over and ends by itself.
            let (next, allHashed) = state.withLock { state -> ((buffer: Int, count: Int)?, (@Sendable () -> Void)?) in
                guard state.queued.isEmpty else { return (state.queued.removeFirst(), nil) }
                state.hashing = false
                defer { state.waitingForAll = nil }
                return (nil, state.waitingForAll)
            }
            guard let next else {
                allHashed?()
                return
            }
            verifier.update(UnsafeRawBufferPointer(rebasing: buffers[next.buffer][..<next.count]))
            // The waiting pass queues its next step itself: it does not run on this job.
            let waiter = state.withLock { state -> (@Sendable () -> Void)? in
                state.free.append(next.buffer)
                defer { state.waitingForBuffer = nil }
                return state.waitingForBuffer
            }
            waiter?()
        }
    }
}
