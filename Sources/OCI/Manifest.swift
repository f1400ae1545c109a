import FoundationEssentials
import SystemSupport

public struct ManifestError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The parts of a manifest the mount needs. The manifest's own bytes are always served as the
/// registry sent them; this is only the structure read out of them.
public enum ManifestContent: Sendable, Equatable {
    /// An OCI image index or Docker manifest list. BuildKit's "index variant" cache lists its
    /// layers and one cache-config blob here instead of child manifests.
    case index(mediaType: String, manifests: [Descriptor])
    /// An OCI image manifest or Docker schema 2 manifest (BuildKit's image-manifest variant has
    /// a cache-config `config`).
    case image(mediaType: String, config: Descriptor, layers: [Descriptor])

    public var mediaType: String {
        switch self {
        case .index(let type, _), .image(let type, _, _): return type
        }
    }

    /// The cache-config descriptor of BuildKit's index variant, if this is one.
    public var buildkitCacheConfig: Descriptor? {
        guard case .index(_, let manifests) = self else { return nil }
        return manifests.first { $0.mediaType == MediaType.buildkitCacheConfig }
    }

    struct Document: Decodable, Equatable {
        var schemaVersion: Int?
        var mediaType: String?
        var manifests: [Descriptor]?
        var config: Descriptor?
        var layers: [Descriptor]?
    }

    /// Parses manifest bytes. The media type comes from the document, else from the HTTP
    /// Content-Type, else from its shape.
    public static func parse(_ bytes: [UInt8], contentType: String? = nil) throws(ManifestError) -> ManifestContent {
        try parse(bytes, contentType: contentType, fast: true)
    }

    /// `parse` without its fast reader: what the fuzz target compares it with.
    package static func parseWithFoundation(_ bytes: [UInt8], contentType: String? = nil) throws(ManifestError) -> ManifestContent {
        try parse(bytes, contentType: contentType, fast: false)
    }

    private static func parse(_ bytes: [UInt8], contentType: String?, fast: Bool) throws(ManifestError) -> ManifestContent {
        let document: Document
        do {
            document = try (fast ? FastManifestReader.document(bytes) : nil) ?? JSONDecoder().decode(Document.self, from: Data(bytes))
        } catch let error as DecodingError {
            // The path and the decoder's words quote the document, which the registry wrote.
            throw ManifestError("malformed manifest JSON: \(Self.summary(of: error).escapingControlCharacters)")
        } catch {
            throw ManifestError("malformed manifest JSON")
        }
        guard document.schemaVersion == 2 else {
            throw ManifestError("unsupported manifest schemaVersion \(document.schemaVersion.map(String.init) ?? "(missing)")")
        }
        let declared = document.mediaType ?? contentType.map(Self.bareMediaType)
        let type = declared ?? (document.manifests != nil ? MediaType.ociIndex : MediaType.ociManifest)
        if MediaType.indexTypes.contains(type) {
            guard let manifests = document.manifests else {
                throw ManifestError("index \(type.escapingControlCharacters) has no manifests list")
            }
            return .index(mediaType: type, manifests: manifests)
        }
        if MediaType.manifestTypes.contains(type) {
            guard let config = document.config else { throw ManifestError("image manifest has no config") }
            return .image(mediaType: type, config: config, layers: document.layers ?? [])
        }
        throw ManifestError("unsupported manifest media type \(type.escapingControlCharacters)")
    }

    /// `application/json; charset=utf-8` → `application/json`.
    static func bareMediaType(_ contentType: String) -> String {
        (contentType.split(separator: ";").first ?? "").trimmingWhitespace()
    }

    /// `layers.0.size`: array positions as numbers (their keys would say "Index 0").
    private static func pathText(_ path: [any CodingKey]) -> String {
        path.map { key in key.intValue.map(String.init) ?? key.stringValue }.joined(separator: ".")
    }

    private static func summary(of error: DecodingError) -> String {
        switch error {
        case .dataCorrupted(let context), .typeMismatch(_, let context), .valueNotFound(_, let context):
            let path = pathText(context.codingPath)
            return path.isEmpty ? context.debugDescription : "\(path): \(context.debugDescription)"
        case .keyNotFound(let key, let context):
            let path = pathText(context.codingPath + [key])
            return "missing \(path)"
        @unknown default:
            return "undecodable"
        }
    }
}

/// Renders the two small files of an OCI image layout, deterministically.
public enum OCILayout {
    public static let ociLayoutFile: [UInt8] = Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8)

    public struct TaggedManifest: Sendable, Equatable, Codable {
        public var tag: String
        public var manifest: Descriptor
        public init(tag: String, manifest: Descriptor) {
            self.tag = tag
            self.manifest = manifest
        }
    }

    private struct Index: Encodable {
        var schemaVersion = 2
        var mediaType = MediaType.ociIndex
        var manifests: [Descriptor]
    }

    /// `index.json` with one entry per tag, annotated with the tag as BuildKit reads it.
    public static func indexFile(_ entries: [TaggedManifest]) -> [UInt8] {
        let manifests = entries.map { entry in
            Descriptor(mediaType: entry.manifest.mediaType, digest: entry.manifest.digest, size: entry.manifest.size,
                       annotations: [Annotation.refName: entry.tag])
        }
        return canonicalJSON(Index(manifests: manifests))
    }

    /// Sorted keys, no escaped slashes: the same value always yields the same bytes and digest.
    public static func canonicalJSON<T: Encodable>(_ value: T) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding plain value types with string keys cannot fail.
        return Array((try? encoder.encode(value)) ?? Data())
    }
}
