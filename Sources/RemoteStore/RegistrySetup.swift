import FoundationEssentials
import HTTPClient
import OCI
import Logging

/// What `type=registry,ref=HOST/REPO[:TAG],registry.insecure=BOOL` names, with the login for
/// its host looked up: the source that reads the repository and the publisher that writes to
/// it are made from one setup, so that they agree on the registry and on its credential.
public struct RegistrySetup: Sendable {
    public let reference: RegistryReference
    public let insecure: Bool
    public let credential: RegistryCredential?
    /// Asked again when the registry refuses `credential`.
    public let credentialSource: RegistryCredentialSource

    /// - Parameters:
    ///   - helperTimeout: the bound on a credential helper's run.
    ///   - environment: where `DOCKER_CONFIG` and `HOME` say the Docker config is.
    public init(spec: SourceSpec, helperTimeout: Duration,
                environment: [String: String] = ProcessInfo.processInfo.environment) throws(RemoteStoreError) {
        guard spec.type == "registry", let ref = spec.attributes["ref"] else {
            throw .configuration("type=registry needs ref=HOST/REPO:TAG")
        }
        let unknown = Set(spec.attributes.keys).subtracting(["ref", "registry.insecure"])
        if let first = unknown.sorted().first {
            throw .configuration("type=registry does not know the attribute '\(first)'")
        }
        reference = try RegistryReference(parsing: ref)
        insecure = try spec.flag("registry.insecure")
        // Asked again during the mount, after the daemon has left its starting directory.
        var store = DockerCredentialStore(environment: environment, helperTimeout: helperTimeout)
        if let directory = store.configDirectory, !directory.hasPrefix("/") {
            store = DockerCredentialStore(configDirectory: FileManager.default.currentDirectoryPath + "/" + directory,
                                          environment: environment, helperTimeout: helperTimeout)
        }
        do {
            credential = try store.credential(forHost: reference.host)
        } catch {
            throw .configuration("\(error)")
        }
        credentialSource = store.source(forHost: reference.host)
    }

    public func makeSource(transport: any HTTPTransport, timeout: Duration, logger: Logger) -> RegistrySource {
        RegistrySource(reference: reference, insecure: insecure, credential: credential, credentialSource: credentialSource,
                       transport: transport, timeout: timeout, logger: logger)
    }

    /// - Parameters:
    ///   - mountFrom: repositories of the same registry that may hold the blobs.
    ///   - singleRequestLimit: larger blobs go up in chunks.
    public func makePublisher(mountFrom: [String] = [], singleRequestLimit: Int64 = defaultSingleRequestUploadLimit,
                              transport: any HTTPTransport, timeout: Duration, logger: Logger) -> RegistryPublisher {
        RegistryPublisher(reference: reference, insecure: insecure, credential: credential, credentialSource: credentialSource,
                          mountFrom: mountFrom, monolithicLimit: singleRequestLimit, transport: transport, timeout: timeout,
                          logger: logger)
    }
}
