import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What systemd hears from a `Type=notify` service: a unix datagram socket bound where
/// `$NOTIFY_SOCKET` points (a path, or "@name" in the abstract namespace).
final class NotifyListener: Sendable {
    let fd: Int32
    /// The value for `$NOTIFY_SOCKET`.
    let address: String

    init(address: String, in ws: Workspace) throws {
        var bytes = Array(address.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        var socketAddress = sockaddr_un()
        socketAddress.sun_family = sa_family_t(AF_UNIX)
        guard bytes.count < MemoryLayout.size(ofValue: socketAddress.sun_path) else {
            throw HarnessError("notify socket address too long: \(address)")
        }
        withUnsafeMutableBytes(of: &socketAddress.sun_path) { $0.copyBytes(from: bytes) }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: \(String(cString: strerror(errno)))") }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let bound = withUnsafePointer(to: &socketAddress) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw HarnessError("bind \(address): \(reason)")
        }
        self.fd = fd
        self.address = address
        ws.onCleanup("close the notify socket") { close(fd) }
    }

    /// The lines of the next datagram; throws after `timeout` seconds without one.
    func next(timeout: Double = 30) async throws -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline {
            let count = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if count > 0 { return String(decoding: buffer[..<count], as: UTF8.self).split(separator: "\n").map(String.init) }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw HarnessError("no notification on \(address) within \(timeout) s")
    }

    /// Datagrams until one has a line starting with `prefix`; returns that one.
    func next(containing prefix: String, timeout: Double = 30) async throws -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let lines = try await next(timeout: max(0.1, deadline.timeIntervalSinceNow))
            if lines.contains(where: { $0.hasPrefix(prefix) }) { return lines }
        }
    }
}

/// A systemd unit file's `Key=value` lines, and ExecStart= split into words as systemd does:
/// `${NAME}` is one word, `$NAME` the value's whitespace-separated words.
struct UnitFile {
    var entries: [(key: String, value: String)]

    init(path: String) throws {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        entries = text.split(separator: "\n").compactMap { line in
            guard !line.hasPrefix("#"), !line.hasPrefix("["), let equals = line.firstIndex(of: "=") else { return nil }
            return (String(line[..<equals]), String(line[line.index(after: equals)...]))
        }
    }

    func values(_ key: String) -> [String] { entries.filter { $0.key == key }.map(\.value) }

    static func words(_ command: String, environment: [String: String]) -> [String] {
        command.split(separator: " ").flatMap { word -> [String] in
            if word.hasPrefix("${") && word.hasSuffix("}") { return [environment[String(word.dropFirst(2).dropLast())] ?? ""] }
            if word.hasPrefix("$") { return (environment[String(word.dropFirst())] ?? "").split(separator: " ").map(String.init) }
            return [String(word)]
        }
    }
}

@Suite("Service managers: systemd readiness, the unit template, mount(8) with the helper")
struct ServiceManagerTests {
    @Test("the unit template runs the mount in the foreground: READY=1 once index.json reads, STOPPING=1 at SIGTERM, then a clean exit")
    func unitTemplateNotifiesReadiness() async throws {
        try await withWorkspace("notify-unit") { ws in
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 10_000)
            let unit = try UnitFile(path: Harness.packageRoot + "/mount-helpers/ocicachefs@.service")
            #expect(unit.values("Type") == ["notify"])
            #expect(unit.values("EnvironmentFile") == ["/etc/ocicachefs/%i.conf"])

            // What /etc/ocicachefs/%i.conf would hold.
            let mountpoint = ws.path("unit-mnt")
            let conf = ["SOURCE": registry.source("cache:main"), "MOUNTPOINT": mountpoint,
                        "OPTIONS": "--cache-dir \(try ws.makeDirectory("unit-cache")) --timeout 10 --log-level debug"]
            for pre in unit.values("ExecStartPre") {
                let words = UnitFile.words(pre, environment: conf)
                let result = try await Processes.run(words[0], Array(words.dropFirst()), in: ws)
                #expect(result.status == 0, "\(result)")
            }
            let start = try #require(unit.values("ExecStart").first)
            var words = UnitFile.words(start, environment: conf)
            #expect(words.first == "/usr/local/bin/ocicachefs", "the path the README installs to")
            words[0] = try Harness.binary()
            #expect(words.contains("--foreground"), "systemd's notify socket reaches the process it started: \(words)")

            let listener = try NotifyListener(address: ws.path("notify.sock"), in: ws)
            ws.onCleanup("unmount \(mountpoint)") { [ws] in ws.forceUnmount(mountpoint) }
            let service = try BackgroundServer(words[0], Array(words.dropFirst()), in: ws, label: "unit",
                                               environment: ["NOTIFY_SOCKET": listener.address, "DOCKER_CONFIG": try ws.dockerConfig()])
            let ready = try await listener.next(containing: "READY=1")
            // Ready means usable: a unit ordered after this one reads the cache at once.
            #expect(FileManager.default.contents(atPath: mountpoint + "/index.json")?.isEmpty == false)
            #expect(ready.contains { $0.hasPrefix("STATUS=mounted ") }, "\(ready)")
            #expect(!ready.contains { $0.hasPrefix("MAINPID=") }, "the foreground daemon is the process systemd started: \(ready)")

            kill(service.pid, SIGTERM)
            let stopping = try await listener.next(containing: "STOPPING=1")
            #expect(stopping.contains("STATUS=unmounted"), "\(stopping)")
            #expect(await service.child.wait(timeout: 30) == 0, "exit status; stderr: \(Processes.readText(service.stderrPath).suffix(2000))")
            #expect(!Mounts.isMounted(mountpoint))
        }
    }

    @Test("a background mount under Type=notify: the command hands the service to its daemon (MAINPID, READY=1); at unmount the daemon says STOPPING=1 and extends the stop timeout while it publishes")
    func backgroundMountHandsOverAndReportsUploads() async throws {
        try await withWorkspace("notify-bg") { ws in
            let remote = try await ExportRemote.start(.registry, in: ws)
            let proxy = try await ws.startHoldingProxy(upstreamPort: remote.port)
            let listener = try NotifyListener(address: "@ocicachefs-test-\(getpid())-\(ws.nextID())", in: ws)
            let mount = try await remote.mount(["main"], writable: true, via: proxy, environment: ["NOTIFY_SOCKET": listener.address])
            let daemons = mount.daemonPIDs
            #expect(daemons.count == 1, "\(daemons)")
            let handover = try await listener.next(containing: "READY=1")
            #expect(handover == ["MAINPID=\(daemons.first ?? -1)", "READY=1"])

            let layer = BuildCache.Layer.random(seed: 77, size: 1_500_000)
            let cache = BuildCache(chain: [layer], variant: .imageManifest, salt: "notify")
            try proxy.hold("^(PUT|PATCH|POST) \\S*\(layer.digest.hex)")
            #expect(try await replayExport(cache, into: mount, tag: "main", version: .v0_32_2).indexCloseErrno == 0)
            try await proxy.waitFor("the layer's upload held") { $0.held == 1 }

            let unmount = Task { try await mount.unmount(in: ws, timeout: 60) }
            let stopping = try await listener.next(containing: "STOPPING=1")
            #expect(stopping.contains("STATUS=unmounted; publishing what clients exported"), "\(stopping)")
            // Reports come at least every second; once the other blobs are up, only the held
            // layer is left.
            var progress = try await listener.next(containing: "EXTEND_TIMEOUT_USEC=")
            while !progress.contains(where: { $0.contains(" 1 blob(s) ") }) {
                #expect(progress.contains { $0.hasPrefix("STATUS=uploading for ") }, "\(progress)")
                progress = try await listener.next(containing: "EXTEND_TIMEOUT_USEC=", timeout: 20)
            }
            // --timeout 10 (the harness's) plus the margin, in microseconds.
            #expect(progress.contains("EXTEND_TIMEOUT_USEC=40000000"), "\(progress)")
            #expect(progress.contains { $0.hasPrefix("STATUS=uploading for ") && $0.contains("1 blob(s) (1500000 bytes)") }, "\(progress)")
            try proxy.hold(nil)
            let unmounted = try await unmount.value
            #expect(unmounted.status == 0, "\(unmounted); daemon log: \(mount.log.suffix(3000))")
            try await remote.expectPublished(cache, tag: "main")
        }
    }

    @Test("mount -t fuse.ocicachefs with the helper installed passes every option through to the daemon")
    func mountHelperPassesEveryOption() async throws {
        try await withWorkspace("mount-helper") { ws in
            guard getuid() == 0 else { throw HarnessError("prerequisite missing: this test installs the mount helper in /sbin and needs root") }
            let mountCommand = try Harness.tool("mount", neededFor: "mount -t fuse.ocicachefs")
            let umountCommand = try Harness.tool("umount", neededFor: "unmounting what mount(8) mounted")
            let registry = try await ws.startRegistry()
            _ = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 10_000)
            try installHelper(in: ws)

            let mountpoint = try ws.makeDirectory("helper-mnt")
            let cache = try ws.makeDirectory("helper-cache")
            let log = ws.path("helper.log")
            ws.onCleanup("unmount \(mountpoint)") { [ws] in ws.forceUnmount(mountpoint) }
            let metrics = ws.path("helper.prom")
            let port = try closedPort()
            let options = ["cache-dir=\(cache)", "cache-size=1G", "min-free=1M", "timeout=10", "log-level=debug",
                           "log-file=\(log)", "writable", "upload-cutoff=8M", "metrics-file=\(metrics)",
                           "metrics-listen=127.0.0.1:\(port)", "_netdev", "nofail"]
            let mounted = try await Processes.run(mountCommand, ["-t", "fuse.ocicachefs", "-o", options.joined(separator: ","),
                                                                 registry.source("cache:main"), mountpoint],
                                                  environment: ["OCICACHEFS": try Harness.binary(), "DOCKER_CONFIG": try ws.dockerConfig()],
                                                  timeout: 80, in: ws)
            #expect(mounted.status == 0, "\(mounted)")
            #expect(Mounts.isMounted(mountpoint))
            #expect(FileManager.default.contents(atPath: mountpoint + "/index.json")?.isEmpty == false)

            let daemons = Processes.daemonPIDs(mountpoint: mountpoint)
            #expect(daemons.count == 1, "\(daemons)")
            let arguments = daemons.first.flatMap(Processes.commandLine(of:)) ?? []
            func value(after option: String) -> String? {
                arguments.firstIndex(of: option).flatMap { $0 + 1 < arguments.count ? arguments[$0 + 1] : nil }
            }
            #expect(value(after: "--cache-dir") == cache, "\(arguments)")
            #expect(value(after: "--cache-size") == String(1 << 30), "\(arguments)")
            #expect(value(after: "--min-free") == String(1 << 20), "\(arguments)")
            #expect(value(after: "--timeout").flatMap(Double.init) == 10, "\(arguments)")
            #expect(value(after: "--log-level") == "debug", "\(arguments)")
            #expect(value(after: "--upload-cutoff") == String(8 << 20), "\(arguments)")
            #expect(arguments.contains("--writable"), "\(arguments)")
            #expect(value(after: "--metrics-file") == metrics, "\(arguments)")
            #expect(value(after: "--metrics-listen") == "127.0.0.1:\(port)", "\(arguments)")
            #expect(Processes.readText(log).contains("mounted"), "the daemon logs where log-file= says")

            let unmounted = try await Processes.run(umountCommand, [mountpoint], in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
            #expect(await LifecycleTests.eventually(20) { !daemons.contains(where: Processes.isAlive) }, "the daemon exits after umount")
        }
    }

    /// Puts mount-helpers/mount.fuse.ocicachefs where mount(8) looks for it, and whatever was
    /// there back at the end of the test.
    private func installHelper(in ws: Workspace) throws {
        let installed = "/sbin/mount.fuse.ocicachefs"
        let helper = try Data(contentsOf: URL(fileURLWithPath: Harness.packageRoot + "/mount-helpers/mount.fuse.ocicachefs"))
        let previous = FileManager.default.contents(atPath: installed)
        ws.onCleanup("restore \(installed)") {
            if let previous {
                _ = FileManager.default.createFile(atPath: installed, contents: previous, attributes: [.posixPermissions: 0o755])
            } else {
                try? FileManager.default.removeItem(atPath: installed)
            }
        }
        guard FileManager.default.createFile(atPath: installed, contents: helper, attributes: [.posixPermissions: 0o755]) else {
            throw HarnessError("cannot install the mount helper as \(installed)")
        }
    }
}
