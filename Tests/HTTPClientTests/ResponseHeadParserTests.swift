import HTTPClient
import Testing

/// Header lines as libcurl hands them over, including ones a broken or hostile server sends.
struct ResponseHeadParserTests {
    private func parse(_ lines: [String]) -> HTTPResponseHead {
        var parser = ResponseHeadParser()
        for line in lines { parser.receive(line: Array(line.utf8)) }
        return parser.head
    }

    @Test func statusAndFieldsOfTheLastResponse() {
        let head = parse(["HTTP/1.1 100 Continue\r\n", "\r\n", "HTTP/1.1 206 Partial Content\r\n",
                          "Content-Range:  bytes 0-9/10 \r\n", "X-Folded: first\r\n", "\tsecond\r\n", "\r\n"])
        #expect(head.status == 206)
        #expect(head.headers["content-range"] == "bytes 0-9/10")
        #expect(head.headers["X-Folded"] == "first second")
    }

    // Found by the http-response fuzz target: the value gained a trailing space.
    @Test func blankContinuationLineAddsNothing() {
        let head = parse(["HTTP/1.1 200 OK\r\n", "Docker-Content-Digest: sha256:ab\r\n", " \r\n", "\t\t\r\n"])
        #expect(head.headers["Docker-Content-Digest"] == "sha256:ab")
    }

    // Found by the http-response fuzz target: libcurl passes a bare CR inside a line through, and
    // S3's x-amz-bucket-region went verbatim into a one-line error. RFC 9110 §5.5 lets a
    // recipient replace CR, LF and NUL in a field value with SP.
    @Test func carriageReturnAndNulInAValueBecomeSpaces() {
        let head = parse(["HTTP/1.1 301 Moved\r\n", "x-amz-bucket-region: us-east-2\rINJECTED\r\n", "X-Nul: a\u{0}b\r\n"])
        #expect(head.headers["x-amz-bucket-region"] == "us-east-2 INJECTED")
        #expect(head.headers["X-Nul"] == "a b")
    }
}
