import Foundation
import Testing

@testable import ContentCache

#if canImport(Glibc)
import Glibc
#endif

/// What `FetchTuning.cachedBehindHash` relies on: the advice drops a file's clean pages.
@Suite struct DroppedPagesTests {
    /// Pages of the first `count` bytes of `fd` that are in the page cache.
    static func residentPages(_ fd: Int32, count: Int) -> Int {
        guard let map = mmap(nil, count, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else { return -1 }
        defer { munmap(map, count) }
        let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        var vector = [UInt8](repeating: 0, count: (count + pageSize - 1) / pageSize)
        guard mincore(map, count, &vector) == 0 else { return -1 }
        return vector.filter { $0 & 1 != 0 }.count
    }

    @Test func cleanPagesOfTheRangeLeaveThePageCacheAndTheRestStay() throws {
        let path = NSTemporaryDirectory() + "dropped-pages-\(UUID().uuidString)"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        try #require(fd >= 0, "cannot create \(path)")
        defer { unlink(path) }
        let file = OpenFile(fd: fd)
        let size = 4 << 20
        try file.write(Array(repeating: 0x5A, count: size), at: 0)
        // Written back first: dirty pages are not dropped, which is why the fetcher starts
        // write-back of every block as it lands.
        #expect(fsync(fd) == 0)
        let pages = Self.residentPages(fd, count: size)
        #expect(pages == size / Int(sysconf(Int32(_SC_PAGESIZE))), "the written file starts cached")
        file.dropCachedPages(0..<Int64(size / 2))
        let resident = Self.residentPages(fd, count: size)
        #expect(resident == pages / 2, "the first half dropped, the second kept: \(resident) of \(pages)")
        #expect(try file.read(offset: 0, count: size) == Array(repeating: 0x5A, count: size), "what was dropped is read from disk")
    }
}
