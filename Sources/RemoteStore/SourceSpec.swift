import FoundationEssentials
import SystemSupport

/// BuildKit's cache attribute syntax: comma-separated `key=value` pairs, as in
/// `type=registry,ref=HOST/REPO:TAG,registry.insecure=true`. Values may be double-quoted to
/// hold commas.
public struct SourceSpec: Sendable, Equatable {
    public var type: String
    public var attributes: [String: String]

    public init(parsing text: String) throws(RemoteStoreError) {
        var attributes: [String: String] = [:]
        for field in try Self.splitFields(text) {
            guard let equals = field.firstIndex(of: "=") else {
                throw .configuration("source field '\(field)' is not key=value (expected e.g. type=registry,ref=HOST/REPO:TAG)")
            }
            let key = field[..<equals].trimmingWhitespace().lowercased()
            let value = String(field[field.index(after: equals)...])
            guard !key.isEmpty else { throw .configuration("source field '\(field)' has an empty key") }
            guard attributes[key] == nil else { throw .configuration("source attribute '\(key)' is given twice") }
            attributes[key] = value
        }
        guard let type = attributes.removeValue(forKey: "type") else {
            throw .configuration("source has no type= (expected e.g. type=registry,ref=HOST/REPO:TAG)")
        }
        self.type = type
        self.attributes = attributes
    }

    /// Attributes that are credentials, which must never be on a command line: every user of
    /// the machine can read those (`ps`).
    public static let secretAttributes: Set<String> = ["secret_access_key", "session_token"]

    /// The source in the same syntax without its secret attributes (fields sorted by key).
    public var withoutSecrets: String {
        let kept = attributes.filter { !Self.secretAttributes.contains($0.key) }.sorted { $0.key < $1.key }
        return ([("type", type)] + kept).map { key, value in
            value.contains(",") ? "\(key)=\"\(value)\"" : "\(key)=\(value)"
        }.joined(separator: ",")
    }

    /// A boolean attribute as BuildKit parses them (strconv.ParseBool).
    public func flag(_ key: String) throws(RemoteStoreError) -> Bool {
        guard let value = attributes[key] else { return false }
        switch value.lowercased() {
        case "1", "t", "true": return true
        case "0", "f", "false": return false
        default: throw .configuration("source attribute \(key)=\(value) is not a boolean")
        }
    }

    private static func splitFields(_ text: String) throws(RemoteStoreError) -> [String] {
        var fields: [String] = []
        var current = ""
        var quoted = false
        for character in text {
            switch character {
            case "\"": quoted.toggle()
            case "," where !quoted:
                fields.append(current)
                current = ""
            default: current.append(character)
            }
        }
        guard !quoted else { throw .configuration("source has an unterminated quote") }
        fields.append(current)
        return fields.filter { !$0.trimmingWhitespace().isEmpty }
    }
}
