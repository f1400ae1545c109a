#!/usr/bin/env python3
"""HTTP/1.1 reverse proxy in front of a test registry that misbehaves on blob GETs on demand
(standard library only).

Usage: fault_proxy.py --upstream http://127.0.0.1:PORT [--port N]

Listens on 127.0.0.1 (port 0 = any free port by default), prints "port <n>" on stdout once
ready, and exits when its stdin reaches EOF (so it dies with the test process that started it).

Every request is forwarded to the upstream (one upstream connection per request, 30 s
timeout): method, path+query, headers (Host included, hop-by-hop ones dropped), body; the
response comes back with its status, headers and body, always with a Content-Length (or a
closed connection), so client keep-alive works. Only blob GETs (`/v2/<repo>/blobs/sha256:<hex>`)
are subject to the current fault; blob HEADs are forwarded like everything else.

Routes:
  POST /_fault           JSON {"mode": M, ...}: the fault for every blob GET, or with
                         "digest": "sha256:..." only for that blob. Without "digest" it also
                         drops every per-digest fault. Answers the current faults as JSON.
  GET  /_fault           the current faults as JSON
  GET  /_fault/stats     {"blob_requests": blob GETs received (any outcome), "requests":
                         requests other than /_fault*, "connections": accepted TCP connections,
                         control ones included}
  POST /_fault/reset-stats  zeroes the counters
  *    anything else     forwarded (upstream unreachable: 502)

Modes, the "mode" field (a non-200/206 upstream answer is always relayed as is; the last four
modes never contact the upstream):
  pass                   forwarded as is (the registry honours Range: 206)
  ignore-range           Range dropped: 200 with the whole blob and its Content-Length
  ignore-range-cut after=N  like ignore-range, but the connection is closed (shutdown +
                         close) after N body bytes
  cut after=N            Range honoured, connection closed after N body bytes of each response
  corrupt [count=K]      Range honoured, every body byte at an absolute blob offset below
                         1 MiB is XORed with 0xFF; with count, only the first K responses
                         touching the first MiB are corrupted, then it behaves like pass
  (any other mode) count=K  only the first K blob GETs get the fault, then it behaves like pass
  long                   Range dropped: 200, the blob + 1000 zero bytes (Content-Length matches)
  short                  Range dropped: 200, the blob minus its last 1000 bytes (idem)
  truncated              Range dropped: 200, full Content-Length, half the body, then close
  endless                Range dropped: 200 chunked, the blob repeated forever (<= ~20 MB/s)
  html                   200 text/html, body "<html>oops</html>\\n" (18 bytes)
  reset                  no response: the connection is reset (RST, SO_LINGER 0)
  status code=C          status C with body "fault status C\\n"
  stall                  no response; the connection stays open 60 s (or until the client closes)
"""
import argparse
import http.client
import json
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 256 << 10
MIB = 1 << 20
ENDLESS_RATE = 20_000_000  # bytes per second
BLOB_PATH = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]+)$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "proxy-connection"}
INVERT = bytes(b ^ 0xFF for b in range(256))
MODES = {"pass", "ignore-range", "ignore-range-cut", "cut", "corrupt", "long", "short",
         "truncated", "endless", "html", "reset", "status", "stall"}
WHOLE = {"ignore-range", "ignore-range-cut", "long", "short", "truncated", "endless"}
UPSTREAM = None  # (host, port), set by main()
LOCK = threading.Lock()
FAULTS = {"*": {"mode": "pass"}}  # "*" or a digest -> fault
STATS = {"blob_requests": 0, "requests": 0, "connections": 0}


def count(name):
    with LOCK:
        STATS[name] += 1


def parse_fault(body):
    """The fault dict of a POST /_fault body, or an error message."""
    try:
        fault = json.loads(body or b"{}")
    except ValueError as e:
        return None, "bad JSON: %s" % e
    if not isinstance(fault, dict) or fault.get("mode") not in MODES:
        return None, "mode must be one of " + ", ".join(sorted(MODES))
    need = {"cut": "after", "ignore-range-cut": "after", "status": "code"}.get(fault["mode"])
    if need and not isinstance(fault.get(need), int):
        return None, "mode %s needs an integer %r" % (fault["mode"], need)
    if "count" in fault:
        fault["left"] = int(fault["count"])
    return fault, None


def corrupt(data, offset):
    """data (starting at absolute blob offset) with its bytes below 1 MiB inverted."""
    n = max(0, min(len(data), MIB - offset))
    return data[:n].translate(INVERT) + data[n:] if n else data


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fault-proxy/1"

    def setup(self):
        super().setup()
        count("connections")

    def log_message(self, format, *args):  # quiet
        pass

    def read_body(self):
        """The request body (a chunked one decoded), None without one."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass  # trailers
            return b"".join(parts)
        length = self.headers.get("Content-Length")
        return None if length is None else self.rfile.read(int(length))

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def reply_json(self, obj):
        self.reply(200, json.dumps(obj).encode() + b"\n", [("Content-Type", "application/json")])

    def abort(self, reset=False):
        """Closes the client connection at once: FIN after shutdown, or RST with reset."""
        self.close_connection = True
        try:
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
        except OSError:
            pass

    def upstream(self, body, drop_range=False):
        """Sends this request upstream; returns (connection, response), or (None, None) after
        answering 502 when the upstream cannot be reached."""
        conn = http.client.HTTPConnection(*UPSTREAM, timeout=30)
        skip = HOP_BY_HOP | {"content-length"} | ({"range"} if drop_range else set())
        skip |= {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in skip:
                    conn.putheader(name, value)
            if "Host" not in self.headers:
                conn.putheader("Host", "%s:%d" % UPSTREAM)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self.reply(502, ("upstream: %s\n" % e).encode())
            return None, None

    def send_upstream_head(self, resp, status=None, length=None, drop=(), headers=()):
        """Status line + upstream headers (minus hop-by-hop, Content-Length and `drop`)."""
        self.send_response_only(status or resp.status, None if status else resp.reason)
        skip = HOP_BY_HOP | {"content-length"} | set(drop)
        for name, value in [h for h in resp.getheaders() if h[0].lower() not in skip] + list(headers):
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def forward(self, resp):
        """Relays an upstream response verbatim, body read whole."""
        body = resp.read()
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        self.send_upstream_head(resp, length=resp.getheader("Content-Length") if no_body else len(body))
        if not no_body:
            self.wfile.write(body)

    def dispatch(self):
        try:
            path = urlsplit(self.path).path
            if path == "/_fault" or path.startswith("/_fault/"):
                return self.control(path)
            count("requests")
            body = self.read_body()
            match = BLOB_PATH.match(path)
            if match and self.command == "GET":
                count("blob_requests")
                return self.blob(match.group(1))
            conn, resp = self.upstream(body)
            if resp:
                self.forward(resp)
                conn.close()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = dispatch

    def control(self, path):
        body = self.read_body()
        if path == "/_fault" and self.command == "POST":
            fault, error = parse_fault(body)
            if error:
                return self.reply(400, (error + "\n").encode())
            with LOCK:
                if "digest" in fault:
                    FAULTS[fault["digest"]] = fault
                else:
                    FAULTS.clear()
                    FAULTS["*"] = fault
        elif path == "/_fault/stats" and self.command == "GET":
            with LOCK:
                return self.reply_json(dict(STATS))
        elif path == "/_fault/reset-stats" and self.command == "POST":
            with LOCK:
                STATS.update(dict.fromkeys(STATS, 0))
            return self.reply_json(STATS)
        elif path != "/_fault" or self.command != "GET":
            return self.reply(404, b"unknown control route\n")
        with LOCK:
            return self.reply_json(FAULTS)

    def blob(self, digest):
        with LOCK:
            fault = FAULTS.get(digest) or FAULTS["*"]
            mode = fault["mode"]
            # corrupt counts only the responses it corrupts (see relay)
            if mode != "corrupt" and "left" in fault:
                if fault["left"] > 0:
                    fault["left"] -= 1
                else:
                    mode = "pass"
        if mode == "reset":
            return self.abort(reset=True)
        if mode == "stall":
            return self.stall(60)
        if mode == "html":
            return self.reply(200, b"<html>oops</html>\n", [("Content-Type", "text/html")])
        if mode == "status":
            return self.reply(fault["code"], b"fault status %d\n" % fault["code"])
        conn, resp = self.upstream(None, drop_range=mode in WHOLE)
        if not resp:
            return None
        try:
            if resp.status not in (200, 206) or resp.getheader("Content-Length") is None:
                return self.forward(resp)
            if mode == "endless":
                return self.endless(resp)
            self.relay(resp, mode, fault)
        finally:
            conn.close()

    def relay(self, resp, mode, fault):
        """Streams a 200/206 upstream body, shaped by the fault."""
        size, start = int(resp.getheader("Content-Length")), 0
        match = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
        if resp.status == 206 and match:
            start = int(match.group(1))
        send, advertised, extra, flip = size, size, b"", False
        if mode in ("cut", "ignore-range-cut"):
            send = min(size, fault["after"])
        elif mode == "long":
            extra, advertised = bytes(1000), size + 1000
        elif mode == "short":
            send = advertised = max(0, size - 1000)
        elif mode == "truncated":
            send = size // 2
        elif mode == "corrupt" and start < MIB:
            with LOCK:
                flip = fault.get("left", 1) > 0
                if flip and "left" in fault:
                    fault["left"] -= 1
        whole = mode in WHOLE
        self.send_upstream_head(resp, status=200 if whole else None, length=advertised,
                                drop=("content-range",) if whole else ())
        sent = 0
        while sent < send:
            data = resp.read(min(CHUNK, send - sent))
            if not data:
                break
            self.wfile.write(corrupt(data, start + sent) if flip else data)
            sent += len(data)
        self.wfile.write(extra)
        if sent + len(extra) < advertised:
            self.abort()

    def endless(self, resp):
        blob = resp.read() or b"\0"
        self.send_upstream_head(resp, status=200, drop=("content-range",),
                                headers=[("Transfer-Encoding", "chunked")])
        self.close_connection = True
        began, sent = time.monotonic(), 0
        while True:
            for offset in range(0, len(blob), CHUNK):
                piece = blob[offset:offset + CHUNK]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                ahead = sent / ENDLESS_RATE - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def stall(self, seconds):
        self.close_connection = True
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.connection], [], [], left)[0] and not self.connection.recv(65536):
                break  # the client closed its side
        self.abort()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        kind = sys.exc_info()[0]
        if kind is not None and issubclass(kind, OSError):
            return  # client or upstream went away
        super().handle_error(request, client_address)


def exit_on_stdin_eof():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main():
    global UPSTREAM
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, metavar="URL", help="http://127.0.0.1:PORT")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free one)")
    args = ap.parse_args()
    url = urlsplit(args.upstream)
    if url.scheme != "http" or not url.hostname:
        ap.error("--upstream must be http://HOST:PORT")
    UPSTREAM = (url.hostname, url.port or 80)
    server = Server(("127.0.0.1", args.port), Handler)
    threading.Thread(target=exit_on_stdin_eof, daemon=True).start()
    print("port %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
