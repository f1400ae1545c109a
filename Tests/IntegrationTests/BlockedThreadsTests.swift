import Foundation
import SystemSupport
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 12, defect 7: opening a blob's partial download takes the blob's lock in the cache
/// directory, and a stopped mount may hold it. The wait ran on FUSE threads: twenty readers of
/// such a blob took all sixteen, and `ls` of the mount hung. It runs on fetch workers now,
/// bounded by `--timeout`.
@Suite("FUSE threads never wait on another process")
struct BlockedThreadsTests {
    /// This thread's ID, from /proc/thread-self (PID/task/TID).
    static func threadID() -> Int32 {
        var buffer = [CChar](repeating: 0, count: 64)
        let length = readlink("/proc/thread-self", &buffer, buffer.count - 1)
        guard length > 0 else { return -1 }
        return Int32(String(cString: buffer).split(separator: "/").last ?? "") ?? -1
    }

    @Test("a blob locked by another process: its readers wait, the rest of the mount answers at once")
    func lockedBlobLeavesTheMountResponsive() async throws {
        try await withWorkspace("locked-blob") { ws in
            let registry = try await ws.startRegistry()
            let seed = try await ws.seed(registry, variant: "index", layers: 1, layerSize: 2_000_000, seed: 45)
            let layer = seed.layers[0]
            let mount = try await ws.mountExpectingSuccess(registry.source("cache:main"), timeout: 10)
            // A stopped process of another mount holding the blob's lock.
            let lockFD = open(mount.cacheDir + "/locks/" + layer.hex, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            #expect(lockFD >= 0)
            #expect(flock(lockFD, LOCK_EX) == 0)
            var locked = true
            defer { if locked { close(lockFD) } }

            // Twenty direct readers: twenty requests to the mount at once (buffered readers of
            // one file wait on each other's pages in the page cache instead).
            let readers = 20
            let page = 4096
            let direct = LinuxConstants.directIO
            let finished = DispatchSemaphore(value: 0)
            let answers = Mutex<[Int: [UInt8]]>([:])
            let threads = Mutex<[Int32]>([])
            for reader in 0..<readers {
                Thread.detachNewThread {
                    threads.withLock { $0.append(Self.threadID()) }
                    let fd = open(mount.blobPath(layer.digest), O_RDONLY | O_CLOEXEC | direct)
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: page, alignment: page)
                    defer { buffer.deallocate() }
                    let count = pread(fd, buffer.baseAddress!, page, off_t(reader * 16 * page))
                    close(fd)
                    answers.withLock { $0[reader] = count == page ? Array(buffer) : [] }
                    finished.signal()
                }
            }
            // Every reader is waiting in the kernel for the mount's answer (for its request, or
            // for the page its request is filling) before we look.
            let (waiting, _) = await onThread {
                let deadline = Date().addingTimeInterval(10)
                while Date() < deadline {
                    let tids = threads.withLock { $0 }
                    let states = tids.map { Processes.readText("/proc/self/task/\($0)/wchan") }
                    if tids.count == readers && states.allSatisfy({ $0.contains("request_wait_answer") || $0.contains("fuse") || $0.contains("folio") }) { return true }
                    usleep(10_000)
                }
                return false
            }
            #expect(waiting, "readers: \(threads.withLock { $0 }.map { Processes.readText("/proc/self/task/\($0)/wchan") })")
            // While they wait, names and listings the kernel has not cached are still answered.
            for name in ["blobs/sha256", "ingest", ""] {
                let listing = try await Processes.run("/bin/ls", ["-l", mount.path(name)], timeout: 5, in: ws)
                #expect(listing.status == 0, "\(listing)")
            }
            #expect(answers.withLock { $0.isEmpty }, "the readers must still be waiting on the lock")

            close(lockFD)
            locked = false
            let (allDone, _) = await onThread { (0..<readers).allSatisfy { _ in finished.wait(timeout: .now() + 30) == .success } }
            #expect(allDone)
            let blob = try FileIO.readAll(mount.blobPath(layer.digest))
            for reader in 0..<readers {
                let offset = reader * 16 * page
                #expect(answers.withLock { $0[reader] } == Array(blob[offset..<(offset + page)]), "reader \(reader); log: \(mount.log.suffix(1500))")
            }
            let unmounted = try await mount.unmount(in: ws)
            #expect(unmounted.status == 0, "\(unmounted)")
        }
    }
}
