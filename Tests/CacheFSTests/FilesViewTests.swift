import CacheFS
import ContentCache
import Foundation
import LayerView
import Logging
import OCI
import ModelTesting
import Testing

// The `files/` view through the core, in process, over the in-memory remote: the tree of a
// layer real tar wrote, reads of its files, the member list kept in the cache directory and
// evicted with its blob, and broken tars.

/// A layer tar of a small tree, compressed with `compressor` (nil: uncompressed).
private func makeLayer(compressor: String?) throws -> (layer: [UInt8], big: [UInt8]) {
    let directory = NSTemporaryDirectory() + "files-view-" + UUID().uuidString
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try FileManager.default.createDirectory(atPath: directory + "/tree/usr/bin", withIntermediateDirectories: true)
    let big = randomBytes(3_000_000, seed: 77)
    try Data(big).write(to: URL(fileURLWithPath: directory + "/tree/usr/bin/big"))
    try shell("""
        cd '\(directory)/tree' && printf 'hello\\n' > usr/hello && ln usr/hello usr/hello-again && ln -s hello usr/link \
        && touch usr/.wh.gone && chmod 0640 usr/hello && chown 12:34 usr/hello \
        && touch -d '2020-01-02 03:04:05' usr/hello && mkfifo usr/fifo
        """)
    try shell("tar -C '\(directory)/tree' --format=pax --sort=name -cf '\(directory)/layer.tar' usr")
    if let compressor { try shell("\(compressor) < '\(directory)/layer.tar' > '\(directory)/layer.out'") } else {
        try shell("cp '\(directory)/layer.tar' '\(directory)/layer.out'")
    }
    return (try Array(Data(contentsOf: URL(fileURLWithPath: directory + "/layer.out"))), big)
}

private let mediaTypes = [
    "gzip -c": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd -c": "application/vnd.oci.image.layer.v1.tar+zstd",
    "": "application/vnd.oci.image.layer.v1.tar",
]

@Suite struct FilesViewTests {
    @Test(arguments: ["gzip -c", "zstd -c", ""])
    func aLayersFilesReadAsTheTarHoldsThem(_ compressor: String) throws {
        let (layer, big) = try makeLayer(compressor: compressor.isEmpty ? nil : compressor)
        let fixture = try Fixture(layers: [layer], layerMediaType: mediaTypes[compressor]!)
        defer { fixture.removeCache() }
        let fs = fixture.filesystem
        let hex = Digest.sha256(of: layer).hex
        #expect(try fs.readdir(fixture.inode("files/sha256")).get().map(\.name) == [".", "..", hex])
        let usr = "files/sha256/\(hex)/usr"
        #expect(try fs.readdir(fixture.inode(usr)).get().map(\.name)
                == [".", "..", ".wh.gone", "bin", "fifo", "hello", "hello-again", "link"])

        let hello = try fs.getattr(fixture.inode(usr + "/hello")).get().attributes
        #expect(hello.type == .regular && hello.permissions == 0o640 && hello.uid == 12 && hello.gid == 34)
        #expect(hello.size == 6 && hello.linkCount == 2)
        #expect(hello.modified.seconds == 1_577_934_245)  // 2020-01-02 03:04:05 UTC
        #expect(try fixture.inode(usr + "/hello-again") == hello.inode)
        #expect(try fixture.read(hello.inode, offset: 0, count: 100).get() == Array("hello\n".utf8))
        #expect(try fixture.read(hello.inode, offset: 6, count: 100).get().isEmpty)
        let link = try fixture.inode(usr + "/link")
        #expect(try fs.getattr(link).get().attributes.type == .symlink && fs.readlink(link).get() == "hello")
        #expect(fs.readlink(hello.inode) == .failure(.invalidArgument))
        #expect(try fs.getattr(fixture.inode(usr + "/fifo")).get().attributes.type == .fifo)
        #expect(try fs.getattr(fixture.inode(usr + "/.wh.gone")).get().attributes.size == 0)
        #expect(try fs.getattr(fixture.inode(usr)).get().attributes.linkCount == 3)

        let bigInode = try fixture.inode(usr + "/bin/big")
        #expect(try fixture.readWhole(bigInode).get() == big)
        #expect(try fixture.read(bigInode, offset: 2_500_000, count: 4096).get() == Array(big[2_500_000..<2_504_096]))
        // The view is read-only, as the layer is.
        #expect(fs.unlink(parent: try fixture.inode(usr), name: "hello").map { 0 } == .failure(.readOnlyFileSystem))
        #expect(fs.open(hello.inode, flags: OpenFlags(O_WRONLY)).map { _ in 0 } == .failure(.readOnlyFileSystem))

        // The member list is kept beside the blob, counts with it and goes with it.
        let membersPath = fixture.cacheDirectory + "/layers/" + hex + ".files"
        #expect(FileManager.default.fileExists(atPath: membersPath))
        fixture.fetcher.waitUntilIdle()
        let store = try ContentStore(directory: fixture.cacheDirectory)
        let digest = Digest.sha256(of: layer)
        let blobBytes = try #require(store.completeBlobs().first { $0.digest == digest }).size
        let membersBytes = try #require(try FileManager.default.attributesOfItem(atPath: membersPath)[.size] as? Int)
        let removed = store.evict(toFit: CacheLimits(maxBytes: 0, minFreeBytes: 0))
        #expect(try #require(removed.first { $0.digest == digest }).size >= blobBytes + Int64(membersBytes))
        #expect(!FileManager.default.fileExists(atPath: membersPath))
    }

    @Test func theNextMountUsesTheSavedMemberList() throws {
        let (layer, _) = try makeLayer(compressor: "gzip -c")
        let first = try Fixture(layers: [layer])
        defer { first.removeCache() }
        let hex = Digest.sha256(of: layer).hex
        _ = try first.inode("files/sha256/\(hex)/usr/hello")
        first.fetcher.waitUntilIdle()
        let membersPath = first.cacheDirectory + "/layers/" + hex + ".files"
        let saved = try Array(Data(contentsOf: URL(fileURLWithPath: membersPath)))
        // A list with one more member than the tar has: the second mount shows it, so it did
        // not walk the tar again.
        var entries = try #require(TarEntryList.parse(saved))
        entries.append(TarEntry(path: "usr/only-in-the-list", kind: .regular))
        try Data(TarEntryList.serialized(entries)).write(to: URL(fileURLWithPath: membersPath))
        let second = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory)
        #expect(throws: Never.self) { try second.inode("files/sha256/\(hex)/usr/only-in-the-list") }

        // A damaged list is walked again.
        var damaged = saved
        damaged[damaged.count / 2] ^= 0xFF
        try Data(damaged).write(to: URL(fileURLWithPath: membersPath))
        let third = try Fixture(layers: [layer], cacheDirectory: first.cacheDirectory)
        #expect(throws: FSError.self) { try third.inode("files/sha256/\(hex)/usr/only-in-the-list") }
        #expect(try third.read(third.inode("files/sha256/\(hex)/usr/hello"), offset: 0, count: 6).get() == Array("hello\n".utf8))
    }

    @Test func aBrokenTarGivesEIOForItsTreeAndOthersStillShow() throws {
        let (good, _) = try makeLayer(compressor: nil)
        var badChecksum = good
        badChecksum[0] ^= 0x01
        // Cut in the middle of the 3 MB file: its size runs past the end.
        let truncated = Array(good.prefix(1_000_000))
        let fixture = try Fixture(layers: [good, badChecksum, truncated], layerMediaType: mediaTypes[""]!)
        defer { fixture.removeCache() }
        let sha256 = try fixture.inode("files/sha256")
        for broken in [badChecksum, truncated] {
            let tree = try fixture.inode("files/sha256/" + Digest.sha256(of: broken).hex)
            #expect(fixture.filesystem.readdir(tree).map(\.count) == .failure(.ioError))
            #expect(fixture.filesystem.lookup(parent: tree, name: "usr").map { _ in 0 } == .failure(.ioError))
        }
        #expect(try fixture.filesystem.readdir(sha256).get().count == 5)
        #expect(throws: Never.self) { try fixture.inode("files/sha256/\(Digest.sha256(of: good).hex)/usr/hello") }
    }

    @Test func hostileMembersAreLeftOutAndSparseFilesGiveEIO() throws {
        let directory = NSTemporaryDirectory() + "files-hostile-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try shell("""
            cd '\(directory)' && truncate -s 1M sparse && printf data >> sparse \
            && printf x | dd of=sparse bs=1 seek=4096 conv=notrunc 2>/dev/null && sync sparse \
            && tar --sparse --format=pax -cf layer.tar sparse && python3 - <<'EOF'
            import tarfile, io
            with tarfile.open('layer.tar', 'a', format=tarfile.PAX_FORMAT) as t:
                for name, kind, link in [('../escape', tarfile.REGTYPE, ''), ('/absolute', tarfile.REGTYPE, ''),
                                         ('file', tarfile.REGTYPE, ''), ('file/below', tarfile.REGTYPE, ''),
                                         ('hard', tarfile.LNKTYPE, 'missing'), ('loop', tarfile.SYMTYPE, 'loop'),
                                         ('ok', tarfile.REGTYPE, '')]:
                    info = tarfile.TarInfo(name)
                    info.type = kind
                    info.linkname = link
                    data = b'fine' if name == 'ok' else b''
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
            EOF
            """)
        let layer = try Array(Data(contentsOf: URL(fileURLWithPath: directory + "/layer.tar")))
        let fixture = try Fixture(layers: [layer], layerMediaType: mediaTypes[""]!)
        defer { fixture.removeCache() }
        let tree = "files/sha256/" + Digest.sha256(of: layer).hex
        #expect(try fixture.filesystem.readdir(fixture.inode(tree)).get().map(\.name) == [".", "..", "file", "loop", "ok", "sparse"])
        #expect(try fixture.read(fixture.inode(tree + "/ok"), offset: 0, count: 10).get() == Array("fine".utf8))
        #expect(try fixture.filesystem.readlink(fixture.inode(tree + "/loop")).get() == "loop")
        // GNU tar stores it sparse only when the filesystem says it has holes (after the sync).
        #expect(String(decoding: try shell("strings '\(directory)/layer.tar'"), as: UTF8.self).contains("GNU.sparse.major"))
        let sparse = try fixture.inode(tree + "/sparse")
        #expect(try fixture.filesystem.getattr(sparse).get().attributes.size == (1 << 20) + 4)
        #expect(fixture.read(sparse, offset: 0, count: 10) == .failure(.ioError))
    }

    @Test func refreshShowsTheNewLayersTrees() throws {
        let (first, _) = try makeLayer(compressor: "gzip -c")
        let (second, _) = try makeLayer(compressor: "zstd -c")
        let fixture = try Fixture(layers: [first])
        defer { fixture.removeCache() }
        let sha256 = try fixture.inode("files/sha256")
        _ = try fixture.inode("files/sha256/\(Digest.sha256(of: first).hex)/usr/hello")
        try fixture.filesystem.show(InMemorySource(layers: [second], layerMediaType: mediaTypes["zstd -c"]!).snapshot)
        #expect(try fixture.filesystem.readdir(sha256).get().map(\.name) == [".", "..", Digest.sha256(of: second).hex])
        #expect(fixture.filesystem.lookup(parent: sha256, name: Digest.sha256(of: first).hex).map { _ in 0 } == .failure(.noSuchFileOrDirectory))
    }

    /// A walk that outlasts the wait answers the waiter with an error and goes on; the next
    /// caller gets what it found.
    @Test func aWaitForAWalkIsBoundedAndTheWalkGoesOn() throws {
        let (layer, _) = try makeLayer(compressor: nil)
        // The remote holds its first stream until resumed.
        let fixture = try Fixture(layers: [layer], behaviour: .init(pauseAfter: 0), layerMediaType: mediaTypes[""]!)
        defer { fixture.removeCache() }
        let members = LayerMemberIndex(layers: LayerReader(fetcher: fixture.fetcher, logger: Logger(label: "test")),
                                       logger: Logger(label: "test"))
        let spec = LayerSpec(digest: Digest.sha256(of: layer), size: Int64(layer.count), compression: .none, diffID: nil)
        guard case .failure(.local(let message)) = members.members(of: spec, waitingAtMost: .milliseconds(200)) else {
            Issue.record("the wait was not bounded")
            return
        }
        #expect(message.contains("not known after"))
        // Streams after this one no longer pause.
        fixture.source.update { $0.pauseAfter = nil }
        fixture.source.resume()
        let found = try members.members(of: spec, waitingAtMost: .seconds(600)).get()
        #expect(found.contains { $0.path == "usr/hello" && $0.size == 6 })
    }
}
