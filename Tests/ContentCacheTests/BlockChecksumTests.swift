import CChecksum
@testable import ContentCache
import Testing

/// The journal's block checksum: CRC-32C, the same with the processor's instructions as with
/// the table, in one piece or continued over pieces.
@Suite struct BlockChecksumTests {
    @Test func knownValuesOfCRC32C() {
        // RFC 3720, appendix B.4: 32 bytes of zeros, of 0xFF, and the ascending bytes 0...31.
        let cases: [([UInt8], UInt32)] = [
            ([UInt8](repeating: 0, count: 32), 0x8A91_36AA),
            ([UInt8](repeating: 0xFF, count: 32), 0x62A8_AB43),
            ((0..<32).map { UInt8($0) }, 0x46DD_794E),
            (Array("123456789".utf8), 0xE306_9283),
            ([], 0),
        ]
        for (bytes, expected) in cases {
            #expect(bytes.withUnsafeBytes { crc32c(0, $0) } == expected, "\(bytes.prefix(4))…")
            #expect(bytes.withUnsafeBytes { CChecksum_crc32cPortable(0, $0.baseAddress, $0.count) } == expected)
        }
    }

    @Test func hardwareAndTableAgreeAtEveryLengthAndAlignmentAndAcrossPieces() {
        var state: UInt64 = 0x1234_5678
        let bytes = (0..<40_000).map { _ -> UInt8 in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
        bytes.withUnsafeBytes { all in
            for start in 0..<9 {
                // From 12 KiB on, the instructions run in three interleaved lanes of 4 KiB whose CRCs are joined.
                for length in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 1000, 4090, 12_287, 12_288, 12_289, 24_576 + 13, 39_990] {
                    let piece = UnsafeRawBufferPointer(rebasing: all[start..<(start + length)])
                    #expect(crc32c(0, piece) == CChecksum_crc32cPortable(0, piece.baseAddress, piece.count), "at \(start), \(length) bytes")
                }
            }
            let whole = crc32c(0, all)
            #expect(whole == CChecksum_crc32cPortable(0, all.baseAddress, all.count))
            for cut in [1001, 12_288, 20_000] {
                let split = crc32c(crc32c(0, UnsafeRawBufferPointer(rebasing: all[..<cut])), UnsafeRawBufferPointer(rebasing: all[cut...]))
                #expect(whole == split, "continued over two pieces cut at \(cut)")
            }
        }
    }

    @Test func thisMachineUsesItsCRCInstructions() {
        #if arch(x86_64) || arch(arm64)
        #expect(CChecksum_crc32cIsHardware() == 1, "SSE 4.2 or the arm64 CRC extension is expected on CI machines")
        #endif
    }
}
