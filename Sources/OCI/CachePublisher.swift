/// Where a writable mount publishes what a client exported: the one thing the upload queue
/// asks of the network, as `BlobSource` is for reads. Calls block the calling thread; every wait
/// inside them is bounded. Failures that may pass on another attempt conform to
/// `BlobSourceFailure` with `isTransient` true; the caller decides when to try again.
public protocol CachePublisher: Sendable {
    /// For logs and error messages; never contains credentials.
    var displayName: String { get }

    /// Makes the blob present on the remote. Its bytes, already verified against `digest`, are
    /// in the file at `path`, which is read only if they must be sent (a remote that already
    /// holds the blob is not sent it again).
    func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication

    /// Points `tag` at the manifest `manifestBytes` (described by `manifest`); every blob the
    /// manifest references was published before. `smallBlob` gives the exact bytes of a blob
    /// the manifest references (its cache config), for remotes that store a tag in a format of
    /// their own (S3). The remote's previous tag stays intact and valid until this succeeds.
    func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8],
                    smallBlob: (Digest) -> [UInt8]?) throws

    /// Starts sending the bytes of a file a client is still writing, before anyone knows
    /// whether they will become a blob: what the remote receives stays invisible until a
    /// publication finishes it, so a large blob is mostly sent by the time it is committed.
    /// nil when this remote cannot take bytes of unknown digest.
    func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)?

    /// As `publishBlob`, finishing `early` when it sent exactly these bytes, and publishing the
    /// ordinary way (after giving up `early`) when it did not.
    func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                     sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication
}

extension CachePublisher {
    public func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)? { nil }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                            sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication {
        early?.abandon()
        return try publishBlob(digest, size: size, contentsAt: path)
    }
}

/// The bytes of a file still being written in order from offset 0, read while they arrive.
public protocol GrowingBlobContents: AnyObject, Sendable {
    /// Fills the start of `buffer` with bytes from `offset`, waiting a bounded time for them
    /// to be written; 0 when the contents are final and end at `offset`. Throws when they will
    /// not become a blob as they are (rewritten, truncated, removed, or no longer written).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int
    /// What the writer said the contents will be, before writing them: a hint, never trusted.
    var announced: AnnouncedBlob? { get }
    /// Waits a bounded time for the contents to be committed, and returns the digest and size
    /// they were committed as (after checking their bytes); throws when they will not be.
    func committed() throws -> (digest: Digest, size: Int64)
}

/// The blob a writer announced before writing it. containerd's content store, which BuildKit's
/// local exporter writes through, keeps beside each ingest's `data` a `ref` (the
/// `<kind>-<digest>` key containerd makes of the descriptor, or `<name>@<digest>` under a
/// reference name) and a `total` (the descriptor's size).
public struct AnnouncedBlob: Sendable, Equatable {
    public var digest: Digest
    public var size: Int64

    public init(digest: Digest, size: Int64) {
        self.digest = digest
        self.size = size
    }

    /// The blob an ingest's `ref` and `total` name; nil when they name none.
    public init?(ingestRef: [UInt8], total: [UInt8]) {
        let named = "sha256:".utf8.count + 64
        guard ingestRef.count >= named, let digest = Digest(String(decoding: ingestRef.suffix(named), as: UTF8.self)),
              let size = Int64(String(decoding: total, as: UTF8.self)), size >= 0 else { return nil }
        self.init(digest: digest, size: size)
    }
}

/// Bytes a publisher is sending before their digest is known (`beginEarlyUpload`).
public protocol EarlyBlobUpload: AnyObject, Sendable {
    /// Sends the contents as they are written, until they are final or given up; blocks the
    /// calling thread meanwhile, every wait bounded. Called once.
    func run()
    /// Makes what `run` sent the blob `digest`: throws when it did not send exactly `size`
    /// bytes or the remote refuses them. Waits for `run` to end.
    func finish(as digest: Digest, size: Int64) throws -> BlobPublication
    /// Drops what the remote received. Waits for `run` to end.
    func abandon()
}

/// Blobs up to this size are sent in one request, larger ones in pieces (registry chunks, S3
/// parts) that are retried one by one. One request is what containerd sends for a blob of any
/// size, and the cheaper way for both kinds of server (measured: 16 MiB pieces ran at 0.78× a
/// registry's and 0.55× an S3 server's one-request throughput); the limit bounds what a cut
/// connection costs, as rclone's `--s3-upload-cutoff` (200 MiB) does.
public let defaultSingleRequestUploadLimit: Int64 = 256 << 20

/// How a blob came to be on the remote.
public enum BlobPublication: Sendable, Equatable {
    /// The remote already had it; no byte was sent (S3 may have refreshed its age).
    case alreadyPresent
    /// Mounted from another repository of the same registry; no byte was sent.
    case mountedFromRepository(String)
    /// Its bytes were sent.
    case uploaded(bytes: Int64)
}
