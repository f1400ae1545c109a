import ArgumentParser
import ContentCache
import FoundationEssentials
import SystemSupport
import OCI

#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// A size on the command line: `10G`, `500M`, `2GiB`, or bytes.
struct ByteSize {
    var bytes: Int64

    /// For options parsed `.unconditional`ly: "-1" is then a value the person gets told is
    /// invalid, instead of an option that leaves the size "missing".
    static func parse(_ argument: String) throws -> ByteSize {
        guard let bytes = CacheLimits.parseSize(argument) else {
            throw ValidationError("a size is bytes or a number with K, M, G or T (e.g. 20G), not negative")
        }
        return ByteSize(bytes: bytes)
    }

    /// The total of `sizes`, or Int64.max where it would overflow.
    static func total<Sizes: Sequence>(_ sizes: Sizes) -> Int64 where Sizes.Element == Int64 {
        sizes.reduce(Int64(0)) { sum, size in
            let (total, overflow) = sum.addingReportingOverflow(size)
            return overflow ? .max : total
        }
    }

    static func describe(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(bytes) B" : value.withOneDecimal + " " + units[unit]
    }
}

struct CacheOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The content cache (default: as for mount).", valueName: "DIR"))
    var cacheDir: String?

    var directory: String { cacheDir ?? MountCommand.defaultCacheDirectory() }
}

struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache",
        abstract: "Inspect or prune the local content cache.",
        subcommands: [List.self, Prune.self]
    )

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls",
            abstract: "List the cached blobs and partial downloads, least recently used first, with sizes and last use.")

        @OptionGroup var options: CacheOptions

        func run() throws {
            let directory = options.directory
            guard FileManager.default.fileExists(atPath: directory) else {
                printError("no content cache at \(directory)")
                throw ExitCode.failure
            }
            // Without opening a ContentStore, which creates its directories and clears debris:
            // listing changes nothing (the cache may be another user's, or read-only).
            let blobs = ContentStore.completeBlobs(inCache: directory)
            let partials = ContentStore.partialBlobs(inCache: directory)
            let rows = (blobs.map { ($0, "") } + partials.map { ($0, "  partial download") })
                .sorted { ($0.0.lastUsed, $0.0.digest) < ($1.0.lastUsed, $1.0.digest) }
            func column(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(1, width - text.count)) }
            print(column("DIGEST", 72) + column("SIZE", 14) + "LAST USED")
            for (blob, note) in rows {
                print(column(blob.digest.description, 72) + column(ByteSize.describe(blob.size), 14)
                      + blob.lastUsed.formatted(.iso8601) + note)
            }
            var summary = "\(blobs.count) blobs, \(ByteSize.describe(ByteSize.total(blobs.map(\.size))))"
            if !partials.isEmpty {
                summary += "; \(partials.count) partial downloads of \(ByteSize.describe(ByteSize.total(partials.map(\.size))))"
            }
            print(summary + " in \(options.directory)")
        }
    }

    struct Prune: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "prune",
            abstract: "Remove least recently used blobs until the cache fits.",
            discussion: """
            Partial downloads count at their blob's full size and go the same way. Blobs that a \
            mount is reading at that moment are kept. Without --max-size the cache is pruned to \
            the default cap (a quarter of its filesystem); --max-size 0 empties it.

            Example:
              ocicachefs cache prune --max-size 20G
            """)

        @OptionGroup var options: CacheOptions

        @Option(parsing: .unconditional, help: ArgumentHelp("Keep at most this much (e.g. 20G, 500M).", valueName: "SIZE"),
                transform: ByteSize.parse)
        var maxSize: ByteSize?

        func run() throws {
            let store = try openStore(options.directory)
            var limits = CacheLimits.defaults(forDirectory: options.directory)
            limits.minFreeBytes = 0
            if let maxSize { limits.maxBytes = maxSize.bytes }
            let removed = store.evict(toFit: limits)
            let kept = store.completeBlobs()
            print("removed \(removed.count) blobs (\(ByteSize.describe(ByteSize.total(removed.map(\.size))))); "
                  + "kept \(kept.count) (\(ByteSize.describe(ByteSize.total(kept.map(\.size)))))")
        }
    }
}

private func openStore(_ directory: String) throws -> ContentStore {
    guard FileManager.default.fileExists(atPath: directory) else {
        printError("no content cache at \(directory)")
        throw ExitCode.failure
    }
    do {
        return try ContentStore(directory: directory)
    } catch {
        printError("\(error)")
        throw ExitCode.failure
    }
}
