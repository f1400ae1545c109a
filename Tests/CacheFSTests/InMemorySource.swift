import Foundation
import OCI
import RemoteStore
import Synchronization

/// A remote cache held in memory, with the faults the read path must survive.
final class InMemorySource: RemoteCacheSource {
    struct Behaviour {
        /// Bytes sent instead of the real content (a lying server).
        var substitutes: [Digest: [UInt8]] = [:]
        /// The next stream of any blob breaks after this many bytes.
        var breakNextStreamAfter: Int?
        /// Every stream breaks once it reaches this offset of the blob.
        var breakEveryStreamAt: Int?
        /// Ranges are ignored and the whole blob resent.
        var ignoresRanges = false
        /// Streams pause after this many bytes until `resume()`.
        var pauseAfter: Int?
        var failEverything = false
        /// What resolving the source throws, if anything.
        var resolutionError: RemoteStoreError?
        /// Sizes the descriptors declare instead of the real ones (a lying manifest).
        var declaredSizes: [Digest: Int64] = [:]
    }

    let displayName = "memory"
    let blobs: [Digest: [UInt8]]
    let snapshot: CacheSnapshot
    private let behaviour: Mutex<Behaviour>
    private let requests = Mutex<[(digest: Digest, range: ClosedRange<Int64>)]>([])
    private let sent = Mutex<[Range<Int64>]>([])
    private let pause = DispatchSemaphore(value: 0)
    private let chunkSize: Int

    /// - Parameter chained: the cache config chains the layers in order, each on the one before.
    /// `layerMediaType`: what the descriptors call the layers (the `layers/` view presents them
    /// as that kind of tar).
    init(layers: [[UInt8]], behaviour: Behaviour = Behaviour(), chunkSize: Int = 64 << 10, chained: Bool = false,
         layerMediaType: String = "application/vnd.oci.image.layer.v1.tar+gzip") {
        var blobs: [Digest: [UInt8]] = [:]
        var snapshot = CacheSnapshot()
        // BuildKit's form: `parent` -1 for a base layer, left out (Go's omitempty) for entry 0.
        let entries = layers.indices.map { index in
            let parent = index == 0 ? #","parent":-1"# : index == 1 ? "" : #","parent":\#(index - 1)"#
            return #"{"blob":"\#(Digest.sha256(of: layers[index]))"\#(parent)}"#
        }
        let config = Array(#"{"layers":[\#(chained ? entries.joined(separator: ",") : "")],"records":[]}"#.utf8)
        let configDigest = Digest.sha256(of: config)
        var layerDescriptors: [Descriptor] = []
        for layer in layers {
            let digest = Digest.sha256(of: layer)
            blobs[digest] = layer
            layerDescriptors.append(Descriptor(mediaType: layerMediaType, digest: digest,
                                               size: behaviour.declaredSizes[digest] ?? Int64(layer.count)))
            snapshot.addLazyBlob(layerDescriptors.last!)
        }
        struct Manifest: Encodable {
            var schemaVersion = 2
            var mediaType = MediaType.ociManifest
            var config: Descriptor
            var layers: [Descriptor]
        }
        let manifest = OCILayout.canonicalJSON(Manifest(
            config: Descriptor(mediaType: MediaType.buildkitCacheConfig, digest: configDigest, size: Int64(config.count)),
            layers: layerDescriptors))
        let manifestDigest = Digest.sha256(of: manifest)
        snapshot.addSmallBlob(configDigest, config)
        snapshot.addSmallBlob(manifestDigest, manifest)
        snapshot.tags = [.init(tag: "latest", manifest: Descriptor(mediaType: MediaType.ociManifest, digest: manifestDigest, size: Int64(manifest.count)))]
        self.blobs = blobs
        self.snapshot = snapshot
        self.behaviour = Mutex(behaviour)
        self.chunkSize = chunkSize
    }

    /// Offsets of every stream started, in order.
    var streamsStarted: [Int64] { requests.withLock { $0.map(\.range.lowerBound) } }

    /// The byte ranges asked for, in order (an open-ended request runs to the blob's end).
    var requestedRanges: [ClosedRange<Int64>] { requests.withLock { $0.map(\.range) } }

    /// The byte ranges asked for of one blob, in order.
    func requestedRanges(of digest: Digest) -> [ClosedRange<Int64>] {
        requests.withLock { $0.filter { $0.digest == digest }.map(\.range) }
    }

    /// How many times the most fetched byte was sent.
    func maximumSendsPerByte() -> Int {
        let events = sent.withLock { $0 }.flatMap { range -> [(Int64, Int)] in
            [(range.lowerBound, 1), (range.upperBound, -1)]
        }.sorted { ($0.0, $0.1) < ($1.0, $1.1) }
        var depth = 0, deepest = 0
        for (_, change) in events {
            depth += change
            deepest = max(deepest, depth)
        }
        return deepest
    }

    /// Bytes sent in all.
    func bytesSent() -> Int64 {
        sent.withLock { $0 }.reduce(0) { $0 + Int64($1.count) }
    }

    func update(_ change: (inout Behaviour) -> Void) { behaviour.withLock { change(&$0) } }

    func resume() { pause.signal() }

    func loadSnapshot() throws(RemoteStoreError) -> CacheSnapshot {
        if let error = behaviour.withLock({ $0.resolutionError }) { throw error }
        return snapshot
    }

    func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                    onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        requests.withLock { $0.append((digest, offset...(last ?? Int64.max - 1))) }
        let current = behaviour.withLock { behaviour -> Behaviour in
            let snapshot = behaviour
            behaviour.breakNextStreamAfter = nil
            return snapshot
        }
        if current.failEverything { throw RemoteStoreError.transport("memory: unreachable") }
        guard let real = blobs[digest] else { throw RemoteStoreError.notFound("memory: no blob \(digest)") }
        let content = current.substitutes[digest] ?? real
        let start = current.ignoresRanges ? 0 : Int(offset)
        let stop = current.ignoresRanges ? content.count : min(content.count, last.map { Int($0) + 1 } ?? content.count)
        try onStart(Int64(start))
        var position = start
        var sent = 0
        defer { self.sent.withLock { $0.append(Int64(start)..<Int64(start + sent)) } }
        while position < stop {
            if let limit = current.breakNextStreamAfter, sent >= limit {
                throw RemoteStoreError.transport("memory: connection reset")
            }
            if let offset = current.breakEveryStreamAt, position >= offset {
                throw RemoteStoreError.transport("memory: connection reset at \(offset)")
            }
            if let pauseAfter = current.pauseAfter, sent >= pauseAfter, sent - chunkSize < pauseAfter {
                pause.wait()
            }
            var end = min(stop, position + chunkSize)
            if let offset = current.breakEveryStreamAt, position < offset { end = min(end, offset) }
            try content[position..<end].withUnsafeBytes { try onBody($0) }
            sent += end - position
            position = end
        }
    }
}

func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}
