import Dispatch
import FoundationEssentials
import LayerView
import Logging
import OCI
import Synchronization

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// A layer the `layers/` view presents: its blob, how it is compressed, and the digest its
/// uncompressed stream must have (its diffID), when the metadata says.
public struct LayerSpec: Sendable, Hashable {
    public var digest: Digest
    /// The compressed blob's size.
    public var size: Int64
    public var compression: LayerCompression
    public var diffID: Digest?

    public init(digest: Digest, size: Int64, compression: LayerCompression, diffID: Digest?) {
        self.digest = digest
        self.size = size
        self.compression = compression
        self.diffID = diffID
    }
}

/// Serves the uncompressed tar of layers, decompressing the blob's verified bytes as they come
/// through the `BlobFetcher` (the same lazy block path as `blobs/`).
///
/// The first use of a layer runs one pass over it (`index(of:)`): it learns the exact size,
/// hashes the stream against the diffID and records checkpoints (`LayerDecoder`), kept in the
/// cache directory. Reads then start at the checkpoint before them and decompress at most one
/// span; a reader going on sequentially continues the decoder the last read left. All the
/// decompression runs on the fetcher's worker pool, never on the caller's thread.
public final class LayerReader: Sendable {
    public typealias Reply = BlobFetcher.Reply

    let fetcher: BlobFetcher
    let logger: Logger
    /// Output between checkpoints: the most a read decompresses before its first byte.
    let spacing: Int64
    /// Compressed bytes asked of the fetcher at once: at most a read buffer (1 MiB).
    static let passChunk = 1 << 20
    static let readChunk = 256 << 10
    /// Decoders kept between reads for readers that go on where they stopped.
    static let idleDecodersKept = 8
    /// Decoders working on one layer at once, each from its own checkpoint: a sequential reader's
    /// readahead (8 MiB) spans several checkpoints, and one inflater is the limit of such a read.
    package static let driversPerLayer = max(1, min(ProcessInfo.processInfo.activeProcessorCount, 4))

    enum LayerState {
        case indexing(waiters: [@Sendable (Result<LayerIndex, BlobReadError>) -> Void])
        case indexed(LayerIndex, LayerSession)
    }

    struct State {
        var layers: [Digest: LayerState] = [:]
        /// Sessions holding an idle decoder, least recently used first.
        var idleDecoders: [Digest] = []
    }

    let state = Mutex(State())

    public init(fetcher: BlobFetcher, logger: Logger, spacing: Int64 = 2 << 20) {
        self.fetcher = fetcher
        self.logger = logger
        self.spacing = max(spacing, 64 << 10)
    }

    /// The size an uncompressed layer has for sure, or the size a finished pass found; nil when
    /// only a pass can tell. Never waits.
    public func knownSize(of layer: LayerSpec) -> Int64? {
        if layer.compression == .none { return layer.size }
        return state.withLock { state in
            if case .indexed(let index, _)? = state.layers[layer.digest] { return index.uncompressedSize }
            return nil
        }
    }

    /// The layer's index: from memory, from the cache directory, or from a pass over the layer
    /// run now on the worker pool. Blocks the caller until it is there (never call it on a
    /// fetch worker).
    public func index(of layer: LayerSpec) -> Result<LayerIndex, BlobReadError> {
        if layer.compression == .none {
            return .success(LayerIndex(compression: .none, compressedSize: layer.size, uncompressedSize: layer.size, checkpoints: []))
        }
        let answer = Mutex<Result<LayerIndex, BlobReadError>?>(nil)
        let done = DispatchSemaphore(value: 0)
        withIndex(of: layer) { result in
            answer.withLock { $0 = result }
            done.signal()
        }
        done.wait()
        return answer.withLock { $0! }
    }

    /// Calls `body` with the layer's index once it is there (at once when it is in memory).
    func withIndex(of layer: LayerSpec, _ body: @escaping @Sendable (Result<LayerIndex, BlobReadError>) -> Void) {
        enum Next { case ready(LayerIndex), wait, load }
        let next: Next = state.withLock { state in
            switch state.layers[layer.digest] {
            case .indexed(let index, _)?: return .ready(index)
            case .indexing(var waiters)?:
                waiters.append(body)
                state.layers[layer.digest] = .indexing(waiters: waiters)
                return .wait
            case nil:
                state.layers[layer.digest] = .indexing(waiters: [body])
                return .load
            }
        }
        switch next {
        case .ready(let index): body(.success(index))
        case .wait: break
        case .load:
            let queued = fetcher.localQueue.enqueue(.reader, dropped: { [self] in finishIndexing(layer, .failure(.cancelled)) }) { [self] in
                if let saved = fetcher.store.loadLayerIndex(layer.digest, compressedSize: layer.size),
                   saved.index.compression == layer.compression {
                    finishIndexing(layer, .success(saved.index), windows: saved.windows)
                } else {
                    startPass(layer)
                }
            }
            if !queued { finishIndexing(layer, .failure(.cancelled)) }
        }
    }

    /// `windows`: the index file the checkpoints' windows are read from.
    private func finishIndexing(_ layer: LayerSpec, _ result: Result<LayerIndex, BlobReadError>, windows: OpenFile? = nil) {
        let waiters = state.withLock { state -> [@Sendable (Result<LayerIndex, BlobReadError>) -> Void] in
            guard case .indexing(let waiters)? = state.layers[layer.digest] else { return [] }
            switch result {
            case .success(let index): state.layers[layer.digest] = .indexed(index, LayerSession(windows: windows))
            // A failed pass is tried again by the next use: the remote may be back.
            case .failure: state.layers[layer.digest] = nil
            }
            return waiters
        }
        for waiter in waiters { waiter(result) }
    }

    // MARK: - The first pass

    /// One pass over a layer from its start. The decoder's side is used by one step at a time,
    /// each step queued by the one before; its output is hashed and kept by a `PassOutput`
    /// beside it.
    // SAFETY: used by one step at a time; each step is queued by the reply of the one before
    // (or by the output stage resuming it), and the end runs once both sides are done.
    final class Pass: @unchecked Sendable {
        let layer: LayerSpec
        let decoder: LayerDecoder
        let output: PassOutput
        /// The index file the windows go to as they are recorded; nil when it could not be
        /// written (then only checkpoints without a window are kept).
        var indexFile: ContentStore.LayerIndexFile?
        var checkpoints: [LayerCheckpoint] = [.start]
        let reader: BlobFetcher.ReaderID

        init(layer: LayerSpec, decoder: LayerDecoder, output: PassOutput, indexFile: ContentStore.LayerIndexFile?,
             reader: BlobFetcher.ReaderID) {
            self.layer = layer
            self.decoder = decoder
            self.output = output
            self.indexFile = indexFile
            self.reader = reader
        }
    }

    private func startPass(_ layer: LayerSpec) {
        let decoder: LayerDecoder
        do throws(LayerDecodeError) {
            // gzip members' CRCs are checked by the output stage, on the other core.
            decoder = try LayerDecoder(compression: layer.compression, recordingEvery: spacing, checkingMembers: false)
        } catch {
            return finishIndexing(layer, .failure(.undecodable(layer.digest, error.description)))
        }
        // The uncompressed stream is kept whole: the read that follows a pass (a `stat`, then a
        // read of the whole layer) then copies it instead of decompressing it all again.
        let spans = try? ContentStore.LayerSpansFile(store: fetcher.store, digest: layer.digest)
        let indexFile = try? ContentStore.LayerIndexFile(store: fetcher.store, digest: layer.digest)
        // Held while the pass runs: eviction spares the blob.
        let (reader, _) = fetcher.openReader(layer.digest)
        let output = PassOutput(spans: spans, fetcher: fetcher, layer: layer)
        passStep(Pass(layer: layer, decoder: decoder, output: output, indexFile: indexFile, reader: reader))
    }

    /// Decodes the next piece of the blob, from where the decoder stands (a step stopped for
    /// want of an output buffer goes on from inside the piece it had).
    private func passStep(_ pass: Pass) {
        let layer = pass.layer
        let offset = pass.decoder.compressedPosition
        let count = Int(min(Int64(Self.passChunk), layer.size - offset))
        guard count > 0 else {
            guard offset > 0 else { return endPass(pass, .failure(.undecodable(layer.digest, "the layer is empty"))) }
            // All input is in; the decoder may still hold output it had no room to give.
            return passDecoded(pass, decodeInPass(pass, UnsafeRawBufferPointer(start: nil, count: 0), ends: true))
        }
        fetcher.read(layer.digest, size: layer.size, offset: offset, count: count) { [self] result in
            let outcome: Result<Bool, BlobReadError> = result.flatMap { bytes in
                guard bytes.count == count else { return .failure(.local("layer \(layer.digest): short read of its blob")) }
                return decodeInPass(pass, bytes, ends: offset + Int64(count) == layer.size)
            }
            if case .success(false) = outcome, pass.decoder.compressedPosition == offset, count > 0 {
                // Neither stopped nor moved: the decoder cannot take these bytes.
                return endPass(pass, .failure(.undecodable(layer.digest, "the decoder makes no progress")))
            }
            passDecoded(pass, outcome)
        }
    }

    /// `outcome`: whether the step stopped for want of an output buffer.
    private func passDecoded(_ pass: Pass, _ outcome: Result<Bool, BlobReadError>) {
        switch outcome {
        case .failure(let error):
            endPass(pass, .failure(error))
        case .success(true):
            pass.output.park(PassOutput.Parked(resume: { [self] in passStep(pass) },
                                               cancelled: { [self] in endPass(pass, .failure(.cancelled)) }))
        case .success(false):
            if pass.decoder.compressedPosition == pass.layer.size { return endPass(pass, .success(())) }
            let queued = fetcher.queue.enqueue(.reader, dropped: { [self] in endPass(pass, .failure(.cancelled)) }) { [self] in passStep(pass) }
            if !queued { endPass(pass, .failure(.cancelled)) }
        }
    }

    /// Feeds the decoder; the success says whether it stopped early for want of an output
    /// buffer (then it goes on from `compressedPosition` once one is free).
    private func decodeInPass(_ pass: Pass, _ bytes: UnsafeRawBufferPointer, ends: Bool) -> Result<Bool, BlobReadError> {
        var stopped = false
        do throws(LayerDecodeError) {
            try pass.decoder.feed(bytes, ends: ends) { piece in
                pass.output.expect(pass.decoder.takeMemberEnds())
                stopped = !pass.output.append(piece)
                return !stopped
            }
        } catch {
            return .failure(.undecodable(pass.layer.digest, error.description))
        }
        pass.output.expect(pass.decoder.takeMemberEnds())
        // Windows go to disk as they come: a 4 GiB layer has 64 MiB of them.
        for checkpoint in pass.decoder.takeRecorded() {
            if let indexFile = pass.indexFile {
                do throws(CacheError) {
                    pass.checkpoints.append(try indexFile.place(checkpoint))
                    continue
                } catch {
                    indexFile.abandon()
                    pass.indexFile = nil
                    pass.checkpoints.removeAll { $0.kind == .deflateBlock }
                }
            }
            if checkpoint.kind == .streamStart { pass.checkpoints.append(checkpoint) }
        }
        return .success(stopped)
    }

    /// Ends the pass once its output stage has hashed and written everything handed to it.
    private func endPass(_ pass: Pass, _ outcome: Result<Void, BlobReadError>) {
        let keeping: Bool
        if case .success = outcome { keeping = true } else { keeping = false }
        pass.output.finish(keeping: keeping) { [self] in passEnded(pass, outcome) }
    }

    private func passEnded(_ pass: Pass, _ outcome: Result<Void, BlobReadError>) {
        let layer = pass.layer
        let sink = pass.output.sink
        defer { fetcher.closeReader(pass.reader, of: layer.digest) }
        let result = outcome.flatMap { () -> Result<LayerIndex, BlobReadError> in
            pass.output.checkLastMembers()
            if pass.output.lostOutput { return .failure(.local("layer \(layer.digest): the pass lost output")) }
            if let damage = sink.damage {
                return .failure(.undecodable(layer.digest, LayerDecodeError.corrupt(damage).description))
            }
            let found = sink.hasher.finalize()
            if let diffID = layer.diffID, found != diffID {
                return .failure(.undecodable(layer.digest, "its uncompressed stream is \(found), not its diffID \(diffID)"))
            }
            let size = pass.decoder.uncompressedPosition
            var index = LayerIndex(compression: layer.compression, compressedSize: layer.size, uncompressedSize: size,
                                   checkpoints: pass.checkpoints.filter { $0.uncompressedOffset < size })
            index.keepsSpans = sink.spans != nil && sink.spansWritten == size
            return .success(index)
        }
        if case .success(let index) = result {
            var index = index
            if !index.keepsSpans { sink.spans?.abandon() }
            // The waiters are answered before the files are made durable (fsyncing a gigabyte of
            // spans takes seconds): the spans are renamed into place first, so reads open them by
            // name, and no index names them until they are fsynced, so after a crash they are an
            // orphan the next pass replaces. The windows are read through the open index file.
            if index.keepsSpans, let spans = sink.spans, rename(spans.temporaryPath, spans.path) != 0 {
                spans.abandon()
                index.keepsSpans = false
            }
            finishIndexing(layer, .success(index), windows: pass.indexFile?.file)
            if index.keepsSpans, let spans = sink.spans, fsync(spans.file.fd) != 0 {
                unlink(spans.path)
                index.keepsSpans = false
            }
            return save(index, to: pass.indexFile, of: layer.digest)
        }
        sink.spans?.abandon()
        pass.indexFile?.abandon()
        if case .failure(let error) = result, error != .cancelled {
            logger.error("layer cannot be presented", metadata: ["digest": "\(layer.digest)", "error": "\(error)"])
        }
        finishIndexing(layer, result, windows: nil)
    }

    /// Ends the index file; were that impossible, the windows already written still serve this
    /// mount through the open file, and the next mount makes the pass again.
    private func save(_ index: LayerIndex, to file: ContentStore.LayerIndexFile?, of digest: Digest) {
        guard let file else { return }
        do throws(CacheError) {
            try file.finish(index)
        } catch {
            file.abandon()
            logger.warning("cannot keep a layer's index", metadata: ["digest": "\(digest)", "error": "\(error)"])
        }
    }
}

