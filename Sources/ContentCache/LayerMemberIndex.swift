import Dispatch
import LayerView
import Logging
import OCI
import Synchronization

/// The members of each layer's tar, for the `files/` view: from the cache directory
/// (`layers/<hex>.files`), or from one walk over the layer's uncompressed stream made now.
///
/// The walk reads through `LayerReader`'s random access: it reads headers and skips every
/// member's data, so a read starts at the checkpoint before the next header and decompresses
/// only the spans that hold headers (a layer of a few large files costs a few spans). The first
/// read after a skip is small (`firstChunk`): the next header may be all the walk needs there.
/// Reads that go on from where the last one ended run to the next checkpoint: the read after
/// it starts there afresh, where a read ending mid-span would leave the decoder past the next
/// one's start (it decodes ahead in pieces) and make it decompress the span again. It runs
/// on the fetcher's worker pool, one step queued by the reply of the one before, and saves what
/// it found (write, fsync, rename) so that the tar is walked once per machine.
public final class LayerMemberIndex: Sendable {
    public typealias Members = Result<[TarEntry], BlobReadError>

    let layers: LayerReader
    let logger: Logger
    /// The most uncompressed bytes asked of the reader at once while walking headers.
    static let walkChunk = 4 << 20
    /// The bytes asked for at a new place in the stream (its start, or after a skip).
    static let firstChunk = 64 << 10

    /// Callers waiting for a walk, by layer; a layer is here only while its walk runs.
    let walks = Mutex<[Digest: [@Sendable (Members) -> Void]]>([:])

    public init(layers: LayerReader, logger: Logger) {
        self.layers = layers
        self.logger = logger
    }

    /// The layer's members, waiting at most `bound` for a walk to end (a walk that takes
    /// longer goes on, and saves what it finds for the next caller). Never call it on a
    /// fetch worker.
    public func members(of layer: LayerSpec, waitingAtMost bound: Duration) -> Members {
        let answer = Mutex<Members?>(nil)
        let done = DispatchSemaphore(value: 0)
        withMembers(of: layer) { result in
            answer.withLock { $0 = result }
            done.signal()
        }
        let (seconds, attoseconds) = bound.components
        let nanoseconds = Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000)
        if done.wait(timeout: .now() + .nanoseconds(nanoseconds)) == .timedOut {
            return .failure(.local("layer \(layer.digest): its members are not known after \(bound) (the walk over it goes on)"))
        }
        return answer.withLock { $0! }
    }

    /// Calls `body` once with the layer's members, from a worker.
    func withMembers(of layer: LayerSpec, _ body: @escaping @Sendable (Members) -> Void) {
        let starts = walks.withLock { walks -> Bool in
            if walks[layer.digest] != nil {
                walks[layer.digest]!.append(body)
                return false
            }
            walks[layer.digest] = [body]
            return true
        }
        guard starts else { return }
        let fetcher = layers.fetcher
        let queued = fetcher.localQueue.enqueue(.reader, dropped: { [self] in finish(layer, .failure(.cancelled)) }) { [self] in
            if let saved = fetcher.store.loadLayerMembers(layer.digest) { return finish(layer, .success(saved)) }
            // An uncompressed layer is its blob: no pass over it is needed to know its size.
            if layer.compression == .none { return step(Walk(layer: layer, size: layer.size, checkpoints: [0])) }
            layers.withIndex(of: layer) { [self] index in
                switch index {
                case .failure(let error): finish(layer, .failure(error))
                case .success(let index):
                    step(Walk(layer: layer, size: index.uncompressedSize, checkpoints: index.checkpoints.map(\.uncompressedOffset)))
                }
            }
        }
        if !queued { finish(layer, .failure(.cancelled)) }
    }

    /// One walk: the parser and what it found so far. Each step is queued by the one before.
    // SAFETY: used by one step at a time; each step is queued by the reply of the one before.
    final class Walk: @unchecked Sendable {
        let layer: LayerSpec
        let size: Int64
        /// Where reads may start decompressing afresh, in order.
        let checkpoints: [Int64]
        var parser = TarReader()
        var members: [TarEntry] = []
        /// The next read starts where the last one ended.
        var continues = false

        init(layer: LayerSpec, size: Int64, checkpoints: [Int64]) {
            self.layer = layer
            self.size = size
            self.checkpoints = checkpoints
        }

        /// Where a read from `offset` ends: `firstChunk` on at a new place, else the next
        /// checkpoint, at most `walkChunk` on.
        func readEnd(from offset: Int64) -> Int64 {
            guard continues else { return min(offset + Int64(LayerMemberIndex.firstChunk), size) }
            var low = 0, high = checkpoints.count
            while low < high {
                let middle = (low + high) / 2
                if checkpoints[middle] <= offset { low = middle + 1 } else { high = middle }
            }
            let nextCheckpoint = low < checkpoints.count ? checkpoints[low] : size
            return min(nextCheckpoint, offset + Int64(LayerMemberIndex.walkChunk), size)
        }
    }

    private func step(_ walk: Walk) {
        let layer = walk.layer
        // What the parser does not need is never read: the next read starts at a header.
        if walk.parser.dataAhead > 0 {
            walk.parser.skip(min(walk.parser.dataAhead, walk.size - walk.parser.position))
            walk.continues = false
        }
        let offset = walk.parser.position
        guard offset < walk.size && !walk.parser.isFinished else {
            do throws(TarError) {
                try walk.parser.finish()
            } catch {
                return finish(layer, .failure(.undecodable(layer.digest, "its tar: \(error)")))
            }
            return save(walk)
        }
        let count = Int(walk.readEnd(from: offset) - offset)
        layers.read(layer, offset: offset, count: count) { [self] result in
            let outcome: Result<Void, BlobReadError> = result.flatMap { bytes in
                guard bytes.count == count else { return .failure(.undecodable(layer.digest, "a short read of its tar")) }
                do throws(TarError) {
                    try walk.parser.feed(bytes) { walk.members.append($0) }
                } catch {
                    return .failure(.undecodable(layer.digest, "its tar: \(error)"))
                }
                return .success(())
            }
            if case .failure(let error) = outcome { return finish(layer, .failure(error)) }
            walk.continues = true
            let queued = layers.fetcher.queue.enqueue(.reader, dropped: { [self] in finish(layer, .failure(.cancelled)) }) { [self] in
                step(walk)
            }
            if !queued { finish(layer, .failure(.cancelled)) }
        }
    }

    /// Keeps the members in the cache directory (they take room as a download does); were that
    /// impossible, this mount still has them and the next one walks the layer again.
    private func save(_ walk: Walk) {
        let fetcher = layers.fetcher
        do throws(CacheError) {
            let saved = try fetcher.store.saveLayerMembers(walk.members, of: walk.layer.digest)
            _ = fetcher.makeRoom(for: walk.layer.digest, bytes: saved)
        } catch {
            logger.warning("cannot keep a layer's members", metadata: ["digest": "\(walk.layer.digest)", "error": "\(error)"])
        }
        finish(walk.layer, .success(walk.members))
    }

    private func finish(_ layer: LayerSpec, _ result: Members) {
        if case .failure(let error) = result, error != .cancelled {
            logger.error("the files of a layer cannot be shown", metadata: ["digest": "\(layer.digest)", "error": "\(error)"])
        }
        let waiters = walks.withLock { $0.removeValue(forKey: layer.digest) ?? [] }
        for waiter in waiters { waiter(result) }
    }
}
