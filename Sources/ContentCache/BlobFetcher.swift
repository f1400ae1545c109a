import Foundation
import Logging
import OCI
import RemoteStore
import Synchronization

public enum BlobReadError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The remote failed or stalled past every retry.
    case remote(String)
    /// The bytes the remote sent do not hash to the blob's name.
    case digestMismatch(Digest)
    /// The local cache could not be read or written.
    case local(String)
    /// The mount is shutting down.
    case cancelled

    public var description: String {
        switch self {
        case .remote(let message): return message
        case .digestMismatch(let digest): return "blob \(digest): downloaded content does not match its digest; discarded"
        case .local(let message): return message
        case .cancelled: return "cancelled"
        }
    }
}

/// Serves byte ranges of lazily downloaded blobs. The first read of a blob starts one streaming
/// download into the content store; every reader of that blob, in this mount or through the
/// same fetcher, waits on that one download (single flight) and is answered as soon as its
/// range has arrived. A read that reaches the end of a blob is answered only after the whole
/// blob matched its digest, so a reader can never receive a corrupt blob whole.
public final class BlobFetcher: Sendable {
    public typealias Reply = @Sendable (Result<[UInt8], BlobReadError>) -> Void

    private struct Waiter {
        var offset: Int64
        var end: Int64
        var reply: Reply
    }

    private struct Download {
        var file: OpenFile
        var size: Int64
        var written: Int64 = 0
        /// The whole blob matched its digest; it is being made durable and renamed.
        var verified = false
        var waiters: [Waiter] = []

        func canServe(upTo end: Int64) -> Bool { end <= written && (end < size || verified) }
    }

    /// Complete blobs are opened per read rather than kept open: a mount may read thousands
    /// of blobs, and descriptors are a bounded resource.
    private struct State {
        var downloads: [Digest: Download] = [:]
        /// Blobs this fetcher committed; a reader that missed both the download and the file
        /// (it looked in between) finds the file on a second look instead of downloading again.
        var committed: Set<Digest> = []
        /// Recently failed downloads answer at once: the kernel retries a failed readahead
        /// page by page, and each retry must not pay for a whole new download.
        var failures: [Digest: (error: BlobReadError, until: ContinuousClock.Instant)] = [:]
        /// Blobs with open file handles: never evicted by this process.
        var pins: [Digest: Int] = [:]
        /// When each blob's use was last recorded on disk (for LRU), to record it rarely.
        var lastMarkedUsed: [Digest: ContinuousClock.Instant] = [:]
        /// Bytes of downloads under way, for which room has been made in the cache.
        var reservedBytes: Int64 = 0
        var cancelled = false
    }

    private let store: ContentStore
    private let source: any RemoteCacheSource
    private let logger: Logger
    private let maxAttempts: Int
    private let failureMemory: Duration
    private let limits: CacheLimits?
    /// Blobs larger than one chunk are fetched as ranges of this size, several at once.
    private let chunkSize: Int64
    private let connectionsPerBlob: Int
    /// Bounds range requests in flight across all blobs of this mount (and so memory and
    /// connections), however many blobs are read at once.
    private let rangeSlots: DispatchSemaphore
    private let state = Mutex(State())
    /// Replies owed to readers; shutdown waits for it to reach zero so that nothing answers a
    /// request after the kernel session is gone.
    private let owedReplies = Atomic<Int>(0)
    /// Verified downloads still being made durable; shutdown lets them finish.
    private let commitsInFlight = Atomic<Int>(0)

    public init(store: ContentStore, source: any RemoteCacheSource, logger: Logger, maxAttempts: Int = 3,
                failureMemory: Duration = .seconds(5), limits: CacheLimits? = nil,
                chunkSize: Int64 = 8 << 20, connectionsPerBlob: Int = 4, connectionsInAll: Int = 16) {
        self.limits = limits
        self.chunkSize = max(chunkSize, 64 << 10)
        self.connectionsPerBlob = max(connectionsPerBlob, 1)
        self.rangeSlots = DispatchSemaphore(value: max(connectionsInAll, 1))
        self.store = store
        self.source = source
        self.logger = logger
        self.maxAttempts = maxAttempts
        self.failureMemory = failureMemory
    }

    /// Reads `count` bytes at `offset` of a blob of `size` bytes. `reply` is called exactly once:
    /// on the calling thread when the bytes are already local, later from the download otherwise.
    public func read(_ digest: Digest, size: Int64, offset: Int64, count: Int, reply: @escaping Reply) {
        let end = min(offset + Int64(count), size)
        guard offset < end else { return reply(.success([])) }
        enum Next {
            case serve(OpenFile)
            case waiting
            case startDownload
            case fail(BlobReadError)
        }
        let next: Next = state.withLock { state in
            if state.cancelled { return .fail(.cancelled) }
            if let failure = state.failures[digest] {
                if failure.until > .now { return .fail(failure.error) }
                state.failures[digest] = nil
            }
            if var download = state.downloads[digest] {
                if download.canServe(upTo: end) { return .serve(download.file) }
                download.waiters.append(Waiter(offset: offset, end: end, reply: reply))
                state.downloads[digest] = download
                owedReplies.add(1, ordering: .relaxed)
                return .waiting
            }
            return .startDownload
        }
        switch next {
        case .serve(let file):
            reply(Self.readRange(file, offset: offset, end: end))
        case .fail(let error):
            reply(.failure(error))
        case .waiting:
            break
        case .startDownload:
            startDownloadOrServe(digest, size: size, first: Waiter(offset: offset, end: end, reply: reply))
        }
    }

    /// A file handle on the blob opened: keep it out of eviction and record the use. No I/O
    /// beyond, at most once a minute per blob, one timestamp update.
    public func pin(_ digest: Digest) {
        let markNow = state.withLock { state -> Bool in
            state.pins[digest, default: 0] += 1
            if let last = state.lastMarkedUsed[digest], last.duration(to: .now) < .seconds(60) { return false }
            state.lastMarkedUsed[digest] = .now
            return true
        }
        if markNow { store.markUsed(digest) }
    }

    public func unpin(_ digest: Digest) {
        state.withLock { state in
            guard let count = state.pins[digest] else { return }
            state.pins[digest] = count > 1 ? count - 1 : nil
        }
    }

    /// True when the blob is in the local cache, complete and verified.
    public func isComplete(_ digest: Digest) -> Bool {
        store.hasComplete(digest)
    }

    /// Fails every waiting read and stops downloads; returns once no reply is owed any more.
    public func shutdown() {
        let waiters = state.withLock { state -> [Waiter] in
            state.cancelled = true
            var all: [Waiter] = []
            for (digest, var download) in state.downloads {
                all += download.waiters
                download.waiters = []
                state.downloads[digest] = download
            }
            return all
        }
        for waiter in waiters { answer(waiter, .failure(.cancelled)) }
        // Replies already taken off a queue are being sent right now; they finish quickly.
        while owedReplies.load(ordering: .acquiring) > 0 { usleep(1000) }
        waitForCommits()
    }

    /// Returns once every verified download is in `blobs/` (or failed to get there).
    public func waitForCommits() {
        while commitsInFlight.load(ordering: .acquiring) > 0 { usleep(1000) }
    }

    // MARK: - Download

    private func startDownloadOrServe(_ digest: Digest, size: Int64, first: Waiter) {
        let cached: OpenFile?
        do {
            cached = try store.openComplete(digest)
        } catch {
            return first.reply(.failure(.local(error.description)))
        }
        let partial: (path: String, file: OpenFile)?
        do {
            if cached != nil {
                partial = nil
            } else if let orphan = store.adoptOrphanedPartial(digest) {
                partial = (orphan.path, orphan.file)
            } else {
                partial = try store.createPartial(digest)
            }
        } catch {
            return first.reply(.failure(.local(error.description)))
        }
        enum Next {
            case serve(OpenFile)
            case lookAgain
            case waiting
            case download(path: String, file: OpenFile)
        }
        // Another reader may have raced us here; the state decides who downloads.
        let next: Next = state.withLock { state in
            if let cached { return .serve(cached) }
            if state.committed.contains(digest) { return .lookAgain }
            owedReplies.add(1, ordering: .relaxed)
            if var download = state.downloads[digest] {
                download.waiters.append(first)
                state.downloads[digest] = download
                return .waiting
            }
            let partial = partial!
            state.downloads[digest] = Download(file: partial.file, size: size, waiters: [first])
            return .download(path: partial.path, file: partial.file)
        }
        switch next {
        case .serve(let file):
            if let partial { store.discardPartial(partial.path) }
            first.reply(Self.readRange(file, offset: first.offset, end: first.end))
        case .lookAgain:
            if let partial { store.discardPartial(partial.path) }
            do {
                guard let file = try store.openComplete(digest) else {
                    // Evicted since: fetch it again.
                    state.withLock { _ = $0.committed.remove(digest) }
                    return startDownloadOrServe(digest, size: size, first: first)
                }
                first.reply(Self.readRange(file, offset: first.offset, end: first.end))
            } catch {
                first.reply(.failure(.local(error.description)))
            }
        case .waiting:
            if let partial { store.discardPartial(partial.path) }
        case .download(let path, let file):
            logger.debug("downloading blob", metadata: ["digest": "\(digest)", "size": "\(size)"])
            Thread.detachNewThread { [self] in
                download(digest, size: size, path: path, file: file)
            }
        }
    }

    private func download(_ digest: Digest, size: Int64, path: String, file: OpenFile) {
        var outcome: Result<Void, BlobReadError>
        switch awaitOtherProcessDownload(digest) {
        case .completedElsewhere:
            store.discardPartial(path)
            outcome = .success(())
        case .cancelled:
            store.discardPartial(path)
            outcome = .failure(.cancelled)
        case .ours(let lock):
            let result = makeRoom(for: digest, size: size).flatMap { transfer(digest, size: size, file: file) }
            if limits != nil { state.withLock { $0.reservedBytes -= size } }
            switch result {
            case .success:
                // Verified bytes may be served now; durability (fsync, rename) need not delay them.
                commitsInFlight.add(1, ordering: .relaxed)
                answerVerified(digest, size: size, file: file)
                do {
                    try store.commit(partialPath: path, file: file, digest: digest)
                    outcome = .success(())
                } catch {
                    outcome = .failure(.local(error.description))
                }
                commitsInFlight.subtract(1, ordering: .releasing)
            case .failure(let error):
                outcome = .failure(error)
            }
            withExtendedLifetime(lock) {}
        }
        // Waiters of a blob another process completed read the complete file.
        let completeFile = (try? store.openComplete(digest)) ?? nil
        if case .failure(let error) = outcome {
            // Cut short by unmounting: the partial file stays for the next mount to continue.
            if case .cancelled = error {} else {
                store.discardPartial(path)
                logger.error("blob download failed", metadata: ["digest": "\(digest)", "error": "\(error)"])
            }
        } else {
            logger.debug("blob complete", metadata: ["digest": "\(digest)"])
        }
        let waiters = state.withLock { state -> [Waiter] in
            switch outcome {
            case .success:
                state.committed.insert(digest)
            case .failure(.cancelled):
                break
            case .failure(let error):
                state.failures[digest] = (error, .now + failureMemory)
            }
            return state.downloads.removeValue(forKey: digest)?.waiters ?? []
        }
        for waiter in waiters {
            switch outcome {
            case .success: answer(waiter, Self.readRange(completeFile ?? file, offset: waiter.offset, end: waiter.end))
            case .failure(let error): answer(waiter, .failure(error))
            }
        }
    }

    private enum DownloadTurn {
        case ours(OpenFile)
        case completedElsewhere
        case cancelled
    }

    /// Another mount on this cache directory may be downloading the blob already: wait for it
    /// to finish (or to die, which releases its lock) instead of fetching the bytes twice.
    private func awaitOtherProcessDownload(_ digest: Digest) -> DownloadTurn {
        var loggedWait = false
        while true {
            if state.withLock({ $0.cancelled }) { return .cancelled }
            if let lock = store.tryDownloadLock(digest) {
                // The other process may have completed it just before letting go.
                return store.hasComplete(digest) ? .completedElsewhere : .ours(lock)
            }
            if store.hasComplete(digest) { return .completedElsewhere }
            if !loggedWait {
                logger.debug("another mount is downloading this blob; waiting for it", metadata: ["digest": "\(digest)"])
                loggedWait = true
            }
            usleep(20_000)
        }
    }

    /// Evicts least recently used blobs so that this one fits under the cap; one that could
    /// never fit is refused rather than allowed to break the cap.
    private func makeRoom(for digest: Digest, size: Int64) -> Result<Void, BlobReadError> {
        guard let limits else { return .success(()) }
        let reserved = state.withLock { state -> Int64 in
            state.reservedBytes += size
            return state.reservedBytes
        }
        guard size <= limits.maxBytes else {
            return .failure(.local("blob \(digest) is \(size) bytes, more than the cache may hold (--cache-size \(limits.maxBytes))"))
        }
        let pinned = state.withLock { $0.pins }
        let removed = store.evict(toFit: limits, making: reserved, protected: { pinned[$0] != nil })
        if !removed.isEmpty {
            logger.info("evicted least recently used blobs", metadata: ["count": "\(removed.count)",
                                                                        "bytes": "\(removed.reduce(0) { $0 + $1.size })"])
        }
        return .success(())
    }

    /// Streams the blob into `file`, resuming with a range request after a transient failure.
    private func transfer(_ digest: Digest, size: Int64, file: OpenFile) -> Result<Void, BlobReadError> {
        var verifier = resumableVerifier(of: file, size: size)
        var resumedFromOrphan = verifier.byteCount > 0
        if resumedFromOrphan {
            logger.info("continuing an interrupted download", metadata: ["digest": "\(digest)", "from": "\(verifier.byteCount)"])
            setWritten(digest, verifier.byteCount)
        }
        if connectionsPerBlob > 1 && size - verifier.byteCount > chunkSize {
            switch transferInRanges(digest, size: size, file: file, verifier: &verifier) {
            case .complete:
                if verifier.finalize() == digest { return .success(()) }
                guard resumedFromOrphan else { return .failure(.digestMismatch(digest)) }
                // The bytes a crashed process left may be what is wrong: fetch it all once more.
                resumedFromOrphan = false
                verifier = DigestVerifier()
                file.truncate()
                setWritten(digest, 0)
            case .rangesIgnored:
                logger.info("the remote ignores ranges; downloading the blob as one stream", metadata: ["digest": "\(digest)"])
            case .failed(let error):
                return .failure(error)
            }
        }
        var lastError = BlobReadError.remote("blob \(digest): no attempt made")
        for attempt in 1...maxAttempts {
            do {
                try source.streamBlob(digest, from: verifier.byteCount, onStart: { start in
                    if start != verifier.byteCount {
                        // The server ignored the range: start over from its first byte.
                        verifier = DigestVerifier()
                        file.truncate()
                        self.setWritten(digest, 0)
                    }
                }, onBody: { chunk in
                    if self.state.withLock({ $0.cancelled }) { throw BlobReadError.cancelled }
                    guard verifier.byteCount + Int64(chunk.count) <= size else {
                        throw BlobReadError.remote("blob \(digest): the remote sent more than its \(size) bytes")
                    }
                    try file.write(chunk, at: verifier.byteCount)
                    verifier.update(chunk)
                    self.setWritten(digest, verifier.byteCount)
                })
                guard verifier.byteCount == size else {
                    throw BlobReadError.remote("blob \(digest): the remote sent \(verifier.byteCount) of \(size) bytes")
                }
                guard verifier.finalize() == digest else {
                    // The bytes a crashed process left may be what is wrong: fetch it all once more.
                    guard resumedFromOrphan else { return .failure(.digestMismatch(digest)) }
                    resumedFromOrphan = false
                    verifier = DigestVerifier()
                    file.truncate()
                    setWritten(digest, 0)
                    throw BlobReadError.digestMismatch(digest)
                }
                return .success(())
            } catch let error as BlobReadError {
                if case .cancelled = error { return .failure(error) }
                lastError = error
            } catch let error as CacheError {
                return .failure(.local(error.description))
            } catch let error as RemoteStoreError {
                lastError = .remote("blob \(digest): \(error)")
                guard error.isTransient else { break }
            } catch {
                lastError = .remote("blob \(digest): \(error)")
            }
            if attempt < maxAttempts {
                logger.warning("retrying blob download", metadata: ["digest": "\(digest)", "attempt": "\(attempt)", "error": "\(lastError)"])
                Thread.sleep(forTimeInterval: 0.25 * Double(attempt))
            }
        }
        return .failure(lastError)
    }

    /// Hashes what an adopted partial file already holds, so the download continues after it.
    private func resumableVerifier(of file: OpenFile, size: Int64) -> DigestVerifier {
        var verifier = DigestVerifier()
        var info = stat()
        guard fstat(file.fd, &info) == 0, info.st_size > 0 else { return verifier }
        // Leave at least the last byte to fetch: a range starting at the end is not satisfiable.
        let length = min(Int64(info.st_size), max(0, size - 1))
        while verifier.byteCount < length {
            guard let chunk = try? file.read(offset: verifier.byteCount, count: Int(min(1 << 20, length - verifier.byteCount))),
                  !chunk.isEmpty else { break }
            chunk.withUnsafeBytes { verifier.update($0) }
        }
        _ = ftruncate(file.fd, off_t(verifier.byteCount))
        return verifier
    }

    /// The whole blob matched its digest: every waiter, the end included, can be answered.
    private func answerVerified(_ digest: Digest, size: Int64, file: OpenFile) {
        let waiters = state.withLock { state -> [Waiter] in
            guard var download = state.downloads[digest] else { return [] }
            download.written = size
            download.verified = true
            let waiters = download.waiters
            download.waiters = []
            state.downloads[digest] = download
            return waiters
        }
        for waiter in waiters { answer(waiter, Self.readRange(file, offset: waiter.offset, end: waiter.end)) }
    }

    /// Records progress and answers every waiter whose range is now local.
    private func setWritten(_ digest: Digest, _ written: Int64) {
        let ready: (OpenFile, [Waiter])? = state.withLock { state in
            guard var download = state.downloads[digest] else { return nil }
            download.written = written
            var ready: [Waiter] = []
            let progress = download
            download.waiters.removeAll { waiter in
                let isReady = progress.canServe(upTo: waiter.end)
                if isReady { ready.append(waiter) }
                return isReady
            }
            state.downloads[digest] = download
            return ready.isEmpty ? nil : (download.file, ready)
        }
        guard let (file, waiters) = ready else { return }
        for waiter in waiters { answer(waiter, Self.readRange(file, offset: waiter.offset, end: waiter.end)) }
    }

    private func answer(_ waiter: Waiter, _ result: Result<[UInt8], BlobReadError>) {
        waiter.reply(result)
        owedReplies.subtract(1, ordering: .releasing)
    }

    private static func readRange(_ file: OpenFile, offset: Int64, end: Int64) -> Result<[UInt8], BlobReadError> {
        do {
            return .success(try file.read(offset: offset, count: Int(end - offset)))
        } catch {
            return .failure(.local(error.description))
        }
    }
}

// MARK: - Parallel ranged download

extension BlobFetcher {
    enum RangedOutcome {
        case complete
        /// The remote answers ranges with the whole blob: the caller streams it instead.
        case rangesIgnored
        case failed(BlobReadError)
    }

    private struct RangeProgress {
        var next = 0
        var done: [Bool]
        var hashed = 0
        var stop: RangedOutcome?
    }

    private struct RangesIgnored: Error {}

    /// Fetches the rest of the blob as fixed-size ranges on several connections, each written
    /// where it belongs. The digest advances over the contiguous prefix as ranges land, and
    /// readers are answered from that verified-so-far prefix, as with one stream.
    fileprivate func transferInRanges(_ digest: Digest, size: Int64, file: OpenFile,
                                      verifier: inout DigestVerifier) -> RangedOutcome {
        let base = verifier.byteCount
        let count = Int((size - base + chunkSize - 1) / chunkSize)
        let progress = Mutex(RangeProgress(done: Array(repeating: false, count: count)))
        let hasher = Mutex(verifier)
        let chunkSize = self.chunkSize
        @Sendable func range(_ index: Int) -> (first: Int64, last: Int64) {
            let first = base + Int64(index) * chunkSize
            return (first, min(first + chunkSize, size) - 1)
        }

        /// Hashes every finished range that extends the prefix.
        @Sendable func hashFinishedRanges(_ verifier: inout DigestVerifier) {
            while let index = progress.withLock({ $0.hashed < count && $0.done[$0.hashed] ? $0.hashed : nil }) {
                let bounds = range(index)
                var offset = bounds.first
                while offset <= bounds.last {
                    let length = Int(min(1 << 20, bounds.last + 1 - offset))
                    guard let bytes = try? file.read(offset: offset, count: length), bytes.count == length else {
                        progress.withLock { $0.stop = $0.stop ?? .failed(.local("cannot read back blob \(digest)")) }
                        return
                    }
                    bytes.withUnsafeBytes { verifier.update($0) }
                    offset += Int64(length)
                }
                progress.withLock { $0.hashed += 1 }
                setWritten(digest, verifier.byteCount)
            }
        }

        /// One hasher at a time; a worker that finds it busy leaves the work to it, and the
        /// hasher looks again before it stops, so no finished range is left unhashed.
        @Sendable func advanceHash() {
            repeat {
                guard hasher.withLockIfAvailable({ hashFinishedRanges(&$0) }) != nil else { return }
            } while progress.withLock({ $0.hashed < count && $0.done[$0.hashed] && $0.stop == nil })
        }

        let workers = DispatchGroup()
        for _ in 0..<min(connectionsPerBlob, count) {
            workers.enter()
            Thread.detachNewThread {
                defer { workers.leave() }
                while let index = progress.withLock({ state -> Int? in
                    guard state.stop == nil, state.next < count else { return nil }
                    defer { state.next += 1 }
                    return state.next
                }) {
                    self.rangeSlots.wait()
                    let outcome = self.fetchRange(digest, range(index), into: file)
                    self.rangeSlots.signal()
                    switch outcome {
                    case .complete:
                        progress.withLock { $0.done[index] = true }
                        advanceHash()
                    case .rangesIgnored, .failed:
                        progress.withLock { $0.stop = $0.stop ?? outcome }
                    }
                }
            }
        }
        workers.wait()
        hasher.withLock { hashFinishedRanges(&$0) }

        verifier = hasher.withLock { $0 }
        switch progress.withLock({ $0.stop }) {
        case .failed(let error)?:
            return .failed(error)
        case .rangesIgnored?:
            // Keep the verified prefix; the stream continues after it.
            _ = ftruncate(file.fd, off_t(verifier.byteCount))
            return .rangesIgnored
        case .complete?, nil:
            return verifier.byteCount == size ? .complete : .failed(.remote("blob \(digest): ranges did not cover the blob"))
        }
    }

    /// One range, resumed within itself after a transient failure.
    private func fetchRange(_ digest: Digest, _ bounds: (first: Int64, last: Int64), into file: OpenFile) -> RangedOutcome {
        var received: Int64 = 0
        let length = bounds.last - bounds.first + 1
        var lastError = BlobReadError.remote("blob \(digest): no attempt made")
        for attempt in 1...maxAttempts {
            do {
                try source.streamBlob(digest, from: bounds.first + received, through: bounds.last, onStart: { start in
                    guard start == bounds.first + received else { throw RangesIgnored() }
                }, onBody: { chunk in
                    if self.state.withLock({ $0.cancelled }) { throw BlobReadError.cancelled }
                    guard received + Int64(chunk.count) <= length else { throw RangesIgnored() }
                    try file.write(chunk, at: bounds.first + received)
                    received += Int64(chunk.count)
                })
                guard received == length else {
                    throw BlobReadError.remote("blob \(digest): range at \(bounds.first) ended after \(received) of \(length) bytes")
                }
                return .complete
            } catch is RangesIgnored {
                return .rangesIgnored
            } catch let error as BlobReadError {
                if case .cancelled = error { return .failed(error) }
                lastError = error
            } catch let error as CacheError {
                return .failed(.local(error.description))
            } catch let error as RemoteStoreError {
                lastError = .remote("blob \(digest): \(error)")
                guard error.isTransient else { return .failed(lastError) }
            } catch {
                lastError = .remote("blob \(digest): \(error)")
            }
            if attempt < maxAttempts { Thread.sleep(forTimeInterval: 0.25 * Double(attempt)) }
        }
        return .failed(lastError)
    }
}
