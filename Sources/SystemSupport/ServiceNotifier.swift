#if canImport(Glibc)
@preconcurrency import Glibc
#elseif canImport(Musl)
@preconcurrency import Musl
#endif

/// systemd's readiness protocol (`Type=notify`) without libsystemd: one datagram of
/// `KEY=VALUE` lines to the unix socket named in `$NOTIFY_SOCKET` (a path, or `@name` for the
/// abstract namespace). Without the variable every call does nothing.
public struct ServiceNotifier: Sendable {
    /// The socket's address bytes (`sun_path`), nil when nothing listens.
    private let address: [UInt8]?

    public init(environment: [String: String]) {
        guard let socket = environment["NOTIFY_SOCKET"], socket.hasPrefix("/") || socket.hasPrefix("@") else {
            address = nil
            return
        }
        var bytes = Array(socket.utf8)
        // An abstract address starts with a NUL byte where the text has "@".
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: sockaddr_un().sun_path)
        address = bytes.count < capacity ? bytes : nil
    }

    public var isActive: Bool { address != nil }

    /// Sends `lines` as one datagram; false if there is a socket but the message did not reach
    /// it. Never blocks: a service manager that is not reading loses the message, not the daemon.
    @discardableResult
    public func notify(_ lines: [String]) -> Bool {
        guard let address else { return true }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var target = sockaddr_un()
        target.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &target.sun_path) { path in
            path.copyBytes(from: address)
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + address.count)
        let message = lines.joined(separator: "\n")
        let sent = message.withCString { text in
            withUnsafePointer(to: &target) { pointer in
                // SAFETY: sockaddr_un starts with the generic sockaddr header, as sendto expects.
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic in
                    sendto(fd, text, strlen(text), Int32(MSG_DONTWAIT | MSG_NOSIGNAL), generic, length)
                }
            }
        }
        return sent >= 0
    }
}
