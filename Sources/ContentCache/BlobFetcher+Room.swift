import FoundationEssentials
import SystemSupport
import OCI
import Logging
import Synchronization

// MARK: - Opening, and room for downloads

extension BlobFetcher {
    /// How long the cache's filesystem counts as full after a write found it full and eviction
    /// freed nothing: new downloads meanwhile go to memory without trying the disk.
    static let diskFullPause: Duration = .seconds(30)

    /// The complete blob when the cache has it; otherwise registers a transfer over the shared
    /// partial file, or over memory when the cache cannot hold the blob, and returns nil.
    func openTransfer(_ digest: Digest, size: Int64) -> Result<OpenFile?, BlobReadError> {
        // The caller found no complete blob; one that appears meanwhile is merely fetched again.
        if let limits, size > limits.maxBytes {
            logger.notice("blob is larger than the cache may hold; it is held in memory while read, and not kept",
                          metadata: ["digest": "\(digest)", "size": "\(size)", "cache size": "\(limits.maxBytes)"])
            return openInMemory(digest, size: size)
        }
        if state.withLock({ state in state.diskFullUntil.map { ContinuousClock.now < $0 } ?? false }) {
            return openInMemory(digest, size: size)
        }
        let local: ContentStore.LocalBlob
        do {
            local = try openBlobMakingRoom(digest, size: size)
        } catch let error where error.isOutOfSpace {
            noteDiskFull(error)
            return openInMemory(digest, size: size)
        } catch {
            return .failure(.local(error.description))
        }
        guard case .partial(let data, let journal) = local else {
            if case .complete(let file) = local { return .success(file) }
            return .success(nil)
        }
        let recorded = journal.recordedChecksums()
        let presentBytes = recorded.indices.reduce(Int64(0)) { sum, index in
            recorded[index] == nil ? sum : sum + Int64(journal.range(ofBlock: index).count)
        }
        if presentBytes > 0 {
            logger.info("continuing an interrupted download", metadata: ["digest": "\(digest)", "bytes on disk": "\(presentBytes)"])
        }
        state.withLock { state in
            guard state.transfers[digest] == nil else { return }
            let machine = TransferMachine(digest: digest, size: size, limits: machineLimits, generation: state.nextGeneration,
                                          recorded: recorded, now: .now)
            state.nextGeneration += 1
            state.transfers[digest] = Transfer(machine: machine, data: data, journal: journal)
            closeIdleTransfers(&state)
        }
        return .success(nil)
    }

    private func openBlobMakingRoom(_ digest: Digest, size: Int64) throws(CacheError) -> ContentStore.LocalBlob {
        do {
            return try store.openBlob(digest, size: size, blockSize: tuning.blockSize)
        } catch let error where error.isOutOfSpace {
            guard makeRoom(for: digest, bytes: tuning.blockSize, rescan: true) > 0 else { throw error }
            return try store.openBlob(digest, size: size, blockSize: tuning.blockSize)
        }
    }

    /// Registers a transfer held in memory, within `memoryLimit`: idle ones are dropped to
    /// make room, least recently used first.
    private func openInMemory(_ digest: Digest, size: Int64) -> Result<OpenFile?, BlobReadError> {
        guard reserveMemory(for: digest, size: size) else { return .failure(noMemoryError(digest, size: size)) }
        let files: (data: OpenFile, journal: BlockJournal)
        do {
            files = try store.openInMemory(digest, size: size, blockSize: tuning.blockSize)
        } catch {
            return .failure(.local(error.description))
        }
        state.withLock { state in
            guard state.transfers[digest] == nil else { return }
            let machine = TransferMachine(digest: digest, size: size, limits: machineLimits, generation: state.nextGeneration,
                                          recorded: Array(repeating: nil, count: files.journal.blockCount), now: .now)
            state.nextGeneration += 1
            state.transfers[digest] = Transfer(machine: machine, data: files.data, journal: files.journal, inMemory: true)
        }
        return .success(nil)
    }

    /// True when a blob of `size` bytes fits in memory beside the other transfers held there,
    /// after dropping idle ones that nobody has open.
    private func reserveMemory(for digest: Digest, size: Int64) -> Bool {
        state.withLock { state in
            var held = state.transfers.values.filter(\.inMemory)
            var used = held.reduce(Int64(0)) { $0 + $1.machine.size }
            held.sort { $0.machine.lastUse < $1.machine.lastUse }
            for transfer in held where used + size > memoryLimit {
                let blob = transfer.machine.digest
                guard blob != digest, transfer.machine.isIdle || transfer.machine.verified,
                      transfer.machine.waiters.isEmpty, transfer.machine.jobs.isEmpty, state.pins[blob] == nil else { continue }
                state.transfers[blob] = nil
                used -= transfer.machine.size
            }
            return used + size <= memoryLimit
        }
    }

    private func noMemoryError(_ digest: Digest, size: Int64) -> BlobReadError {
        .local("blob \(digest): its \(size) bytes cannot be cached in \(store.directory) (it is full, or the blob is larger "
               + "than the cache may hold), and they do not fit in the \(memoryLimit) bytes of memory downloads may take")
    }

    /// Logs the full cache directory once per episode, and sends new downloads to memory for a while.
    func noteDiskFull(_ error: CacheError) {
        let firstTime = state.withLock { state in
            defer { state.diskFullUntil = .now + Self.diskFullPause }
            return state.diskFullUntil.map { $0 < .now } ?? true
        }
        if firstTime {
            logger.error("the cache directory is full and nothing more can be evicted; downloads are held in memory, not kept",
                         metadata: ["directory": "\(store.directory)", "error": "\(error)", "memory limit": "\(memoryLimit)"])
        }
    }

    func closeIdleTransfers(_ state: inout State) {
        let idle = state.transfers.filter { ($0.value.machine.isIdle || $0.value.inMemory && $0.value.machine.verified)
            && $0.value.machine.waiters.isEmpty && state.pins[$0.key] == nil }
        guard idle.count > Self.idleTransfersKept else { return }
        for (digest, _) in idle.sorted(by: { $0.value.machine.lastUse < $1.value.machine.lastUse }).prefix(idle.count - Self.idleTransfersKept) {
            state.transfers[digest] = nil
        }
    }

    /// Makes room for `bytes` more of a download before they arrive, evicting least recently
    /// used blobs. The cache directory is scanned only when the slack the last scan measured is
    /// used up, or on `rescan` (the disk was found full; a blob was committed, which other
    /// processes' downloads may have pushed over the cap). Returns the bytes evicted.
    @discardableResult
    func makeRoom(for digest: Digest, bytes: Int64, rescan: Bool = false) -> Int64 {
        guard let limits else { return 0 }
        let protected = state.withLock { state -> Set<Digest>? in
            if state.roomMade >= bytes && !rescan {
                state.roomMade -= bytes
                return nil
            }
            return Set(state.pins.keys).union(state.transfers.keys).union([digest])
        }
        guard let protected else { return 0 }
        let (removed, slack) = store.evictMeasuringSlack(toFit: limits, making: bytes, protected: { protected.contains($0) })
        // Rescanned at least every 256 MiB: other processes fill the same directory.
        state.withLock { $0.roomMade = min(max(slack, 0), 256 << 20) }
        let freed = removed.reduce(Int64(0)) { $0 + $1.size }
        if !removed.isEmpty {
            logger.info("evicted least recently used blobs", metadata: ["count": "\(removed.count)", "bytes": "\(freed)"])
        }
        return freed
    }
}

// MARK: - Moving a download into memory

extension BlobFetcher {
    /// The cache's filesystem has no room for the rest of a download: it goes on in memory.
    /// The blocks already on disk are copied over and checked again like an earlier process's,
    /// so the digest the memory download is checked against covers every byte already served,
    /// and the handles served them fail if it does not match. Returns why it could not move;
    /// nil when it moved (or another job is moving it).
    func moveToMemory(_ digest: Digest, from disk: Transfer) -> BlobReadError? {
        let size = state.withLock { state -> Int64? in
            guard state.transfers[digest] === disk, !disk.movingToMemory else { return nil }
            disk.movingToMemory = true
            return disk.machine.size
        }
        guard let size else { return nil }
        let memory: (data: OpenFile, journal: BlockJournal)
        do {
            guard reserveMemory(for: digest, size: size) else { throw noMemoryError(digest, size: size) }
            memory = try store.openInMemory(digest, size: size, blockSize: tuning.blockSize)
        } catch let error as BlobReadError {
            state.withLock { _ in disk.movingToMemory = false }
            return error
        } catch {
            state.withLock { _ in disk.movingToMemory = false }
            return .local("\(error)")
        }
        var copied: [Int: UInt32] = [:]
        /// Copies the blocks recorded on disk and intact, each recorded in memory with its CRC.
        func copyRecordedBlocks() {
            for (index, crc) in disk.journal.recordedChecksums().enumerated() where copied[index] == nil {
                guard let crc else { continue }
                let range = disk.journal.range(ofBlock: index)
                let intact = buffers.withBuffer(count: range.count) { buffer -> Bool in
                    guard (try? disk.data.read(into: buffer, offset: range.lowerBound)) == range.count,
                          crc32c(0, UnsafeRawBufferPointer(buffer)) == crc else { return false }
                    return (try? memory.data.write(UnsafeRawBufferPointer(buffer), at: range.lowerBound)) != nil
                        && (try? memory.journal.record(block: index, checksum: crc)) != nil
                }
                if intact == true { copied[index] = crc }
            }
        }
        copyRecordedBlocks()
        let waiting = state.withLock { state -> [PendingReply] in
            // Blocks that landed during the copy, served meanwhile too: few, copied under the
            // lock so that none is served from disk that memory lacks.
            copyRecordedBlocks()
            var machine = TransferMachine(digest: digest, size: size, limits: machineLimits, generation: state.nextGeneration,
                                          recorded: (0..<memory.journal.blockCount).map { copied[$0] }, now: .now)
            machine.inherit(unverifiedReaders: disk.machine.unverifiedReaders)
            state.nextGeneration += 1
            state.transfers[digest] = Transfer(machine: machine, data: memory.data, journal: memory.journal, inMemory: true)
            let replies = disk.machine.takeAllWaiters().compactMap { state.pending.removeValue(forKey: $0.id) }
            sendingReplies.add(replies.count, ordering: .relaxed)
            return replies
        }
        store.discardPartial(digest, data: disk.data)
        logger.warning("a download goes on in memory",
                       metadata: ["digest": "\(digest)", "blocks copied from disk": "\(copied.count)"])
        for pending in waiting {
            read(pending.read, of: digest, size: size, reply: pending.reply, attempts: 3)
            sendingReplies.subtract(1, ordering: .releasing)
        }
        return nil
    }
}
