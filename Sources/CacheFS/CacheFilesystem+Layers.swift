import ContentCache
import FoundationEssentials
import LayerView
import OCI

extension CacheFilesystem {
    /// Every layer descriptor the tags reach (through indexes and image manifests) whose media
    /// type names a tar we can present, with its diffID: the descriptor's
    /// `containerd.io/uncompressed` annotation (BuildKit's caches, and the S3 manifest's
    /// `diffID` through it), else the image config's `rootfs.diff_ids` at its position.
    static func layerSpecs(_ snapshot: CacheSnapshot) -> [Digest: LayerSpec] {
        var specs: [Digest: LayerSpec] = [:]
        var visited: Set<Digest> = []
        func add(_ descriptor: Descriptor, diffID: Digest?) {
            guard let compression = LayerCompression(mediaType: descriptor.mediaType),
                  snapshot.lazyBlobs[descriptor.digest] == descriptor.size else { return }
            let annotated = descriptor.annotations?[Annotation.uncompressed].flatMap { Digest($0) }
            let known = annotated ?? diffID ?? specs[descriptor.digest]?.diffID
            specs[descriptor.digest] = LayerSpec(digest: descriptor.digest, size: descriptor.size, compression: compression, diffID: known)
        }
        func visit(_ manifest: Descriptor) {
            guard visited.insert(manifest.digest).inserted, let bytes = snapshot.smallBlobs[manifest.digest],
                  let content = try? ManifestContent.parse(bytes, contentType: manifest.mediaType.isEmpty ? nil : manifest.mediaType) else { return }
            switch content {
            case .index(_, let entries):
                for entry in entries {
                    if MediaType.indexTypes.contains(entry.mediaType) || MediaType.manifestTypes.contains(entry.mediaType) {
                        visit(entry)
                    } else {
                        add(entry, diffID: nil)
                    }
                }
            case .image(_, let config, let layers):
                let diffIDs = snapshot.smallBlobs[config.digest].flatMap(Self.diffIDs(inConfig:)) ?? []
                for (position, layer) in layers.enumerated() {
                    add(layer, diffID: diffIDs.count == layers.count ? diffIDs[position] : nil)
                }
            }
        }
        for tag in snapshot.tags { visit(tag.manifest) }
        return specs
    }

    private struct ImageConfig: Decodable {
        struct RootFS: Decodable {
            var diff_ids: [String]?
        }
        var rootfs: RootFS?
    }

    /// An image config's `rootfs.diff_ids`; nil for anything else (a BuildKit cache config).
    static func diffIDs(inConfig bytes: [UInt8]) -> [Digest]? {
        guard let config = try? JSONDecoder().decode(ImageConfig.self, from: Data(bytes)),
              let ids = config.rootfs?.diff_ids else { return nil }
        let digests = ids.compactMap { Digest($0) }
        return digests.count == ids.count ? digests : nil
    }
}
