import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `--tag NAME=SOURCE`: several refs in one mount, against the real registry and moto, and
/// `ocicachefs refresh`.
@Suite("Several refs in one mount", .serialized)
struct SeveralRefsTests {
    /// The tags of the mount's index.json, with the manifest each points at.
    static func shownTags(_ mount: MountHandle) throws -> [String: String] {
        let index = try FileIO.json(mount.path("index.json"))
        var tags: [String: String] = [:]
        for entry in index["manifests"] as? [[String: Any]] ?? [] {
            guard let annotations = entry["annotations"] as? [String: String],
                  let tag = annotations["org.opencontainers.image.ref.name"], let digest = entry["digest"] as? String else { continue }
            tags[tag] = digest
        }
        return tags
    }

    @Test("a registry SOURCE, a second registry tag and an S3 cache in one index.json; a blob two refs share is listed and fetched once")
    func registryAndS3RefsInOneMount() async throws {
        try await withS3Workspace("several-refs") { ws in
            let registry = try await ws.startRegistry()
            // The same seed in the same repository: both tags reach the same layers.
            let main = try await ws.seed(registry, tag: "main", variant: "index", layers: 2, layerSize: 300_000, seed: 7)
            let branch = try await ws.seed(registry, tag: "pr-42", variant: "manifest", layers: 2, layerSize: 300_000, seed: 7)
            #expect(Set(main.layers.map(\.digest)) == Set(branch.layers.map(\.digest)), "the seeds share their layers")
            #expect(main.manifest.digest != branch.manifest.digest)
            let moto = try await ws.startMoto()
            let s3 = try await ws.seedS3(moto, bucket: "refs", names: "nightly", layers: 1, layerSize: 200_000, seed: 3)

            let mount = try await ws.mountS3ExpectingSuccess(registry.source("cache:main"), options: [
                "--tag", "pr-42=" + registry.source("cache:pr-42"),
                "--tag", "nightly=" + moto.source(bucket: "refs", extra: S3Tests.attributeKeys),
            ])
            let daemonArguments = mount.daemonPIDs.first.flatMap(Processes.commandLine(of:)) ?? []
            #expect(daemonArguments.contains("--tag"), "\(daemonArguments)")
            #expect(!daemonArguments.joined(separator: " ").contains("attribute/secret+key"),
                    "a --tag source's secret reaches the daemon through its descriptor, never its command line")
            let tags = try Self.shownTags(mount)
            #expect(tags["main"] == main.manifest.digest, "\(tags)")
            #expect(tags["pr-42"] == branch.manifest.digest, "\(tags)")
            #expect(tags["nightly"] != nil, "\(tags); log: \(mount.log.suffix(3000))")
            #expect(tags.count == 3, "\(tags)")

            let listed = FileIO.listDirectory(mount.path("blobs/sha256"))
            #expect(listed.count == Set(listed).count)
            for layer in main.layers {
                #expect(listed.filter { $0 == layer.hex }.count == 1, "a shared layer is listed once")
                let read = try FileIO.digest(mount.blobPath(layer.digest), dropPageCache: true)
                #expect(read.digest == layer.digest && read.size == layer.size)
                // Read again, as the second ref would be: the cache answers.
                #expect(try FileIO.digest(mount.blobPath(layer.digest), dropPageCache: true).digest == layer.digest)
                #expect(registry.blobGets(repo: "cache", digest: layer.digest) == 1, "a shared layer is fetched once")
            }
            for layer in s3.layers {
                let read = try FileIO.digest(mount.blobPath(layer.digest), dropPageCache: true)
                #expect(read.digest == layer.digest && read.size == layer.size)
                #expect(moto.transfers(bucket: "refs", key: layer.key) == 1, "the S3 ref's layer comes from S3")
                #expect(registry.blobGets(repo: "cache", digest: layer.digest) == 0, "and is never asked of the registry")
            }
            #expect(try await mount.unmount(in: ws).status == 0)
        }
    }

    @Test("a further ref that fails is left out with a warning; the SOURCE failing fails the mount")
    func failingRefLeavesTheOthersMounted() async throws {
        try await withWorkspace("ref-failing") { ws in
            let registry = try await ws.startRegistry()
            let main = try await ws.seed(registry, tag: "main", variant: "index", layers: 1, layerSize: 50_000)
            // Port 1 on loopback: nothing listens, the connection is refused at once.
            let unreachable = "type=registry,ref=127.0.0.1:1/cache:gone"
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), options: ["--tag", "gone=" + unreachable])
            #expect(try Self.shownTags(mount) == ["main": main.manifest.digest])
            #expect(mount.result.stderr.contains("warning: tag gone is not shown"), "\(mount.result)")
            #expect(mount.log.contains("tag gone is not shown"))
            #expect(try FileIO.digest(mount.blobPath(main.layers[0].digest)).digest == main.layers[0].digest)
            #expect(try await mount.unmount(in: ws).status == 0)

            let failed = try await ws.mount(unreachable, options: ["--tag", "main=" + registry.source("cache:main")])
            #expect(failed.result.status != 0, "\(failed.result)")
            #expect(!failed.isMounted)
        }
    }

    @Test("the mount helper takes tag=\"NAME=SOURCE\", commas and all, and passes it on as --tag")
    func mountHelperTakesQuotedTags() async throws {
        try await withWorkspace("ref-helper") { ws in
            try Harness.requireFuse()
            let registry = try await ws.startRegistry()
            let main = try await ws.seed(registry, tag: "main", variant: "index", layers: 1, layerSize: 10_000, seed: 1)
            let branch = try await ws.seed(registry, tag: "pr-7", variant: "index", layers: 1, layerSize: 10_000, seed: 2)
            let mountpoint = try ws.makeDirectory("helper-mnt")
            let cache = try ws.makeDirectory("helper-cache")
            ws.onCleanup("unmount \(mountpoint)") { [ws] in ws.forceUnmount(mountpoint) }
            // As mount(8) hands an fstab line's options over: the quotes as written.
            let options = "cache-dir=\(cache),timeout=10,log-file=\(ws.path("helper.log")),tag=\"pr=\(registry.source("cache:pr-7")),registry.insecure=false\",_netdev"
            let mounted = try await Processes.run("/bin/sh", [Harness.packageRoot + "/mount-helpers/mount.fuse.ocicachefs",
                                                              registry.source("cache:main"), mountpoint, "-o", options],
                                                  environment: ["OCICACHEFS": try Harness.binary(), "DOCKER_CONFIG": try ws.dockerConfig()],
                                                  timeout: 80, in: ws)
            #expect(mounted.status == 0, "\(mounted)")
            let arguments = Processes.daemonPIDs(mountpoint: mountpoint).first.flatMap(Processes.commandLine(of:)) ?? []
            #expect(arguments.contains("pr=type=registry,ref=\(registry.host)/cache:pr-7,registry.insecure=false"), "\(arguments)")
            let index = try FileIO.json(mountpoint + "/index.json")
            let digests = (index["manifests"] as? [[String: Any]] ?? []).compactMap { $0["digest"] as? String }
            #expect(Set(digests) == [main.manifest.digest, branch.manifest.digest], "\(index)")
            let unmounted = try await Processes.run(try Harness.binary(), ["unmount", "--timeout", "15", mountpoint], in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }

    @Test("writable: import main from a registry, export pr-42 to S3 through one mount; the layers reused from main are copied to S3; a tag no source takes stays local")
    func importMainExportBranchToAnotherRemote() async throws {
        try await withWorkspace("ref-writable") { ws in
            let imports = try await ExportRemote.start(.registry, in: ws)
            let exports = try await ExportRemote.start(.s3, in: ws)
            let registry = try #require(imports.registry)
            let seed = try await ws.seed(registry, repo: ExportRemote.repository, tag: "main", variant: "manifest", layers: 2,
                                         layerSize: 400_000, seed: 31)
            let mainBefore = try await imports.tagDocument("main")
            let mount = try await ws.mountS3ExpectingSuccess(imports.source(["main"]),
                                                             environment: ["AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"],
                                                             writable: true, options: ["--tag", "pr-42=" + exports.source(["pr-42"])])
            #expect(try Self.shownTags(mount) == ["main": seed.manifest.digest], "pr-42 has no cache yet")

            // The job's export goes on from main's layers, which it finds in the mount and never writes.
            let manifestBytes = try FileIO.readAll(mount.blobPath(seed.manifest.digest))
            let manifest = try #require(try JSONSerialization.jsonObject(with: Data(manifestBytes)) as? [String: Any])
            let existing = try (manifest["layers"] as? [[String: Any]] ?? []).map(BuildCache.Layer.init(existing:))
            let cache = BuildCache(chain: existing + [.random(seed: 41, size: 300_000)], variant: .imageManifest, salt: "pr-42")
            let outcome = try await replayExport(cache, into: mount, tag: "pr-42", version: .v0_32_2)
            #expect(outcome.indexCloseErrno == 0)
            #expect(Set(outcome.written(cache)) == Set(cache.newBlobs.map(\.digest)), "main's layers are found, not written")

            // A tag that neither source takes, written twice.
            let scratch = BuildCache(chain: [.random(seed: 42, size: 50_000)], variant: .imageManifest, salt: "local")
            #expect(try await replayExport(scratch, into: mount, tag: "scratch", version: .v0_32_2).indexCloseErrno == 0)
            let again = BuildCache(chain: [.random(seed: 43, size: 50_000)], variant: .imageManifest, salt: "local 2")
            #expect(try await replayExport(again, into: mount, tag: "scratch", version: .v0_32_2).indexCloseErrno == 0)
            #expect(try Self.shownTags(mount)["scratch"] == again.manifest.digest.description, "it stays in the mount")

            let refused = try await Processes.run(try Harness.binary(), ["refresh", mount.mountpoint], in: ws)
            #expect(refused.status != 0 && refused.stderr.contains("refresh: a writable mount's index.json belongs to what clients export into it"),
                    "\(refused)")

            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            let localLines = mount.log.split(separator: "\n").filter { $0.contains("tag scratch is taken by none of the mount's sources; it stays local") }
            #expect(localLines.count == 1, "logged once: \(localLines)")

            // S3 holds pr-42 with every layer, main's two copied from the registry.
            try await exports.expectPublished(cache, tag: "pr-42")
            #expect(try await exports.tagDocument("scratch") == nil)
            // The registry's main is untouched and got no other tag.
            #expect(try await imports.tagDocument("main") == mainBefore)
            #expect(try await imports.tagDocument("pr-42") == nil)
            #expect(try await imports.tagDocument("scratch") == nil)
        }
    }

    @Test("a tag given twice is one clear error, before anything is resolved")
    func duplicateTagName() async throws {
        try await withWorkspace("ref-duplicate") { ws in
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, tag: "main", variant: "index", layers: 1, layerSize: 10_000)
            let mount = try await ws.mount(registry.source("cache:main"), options: ["--tag", "main=" + registry.source("cache:other")])
            #expect(mount.result.status != 0)
            #expect(!mount.isMounted)
            let lines = mount.result.stderr.split(separator: "\n")
            #expect(lines == ["ocicachefs: tag main is shown by two of the mount's sources; give each tag once (SOURCE and --tag NAME=SOURCE)"],
                    "\(mount.result)")
            let twice = try await ws.mount(registry.source("cache:main"), options: [
                "--tag", "x=" + registry.source("cache:a"), "--tag", "x=" + registry.source("cache:b"),
            ])
            #expect(twice.result.status != 0 && twice.result.stderr.contains("tag x is shown by two"), "\(twice.result)")
        }
    }

    @Test("refresh: a tag moved on the remote shows its new manifest; an open blob keeps its bytes; a failing ref fails the command")
    func refreshAfterTheTagMoved() async throws {
        try await withWorkspace("ref-refresh") { ws in
            let registry = try await ws.startRegistry()
            let other = try await ws.startRegistry(label: "other")
            let before = try await ws.seed(registry, tag: "main", variant: "index", layers: 1, layerSize: 3_000_000, seed: 11)
            let kept = try await ws.seed(other, tag: "base", variant: "manifest", layers: 1, layerSize: 20_000, seed: 12)
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), options: ["--tag", "base=" + other.source("cache:base")])
            #expect(try Self.shownTags(mount) == ["main": before.manifest.digest, "base": kept.manifest.digest])

            // An open layer, half read.
            let oldLayer = before.layers[0]
            let fd = open(mount.blobPath(oldLayer.digest), O_RDONLY | O_CLOEXEC)
            #expect(fd >= 0)
            var bytes = [UInt8](repeating: 0, count: Int(oldLayer.size))
            let half = Int(oldLayer.size / 2)
            #expect(bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, half, 0) } == half)

            let unchanged = try await Processes.run(try Harness.binary(), ["refresh", mount.mountpoint], in: ws)
            #expect(unchanged.status == 0, "\(unchanged)")
            #expect(unchanged.stdout.contains("main: unchanged (\(before.manifest.digest))"), "\(unchanged)")

            let after = try await ws.seed(registry, tag: "main", variant: "index", layers: 1, layerSize: 40_000, seed: 13)
            #expect(after.manifest.digest != before.manifest.digest)
            let refreshed = try await Processes.run(try Harness.binary(), ["refresh", mount.mountpoint], in: ws)
            #expect(refreshed.status == 0, "\(refreshed); log: \(mount.log.suffix(2000))")
            #expect(refreshed.stdout.contains("main: moved from \(before.manifest.digest) to \(after.manifest.digest)"), "\(refreshed)")
            #expect(refreshed.stdout.contains("base: unchanged"), "\(refreshed)")
            #expect(try Self.shownTags(mount) == ["main": after.manifest.digest, "base": kept.manifest.digest])
            let listed = FileIO.listDirectory(mount.path("blobs/sha256"))
            #expect(listed.contains(after.layers[0].hex) && !listed.contains(oldLayer.hex), "\(listed)")
            let layersListed = FileIO.listDirectory(mount.path("layers/sha256"))
            #expect(layersListed.contains(after.layers[0].hex) && !layersListed.contains(oldLayer.hex), "layers/ follows: \(layersListed)")
            #expect(try FileIO.digest(mount.blobPath(after.layers[0].digest)).digest == after.layers[0].digest)

            // The open file reads on: the old layer's bytes, whole.
            let rest = Int(oldLayer.size) - half
            var got = 0
            while got < rest {
                let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + half + got, rest - got, off_t(half + got)) }
                guard n > 0 else { break }
                got += n
            }
            #expect(got == rest)
            #expect(Digest.sha256(of: bytes).description == oldLayer.digest, "the open layer kept its content")
            close(fd)

            other.stop()
            let partly = try await Processes.run(try Harness.binary(), ["refresh", mount.mountpoint], in: ws)
            #expect(partly.status != 0, "\(partly)")
            #expect(partly.stdout.contains("main: unchanged"), "\(partly)")
            #expect(partly.stderr.contains("refresh: base: failed, still shown as before"), "\(partly)")
            #expect(try Self.shownTags(mount)["base"] == kept.manifest.digest)
            #expect(try await mount.unmount(in: ws).status == 0)
        }
    }
}
