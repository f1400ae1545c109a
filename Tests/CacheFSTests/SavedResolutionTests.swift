import ContentCache
import Foundation
import Logging
import OCI
import RemoteStore
import Testing

@Suite struct SavedResolutionTests {
    let logger = Logger(label: "test")

    @Test func anUnreachableRemoteIsServedFromTheLastResolution() throws {
        let layer = randomBytes(100_000, seed: 20)
        let fixture = try Fixture(layers: [layer])
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let live = try resolve(fixture.source, through: store, logger: logger)

        fixture.source.update { $0.resolutionError = .transport("memory: connection refused") }
        let offline = try resolve(fixture.source, through: store, logger: logger)
        #expect(offline.tags == live.tags)
        #expect(offline.smallBlobs == live.smallBlobs)
        #expect(offline.lazyBlobs == live.lazyBlobs)

        fixture.source.update { $0.resolutionError = .timedOut("memory: no answer") }
        #expect(try resolve(fixture.source, through: store, logger: logger).tags == live.tags)
    }

    @Test func aRefusalIsNeverMaskedByTheSavedResolution() throws {
        let fixture = try Fixture(layers: [randomBytes(1000, seed: 21)])
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        _ = try resolve(fixture.source, through: store, logger: logger)
        for refusal in [RemoteStoreError.unauthorized("no"), .invalidContent("bad manifest")] {
            fixture.source.update { $0.resolutionError = refusal }
            #expect(throws: refusal) { try resolve(fixture.source, through: store, logger: logger) }
        }
    }

    @Test func withoutASavedResolutionTheErrorStands() throws {
        let fixture = try Fixture(layers: [randomBytes(1000, seed: 22)],
                                  behaviour: .init(resolutionError: .transport("memory: connection refused")))
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        #expect(throws: RemoteStoreError.transport("memory: connection refused")) {
            try resolve(fixture.source, through: store, logger: logger)
        }
    }

    @Test func aDamagedSmallBlobVoidsTheSavedResolution() throws {
        let fixture = try Fixture(layers: [randomBytes(1000, seed: 23)])
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let live = try resolve(fixture.source, through: store, logger: logger)
        let manifest = live.tags[0].manifest.digest
        let path = store.completePath(manifest)
        chmod(path, 0o644)
        try Data("{}".utf8).write(to: URL(fileURLWithPath: path))
        fixture.source.update { $0.resolutionError = .transport("memory: connection refused") }
        #expect(throws: RemoteStoreError.transport("memory: connection refused")) {
            try resolve(fixture.source, through: store, logger: logger)
        }
    }
}

extension SavedResolutionTests {
    private func resolutionFile(_ store: ContentStore, _ source: InMemorySource) -> URL {
        URL(fileURLWithPath: store.directory + "/resolutions/" + Digest.sha256(of: Array(source.displayName.utf8)).hex + ".json")
    }

    /// Its lazy blobs were once a JSON array of objects; such a file still serves offline.
    @Test func aResolutionSavedInTheEarlierFormatIsStillRead() throws {
        let fixture = try Fixture(layers: [randomBytes(1000, seed: 24), randomBytes(2000, seed: 25)])
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let live = try resolve(fixture.source, through: store, logger: logger)
        let file = resolutionFile(store, fixture.source)
        var record = try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as! [String: Any]
        #expect(record["lazyBlobSizes"] is String)
        record["lazyBlobSizes"] = nil
        record["lazyBlobs"] = live.lazyBlobs.map { ["digest": $0.key.description, "size": $0.value] }
        try JSONSerialization.data(withJSONObject: record).write(to: file)

        fixture.source.update { $0.resolutionError = .transport("memory: connection refused") }
        let offline = try resolve(fixture.source, through: store, logger: logger)
        #expect(offline.lazyBlobs == live.lazyBlobs)
        #expect(offline.lazyBlobs.count == 2)
    }

    @Test(arguments: ["0123 100\n", "{hex} -5\n", "{hex}\n", "{hex} 12x\n"])
    func aDamagedLazyBlobLineVoidsTheResolution(_ damage: String) throws {
        let fixture = try Fixture(layers: [randomBytes(1000, seed: 26)])
        defer { fixture.removeCache() }
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let live = try resolve(fixture.source, through: store, logger: logger)
        let file = resolutionFile(store, fixture.source)
        var record = try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as! [String: Any]
        record["lazyBlobSizes"] = (record["lazyBlobSizes"] as! String)
            + damage.replacingOccurrences(of: "{hex}", with: live.lazyBlobs.keys.first!.hex)
        try JSONSerialization.data(withJSONObject: record).write(to: file)

        fixture.source.update { $0.resolutionError = .transport("memory: connection refused") }
        #expect(throws: RemoteStoreError.transport("memory: connection refused")) {
            try resolve(fixture.source, through: store, logger: logger)
        }
    }
}

/// As the mount wires it: the remote decides, the store remembers.
private func resolve(_ source: InMemorySource, through store: ContentStore, logger: Logger) throws(RemoteStoreError) -> CacheSnapshot {
    try source.loadSnapshot(remembering: { try store.save($0, for: source.displayName) },
                            recalling: { store.savedResolution(for: source.displayName) }, logger: logger)
}
