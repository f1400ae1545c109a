import FoundationEssentials
import LayerView
import Logging
import OCI
import Synchronization

/// A read of a layer's uncompressed stream waiting for its bytes, which come in order from a
/// decoder: `next` is the first it still lacks.
// SAFETY: `next` and `buffer` change only under the reader's state lock.
final class LayerRead: @unchecked Sendable {
    let range: Range<Int64>
    var next: Int64
    var buffer: [UInt8]
    let reply: LayerReader.Reply

    init(range: Range<Int64>, reply: @escaping LayerReader.Reply) {
        self.range = range
        self.next = range.lowerBound
        self.buffer = [UInt8](repeating: 0, count: range.count)
        self.reply = reply
    }
}

/// The reads of one layer and the decoder serving them: one driver at a time, on a worker.
// SAFETY: `pending`, `driving` and `idle` are read and changed only under the reader's state lock; a decoder taken out of `idle` belongs to the driver that took it.
final class LayerSession: @unchecked Sendable {
    /// The index file, open: checkpoints' windows are read from it (even once evicted).
    let windows: OpenFile?
    var pending: [LayerRead] = []
    var driving = false
    /// Where the last read left the decoder: a reader going on sequentially continues it.
    var idle: LayerDecoder?
    /// A window in the index file proved damaged: every decoder starts at the layer's start.
    var windowsDamaged = false

    init(windows: OpenFile?) { self.windows = windows }
}

extension LayerReader {
    /// Reads `count` bytes at `offset` of the layer's uncompressed tar. `reply` is called once,
    /// from a worker (or at once for an empty read); the bytes are valid during the call.
    public func read(_ layer: LayerSpec, offset: Int64, count: Int, reply: @escaping Reply) {
        if layer.compression == .none {
            return fetcher.read(layer.digest, size: layer.size, offset: offset, count: count, reply: reply)
        }
        withIndex(of: layer) { [self] result in
            switch result {
            case .failure(let error):
                reply(.failure(error))
            case .success(let index):
                let end = min(offset + Int64(count), index.uncompressedSize)
                guard offset >= 0, offset < end else { return reply(.success(UnsafeRawBufferPointer(start: nil, count: 0))) }
                if index.keepsSpans {
                    readSpans(layer, index: index, range: offset..<end, reply: reply)
                } else {
                    enqueue(LayerRead(range: offset..<end, reply: reply), of: layer, index: index)
                }
            }
        }
    }

    /// A layer that keeps its uncompressed stream is read from it; were the file evicted
    /// meanwhile, from its checkpoints.
    private func readSpans(_ layer: LayerSpec, index: LayerIndex, range: Range<Int64>, reply: @escaping Reply) {
        let queued = fetcher.localQueue.enqueue(.reader, dropped: { reply(.failure(.cancelled)) }) { [self] in
            guard let spans = fetcher.store.openLayerSpans(layer.digest) else {
                return enqueue(LayerRead(range: range, reply: reply), of: layer, index: index)
            }
            var bytes = [UInt8](repeating: 0, count: range.count)
            let filled = bytes.withUnsafeMutableBytes { buffer in (try? spans.read(into: buffer, offset: range.lowerBound)) ?? -1 }
            guard filled == range.count else { return enqueue(LayerRead(range: range, reply: reply), of: layer, index: index) }
            bytes.withUnsafeBytes { reply(.success($0)) }
        }
        if !queued { reply(.failure(.cancelled)) }
    }

    private func session(of layer: LayerSpec, in state: State) -> LayerSession? {
        if case .indexed(_, let session)? = state.layers[layer.digest] { return session }
        return nil
    }

    private func enqueue(_ read: LayerRead, of layer: LayerSpec, index: LayerIndex) {
        let startDriver = state.withLock { state -> Bool? in
            guard let session = session(of: layer, in: state) else { return nil }
            session.pending.append(read)
            defer { session.driving = true }
            return !session.driving
        }
        guard let startDriver else { return read.reply(.failure(.cancelled)) }
        if startDriver { scheduleDrive(layer, index: index) }
    }

    private func scheduleDrive(_ layer: LayerSpec, index: LayerIndex) {
        let queued = fetcher.queue.enqueue(.reader, dropped: { [self] in failPending(layer, .cancelled, stopDriving: true) }) { [self] in
            drive(layer, index: index)
        }
        if !queued { failPending(layer, .cancelled, stopDriving: true) }
    }

    /// Picks the waiting read that starts first and the decoder for it: the one the last read
    /// left, when it stands between that read and the checkpoint before it, else a new one
    /// from that checkpoint.
    private func drive(_ layer: LayerSpec, index: LayerIndex) {
        let plan = state.withLock { state -> (start: Int64, kept: LayerDecoder?, windows: OpenFile?, damaged: Bool)? in
            guard let session = session(of: layer, in: state) else { return nil }
            guard let first = session.pending.min(by: { $0.next < $1.next }) else {
                session.driving = false
                return nil
            }
            defer { session.idle = nil }
            state.idleDecoders.removeAll { $0 == layer.digest }
            return (first.next, session.idle, session.windows, session.windowsDamaged)
        }
        guard let plan else { return }
        let checkpoint = plan.damaged ? .start : index.checkpoint(before: plan.start)
        if let kept = plan.kept, (checkpoint.uncompressedOffset...plan.start).contains(kept.uncompressedPosition) {
            return decodeStep(layer, index: index, decoder: kept)
        }
        var restored = checkpoint
        if let loaded = fetcher.store.loadWindow(of: checkpoint, from: plan.windows) {
            restored = loaded
        } else {
            // The index file was damaged after the pass: the start always serves (slowly), and
            // the next mount makes the pass again.
            logger.warning("a layer's index file is damaged; reading from the layer's start", metadata: ["digest": "\(layer.digest)"])
            fetcher.store.removeLayerFiles(layer.digest)
            state.withLock { state in session(of: layer, in: state)?.windowsDamaged = true }
            restored = .start
        }
        do throws(LayerDecodeError) {
            decodeStep(layer, index: index, decoder: try LayerDecoder(compression: layer.compression, from: restored))
        } catch {
            failPending(layer, .undecodable(layer.digest, error.description), stopDriving: false)
            scheduleDrive(layer, index: index)
        }
    }

    /// Feeds the decoder the next compressed bytes and hands its output to every read that
    /// waits for it; stops once no waiting read is just ahead of the output.
    private func decodeStep(_ layer: LayerSpec, index: LayerIndex, decoder: LayerDecoder) {
        let offset = decoder.compressedPosition
        let count = Int(min(Int64(Self.readChunk), layer.size - offset))
        guard count > 0 else {
            // The stream ended before the reads it was serving: the index does not describe it.
            failPending(layer, .undecodable(layer.digest, "the stream ends before its indexed size"), stopDriving: false)
            return scheduleDrive(layer, index: index)
        }
        fetcher.read(layer.digest, size: layer.size, offset: offset, count: count) { [self] result in
            var answered: [LayerRead] = []
            var wanted = true
            var failure: BlobReadError?
            switch result {
            case .failure(let error):
                failure = error
            case .success(let bytes):
                do throws(LayerDecodeError) {
                    try decoder.feed(bytes, ends: offset + Int64(count) == layer.size) { piece in
                        wanted = deliver(piece, endingAt: decoder.uncompressedPosition, of: layer, index: index, answering: &answered)
                        return wanted
                    }
                } catch {
                    failure = .undecodable(layer.digest, error.description)
                }
            }
            for read in answered { read.buffer.withUnsafeBytes { read.reply(.success($0)) } }
            if let failure {
                failPending(layer, failure, stopDriving: false)
                return scheduleDrive(layer, index: index)
            }
            if wanted && decoder.uncompressedPosition < index.uncompressedSize {
                let queued = fetcher.queue.enqueue(.reader, dropped: { [self] in failPending(layer, .cancelled, stopDriving: true) }) { [self] in
                    decodeStep(layer, index: index, decoder: decoder)
                }
                if !queued { failPending(layer, .cancelled, stopDriving: true) }
            } else {
                keepIdle(decoder, of: layer)
                scheduleDrive(layer, index: index)
            }
        }
    }

    /// Copies a piece of output into the reads it continues; returns whether a waiting read
    /// lies ahead with no checkpoint between the output and it, so that continuing beats
    /// starting afresh.
    private func deliver(_ piece: UnsafeRawBufferPointer, endingAt end: Int64, of layer: LayerSpec, index: LayerIndex,
                         answering answered: inout [LayerRead]) -> Bool {
        let start = end - Int64(piece.count)
        return state.withLock { state in
            guard let session = session(of: layer, in: state) else { return false }
            var done: [ObjectIdentifier] = []
            for read in session.pending where read.next >= start && read.next < end {
                let upTo = min(read.range.upperBound, end)
                read.buffer.withUnsafeMutableBytes { buffer in
                    let target = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(read.next - read.range.lowerBound)..<Int(upTo - read.range.lowerBound)])
                    target.copyMemory(from: UnsafeRawBufferPointer(rebasing: piece[Int(read.next - start)..<Int(upTo - start)]))
                }
                read.next = upTo
                if upTo == read.range.upperBound {
                    answered.append(read)
                    done.append(ObjectIdentifier(read))
                }
            }
            if !done.isEmpty { session.pending.removeAll { done.contains(ObjectIdentifier($0)) } }
            let restarts = !session.windowsDamaged
            return session.pending.contains { read in
                read.next >= end && (!restarts || index.checkpoint(before: read.next).uncompressedOffset <= end)
            }
        }
    }

    private func keepIdle(_ decoder: LayerDecoder, of layer: LayerSpec) {
        state.withLock { state in
            guard let session = session(of: layer, in: state) else { return }
            session.idle = decoder
            state.idleDecoders.removeAll { $0 == layer.digest }
            state.idleDecoders.append(layer.digest)
            // Each holds a window (zstd: up to its frame's window size): only a few are kept.
            while state.idleDecoders.count > Self.idleDecodersKept {
                let oldest = state.idleDecoders.removeFirst()
                if case .indexed(_, let other)? = state.layers[oldest] { other.idle = nil }
            }
        }
    }

    /// Fails every read waiting on the layer; `stopDriving` when no driver will look again.
    private func failPending(_ layer: LayerSpec, _ error: BlobReadError, stopDriving: Bool) {
        let failed = state.withLock { state -> [LayerRead] in
            guard let session = session(of: layer, in: state) else { return [] }
            defer {
                session.pending = []
                if stopDriving { session.driving = false }
            }
            return session.pending
        }
        if error != .cancelled {
            logger.warning("layer read failed", metadata: ["digest": "\(layer.digest)", "error": "\(error)"])
        }
        for read in failed { read.reply(.failure(error)) }
    }
}
