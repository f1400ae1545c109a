import Foundation
import HTTPClient
import Logging
import Testing
@testable import RemoteStore

@Suite("RegistrySetup")
struct RegistrySetupTests {
    private let quietLogger = Logger(label: "RegistrySetupTests") { _ in SwiftLogNoOpLogHandler() }

    @Test func sourceAndPublisherShareTheReferenceAndTheLogin() throws {
        let directory = NSTemporaryDirectory() + "registry-setup-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let auth = Data("ci:pw".utf8).base64EncodedString()
        try Data(#"{"auths":{"registry.test:5000":{"auth":"\#(auth)"}}}"#.utf8).write(to: URL(fileURLWithPath: directory + "/config.json"))

        let spec = try SourceSpec(parsing: "type=registry,ref=registry.test:5000/team/cache:main,registry.insecure=true")
        let setup = try RegistrySetup(spec: spec, helperTimeout: .seconds(5), environment: ["DOCKER_CONFIG": directory])
        #expect(setup.reference == (try RegistryReference(parsing: "registry.test:5000/team/cache:main")))
        #expect(setup.insecure)
        #expect(setup.credential == .basic(username: "ci", password: "pw"))
        let registry = FakeRegistry(repository: "team/cache")
        #expect(setup.makeSource(transport: registry, timeout: .seconds(5), logger: quietLogger).displayName
            == "registry.test:5000/team/cache:main")
        #expect(setup.makePublisher(transport: registry, timeout: .seconds(5), logger: quietLogger).displayName
            == "registry.test:5000/team/cache")
    }

    @Test func specThatIsNotARegistrysIsRefused() throws {
        let empty = ["DOCKER_CONFIG": "/nonexistent"]
        let withoutRef = configurationMessage {
            _ = try RegistrySetup(spec: SourceSpec(parsing: "type=registry,tag=main"), helperTimeout: .seconds(1), environment: empty)
        }
        #expect(withoutRef.contains("ref="))
        let unknown = configurationMessage {
            _ = try RegistrySetup(spec: SourceSpec(parsing: "type=registry,ref=r.test/c,mode=max"), helperTimeout: .seconds(1),
                                  environment: empty)
        }
        #expect(unknown.contains("'mode'"))
        let s3 = configurationMessage {
            _ = try RegistrySetup(spec: SourceSpec(parsing: "type=s3,bucket=b"), helperTimeout: .seconds(1), environment: empty)
        }
        #expect(s3.contains("type=registry"))
    }
}
