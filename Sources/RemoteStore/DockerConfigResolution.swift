import FoundationEssentials

extension DockerCredentialStore {
    /// What `credential(forHost:)` takes from a `config.json` holding `bytes`, short of running a
    /// helper: the helper it would ask, and the `auths` credential it falls back on. It lets the
    /// fuzzer reach the file's parser and the `auths` decoding without files or processes.
    package static func resolve(configFile bytes: [UInt8], host: String) throws -> (helper: String?, credential: RegistryCredential?) {
        let config = try parseConfig(Data(bytes), path: "config.json")
        let hostKey = normalizedHost(host)
        guard !hostKey.isEmpty else { return (nil, nil) }
        let isHub = dockerHubHosts.contains(hostKey)
        let helper = credHelper(for: hostKey, isHub: isHub, in: config.credHelpers) ?? config.credsStore
        let withoutHelpers = DockerCredentialStore(configDirectory: "/nonexistent", environment: [:])
        return (helper, try withoutHelpers.credentialFromAuths(config, hostKey: hostKey, isHub: isHub))
    }
}
