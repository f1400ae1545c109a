import Synchronization

/// The blob source of a mount that shows several refs: each blob is fetched from a source
/// whose resolution listed it, so a blob that several refs share is fetched once (the
/// content cache sees one digest) and from a remote that holds it. Routes are only ever
/// added: after a refresh, a file opened before it keeps reading from where its blob was.
public final class RoutedBlobSource: BlobSource {
    private let sources: [any BlobSource]
    private let routes = Mutex<[Digest: Int]>([:])

    /// `sources[0]` also answers for blobs no resolution listed (a blob a writable mount
    /// committed is local and never asked for).
    public init(sources: [any BlobSource]) {
        precondition(!sources.isEmpty, "a mount reads from at least one source")
        self.sources = sources
    }

    /// Notes the blobs `source` (an index into the sources) listed. A blob already routed keeps
    /// its route: the earlier source is the one the mount's SOURCE or first ref named.
    public func route(_ digests: some Sequence<Digest>, to source: Int) {
        precondition(sources.indices.contains(source))
        routes.withLock { routes in
            for digest in digests where routes[digest] == nil { routes[digest] = source }
        }
    }

    /// The index of the source `digest` is fetched from.
    public func source(of digest: Digest) -> Int {
        routes.withLock { $0[digest] } ?? 0
    }

    public func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?,
                           onStart: (Int64) throws -> Void, onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        try sources[source(of: digest)].streamBlob(digest, from: offset, through: last, onStart: onStart, onBody: onBody)
    }
}
