/// Media types the mount understands; OCI and Docker spellings of the same thing.
public enum MediaType {
    public static let ociIndex = "application/vnd.oci.image.index.v1+json"
    public static let ociManifest = "application/vnd.oci.image.manifest.v1+json"
    public static let ociConfig = "application/vnd.oci.image.config.v1+json"
    public static let dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
    public static let dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
    public static let dockerConfig = "application/vnd.docker.container.image.v1+json"
    public static let buildkitCacheConfig = "application/vnd.buildkit.cacheconfig.v0"

    public static let indexTypes: Set<String> = [ociIndex, dockerManifestList]
    public static let manifestTypes: Set<String> = [ociManifest, dockerManifest]

    /// What a registry is asked for when resolving a tag: every manifest kind we can present.
    public static let acceptedManifests = [ociIndex, ociManifest, dockerManifestList, dockerManifest]
}

public enum Annotation {
    public static let refName = "org.opencontainers.image.ref.name"
    public static let uncompressed = "containerd.io/uncompressed"
    public static let buildkitCreatedAt = "buildkit/createdat"
}
