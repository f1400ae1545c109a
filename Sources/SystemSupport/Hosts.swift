/// True for a host name that can only mean this machine: `localhost`, `::1` (bracketed or
/// not) and 127.0.0.0/8 written as four decimal octets, never a DNS name that merely starts
/// with "127.".
public func isLoopbackHost(_ host: String) -> Bool {
    var name = host.lowercased()
    if name.hasPrefix("[") && name.hasSuffix("]") { name = String(name.dropFirst().dropLast()) }
    if name == "localhost" || name == "::1" { return true }
    let octets = name.split(separator: ".", omittingEmptySubsequences: false)
    return octets.count == 4 && octets[0] == "127" && octets.allSatisfy { UInt8($0) != nil }
}
