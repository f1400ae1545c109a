import FoundationEssentials
import FuzzTargets
import Testing

/// Every seed input goes through its target once: the targets stay runnable without libFuzzer,
/// and an input that once crashed (kept in the corpus) keeps being tried by the plain tests.
struct CorpusReplayTests {
    static let corpus = URL(filePath: #filePath).deletingLastPathComponent()
        .appending(path: "../../Fuzz/corpus").standardized

    @Test(arguments: FuzzTarget.allCases)
    func replaysSeedCorpus(_ target: FuzzTarget) throws {
        let directory = Self.corpus.appending(path: target.rawValue)
        let names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
        #expect(!names.isEmpty, "Fuzz/corpus/\(target.rawValue) is empty")
        for name in names.sorted() {
            let input = try Data(contentsOf: directory.appending(path: name))
            target.run(Array(input))
        }
    }

    @Test func everyCorpusDirectoryNamesATarget() throws {
        let directories = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path)
        #expect(Set(directories) == Set(FuzzTarget.allCases.map(\.rawValue)))
    }
}
