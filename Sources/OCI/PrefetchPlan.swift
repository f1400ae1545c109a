import SystemSupport

/// The blobs an OCI layout's tags reach, found from `index.json` and the small documents it
/// names: what `ocicachefs prefetch` reads through a mount so that they are in the cache.
public struct PrefetchPlan: Sendable, Equatable {
    /// Each blob once, in the order found: a tag's manifest, its config, then its layers.
    public var blobs: [Descriptor]

    /// Child manifests of an index are followed this deep (BuildKit writes one level at most).
    static let maximumDepth = 4

    /// - Parameters:
    ///   - index: the bytes of `index.json`.
    ///   - tags: the tags to follow (`org.opencontainers.image.ref.name`); empty: every entry.
    ///   - layer: only the layers of the cache chain ending at this layer, as the tags' cache
    ///     configs record it.
    ///   - document: the bytes of a manifest or config blob.
    public init(index: [UInt8], tags: [String], chainEndingAt layer: Digest? = nil,
                document: @escaping (Descriptor) throws -> [UInt8]) throws(ManifestError) {
        guard case .index(_, let entries) = try ManifestContent.parse(index) else {
            throw ManifestError("index.json is not an image index")
        }
        var selected = entries
        if !tags.isEmpty {
            let named = entries.compactMap { entry in entry.annotations?[Annotation.refName].map { ($0, entry) } }
            selected = try tags.map { tag throws(ManifestError) in
                guard let entry = named.first(where: { $0.0 == tag })?.1 else {
                    let known = named.map(\.0)
                    throw ManifestError("no tag \(tag.escapingControlCharacters) in index.json (it has: "
                                        + (known.isEmpty ? "none" : known.joined(separator: ", ").escapingControlCharacters) + ")")
                }
                return entry
            }
        }
        var plan = Walk(document: document)
        if let layer {
            for entry in selected { try plan.addChain(endingAt: layer, of: entry) }
            guard !plan.blobs.isEmpty else {
                throw ManifestError("layer \(layer) is in no cache chain of " + (tags.isEmpty ? "any tag" : "tag(s) " + tags.joined(separator: ", ")))
            }
        } else {
            for entry in selected { try plan.addManifest(entry, depth: 0) }
        }
        blobs = plan.blobs
    }

    private struct Walk {
        let document: (Descriptor) throws -> [UInt8]
        var blobs: [Descriptor] = []
        var seen: Set<Digest> = []

        init(document: @escaping (Descriptor) throws -> [UInt8]) { self.document = document }

        mutating func add(_ blob: Descriptor) {
            if seen.insert(blob.digest).inserted { blobs.append(blob) }
        }

        func content(of manifest: Descriptor) throws(ManifestError) -> ManifestContent {
            let bytes: [UInt8]
            do {
                bytes = try document(manifest)
            } catch {
                throw ManifestError("cannot read manifest \(manifest.digest): \(error)")
            }
            do {
                return try ManifestContent.parse(bytes)
            } catch {
                throw ManifestError("manifest \(manifest.digest): \(error.description)")
            }
        }

        mutating func addManifest(_ manifest: Descriptor, depth: Int) throws(ManifestError) {
            add(manifest)
            switch try content(of: manifest) {
            case .image(_, let config, let layers):
                add(config)
                layers.forEach { add($0) }
            case .index(_, let children):
                for child in children {
                    let isManifest = MediaType.indexTypes.contains(child.mediaType) || MediaType.manifestTypes.contains(child.mediaType)
                    if isManifest && depth < PrefetchPlan.maximumDepth {
                        try addManifest(child, depth: depth + 1)
                    } else {
                        add(child)
                    }
                }
            }
        }

        mutating func addChain(endingAt layer: Digest, of manifest: Descriptor) throws(ManifestError) {
            let listed: [Descriptor]
            let config: Descriptor?
            switch try content(of: manifest) {
            case .image(_, let imageConfig, let layers):
                (listed, config) = (layers, imageConfig.mediaType == MediaType.buildkitCacheConfig ? imageConfig : nil)
            case .index(let type, let children):
                (listed, config) = (children, ManifestContent.index(mediaType: type, manifests: children).buildkitCacheConfig)
            }
            guard let config else { return }
            let configBytes: [UInt8]
            do {
                configBytes = try document(config)
            } catch {
                throw ManifestError("cannot read cache config \(config.digest): \(error)")
            }
            guard let chain = CacheChains.chain(endingAt: layer, inConfig: configBytes) else { return }
            for digest in chain {
                guard let descriptor = listed.first(where: { $0.digest == digest }) else {
                    throw ManifestError("cache config \(config.digest) names layer \(digest), which manifest \(manifest.digest) does not list")
                }
                add(descriptor)
            }
        }
    }
}
