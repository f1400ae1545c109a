import ArgumentParser

@main
struct OCICacheFS: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ocicachefs",
        abstract: "Mount a remote BuildKit cache (an OCI registry or S3) as a local OCI layout.",
        discussion: """
        BuildKit's type=local cache, docker buildx, skopeo, umoci and oras read the mount as if it \
        were a local directory; layer blobs are downloaded only when something reads them, \
        verified against their digest, and kept in a local content cache shared by every mount.

        Example:
          ocicachefs mount type=registry,ref=registry.example.com/app:cache /mnt/cache
          buildctl build ... --import-cache type=local,src=/mnt/cache,tag=cache
          ocicachefs unmount /mnt/cache
        """,
        version: OCICacheFS.version,
        subcommands: [MountCommand.self, UnmountCommand.self, PrefetchCommand.self, StatsCommand.self, RefreshCommand.self, CacheCommand.self]
    )

    static let version = "0.1.0"
}
