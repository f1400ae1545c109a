/// Reads the one JSON shape manifests have several times faster than `JSONDecoder` (which
/// spent a quarter of a 100,000-blob mount's CPU in `Descriptor.init(from:)`). It answers only
/// documents it understands completely — ASCII text, no `null`, no repeated member, integers
/// without fraction or exponent, nesting at most 32 deep — and gives up (nil) on anything
/// else, which `JSONDecoder` then reads or refuses. Wherever it answers, the two agree: the
/// `manifest` fuzz target parses every input both ways and compares.
enum FastManifestReader {
    static func document(_ bytes: [UInt8]) -> ManifestContent.Document? {
        bytes.withUnsafeBufferPointer { buffer in
            var reader = JSONReader(buffer)
            guard let document = reader.readDocument(), reader.atEnd() else { return nil }
            return document
        }
    }
}

private struct JSONReader {
    private let buffer: UnsafeBufferPointer<UInt8>
    private var position = 0

    init(_ buffer: UnsafeBufferPointer<UInt8>) { self.buffer = buffer }

    mutating func readDocument() -> ManifestContent.Document? {
        var document = ManifestContent.Document()
        let read = readObject { reader, key in
            switch key {
            case "schemaVersion":
                guard let version = reader.readInteger(), let value = Int(exactly: version) else { return false }
                document.schemaVersion = value
            case "mediaType":
                guard let type = reader.readString() else { return false }
                document.mediaType = type
            case "config":
                guard let config = reader.readDescriptor() else { return false }
                document.config = config
            case "manifests":
                guard let list = reader.readDescriptors() else { return false }
                document.manifests = list
            case "layers":
                guard let list = reader.readDescriptors() else { return false }
                document.layers = list
            default:
                return reader.skipValue(depth: 1)
            }
            return true
        }
        return read ? document : nil
    }

    mutating func atEnd() -> Bool {
        skipWhitespace()
        return position == buffer.count
    }

    // MARK: Descriptors

    private mutating func readDescriptors() -> [Descriptor]? {
        var list: [Descriptor] = []
        let read = readArray { reader in
            guard let descriptor = reader.readDescriptor() else { return false }
            list.append(descriptor)
            return true
        }
        return read ? list : nil
    }

    private mutating func readDescriptor() -> Descriptor? {
        var mediaType = ""
        var digest: Digest?
        var size: Int64?
        var annotations: [String: String]?
        let read = readObject { reader, key in
            switch key {
            case "mediaType":
                guard let type = reader.readString() else { return false }
                mediaType = type
            case "digest":
                guard let text = reader.readString(), let parsed = Digest(text) else { return false }
                digest = parsed
            case "size":
                guard let value = reader.readInteger() else { return false }
                size = value
            case "annotations":
                var pairs: [String: String] = [:]
                let read = reader.readObject { reader, name in
                    guard let value = reader.readString() else { return false }
                    pairs[name] = value
                    return true
                }
                guard read else { return false }
                annotations = pairs
            default:
                return reader.skipValue(depth: 2)
            }
            return true
        }
        guard read, let digest, let size, Descriptor.sizeProblem(size, of: digest) == nil else { return nil }
        return Descriptor(mediaType: mediaType, digest: digest, size: size, annotations: annotations)
    }

    // MARK: Structure

    /// Calls `member` with each key, the reader at its value; false ends the read (also on a
    /// key seen before in this object).
    private mutating func readObject(_ member: (inout JSONReader, String) -> Bool) -> Bool {
        guard consume(UInt8(ascii: "{")) else { return false }
        if consume(UInt8(ascii: "}")) { return true }
        var keys: [String] = []
        repeat {
            guard let key = readString(), !keys.contains(key), consume(UInt8(ascii: ":")) else { return false }
            keys.append(key)
            guard member(&self, key) else { return false }
        } while consume(UInt8(ascii: ","))
        return consume(UInt8(ascii: "}"))
    }

    private mutating func readArray(_ element: (inout JSONReader) -> Bool) -> Bool {
        guard consume(UInt8(ascii: "[")) else { return false }
        if consume(UInt8(ascii: "]")) { return true }
        repeat {
            guard element(&self) else { return false }
        } while consume(UInt8(ascii: ","))
        return consume(UInt8(ascii: "]"))
    }

    /// Steps over a value of a member this reader does not keep, checking its grammar.
    private mutating func skipValue(depth: Int) -> Bool {
        guard depth <= 32, let next = peek() else { return false }
        switch next {
        case UInt8(ascii: "\""):
            return readString() != nil
        case UInt8(ascii: "{"):
            return readObject { reader, _ in reader.skipValue(depth: depth + 1) }
        case UInt8(ascii: "["):
            return readArray { reader in reader.skipValue(depth: depth + 1) }
        case UInt8(ascii: "t"):
            return consumeWord("true")
        case UInt8(ascii: "f"):
            return consumeWord("false")
        default:
            return skipNumber()
        }
    }

    // MARK: Scalars

    /// A string of printable ASCII with JSON's escapes, none of them a surrogate.
    private mutating func readString() -> String? {
        guard consume(UInt8(ascii: "\"")) else { return nil }
        let start = position
        while position < buffer.count {
            let byte = buffer[position]
            if byte == UInt8(ascii: "\"") {
                let text = String(decoding: UnsafeBufferPointer(rebasing: buffer[start..<position]), as: UTF8.self)
                position += 1
                return text
            }
            guard byte >= 0x20 && byte < 0x7F else { return nil }
            if byte == UInt8(ascii: "\\") {
                position = start
                return readEscapedString()
            }
            position += 1
        }
        return nil
    }

    private mutating func readEscapedString() -> String? {
        var scalars = String.UnicodeScalarView()
        while position < buffer.count {
            let byte = buffer[position]
            position += 1
            switch byte {
            case UInt8(ascii: "\""):
                return String(scalars)
            case UInt8(ascii: "\\"):
                guard position < buffer.count else { return nil }
                let escape = buffer[position]
                position += 1
                switch escape {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): scalars.append(Unicode.Scalar(escape))
                case UInt8(ascii: "b"): scalars.append("\u{8}")
                case UInt8(ascii: "f"): scalars.append("\u{C}")
                case UInt8(ascii: "n"): scalars.append("\n")
                case UInt8(ascii: "r"): scalars.append("\r")
                case UInt8(ascii: "t"): scalars.append("\t")
                case UInt8(ascii: "u"):
                    guard let code = readHex4(), let scalar = Unicode.Scalar(code) else { return nil }
                    scalars.append(scalar)
                default:
                    return nil
                }
            case 0x20..<0x7F:
                scalars.append(Unicode.Scalar(byte))
            default:
                return nil
            }
        }
        return nil
    }

    private mutating func readHex4() -> UInt32? {
        guard position + 4 <= buffer.count else { return nil }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = buffer[position]
            position += 1
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            value = value << 4 | UInt32(digit)
        }
        return value
    }

    /// An integer as JSON writes one: no leading zero, no fraction, no exponent, no `-0`.
    private mutating func readInteger() -> Int64? {
        skipWhitespace()
        let negative = position < buffer.count && buffer[position] == UInt8(ascii: "-")
        if negative { position += 1 }
        let start = position
        var value: Int64 = 0
        while position < buffer.count, buffer[position] >= UInt8(ascii: "0"), buffer[position] <= UInt8(ascii: "9") {
            let digit = Int64(buffer[position] - UInt8(ascii: "0"))
            let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
            let (next, overflow2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
            guard !overflow1, !overflow2 else { return nil }
            value = next
            position += 1
        }
        let digits = position - start
        guard digits > 0, !(digits > 1 && buffer[start] == UInt8(ascii: "0")), !(negative && value == 0) else { return nil }
        if position < buffer.count {
            switch buffer[position] {
            case UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E"): return nil
            default: break
            }
        }
        return value
    }

    /// Any JSON number, checked against the grammar.
    private mutating func skipNumber() -> Bool {
        if position < buffer.count, buffer[position] == UInt8(ascii: "-") { position += 1 }
        guard skipDigits(allowingLeadingZero: false) else { return false }
        if position < buffer.count, buffer[position] == UInt8(ascii: ".") {
            position += 1
            guard skipDigits(allowingLeadingZero: true) else { return false }
        }
        if position < buffer.count, buffer[position] == UInt8(ascii: "e") || buffer[position] == UInt8(ascii: "E") {
            position += 1
            if position < buffer.count, buffer[position] == UInt8(ascii: "+") || buffer[position] == UInt8(ascii: "-") { position += 1 }
            guard skipDigits(allowingLeadingZero: true) else { return false }
        }
        return true
    }

    private mutating func skipDigits(allowingLeadingZero: Bool) -> Bool {
        let start = position
        while position < buffer.count, buffer[position] >= UInt8(ascii: "0"), buffer[position] <= UInt8(ascii: "9") { position += 1 }
        let digits = position - start
        return digits > 0 && (allowingLeadingZero || digits == 1 || buffer[start] != UInt8(ascii: "0"))
    }

    private mutating func consumeWord(_ word: StaticString) -> Bool {
        let count = word.utf8CodeUnitCount
        guard position + count <= buffer.count else { return false }
        for index in 0..<count where buffer[position + index] != word.utf8Start[index] { return false }
        position += count
        return true
    }

    private mutating func skipWhitespace() {
        while position < buffer.count {
            switch buffer[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private mutating func peek() -> UInt8? {
        skipWhitespace()
        return position < buffer.count ? buffer[position] : nil
    }

    private mutating func consume(_ byte: UInt8) -> Bool {
        guard peek() == byte else { return false }
        position += 1
        return true
    }
}
