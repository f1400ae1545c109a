// swift-tools-version:6.0
import PackageDescription

// Extension members only from modules a file imports itself: corelibs Foundation, loaded
// through swift-crypto, would otherwise lend `String.contains` and the like unnoticed, and
// with them its ICU data (see SystemSupport).
let sourceSettings: [SwiftSetting] = [.enableUpcomingFeature("MemberImportVisibility")]

let package = Package(
    name: "ocicachefs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ocicachefs", targets: ["ocicachefs"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
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

        // glibc's GNU extensions and Linux constants, compiled with _GNU_SOURCE.
        .target(name: "CSystem"),
        .target(name: "CChecksum"),
        // Threads, child processes and text helpers that would otherwise come from corelibs
        // Foundation, which links 34 MB of ICU data that every cold start reads.
        .target(name: "SystemSupport", dependencies: ["CSystem"], swiftSettings: sourceSettings),

        // Pure values: digests, descriptors, manifests, cache configs, deterministic JSON.
        .target(name: "OCI", dependencies: ["SystemSupport", .product(name: "Crypto", package: "swift-crypto")],
                swiftSettings: sourceSettings),
        // HTTP behind one protocol; libcurl is the real transport.
        .target(name: "HTTPClient", dependencies: ["CCurl"], swiftSettings: sourceSettings),
        // Remote caches (registry; S3 later) behind one protocol: sources, auth, credentials.
        .target(name: "RemoteStore", dependencies: [
            "OCI", "HTTPClient", "SystemSupport",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: sourceSettings),
        // The `layers/` view's codecs, with no I/O: compressed bytes in, the uncompressed tar
        // and checkpoints to resume from out (gzip through zlib, zstd through libzstd).
        .target(name: "LayerView", dependencies: ["CZlib", "CZstd"], swiftSettings: sourceSettings),
        // On-disk content-addressed cache and single-flight block fetches (zlib for block CRCs).
        .target(name: "ContentCache", dependencies: [
            "OCI", "CZlib", "CChecksum", "SystemSupport", "LayerView",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: sourceSettings),
        // The filesystem core: knows nothing of libfuse.
        .target(name: "CacheFS", dependencies: [
            "OCI", "ContentCache", "LayerView",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: sourceSettings),
        // Thin libfuse low-level binding over CacheFS.
        .target(name: "FuseBinding", dependencies: [
            "CFuse3", "CacheFS", "ContentCache", "SystemSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: sourceSettings),
        .executableTarget(name: "ocicachefs", dependencies: [
            "CMalloc", "OCI", "HTTPClient", "RemoteStore", "ContentCache", "CacheFS", "FuseBinding", "SystemSupport",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: sourceSettings),

        // One fuzz target per parser of remote or user input (docs/FUZZING.md). Built here so
        // they compile and replay their corpus in the tests; scripts/fuzz.sh adds libFuzzer.
        .target(name: "FuzzTargets", dependencies: [
            "OCI", "HTTPClient", "RemoteStore", "ContentCache", "LayerView",
            .product(name: "Logging", package: "swift-log"),
        ], path: "Fuzz/Targets", swiftSettings: sourceSettings),

        .testTarget(name: "SystemSupportTests", dependencies: ["SystemSupport"]),
        .testTarget(name: "OCITests", dependencies: ["OCI"]),
        .testTarget(name: "HTTPClientTests", dependencies: ["HTTPClient"]),
        .testTarget(name: "RemoteStoreTests", dependencies: ["RemoteStore", "HTTPClient", "OCI"]),
        // What the reference-model tests share: a seeded generator and a shrinker.
        .target(name: "ModelTesting", path: "Tests/ModelTesting"),
        .testTarget(name: "LayerViewTests", dependencies: ["LayerView", "ModelTesting"]),
        .testTarget(name: "ContentCacheTests", dependencies: ["ContentCache", "CChecksum", "OCI", "ModelTesting"]),
        .testTarget(name: "FuseBindingTests", dependencies: ["FuseBinding", "CacheFS"]),
        .testTarget(name: "CacheFSTests", dependencies: ["CacheFS", "ContentCache", "LayerView", "RemoteStore", "OCI", "SystemSupport", "ModelTesting"]),
        .testTarget(name: "IntegrationTests", dependencies: ["OCI", "RemoteStore", "HTTPClient", "SystemSupport"]),
        .testTarget(name: "FuzzTargetsTests", dependencies: ["FuzzTargets"]),
    ]
)

// scripts/fuzz.sh names libFuzzer's runtime without its main: SwiftPM gives the driver a main of
// its own, and libFuzzer's would clash with it. Only that build (in its own scratch directory)
// instruments the parsers and has the driver, so `swift build` and the tests never need libFuzzer.
if let libFuzzerRuntime = Context.environment["OCICACHEFS_LIBFUZZER_RUNTIME"] {
    let instrumented: Set = ["SystemSupport", "OCI", "HTTPClient", "RemoteStore", "LayerView", "ContentCache", "FuzzTargets"]
    for target in package.targets where instrumented.contains(target.name) {
        target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-sanitize=fuzzer"])]
    }
    package.targets += [
        .systemLibrary(name: "CLibFuzzer", path: "Fuzz/CLibFuzzer"),
        .executableTarget(name: "ocicachefs-fuzz", dependencies: ["CLibFuzzer", "FuzzTargets"], path: "Fuzz/Driver",
                          swiftSettings: sourceSettings,
                          linkerSettings: [.unsafeFlags([libFuzzerRuntime, "-lstdc++", "-lm"])]),
    ]
}
