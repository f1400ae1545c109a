import Foundation
import Testing

// The documents that make checkable claims are checked: docs/CONFIGURATION.md against `--help`
// of every command the built binary has, docs/SEMANTICS.md's statements against the tests they
// name, and README.md's links to the documents.

/// `--help` of every command, found by walking SUBCOMMANDS from the top.
enum HelpPages {
    /// Command path ("" for the top, "mount", "cache ls") -> the options its --help lists.
    static func all(in ws: Workspace) async throws -> [String: Set<String>] {
        let binary = try Harness.binary()
        var pages: [String: Set<String>] = [:]
        var pending: [[String]] = [[]]
        while let path = pending.popLast() {
            let result = try await Processes.run(binary, path + ["--help"], timeout: 30, in: ws)
            guard result.status == 0 else { throw HarnessError("ocicachefs \(path.joined(separator: " ")) --help failed: \(result)") }
            let sections = sectioned(result.stdout)
            pages[path.joined(separator: " ")] = Set((sections["OPTIONS"] ?? []).flatMap(optionNames))
            // `  ls      List …`: a lower-case name, then its description (not "  See 'ocicachefs help …'").
            for line in sections["SUBCOMMANDS"] ?? [] {
                guard line.range(of: "^  [a-z][a-z0-9-]*( {2,}|$)", options: .regularExpression) != nil,
                      let name = line.split(separator: " ").first.map(String.init) else { continue }
                guard path.count < 3, pages[(path + [name]).joined(separator: " ")] == nil else {
                    throw HarnessError("ocicachefs \(path.joined(separator: " ")) --help lists subcommand \(name) again or too deep")
                }
                pending.append(path + [name])
            }
        }
        return pages
    }

    /// Lines under each `NAME:` heading of a help page.
    static func sectioned(_ text: String) -> [String: [String]] {
        var sections: [String: [String]] = [:]
        var current: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if let first = line.first, first.isUppercase, line.hasSuffix(":"), !line.contains(" ") {
                current = String(line.dropLast())
            } else if let current {
                sections[current, default: []].append(line)
            }
        }
        return sections
    }

    /// `  -h, --help   Show help` -> ["-h", "--help"]; `  --cache-dir <DIR>   …` -> ["--cache-dir"].
    static func optionNames(_ line: String) -> [String] {
        guard line.hasPrefix("  -") else { return [] }
        let head = line.dropFirst(2).components(separatedBy: "  ").first ?? ""
        return head.components(separatedBy: ", ").compactMap { part in
            let name = part.split(separator: " ").first.map(String.init) ?? ""
            return name.hasPrefix("-") ? name : nil
        }
    }
}

/// docs/CONFIGURATION.md: `## \`ocicachefs PATH\`` sections whose tables' first cells name options.
enum ConfigurationPage {
    static let path = Harness.packageRoot + "/docs/CONFIGURATION.md"
    static let everyCommand = "Every command"

    /// Section title ("mount", "cache ls", or `everyCommand`) -> options its tables list.
    static func sections() throws -> [String: Set<String>] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var sections: [String: Set<String>] = [:]
        var current: String?
        for line in text.split(separator: "\n").map(String.init) {
            if line.hasPrefix("## ") {
                let title = line.dropFirst(3).trimmingCharacters(in: .whitespaces)
                if title == everyCommand {
                    current = everyCommand
                } else if title.hasPrefix("`ocicachefs"), title.hasSuffix("`") {
                    current = title.dropFirst("`ocicachefs".count).dropLast().trimmingCharacters(in: .whitespaces)
                } else {
                    current = nil
                }
                if let current { sections[current, default: []] = sections[current] ?? [] }
                continue
            }
            guard let current, line.hasPrefix("| `-") else { continue }
            let firstCell = line.dropFirst(2).components(separatedBy: " |").first ?? ""
            for piece in firstCell.components(separatedBy: "`").enumerated() where piece.offset % 2 == 1 {
                if let name = piece.element.split(separator: " ").first, name.hasPrefix("-") {
                    sections[current, default: []].insert(String(name))
                }
            }
        }
        return sections
    }

    /// Every difference between the page and the help pages, one line each; empty when they agree.
    static func differences(help: [String: Set<String>], page: [String: Set<String>]) -> [String] {
        var lines: [String] = []
        let global = page[everyCommand] ?? []
        for (command, options) in help.sorted(by: { $0.key < $1.key }) {
            let name = ("ocicachefs " + command).trimmingCharacters(in: .whitespaces)
            let own = command.isEmpty ? [] : page[command]
            if !command.isEmpty && own == nil {
                lines.append("\(name): no section \"## `\(name)`\" in docs/CONFIGURATION.md; its --help lists \(options.subtracting(global).sorted().joined(separator: " "))")
                continue
            }
            let documented = (own ?? []).union(global)
            let missing = options.subtracting(documented).sorted()
            let extra = (own ?? []).subtracting(options).sorted()
            let globalMissing = global.subtracting(options).sorted()
            if !missing.isEmpty { lines.append("\(name): --help lists, docs/CONFIGURATION.md lacks: \(missing.joined(separator: " "))") }
            if !extra.isEmpty { lines.append("\(name): docs/CONFIGURATION.md lists, --help lacks: \(extra.joined(separator: " "))") }
            if !globalMissing.isEmpty {
                lines.append("\(name): \"\(everyCommand)\" lists, --help lacks: \(globalMissing.joined(separator: " "))")
            }
        }
        for command in page.keys.sorted() where command != everyCommand && help[command] == nil {
            lines.append("ocicachefs \(command): docs/CONFIGURATION.md has a section, the binary has no such command")
        }
        return lines
    }
}

/// docs/SEMANTICS.md: every statement (list item) names, in backticks, the tests behind it as
/// `TypeName.functionName`; each must be a @Test function of a type declared in Tests/.
enum SemanticsPage {
    static let path = Harness.packageRoot + "/docs/SEMANTICS.md"

    /// The list items, continuation lines joined.
    static func statements() throws -> [String] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var statements: [String] = []
        var current: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if line.hasPrefix("- ") {
                if let current { statements.append(current) }
                current = String(line.dropFirst(2))
            } else if line.hasPrefix("  "), current != nil {
                current! += " " + line.trimmingCharacters(in: .whitespaces)
            } else {
                if let current { statements.append(current) }
                current = nil
            }
        }
        if let current { statements.append(current) }
        return statements
    }

    /// `Type.function` references in backticks.
    static func references(in statement: String) -> [(type: String, function: String)] {
        statement.components(separatedBy: "`").enumerated().compactMap { piece -> (String, String)? in
            guard piece.offset % 2 == 1 else { return nil }
            let parts = piece.element.split(separator: ".").map(String.init)
            guard parts.count == 2, let first = parts[0].first, first.isUppercase, let second = parts[1].first, second.isLowercase,
                  parts.allSatisfy({ $0.allSatisfy { $0.isLetter || $0.isNumber } }) else { return nil }
            return (parts[0], parts[1])
        }
    }

    /// Every Swift source under Tests/.
    static func testSources() throws -> [(path: String, text: String)] {
        let root = Harness.packageRoot + "/Tests"
        guard let walker = FileManager.default.enumerator(atPath: root) else { throw HarnessError("cannot list \(root)") }
        var sources: [(String, String)] = []
        for case let relative as String in walker where relative.hasSuffix(".swift") {
            sources.append((relative, try String(contentsOfFile: root + "/" + relative, encoding: .utf8)))
        }
        return sources
    }

    /// Whether `text` declares `type` and a @Test function `function`.
    static func declares(_ text: String, type: String, function: String) -> Bool {
        let declaresType = ["struct ", "final class ", "class ", "enum ", "extension "].contains { keyword in
            text.range(of: "\(keyword)\(type)\\b", options: .regularExpression) != nil
        }
        guard declaresType, let declaration = text.range(of: "func \(function)(") else { return false }
        // The attribute may span lines (arguments); no other function may come between.
        let before = text[..<declaration.lowerBound]
        guard let attribute = before.range(of: "@Test", options: .backwards) else { return false }
        return !before[attribute.upperBound...].contains("func ")
    }
}

@Suite("The documents agree with the binary and the tests")
struct DocumentationTests {
    @Test("docs/CONFIGURATION.md lists exactly the options --help of every command lists")
    func configurationMatchesHelp() async throws {
        try await withWorkspace("docs-configuration") { ws in
            let help = try await HelpPages.all(in: ws)
            #expect(help["mount"]?.contains("--cache-dir") == true && help["cache prune"]?.contains("--max-size") == true,
                    "the help pages were read: \(help)")
            let differences = ConfigurationPage.differences(help: help, page: try ConfigurationPage.sections())
            #expect(differences.isEmpty, "docs/CONFIGURATION.md and --help disagree:\n\(differences.joined(separator: "\n"))")
        }
    }

    @Test("the configuration check names a missing and an extra option")
    func configurationCheckFindsDifferences() {
        let help = ["": Set(["--help", "--version"]), "mount": Set(["--help", "--version", "--cache-dir", "--tag"])]
        let page = [ConfigurationPage.everyCommand: Set(["--help", "--version"]), "mount": Set(["--cache-dir", "--old"]),
                    "refresh": Set<String>()]
        #expect(ConfigurationPage.differences(help: help, page: page) == [
            "ocicachefs mount: --help lists, docs/CONFIGURATION.md lacks: --tag",
            "ocicachefs mount: docs/CONFIGURATION.md lists, --help lacks: --old",
            "ocicachefs refresh: docs/CONFIGURATION.md has a section, the binary has no such command",
        ])
        #expect(HelpPages.optionNames("  -h, --help              Show help information.") == ["-h", "--help"])
        #expect(HelpPages.optionNames("  --metrics-listen <ADDRESS:PORT>") == ["--metrics-listen"])
        #expect(HelpPages.optionNames("        A blob is published once --writable") == [])
    }

    @Test("every statement of docs/SEMANTICS.md names tests, and every test it names exists")
    func semanticsNamesRealTests() throws {
        let statements = try SemanticsPage.statements()
        #expect(statements.count >= 20, "SEMANTICS.md has \(statements.count) statements")
        let sources = try SemanticsPage.testSources()
        var named = 0
        for statement in statements {
            let references = SemanticsPage.references(in: statement)
            #expect(!references.isEmpty, "a statement names no test: \(statement.prefix(200))")
            for reference in references {
                named += 1
                #expect(sources.contains { SemanticsPage.declares($0.text, type: reference.type, function: reference.function) },
                        "`\(reference.type).\(reference.function)` is not a @Test of a type in Tests/ (in: \(statement.prefix(120)))")
            }
        }
        #expect(named >= statements.count)
        #expect(!sources.contains { SemanticsPage.declares($0.text, type: "DocumentationTests", function: "noSuchTest") },
                "the check can fail")
    }

    @Test("README.md links every document")
    func readmeLinksTheDocuments() throws {
        let readme = try String(contentsOfFile: Harness.packageRoot + "/README.md", encoding: .utf8)
        for document in ["docs/USAGE.md", "docs/CONFIGURATION.md", "docs/SEMANTICS.md", "docs/TROUBLESHOOTING.md",
                         "docs/ARCHITECTURE.md", "docs/SECURITY.md", "docs/ci/github-actions.yml", "docs/ci/gitlab-ci.yml"] {
            #expect(readme.contains("](\(document))"), "README.md does not link \(document)")
            #expect(FileManager.default.fileExists(atPath: Harness.packageRoot + "/" + document), "\(document) is missing")
        }
    }
}
