// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "ocicachefs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ocicachefs", targets: ["ocicachefs"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // C system libraries, each imported by exactly one Swift target.
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl", providers: [.apt(["libcurl4-openssl-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        // glibc's mallopt, for the daemon's memory footprint.
        .systemLibrary(name: "CMalloc"),

        // Pure values: digests, descriptors, manifests, cache configs, deterministic JSON.
        .target(name: "OCI", dependencies: [.product(name: "Crypto", package: "swift-crypto")]),
        // HTTP behind one protocol; libcurl is the real transport.
        .target(name: "HTTPClient", dependencies: ["CCurl"]),
        // Remote caches (registry; S3 later) behind one protocol: sources, auth, credentials.
        .target(name: "RemoteStore", dependencies: [
            "OCI", "HTTPClient",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // On-disk content-addressed cache and single-flight block fetches (zlib for block CRCs).
        .target(name: "ContentCache", dependencies: [
            "OCI", "RemoteStore", "CZlib",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The filesystem core: knows nothing of libfuse.
        .target(name: "CacheFS", dependencies: [
            "OCI", "RemoteStore", "ContentCache",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Thin libfuse low-level binding over CacheFS.
        .target(name: "FuseBinding", dependencies: [
            "CFuse3", "CacheFS",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "ocicachefs", dependencies: [
            "CMalloc", "OCI", "HTTPClient", "RemoteStore", "ContentCache", "CacheFS", "FuseBinding",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        .testTarget(name: "OCITests", dependencies: ["OCI"]),
        .testTarget(name: "HTTPClientTests", dependencies: ["HTTPClient"]),
        .testTarget(name: "RemoteStoreTests", dependencies: ["RemoteStore", "HTTPClient", "OCI"]),
        .testTarget(name: "CacheFSTests", dependencies: ["CacheFS", "ContentCache", "RemoteStore", "OCI"]),
        .testTarget(name: "IntegrationTests", dependencies: ["OCI", "RemoteStore", "HTTPClient"]),
    ]
)
