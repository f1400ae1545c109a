/// Builds a response's status and headers from the raw header lines libcurl hands over, one
/// at a time. Pure, so the fuzzer can feed it lines a server never should send.
package struct ResponseHeadParser: Sendable {
    package private(set) var status = 0
    package private(set) var headers = HTTPHeaders()

    package init() {}

    package var head: HTTPResponseHead { HTTPResponseHead(status: status, headers: headers) }

    /// One raw header line as curl delivers it (with its CRLF).
    package mutating func receive(line: some Collection<UInt8>) {
        var bytes = Array(line)[...]
        while let last = bytes.last, last == 0x0D || last == 0x0A { bytes = bytes.dropLast() }
        if bytes.isEmpty { return }  // end of a header block
        // libcurl passes a bare CR (or a NUL) inside a line through; values end up in one-line
        // errors and logs. RFC 9110 §5.5 lets a recipient replace CR, LF and NUL with SP.
        for index in bytes.indices where bytes[index] == 0x0D || bytes[index] == 0x0A || bytes[index] == 0 {
            bytes[index] = 0x20
        }
        if bytes.starts(with: "HTTP/".utf8) {
            // A new response (after 1xx, or a proxy's CONNECT answer): only the last one counts.
            headers = HTTPHeaders()
            let parts = bytes.split(separator: 0x20, maxSplits: 2, omittingEmptySubsequences: true)
            status = parts.count >= 2 ? Int(String(decoding: parts[1], as: UTF8.self)) ?? 0 : 0
            return
        }
        if let first = bytes.first, first == 0x20 || first == 0x09 {
            // Obsolete line folding: continues the previous field's value.
            let extra = String(decoding: bytes, as: UTF8.self).trimmingHTTPWhitespace()
            var fields = headers.fields
            if !extra.isEmpty, let lastField = fields.popLast() {
                let joined = lastField.value.isEmpty ? extra : lastField.value + " " + extra
                headers = HTTPHeaders(fields + [(name: lastField.name, value: joined)])
            }
            return
        }
        guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")) else { return }
        let name = String(decoding: bytes[..<colon], as: UTF8.self).trimmingHTTPWhitespace()
        let value = String(decoding: bytes[(colon + 1)...], as: UTF8.self).trimmingHTTPWhitespace()
        if !name.isEmpty { headers.add(name, value) }
    }
}

extension String {
    /// Drops leading and trailing spaces and horizontal tabs.
    func trimmingHTTPWhitespace() -> String {
        let utf8 = self.utf8
        guard let start = utf8.firstIndex(where: { $0 != 0x20 && $0 != 0x09 }) else { return "" }
        let end = utf8.lastIndex(where: { $0 != 0x20 && $0 != 0x09 })!
        return String(self[start...end])
    }
}
