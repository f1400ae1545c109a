@testable import CacheFS
import Testing

@testable import FuseBinding

/// Issue 13, item 1: `ls -l` of a blob whose descriptor declared a size above 2⁶³−512 crashed
/// the daemon (an overflow rounding the size up to 512-byte blocks) and left the mount broken.
@Suite struct AttributesTests {
    static func attributes(size: Int64) -> FileAttributes {
        FileAttributes(inode: 2, type: .regular, permissions: 0o444, linkCount: 1, size: size,
                       modified: Timestamp(seconds: 0, nanoseconds: 0), uid: 0, gid: 0)
    }

    @Test(arguments: [(Int64(0), 0), (1, 1), (512, 1), (513, 2), (Int64.max - 100, Int(Int64.max / 512) + 1), (Int64.max, Int(Int64.max / 512) + 1)])
    func blocksRoundUpWithoutOverflow(size: Int64, blocks: Int) {
        let result = FuseRequest.stat(Self.attributes(size: size))
        #expect(result.st_blocks == blocks)
        #expect(Int64(result.st_size) == size)
    }
}
