import OCI

/// The layers BuildKit reads after the one it reads now. Its local importer copies a cache
/// hit's chain whole, base first, one layer after another: a read of a layer asks the fetcher
/// for every layer after it in its chain, so that they arrive while the reader is busy. The
/// request is renewed while the layer is being read, which keeps those fetches wanted.
struct ChainAhead: Sendable {
    /// The layer built directly on each layer, with its size, from every tag's cache config; a
    /// layer that two configs or two records continue differently has none.
    var successors: [Digest: (digest: Digest, size: Int64)]
    /// When the chain after each layer was last requested.
    private var lastRequested: [Digest: ContinuousClock.Instant] = [:]
    /// Well inside the fetcher's `unwatchedFetchLimit`.
    static let renewal: Duration = .seconds(2)

    init(successors: [Digest: (digest: Digest, size: Int64)]) {
        self.successors = successors
    }

    /// The layers after `layer`, nearest first; nil when it has none or they were requested
    /// less than `renewal` ago.
    mutating func layers(after layer: Digest, now: ContinuousClock.Instant) -> [(digest: Digest, size: Int64)]? {
        guard let first = successors[layer] else { return nil }
        if let last = lastRequested[layer], last.duration(to: now) < Self.renewal { return nil }
        lastRequested[layer] = now
        var chain = [first]
        var seen: Set<Digest> = [layer, first.digest]
        while let next = successors[chain[chain.count - 1].digest], seen.insert(next.digest).inserted {
            chain.append(next)
        }
        return chain
    }
}
