import Testing
@testable import RemoteStore

@Suite("AuthChallenge parsing")
struct AuthChallengeTests {
    @Test func dockerHubBearerWithCommaInsideQuotedScope() {
        let header = #"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#
        let challenges = AuthChallenge.parse(header)
        #expect(challenges == [
            AuthChallenge(scheme: "bearer", parameters: [
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:samalba/my-app:pull,push",
            ]),
        ])
        #expect(challenges.first?.realm == "https://auth.docker.io/token")
        #expect(challenges.first?.service == "registry.docker.io")
        #expect(challenges.first?.scope == "repository:samalba/my-app:pull,push")
    }

    @Test func basicWithSpaceInRealm() {
        #expect(AuthChallenge.parse(#"Basic realm="Registry Realm""#) == [
            AuthChallenge(scheme: "basic", parameters: ["realm": "Registry Realm"]),
        ])
    }

    @Test func severalChallengesInOneHeader() {
        let challenges = AuthChallenge.parse(#"Basic realm="x", Bearer realm="y",service="z""#)
        #expect(challenges == [
            AuthChallenge(scheme: "basic", parameters: ["realm": "x"]),
            AuthChallenge(scheme: "bearer", parameters: ["realm": "y", "service": "z"]),
        ])
    }

    @Test func severalChallengesWithCommasInsideQuotes() {
        let challenges = AuthChallenge.parse(#"Bearer realm="a,b",scope="x:y:pull,push", Basic realm="c, d""#)
        #expect(challenges.map(\.scheme) == ["bearer", "basic"])
        #expect(challenges[0].parameters == ["realm": "a,b", "scope": "x:y:pull,push"])
        #expect(challenges[1].parameters == ["realm": "c, d"])
    }

    @Test func schemeAndKeysAreLowercasedValuesAreNot() {
        let challenges = AuthChallenge.parse(#"BEARER Realm="https://Auth.Example.com/Token",SERVICE=Registry"#)
        #expect(challenges == [
            AuthChallenge(scheme: "bearer", parameters: [
                "realm": "https://Auth.Example.com/Token",
                "service": "Registry",
            ]),
        ])
    }

    @Test func unquotedTokenValues() {
        let challenges = AuthChallenge.parse("Bearer realm=https://auth.example.com/token,service=registry.example.com,scope=repository:a/b:pull")
        #expect(challenges == [
            AuthChallenge(scheme: "bearer", parameters: [
                "realm": "https://auth.example.com/token",
                "service": "registry.example.com",
                "scope": "repository:a/b:pull",
            ]),
        ])
    }

    @Test func escapedQuotesAndBackslashesInQuotedStrings() {
        let challenges = AuthChallenge.parse(#"Basic realm="say \"hi\", ok", other="back\\slash""#)
        #expect(challenges == [
            AuthChallenge(scheme: "basic", parameters: ["realm": #"say "hi", ok"#, "other": #"back\slash"#]),
        ])
    }

    @Test func extraWhitespaceEverywhere() {
        let header = "  Bearer   realm = \"https://a/token\" ,\t service=\"svc\"  ,  ,scope= \"s\"   ,   Basic\trealm=\"r\"  "
        let challenges = AuthChallenge.parse(header)
        #expect(challenges == [
            AuthChallenge(scheme: "bearer", parameters: ["realm": "https://a/token", "service": "svc", "scope": "s"]),
            AuthChallenge(scheme: "basic", parameters: ["realm": "r"]),
        ])
    }

    @Test func insufficientScopeError() throws {
        let header = #"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push",error="insufficient_scope""#
        let challenge = try #require(AuthChallenge.parse(header).first)
        #expect(challenge.error == "insufficient_scope")
        #expect(challenge.parameters["error"] == "insufficient_scope")
        #expect(challenge.scope == "repository:a/b:pull,push")
    }

    @Test func schemeWithoutParameters() {
        #expect(AuthChallenge.parse("Bearer") == [AuthChallenge(scheme: "bearer")])
        #expect(AuthChallenge.parse("Basic, Bearer realm=\"y\"") == [
            AuthChallenge(scheme: "basic"),
            AuthChallenge(scheme: "bearer", parameters: ["realm": "y"]),
        ])
    }

    @Test func token68() {
        #expect(AuthChallenge.parse("Negotiate abc+/def==") == [
            AuthChallenge(scheme: "negotiate", token68: "abc+/def=="),
        ])
        #expect(AuthChallenge.parse("Negotiate abc, Basic realm=\"x\"") == [
            AuthChallenge(scheme: "negotiate", token68: "abc"),
            AuthChallenge(scheme: "basic", parameters: ["realm": "x"]),
        ])
    }

    @Test func emptyQuotedValueAndFirstDuplicateWins() {
        #expect(AuthChallenge.parse(#"Bearer realm="", realm="second", service="s""#) == [
            AuthChallenge(scheme: "bearer", parameters: ["realm": "", "service": "s"]),
        ])
    }

    @Test func emptyAndBlankInputGiveNothing() {
        #expect(AuthChallenge.parse("").isEmpty)
        #expect(AuthChallenge.parse("   \t ").isEmpty)
        #expect(AuthChallenge.parse(",,, ,").isEmpty)
    }

    @Test func garbageNeverCrashes() {
        let inputs = [
            "\"", "=", "==", "\\", "\"unterminated", "Bearer realm=\"unterminated",
            "Bearer realm=\"x\\", "Bearer realm=", "Bearer realm= ,", "=x, =y", "realm=\"x\"",
            "Bearer ,,, realm", "Bearer \"x\"", "Bearer\"x\"", "@@@ ###", "Basic realm=\"x\"junk, service=y",
            "\u{0}\u{1}\u{7f}", "Bearer réalm=\"ü\"", "🔐 realm=\"x\"", String(repeating: "\"a\\", count: 1000),
            String(repeating: "Bearer realm=\"x\", ", count: 500),
        ]
        for input in inputs {
            _ = AuthChallenge.parse(input)  // must not trap or hang
        }
        // A few best-effort results.
        #expect(AuthChallenge.parse("Bearer realm=\"unterminated") == [
            AuthChallenge(scheme: "bearer", parameters: ["realm": "unterminated"]),
        ])
        #expect(AuthChallenge.parse("realm=\"x\", Basic realm=\"y\"") == [
            AuthChallenge(scheme: "basic", parameters: ["realm": "y"]),
        ])
        #expect(AuthChallenge.parse("@@@, Basic realm=\"y\"") == [
            AuthChallenge(scheme: "basic", parameters: ["realm": "y"]),
        ])
        #expect(AuthChallenge.parse("Basic realm=\"x\"junk, service=y") == [
            AuthChallenge(scheme: "basic", parameters: ["realm": "x", "service": "y"]),
        ])
        #expect(AuthChallenge.parse(String(repeating: "Bearer realm=\"x\", ", count: 500)).count == 500)
    }

    @Test func utf8InsideQuotedStringsIsKept() {
        #expect(AuthChallenge.parse("Basic realm=\"Zürich 🔐\"") == [
            AuthChallenge(scheme: "basic", parameters: ["realm": "Zürich 🔐"]),
        ])
    }

    @Test func severalHeaderValues() {
        let challenges = AuthChallenge.parse(headerValues: [#"Basic realm="x""#, #"Bearer realm="y""#])
        #expect(challenges.map(\.scheme) == ["basic", "bearer"])
    }
}
