#!/usr/bin/env python3
"""Start Debian's docker-registry (distribution 2.8.2) for tests and the demo.

Writes DIR/config.yml, then exec()s `docker-registry serve DIR/config.yml`, so the PID
the caller started IS the registry: kill that PID to stop it (SIGTERM is enough).

Stdout contract: exactly one line `port PORT` (flushed) before the exec; nothing after.
The registry is NOT necessarily listening yet at that moment (it takes ~0.03-0.12 s):
poll `http://127.0.0.1:PORT/v2/` until it answers (200 with --auth none, 401 otherwise).

Layout of DIR:
  config.yml      the generated configuration
  registry.log    all registry output (appended; a restart on the same DIR keeps history)
  htpasswd        bcrypt file (--auth basic)
  docker/registry/v2/...   filesystem storage (rootdirectory = DIR)

registry.log contains logrus lines (time="..." level=info msg="response completed" ...
http.request.uri=...) AND one combined-log-format access line per request. Observed
with docker-registry 2.8.2+ds1:
  127.0.0.1 - - [21/Nov/2026:14:00:21 +0000] "GET /v2/foo/blobs/sha256:0000...0000 HTTP/1.1" 404 157 "" "curl/7.88.1"
  127.0.0.1 - - [21/Nov/2026:14:05:02 +0000] "GET /v2/cache/blobs/sha256:9a1f...e3 HTTP/1.1" 206 4096 "" "curl/7.88.1"
To count blob GETs of a repo, count lines containing `"GET /v2/REPO/blobs/` (the logrus
lines also contain `/v2/REPO/blobs/`, but as http.request.uri=..., never after `"GET `).
HEAD requests are logged as "HEAD ...". The user field stays "-" even with auth (the logrus
lines carry auth.user.name=). With auth, the 401 challenge answers are logged too, so
filter on the status (`grep -cE '" (200|206) '`) when counting real transfers.
Access lines are written as each response completes (no buffering observed).
"""
import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys


def free_port() -> int:
    # Bind port 0 to let the kernel pick, then release it for the registry. Racy in theory,
    # fine on a test machine (the kernel does not hand the same ephemeral port out at once).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def q(value: str) -> str:
    """A YAML scalar: JSON strings are valid YAML double-quoted strings."""
    return json.dumps(value)


def build_config(args, port: int) -> str:
    root = os.path.abspath(args.dir)
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: text",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {q(root)}",
        "  delete:",
        "    enabled: true",
        "  cache:",
        "    blobdescriptor: inmemory",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",  # no background purge goroutine touching the test storage
        "http:",
        f"  addr: {q('127.0.0.1:%d' % port)}",
        # A fixed secret silences the "No HTTP secret provided" warning; uploads are
        # only ever resumed by this one instance anyway.
        f"  secret: {q(secrets.token_hex(16))}",
    ]
    if args.auth == "basic":
        lines += ["auth:", "  htpasswd:", f"    realm: {q(args.realm)}",
                  f"    path: {q(os.path.join(root, 'htpasswd'))}"]
    elif args.auth == "token":
        lines += ["auth:", "  token:", f"    realm: {q(args.token_realm)}",
                  f"    service: {q(args.token_service)}",
                  f"    issuer: {q(args.token_issuer)}",
                  f"    rootcertbundle: {q(os.path.abspath(args.token_cert))}"]
    return "\n".join(lines) + "\n"


def write_htpasswd(path: str, users):
    """bcrypt entries via apache2-utils' htpasswd (the registry only accepts bcrypt)."""
    for i, pair in enumerate(users):
        user, sep, pw = pair.partition(":")
        if not sep or not user:
            sys.exit(f"registry.py: bad --htpasswd-user {pair!r}, want user:password")
        flags = "-Bbc" if i == 0 else "-Bb"  # -c (re)creates the file for the first user
        subprocess.run(["htpasswd", flags, path, user, pw], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="storage root; config.yml and registry.log go here")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = pick a free one)")
    ap.add_argument("--auth", choices=["none", "basic", "token"], default="none")
    ap.add_argument("--htpasswd-user", action="append", default=[], metavar="USER:PASSWORD",
                    help="basic auth user (repeatable, or comma-separated)")
    ap.add_argument("--realm", default="ocicachefs-test", help="basic auth realm name")
    ap.add_argument("--token-realm", metavar="URL", help="token endpoint, e.g. http://127.0.0.1:P/token")
    ap.add_argument("--token-service", metavar="NAME", help="service (JWT aud) the registry expects")
    ap.add_argument("--token-issuer", metavar="NAME", help="issuer (JWT iss) the registry expects")
    ap.add_argument("--token-cert", metavar="PATH", help="PEM certificate of the token signing key")
    args = ap.parse_args()

    binary = shutil.which("docker-registry")
    if not binary:
        sys.exit("registry.py: docker-registry not found (apt-get install docker-registry)")
    users = [u for v in args.htpasswd_user for u in v.split(",") if u]
    if args.auth == "basic" and not users:
        ap.error("--auth basic needs --htpasswd-user user:password")
    if args.auth == "token":
        missing = [n for n in ("token_realm", "token_service", "token_issuer", "token_cert")
                   if not getattr(args, n)]
        if missing:
            ap.error("--auth token needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        if not os.path.exists(args.token_cert):
            ap.error(f"--token-cert {args.token_cert} does not exist (start token_issuer.py first)")

    os.makedirs(args.dir, exist_ok=True)
    if args.auth == "basic":
        write_htpasswd(os.path.join(args.dir, "htpasswd"), users)
    port = args.port or free_port()
    config_path = os.path.join(os.path.abspath(args.dir), "config.yml")
    with open(config_path, "w") as f:
        f.write(build_config(args, port))

    # Announce the port, then route everything the registry prints to registry.log.
    print(f"port {port}", flush=True)
    log_fd = os.open(os.path.join(args.dir, "registry.log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, f"# registry.py: pid {os.getpid()} port {port} auth {args.auth}\n".encode())
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(null_fd)
    # Drop REGISTRY_* variables inherited from the caller: they would override config.yml.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    os.execve(binary, [binary, "serve", config_path], env)


if __name__ == "__main__":
    main()
