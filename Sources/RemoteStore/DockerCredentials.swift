// Registry credentials from Docker's `config.json`, resolved the way the
// docker CLI does: `credHelpers[host]`, then `credsStore`, then `auths`.

import FoundationEssentials
import SystemSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - RegistryCredential

/// A credential for one registry. Its textual forms never reveal secrets.
public enum RegistryCredential: Sendable, Equatable {
    /// HTTP Basic username and password (also usable for a token exchange).
    case basic(username: String, password: String)
    /// An identity (refresh) token, exchanged for a bearer token with
    /// `grant_type=refresh_token`.
    case identityToken(String)
}

extension RegistryCredential: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    public var description: String {
        switch self {
        case .basic(let username, _):
            return "basic(user: \(username), password: <redacted>)"
        case .identityToken:
            return "identityToken(<redacted>)"
        }
    }

    public var debugDescription: String { description }

    /// Keeps `dump()` and reflection-based printers from showing secrets.
    public var customMirror: Mirror {
        switch self {
        case .basic(let username, _):
            return Mirror(self, children: ["username": username, "password": "<redacted>"], displayStyle: .enum)
        case .identityToken:
            return Mirror(self, children: ["identityToken": "<redacted>"], displayStyle: .enum)
        }
    }
}

// MARK: - RegistryCredentialSource

/// Where a registry's credential comes from, kept so that it can be asked again: logins that
/// credential helpers hand out (ECR, GCR) expire after hours, long before a CI machine's mount
/// ends, and the helper then hands out a fresh one.
public struct RegistryCredentialSource: Sendable {
    /// Names the source in messages: `docker-credential-NAME`, or the config file's path.
    public let name: String
    /// How long a failure to get a new credential stands for later refusals, instead of the
    /// source being asked again: the kernel retries a failed read at once, and a build reads
    /// many blobs, each of which would otherwise run the helper.
    public let failureStandsFor: Duration
    private let lookUp: @Sendable () throws -> RegistryCredential?

    public init(name: String, failureStandsFor: Duration = .seconds(5),
                lookUp: @escaping @Sendable () throws -> RegistryCredential?) {
        self.name = name
        self.failureStandsFor = failureStandsFor
        self.lookUp = lookUp
    }

    /// The credential the source holds now (nil: none). Runs a helper, or reads the config.
    public func credential() throws -> RegistryCredential? { try lookUp() }
}

// MARK: - CredentialError

/// A failure to resolve credentials. Its message is one line and never
/// contains a secret or the contents of a config file.
public struct CredentialError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Kind: Sendable, Equatable {
        /// `config.json` exists but cannot be read or is not valid.
        case invalidConfig
        /// The `docker-credential-NAME` program is not on `PATH`.
        case helperNotFound
        /// The helper did not finish within the timeout and was killed.
        case helperTimedOut
        /// The helper could not be started or exited with a failure.
        case helperFailed
        /// The helper's output was not the expected JSON.
        case helperOutputInvalid
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        // Guarantee a single line. `isNewline`, not == "\n": "\r\n" is one Character, equal to
        // neither (found by the docker-config fuzz target).
        self.message = message
            .split(whereSeparator: \.isNewline)
            .joined(separator: " ")
    }

    public var description: String { message }
}

extension CredentialError: LocalizedError {
    public var errorDescription: String? { message }
}

// MARK: - DockerCredentialStore

/// Reads registry credentials from a Docker config directory (`config.json`)
/// and the credential helpers it names.
public struct DockerCredentialStore: Sendable {
    /// The Docker config directory in use, or nil when none could be
    /// determined (no argument, `DOCKER_CONFIG` nor `HOME`).
    public let configDirectory: String?
    public let environment: [String: String]
    public let helperTimeout: Duration

    /// The server URL Docker uses for Docker Hub, both as the `auths` key and
    /// as the credential helpers' server URL.
    public static let dockerHubServerURL = "https://index.docker.io/v1/"
    static let dockerHubHosts: Set<String> = ["docker.io", "index.docker.io", "registry-1.docker.io"]

    /// - Parameters:
    ///   - configDirectory: the Docker config directory; default
    ///     `$DOCKER_CONFIG`, else `$HOME/.docker`.
    ///   - environment: the environment used for `DOCKER_CONFIG`, `HOME`,
    ///     `PATH` (to find helpers) and passed to the helpers.
    ///   - helperTimeout: how long a credential helper may run.
    public init(
        configDirectory: String? = nil,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        helperTimeout: Duration = .seconds(10)
    ) {
        if let configDirectory, !configDirectory.isEmpty {
            self.configDirectory = configDirectory
        } else if let dir = environment["DOCKER_CONFIG"], !dir.isEmpty {
            self.configDirectory = dir
        } else if let home = environment["HOME"], !home.isEmpty {
            self.configDirectory = joinedPath(home, ".docker")
        } else {
            self.configDirectory = nil
        }
        self.environment = environment
        self.helperTimeout = helperTimeout
    }

    /// The path of `config.json`, or nil when there is no config directory.
    public var configFilePath: String? {
        configDirectory.map { joinedPath($0, "config.json") }
    }

    /// The credential for a registry host (`registry.example.com`,
    /// `127.0.0.1:5000`, `docker.io`), or nil when none is configured.
    ///
    /// Order: `credHelpers[host]`, else `credsStore`; when that helper has no
    /// credentials for the host, the `auths` entry for the host.
    public func credential(forHost host: String) throws -> RegistryCredential? {
        guard let config = try loadConfig() else { return nil }
        let hostKey = Self.normalizedHost(host)
        guard !hostKey.isEmpty else { return nil }
        let isHub = Self.dockerHubHosts.contains(hostKey)
        let serverURL = isHub ? Self.dockerHubServerURL : hostKey

        if let helper = Self.helperName(for: hostKey, isHub: isHub, in: config) {
            if let credential = try runHelper(named: helper, serverURL: serverURL) {
                return credential
            }
            // "credentials not found": fall through to `auths`.
        }
        return try credentialFromAuths(config, hostKey: hostKey, isHub: isHub)
    }

    /// This store as the source of `host`'s credential, asked again whenever the registry
    /// refuses the credential it gave. Its name is the helper the config names for `host`
    /// now, or the config file.
    public func source(forHost host: String) -> RegistryCredentialSource {
        let hostKey = Self.normalizedHost(host)
        let config = try? loadConfig()
        let helper = config.flatMap { Self.helperName(for: hostKey, isHub: Self.dockerHubHosts.contains(hostKey), in: $0) }
        let name = helper.map { "docker-credential-\($0)" } ?? "the Docker config \(configFilePath ?? "(none)")"
        return RegistryCredentialSource(name: name) { try credential(forHost: host) }
    }

    /// `credHelpers[host]`, else `credsStore`; nil when the file's `auths` are the only source.
    static func helperName(for hostKey: String, isHub: Bool, in config: Config) -> String? {
        if let configured = credHelper(for: hostKey, isHub: isHub, in: config.credHelpers) {
            // An empty helper name means "use the file", as in the docker CLI.
            return configured.isEmpty ? nil : configured
        }
        if let store = config.credsStore, !store.isEmpty { return store }
        return nil
    }

    // MARK: Host normalization

    /// `https://host:port/v1/` → `host:port`, lowercased.
    static func normalizedHost(_ value: String) -> String {
        var s = Substring(value.trimmingWhitespace())
        for scheme in ["https://", "http://"] where s.lowercased().hasPrefix(scheme) {
            s = s.dropFirst(scheme.count)
            break
        }
        if let slash = s.firstIndex(of: "/") {
            s = s[..<slash]
        }
        return s.lowercased()
    }

    /// Whether an `auths` / `credHelpers` key names the same registry.
    static func keyMatches(_ key: String, hostKey: String, isHub: Bool) -> Bool {
        let normalized = normalizedHost(key)
        if isHub { return dockerHubHosts.contains(normalized) }
        return normalized == hostKey
    }

    static func credHelper(for hostKey: String, isHub: Bool, in helpers: [String: String]) -> String? {
        if isHub, let h = helpers[dockerHubServerURL] { return h }
        if let h = helpers[hostKey] { return h }
        for key in helpers.keys.sorted() where keyMatches(key, hostKey: hostKey, isHub: isHub) {
            return helpers[key]
        }
        return nil
    }

    // MARK: Config file

    struct AuthEntry: Sendable {
        var auth: String?
        var username: String?
        var password: String?
        var identityToken: String?
    }

    struct Config: Sendable {
        var auths: [String: AuthEntry] = [:]
        var credsStore: String?
        var credHelpers: [String: String] = [:]
    }

    /// Loads `config.json`; nil when the file (or the directory) is missing.
    func loadConfig() throws -> Config? {
        guard let path = configFilePath else { return nil }
        var isDirectory = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return nil }
        guard !isDirectory else {
            throw CredentialError(.invalidConfig, "cannot read Docker config \(path): it is a directory")
        }
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw CredentialError(.invalidConfig, "cannot read Docker config \(path): \(describeFileError(error))")
        }
        return try Self.parseConfig(data, path: path)
    }

    static func parseConfig(_ data: Data, path: String) throws -> Config {
        // The docker CLI accepts an empty file.
        if data.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D }) {
            return Config()
        }
        func invalid(_ what: String) -> CredentialError {
            CredentialError(.invalidConfig, "invalid Docker config \(path): \(what)")
        }
        let root: [String: ConfigValue]
        do {
            guard case .object(let object) = try JSONDecoder().decode(ConfigValue.self, from: data) else {
                throw invalid("top level is not a JSON object")
            }
            root = object
        } catch let error as CredentialError {
            throw error
        } catch {
            // The decoder's message may quote the file; keep it out.
            throw invalid("not valid JSON")
        }

        var config = Config()

        if let value = lookup(root, "credsStore") {
            guard case .string(let s) = value else { throw invalid("\"credsStore\" is not a string") }
            config.credsStore = s
        }
        if let value = lookup(root, "credHelpers") {
            guard case .object(let dict) = value else { throw invalid("\"credHelpers\" is not an object") }
            for (key, v) in dict {
                if case .null = v { continue }
                guard case .string(let name) = v else {
                    throw invalid("credHelpers entry for \(key) is not a string")
                }
                config.credHelpers[key] = name
            }
        }
        if let value = lookup(root, "auths") {
            guard case .object(let dict) = value else { throw invalid("\"auths\" is not an object") }
            for (key, v) in dict {
                if case .null = v { continue }
                guard case .object(let entry) = v else {
                    throw invalid("auths entry for \(key) is not an object")
                }
                func string(_ name: String) throws -> String? {
                    guard let v = lookup(entry, name) else { return nil }
                    guard case .string(let s) = v else {
                        throw invalid("\"\(name)\" in auths entry for \(key) is not a string")
                    }
                    return s
                }
                config.auths[key] = AuthEntry(
                    auth: try string("auth"),
                    username: try string("username"),
                    password: try string("password"),
                    identityToken: try string("identitytoken")
                )
            }
        }
        return config
    }

    /// Key lookup as Go's encoding/json does it: exact match first, then
    /// case-insensitive. JSON null counts as absent.
    private static func lookup(_ dict: [String: ConfigValue], _ key: String) -> ConfigValue? {
        var value = dict[key]
        if value == nil {
            let lower = key.lowercased()
            if let match = dict.keys.sorted().first(where: { $0.lowercased() == lower }) {
                value = dict[match]
            }
        }
        if case .null = value { return nil }
        return value
    }

    /// As much of a JSON value as the config's checks need.
    enum ConfigValue: Decodable {
        case object([String: ConfigValue])
        case string(String)
        case null
        case other

        init(from decoder: Decoder) throws {
            let container = try decoder.singleValueContainer()
            if container.decodeNil() {
                self = .null
            } else if let string = try? container.decode(String.self) {
                self = .string(string)
            } else if let object = try? container.decode([String: ConfigValue].self) {
                self = .object(object)
            } else {
                self = .other
            }
        }
    }

    func credentialFromAuths(_ config: Config, hostKey: String, isHub: Bool) throws -> RegistryCredential? {
        var keys: [String] = []
        let exact = isHub ? Self.dockerHubServerURL : hostKey
        if config.auths[exact] != nil { keys.append(exact) }
        for key in config.auths.keys.sorted() where key != exact && Self.keyMatches(key, hostKey: hostKey, isHub: isHub) {
            keys.append(key)
        }
        for key in keys {
            if let credential = try Self.credential(from: config.auths[key]!, key: key, path: configFilePath ?? "config.json") {
                return credential
            }
        }
        return nil
    }

    static func credential(from entry: AuthEntry, key: String, path: String) throws -> RegistryCredential? {
        if let token = entry.identityToken, !token.isEmpty {
            return .identityToken(token)
        }
        var username = entry.username ?? ""
        var password = entry.password ?? ""
        if let auth = entry.auth, !auth.isEmpty {
            guard let decoded = decodeBase64(auth), let text = String(data: decoded, encoding: .utf8),
                  let colon = text.firstIndex(of: ":")
            else {
                throw CredentialError(
                    .invalidConfig,
                    "invalid Docker config \(path): \"auth\" for \(key) is not base64 of username:password")
            }
            username = String(text[..<colon])
            password = String(text[text.index(after: colon)...])
            // As the docker CLI does.
            password = String(password.drop(while: { $0 == "\0" }).reversed().drop(while: { $0 == "\0" }).reversed())
        }
        if username.isEmpty && password.isEmpty { return nil }
        return .basic(username: username, password: password)
    }

    private static func decodeBase64(_ s: String) -> Data? {
        var t = s.trimmingWhitespace()
        let remainder = t.utf8.count % 4
        if remainder == 1 { return nil }
        if remainder > 0 { t += String(repeating: "=", count: 4 - remainder) }
        return Data(base64Encoded: t)
    }

    // MARK: Credential helpers

    private static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    private static let maxHelperOutput = 1 << 20

    /// Finds `docker-credential-NAME` on the environment's `PATH`.
    func helperExecutable(named name: String) throws -> String {
        let program = "docker-credential-\(name)"
        guard !name.contains("/"), !name.contains("\0") else {
            throw CredentialError(.helperNotFound, "invalid credential helper name \"\(name)\"")
        }
        let path = environment["PATH"] ?? Self.defaultPath
        for dir in path.split(separator: ":", omittingEmptySubsequences: true) {
            let candidate = joinedPath(String(dir), program)
            var isDirectory = false
            if FileManager.default.fileExists(atPath: candidate, isDirectory: &isDirectory),
               !isDirectory,
               FileManager.default.isExecutableFile(atPath: candidate) {
                return candidate
            }
        }
        throw CredentialError(.helperNotFound, "\(program) not found in PATH")
    }

    /// Runs `docker-credential-NAME get` for `serverURL`. Nil when the helper
    /// reports "credentials not found".
    func runHelper(named name: String, serverURL: String) throws -> RegistryCredential? {
        let program = "docker-credential-\(name)"
        let executable = try helperExecutable(named: name)
        let result = try HelperProcess.run(
            executable: executable,
            arguments: ["get"],
            environment: environment,
            input: Data((serverURL + "\n").utf8),
            timeout: helperTimeout,
            maxOutput: Self.maxHelperOutput,
            displayName: program)

        let output = String(decoding: result.stdout, as: UTF8.self)
        let errorOutput = String(decoding: result.stderr, as: UTF8.self)
        let notFound = (output + "\n" + errorOutput).lowercased().contains("credentials not found")

        guard result.exitStatus == 0 else {
            if notFound { return nil }
            var message = "\(program) get failed for \(serverURL) (\(result.terminationDescription))"
            if let detail = Self.safeDetail(output) ?? Self.safeDetail(errorOutput) {
                message += ": \(detail)"
            }
            throw CredentialError(.helperFailed, message)
        }

        struct HelperResponse: Decodable {
            var ServerURL: String?
            var Username: String?
            var Secret: String?
        }
        let response: HelperResponse
        do {
            response = try JSONDecoder().decode(HelperResponse.self, from: Data(result.stdout))
        } catch {
            if notFound { return nil }
            throw CredentialError(.helperOutputInvalid, "\(program) get returned output that is not the expected JSON")
        }
        let username = response.Username ?? ""
        let secret = response.Secret ?? ""
        if username == "<token>" {
            return secret.isEmpty ? nil : .identityToken(secret)
        }
        if username.isEmpty && secret.isEmpty { return nil }
        return .basic(username: username, password: secret)
    }

    /// The first line of a helper's error output, if it is short and cannot
    /// be mistaken for a credential payload.
    static func safeDetail(_ text: String) -> String? {
        guard let line = text.split(whereSeparator: { $0 == "\n" || $0 == "\r" })
            .map({ $0.trimmingWhitespace() })
            .first(where: { !$0.isEmpty })
        else { return nil }
        let lower = line.lowercased()
        if line.contains("{") || lower.contains("secret") || lower.contains("password") || lower.contains("token") {
            return nil
        }
        return line.count > 160 ? String(line.prefix(160)) + "…" : line
    }
}

extension DockerCredentialStore: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Shows the config location only: the environment may hold secrets.
    public var description: String {
        "DockerCredentialStore(config: \(configFilePath ?? "none"), helperTimeout: \(HelperProcess.describe(helperTimeout)))"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(self, children: [
            "configDirectory": configDirectory as Any,
            "helperTimeout": helperTimeout,
        ], displayStyle: .struct)
    }
}

// MARK: - Running a helper process

/// Runs a credential helper to its end within its deadline, with credential errors.
enum HelperProcess {
    static func run(
        executable: String,
        arguments: [String],
        environment: [String: String],
        input: Data,
        timeout: Duration,
        maxOutput: Int,
        displayName: String
    ) throws -> ChildProcess.Outcome {
        guard input.count < 4096 else {
            throw CredentialError(.helperFailed, "input for \(displayName) is too long")
        }
        do {
            return try ChildProcess.run(executable, arguments: arguments, environment: environment, input: Array(input),
                                        timeout: timeout, maxOutput: maxOutput)
        } catch .timedOut {
            throw CredentialError(.helperTimedOut, "\(displayName) did not finish within \(describe(timeout)) and was killed")
        } catch .tooMuchOutput {
            throw CredentialError(.helperOutputInvalid, "\(displayName) wrote more than \(maxOutput) bytes")
        } catch {
            throw CredentialError(.helperFailed, "cannot start \(displayName): \(error)")
        }
    }

    static func describe(_ duration: Duration) -> String {
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        if seconds < 1 { return "\(Int((seconds * 1000).rounded()))ms" }
        if seconds == seconds.rounded() { return "\(Int(seconds))s" }
        return seconds.withOneDecimal + "s"
    }
}
