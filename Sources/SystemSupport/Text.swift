import FoundationEssentials

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

extension StringProtocol {
    /// The text without leading and trailing whitespace, line breaks included.
    public func trimmingWhitespace() -> String {
        guard let first = firstIndex(where: { !$0.isWhitespace }),
              let last = lastIndex(where: { !$0.isWhitespace }) else { return "" }
        return String(self[first...last])
    }
}

extension StringProtocol {
    /// The text with every control character (C0 such as ESC, BEL, CR and LF; DEL; C1) written
    /// as `\x1b`. Registries, S3 and token servers choose the text of media types, error
    /// messages and headers: printed raw, it could retitle or rewrite the terminal, or forge
    /// lines in a log.
    public var escapingControlCharacters: String {
        guard unicodeScalars.contains(where: \.isControlCharacter) else { return String(self) }
        var escaped = ""
        for scalar in unicodeScalars {
            if scalar.isControlCharacter {
                // Control characters are all below 0xA0: one byte.
                escaped += "\\x" + [UInt8(truncatingIfNeeded: scalar.value)].lowercaseHex
            } else {
                escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped
    }
}

extension Unicode.Scalar {
    /// Unicode's general category Cc, which every terminal control sequence starts with.
    fileprivate var isControlCharacter: Bool { value < 0x20 || (0x7F...0x9F).contains(value) }
}

/// `component` below `directory`, with exactly one slash between them.
public func joinedPath(_ directory: String, _ component: String) -> String {
    if directory.isEmpty { return component }
    return directory.hasSuffix("/") ? directory + component : directory + "/" + component
}

/// The directory that holds `path`: `/a/b` and `/a/b/` give `/a`, `/a` gives `/`, `b` gives ``.
public func parentPath(_ path: String) -> String {
    var path = Substring(path)
    while path.count > 1 && path.hasSuffix("/") { path.removeLast() }
    guard let slash = path.lastIndex(of: "/") else { return "" }
    return slash == path.startIndex ? "/" : String(path[..<slash])
}

extension Double {
    /// `12.3`: one decimal, rounded half away from zero, without a locale.
    public var withOneDecimal: String {
        let tenths = (self * 10).rounded()
        guard tenths.isFinite, abs(tenths) < 1e17 else { return "\(self)" }
        let whole = Int64(tenths)
        let sign = whole < 0 ? "-" : ""
        return "\(sign)\(abs(whole) / 10).\(abs(whole) % 10)"
    }
}

/// One line for a failed file operation: the system's words for its errno ("Permission
/// denied") when it has one, rather than an error's debug form.
public func describeFileError(_ error: any Error) -> String {
    if let posix = (error as? CocoaError)?.underlying as? POSIXError ?? error as? POSIXError {
        return String(cString: strerror(posix.code.rawValue))
    }
    if let cocoa = error as? CocoaError {
        switch cocoa.code {
        case .fileReadNoPermission, .fileWriteNoPermission: return "permission denied"
        case .fileNoSuchFile, .fileReadNoSuchFile: return "no such file"
        case .fileWriteOutOfSpace: return "no space left on device"
        default: return "file error \(cocoa.code.rawValue)"
        }
    }
    return "\(error)"
}

extension Sequence where Element == UInt8 {
    /// The bytes in lowercase hexadecimal, two digits each: digests and signatures as OCI and
    /// AWS write them.
    public var lowercaseHex: String {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        text.reserveCapacity(underestimatedCount * 2)
        for byte in self { text += [digits[Int(byte >> 4)], digits[Int(byte & 0xF)]] }
        return String(decoding: text, as: UTF8.self)
    }
}
