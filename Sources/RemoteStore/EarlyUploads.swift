import Dispatch
import Logging
import OCI
import Synchronization

/// Thrown by `finish` of an early upload that sent nothing, by choice (the remote held the blob).
struct EarlyUploadNotSent: Error {}

extension EarlyBlobUpload {
    /// `finish`, or else `abandon`: nil then, and the blob is to be published the ordinary way,
    /// which starts over and finds the blob if the closing request did arrive.
    func finishOrAbandon(as digest: Digest, size: Int64, logger: Logger) -> BlobPublication? {
        do {
            return try finish(as: digest, size: size)
        } catch is EarlyUploadNotSent {
        } catch {
            logger.info("an upload started before the commit did not finish; uploading the blob again",
                        metadata: ["blob": "\(digest)", "error": "\(error)"])
        }
        abandon()
        return nil
    }
}

/// What an early upload's `run` left, for `finish` and `abandon` to wait on.
final class EarlyRunOutcome<Value: Sendable>: Sendable {
    private let outcome = Mutex<Result<Value, RemoteStoreError>?>(nil)
    private let ended = DispatchSemaphore(value: 0)

    /// Runs `body` and keeps what it returned or threw. Called once, by `run`.
    func record(_ body: () throws(RemoteStoreError) -> Value) {
        let result: Result<Value, RemoteStoreError>
        do throws(RemoteStoreError) {
            result = .success(try body())
        } catch {
            result = .failure(error)
        }
        outcome.withLock { $0 = result }
        ended.signal()
    }

    /// What `record` kept, once it did.
    func wait() -> Result<Value, RemoteStoreError> {
        ended.wait()
        ended.signal()  // for any later caller
        return outcome.withLock { $0! }
    }
}
