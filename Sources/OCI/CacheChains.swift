import FoundationEssentials

/// The layer chains of a BuildKit cache config (`application/vnd.buildkit.cacheconfig.v0`):
/// each entry of its `layers` names a blob and the entry of its parent layer.
public enum CacheChains {
    private struct Config: Decodable {
        struct Layer: Decodable {
            var blob: String
            /// BuildKit writes it with Go's `omitempty`: absent means entry 0; -1 is a base layer.
            var parent: Int?
        }
        var layers: [Layer]
    }

    /// For each layer blob, the one blob built directly on it. A blob that several chains
    /// continue differently has no entry. Nil when the bytes are not a cache config.
    public static func successors(inConfig bytes: [UInt8]) -> [Digest: Digest]? {
        guard let config = try? JSONDecoder().decode(Config.self, from: Data(bytes)) else { return nil }
        var children: [Digest: Set<Digest>] = [:]
        for (index, layer) in config.layers.enumerated() {
            let parentIndex = layer.parent ?? 0
            guard parentIndex != index, config.layers.indices.contains(parentIndex),
                  let parent = Digest(config.layers[parentIndex].blob), let child = Digest(layer.blob), parent != child
            else { continue }
            children[parent, default: []].insert(child)
        }
        return children.compactMapValues { $0.count == 1 ? $0.first : nil }
    }
}

extension CacheChains {
    /// The layers from the base of `layer`'s chain up to `layer` itself, base first; nil when the
    /// config does not list it or is not a cache config. Where BuildKit recorded a layer more
    /// than once, the first entry's ancestry is taken; a parent loop ends the walk.
    public static func chain(endingAt layer: Digest, inConfig bytes: [UInt8]) -> [Digest]? {
        guard let config = try? JSONDecoder().decode(Config.self, from: Data(bytes)),
              var index = config.layers.firstIndex(where: { Digest($0.blob) == layer }) else { return nil }
        var chain: [Digest] = []
        var visited: Set<Int> = []
        while visited.insert(index).inserted, let digest = Digest(config.layers[index].blob) {
            chain.append(digest)
            let parent = config.layers[index].parent ?? 0
            guard parent != index, config.layers.indices.contains(parent) else { break }
            index = parent
        }
        return chain.reversed()
    }
}
