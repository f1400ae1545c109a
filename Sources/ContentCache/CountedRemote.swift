import OCI

/// A blob source whose transfers are counted in `statistics`.
public struct CountedBlobSource: BlobSource {
    let source: any BlobSource
    let statistics: MountStatistics

    public init(_ source: any BlobSource, statistics: MountStatistics) {
        self.source = source
        self.statistics = statistics
    }

    public func streamBlob(_ digest: Digest, from offset: Int64, through last: Int64?, onStart: (Int64) throws -> Void,
                           onBody: (UnsafeRawBufferPointer) throws -> Void) throws {
        statistics.downloadStarted()
        // The reader may end a stream on purpose (nobody waits for it, the remote ignores
        // ranges): only what the remote did counts as a failed download.
        var stoppedByReader = false
        do {
            try source.streamBlob(digest, from: offset, through: last, onStart: { start in
                do { try onStart(start) } catch { stoppedByReader = true; throw error }
            }, onBody: { bytes in
                statistics.received(bytes.count)
                do { try onBody(bytes) } catch { stoppedByReader = true; throw error }
            })
        } catch {
            statistics.downloadEnded(failed: !stoppedByReader)
            throw error
        }
        statistics.downloadEnded(failed: false)
    }
}

/// A publisher whose blob uploads are counted in `statistics`.
public struct CountedPublisher: CachePublisher {
    let publisher: any CachePublisher
    let statistics: MountStatistics

    public init(_ publisher: any CachePublisher, statistics: MountStatistics) {
        self.publisher = publisher
        self.statistics = statistics
    }

    public var displayName: String { publisher.displayName }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String) throws -> BlobPublication {
        try publishBlob(digest, size: size, contentsAt: path, sentEarlyBy: nil)
    }

    public func beginEarlyUpload(of contents: any GrowingBlobContents) -> (any EarlyBlobUpload)? {
        publisher.beginEarlyUpload(of: contents)
    }

    public func publishBlob(_ digest: Digest, size: Int64, contentsAt path: String,
                            sentEarlyBy early: (any EarlyBlobUpload)?) throws -> BlobPublication {
        statistics.uploadStarted()
        do {
            let publication = try publisher.publishBlob(digest, size: size, contentsAt: path, sentEarlyBy: early)
            if case .uploaded(let bytes) = publication {
                statistics.uploadEnded(sent: bytes, failed: false)
            } else {
                statistics.uploadEnded(sent: 0, failed: false)
            }
            return publication
        } catch {
            statistics.uploadEnded(sent: 0, failed: true)
            throw error
        }
    }

    public func publishTag(_ tag: String, manifest: Descriptor, manifestBytes: [UInt8], smallBlob: (Digest) -> [UInt8]?) throws {
        do {
            try publisher.publishTag(tag, manifest: manifest, manifestBytes: manifestBytes, smallBlob: smallBlob)
        } catch {
            statistics.count(error: "tag")
            throw error
        }
    }
}
