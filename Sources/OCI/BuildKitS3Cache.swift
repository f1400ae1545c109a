import SystemSupport

/// BuildKit's `type=s3` cache keeps a tag in one object, `manifests/<name>`: the cache config
/// itself, each of its layers annotated with what a descriptor would say of it (`mediaType`,
/// `diffID`, `size`, `createdAt`). These convert between that object and the manifests of a
/// `type=local` cache, in both directions, as BuildKit's S3 exporter and importer do.
public enum BuildKitS3Cache {
    /// The layers and the cache config of a BuildKit cache manifest of either variant: an index
    /// listing the layers and one cache-config descriptor, or an image manifest whose config is
    /// the cache config. A plain image (an inline cache) has no cache config and is refused.
    public static func parts(of manifest: ManifestContent) throws(ManifestError) -> (layers: [Descriptor], cacheConfig: Descriptor) {
        switch manifest {
        case .index(_, let manifests):
            guard let config = manifest.buildkitCacheConfig else {
                throw ManifestError("the index lists no \(MediaType.buildkitCacheConfig) descriptor; not a BuildKit cache")
            }
            return (manifests.filter { $0.mediaType != MediaType.buildkitCacheConfig }, config)
        case .image(_, let config, let layers):
            guard config.mediaType == MediaType.buildkitCacheConfig else {
                throw ManifestError("the image manifest's config is \(config.mediaType.escapingControlCharacters), "
                                    + "not \(MediaType.buildkitCacheConfig); not a BuildKit cache")
            }
            return (layers, config)
        }
    }

    /// BuildKit's index variant of a cache manifest, which every BuildKit version imports (the
    /// image-manifest variant only v0.12 and later): an OCI image index whose `manifests` are
    /// the layers, then the cache config. Written as BuildKit writes it (its members in Go's
    /// order, annotations sorted), so the same input always gives the same bytes and digest.
    public static func indexManifest(layers: [Descriptor], cacheConfig: Descriptor) -> [UInt8] {
        OrderedJSON.object([
            .init("schemaVersion", .number("2")),
            .init("mediaType", .string(MediaType.ociIndex)),
            .init("manifests", .array((layers + [cacheConfig]).map(descriptorJSON))),
        ]).serialized
    }

    /// An OCI descriptor as Go's image-spec type writes it.
    static func descriptorJSON(_ descriptor: Descriptor) -> OrderedJSON {
        var members: [OrderedJSON.Member] = [
            .init("mediaType", .string(descriptor.mediaType)),
            .init("digest", .string(descriptor.digest.description)),
            .init("size", .number(String(descriptor.size))),
        ]
        if let annotations = descriptor.annotations, !annotations.isEmpty {
            let sorted = annotations.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) }
            members.append(.init("annotations", .object(sorted.map { .init($0.key, .string($0.value)) })))
        }
        return .object(members)
    }

    /// The S3 manifest object BuildKit's exporter writes for this cache config: the config with,
    /// on each layer, `annotations` taken from that layer's descriptor in `layers` (the
    /// manifest's). Everything else (records, members unknown here, their order) is kept as
    /// the config has it. Refused: a descriptor without a `containerd.io/uncompressed` digest
    /// (BuildKit cannot import a layer without its diffID), and a config layer no descriptor
    /// describes.
    public static func manifestObject(cacheConfig: [UInt8], layers: [Descriptor]) throws(ManifestError) -> [UInt8] {
        for layer in layers where layer.annotations?[Annotation.uncompressed].flatMap({ Digest($0) }) == nil {
            throw ManifestError("layer \(layer.digest) has no \(Annotation.uncompressed) annotation (its diffID), "
                                + "which BuildKit's S3 cache needs")
        }
        let byDigest = Dictionary(layers.map { ($0.digest, $0) }, uniquingKeysWith: { first, _ in first })
        let config: OrderedJSON
        do {
            config = try OrderedJSON.parse(cacheConfig)
        } catch {
            throw ManifestError("the cache config is not JSON: \(error)")
        }
        guard case .object = config, let entries = config["layers"]?.arrayValue else {
            throw ManifestError("the cache config has no layers list")
        }
        var annotated: [OrderedJSON] = []
        for (index, entry) in entries.enumerated() {
            guard let blob = entry["blob"]?.stringValue.flatMap({ Digest($0) }) else {
                throw ManifestError("layer \(index) of the cache config has no blob digest")
            }
            guard let descriptor = byDigest[blob] else {
                throw ManifestError("the cache config's layer \(blob) is not in the manifest")
            }
            annotated.append(entry.setting("annotations", to: s3Annotations(descriptor)))
        }
        return config.setting("layers", to: .array(annotated)).serialized
    }

    /// BuildKit's `LayerAnnotations`, in its member order.
    private static func s3Annotations(_ layer: Descriptor) -> OrderedJSON {
        var members: [OrderedJSON.Member] = []
        if !layer.mediaType.isEmpty { members.append(.init("mediaType", .string(layer.mediaType))) }
        members.append(.init("diffID", .string(layer.annotations?[Annotation.uncompressed] ?? "")))
        members.append(.init("size", .number(String(layer.size))))
        if let createdAt = layer.annotations?[Annotation.buildkitCreatedAt] {
            members.append(.init("createdAt", .string(createdAt)))
        }
        return .object(members)
    }
}
