internal import CFuse3
import CacheFS
import ContentCache
import Logging
import Synchronization
import SystemSupport

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

public struct FuseError: Error, Sendable, CustomStringConvertible {
    public var description: String
}

/// A mounted libfuse low-level session serving a `CacheFilesystem`. The binding only
/// translates: every decision is the core's.
public final class FuseSession: Sendable {
    // SAFETY: the session pointer is created in init, used by the loop and by `unmount` (which
    // libfuse allows from another thread), and destroyed once in `run` after the loop ends.
    private nonisolated(unsafe) let session: OpaquePointer
    // SAFETY: retained for the session's lifetime; released after fuse_session_destroy.
    private let context: Unmanaged<FuseContext>
    public let mountpoint: String
    /// False once the session is destroyed: the signal thread and page-cache invalidations
    /// check it, under this lock, before they touch the session.
    private let alive = Mutex(true)

    /// - Parameter statistics: where the answers to reads are counted.
    public init(filesystem: CacheFilesystem, mountpoint: String, options: [String], logger: Logger,
                statistics: MountStatistics? = nil) throws {
        self.mountpoint = mountpoint
        let context = Unmanaged.passRetained(FuseContext(filesystem: filesystem, logger: logger, statistics: statistics))
        var arguments = ["ocicachefs"]
        for option in options { arguments += ["-o", option] }
        var cStrings = arguments.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        var ops = makeOperations()
        let created: OpaquePointer? = cStrings.withUnsafeMutableBufferPointer { buffer in
            var args = fuse_args(argc: Int32(buffer.count), argv: buffer.baseAddress, allocated: 0)
            // SAFETY: libfuse copies the ops table and the arguments; userdata outlives the session.
            return fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, context.toOpaque())
        }
        guard let created else {
            context.release()
            throw FuseError(description: "cannot create a FUSE session (bad mount options?)")
        }
        guard fuse_session_mount(created, mountpoint) == 0 else {
            fuse_session_destroy(created)
            context.release()
            throw FuseError(description: "cannot mount on \(mountpoint): is /dev/fuse available and the directory empty and not mounted?")
        }
        self.session = created
        self.context = context
        filesystem.onPageCacheInvalid { [weak self] inode, spared in self?.invalidatePageCache(inode, sparing: spared) }
        filesystem.onEntryInvalid { [weak self] parent, name in self?.invalidateEntry(name, in: parent) }
    }

    /// Asks the kernel to forget its lookup of `name`: the next one comes here.
    private func invalidateEntry(_ name: String, in parent: UInt64) {
        alive.withLock { alive in
            guard alive else { return }
            let status = name.withCString { fuse_lowlevel_notify_inval_entry(session, parent, $0, strlen($0)) }
            if status != 0 && status != -ENOENT {
                context.takeUnretainedValue().logger.warning("cannot drop the kernel's lookup of a retired blob inode",
                                                             metadata: ["name": "\(name)", "errno": "\(-status)"])
            }
        }
    }

    /// Asks the kernel to drop its cached pages of `inode` outside `spared`, and returns once it
    /// has: the kernel waits on pages being read, so those of reads not yet answered are spared.
    private func invalidatePageCache(_ inode: UInt64, sparing spared: [Range<Int64>]) {
        let page = Int64(getpagesize())
        // Whole pages around each spared range, merged; the gaps between them are dropped.
        var kept: [Range<Int64>] = []
        for range in spared.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            let pages = (range.lowerBound / page * page)..<((range.upperBound + page - 1) / page * page)
            if let last = kept.last, last.upperBound >= pages.lowerBound {
                kept[kept.count - 1] = last.lowerBound..<max(last.upperBound, pages.upperBound)
            } else {
                kept.append(pages)
            }
        }
        var gaps: [(offset: Int64, length: Int64)] = []
        var position: Int64 = 0
        for range in kept {
            if range.lowerBound > position { gaps.append((position, range.lowerBound - position)) }
            position = range.upperBound
        }
        gaps.append((position, 0))  // 0: to the end
        alive.withLock { alive in
            guard alive else { return }
            for gap in gaps {
                let status = fuse_lowlevel_notify_inval_inode(session, inode, off_t(gap.offset), off_t(gap.length))
                if status != 0 && status != -ENOENT {
                    context.takeUnretainedValue().logger.warning("cannot drop the kernel's cached pages of a withdrawn blob",
                                                                 metadata: ["inode": "\(inode)", "errno": "\(-status)"])
                }
            }
        }
    }

    /// Serves requests until the filesystem is unmounted, then waits for every owed reply and
    /// tears the session down. Returns 0, a signal number, or a negative errno.
    public func run(maxThreads: UInt32 = 16) -> Int32 {
        let status = CFuse3_loopMultiThreaded(session, maxThreads)
        // No reply may be sent after the session is destroyed: the core answers every read it
        // holds, and each answer is counted until it is sent.
        let fuseContext = context.takeUnretainedValue()
        fuseContext.filesystem.shutdown()
        while fuseContext.owedReplies.load(ordering: .acquiring) > 0 { SystemThread.sleep(for: .milliseconds(1)) }
        alive.withLock { alive in
            alive = false
            fuse_session_unmount(session)
            fuse_session_destroy(session)
        }
        context.release()
        return status
    }

    /// Raises the kernel's readahead for this mount (root only): requests follow readahead, not
    /// max_read, so at the default 128 KiB a sequential reader pays one round trip per 128 KiB.
    /// Call once the session serves requests: it stats the mountpoint through the kernel.
    @discardableResult
    public func setReadahead(kilobytes: Int) -> Bool {
        var info = stat()
        guard getuid() == 0, stat(mountpoint, &info) == 0 else { return false }
        let device = UInt64(info.st_dev)
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff))
        let minor = (device & 0xff) | ((device >> 12) & ~UInt64(0xff))
        let path = "/sys/class/bdi/\(major):\(minor)/read_ahead_kb"
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let text = "\(kilobytes)\n"
        return text.withCString { write(fd, $0, strlen($0)) } == text.utf8.count
    }

    /// Asks the kernel to drop the mount; the loop in `run` then ends. Safe from any thread:
    /// it never touches libfuse's own unmount state, which `run` tears down.
    public func requestUnmount() {
        alive.withLock { alive in
            if alive { fuse_session_exit(session) }
        }
        _ = Unmounter.unmount(mountpoint, lazy: true)
    }
}

final class FuseContext: Sendable {
    let filesystem: CacheFilesystem
    let logger: Logger
    /// Read replies created and not yet sent.
    let owedReplies = Atomic<Int>(0)
    let statistics: MountStatistics?

    init(filesystem: CacheFilesystem, logger: Logger, statistics: MountStatistics?) {
        self.filesystem = filesystem
        self.logger = logger
        self.statistics = statistics
    }
}

/// The symbolic name of an errno a read is answered with, as people search for it.
func errnoName(_ code: Int32) -> String {
    let names: [Int32: String] = [EIO: "EIO", ENOENT: "ENOENT", EACCES: "EACCES", EPERM: "EPERM", ENOSPC: "ENOSPC",
                                  EINTR: "EINTR", EBADF: "EBADF", EINVAL: "EINVAL", ENOMEM: "ENOMEM", ETIMEDOUT: "ETIMEDOUT",
                                  ECANCELED: "ECANCELED", EISDIR: "EISDIR", ENOTCONN: "ENOTCONN"]
    return names[code] ?? "errno \(code)"
}

/// The answer to a read that may come later, from another thread: sent exactly once. One that
/// is dropped unsent answers EIO, so a lost reply can neither hang the reader nor outlive the
/// session (teardown waits until none is owed).
final class ReadReply: Sendable {
    // SAFETY: libfuse allows replying from any thread; `sent` lets exactly one reply through.
    private nonisolated(unsafe) let raw: fuse_req_t
    private let context: FuseContext
    private let sent = Atomic<Bool>(false)
    private let received = ContinuousClock.now

    init(_ raw: fuse_req_t, context: FuseContext) {
        self.raw = raw
        self.context = context
        context.owedReplies.add(1, ordering: .relaxed)
    }

    func send(_ result: Result<UnsafeRawBufferPointer, FSError>) {
        guard !sent.exchange(true, ordering: .acquiringAndReleasing) else { return }
        switch result {
        case .success(let bytes):
            _ = CFuse3_replyBuffer(raw, bytes.baseAddress, bytes.count)
            context.statistics?.answeredRead(bytes: bytes.count, after: .now - received, errorName: nil)
        case .failure(let error):
            fuse_reply_err(raw, error.code)
            context.statistics?.answeredRead(bytes: 0, after: .now - received, errorName: errnoName(error.code))
        }
        context.owedReplies.subtract(1, ordering: .releasing)
    }

    deinit {
        if !sent.load(ordering: .acquiring) {
            fuse_reply_err(raw, EIO)
            context.owedReplies.subtract(1, ordering: .releasing)
        }
    }
}

/// A request that is answered exactly once.
struct FuseRequest: @unchecked Sendable {
    // SAFETY: libfuse allows replying from any thread; every code path below replies once.
    let raw: fuse_req_t

    var context: FuseContext {
        // SAFETY: the userdata is the retained FuseContext, alive until the session is destroyed.
        Unmanaged<FuseContext>.fromOpaque(fuse_req_userdata(raw)!).takeUnretainedValue()
    }
    var filesystem: CacheFilesystem { context.filesystem }

    func fail(_ error: FSError) { fuse_reply_err(raw, error.code) }
    func ok() { fuse_reply_err(raw, 0) }

    func reply(_ entry: Entry) {
        var param = Self.entryParameters(entry)
        fuse_reply_entry(raw, &param)
    }

    static func entryParameters(_ entry: Entry) -> fuse_entry_param {
        var param = fuse_entry_param()
        param.ino = entry.attributes.inode
        param.generation = 1
        param.attr = stat(entry.attributes)
        param.attr_timeout = entry.cacheSeconds
        param.entry_timeout = entry.cacheSeconds
        return param
    }

    func replyAttributes(_ entry: Entry) {
        var attributes = Self.stat(entry.attributes)
        fuse_reply_attr(raw, &attributes, entry.cacheSeconds)
    }

    func reply<T>(_ result: Result<T, FSError>, _ success: (T) -> Void) {
        switch result {
        case .success(let value): success(value)
        case .failure(let error): fail(error)
        }
    }

    static func stat(_ attributes: FileAttributes) -> stat {
        var result = Glibc.stat()
        result.st_ino = UInt(attributes.inode)
        result.st_mode = attributes.mode
        result.st_nlink = UInt(attributes.linkCount)
        result.st_rdev = UInt(attributes.device)
        result.st_size = Int(attributes.size)
        result.st_uid = attributes.uid
        result.st_gid = attributes.gid
        result.st_blksize = 4096
        // Rounded up without overflowing: a descriptor may declare a size near Int64.max.
        result.st_blocks = Int(attributes.size / 512) + (attributes.size % 512 > 0 ? 1 : 0)
        let time = timespec(tv_sec: attributes.modified.seconds, tv_nsec: attributes.modified.nanoseconds)
        result.st_mtim = time
        result.st_ctim = time
        result.st_atim = time
        return result
    }
}

private func name(_ pointer: UnsafePointer<CChar>?) -> String {
    // SAFETY: libfuse passes a NUL-terminated name valid for the duration of the callback.
    pointer.map { String(cString: $0) } ?? ""
}

private func makeOperations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()
    ops.`init` = { userdata, connection in
        guard let connection, let userdata else { return }
        CFuse3_tuneConnection(connection, 1 << 20, 64)
        // SAFETY: the userdata is the retained FuseContext, alive until the session is destroyed.
        let filesystem = Unmanaged<FuseContext>.fromOpaque(userdata).takeUnretainedValue().filesystem
        if filesystem.acceptsSkippedOpens && CFuse3_skipOpensIfOffered(connection) != 0 { filesystem.skipOpens() }
    }
    ops.lookup = { req, parent, namePointer in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.lookup(parent: parent, name: name(namePointer)), request.reply)
    }
    ops.forget = { req, inode, count in
        let request = FuseRequest(raw: req!)
        request.filesystem.forget(inode, count: Int(count))
        fuse_reply_none(req)
    }
    ops.forget_multi = { req, count, forgets in
        let request = FuseRequest(raw: req!)
        // SAFETY: libfuse passes `count` valid entries for the duration of the callback.
        for item in UnsafeBufferPointer(start: forgets, count: count) {
            request.filesystem.forget(item.ino, count: Int(item.nlookup))
        }
        fuse_reply_none(req)
    }
    ops.readlink = { req, inode in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.readlink(inode)) { target in _ = fuse_reply_readlink(req, target) }
    }
    ops.getattr = { req, inode, _ in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.getattr(inode), request.replyAttributes)
    }
    ops.setattr = { req, inode, attributes, toSet, _ in
        let request = FuseRequest(raw: req!)
        guard let attributes else { return request.fail(.invalidArgument) }
        var changes = AttributeChanges()
        if toSet & FUSE_SET_ATTR_MODE != 0 { changes.permissions = attributes.pointee.st_mode & 0o7777 }
        if toSet & FUSE_SET_ATTR_SIZE != 0 { changes.size = Int64(attributes.pointee.st_size) }
        if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 {
            changes.modified = .now()
        } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
            changes.modified = Timestamp(seconds: attributes.pointee.st_mtim.tv_sec, nanoseconds: attributes.pointee.st_mtim.tv_nsec)
        }
        // atime, uid and gid are not kept: accepting them keeps touch and chown-free tools working.
        request.reply(request.filesystem.setattr(inode, changes), request.replyAttributes)
    }
    ops.mkdir = { req, parent, namePointer, mode in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.mkdir(parent: parent, name: name(namePointer), permissions: mode), request.reply)
    }
    ops.unlink = { req, parent, namePointer in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.unlink(parent: parent, name: name(namePointer))) { request.ok() }
    }
    ops.rmdir = { req, parent, namePointer in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.rmdir(parent: parent, name: name(namePointer))) { request.ok() }
    }
    ops.rename = { req, parent, namePointer, newParent, newNamePointer, flags in
        let request = FuseRequest(raw: req!)
        // RENAME_EXCHANGE and RENAME_NOREPLACE are not needed by any client we serve.
        guard flags == 0 else { return request.fail(.invalidArgument) }
        request.reply(request.filesystem.rename(parent: parent, name: name(namePointer),
                                                newParent: newParent, newName: name(newNamePointer))) { request.ok() }
    }
    ops.open = { req, inode, info in
        let request = FuseRequest(raw: req!)
        request.context.statistics?.kernelSent(.open)
        guard let info else { return request.fail(.invalidArgument) }
        request.reply(request.filesystem.open(inode, flags: OpenFlags(info.pointee.flags))) { opened in
            CFuse3_setKeepCache(info, opened.keepCache ? 1 : 0)
            CFuse3_setNoFlush(info, opened.needsFlush ? 0 : 1)
            CFuse3_setDirectIO(info, opened.directIO ? 1 : 0)
            info.pointee.fh = opened.handle
            fuse_reply_open(req, info)
        }
    }
    ops.create = { req, parent, namePointer, mode, info in
        let request = FuseRequest(raw: req!)
        guard let info else { return request.fail(.invalidArgument) }
        let result = request.filesystem.create(parent: parent, name: name(namePointer), permissions: mode,
                                               flags: OpenFlags(info.pointee.flags))
        request.reply(result) { entry, opened in
            CFuse3_setKeepCache(info, opened.keepCache ? 1 : 0)
            CFuse3_setNoFlush(info, opened.needsFlush ? 0 : 1)
            CFuse3_setDirectIO(info, opened.directIO ? 1 : 0)
            info.pointee.fh = opened.handle
            var param = FuseRequest.entryParameters(entry)
            fuse_reply_create(req, &param, info)
        }
    }
    ops.read = { req, inode, size, offset, info in
        let request = FuseRequest(raw: req!)
        let reply = ReadReply(req!, context: request.context)
        request.filesystem.read(inode, handle: info?.pointee.fh ?? 0, offset: Int64(offset), count: size) { result in
            reply.send(result)
        }
    }
    ops.write = { req, inode, buffer, size, offset, _ in
        let request = FuseRequest(raw: req!)
        // SAFETY: libfuse passes `size` readable bytes for the duration of the callback.
        let data = UnsafeRawBufferPointer(start: buffer, count: size)
        request.reply(request.filesystem.write(inode, offset: Int64(offset), data: data)) { written in
            fuse_reply_write(req, written)
        }
    }
    // Without these the kernel answers ENOSYS ("function not implemented") to symlink and EPERM
    // to link: answer both as a local filesystem without links does.
    ops.symlink = { req, _, _, _ in FuseRequest(raw: req!).fail(.notPermitted) }
    ops.link = { req, _, _, _ in FuseRequest(raw: req!).fail(.notPermitted) }
    // close() returns flush's answer (release's is lost): the close of index.json is where a
    // writable mount commits its tags.
    ops.flush = { req, inode, info in
        let request = FuseRequest(raw: req!)
        request.context.statistics?.kernelSent(.flush)
        request.reply(request.filesystem.flush(inode, handle: info?.pointee.fh ?? 0)) { request.ok() }
    }
    ops.release = { req, inode, info in
        let request = FuseRequest(raw: req!)
        request.context.statistics?.kernelSent(.release)
        request.filesystem.release(inode, handle: info?.pointee.fh ?? 0)
        request.ok()
    }
    ops.fsync = { req, inode, dataOnly, _ in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.fsync(inode, dataOnly: dataOnly != 0)) { request.ok() }
    }
    ops.opendir = { req, inode, info in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.isDirectory(inode)) { _ in fuse_reply_open(req, info) }
    }
    ops.readdir = { req, inode, size, offset, _ in
        let request = FuseRequest(raw: req!)
        // An entry takes at least 32 bytes of the buffer (a 24-byte header, the name, padding
        // to 8): no more than that many can fit.
        request.reply(request.filesystem.readdir(inode, offset: Int(offset), limit: size / 32 + 1)) { entries in
            var buffer = [CChar](repeating: 0, count: size)
            var used = 0
            var index = Int(offset)
            for entry in entries {
                var attributes = Glibc.stat()
                attributes.st_ino = UInt(entry.inode)
                attributes.st_mode = entry.type.modeBits
                let needed = buffer.withUnsafeMutableBufferPointer { storage in
                    fuse_add_direntry(req, storage.baseAddress! + used, size - used, entry.name, &attributes, off_t(index + 1))
                }
                if used + needed > size { break }
                used += needed
                index += 1
            }
            _ = buffer.withUnsafeBytes { CFuse3_replyBuffer(req, $0.baseAddress, used) }
        }
    }
    ops.readdirplus = { req, inode, size, offset, _ in
        let request = FuseRequest(raw: req!)
        // An entry takes at least fuse_direntplus's 152 bytes and an 8-byte-aligned name: any
        // more would be counted as looked up only to be forgotten again.
        request.reply(request.filesystem.readdirPlus(inode, offset: Int(offset), limit: size / 160 + 1)) { entries in
            var buffer = [CChar](repeating: 0, count: size)
            var used = 0
            var sent = 0
            for (entry, attributes) in entries {
                var param = attributes.map(FuseRequest.entryParameters) ?? fuse_entry_param()
                if attributes == nil {
                    param.ino = entry.inode
                    param.attr.st_ino = UInt(entry.inode)
                    param.attr.st_mode = entry.type.modeBits
                }
                let needed = buffer.withUnsafeMutableBufferPointer { storage in
                    fuse_add_direntry_plus(req, storage.baseAddress! + used, size - used, entry.name, &param, off_t(Int(offset) + sent + 1))
                }
                if used + needed > size { break }
                used += needed
                sent += 1
            }
            // Counted as looked up, but not sent: the kernel will never forget them.
            for (entry, attributes) in entries.dropFirst(sent) where attributes != nil {
                request.filesystem.forget(entry.inode, count: 1)
            }
            _ = buffer.withUnsafeBytes { CFuse3_replyBuffer(req, $0.baseAddress, used) }
        }
    }
    ops.releasedir = { req, _, _ in FuseRequest(raw: req!).ok() }
    ops.fsyncdir = { req, inode, dataOnly, _ in
        let request = FuseRequest(raw: req!)
        request.reply(request.filesystem.fsyncdir(inode, dataOnly: dataOnly != 0)) { request.ok() }
    }
    ops.statfs = { req, _ in
        let request = FuseRequest(raw: req!)
        let statistics = request.filesystem.statfs()
        var result = statvfs()
        result.f_bsize = UInt(statistics.blockSize)
        result.f_frsize = UInt(statistics.blockSize)
        result.f_files = UInt(statistics.files)
        result.f_namemax = UInt(statistics.nameMax)
        fuse_reply_statfs(req, &result)
    }
    return ops
}
