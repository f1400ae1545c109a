#!/usr/bin/env python3
"""HTTP/1.1 fixture server for the HTTPClient tests (standard library only).

Usage: http_fixture.py [--port N] [--tls CERT.pem KEY.pem]

Listens on 127.0.0.1 (port 0 = any free port by default), prints "PORT <n>" on stdout once
ready, and exits when its stdin reaches EOF (so it dies with the test process that started it).
With --tls it speaks HTTPS with the given certificate.

Routes (every response has a Content-Length, so connections stay alive):
  GET|HEAD /blob/<size>      deterministic body, byte i == i % 251; honours Range
                             (a-b, a-, -n; one range only): 206 + Content-Range, 416 past the end
  *        /echo             body echoed; X-Method, X-Body-Length, X-Content-Length, X-Expect,
                             X-Content-Type describe the request ("none" when absent); PUT -> 201
  GET      /headers          the request headers as a JSON list of [name, value]
  GET      /redirect         302 with Location: /blob/10
  GET      /redirect-to?url=U   302 with Location: U (any scheme: file://, ftp://, ...)
  GET      /status/<code>    that status, body "status <code>"
  GET      /continue         an interim "100 Continue" (X-Interim) then 200 (X-Final)
  GET      /stall-headers    200 headers (Content-Length 1000), then no byte for 30 s
  GET      /stall-body       200 headers and 10 of 1000 bytes, then no byte for 30 s
  GET      /slow?chunks=N&interval_ms=M   N chunks of 10 bytes, one every M ms
  GET      /truncated        Content-Length 1000, 500 bytes, then the connection closes
  GET      /nothing          the connection closes without any response
  GET      /garbage          a status line without a status code, then close
  GET      /stats            {"connections": accepted TCP connections, "requests": requests
                             served other than /stats}
"""

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PERIOD = 251
CHUNK = 1 << 20
PATTERN = bytes(i % PERIOD for i in range(CHUNK + PERIOD))


def pattern(offset, length):
    """Bytes [offset, offset+length) of the blob pattern, length <= CHUNK."""
    start = offset % PERIOD
    return memoryview(PATTERN)[start:start + length]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0


STATS = Stats()


def parse_range(header, size):
    """Returns (first, last) inclusive, None for no/unsupported range, or 'unsatisfiable'."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    spec = header[len("bytes="):].strip()
    first_s, sep, last_s = spec.partition("-")
    if not sep:
        return None
    try:
        if first_s == "":
            n = int(last_s)
            if n <= 0:
                return "unsatisfiable"
            return (max(0, size - n), size - 1)
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first >= size:
        return "unsatisfiable"
    if last < first:
        return None
    return (first, min(last, size - 1))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "http-fixture/1"

    def setup(self):
        super().setup()
        with STATS.lock:
            STATS.connections += 1

    def log_message(self, format, *args):  # quiet
        pass

    # -- helpers ---------------------------------------------------------------------------
    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        remaining = int(length)
        parts = []
        while remaining > 0:
            part = self.rfile.read(min(remaining, CHUNK))
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        return b"".join(parts)

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def count_request(self):
        if self.path != "/stats":
            with STATS.lock:
                STATS.requests += 1

    # -- dispatch --------------------------------------------------------------------------
    def dispatch(self):
        self.count_request()
        url = urlsplit(self.path)
        path = url.path
        query = parse_qs(url.query)
        if path.startswith("/blob/"):
            return self.blob(int(path[len("/blob/"):]))
        if path == "/echo":
            return self.echo()
        if self.command not in ("GET", "HEAD"):
            self.read_body()
            return self.reply(405, b"method not allowed")
        if path == "/headers":
            return self.reply(200, json.dumps([[k, v] for k, v in self.headers.items()]).encode(),
                              [("Content-Type", "application/json")])
        if path == "/redirect":
            return self.reply(302, b"redirecting", [("Location", "/blob/10")])
        if path == "/redirect-to":
            return self.reply(302, b"redirecting", [("Location", query.get("url", [""])[0])])
        if path.startswith("/status/"):
            code = int(path[len("/status/"):])
            return self.reply(code, ("status %d" % code).encode())
        if path == "/continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok")
            return None
        if path in ("/stall-headers", "/stall-body"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            if path == "/stall-body":
                self.wfile.write(bytes(pattern(0, 10)))
            self.wfile.flush()
            time.sleep(30)
            self.close_connection = True
            return None
        if path == "/slow":
            chunks = int(query.get("chunks", ["10"])[0])
            interval = int(query.get("interval_ms", ["100"])[0]) / 1000.0
            self.send_response(200)
            self.send_header("Content-Length", str(chunks * 10))
            self.end_headers()
            for i in range(chunks):
                self.wfile.write(bytes(pattern(i * 10, 10)))
                self.wfile.flush()
                if i + 1 < chunks:
                    time.sleep(interval)
            return None
        if path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(bytes(pattern(0, 500)))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if path == "/nothing":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if path == "/garbage":
            self.wfile.write(b"HTTP/1.1 OK-ISH\r\nX: y\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if path == "/stats":
            with STATS.lock:
                body = json.dumps({"connections": STATS.connections, "requests": STATS.requests})
            return self.reply(200, body.encode(), [("Content-Type", "application/json")])
        return self.reply(404, b"not found")

    def blob(self, size):
        if self.command not in ("GET", "HEAD"):
            self.read_body()
            return self.reply(405, b"method not allowed")
        rng = parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            return self.reply(416, b"", [("Content-Range", "bytes */%d" % size)])
        if rng is None:
            first, last, status = 0, size - 1, 200
        else:
            (first, last), status = rng, 206
        length = last - first + 1 if size > 0 else 0
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (first, last, size))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return None
        offset = first
        end = first + length
        while offset < end:
            n = min(CHUNK, end - offset)
            self.wfile.write(pattern(offset, n))
            offset += n
        return None

    def echo(self):
        body = self.read_body()
        headers = [
            ("X-Method", self.command),
            ("X-Body-Length", str(len(body or b""))),
            ("X-Content-Length", self.headers.get("Content-Length", "none")),
            ("X-Expect", self.headers.get("Expect", "none")),
            ("X-Content-Type", self.headers.get("Content-Type", "none")),
        ]
        return self.reply(201 if self.command == "PUT" else 200, body or b"", headers)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = dispatch


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        kind = sys.exc_info()[0]
        if kind is not None and issubclass(kind, (ConnectionError, BrokenPipeError, OSError)):
            return
        super().handle_error(request, client_address)


def exit_on_stdin_eof():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main():
    args = sys.argv[1:]
    port, tls = 0, None
    while args:
        if args[0] == "--port" and len(args) >= 2:
            port, args = int(args[1]), args[2:]
        elif args[0] == "--tls" and len(args) >= 3:
            tls, args = (args[1], args[2]), args[3:]
        else:
            sys.exit("usage: http_fixture.py [--port N] [--tls CERT KEY]")
    server = Server(("127.0.0.1", port), Handler)
    if tls:
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[0], tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=exit_on_stdin_eof, daemon=True).start()
    print("PORT %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
