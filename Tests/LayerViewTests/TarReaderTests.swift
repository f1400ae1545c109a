import Foundation
@testable import LayerView
import ModelTesting
import Testing

// The tar parser of the `files/` view on archives real GNU tar writes (its own format and PAX),
// on headers written by hand for what tar does not make here (base-256 sizes, sparse members),
// and on broken archives.

/// A scratch directory removed at the end of the test.
final class ScratchDirectory {
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory.appending(path: "tar-tests-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func write(_ relative: String, _ text: String) throws {
        let url = URL(fileURLWithPath: path).appending(path: relative)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(text.utf8).write(to: url)
    }
}

/// Every entry of a whole archive, fed in pieces of `piece` bytes; throws what the parser throws.
func parseTar(_ archive: [UInt8], piece: Int = 4096) throws(TarError) -> [TarEntry] {
    var reader = TarReader()
    var entries: [TarEntry] = []
    var start = 0
    while start < archive.count {
        let end = min(archive.count, start + piece)
        try feed(&reader, Array(archive[start..<end])) { entries.append($0) }
        start = end
    }
    try reader.finish()
    return entries
}

/// `Array.withUnsafeBytes` rethrows untyped errors: the parser's typed one is carried out by hand.
func feed(_ reader: inout TarReader, _ bytes: [UInt8], entry: (TarEntry) -> Void) throws(TarError) {
    var failure: TarError?
    bytes.withUnsafeBytes { buffer in
        do throws(TarError) { try reader.feed(buffer, entry: entry) } catch { failure = error }
    }
    if let failure { throw failure }
}

/// A ustar header written by hand; `size` given as raw field bytes when octal cannot hold it.
func handHeader(name: String, flag: Character = "0", size: Int64 = 0, sizeField: [UInt8]? = nil, linkName: String = "",
                magic: String = "ustar\u{0}00", extra: (inout [UInt8]) -> Void = { _ in }) -> [UInt8] {
    var header = [UInt8](repeating: 0, count: 512)
    func put(_ text: String, at offset: Int) { for (index, byte) in text.utf8.enumerated() { header[offset + index] = byte } }
    put(name, at: 0)
    put("0000644\u{0}", at: 100)
    put("0001750\u{0}", at: 108)
    put("0001750\u{0}", at: 116)
    if let sizeField { for (index, byte) in sizeField.enumerated() { header[124 + index] = byte } } else {
        put(String(size, radix: 8).leftPadded(to: 11) + "\u{0}", at: 124)
    }
    put("14707054400\u{0}", at: 136)
    header[156] = UInt8(ascii: flag.unicodeScalars.first!)
    put(linkName, at: 157)
    put(magic, at: 257)
    extra(&header)
    for index in 148..<156 { header[index] = UInt8(ascii: " ") }
    let sum = header.reduce(0) { $0 + Int($1) }
    put(String(sum, radix: 8).leftPadded(to: 6) + "\u{0} ", at: 148)
    return header
}

extension String {
    func leftPadded(to length: Int) -> String { String(repeating: "0", count: max(0, length - count)) + self }
}

func padded(_ bytes: [UInt8]) -> [UInt8] { bytes + [UInt8](repeating: 0, count: (512 - bytes.count % 512) % 512) }

struct TarReaderTests {
    /// A tree with what BuildKit's layers hold: long names past 100 and 255 bytes, hard links,
    /// symlinks (dangling and in loops), whiteouts, an empty directory, odd modes, a fifo.
    static func makeTree(in scratch: ScratchDirectory) throws -> [String] {
        let long100 = String(repeating: "d", count: 60) + "/" + String(repeating: "n", count: 70)
        let long255 = (0..<5).map { "segment\($0)-" + String(repeating: "x", count: 50) }.joined(separator: "/") + "/file.txt"
        try scratch.write("etc/hello.txt", "hello\n")
        try scratch.write(long100, "long name\n")
        try scratch.write(long255, "longer name\n")
        try scratch.write("usr/.wh.removed", "")
        try scratch.write("usr/.wh..wh..opq", "")
        try scratch.write("bin/tool", String(repeating: "binary\n", count: 3000))
        try FileManager.default.createDirectory(atPath: scratch.path + "/empty", withIntermediateDirectories: true)
        try shell("""
            cd '\(scratch.path)' && ln bin/tool bin/tool-again && ln -s ../etc/hello.txt bin/hello && ln -s nowhere bin/dangling \
            && ln -s loop-b bin/loop-a && ln -s loop-a bin/loop-b && ln -s '\(long255)' bin/to-long && chmod 4751 bin/tool \
            && chmod 1777 empty && mkfifo bin/fifo && chown -h 1234:5678 etc/hello.txt bin/hello \
            && touch -h -d '2021-02-03 04:05:06.789' bin/hello etc/hello.txt
            """)
        return [long100, long255]
    }

    @Test(arguments: ["gnu", "pax", "posix-without-atime"])
    func readsWhatRealTarWrites(_ format: String) throws {
        let scratch = try ScratchDirectory()
        let longNames = try Self.makeTree(in: scratch)
        let options = format == "posix-without-atime" ? "--format=posix --pax-option=delete=atime,delete=ctime" : "--format=\(format)"
        let archivePath = scratch.path + ".tar"
        defer { try? FileManager.default.removeItem(atPath: archivePath) }
        try shell("tar -C '\(scratch.path)' \(options) --sort=name -cf '\(archivePath)' .")
        let archive = try Array(Data(contentsOf: URL(fileURLWithPath: archivePath)))
        let listing = try shell("tar -tf '\(archivePath)'")
        let names = Set(String(decoding: listing, as: UTF8.self).split(separator: "\n").map(String.init))

        for piece in [1, 511, 512, 4096, 1 << 20] {
            let entries = try parseTar(archive, piece: piece)
            #expect(Set(entries.map(\.path)) == names, "piece \(piece)")
        }
        let entries = try parseTar(archive)
        func entry(_ path: String) -> TarEntry? { entries.first { $0.path == "./" + path } }

        let hello = try #require(entry("etc/hello.txt"))
        #expect(hello.kind == .regular && hello.size == 6 && hello.uid == 1234 && hello.gid == 5678)
        #expect(Array(archive[Int(hello.dataOffset)..<Int(hello.dataOffset) + 6]) == Array("hello\n".utf8))
        #expect(hello.modifiedSeconds == 1_612_325_106)
        if format != "gnu" { #expect(hello.modifiedNanoseconds == 789_000_000) }
        let tool = try #require(entry("bin/tool"))
        #expect(tool.mode == 0o4751 && tool.size == 21_000)
        let again = try #require(entry("bin/tool-again"))
        #expect(again.kind == .hardLink && again.linkTarget == "./bin/tool")
        #expect(entry("bin/hello")?.kind == .symlink && entry("bin/hello")?.linkTarget == "../etc/hello.txt")
        #expect(entry("bin/to-long")?.linkTarget == longNames[1])
        #expect(entry("bin/fifo")?.kind == .fifo)
        #expect(entry("empty/")?.kind == .directory && entry("empty/")?.mode == 0o1777)
        for name in longNames {
            let long = try #require(entry(name))
            let text = try String(contentsOfFile: scratch.path + "/" + name, encoding: .utf8)
            #expect(Array(archive[Int(long.dataOffset)..<Int(long.dataOffset + long.size)]) == Array(text.utf8))
        }
        #expect(entry("usr/.wh.removed")?.kind == .regular && entry("usr/.wh..wh..opq")?.size == 0)

        let tree = TarTree(entries: entries)
        #expect(tree.problemCount == 0)
        let toolNode = try #require(tree.node(at: "bin/tool"))
        #expect(tree.node(at: "bin/tool-again") == toolNode && tree.nodes[toolNode].linkCount == 2)
        #expect(tree.nodes[try #require(tree.node(at: "bin"))].linkCount == 2)
        // bin, dddd…, empty, etc, segment0-…, usr
        #expect(tree.root.linkCount == 2 + 6)
        #expect(TarEntryList.parse(TarEntryList.serialized(entries)) == entries)
    }

    @Test func pathsInPrefixAndGlobalHeaders() throws {
        // ustar's prefix field; a PAX global header's mtime applies to the members after it,
        // an extended header's path to the next member only.
        let prefixed = handHeader(name: "file", size: 3) { header in
            for (index, byte) in "some/prefix".utf8.enumerated() { header[345 + index] = byte }
        }
        let globalRecords = padded(Array("19 mtime=1234.5678\n".utf8))
        let global = handHeader(name: "pax_global_header", flag: "g", size: 19)
        let extendedRecords = padded(Array("26 path=from/pax/header\n".utf8))
        let extended = handHeader(name: "ignored", flag: "x", size: 24)
        let archive = prefixed + padded(Array("abc".utf8)) + global + globalRecords + extended + extendedRecords
            + handHeader(name: "short-name", size: 0) + handHeader(name: "next", size: 0) + [UInt8](repeating: 0, count: 1024)
        // The record length must count itself: 26 for "path=from/pax/header" would be a lie.
        #expect(throws: TarError.self) { try parseTar(archive) }
        let fixedRecords = padded(Array("24 path=from/pax/header\n".utf8))
        let fixed = prefixed + padded(Array("abc".utf8)) + global + globalRecords + extended + fixedRecords
            + handHeader(name: "short-name", size: 0) + handHeader(name: "next", size: 0) + [UInt8](repeating: 0, count: 1024)
        let entries = try parseTar(fixed)
        #expect(entries.map(\.path) == ["some/prefix/file", "from/pax/header", "next"])
        #expect(entries[0].dataOffset == 512 && entries[0].modifiedSeconds == 0o14707054400)
        #expect(entries[1].modifiedSeconds == 1234 && entries[1].modifiedNanoseconds == 567_800_000)
        #expect(entries[2].modifiedSeconds == 1234)
    }

    /// PAX times before 1970 with a fraction count back from the second before; the earliest
    /// second there is with a fraction cannot be held, and is a bad header, not an overflow.
    @Test func negativePaxTimesAndTheEarliestOne() throws {
        func archive(_ record: String) -> [UInt8] {
            let records = Array(record.utf8)
            return handHeader(name: "pax_global_header", flag: "g", size: Int64(records.count)) + padded(records)
                + handHeader(name: "file", size: 0) + [UInt8](repeating: 0, count: 1024)
        }
        let entries = try parseTar(archive("15 mtime=-1.25\n"))
        #expect(entries.first?.modifiedSeconds == -2 && entries.first?.modifiedNanoseconds == 750_000_000)
        #expect(throws: TarError.self) { try parseTar(archive("32 mtime=-9223372036854775808.5\n")) }
        #expect(try parseTar(archive("30 mtime=-9223372036854775808\n")).first?.modifiedSeconds == Int64.min)
    }

    /// Headers full of keys no entry is made of are not kept: a global header's would otherwise
    /// stay for the whole walk and be merged into every entry after it.
    @Test func paxKeysNoEntryUsesAreNotKept() throws {
        var text = "mtime=77"
        for index in 0..<5000 { text += "\n" + "k\(index)=v" }
        // Each record's length counts its own digits.
        let records = text.split(separator: "\n").map { record -> String in
            let body = " " + record + "\n"
            var length = body.utf8.count
            while String(length).utf8.count + body.utf8.count != length { length = String(length).utf8.count + body.utf8.count }
            return String(length) + body
        }.joined()
        let bytes = Array(records.utf8)
        var reader = TarReader()
        var entries: [TarEntry] = []
        for flag: Character in ["g", "x"] {
            try feed(&reader, handHeader(name: "pax", flag: flag, size: Int64(bytes.count)) + padded(bytes)) { entries.append($0) }
        }
        #expect(reader.paxRecordsHeld == 2, "mtime, in the global and the extended records")
        try feed(&reader, handHeader(name: "file", size: 0) + [UInt8](repeating: 0, count: 1024)) { entries.append($0) }
        #expect(entries.map(\.path) == ["file"] && entries.first?.modifiedSeconds == 77)
    }

    /// Members whose paths imply more directories than a tree holds (a small hostile blob can
    /// imply millions): the tree says so instead of growing without bound.
    @Test func aTreeStopsAtItsNodeLimit() {
        let deep = (0..<40).map { branch in
            TarEntry(path: "b\(branch)/" + Array(repeating: "d", count: 30).joined(separator: "/") + "/file", kind: .regular, mode: 0o644)
        }
        let bounded = TarTree(entries: deep, nodeLimit: 1000)
        #expect(bounded.exceedsNodeLimit && bounded.nodes.count <= 1000)
        let whole = TarTree(entries: deep, nodeLimit: 2000)
        #expect(!whole.exceedsNodeLimit && whole.nodes.count == 1 + 40 * 32)
        #expect(whole.node(at: "b39/" + Array(repeating: "d", count: 30).joined(separator: "/") + "/file") != nil)
    }

    @Test func base256SizeOfAFileOver8GiB() throws {
        // 9 GiB does not fit 11 octal digits: GNU tar writes it in base-256. The data is not
        // there; the parser says how much it would skip, and the skip lands on the next header.
        let size: Int64 = 9 << 30
        var field = [UInt8](repeating: 0, count: 12)
        field[0] = 0x80
        for index in 0..<8 { field[11 - index] = UInt8(truncatingIfNeeded: size >> (8 * index)) }
        var reader = TarReader()
        var entries: [TarEntry] = []
        let header = handHeader(name: "huge", sizeField: field, magic: "ustar  \u{0}")
        try feed(&reader, header) { entries.append($0) }
        #expect(entries.first?.size == size && reader.dataAhead == size)
        reader.skip(size)
        let after = handHeader(name: "after", size: 0) + [UInt8](repeating: 0, count: 1024)
        try feed(&reader, after) { entries.append($0) }
        try reader.finish()
        #expect(entries.map(\.path) == ["huge", "after"] && entries[1].dataOffset == 512 + size + 512)
        #expect(reader.isFinished)
    }

    @Test func sparseMembersShowTheirSizeAndAreMarked() throws {
        let scratch = try ScratchDirectory()
        try shell("cd '\(scratch.path)' && truncate -s 1M sparse && printf data >> sparse && printf x | dd of=sparse bs=1 seek=4096 conv=notrunc 2>/dev/null && sync sparse")
        for format in ["gnu", "pax"] {
            let archive = try shell("tar -C '\(scratch.path)' --sparse --format=\(format) -cf - sparse")
            let entries = try parseTar(archive)
            #expect(entries.count == 1)
            #expect(entries.first?.isSparse == true && entries.first?.size == (1 << 20) + 4 && entries.first?.path == "sparse",
                    "\(format): \(entries)")
        }
    }

    @Test func brokenArchivesAreRefused() throws {
        let scratch = try ScratchDirectory()
        try scratch.write("a", String(repeating: "a", count: 3000))
        let archive = try shell("tar -C '\(scratch.path)' -cf - a")
        // A flipped byte in the header: the checksum no longer holds.
        var flipped = archive
        flipped[3] ^= 0x20
        #expect(throws: TarError.badChecksum(at: 0)) { try parseTar(flipped) }
        // Cut inside the data.
        #expect(throws: TarError.truncated(at: 2048)) { try parseTar(Array(archive.prefix(2048))) }
        // Cut inside a header.
        #expect(throws: TarError.self) { try parseTar(Array(archive.prefix(100))) }
        // A size field that is not a number.
        #expect(throws: TarError.self) { try parseTar(handHeader(name: "x", sizeField: Array("12345678z01\u{0}".utf8))) }
        // A base-256 size with more bits than Int64 holds, and one near Int64.max whose padding overflows.
        #expect(throws: TarError.self) { try parseTar(handHeader(name: "x", sizeField: [0x80] + [UInt8](repeating: 0xFF, count: 11))) }
        #expect(throws: TarError.self) { try parseTar(handHeader(name: "x", sizeField: [0x80, 0, 0, 0] + [0x7F] + [UInt8](repeating: 0xFF, count: 7))) }
        // A PAX header larger than the parser keeps.
        #expect(throws: TarError.self) { try parseTar(handHeader(name: "x", flag: "x", size: Int64(TarReader.metadataLimit) + 1)) }
        // The end-of-archive marker, then garbage: ignored, as tar does.
        let ended = try parseTar(archive + [UInt8](repeating: 0x41, count: 1000))
        #expect(ended.map(\.path) == ["a"])
    }

    @Test func hostileNamesStayInsideTheTree() throws {
        let entries = [
            TarEntry(path: "../escape", kind: .regular),
            TarEntry(path: "/absolute", kind: .regular),
            TarEntry(path: "a/../../b", kind: .regular),
            TarEntry(path: "file", kind: .regular),
            TarEntry(path: "file/below", kind: .regular),
            TarEntry(path: "link", kind: .hardLink, linkTarget: "missing"),
            TarEntry(path: "dirlink", kind: .hardLink, linkTarget: "implied"),
            TarEntry(path: "implied/deep/x", kind: .regular, modifiedSeconds: 77),
            TarEntry(path: "loop", kind: .symlink, linkTarget: "loop"),
            TarEntry(path: "./", kind: .directory, mode: 0o700, uid: 5),
            TarEntry(path: String(repeating: "n", count: 256), kind: .regular),
        ]
        let tree = TarTree(entries: entries)
        #expect(tree.problemCount == 7, "\(tree.problems)")
        #expect(Set(tree.root.children.keys) == ["file", "implied", "loop"])
        let implied = try #require(tree.node(at: "implied"))
        #expect(tree.nodes[implied].entry.mode == 0o755 && tree.nodes[implied].entry.modifiedSeconds == 77)
        #expect(tree.root.entry.mode == 0o700 && tree.root.entry.uid == 5 && tree.root.linkCount == 3)
        #expect(tree.nodes[try #require(tree.node(at: "loop"))].entry.linkTarget == "loop")
    }

    @Test func laterMembersReplaceEarlierOnes() throws {
        let tree = TarTree(entries: [
            TarEntry(path: "x", kind: .regular, size: 1),
            TarEntry(path: "y", kind: .hardLink, linkTarget: "x"),
            TarEntry(path: "x", kind: .regular, size: 2),
            TarEntry(path: "d", kind: .directory, mode: 0o700),
            TarEntry(path: "d/f", kind: .regular),
            TarEntry(path: "d", kind: .directory, mode: 0o750),
        ])
        let x = try #require(tree.node(at: "x")), y = try #require(tree.node(at: "y"))
        #expect(x != y && tree.nodes[x].entry.size == 2 && tree.nodes[y].entry.size == 1)
        #expect(tree.nodes[x].linkCount == 1 && tree.nodes[y].linkCount == 1)
        #expect(tree.nodes[try #require(tree.node(at: "d"))].entry.mode == 0o750 && tree.node(at: "d/f") != nil)
    }

    @Test func damagedEntryListsAreRefused() {
        let entries = [TarEntry(path: "a", kind: .regular, size: 5, dataOffset: 512), TarEntry(path: "b", kind: .symlink, linkTarget: "a")]
        let bytes = TarEntryList.serialized(entries)
        #expect(TarEntryList.parse(bytes) == entries)
        for index in stride(from: 0, to: bytes.count, by: 7) {
            var damaged = bytes
            damaged[index] ^= 0x01
            #expect(TarEntryList.parse(damaged) == nil, "byte \(index)")
        }
        #expect(TarEntryList.parse(Array(bytes.dropLast())) == nil)
    }
}
