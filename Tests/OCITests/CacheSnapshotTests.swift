import OCI
import Testing

@Suite("CacheSnapshot")
struct CacheSnapshotTests {
    private func descriptor(_ name: String, size: Int64) -> Descriptor {
        Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: Array(name.utf8)), size: size)
    }

    /// Merging parts resolved apart gives what adding the same blobs one after another gives:
    /// a blob that is small anywhere is small, not lazy.
    @Test func mergingPartsEqualsAddingInOrder() {
        let shared = descriptor("shared", size: 10)
        let layer = descriptor("layer", size: 20)
        let config = descriptor("config", size: 3)

        var first = CacheSnapshot()
        first.addLazyBlob(shared)
        first.addLazyBlob(layer)
        first.warnings = ["one"]
        var second = CacheSnapshot()
        second.addSmallBlob(shared.digest, [1, 2, 3])
        second.addSmallBlob(config.digest, [4, 5, 6])
        second.addLazyBlob(layer)
        second.warnings = ["two"]

        var merged = CacheSnapshot()
        merged.merge(first)
        merged.merge(second)

        var sequential = CacheSnapshot()
        sequential.addLazyBlob(shared)
        sequential.addLazyBlob(layer)
        sequential.addSmallBlob(shared.digest, [1, 2, 3])
        sequential.addSmallBlob(config.digest, [4, 5, 6])
        sequential.addLazyBlob(layer)

        #expect(merged.smallBlobs == sequential.smallBlobs)
        #expect(merged.lazyBlobs == sequential.lazyBlobs)
        #expect(merged.lazyBlobs == [layer.digest: 20])
        #expect(merged.warnings == ["one", "two"])

        // A lazy blob arriving after the same digest was small stays small.
        var later = CacheSnapshot()
        later.addLazyBlob(shared)
        merged.merge(later)
        #expect(merged.lazyBlobs[shared.digest] == nil)
    }
}
