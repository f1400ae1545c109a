import Foundation
import HTTPClient
import Logging
import OCI
import RemoteStore
import Testing

/// Runs `command` with /bin/sh; a non-zero exit fails the test with the command's output.
@discardableResult
func shell(_ command: String, timeout: Double = 300, in ws: Workspace) async throws -> ProcessResult {
    let result = try await Processes.run("/bin/sh", ["-c", command], timeout: timeout, in: ws)
    guard result.status == 0 else { throw HarnessError("`\(command)` failed: \(result)") }
    return result
}

/// One layer of an image pushed with `pushImage`: its blob's file and descriptor fields.
struct ImageLayer {
    var blob: String
    var mediaType: String
    var annotations: [String: String]?
    var digest: Digest { Digest.sha256(of: FileManager.default.contents(atPath: blob).map(Array.init) ?? []) }
}

/// An image (an OCI manifest, its config and layers) pushed to `repository:tag` through the
/// project's own `RegistryPublisher`, as the layer views' tests mount it.
func pushImage(_ layers: [ImageLayer], config: [UInt8], to registry: Registry, repository: String, tag: String,
               in ws: Workspace) throws {
    let publisher = RegistryPublisher(reference: try RegistryReference(parsing: "\(registry.host)/\(repository)"), insecure: false,
                                      credential: nil, transport: CurlTransport(), timeout: .seconds(60),
                                      logger: Logger(label: "pushImage") { _ in SwiftLogNoOpLogHandler() })
    var descriptors: [Descriptor] = []
    for layer in layers {
        let size = Int64(try FileIO.statFile(layer.blob).st_size)
        _ = try publisher.publishBlob(layer.digest, size: size, contentsAt: layer.blob)
        descriptors.append(Descriptor(mediaType: layer.mediaType, digest: layer.digest, size: size, annotations: layer.annotations))
    }
    let configPath = ws.path("\(repository)-\(tag)-config.json")
    #expect(FileManager.default.createFile(atPath: configPath, contents: Data(config)))
    let configDescriptor = Descriptor(mediaType: MediaType.ociConfig, digest: Digest.sha256(of: config), size: Int64(config.count))
    _ = try publisher.publishBlob(configDescriptor.digest, size: configDescriptor.size, contentsAt: configPath)
    struct Manifest: Encodable {
        var schemaVersion = 2
        var mediaType = MediaType.ociManifest
        var config: Descriptor
        var layers: [Descriptor]
    }
    let manifestBytes = OCILayout.canonicalJSON(Manifest(config: configDescriptor, layers: descriptors))
    let manifest = Descriptor(mediaType: MediaType.ociManifest, digest: Digest.sha256(of: manifestBytes), size: Int64(manifestBytes.count))
    try publisher.publishTag(tag, manifest: manifest, manifestBytes: manifestBytes, smallBlob: { _ in nil })
}
