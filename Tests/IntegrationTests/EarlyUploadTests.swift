import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Uploads that begin before a blob's commit, through a real writable mount of docker-registry:
// what the registry's storage holds of an upload session shows the bytes arriving while the
// client still writes them, and that sessions of files that never become blobs are removed.

@Suite("writable mounts: large blobs stream to the registry while they are written")
struct EarlyUploadTests {
    /// Bytes the registry holds in open upload sessions of the test repository.
    private static func sessionBytes(_ remote: ExportRemote) -> Int64 {
        let uploads = remote.registry!.dir + "/docker/registry/v2/repositories/\(ExportRemote.repository)/_uploads"
        return FileIO.listDirectory(uploads).reduce(Int64(0)) { total, session in
            var info = stat()
            return total + (stat(uploads + "/" + session + "/data", &info) == 0 ? Int64(info.st_size) : 0)
        }
    }

    /// Upload sessions that hold data: distribution's DELETE of a session removes its data (and
    /// leaves an empty hash state behind).
    private static func openSessions(_ remote: ExportRemote) -> [String] {
        let uploads = remote.registry!.dir + "/docker/registry/v2/repositories/\(ExportRemote.repository)/_uploads"
        return FileIO.listDirectory(uploads).filter { FileManager.default.fileExists(atPath: uploads + "/" + $0 + "/data") }
    }

    /// Writes `bytes` at `offset` in 1 MiB pieces into an open file, as BuildKit writes a blob.
    static func write(_ fd: Int32, _ bytes: ArraySlice<UInt8>, at offset: Int) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, min(1 << 20, $0.count - done), off_t(offset + done)) }
            guard n > 0 else { throw HarnessError("pwrite failed: errno \(errno)") }
            done += n
        }
    }

    @Test("a large blob written in order is in the registry's upload session before its rename; the rename publishes it with the closing PUT alone, and no session is left")
    func aLargeBlobStreamsBeforeItsRename() async throws {
        try await withWorkspace("early") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let mark = remote.requests().count
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let bytes = try #require(BuildCache.Layer.random(seed: 77, size: 24 << 20).bytes)
            let digest = Digest.sha256(of: bytes)

            #expect(mkdir(root + "/ingest/big", 0o755) == 0)
            let data = root + "/ingest/big/data"
            let fd = try BuildctlExport.openFile(data, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            try Self.write(fd, bytes[..<(20 << 20)], at: 0)
            let streamed = await LifecycleTests.eventually(30) { Self.sessionBytes(remote) >= 16 << 20 }
            #expect(streamed, "the registry holds \(Self.sessionBytes(remote)) bytes of the blob before its rename")
            try Self.write(fd, bytes[(20 << 20)...], at: 20 << 20)
            #expect(fsync(fd) == 0 && close(fd) == 0)
            #expect(rename(data, root + "/blobs/sha256/" + digest.hex) == 0)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            let writes = remote.blobWrites(remote.requests()[mark...])
            #expect(writes.map(\.method) == ["POST", "PATCH", "PUT"], "one session, one streamed PATCH, the closing PUT: \(writes)")
            #expect(remote.uploadedBlobs(remote.requests()[mark...]) == [digest.description])
            #expect(try await remote.blobs([digest])[digest] == bytes)
            #expect(Self.openSessions(remote).isEmpty, "no upload session is left: \(Self.openSessions(remote))")
        }
    }

    @Test("a large file streamed early and then refused at its rename, removed, or rewritten out of order leaves no session and no wrong blob; the rewritten one is published as committed")
    func earlyBytesOfFilesThatDoNotBecomeBlobsAreDropped() async throws {
        try await withWorkspace("earlydrop") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let size = 12 << 20

            // Refused at its rename (its content is not its name).
            let refusedBytes = try #require(BuildCache.Layer.random(seed: 78, size: size).bytes)
            #expect(mkdir(root + "/ingest/refused", 0o755) == 0)
            let refused = root + "/ingest/refused/data"
            try BuildctlExport.writeFile(refused, refusedBytes, flags: O_WRONLY | O_CREAT | O_TRUNC)
            #expect(await LifecycleTests.eventually(30) { Self.sessionBytes(remote) >= Int64(size - (1 << 20)) }, "streamed: \(Self.sessionBytes(remote))")
            let wrongName = Digest.sha256(of: Array(refusedBytes.reversed())).hex
            #expect(FileIO.errnoOf { rename(refused, root + "/blobs/sha256/" + wrongName) } == EIO)
            #expect(await LifecycleTests.eventually(30) { Self.openSessions(remote).isEmpty }, "the session is deleted: \(Self.openSessions(remote))")

            // Removed without a rename.
            let removedBytes = try #require(BuildCache.Layer.random(seed: 79, size: size).bytes)
            #expect(mkdir(root + "/ingest/removed", 0o755) == 0)
            let removed = root + "/ingest/removed/data"
            try BuildctlExport.writeFile(removed, removedBytes, flags: O_WRONLY | O_CREAT | O_TRUNC)
            #expect(await LifecycleTests.eventually(30) { Self.sessionBytes(remote) >= Int64(size - (1 << 20)) }, "streamed: \(Self.sessionBytes(remote))")
            #expect(unlink(removed) == 0)
            #expect(await LifecycleTests.eventually(30) { Self.openSessions(remote).isEmpty }, "the session is deleted: \(Self.openSessions(remote))")

            // Rewritten at its start after streaming began, then committed under its final digest.
            var rewrittenBytes = try #require(BuildCache.Layer.random(seed: 80, size: size).bytes)
            #expect(mkdir(root + "/ingest/rewritten", 0o755) == 0)
            let rewritten = root + "/ingest/rewritten/data"
            let fd = try BuildctlExport.openFile(rewritten, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            try Self.write(fd, rewrittenBytes[...], at: 0)
            #expect(await LifecycleTests.eventually(30) { Self.sessionBytes(remote) >= Int64(size - (1 << 20)) }, "streamed: \(Self.sessionBytes(remote))")
            for index in 0..<(1 << 20) { rewrittenBytes[index] ^= 0xFF }
            try Self.write(fd, rewrittenBytes[..<(1 << 20)], at: 0)
            #expect(fsync(fd) == 0 && close(fd) == 0)
            let final = Digest.sha256(of: rewrittenBytes)
            #expect(rename(rewritten, root + "/blobs/sha256/" + final.hex) == 0)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            #expect(try await remote.blobs([final])[final] == rewrittenBytes, "the committed bytes, not the streamed ones")
            let refusedDigest = Digest.sha256(of: refusedBytes), removedDigest = Digest.sha256(of: removedBytes)
            #expect(try await remote.blobs([refusedDigest, removedDigest]).isEmpty, "no blob of the dropped files")
            #expect(Self.openSessions(remote).isEmpty, "no upload session is left: \(Self.openSessions(remote))")
        }
    }

    // MARK: S3: blobs the client announced

    /// Makes `ingest/<name>/` with the `ref` and `total` containerd writes before `data`.
    private static func announce(_ directory: String, ref: String, size: Int) throws {
        guard mkdir(directory, 0o755) == 0 else { throw HarnessError("mkdir \(directory): errno \(errno)") }
        try BuildctlExport.writeFile(directory + "/ref", Array(ref.utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
        try BuildctlExport.writeFile(directory + "/total", Array(String(size).utf8), flags: O_WRONLY | O_CREAT | O_TRUNC)
    }

    /// Bytes the server's side of every TCP connection to `port` acknowledged (`ss`'s
    /// `bytes_acked`, counted by the kernel): what was sent, whether or not a request ended.
    private static func bytesAcknowledged(byPort port: Int, in ws: Workspace) throws -> Int64 {
        let ss = try Harness.tool("ss", neededFor: "counting the bytes sent to the S3 server (Debian package iproute2)")
        guard let listing = Processes.runSync(ss, ["-tinH", "dport = :\(port)"], in: ws), listing.status == 0 else {
            throw HarnessError("ss could not list the connections to port \(port)")
        }
        return listing.stdout.split(whereSeparator: { $0.isWhitespace }).reduce(Int64(0)) { total, field in
            field.hasPrefix("bytes_acked:") ? total + (Int64(field.dropFirst("bytes_acked:".count)) ?? 0) : total
        }
    }

    @Test("a blob announced in its ingest's ref and total streams to S3 while it is written, and S3 stores it only once its rename checked it: one PutObject in all")
    func anAnnouncedBlobStreamsToS3BeforeItsRename() async throws {
        try await withWorkspace("earlys3") { ws in
            let remote = try await ExportRemote.start(.s3, in: ws)
            let mark = remote.requests().count
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let bytes = try #require(BuildCache.Layer.random(seed: 81, size: 24 << 20).bytes)
            let digest = Digest.sha256(of: bytes)
            let before = try Self.bytesAcknowledged(byPort: remote.port, in: ws)

            try Self.announce(root + "/ingest/big", ref: "layer-" + digest.description, size: bytes.count)
            let data = root + "/ingest/big/data"
            let fd = try BuildctlExport.openFile(data, O_WRONLY | O_CREAT, 0o644)
            try Self.write(fd, bytes[...], at: 0)
            #expect(fsync(fd) == 0 && close(fd) == 0)
            var sent: Int64 = 0
            let streamed = await LifecycleTests.eventually(30) {
                sent = ((try? Self.bytesAcknowledged(byPort: remote.port, in: ws)) ?? 0) - before
                return sent >= Int64(bytes.count - (1 << 20))
            }
            #expect(streamed, "S3 acknowledged \(sent) bytes before the rename")
            let storedEarly = try await remote.blobs([digest]).count
            #expect(storedEarly == 0, "nothing is stored before the rename")
            #expect(rename(data, root + "/blobs/sha256/" + digest.hex) == 0)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            let writes = remote.blobWrites(remote.requests()[mark...])
            #expect(writes.map(\.method) == ["PUT"], "one PutObject, the one sent while written: \(writes)")
            #expect(try await remote.blobs([digest])[digest].map { sameBytes($0, bytes) } == true)
        }
    }

    @Test("an ingest whose ref announces other bytes than its data gets nothing stored under the announced name: the data renamed under its own digest is published after its commit, renamed under the announced one it fails with EIO")
    func aFalseAnnouncementStoresNothing() async throws {
        try await withWorkspace("earlys3lie") { ws in
            let remote = try await ExportRemote.start(.s3, in: ws)
            let mount = try await remote.mount(["main"], writable: true)
            let root = mount.mountpoint
            let size = 12 << 20
            let written = try #require(BuildCache.Layer.random(seed: 82, size: size).bytes)
            let other = try #require(BuildCache.Layer.random(seed: 83, size: size).bytes)
            let writtenDigest = Digest.sha256(of: written), announcedDigest = Digest.sha256(of: other)

            // Announced as `other`, renamed under its own digest.
            try Self.announce(root + "/ingest/own", ref: "layer-" + announcedDigest.description, size: size)
            try BuildctlExport.writeFile(root + "/ingest/own/data", written, flags: O_WRONLY | O_CREAT)
            #expect(rename(root + "/ingest/own/data", root + "/blobs/sha256/" + writtenDigest.hex) == 0)

            // Announced as `other`, renamed under that name: the rename checks the bytes.
            let liar = Array(written.reversed())
            try Self.announce(root + "/ingest/liar", ref: "layer-" + announcedDigest.description, size: size)
            try BuildctlExport.writeFile(root + "/ingest/liar/data", liar, flags: O_WRONLY | O_CREAT)
            #expect(FileIO.errnoOf { rename(root + "/ingest/liar/data", root + "/blobs/sha256/" + announcedDigest.hex) } == EIO)

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            let stored = try await remote.blobs([writtenDigest, announcedDigest])
            #expect(stored[writtenDigest].map { sameBytes($0, written) } == true, "the committed bytes under their own digest")
            #expect(!stored.keys.contains(announcedDigest), "nothing under the announced name")
        }
    }

    @Test("an announced blob S3 already holds is not sent again: a second export of it, through another mount and cache directory, only checks for it")
    func anAnnouncedBlobS3HoldsIsNotSentAgain() async throws {
        try await withWorkspace("earlys3held") { ws in
            let remote = try await ExportRemote.start(.s3, in: ws)
            let bytes = try #require(BuildCache.Layer.random(seed: 84, size: 12 << 20).bytes)
            let digest = Digest.sha256(of: bytes)
            var marks: [Int] = []
            for (index, tag) in ["main", "other"].enumerated() {
                marks.append(remote.requests().count)
                let mount = try await remote.mount([tag], writable: true, cacheDir: try ws.makeDirectory("cache-\(tag)"))
                let root = mount.mountpoint
                try Self.announce(root + "/ingest/held", ref: "layer-" + digest.description, size: bytes.count)
                try BuildctlExport.writeFile(root + "/ingest/held/data", bytes, flags: O_WRONLY | O_CREAT)
                #expect(rename(root + "/ingest/held/data", root + "/blobs/sha256/" + digest.hex) == 0, "export \(index + 1)")
                let unmounted = try await mount.unmount(in: ws)
                #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            }
            let first = remote.requests()[marks[0]..<marks[1]], second = remote.requests()[marks[1]...]
            #expect(remote.uploadedBlobs(first) == [digest.description], "the first export sends the blob once")
            #expect(remote.blobWrites(second).isEmpty, "the second sends nothing: \(Array(second))")
            #expect(!remote.blobChecks(second).isEmpty, "it asked whether S3 holds the blob")
            #expect(try await remote.blobs([digest])[digest].map { sameBytes($0, bytes) } == true)
        }
    }
}

