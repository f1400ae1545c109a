import Foundation
import Testing

@Suite("The built binary")
struct BinaryTests {
    /// The sources import FoundationEssentials only: corelibs Foundation would link ICU's data,
    /// 34 MB that every cold start of a mount reads from disk (about 10 ms on this machine).
    @Test("links FoundationEssentials, never corelibs Foundation or ICU")
    func linksNoCorelibsFoundation() async throws {
        try await withWorkspace("binary-links") { ws in
            let result = try await Processes.run("/usr/bin/ldd", [try Harness.binary()], in: ws)
            #expect(result.status == 0, "\(result)")
            // The tests run the debug build, which links the Swift libraries dynamically.
            #expect(result.stdout.contains("libFoundationEssentials.so"), "\(result)")
            for library in ["libFoundation.so", "libFoundationInternationalization.so", "lib_FoundationICU.so"] {
                #expect(!result.stdout.contains(library), "\(library) is linked: \(result)")
            }
        }
    }
}
