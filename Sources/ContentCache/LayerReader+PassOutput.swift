import LayerView
import OCI
import Synchronization

/// The first pass's second stage: it hashes the uncompressed stream against the diffID, checks
/// gzip members' CRC and size, and writes the stream to the spans file, on a worker of its own
/// beside the decompression, so that the pass keeps two cores busy instead of doing every step
/// one after the other on one.
///
/// The decoder fills a few fixed buffers and hands each over once full; the stage empties them
/// in order and gives them back. When none is free the decoder stops where it is and is queued
/// again by the stage once one is: no worker waits, and memory stays at those buffers.
final class PassOutput: Sendable {
    static let bufferCount = 4
    /// A buffer is handed over once it holds this much.
    static let chunkSize = 1 << 20

    // SAFETY: the memory is owned by this `PassOutput` and used by one side at a time: the
    // decoder while it fills it, the stage from its hand-over until it is given back.
    struct Buffer: @unchecked Sendable {
        let memory: UnsafeMutableRawBufferPointer
        var count = 0
    }

    /// What the stage keeps: only the one job draining at a time touches it.
    // SAFETY: used by the draining job alone (`State.draining` admits one at a time), and read
    // by the pass's end only after the last drain finished (`whenDrained`).
    final class Sink: @unchecked Sendable {
        var hasher = DigestVerifier()
        /// The uncompressed stream, written as it comes; nil once it could not be (no room).
        var spans: ContentStore.LayerSpansFile?
        var spansWritten: Int64 = 0
        /// A gzip layer's members are checked here, beside the decompression.
        var memberCheck: GzipMemberCheck?
        /// Set when a member's output does not match its trailer.
        var damage: String?

        init(spans: ContentStore.LayerSpansFile?, checksMembers: Bool) {
            self.spans = spans
            memberCheck = checksMembers ? GzipMemberCheck() : nil
        }
    }

    struct Parked: Sendable {
        var resume: @Sendable () -> Void
        /// Called instead when the queue stops first.
        var cancelled: @Sendable () -> Void
    }

    private struct State {
        var free: [Buffer]
        var filled: [Buffer] = []
        var draining = false
        /// The decoder, stopped for want of a free buffer.
        var parked: Parked?
        /// The pass's end, once the decoder is done: called when the last buffer is drained.
        var whenDrained: (@Sendable () -> Void)?
        /// gzip members the decoder saw end, not yet checked: each is known before the buffer
        /// holding its last byte is handed over.
        var memberEnds: [GzipMemberEnd] = []
    }

    private let state: Mutex<State>
    private let allocations: [Buffer]
    let sink: Sink
    private let fetcher: BlobFetcher
    private let digest: Digest
    /// The most spans the cache may hold beside the blob; nil when it is not bounded.
    private let spansRoom: Int64?
    /// The buffer the decoder is filling.
    // SAFETY: touched by the decoder's step (one at a time, each queued by the one before), or by
    // the stage while the decoder is parked, before it queues the decoder again.
    private nonisolated(unsafe) var current: Buffer?
    /// Output the decoder gave with no buffer to take it: the pass cannot be trusted.
    // SAFETY: set by the decoder's step, read by the pass's end, which runs after the last step.
    private(set) nonisolated(unsafe) var lostOutput = false

    init(spans: ContentStore.LayerSpansFile?, fetcher: BlobFetcher, layer: LayerSpec) {
        // A buffer takes a whole chunk plus the decoder's largest piece, which is copied whole.
        let capacity = Self.chunkSize + LayerDecoder.outputBufferSize
        allocations = (0..<Self.bufferCount).map { _ in Buffer(memory: .allocate(byteCount: capacity, alignment: 4096)) }
        state = Mutex(State(free: Array(allocations.dropFirst())))
        current = allocations.first
        sink = Sink(spans: spans, checksMembers: layer.compression == .gzip)
        self.fetcher = fetcher
        self.digest = layer.digest
        spansRoom = fetcher.limits.map { $0.maxBytes - layer.size }
    }

    deinit {
        for buffer in allocations { buffer.memory.deallocate() }
    }

    /// gzip members that ended by the decoder's output so far: they are checked as the stage
    /// reaches their end.
    func expect(_ ends: [GzipMemberEnd]) {
        guard !ends.isEmpty else { return }
        state.withLock { $0.memberEnds += ends }
    }

    /// Checks the members that end where the stream ended; call once the last drain is done.
    func checkLastMembers() {
        checkMembers(UnsafeRawBufferPointer(start: nil, count: 0), at: sink.hasher.byteCount)
        if sink.memberCheck != nil, state.withLock({ !$0.memberEnds.isEmpty }) {
            sink.damage = "a gzip member ends past the stream"
        }
    }

    /// Copies a piece of the decoder's output in; returns false when the decoder must stop:
    /// the piece is taken, but no buffer is free for the next one (`park` then).
    func append(_ piece: UnsafeRawBufferPointer) -> Bool {
        guard var buffer = current else {
            // Not reached: the decoder stops at the hand-over that leaves it without a buffer.
            lostOutput = true
            return false
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer.memory[buffer.count..<buffer.count + piece.count]).copyMemory(from: piece)
        buffer.count += piece.count
        guard buffer.count >= Self.chunkSize else {
            current = buffer
            return true
        }
        current = nil
        hand(over: buffer)
        current = state.withLock { $0.free.popLast() }
        return current != nil
    }

    /// Queues the decoder's next step once a buffer is free for it (at once when one is
    /// already: queued all the same, so that a pass over a local blob does not recurse).
    func park(_ parked: Parked) {
        let now = state.withLock { state -> Bool in
            if let buffer = state.free.popLast() {
                current = buffer
                return true
            }
            state.parked = parked
            return false
        }
        if now { resume(parked) }
    }

    private func resume(_ parked: Parked) {
        if !fetcher.queue.enqueue(.reader, dropped: parked.cancelled, parked.resume) { parked.cancelled() }
    }

    /// The decoder is done: `body` runs once everything handed over is hashed and written.
    /// `keeping`: whether what the decoder has not handed over yet counts (not after a failure).
    func finish(keeping: Bool, then body: @escaping @Sendable () -> Void) {
        if keeping, let buffer = current, buffer.count > 0 {
            current = nil
            hand(over: buffer)
        }
        let now = state.withLock { state -> Bool in
            guard state.draining || !state.filled.isEmpty else { return true }
            state.whenDrained = body
            return false
        }
        if now { body() }
    }

    private func hand(over buffer: Buffer) {
        let start = state.withLock { state -> Bool in
            state.filled.append(buffer)
            guard !state.draining else { return false }
            state.draining = true
            return true
        }
        if start { scheduleDrain() }
    }

    private func scheduleDrain() {
        // A drain the queue refuses (shutting down) still ends the pass: the pass fails then,
        // as its own next step is refused too.
        let queued = fetcher.queue.enqueue(.reader, dropped: { [self] in drain() }) { [self] in drain() }
        if !queued { drain() }
    }

    private func drain() {
        enum Next { case buffer(Buffer), done((@Sendable () -> Void)?) }
        while true {
            let next = state.withLock { state -> Next in
                if !state.filled.isEmpty { return .buffer(state.filled.removeFirst()) }
                state.draining = false
                defer { state.whenDrained = nil }
                return .done(state.whenDrained)
            }
            guard case .buffer(let buffer) = next else {
                if case .done(let body?) = next { body() }
                return
            }
            consume(UnsafeRawBufferPointer(rebasing: buffer.memory[..<buffer.count]))
            let parked = state.withLock { state -> Parked? in
                guard let parked = state.parked else {
                    state.free.append(Buffer(memory: buffer.memory))
                    return nil
                }
                // The parked decoder is not running: the buffer is its own from here.
                state.parked = nil
                current = Buffer(memory: buffer.memory)
                return parked
            }
            if let parked { resume(parked) }
        }
    }

    /// Feeds `bytes`, the output at `position`, to the member check, ending each member whose
    /// end falls among them.
    private func checkMembers(_ bytes: UnsafeRawBufferPointer, at position: Int64) {
        guard var check = sink.memberCheck else { return }
        var done = 0
        while let end = state.withLock({ state -> GzipMemberEnd? in
            guard let first = state.memberEnds.first, first.uncompressedOffset <= position + Int64(bytes.count) else { return nil }
            return state.memberEnds.removeFirst()
        }) {
            let upTo = max(done, Int(end.uncompressedOffset - position))
            check.update(UnsafeRawBufferPointer(rebasing: bytes[done..<upTo]))
            if !check.endMember(end), sink.damage == nil {
                sink.damage = "a gzip member's CRC or size does not match its output (ending at \(end.uncompressedOffset))"
            }
            done = upTo
        }
        check.update(UnsafeRawBufferPointer(rebasing: bytes[done...]))
        sink.memberCheck = check
    }

    private func consume(_ bytes: UnsafeRawBufferPointer) {
        checkMembers(bytes, at: sink.hasher.byteCount)
        sink.hasher.update(bytes)
        guard let spans = sink.spans else { return }
        if let spansRoom, sink.spansWritten + Int64(bytes.count) > spansRoom {
            // Beyond what the cache may hold with its blob: the layer is read from its checkpoints.
            spans.abandon()
            sink.spans = nil
            return
        }
        do throws(CacheError) {
            try spans.file.write(bytes, at: sink.spansWritten)
            sink.spansWritten += Int64(bytes.count)
            // Spans take room as a download does: evicting least recently used blobs.
            _ = fetcher.makeRoom(for: digest, bytes: Int64(bytes.count))
        } catch {
            // The cache's disk is full: the layer is read from its checkpoints alone.
            spans.abandon()
            sink.spans = nil
        }
    }
}
