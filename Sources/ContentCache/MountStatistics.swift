import FoundationEssentials
import OCI
import Synchronization

/// What a mount has done since it started, counted where it happens: bytes from the remote,
/// bytes served to readers and how long their reads took, cache hits and misses, transfers in
/// flight, errors by kind. Read as a `MountStatisticsSnapshot` by `ocicachefs stats` and the
/// Prometheus exports.
public final class MountStatistics: Sendable {
    /// Upper bounds of the read latency histogram, in seconds (Prometheus' `le`).
    public static let latencyBuckets: [Double] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30]

    private let remoteBytes = Atomic<Int64>(0)
    private let downloadsInFlight = Atomic<Int>(0)
    private let uploadedBytes = Atomic<Int64>(0)
    private let uploadsInFlight = Atomic<Int>(0)
    private let servedBytes = Atomic<Int64>(0)
    private let hitBytes = Atomic<Int64>(0)
    private let missBytes = Atomic<Int64>(0)
    private let opens = Atomic<Int64>(0)
    private let flushes = Atomic<Int64>(0)
    private let releases = Atomic<Int64>(0)

    private struct Tallies {
        var latencyCounts = [Int64](repeating: 0, count: MountStatistics.latencyBuckets.count + 1)
        var latencySum: Double = 0
        /// Blobs read so far, and whether their first read found its bytes in the cache.
        var blobsRead: [Digest: Bool] = [:]
        var errors: [String: Int64] = [:]
    }
    private let tallies = Mutex(Tallies())
    private let started = ContinuousClock.now

    public init() {}

    // MARK: Counting

    /// Bytes of a blob received from the remote.
    public func received(_ bytes: Int) { remoteBytes.add(Int64(bytes), ordering: .relaxed) }

    public func downloadStarted() { downloadsInFlight.add(1, ordering: .relaxed) }
    public func downloadEnded(failed: Bool) {
        downloadsInFlight.subtract(1, ordering: .relaxed)
        if failed { count(error: "download") }
    }

    public func uploadStarted() { uploadsInFlight.add(1, ordering: .relaxed) }
    public func uploadEnded(sent bytes: Int64, failed: Bool) {
        uploadsInFlight.subtract(1, ordering: .relaxed)
        uploadedBytes.add(bytes, ordering: .relaxed)
        if failed { count(error: "upload") }
    }

    /// A read of a blob found `bytes` in the cache (`hit`) or had to wait for the remote.
    public func blobRead(_ digest: Digest, bytes: Int64, hit: Bool) {
        if hit {
            hitBytes.add(bytes, ordering: .relaxed)
        } else {
            missBytes.add(bytes, ordering: .relaxed)
        }
        tallies.withLock { tallies in
            if tallies.blobsRead[digest] == nil { tallies.blobsRead[digest] = hit }
        }
    }

    /// A read the kernel asked for was answered with `bytes`, or failed with `errorName`.
    public func answeredRead(bytes: Int, after duration: Duration, errorName: String?) {
        if errorName == nil { servedBytes.add(Int64(bytes), ordering: .relaxed) }
        let seconds = Self.seconds(duration)
        let bucket = Self.latencyBuckets.firstIndex { seconds <= $0 } ?? Self.latencyBuckets.count
        tallies.withLock { tallies in
            tallies.latencyCounts[bucket] += 1
            tallies.latencySum += seconds
            if let errorName { tallies.errors["read " + errorName, default: 0] += 1 }
        }
    }

    /// A file request the kernel sent: each is a round trip a client's open or close may wait for.
    public enum FileRequest: String { case open, flush, release }

    public func kernelSent(_ request: FileRequest) {
        switch request {
        case .open: opens.add(1, ordering: .relaxed)
        case .flush: flushes.add(1, ordering: .relaxed)
        case .release: releases.add(1, ordering: .relaxed)
        }
    }

    public func count(error kind: String) {
        tallies.withLock { $0.errors[kind, default: 0] += 1 }
    }

    // MARK: Reading

    public func snapshot(cache: MountStatisticsSnapshot.Cache) -> MountStatisticsSnapshot {
        let tallies = tallies.withLock { $0 }
        var cumulative: Int64 = 0
        let buckets = tallies.latencyCounts.dropLast().enumerated().map { index, count in
            cumulative += count
            return MountStatisticsSnapshot.Bucket(le: Self.latencyBuckets[index], count: cumulative)
        }
        let reads = tallies.latencyCounts.reduce(0, +)
        return MountStatisticsSnapshot(
            uptimeSeconds: Self.seconds(ContinuousClock.now - started),
            remoteBytes: remoteBytes.load(ordering: .relaxed),
            servedBytes: servedBytes.load(ordering: .relaxed),
            cacheHitBytes: hitBytes.load(ordering: .relaxed),
            cacheMissBytes: missBytes.load(ordering: .relaxed),
            cacheHitBlobs: tallies.blobsRead.values.filter { $0 }.count,
            cacheMissBlobs: tallies.blobsRead.values.filter { !$0 }.count,
            downloadsInFlight: downloadsInFlight.load(ordering: .relaxed),
            uploadsInFlight: uploadsInFlight.load(ordering: .relaxed),
            uploadedBytes: uploadedBytes.load(ordering: .relaxed),
            reads: reads,
            readLatency: MountStatisticsSnapshot.Latency(
                buckets: buckets, count: reads, sumSeconds: tallies.latencySum,
                p50Seconds: Self.quantile(0.5, tallies.latencyCounts), p90Seconds: Self.quantile(0.9, tallies.latencyCounts),
                p99Seconds: Self.quantile(0.99, tallies.latencyCounts)),
            errors: tallies.errors,
            fileRequests: [FileRequest.open.rawValue: opens.load(ordering: .relaxed),
                           FileRequest.flush.rawValue: flushes.load(ordering: .relaxed),
                           FileRequest.release.rawValue: releases.load(ordering: .relaxed)],
            cache: cache)
    }

    /// The upper bound of the bucket the quantile falls in (what a histogram can say); nil
    /// before any read, infinity past the last bound.
    static func quantile(_ q: Double, _ counts: [Int64]) -> Double? {
        let total = counts.reduce(0, +)
        guard total > 0 else { return nil }
        let rank = Int64((Double(total) * q).rounded(.up))
        var seen: Int64 = 0
        for (index, count) in counts.enumerated() {
            seen += count
            if seen >= rank { return index < latencyBuckets.count ? latencyBuckets[index] : .infinity }
        }
        return .infinity
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) * 1e-18
    }
}

/// A mount's statistics at one moment, as `ocicachefs stats --json` prints them.
public struct MountStatisticsSnapshot: Codable, Sendable, Equatable {
    public struct Bucket: Codable, Sendable, Equatable {
        /// Reads that took at most `le` seconds (cumulative, as Prometheus counts).
        public var le: Double
        public var count: Int64
    }

    public struct Latency: Codable, Sendable, Equatable {
        public var buckets: [Bucket]
        public var count: Int64
        public var sumSeconds: Double
        public var p50Seconds: Double?
        public var p90Seconds: Double?
        public var p99Seconds: Double?
    }

    public struct Cache: Codable, Sendable, Equatable {
        public var directory: String
        public var bytes: Int64
        public var blobs: Int
        public var limitBytes: Int64?
        public var minFreeBytes: Int64?

        public init(directory: String, bytes: Int64, blobs: Int, limitBytes: Int64?, minFreeBytes: Int64?) {
            self.directory = directory
            self.bytes = bytes
            self.blobs = blobs
            self.limitBytes = limitBytes
            self.minFreeBytes = minFreeBytes
        }
    }

    public var uptimeSeconds: Double
    public var remoteBytes: Int64
    public var servedBytes: Int64
    public var cacheHitBytes: Int64
    public var cacheMissBytes: Int64
    public var cacheHitBlobs: Int
    public var cacheMissBlobs: Int
    public var downloadsInFlight: Int
    public var uploadsInFlight: Int
    public var uploadedBytes: Int64
    public var reads: Int64
    public var readLatency: Latency
    public var errors: [String: Int64]
    /// Opens, flushes and releases of files the kernel sent, by name.
    public var fileRequests: [String: Int64]
    public var cache: Cache
}

extension MountStatisticsSnapshot {
    /// Prometheus' text format (version 0.0.4), every series labelled with the mountpoint.
    public func prometheusText(mountpoint: String) -> String {
        let mount = "mountpoint=\"\(Self.escapeLabel(mountpoint))\""
        var text = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: String)]) {
            text += "# HELP ocicachefs_\(name) \(help)\n# TYPE ocicachefs_\(name) \(type)\n"
            for sample in samples {
                let labels = sample.labels.isEmpty ? mount : mount + "," + sample.labels
                text += "ocicachefs_\(name){\(labels)} \(sample.value)\n"
            }
        }
        func one(_ name: String, _ type: String, _ help: String, _ value: Int64) {
            metric(name, type, help, [("", String(value))])
        }
        one("remote_bytes_total", "counter", "Bytes of blobs received from the remote.", remoteBytes)
        one("served_bytes_total", "counter", "Bytes of files read through the mount.", servedBytes)
        one("cache_hit_bytes_total", "counter", "Bytes of blob reads found in the local cache.", cacheHitBytes)
        one("cache_miss_bytes_total", "counter", "Bytes of blob reads that waited for the remote.", cacheMissBytes)
        one("cache_hit_blobs_total", "counter", "Blobs whose first read found its bytes in the local cache.", Int64(cacheHitBlobs))
        one("cache_miss_blobs_total", "counter", "Blobs whose first read waited for the remote.", Int64(cacheMissBlobs))
        one("downloads_in_flight", "gauge", "Downloads from the remote now.", Int64(downloadsInFlight))
        one("uploads_in_flight", "gauge", "Blob uploads to the remote now (writable mounts).", Int64(uploadsInFlight))
        one("uploaded_bytes_total", "counter", "Bytes of blobs sent to the remote (writable mounts).", uploadedBytes)
        let buckets = readLatency.buckets.map { (labels: "le=\"\(Self.number($0.le))\"", value: String($0.count)) }
            + [(labels: "le=\"+Inf\"", value: String(readLatency.count))]
        text += "# HELP ocicachefs_read_duration_seconds Time from the kernel's read request to its answer.\n"
        text += "# TYPE ocicachefs_read_duration_seconds histogram\n"
        for bucket in buckets { text += "ocicachefs_read_duration_seconds_bucket{\(mount),\(bucket.labels)} \(bucket.value)\n" }
        text += "ocicachefs_read_duration_seconds_sum{\(mount)} \(Self.number(readLatency.sumSeconds))\n"
        text += "ocicachefs_read_duration_seconds_count{\(mount)} \(readLatency.count)\n"
        metric("errors_total", "counter", "Failures by kind: reads by errno, downloads, uploads.",
               errors.sorted { $0.key < $1.key }.map { (labels: "kind=\"\(Self.escapeLabel($0.key))\"", value: String($0.value)) })
        metric("file_requests_total", "counter", "Opens, flushes and releases of files the kernel sent.",
               fileRequests.sorted { $0.key < $1.key }.map { (labels: "request=\"\($0.key)\"", value: String($0.value)) })
        one("cache_bytes", "gauge", "Bytes of blobs in the cache directory.", cache.bytes)
        one("cache_blobs", "gauge", "Complete blobs in the cache directory.", Int64(cache.blobs))
        if let limit = cache.limitBytes { one("cache_limit_bytes", "gauge", "The cache directory's size cap.", limit) }
        if let minFree = cache.minFreeBytes { one("cache_min_free_bytes", "gauge", "Free space the cache leaves on its filesystem.", minFree) }
        return text
    }

    static func escapeLabel(_ value: String) -> String {
        value.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"").replacing("\n", with: "\\n")
    }

    static func number(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : "\(value)"
    }
}
