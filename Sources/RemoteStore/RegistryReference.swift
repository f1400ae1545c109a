import OCI

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
           first.contains(".") || first.contains(":") || first == "localhost" {
            host = first
            repository = components.dropFirst().joined(separator: "/")
        } else {
            host = "docker.io"
            repository = components.count == 1 ? "library/" + components[0] : components.joined(separator: "/")
        }
        guard Self.isValidRepository(repository) else {
            throw .configuration("reference '\(text)': '\(repository)' is not a valid repository name (lowercase letters, digits, . _ - and /)")
        }
    }

    /// The host the Registry API is reached at.
    public var apiHost: String { host == "docker.io" || host == "index.docker.io" ? "registry-1.docker.io" : host }

    /// Loopback registries are reached over plain HTTP, as BuildKit does.
    public var isLoopback: Bool {
        let name = hostName.lowercased()
        return name == "localhost" || name.hasPrefix("127.") || name == "::1" || name == "[::1]"
    }

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

    static func isValidTag(_ tag: String) -> Bool {
        guard let first = tag.utf8.first, tag.utf8.count <= 128, first != UInt8(ascii: "."), first != UInt8(ascii: "-") else {
            return false
        }
        return tag.utf8.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }
    }

    static func isValidRepository(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 255 else { return false }
        return name.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { component in
            guard let first = component.utf8.first, let last = component.utf8.last,
                  isLowerAlphanumeric(first), isLowerAlphanumeric(last) else { return false }
            return component.utf8.allSatisfy {
                isLowerAlphanumeric($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-")
            }
        }
    }

    private static func isLowerAlphanumeric(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9"))
    }

    private static func isAlphanumeric(_ c: UInt8) -> Bool {
        isLowerAlphanumeric(c) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
    }
}
