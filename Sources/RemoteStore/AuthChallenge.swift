// Parsing of `WWW-Authenticate` header values (RFC 7235 §4.1), as container
// registries send them:
//
//     WWW-Authenticate = 1#challenge
//     challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
//     auth-param       = token BWS "=" BWS ( token / quoted-string )
//
// The parser is lenient: it never traps, skips what it cannot understand and
// keeps whatever challenges it could read.

/// One authentication challenge from a `WWW-Authenticate` header.
public struct AuthChallenge: Sendable, Equatable, CustomStringConvertible {
    /// The auth scheme, lowercased (`"bearer"`, `"basic"`, ...).
    public var scheme: String
    /// The auth parameters; keys lowercased, values as sent (quotes removed,
    /// `\"` escapes resolved). When a parameter is repeated the first wins.
    public var parameters: [String: String]
    /// A `token68` credential blob (e.g. `Negotiate abc==`), when the challenge
    /// carries one instead of parameters. Registries do not send these.
    public var token68: String?

    public init(scheme: String, parameters: [String: String] = [:], token68: String? = nil) {
        self.scheme = scheme
        self.parameters = parameters
        self.token68 = token68
    }

    /// `parameters["realm"]`.
    public var realm: String? { parameters["realm"] }
    /// `parameters["service"]`.
    public var service: String? { parameters["service"] }
    /// `parameters["scope"]`.
    public var scope: String? { parameters["scope"] }
    /// `parameters["error"]`, e.g. `insufficient_scope`.
    public var error: String? { parameters["error"] }

    public var description: String {
        var parts: [String] = []
        if let token68 { parts.append(token68) }
        for key in parameters.keys.sorted() {
            parts.append("\(key)=\"\(parameters[key]!)\"")
        }
        return parts.isEmpty ? scheme : "\(scheme) \(parts.joined(separator: ","))"
    }

    /// Parses a `WWW-Authenticate` header value into its challenges, in order.
    /// Empty or unparseable input gives `[]`; partially valid input gives the
    /// challenges that could be read.
    public static func parse(_ headerValue: String) -> [AuthChallenge] {
        var parser = ChallengeParser(Array(headerValue.utf8))
        return parser.parseAll()
    }

    /// Parses several header values (a response may repeat the header).
    public static func parse<S: Sequence>(headerValues: S) -> [AuthChallenge] where S.Element == String {
        headerValues.flatMap { parse($0) }
    }
}

// MARK: - Parser

private struct ChallengeParser {
    private let bytes: [UInt8]
    private var index = 0

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
    }

    private static let space: UInt8 = 0x20
    private static let tab: UInt8 = 0x09
    private static let comma: UInt8 = 0x2C
    private static let equals: UInt8 = 0x3D
    private static let quote: UInt8 = 0x22
    private static let backslash: UInt8 = 0x5C

    private var atEnd: Bool { index >= bytes.count }
    private var current: UInt8? { index < bytes.count ? bytes[index] : nil }

    /// RFC 7230 `tchar`.
    private static func isTokenChar(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"),
             UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"),
             UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "*"), UInt8(ascii: "+"),
             UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    /// RFC 7235 `token68` characters (without the trailing `=` padding).
    private static func isToken68Char(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"),
             UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
             UInt8(ascii: "~"), UInt8(ascii: "+"), UInt8(ascii: "/"):
            return true
        default:
            return false
        }
    }

    private static func isWhitespace(_ c: UInt8) -> Bool {
        c == space || c == tab || c == 0x0D || c == 0x0A
    }

    private static func lowercased(_ bytes: ArraySlice<UInt8>) -> String {
        String(decoding: bytes, as: UTF8.self).lowercased()
    }

    private mutating func skipWhitespace() {
        while let c = current, Self.isWhitespace(c) { index += 1 }
    }

    private mutating func skipWhitespaceAndCommas() {
        while let c = current, Self.isWhitespace(c) || c == Self.comma { index += 1 }
    }

    /// Skips to the next top-level comma (or the end), stepping over quoted
    /// strings; used to recover from garbage.
    private mutating func skipToNextComma() {
        while let c = current, c != Self.comma {
            if c == Self.quote {
                _ = readQuotedString()
            } else {
                index += 1
            }
        }
    }

    private mutating func readToken() -> ArraySlice<UInt8>? {
        let start = index
        while let c = current, Self.isTokenChar(c) { index += 1 }
        return index > start ? bytes[start..<index] : nil
    }

    /// Reads a quoted string starting at the opening quote; resolves
    /// quoted-pairs. An unterminated string runs to the end of the input.
    private mutating func readQuotedString() -> String {
        precondition(current == Self.quote)
        index += 1
        var out: [UInt8] = []
        while let c = current {
            index += 1
            if c == Self.quote {
                break
            } else if c == Self.backslash, let next = current {
                out.append(next)
                index += 1
            } else {
                out.append(c)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads an unquoted parameter value. Lenient: accepts anything up to the
    /// next comma or whitespace (registries sometimes send unquoted URLs).
    private mutating func readBareValue() -> String {
        let start = index
        while let c = current, c != Self.comma, !Self.isWhitespace(c) { index += 1 }
        return String(decoding: bytes[start..<index], as: UTF8.self)
    }

    /// If a token68 (with its `=` padding) starts here and is followed only by
    /// optional whitespace and then a comma or the end, consumes and returns it.
    private mutating func readToken68IfPresent() -> String? {
        let start = index
        var i = index
        while i < bytes.count, Self.isToken68Char(bytes[i]) { i += 1 }
        guard i > start else { return nil }
        while i < bytes.count, bytes[i] == Self.equals { i += 1 }
        var j = i
        while j < bytes.count, Self.isWhitespace(bytes[j]) { j += 1 }
        guard j == bytes.count || bytes[j] == Self.comma else { return nil }
        index = i
        return String(decoding: bytes[start..<i], as: UTF8.self)
    }

    mutating func parseAll() -> [AuthChallenge] {
        var challenges: [AuthChallenge] = []
        var currentChallenge: AuthChallenge?

        func finish() {
            if let c = currentChallenge { challenges.append(c) }
            currentChallenge = nil
        }

        while true {
            skipWhitespaceAndCommas()
            if atEnd { break }

            // A token here is either a new scheme or a parameter name.
            let itemStart = index
            guard let token = readToken() else {
                // Garbage (e.g. a stray quote or '='): drop it up to the next comma.
                skipToNextComma()
                if index == itemStart { index += 1 }  // guarantee progress
                continue
            }
            let afterToken = index
            skipWhitespace()

            if currentChallenge != nil, current == Self.equals {
                // auth-param for the current challenge.
                index += 1
                skipWhitespace()
                let value: String
                if current == Self.quote {
                    value = readQuotedString()
                } else {
                    value = readBareValue()
                }
                let key = Self.lowercased(token)
                if currentChallenge!.parameters[key] == nil {
                    currentChallenge!.parameters[key] = value
                }
                // Something glued to the value (`"x"junk`) is junk; after
                // whitespace it may be a new challenge with a missing comma,
                // which the loop handles.
                if let c = current, c != Self.comma, !Self.isWhitespace(c) {
                    skipToNextComma()
                }
                continue
            }

            if currentChallenge == nil, current == Self.equals {
                // A parameter with no scheme before it: not a valid challenge.
                index = afterToken
                skipToNextComma()
                continue
            }

            // A new challenge: `token` is its scheme.
            finish()
            currentChallenge = AuthChallenge(scheme: Self.lowercased(token))
            index = afterToken
            // Require whitespace between the scheme and what follows it on
            // the same list element; otherwise the challenge has no params.
            guard let c = current, Self.isWhitespace(c) else {
                if let c = current, c != Self.comma {
                    // e.g. `Bearer"x"`: junk glued to the scheme.
                    skipToNextComma()
                }
                continue
            }
            skipWhitespace()
            // `Scheme blob` / `Scheme blob==` (token68). Per the grammar this
            // also covers `Scheme name=` with no value.
            if let blob = readToken68IfPresent() {
                currentChallenge!.token68 = blob
            }
        }
        finish()
        return challenges
    }
}
