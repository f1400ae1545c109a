import ArgumentParser
import FoundationEssentials
import FuseBinding
import OCI
import Synchronization
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

struct PrefetchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prefetch",
        abstract: "Download what tags of a mount reference into its cache, and wait until it is there.",
        discussion: """
        Reads every blob the tags reach (manifests, cache configs, layers; every tag if none is \
        named) through the mount, so the daemon fetches, verifies and caches each one; a blob \
        already cached costs no download. With --chain, only the layers of the cache chain that \
        ends at that layer, as the tags' cache configs record it. On a terminal it shows a \
        progress bar; otherwise it prints one line per blob. Fails naming every blob it could \
        not read.

        Example:
          ocicachefs prefetch /mnt/cache main
        """
    )

    @Option(help: ArgumentHelp("Only the layers of the cache chain ending at this layer (sha256:HEX).", valueName: "LAYER"),
            transform: { text in
                guard let digest = Digest(text) ?? Digest(hex: text) else {
                    throw ValidationError("--chain takes a layer digest, sha256:<64 hex digits>")
                }
                return digest
            })
    var chain: Digest?

    @Option(help: ArgumentHelp("Blobs read at once.", valueName: "N"))
    var jobs: Int = 4

    @Argument(help: ArgumentHelp("Where the cache is mounted.", valueName: "MOUNTPOINT"))
    var mountpoint: String

    @Argument(help: ArgumentHelp("Tags of the mount's index.json (default: every one).", valueName: "TAG"))
    var tags: [String] = []

    func validate() throws {
        guard (1...64).contains(jobs) else { throw ValidationError("--jobs must be between 1 and 64") }
    }

    /// The most of a manifest or cache config read to plan (BuildKit reads configs up to 1 MiB).
    static let documentLimit: Int64 = 64 << 20

    func run() throws {
        let plan: PrefetchPlan
        let root: String
        do {
            root = try Self.mountRoot(mountpoint)
            let index = try Self.readWhole(root + "/index.json", limit: Self.documentLimit)
            plan = try PrefetchPlan(index: index, tags: tags, chainEndingAt: chain) { descriptor in
                guard descriptor.size <= Self.documentLimit else {
                    throw CommandError("\(descriptor.digest) is \(descriptor.size) bytes, too large for a manifest or config")
                }
                return try Self.readWhole(Self.blobPath(root, descriptor.digest), limit: descriptor.size)
            }
        } catch {
            printError("prefetch: \(error)")
            throw ExitCode.failure
        }

        let progress = PrefetchProgress(total: plan.blobs, onTerminal: isatty(2) == 1)
        let failures = SystemThread.map(plan.blobs, width: jobs, named: "ocicachefs-prefetch") { blob -> String? in
            let started = ContinuousClock.now
            do {
                try Self.readThrough(Self.blobPath(root, blob.digest), expecting: blob.size) { progress.add(bytes: $0) }
                progress.finished(blob, after: ContinuousClock.now - started)
                return nil
            } catch {
                progress.failed(blob)
                return "\(blob.digest) (\(blob.mediaType), \(blob.size) bytes): \(error)"
            }
        }.compactMap { $0 }
        progress.end()
        guard failures.isEmpty else {
            for failure in failures { printError("prefetch: not cached: \(failure)") }
            printError("prefetch: \(failures.count) of \(plan.blobs.count) blob(s) failed")
            throw ExitCode.failure
        }
    }

    static func blobPath(_ root: String, _ digest: Digest) -> String { root + "/blobs/sha256/" + digest.hex }

    /// The mount's root, which must be an ocicachefs mount: reading another directory would
    /// fill no cache.
    static func mountRoot(_ argument: String) throws -> String {
        guard let resolved = realpath(argument, nil) else {
            throw CommandError("\(argument): \(String(cString: strerror(errno)))")
        }
        defer { free(resolved) }
        let path = String(cString: resolved)
        guard let entry = MountTable.topmost(at: path) else { throw CommandError("\(path) is not mounted") }
        guard entry.filesystemType == Unmounter.filesystemType else {
            throw CommandError("\(path) is not an ocicachefs mount (it is \(entry.filesystemType))")
        }
        return path
    }

    static func readWhole(_ path: String, limit: Int64) throws -> [UInt8] {
        var bytes: [UInt8] = []
        try readThrough(path, expecting: nil, limit: limit) { chunk in bytes += chunk }
        return bytes
    }

    /// Reads the file at `path` to its end in 1 MiB pieces, handing each to `consume`; fails if
    /// it does not hold exactly `expecting` bytes (when given) or more than `limit`.
    static func readThrough(_ path: String, expecting size: Int64?, limit: Int64 = .max,
                            _ consume: (UnsafeRawBufferPointer) -> Void) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CommandError(String(cString: strerror(errno))) }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var total: Int64 = 0
        while true {
            let count = read(fd, buffer.baseAddress, buffer.count)
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else { throw CommandError(String(cString: strerror(errno))) }
            if count == 0 { break }
            total += Int64(count)
            guard total <= min(limit, size ?? .max) else {
                throw CommandError("more than \(min(limit, size ?? .max)) bytes")
            }
            consume(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            // The point is the daemon's cache, not this machine's page cache.
            if total % (64 << 20) == 0 { _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) }
        }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        if let size, total != size { throw CommandError("read \(total) of its \(size) bytes") }
    }
}

/// What `prefetch` shows while it reads: a bar redrawn on a terminal, else a line per blob.
final class PrefetchProgress: Sendable {
    private struct State {
        var bytes: Int64 = 0
        var blobsDone = 0
        var drawn = ContinuousClock.now - .seconds(1)
    }

    private let totalBytes: Int64
    private let totalBlobs: Int
    private let onTerminal: Bool
    private let started = ContinuousClock.now
    private let state = Mutex(State())

    init(total blobs: [Descriptor], onTerminal: Bool) {
        totalBytes = ByteSize.total(blobs.map(\.size))
        totalBlobs = blobs.count
        self.onTerminal = onTerminal
    }

    func add(bytes: UnsafeRawBufferPointer) {
        let line: String? = state.withLock { state in
            state.bytes += Int64(bytes.count)
            guard onTerminal, ContinuousClock.now - state.drawn >= .milliseconds(200) else { return nil }
            state.drawn = .now
            return bar(state)
        }
        if let line { Self.write(2, "\r" + line + "\u{1B}[K") }
    }

    func finished(_ blob: Descriptor, after duration: Duration) {
        let line = state.withLock { state in
            state.blobsDone += 1
            if onTerminal { return bar(state) }
            let seconds = Self.seconds(duration)
            return "\(blob.digest) \(ByteSize.describe(blob.size)) in \(seconds.withOneDecimal) s; "
                + "\(state.blobsDone)/\(totalBlobs) blobs, \(ByteSize.describe(state.bytes)) of \(ByteSize.describe(totalBytes))"
        }
        Self.write(onTerminal ? 2 : 1, onTerminal ? "\r" + line + "\u{1B}[K" : line + "\n")
    }

    func failed(_ blob: Descriptor) {
        state.withLock { $0.blobsDone += 1 }
    }

    func end() {
        let (bytes, done) = state.withLock { ($0.bytes, $0.blobsDone) }
        let seconds = Self.seconds(ContinuousClock.now - started)
        let summary = "\(done) blob(s), \(ByteSize.describe(bytes)) in \(seconds.withOneDecimal) s "
            + "(\(Self.rate(bytes, seconds)))"
        Self.write(onTerminal ? 2 : 1, onTerminal ? "\r" + summary + "\u{1B}[K\n" : summary + "\n")
    }

    private func bar(_ state: State) -> String {
        let fraction = totalBytes > 0 ? min(1, Double(state.bytes) / Double(totalBytes)) : 1
        let width = 24
        let filled = Int(fraction * Double(width))
        let seconds = Self.seconds(ContinuousClock.now - started)
        let rate = seconds > 0 ? Double(state.bytes) / seconds : 0
        let left = rate > 0 ? "\(Int((Double(totalBytes - state.bytes) / rate).rounded())) s left" : "--"
        return "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "] "
            + "\(ByteSize.describe(state.bytes)) of \(ByteSize.describe(totalBytes)), \(Self.rate(state.bytes, seconds)), "
            + "\(left), \(state.blobsDone)/\(totalBlobs) blobs"
    }

    private static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) * 1e-18
    }

    private static func rate(_ bytes: Int64, _ seconds: Double) -> String {
        seconds > 0 ? ByteSize.describe(Int64(Double(bytes) / seconds)) + "/s" : "--"
    }

    private static func write(_ fd: Int32, _ text: String) {
        _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
    }
}
