/// A publisher for a remote that a mount shows under tag names of its own: a ref mounted with
/// `--tag NAME=SOURCE` is shown as NAME, but its remote knows it by the tag or cache name
/// SOURCE gives. Tags `remoteTags` does not name are published as they are.
public struct TagRenamingPublisher: CachePublisher {
    let publisher: any CachePublisher
    /// The mount's tag → the remote's.
    let remoteTags: [String: String]

    public init(_ publisher: any CachePublisher, remoteTags: [String: String]) {
        self.publisher = publisher
        self.remoteTags = remoteTags
    }

    public var displayName: String { publisher.displayName }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        try publisher.publishBlob(digest, size: size, contentsAt: path)
    }

    public func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)? {
        publisher.beginEarlyUpload(of: contents)
    }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                            sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication {
        try publisher.publishBlob(digest, size: size, contentsAt: path, sentEarlyBy: early)
    }

    public func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8],
                           smallBlob: (Digest) -> [UInt8]?) throws {
        try publisher.publishTag(remoteTags[tag] ?? tag, manifest: manifest, manifestBytes: manifestBytes, smallBlob: smallBlob)
    }
}
