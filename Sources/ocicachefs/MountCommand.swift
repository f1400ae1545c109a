import ArgumentParser
import CMalloc
import CacheFS
import ContentCache
import FoundationEssentials
import Synchronization
import SystemSupport
import FuseBinding
import HTTPClient
import Logging
import OCI
import RemoteStore

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a remote cache at MOUNTPOINT.",
        discussion: """
        SOURCE uses BuildKit's cache attribute syntax:

          type=registry,ref=HOST[:PORT]/REPO[:TAG|@sha256:HEX][,registry.insecure=true]
          type=s3,bucket=B,region=R[,name=N1;N2][,prefix=P][,endpoint_url=URL]
              [,use_path_style=true][,blobs_prefix=B/][,manifests_prefix=M/]
              [,access_key_id=ID,secret_access_key=KEY[,session_token=TOKEN]]

        Loopback hosts (localhost, 127.x.x.x, ::1) are reached over plain HTTP, as BuildKit does; \
        other hosts over HTTPS with certificate verification; registry.insecure=true skips the \
        certificate check and falls back to HTTP when the registry does not speak HTTPS. The tag is shown in index.json \
        (annotation org.opencontainers.image.ref.name), so import it with tag=TAG; a reference \
        by digest alone is shown as tag "latest". A tag that does not exist yet is not an error: \
        the mount shows an empty index.json (the first CI run has no cache) and prints a \
        warning line on stderr.

        Registry credentials come from Docker's config.json ($DOCKER_CONFIG or ~/.docker): \
        auths entries, credHelpers and credsStore, as `docker login` leaves them. When the \
        registry refuses them during the mount (an expired ECR or GCR login), they are read \
        again (the helper is run again, within --timeout).

        For S3, bucket and region fall back to AWS_BUCKET and AWS_REGION and name to \
        "buildkit"; every name becomes a tag. Credentials, first found wins: the attributes, \
        AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, web identity \
        (AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN), the profile AWS_PROFILE in \
        ~/.aws/credentials and ~/.aws/config (role_arn with source_profile or \
        web_identity_token_file, keys, SSO, credential_process), container credentials, EC2 \
        instance metadata. STS is reached at AWS_ENDPOINT_URL_STS or AWS_ENDPOINT_URL when set. \
        Temporary credentials are renewed five minutes before they expire.

        HTTPS peers are verified against --ca-file (or $SSL_CERT_FILE) when given, else the \
        system's certificate authorities.

        --tag NAME=SOURCE adds a further remote cache, shown as the tag NAME (an S3 SOURCE's name \
        defaults to NAME); each ref resolves on its own, and one that fails is left out with a \
        warning unless it is the mount's SOURCE. A blob several refs reach is fetched once. On a \
        writable mount each tag is published to the source that shows it (committed blobs go to \
        SOURCE at once); with --tag, a tag no source shows stays local. `ocicachefs refresh MOUNTPOINT` \
        resolves them all again.

        Without --foreground the command returns once the mount is ready, so \
        `ocicachefs mount ... && buildctl ...` needs no sleep; it exits non-zero with one line \
        saying why when the registry refuses the credentials, serves an invalid manifest, or \
        is unreachable with no earlier resolution of the reference in the cache directory \
        (with one, the mount shows that resolution and logs a warning).

        Examples:
          ocicachefs mount type=registry,ref=127.0.0.1:5000/cache:main /mnt/cache
          ocicachefs mount "type=s3,bucket=ci-cache,region=eu-west-1,name=main" /mnt/cache
          ocicachefs mount --cache-dir /var/cache/ci \\
              type=registry,ref=ghcr.io/org/app:cache /mnt/cache
          ocicachefs mount --writable type=registry,ref=ghcr.io/org/app:pr-42 \\
              --tag main=type=registry,ref=ghcr.io/org/app:main /mnt/cache
          buildctl build --frontend dockerfile.v0 --local context=. \\
              --local dockerfile=. --import-cache type=local,src=/mnt/cache,tag=cache
        """
    )

    @Option(help: ArgumentHelp("Local content cache, shared by every mount that names it.", valueName: "DIR"))
    var cacheDir: String?

    @Option(parsing: .unconditional,
            help: ArgumentHelp("Hard cap on the content cache, e.g. 20G (default: a quarter of its filesystem); least recently used blobs are evicted.", valueName: "SIZE"),
            transform: ByteSize.parse)
    var cacheSize: ByteSize?

    @Option(parsing: .unconditional,
            help: ArgumentHelp("Free space the cache leaves on its filesystem (default: 5% of it).", valueName: "SIZE"),
            transform: ByteSize.parse)
    var minFree: ByteSize?

    @Flag(help: "Stay in the foreground and log to stderr.")
    var foreground = false

    @Option(help: ArgumentHelp("Bound, in seconds, on every network wait (connect, stall, token and manifest requests) and on blocks another mount of the cache directory claimed but does not deliver.", valueName: "SECONDS"))
    var timeout: Double = 60

    @Option(help: ArgumentHelp("trace, debug, info, notice, warning, error or critical.", valueName: "LEVEL"))
    var logLevel: String = "info"

    @Option(help: ArgumentHelp("Where the background daemon logs (default: ocicachefs.log in the cache directory).", valueName: "FILE"))
    var logFile: String?

    @Flag(help: "Let users other than the one mounting read the mount (FUSE allow_other).")
    var allowOther = false

    @Flag(help: ArgumentHelp("Publish what clients export into the mount (--export-cache type=local,dest=MOUNTPOINT) to the source.",
                             discussion: "A blob is published once it is renamed into blobs/sha256, a tag once index.json is closed after it changed; unmount waits for the uploads."))
    var writable = false

    @Option(parsing: .unconditional,
            help: ArgumentHelp("With --writable: blobs up to SIZE are published in one request, larger ones in 16 MiB pieces (registry chunks, S3 parts) retried one by one (default: 256M).",
                               valueName: "SIZE"),
            transform: ByteSize.parse)
    var uploadCutoff: ByteSize?

    @Option(help: ArgumentHelp("Also write the mount's statistics in Prometheus' text format to FILE every few seconds (for node_exporter's textfile collector).",
                               valueName: "FILE"))
    var metricsFile: String?

    @Option(help: ArgumentHelp("Also serve them at http://ADDRESS:PORT/metrics (e.g. 127.0.0.1:9742).", valueName: "ADDRESS:PORT"),
            transform: MetricsAddress.parse)
    var metricsListen: MetricsAddress?

    @Option(help: ArgumentHelp("PEM file of the certificate authorities that HTTPS registries, S3 endpoints and AWS credential services are verified against, in place of the system's bundle (default: $SSL_CERT_FILE).", valueName: "FILE"))
    var caFile: String?

    @Option(name: .customLong("tag"), parsing: .unconditionalSingleValue,
            help: ArgumentHelp("Also show the remote cache SOURCE as the tag NAME of the same index.json (repeatable; registry and S3 sources may be mixed). On a writable mount, NAME is published to SOURCE.",
                               valueName: "NAME=SOURCE"))
    var tagOptions: [String] = []

    @Option(help: .hidden)
    var readyFD: Int32?

    /// The daemon reads its source from here rather than from its arguments, which other users
    /// can read; SOURCE then holds it without its secrets, for `ps`.
    @Option(help: .hidden)
    var sourceFD: Int32?

    @Argument(help: ArgumentHelp("The remote cache, in BuildKit's syntax (see above).", valueName: "SOURCE"))
    var source: String

    @Argument(help: ArgumentHelp("An existing empty directory.", valueName: "MOUNTPOINT"))
    var mountpoint: String

    func validate() throws {
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
    }

    func run() throws {
        let mountpoint: String
        do {
            mountpoint = try Self.checkedMountpoint(self.mountpoint)
            try Self.checkMountable(mountpoint)
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
        let cacheDirectory = cacheDir ?? Self.defaultCacheDirectory()
        let refs: [CacheRef]
        let certificateAuthorities: String?
        do {
            try Self.checkOutsideMountpoint(cacheDirectory, mountpoint: mountpoint)
            try Self.prepareCacheDirectory(cacheDirectory)
            certificateAuthorities = try certificateAuthorityFile()
            // The daemon gets its SOURCE and its --tag sources, secrets included, one a line.
            let lines = try sourceFD.map { fd in try Self.readSource(from: fd).split(separator: "\n", omittingEmptySubsequences: false).map(String.init) }
            refs = try CacheRef.refs(source: lines?.first ?? source, tagOptions: lines.map { Array($0.dropFirst()) } ?? tagOptions)
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
        // The daemon works in /: relative paths must mean what they meant to the caller.
        let absoluteCacheDirectory = UnmountCommand.lexicallyAbsolute(cacheDirectory)
        if !foreground {
            let logPath = logFile ?? cacheDirectory + "/ocicachefs.log"
            let sources = ([source] + tagOptions).joined(separator: "\n")
            // Each further ref resolves at mount: a daemon with several waits longer to be ready.
            throw ExitCode(Daemon.spawnAndAwaitReady(arguments: daemonArguments(cacheDirectory: absoluteCacheDirectory,
                                                                                certificateAuthorities: certificateAuthorities,
                                                                                refs: refs, mountpoint: mountpoint),
                                                     source: sources, logPath: logPath,
                                                     readyTimeout: (timeout * 4 + 30) * Double(refs.count)))
        }
        let reporter = ReadinessReporter(fd: readyFD)
        do {
            try serve(refs: refs, mountpoint: mountpoint, cacheDirectory: absoluteCacheDirectory,
                      certificateAuthorities: certificateAuthorities, reporter: reporter)
        } catch {
            let line = "\(error)"
            // Into the daemon's log before its caller hears of it and returns.
            printError(line)
            reporter.fail(line)
            throw ExitCode.failure
        }
    }

    /// The daemon's command line: this one's options with absolute paths, and the source
    /// without its secrets (the daemon reads the whole source from its descriptor).
    private func daemonArguments(cacheDirectory: String, certificateAuthorities: String?, refs: [CacheRef],
                                 mountpoint: String) -> [String] {
        var arguments = ["mount", "--cache-dir", cacheDirectory, "--timeout", String(timeout), "--log-level", logLevel]
        if let certificateAuthorities { arguments += ["--ca-file", certificateAuthorities] }
        if let cacheSize { arguments += ["--cache-size", String(cacheSize.bytes)] }
        if let minFree { arguments += ["--min-free", String(minFree.bytes)] }
        if allowOther { arguments.append("--allow-other") }
        if writable { arguments.append("--writable") }
        if let uploadCutoff { arguments += ["--upload-cutoff", String(uploadCutoff.bytes)] }
        if let metricsFile { arguments += ["--metrics-file", UnmountCommand.lexicallyAbsolute(metricsFile)] }
        if let metricsListen { arguments += ["--metrics-listen", metricsListen.description] }
        for ref in refs.dropFirst() { arguments += ["--tag", ref.shownOption] }
        return arguments + ["--foreground", "--ready-fd", String(Daemon.childReadyFD), "--source-fd", String(Daemon.childSourceFD),
                            "--", refs[0].spec.withoutSecrets, mountpoint]
    }

    /// `--ca-file`, else `SSL_CERT_FILE`: absolute (the daemon works in /), and checked here,
    /// so that a file libcurl could not use fails the mount at once with its reason. A daemon
    /// the command started (it passes the source on a descriptor) takes the file the command
    /// checked.
    private func certificateAuthorityFile() throws -> String? {
        let path: String, origin: String
        if let caFile {
            (path, origin) = (caFile, "--ca-file")
        } else if let variable = ProcessInfo.processInfo.environment["SSL_CERT_FILE"], !variable.isEmpty {
            (path, origin) = (variable, "SSL_CERT_FILE")
        } else {
            return nil
        }
        let absolute = UnmountCommand.lexicallyAbsolute(path)
        if sourceFD != nil { return absolute }
        do {
            try CurlTransport.checkCertificateFile(absolute)
        } catch {
            throw CommandError("\(origin): \(error)")
        }
        return absolute
    }

    private static func readSource(from fd: Int32) throws -> String {
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else { throw CommandError("cannot read the source from descriptor \(fd): \(String(cString: strerror(errno)))") }
            if count == 0 { return String(decoding: bytes, as: UTF8.self) }
            bytes += buffer[..<count]
        }
    }

    private func serve(refs: [CacheRef], mountpoint: String, cacheDirectory: String, certificateAuthorities: String?,
                       reporter: ReadinessReporter) throws {
        // `pgrep ocicachefs` finds the daemon: exec'd through /proc/self/exe, it would be "exe".
        SystemThread.nameCurrentThread("ocicachefs")
        // Signals go to one waiting thread, not to whichever thread happens to run.
        Signals.blockTerminationSignals()
        Self.raiseOpenFileLimit()
        // glibc gives each busy thread its own arena, and each keeps the 1 MiB read buffers it
        // freed: with two dozen fetch and FUSE threads that is most of the daemon's memory.
        _ = CMalloc_limitArenas(2)
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = EscapingLogHandler(StreamLogHandler.standardError(label: label))
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "ocicachefs")
        let bound = Duration.milliseconds(Int64(timeout * 1000))

        let mountedRefs = MountedRefs(try refs.map { ref in
            let (remote, publisher) = try SourceFactory.make(ref.spec, writable: writable,
                                                             uploadCutoff: uploadCutoff?.bytes ?? defaultSingleRequestUploadLimit,
                                                             timeout: bound, certificateAuthorities: certificateAuthorities,
                                                             logger: logger)
            return MountedRefs.Mounted(ref: ref, remote: remote, publisher: publisher)
        })
        let remote = mountedRefs.refs[0].remote
        let store = try ContentStore(directory: cacheDirectory, lockWait: bound)
        logger.info("resolving remote cache", metadata: ["source": "\(remote.displayName)",
                                                         "tags": "\(mountedRefs.refs.dropFirst().map(\.ref.shownOption))"])
        let snapshot = try mountedRefs.resolveAtMount(store: store, logger: logger, warn: reporter.warn)

        var limits = CacheLimits.defaults(forDirectory: cacheDirectory)
        if let cacheSize { limits.maxBytes = cacheSize.bytes }
        if let minFree { limits.minFreeBytes = minFree.bytes }
        let statistics = MountStatistics()
        let fetcher = BlobFetcher(store: store, source: CountedBlobSource(mountedRefs.blobs, statistics: statistics), logger: logger,
                                  otherProcessStall: bound, limits: limits, statistics: statistics)
        let filesystem: CacheFilesystem
        if writable {
            let uploads = try mountedRefs.writableMount(store: store, statistics: statistics, logger: logger)
            filesystem = try CacheFilesystem(snapshot: snapshot, fetcher: fetcher, logger: logger, writable: uploads)
        } else {
            filesystem = CacheFilesystem(snapshot: snapshot, fetcher: fetcher, logger: logger)
        }
        var options = ["fsname=ocicachefs", "subtype=ocicachefs", "default_permissions"]
        if allowOther { options.append("allow_other") }
        let session = try FuseSession(filesystem: filesystem, mountpoint: mountpoint, options: options, logger: logger,
                                      statistics: statistics)
        // A background daemon must not keep its caller's directory busy (it could not be
        // unmounted or removed). Only now: the configuration and credential files it read may
        // have been named relative to it.
        if readyFD != nil { _ = chdir("/") }
        let pidFile = RuntimeFiles.pidFile(forMountpoint: mountpoint)
        RuntimeFiles.write(pid: getpid(), to: pidFile)
        defer { unlink(pidFile) }
        let endpoints = StatisticsEndpoints(statistics: statistics, mountpoint: mountpoint, cacheDirectory: cacheDirectory,
                                            limits: limits, logger: logger)
        let controlSocket = RuntimeFiles.controlSocket(forPIDFile: pidFile)
        endpoints.onRefresh { [writable] in
            guard !writable else {
                return "error: a writable mount's index.json belongs to what clients export into it; only read-only mounts are refreshed\n"
            }
            let (snapshot, lines) = mountedRefs.refresh(store: store, logger: logger)
            do {
                try filesystem.show(snapshot)
            } catch {
                return "error: \(error)\n"
            }
            return lines.map { ($0.failed ? "failed " : "ok ") + $0.text + "\n" }.joined()
        }
        try endpoints.serveControlSocket(at: controlSocket)
        if let metricsListen { try endpoints.serveMetrics(host: metricsListen.host, port: metricsListen.port) }
        if let metricsFile { endpoints.writeMetricsFile(to: metricsFile) }
        defer {
            endpoints.stop(metricsFile: metricsFile != nil)
            unlink(controlSocket)
        }
        logger.info("mounted", metadata: ["mountpoint": "\(mountpoint)", "tags": "\(snapshot.tags.count)",
                                          "blobs": "\(snapshot.smallBlobs.count + snapshot.lazyBlobs.count)"])

        Signals.onTermination { signal in
            logger.info("signal received; unmounting", metadata: ["signal": "\(signal)"])
            session.requestUnmount()
        }
        let notifier = ServiceNotifier(environment: ProcessInfo.processInfo.environment)
        let saving = Atomic<Bool>(true)
        SystemThread.start(named: "ocicachefs-ready") {
            defer { saving.store(false, ordering: .releasing) }
            // Ready means a client can read index.json through the kernel, not merely mounted.
            guard FileManager.default.contents(atPath: mountpoint + "/index.json") != nil else {
                reporter.fail("mounted at \(mountpoint) but index.json is not readable")
                session.requestUnmount()
                return
            }
            if !session.setReadahead(kilobytes: 1024) {
                logger.debug("kernel readahead left at its default (not root, or no bdi entry)")
            }
            reporter.ready()
            // In the background the command that started this daemon tells the service manager.
            if readyFD == nil {
                notifier.notify(["READY=1", "STATUS=mounted \(remote.displayName) at \(mountpoint)"])
            }
            // Saving the resolutions for offline mounts cost a third of a 100,000-blob mount's
            // CPU: it is done once the mount is ready, and finished before the daemon exits.
            mountedRefs.saveResolutions(in: store, logger: logger)
        }
        let status = session.run()
        while saving.load(ordering: .acquiring) { SystemThread.sleep(for: .milliseconds(5)) }
        logger.info("unmounted", metadata: ["mountpoint": "\(mountpoint)", "status": "\(status)"])
        notifier.notify(["STOPPING=1", "STATUS=unmounted" + (writable ? "; publishing what clients exported" : "")])
        if writable {
            let unpublished = Self.finishUploads(filesystem, statusFile: RuntimeFiles.statusFile(forPIDFile: pidFile),
                                                 notifier: notifier, stallBound: bound, logger: logger)
            guard unpublished.isEmpty else {
                throw CommandError("\(unpublished.count) item(s) not published: "
                                   + unpublished.map(\.description).joined(separator: "; "))
            }
        }
    }

    /// Waits for the uploads a writable mount still owes, logging their progress and keeping
    /// it in `statusFile` for `ocicachefs unmount`, which is waiting for this daemon, and in the
    /// service manager's status, whose stop timeout it extends by `stallBound` at each report;
    /// returns what could not be published.
    static func finishUploads(_ filesystem: CacheFilesystem, statusFile: String, notifier: ServiceNotifier,
                              stallBound: Duration, logger: Logger) -> [UnpublishedItem] {
        let started = ContinuousClock.now
        var firstBytesLeft: Int64?
        var lastLogged = ContinuousClock.now - .seconds(10)
        // Each report allows another stall bound and a margin (systemd counts microseconds).
        let stopTimeoutExtension = (stallBound + .seconds(30)).components.seconds * 1_000_000
        let unpublished = filesystem.drainUploads { progress in
            firstBytesLeft = firstBytesLeft ?? progress.bytesLeft
            let elapsed = (ContinuousClock.now - started).components
            let seconds = Double(elapsed.seconds) + Double(elapsed.attoseconds) * 1e-18
            let sent = max(0, (firstBytesLeft ?? 0) - progress.bytesLeft)
            let rate = seconds > 0 ? Double(sent) / seconds / 1_048_576 : 0
            // The elapsed time changes the line every second: `ocicachefs unmount` waits as long
            // as it changes (each upload has its own bounds), even through one long blob. Bytes
            // count once their blob is published: the queue knows no finer progress.
            let line = "uploading for \(Int(seconds)) s: \(progress.blobsLeft) blob(s) (\(progress.bytesLeft) bytes) and "
                + "\(progress.tagsLeft) tag(s) left; \(sent) bytes of blobs published so far (\(rate.withOneDecimal) MiB/s)"
            RuntimeFiles.writeStatus(line, to: statusFile)
            notifier.notify(["STATUS=" + line, "EXTEND_TIMEOUT_USEC=\(stopTimeoutExtension)"])
            if ContinuousClock.now - lastLogged >= .seconds(5) {
                logger.info("\(line)")
                lastLogged = .now
            }
        }
        for item in unpublished { logger.error("not published: \(item)") }
        RuntimeFiles.writeStatus(unpublished.isEmpty ? "published" : unpublished.map { "not published: \($0)" }.joined(separator: "\n"),
                                 to: statusFile)
        return unpublished
    }

    /// Every download holds a descriptor and the kernel may have many requests in flight.
    static func raiseOpenFileLimit() {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    }

    static func checkedMountpoint(_ path: String) throws -> String {
        guard let resolved = realpath(path, nil) else {
            throw CommandError("mountpoint \(path): \(String(cString: strerror(errno)))")
        }
        defer { free(resolved) }
        var isDirectory = false
        let absolute = String(cString: resolved)
        guard FileManager.default.fileExists(atPath: absolute, isDirectory: &isDirectory), isDirectory else {
            throw CommandError("mountpoint \(path) is not a directory")
        }
        return absolute
    }

    /// Mounting over a mount or over files would hide them; clients would see the wrong tree.
    static func checkMountable(_ path: String) throws {
        var own = stat()
        var parent = stat()
        if stat(path, &own) == 0, stat(path + "/..", &parent) == 0, own.st_dev != parent.st_dev || own.st_ino == parent.st_ino {
            throw CommandError("\(path) is already a mount point; unmount it first")
        }
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        guard entries.isEmpty else {
            throw CommandError("mountpoint \(path) is not empty; mounting would hide its files")
        }
    }

    /// The mount would hide a cache directory at or below the mountpoint, and the daemon would
    /// then write its cache through its own mount.
    static func checkOutsideMountpoint(_ cacheDirectory: String, mountpoint: String) throws {
        let resolved = resolvedPath(cacheDirectory)
        if resolved == mountpoint || resolved.hasPrefix(mountpoint == "/" ? "/" : mountpoint + "/") {
            throw CommandError("cache directory \(cacheDirectory) is inside the mountpoint \(mountpoint); the mount would hide it")
        }
    }

    /// `path` absolute, with the symbolic links of the part that exists resolved; the part
    /// that does not exist yet is appended as written.
    static func resolvedPath(_ path: String) -> String {
        var existing = UnmountCommand.lexicallyAbsolute(path)
        var missing: [String] = []
        while true {
            if let resolved = realpath(existing, nil) {
                defer { free(resolved) }
                return ([String(cString: resolved)] + missing.reversed()).reduce("") { joinedPath($0, $1) }
            }
            guard existing != "/" else { return UnmountCommand.lexicallyAbsolute(path) }
            missing.append(String(existing.split(separator: "/").last ?? ""))
            existing = parentPath(existing)
        }
    }

    /// Creates the cache directory if needed and checks that it can hold a cache, so that the
    /// failure names the path (later, opening the log file in it or the content store would
    /// only say "Not a directory" or "Permission denied").
    static func prepareCacheDirectory(_ path: String) throws {
        var info = stat()
        if stat(path, &info) != 0 {
            let code = errno
            guard code == ENOENT else { throw CommandError("cache directory \(path): \(String(cString: strerror(code)))") }
            do {
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            } catch {
                throw CommandError("cannot create the cache directory \(path): \(describeFileError(error))")
            }
            guard stat(path, &info) == 0 else {
                throw CommandError("cache directory \(path): \(String(cString: strerror(errno)))")
            }
        }
        guard info.st_mode & S_IFMT == S_IFDIR else { throw CommandError("cache directory \(path) is not a directory") }
        // access() answers EROFS on a read-only filesystem even for root.
        guard access(path, W_OK | X_OK) == 0 else {
            throw CommandError("cache directory \(path) is not writable: \(String(cString: strerror(errno)))")
        }
    }

    static func defaultCacheDirectory() -> String {
        let environment = ProcessInfo.processInfo.environment
        if let xdg = environment["XDG_CACHE_HOME"], !xdg.isEmpty { return xdg + "/ocicachefs" }
        if getuid() == 0 { return "/var/cache/ocicachefs" }
        return (environment["HOME"] ?? FileManager.default.homeDirectoryForCurrentUser.path) + "/.cache/ocicachefs"
    }
}

/// A failure told to the person in one line, without the usage text.
struct CommandError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func printError(_ line: String) {
    // Error lines quote registries, S3 and token servers, which choose their words.
    let text = "ocicachefs: \(line.escapingControlCharacters)\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
}

enum SourceFactory {
    /// The source to read, and with `writable` the publisher that writes to the same place.
    /// `uploadCutoff`: the largest blob the publisher sends in one request. Both, and the AWS
    /// credential chain, share one transport, so `certificateAuthorities` (a PEM file replacing
    /// the system's bundle) verifies every HTTPS peer of the mount.
    static func make(_ spec: SourceSpec, writable: Bool = false, uploadCutoff: Int64 = defaultSingleRequestUploadLimit,
                     timeout: Duration, certificateAuthorities: String? = nil,
                     logger: Logger) throws -> (any RemoteCacheSource, (any CachePublisher)?) {
        switch spec.type {
        case "registry":
            let setup = try RegistrySetup(spec: spec, helperTimeout: timeout)
            let transport = CurlTransport(certificateAuthorities: certificateAuthorities)
            return (setup.makeSource(transport: transport, timeout: timeout, logger: logger),
                    writable ? setup.makePublisher(singleRequestLimit: uploadCutoff, transport: transport, timeout: timeout,
                                                   logger: logger) : nil)
        case "s3":
            let location = try S3Location(spec: spec, environment: ProcessInfo.processInfo.environment)
            var explicit: AWSCredentials?
            if let keyID = spec.attributes["access_key_id"], let secret = spec.attributes["secret_access_key"] {
                explicit = AWSCredentials(accessKeyID: keyID, secretAccessKey: secret, sessionToken: spec.attributes["session_token"])
            }
            let transport = CurlTransport(certificateAuthorities: certificateAuthorities)
            // STS, SSO and credential_process get the mount's bound; the local metadata
            // endpoints keep the chain's short one.
            let credentials = AWSCredentialChain(explicit: explicit, transport: transport, serviceTimeout: timeout,
                                                 region: location.region)
            return (S3Source(location: location, credentials: credentials, transport: transport, timeout: timeout, logger: logger),
                    writable ? S3Publisher(location: location, credentials: credentials, transport: transport, timeout: timeout,
                                           logger: logger, multipartThreshold: uploadCutoff) : nil)
        default:
            throw RemoteStoreError.configuration("source type '\(spec.type)' is not supported (supported: registry, s3)")
        }
    }
}

/// `--metrics-listen`'s IPv4 address and port.
struct MetricsAddress: CustomStringConvertible {
    var host: String
    var port: UInt16

    static func parse(_ text: String) throws -> MetricsAddress {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]), port > 0,
              !text[..<colon].isEmpty else {
            throw ValidationError("--metrics-listen takes ADDRESS:PORT, e.g. 127.0.0.1:9742")
        }
        return MetricsAddress(host: String(text[..<colon]), port: port)
    }

    var description: String { "\(host):\(port)" }
}
