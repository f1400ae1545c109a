import Testing
@testable import RemoteStore

/// The `.configuration` message `body` throws; records an issue for success or another error.
func configurationMessage(sourceLocation: SourceLocation = #_sourceLocation,
                                  _ body: () throws -> Void) -> String {
    do {
        try body()
        Issue.record("expected a configuration error", sourceLocation: sourceLocation)
    } catch RemoteStoreError.configuration(let message) {
        #expect(!message.contains("\n"), sourceLocation: sourceLocation)
        return message
    } catch {
        Issue.record("expected a configuration error, got \(error)", sourceLocation: sourceLocation)
    }
    return ""
}

@Suite("SourceSpec")
struct SourceSpecTests {
    @Test func registryWithRef() throws {
        let spec = try SourceSpec(parsing: "type=registry,ref=HOST/REPO:TAG")
        #expect(spec.type == "registry")
        #expect(spec.attributes == ["ref": "HOST/REPO:TAG"])
    }

    @Test func typeIsRemovedFromAttributesAndOrderDoesNotMatter() throws {
        let spec = try SourceSpec(parsing: "ref=127.0.0.1:5000/cache:main,registry.insecure=true,type=registry")
        #expect(spec.type == "registry")
        #expect(spec.attributes == ["ref": "127.0.0.1:5000/cache:main", "registry.insecure": "true"])
        #expect(spec.attributes["type"] == nil)
    }

    /// Issue 13: the daemon's command line shows the source without its secrets, in a form
    /// that still parses to the rest of it.
    @Test func withoutSecretsDropsOnlyTheSecrets() throws {
        let spec = try SourceSpec(parsing: #"type=s3,bucket=b,name="a,b",access_key_id=AKID,secret_access_key=s/k+1,session_token=tok"#)
        #expect(spec.withoutSecrets == #"type=s3,access_key_id=AKID,bucket=b,name="a,b""#)
        let shown = try SourceSpec(parsing: spec.withoutSecrets)
        #expect(shown.attributes == spec.attributes.filter { !SourceSpec.secretAttributes.contains($0.key) })
    }

    @Test func quotedValuesHoldCommas() throws {
        let spec = try SourceSpec(parsing: #"type=registry,ref="reg.example.com/a/b:c",note="x,y,z",mode=max"#)
        #expect(spec.type == "registry")
        #expect(spec.attributes == ["ref": "reg.example.com/a/b:c", "note": "x,y,z", "mode": "max"])
    }

    @Test func quotedWholeFieldAndQuotedEquals() throws {
        let spec = try SourceSpec(parsing: #""type=registry","ref=a=b""#)
        #expect(spec.type == "registry")
        #expect(spec.attributes == ["ref": "a=b"])
    }

    @Test func valueMayContainEquals() throws {
        let spec = try SourceSpec(parsing: "type=s3,prefix=a=b")
        #expect(spec.attributes == ["prefix": "a=b"])
    }

    @Test func emptyValueIsKept() throws {
        let spec = try SourceSpec(parsing: "type=registry,ref=")
        #expect(spec.attributes == ["ref": ""])
    }

    @Test func keysAreLowercasedAndTrimmed() throws {
        let spec = try SourceSpec(parsing: " TYPE=registry, Ref=x")
        #expect(spec.type == "registry")
        #expect(spec.attributes == ["ref": "x"])
    }

    @Test func emptyFieldsAreSkipped() throws {
        let spec = try SourceSpec(parsing: ",type=registry,,ref=x,")
        #expect(spec.type == "registry")
        #expect(spec.attributes == ["ref": "x"])
    }

    @Test func duplicateKeys() {
        let message = configurationMessage { _ = try SourceSpec(parsing: "type=registry,ref=a,ref=b") }
        #expect(message.contains("'ref'"), "\(message)")
        #expect(message.contains("twice"), "\(message)")
    }

    @Test func duplicateKeysDifferingInCase() {
        let message = configurationMessage { _ = try SourceSpec(parsing: "type=registry,ref=a,REF=b") }
        #expect(message.contains("twice"), "\(message)")
    }

    @Test func duplicateType() {
        let message = configurationMessage { _ = try SourceSpec(parsing: "type=registry,type=local") }
        #expect(message.contains("'type'"), "\(message)")
    }

    @Test(arguments: ["ref=reg.example.com/a:b", "", " , ", "registry.insecure=true"])
    func missingType(_ text: String) {
        let message = configurationMessage { _ = try SourceSpec(parsing: text) }
        #expect(message.contains("type="), "\(message)")
    }

    @Test func fieldWithoutEquals() {
        let message = configurationMessage { _ = try SourceSpec(parsing: "type=registry,reg.example.com/a:b") }
        #expect(message.contains("'reg.example.com/a:b'"), "\(message)")
        #expect(message.contains("key=value"), "\(message)")
    }

    @Test func bareRefWithoutAnyEquals() {
        let message = configurationMessage { _ = try SourceSpec(parsing: "reg.example.com/a:b") }
        #expect(message.contains("key=value"), "\(message)")
    }

    @Test func emptyKey() {
        let message = configurationMessage { _ = try SourceSpec(parsing: "type=registry,=x") }
        #expect(message.contains("empty key"), "\(message)")
    }

    @Test(arguments: [#"type=registry,ref="abc"#, #"type="registry"#, #"""#, #"type=registry,ref="a"",x=1"#])
    func unterminatedQuote(_ text: String) {
        let message = configurationMessage { _ = try SourceSpec(parsing: text) }
        #expect(message.contains("unterminated quote"), "\(message)")
    }

    // MARK: flag()

    @Test(arguments: ["true", "1", "t", "T", "TRUE", "True"])
    func flagTrue(_ value: String) throws {
        let spec = try SourceSpec(parsing: "type=registry,registry.insecure=\(value)")
        #expect(try spec.flag("registry.insecure") == true)
    }

    @Test(arguments: ["false", "0", "f", "F", "FALSE", "False"])
    func flagFalse(_ value: String) throws {
        let spec = try SourceSpec(parsing: "type=registry,registry.insecure=\(value)")
        #expect(try spec.flag("registry.insecure") == false)
    }

    @Test func absentFlagIsFalse() throws {
        let spec = try SourceSpec(parsing: "type=registry")
        #expect(try spec.flag("registry.insecure") == false)
    }

    @Test(arguments: ["yes", "no", "2", "", "on", "truee", " true"])
    func flagGarbage(_ value: String) throws {
        let spec = try SourceSpec(parsing: "type=registry,registry.insecure=\(value)")
        let message = configurationMessage { _ = try spec.flag("registry.insecure") }
        #expect(message.contains("registry.insecure"), "\(message)")
        #expect(message.contains("not a boolean"), "\(message)")
    }
}
