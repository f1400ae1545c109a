import OCI
import SystemSupport

/// `HOST[:PORT]/REPO[:TAG|@sha256:HEX]`, normalised as Docker does (`alpine` is
/// `docker.io/library/alpine`).
public struct RegistryReference: Sendable, Equatable, CustomStringConvertible {
    /// The host as written (`127.0.0.1:5000`, `docker.io`).
    public var host: String
    public var repository: String
    public var tag: String?
    public var digest: Digest?

    public init(parsing text: String) throws(RemoteStoreError) {
        var rest = Substring(text)
        if let at = rest.firstIndex(of: "@") {
            let digestText = String(rest[rest.index(after: at)...])
            guard let digest = Digest(digestText) else {
                throw .configuration("reference '\(text)': '\(digestText)' is not a sha256 digest")
            }
            self.digest = digest
            rest = rest[..<at]
        }
        let lastSlash = rest.lastIndex(of: "/")
        if let colon = rest.lastIndex(of: ":"), lastSlash.map({ colon > $0 }) ?? true {
            let tag = String(rest[rest.index(after: colon)...])
            guard Self.isValidTag(tag) else { throw .configuration("reference '\(text)': '\(tag)' is not a valid tag") }
            self.tag = tag
            rest = rest[..<colon]
        }
        let components = rest.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        if components.count > 1, let first = components.first,
           first.contains(".") || first.contains(":") || first == "localhost" || first.hasPrefix("[") {
            guard Self.isValidHost(first) else {
                throw .configuration("reference '\(text)': '\(first)' is not a valid registry host (HOST[:PORT])")
            }
            // Caught here, the mistake gets its own line; libcurl would only call the URL malformed.
            if let port = Self.portText(of: first), !(1...65535).contains(Int(port) ?? 0) {
                throw .configuration("reference '\(text)': port \(port) is outside 1-65535")
            }
            host = first
            repository = components.dropFirst().joined(separator: "/")
        } else {
            host = "docker.io"
            repository = components.joined(separator: "/")
        }
        // Docker Hub's official images live under library/.
        if Self.isDockerHub(host), !repository.contains("/"), !repository.isEmpty {
            repository = "library/" + repository
        }
        guard Self.isValidRepository(repository) else {
            throw .configuration("reference '\(text)': '\(repository)' is not a valid repository name (lowercase letters, digits, . _ - and /)")
        }
    }

    /// The host the Registry API is reached at.
    public var apiHost: String { Self.isDockerHub(host) ? "registry-1.docker.io" : host }

    /// Loopback registries are reached over plain HTTP, as BuildKit does: `localhost` and
    /// loopback addresses, never a DNS name that merely starts with "127.".
    public var isLoopback: Bool { isLoopbackHost(hostName) }

    private static func isDockerHub(_ host: String) -> Bool { host == "docker.io" || host == "index.docker.io" }

    /// The host without its port.
    public var hostName: String {
        if host.hasPrefix("["), let close = host.firstIndex(of: "]") { return String(host[...close]) }
        return String(host.split(separator: ":").first ?? Substring(host))
    }

    /// The tag shown in `index.json`: the reference's tag, else `latest` (BuildKit's default).
    public var layoutTag: String { tag ?? "latest" }

    /// What the registry is asked for: the digest when pinned, else the tag.
    public var manifestReference: String { digest?.description ?? tag ?? "latest" }

    public var description: String {
        var text = "\(host)/\(repository)"
        if let tag { text += ":\(tag)" }
        if let digest { text += "@\(digest)" }
        return text
    }

    /// A DNS name or IPv4 address with an optional port, or a bracketed IPv6 address with one.
    static func isValidHost(_ host: String) -> Bool {
        var name = Substring(host)
        if name.hasPrefix("[") {
            guard let close = name.firstIndex(of: "]") else { return false }
            let address = name[name.index(after: name.startIndex)..<close]
            guard !address.isEmpty, address.allSatisfy({ $0.isHexDigit || $0 == ":" }) else { return false }
            name = name[name.index(after: close)...]
            return name.isEmpty || isValidPort(name)
        }
        if let colon = name.firstIndex(of: ":") {
            guard isValidPort(name[colon...]) else { return false }
            name = name[..<colon]
        }
        return name.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            guard let first = label.first, let last = label.last, first != "-", last != "-" else { return false }
            return label.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
        }
    }

    /// The digits after the host's colon, if it has a port (the host is valid).
    private static func portText(of host: String) -> Substring? {
        let afterAddress = host.hasPrefix("[") ? host.drop(while: { $0 != "]" }).dropFirst() : Substring(host)
        guard let colon = afterAddress.firstIndex(of: ":") else { return nil }
        return afterAddress[afterAddress.index(after: colon)...]
    }

    /// `:` followed by 1 to 5 digits.
    private static func isValidPort(_ text: Substring) -> Bool {
        let digits = text.dropFirst()
        return text.first == ":" && (1...5).contains(digits.count) && digits.allSatisfy { $0.isASCII && $0.isNumber }
    }

    static func isValidTag(_ tag: String) -> Bool {
        guard let first = tag.utf8.first, tag.utf8.count <= 128, first != UInt8(ascii: "."), first != UInt8(ascii: "-") else {
            return false
        }
        return tag.utf8.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }
    }

    static func isValidRepository(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 255 else { return false }
        return name.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { component in
            // alphanumerics joined by ".", "_", "__" or runs of "-" (the distribution grammar)
            guard let first = component.utf8.first, let last = component.utf8.last,
                  isLowerAlphanumeric(first), isLowerAlphanumeric(last) else { return false }
            var separator: [UInt8] = []
            for c in component.utf8 {
                if isLowerAlphanumeric(c) {
                    let valid = separator.isEmpty || separator == [UInt8(ascii: ".")] || separator == [UInt8(ascii: "_")]
                        || separator == [UInt8(ascii: "_"), UInt8(ascii: "_")] || separator.allSatisfy { $0 == UInt8(ascii: "-") }
                    guard valid else { return false }
                    separator = []
                } else if c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "-") {
                    separator.append(c)
                } else {
                    return false
                }
            }
            return true
        }
    }

    private static func isLowerAlphanumeric(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9"))
    }

    private static func isAlphanumeric(_ c: UInt8) -> Bool {
        isLowerAlphanumeric(c) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
    }
}
