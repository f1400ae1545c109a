import FoundationEssentials

/// Where BuildKit's `type=s3` cache lives, from its attributes, with BuildKit's names and
/// defaults: blobs at `<prefix><blobs_prefix>sha256:<hex>`, cache configs at
/// `<prefix><manifests_prefix><name>`.
public struct S3Location: Sendable, Equatable {
    public var bucket: String
    public var region: String
    /// `scheme://host[:port]` without a trailing slash.
    public var endpoint: String
    public var pathStyle: Bool
    public var prefix: String
    public var blobsPrefix: String
    public var manifestsPrefix: String
    /// Each becomes a tag of `index.json` (BuildKit's importer reads only the first).
    public var names: [String]

    static let knownAttributes: Set<String> = [
        "bucket", "region", "name", "prefix", "blobs_prefix", "manifests_prefix", "endpoint_url", "use_path_style",
        "access_key_id", "secret_access_key", "session_token",
        // Export-side and SDK tuning attributes BuildKit accepts; harmless to a reader.
        "upload_parallelism", "touch_refresh", "retry_mode", "retry_max_attempts", "ignore-error", "mode",
    ]

    public init(spec: SourceSpec, environment: [String: String]) throws(RemoteStoreError) {
        let attributes = spec.attributes
        if let unknown = Set(attributes.keys).subtracting(Self.knownAttributes).sorted().first {
            throw .configuration("type=s3 does not know the attribute '\(unknown)'")
        }
        guard let bucket = attributes["bucket"] ?? environment["AWS_BUCKET"], !bucket.isEmpty else {
            throw .configuration("type=s3 needs bucket= (or AWS_BUCKET)")
        }
        guard let region = attributes["region"] ?? environment["AWS_REGION"], !region.isEmpty else {
            throw .configuration("type=s3 needs region= (or AWS_REGION)")
        }
        self.bucket = bucket
        self.region = region
        self.pathStyle = try spec.flag("use_path_style")
        if let endpoint = attributes["endpoint_url"] {
            guard let url = URL(string: endpoint), let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https",
                  url.host != nil else {
                throw .configuration("endpoint_url=\(endpoint) is not an http:// or https:// URL")
            }
            if let port = url.port, !(1...65535).contains(port) {
                throw .configuration("endpoint_url=\(endpoint): port \(port) is outside 1-65535")
            }
            // Every trailing slash: the request paths append their own.
            var trimmed = Substring(endpoint)
            while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
            self.endpoint = String(trimmed)
        } else {
            self.endpoint = "https://s3.\(region).amazonaws.com"
        }
        self.prefix = attributes["prefix"] ?? ""
        self.blobsPrefix = attributes["blobs_prefix"] ?? "blobs/"
        self.manifestsPrefix = attributes["manifests_prefix"] ?? "manifests/"
        let names = (attributes["name"] ?? "buildkit").split(separator: ";").map(String.init).filter { !$0.isEmpty }
        guard !names.isEmpty else { throw .configuration("type=s3: name= lists no name") }
        self.names = names
    }

    /// For logs and error messages. Names the endpoint too: the same bucket name at two
    /// endpoints is two caches.
    public var displayName: String {
        "s3://\(bucket)/\(prefix)\(manifestsPrefix){\(names.joined(separator: ";"))} at \(endpoint)"
    }

    public func blobKey(_ digestDescription: String) -> String { prefix + blobsPrefix + digestDescription }
    public func manifestKey(_ name: String) -> String { prefix + manifestsPrefix + name }
}
