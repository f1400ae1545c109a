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

/// One decoder working through a layer for the reads waiting on it, on a worker.
// SAFETY: `position` is read and changed only under the reader's state lock.
final class LayerDriver: @unchecked Sendable {
    /// Where its output stands; nil until it has picked the read it starts for.
    var position: Int64?
}

/// The reads of one layer and the decoders serving them: up to `LayerReader.driversPerLayer`
/// drivers at once, each from its own checkpoint, so that a sequential reader whose readahead
/// reaches past the next checkpoint keeps more than one core decompressing.
// SAFETY: `pending`, `drivers` and `idle` are read and changed only under the reader's state lock; a decoder taken out of `idle` belongs to the driver that took it.
final class LayerSession: @unchecked Sendable {
    /// The index file, open: checkpoints' windows are read from it (even once evicted).
    let windows: OpenFile?
    var pending: [LayerRead] = []
    var drivers: [LayerDriver] = []
    /// The most drivers that worked at once (for tests).
    var mostDrivers = 0
    /// Where the last read left the decoder: a reader going on sequentially continues it.
    var idle: LayerDecoder?
    /// A window in the index file proved damaged: every decoder starts at the layer's start.
    var windowsDamaged = false

    init(windows: OpenFile?) { self.windows = windows }

    /// Where a decoder serving `offset` starts: the checkpoint before it.
    func start(for offset: Int64, in index: LayerIndex) -> LayerCheckpoint {
        windowsDamaged ? .start : index.checkpoint(before: offset)
    }

    /// Whether a driver other than `driver` reaches `offset` without passing a checkpoint
    /// (one not yet started is counted as reaching everything: it is about to pick).
    func isCovered(_ offset: Int64, in index: LayerIndex, except driver: LayerDriver?) -> Bool {
        drivers.contains { other in
            guard other !== driver else { return false }
            guard let position = other.position else { return true }
            return position <= offset && start(for: offset, in: index).uncompressedOffset <= position
        }
    }

    /// A waiting read no driver reaches, when there is room for another driver: it is given
    /// one, returned to be scheduled.
    func newDriverIfUseful(in index: LayerIndex) -> LayerDriver? {
        guard drivers.count < LayerReader.driversPerLayer,
              pending.contains(where: { !isCovered($0.next, in: index, except: nil) }) else { return nil }
        let driver = LayerDriver()
        drivers.append(driver)
        mostDrivers = max(mostDrivers, drivers.count)
        return driver
    }
}

extension LayerReader {
    /// Reads `count` bytes at `offset` of the layer's uncompressed tar. `reply` is called once:
    /// on the calling thread when the bytes are local (an empty read, kept spans), else from a
    /// worker; the bytes are valid during the call.
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

    /// A layer that keeps its uncompressed stream is read from it, at once and into a read
    /// buffer, as a complete blob is (local bytes, nothing to decompress); were the file evicted
    /// meanwhile, from its checkpoints.
    private func readSpans(_ layer: LayerSpec, index: LayerIndex, range: Range<Int64>, reply: @escaping Reply) {
        let served = fetcher.store.openLayerSpans(layer.digest).flatMap { spans in
            fetcher.buffers.withBuffer(count: range.count) { buffer -> Bool in
                guard let filled = try? spans.read(into: buffer, offset: range.lowerBound), filled == range.count else { return false }
                reply(.success(UnsafeRawBufferPointer(buffer)))
                return true
            }
        } ?? false
        if !served { enqueue(LayerRead(range: range, reply: reply), of: layer, index: index) }
    }

    /// The most decoders that have worked on the layer at once since its index was loaded.
    package func mostDriversAtOnce(of layer: LayerSpec) -> Int {
        state.withLock { state in session(of: layer, in: state)?.mostDrivers ?? 0 }
    }

    private func session(of layer: LayerSpec, in state: State) -> LayerSession? {
        if case .indexed(_, let session)? = state.layers[layer.digest] { return session }
        return nil
    }

    private func enqueue(_ read: LayerRead, of layer: LayerSpec, index: LayerIndex) {
        let start = state.withLock { state -> LayerDriver?? in
            guard let session = session(of: layer, in: state) else { return .none }
            session.pending.append(read)
            return .some(session.newDriverIfUseful(in: index))
        }
        guard let start else { return read.reply(.failure(.cancelled)) }
        if let driver = start { scheduleDrive(layer, index: index, driver: driver) }
    }

    private func scheduleDrive(_ layer: LayerSpec, index: LayerIndex, driver: LayerDriver) {
        let queued = fetcher.queue.enqueue(.reader, dropped: { [self] in failPending(layer, .cancelled, stopping: driver) }) { [self] in
            drive(layer, index: index, driver: driver)
        }
        if !queued { failPending(layer, .cancelled, stopping: driver) }
    }

    /// Picks the waiting read that starts first among those no other driver reaches, and the
    /// decoder for it: the one the last read left, when it stands between that read and the
    /// checkpoint before it, else a new one from that checkpoint. With no such read the
    /// driver ends.
    private func drive(_ layer: LayerSpec, index: LayerIndex, driver: LayerDriver) {
        typealias Plan = (checkpoint: LayerCheckpoint, kept: LayerDecoder?, windows: OpenFile?, another: LayerDriver?)
        let plan = state.withLock { state -> Plan? in
            guard let session = session(of: layer, in: state) else { return nil }
            let free = session.pending.filter { !session.isCovered($0.next, in: index, except: driver) }
            guard let first = free.min(by: { $0.next < $1.next }) else {
                session.drivers.removeAll { $0 === driver }
                return nil
            }
            let checkpoint = session.start(for: first.next, in: index)
            var kept: LayerDecoder?
            if let idle = session.idle, (checkpoint.uncompressedOffset...first.next).contains(idle.uncompressedPosition) {
                kept = idle
                session.idle = nil
                state.idleDecoders.removeAll { $0 == layer.digest }
            }
            driver.position = kept?.uncompressedPosition ?? checkpoint.uncompressedOffset
            return (checkpoint, kept, session.windows, session.newDriverIfUseful(in: index))
        }
        guard let plan else { return }
        if let another = plan.another { scheduleDrive(layer, index: index, driver: another) }
        if let kept = plan.kept { return decodeStep(layer, index: index, decoder: kept, driver: driver) }
        var restored = plan.checkpoint
        if let loaded = fetcher.store.loadWindow(of: plan.checkpoint, from: plan.windows) {
            restored = loaded
        } else {
            // The index file was damaged after the pass: the start always serves (slowly), and
            // the next mount makes the pass again.
            logger.warning("a layer's index file is damaged; reading from the layer's start", metadata: ["digest": "\(layer.digest)"])
            fetcher.store.removeLayerFiles(layer.digest)
            state.withLock { state in
                session(of: layer, in: state)?.windowsDamaged = true
                driver.position = 0
            }
            restored = .start
        }
        do throws(LayerDecodeError) {
            decodeStep(layer, index: index, decoder: try LayerDecoder(compression: layer.compression, from: restored), driver: driver)
        } catch {
            failPending(layer, .undecodable(layer.digest, error.description), stopping: nil)
            scheduleDrive(layer, index: index, driver: driver)
        }
    }

    /// Feeds the decoder the next compressed bytes and hands its output to every read that
    /// waits for it; stops once no waiting read is just ahead of the output.
    private func decodeStep(_ layer: LayerSpec, index: LayerIndex, decoder: LayerDecoder, driver: LayerDriver) {
        let offset = decoder.compressedPosition
        let count = Int(min(Int64(Self.readChunk), layer.size - offset))
        guard count > 0 else {
            // The stream ended before the reads it was serving: the index does not describe it.
            failPending(layer, .undecodable(layer.digest, "the stream ends before its indexed size"), stopping: nil)
            return scheduleDrive(layer, index: index, driver: driver)
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
                        wanted = deliver(piece, endingAt: decoder.uncompressedPosition, of: layer, index: index, by: driver,
                                         answering: &answered)
                        return wanted
                    }
                } catch {
                    failure = .undecodable(layer.digest, error.description)
                }
            }
            for read in answered { read.buffer.withUnsafeBytes { read.reply(.success($0)) } }
            if let failure {
                failPending(layer, failure, stopping: nil)
                return scheduleDrive(layer, index: index, driver: driver)
            }
            if wanted && decoder.uncompressedPosition < index.uncompressedSize {
                let queued = fetcher.queue.enqueue(.reader, dropped: { [self] in failPending(layer, .cancelled, stopping: driver) }) { [self] in
                    decodeStep(layer, index: index, decoder: decoder, driver: driver)
                }
                if !queued { failPending(layer, .cancelled, stopping: driver) }
            } else {
                keepIdle(decoder, of: layer)
                scheduleDrive(layer, index: index, driver: driver)
            }
        }
    }

    /// Copies a piece of output into the reads it continues; returns whether a waiting read
    /// lies ahead with no checkpoint between the output and it, and no other driver before it,
    /// so that continuing beats starting afresh.
    private func deliver(_ piece: UnsafeRawBufferPointer, endingAt end: Int64, of layer: LayerSpec, index: LayerIndex,
                         by driver: LayerDriver, answering answered: inout [LayerRead]) -> Bool {
        let start = end - Int64(piece.count)
        return state.withLock { state in
            guard let session = session(of: layer, in: state) else { return false }
            driver.position = end
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
            return session.pending.contains { read in
                read.next >= end && session.start(for: read.next, in: index).uncompressedOffset <= end
                    && !session.drivers.contains { other in
                        other !== driver && other.position.map { (end...read.next).contains($0) } ?? false
                    }
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

    /// Fails every read waiting on the layer; `stopping`: a driver that will not look again.
    private func failPending(_ layer: LayerSpec, _ error: BlobReadError, stopping driver: LayerDriver?) {
        let failed = state.withLock { state -> [LayerRead] in
            guard let session = session(of: layer, in: state) else { return [] }
            defer {
                session.pending = []
                if let driver { session.drivers.removeAll { $0 === driver } }
            }
            return session.pending
        }
        if error != .cancelled {
            logger.warning("layer read failed", metadata: ["digest": "\(layer.digest)", "error": "\(error)"])
        }
        for read in failed { read.reply(.failure(error)) }
    }
}
