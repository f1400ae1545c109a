#!/usr/bin/env python3
"""Docker-registry token server for tests (the "realm" of `auth.token`).

Stdout contract: exactly one line `ready PORT` (flushed) once listening; nothing else.
Stderr: one line per request served, e.g.
    token_issuer[3] GET /token user=alice grant=basic scopes=repository:cache:pull,push -> 200
(never passwords or refresh tokens). Runs until killed (SIGTERM/SIGINT).

At start it writes DIR/token.key (RSA-2048, PKCS#8 PEM) and DIR/token.crt (self-signed
PEM certificate for that key; give it to the registry as `rootcertbundle`). If both
files already exist they are reused, so a restarted issuer stays valid for a running registry.

Endpoints:
  GET  /token?service=S&scope=repository:NAME:pull,push[&scope=...][&offline_token=true]
       Basic auth of a known user -> token granting exactly the requested scopes;
       wrong user/password -> 401; no credentials -> anonymous token with empty access,
       or pull-only on the --anonymous-pull repository.
  POST /token  (form; OAuth2 as used by containerd/docker)
       grant_type=password&username=&password=&service=&scope=  (scope space-separated)
       grant_type=refresh_token&refresh_token=&service=&scope=
       `access_type=offline` (or offline_token=true) adds a "refresh_token" to the answer.
       Unknown refresh token / bad password -> 401.
  GET  /stats  -> {"requests": N, "tokens": N, "denied": N}: requests = every request
       except /stats itself, tokens = tokens issued, denied = 401 answers.
  POST /users  JSON {"USER": "PASSWORD", ...}: sets those users' passwords from now on (a
       login that expires, as ECR's and GCR's do); answers 200 {"users": N}. Not counted.

docker-registry 2.8 accepts a token until 60 s AFTER its exp claim (hard-coded clock-skew
leeway, measured: a --ttl 2 token still worked at +61 s, got 401 at +63 s). To make the
registry really reject tokens TTL seconds after issue, run with --exp-offset -60.

Answer: {"token": JWT, "access_token": JWT, "expires_in": TTL, "issued_at": ISO8601
[, "refresh_token": R]}. The JWT is RS256 with header kid = libtrust key ID of the key,
claims iss, sub, aud (= service), exp, nbf, iat, jti, access.
"""
import argparse
import base64
import datetime
import hashlib
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_kid(public_key) -> str:
    """docker/libtrust KeyID: sha256(DER SPKI)[:30] -> base32 (48 chars) -> 12 groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def load_or_create_key(directory: str):
    os.makedirs(directory, exist_ok=True)
    key_path = os.path.join(directory, "token.key")
    crt_path = os.path.join(directory, "token.crt")
    if os.path.exists(key_path) and os.path.exists(crt_path):
        with open(key_path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocicachefs test token issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    with open(crt_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key


def parse_scope(scope: str):
    """'repository:NAME:pull,push' -> (type, name, [actions]); None when malformed.
    The name is between the first and the last ':' (names may not contain ':' but be lenient)."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    return parts[0], ":".join(parts[1:-1]), [a for a in parts[-1].split(",") if a]


class Issuer:
    def __init__(self, args):
        self.key = load_or_create_key(args.dir)
        self.kid = libtrust_kid(self.key.public_key())
        self.users = {}  # insertion order: user #1 first
        for pair in filter(None, (args.users or "").split(",")):
            user, _, pw = pair.partition(":")
            self.users[user] = pw
        self.issuer, self.default_service, self.ttl = args.issuer, args.service, args.ttl
        self.exp_offset = args.exp_offset
        self.anonymous_pull = args.anonymous_pull
        self.refresh = {}  # refresh token -> user
        if args.refresh_token:
            if not self.users:
                sys.exit("--refresh-token needs at least one --users entry")
            self.refresh[args.refresh_token] = next(iter(self.users))
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "tokens": 0, "denied": 0}

    def count(self, what):
        with self.lock:
            self.stats[what] += 1
            return self.stats[what]

    def check_password(self, user, pw):
        # secrets.compare_digest: constant time, not that it matters on loopback.
        return user in self.users and secrets.compare_digest(self.users[user], pw or "")

    def grant(self, user, scopes):
        """Access list: known users get what they asked; anonymous only pull on one repo."""
        access = []
        for s in scopes:
            parsed = parse_scope(s)
            if not parsed:
                continue
            rtype, name, actions = parsed
            if user is None:
                if rtype == "repository" and name == self.anonymous_pull and "pull" in actions:
                    actions = ["pull"]
                else:
                    continue
            access.append({"type": rtype, "name": name, "actions": actions})
        return access

    def make_token(self, user, service, scopes):
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {"iss": self.issuer, "sub": user or "", "aud": service or self.default_service,
                  "exp": now + self.ttl + self.exp_offset, "nbf": now - 1, "iat": now,
                  "jti": secrets.token_hex(16), "access": self.grant(user, scopes)}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        self.count("tokens")
        return signing_input + "." + b64url(sig), now

    def answer(self, user, service, scopes, offline):
        token, now = self.make_token(user, service, scopes)
        body = {"token": token, "access_token": token, "expires_in": self.ttl,
                "issued_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}
        if offline and user is not None:
            rt = secrets.token_urlsafe(24)
            with self.lock:
                self.refresh[rt] = user
            body["refresh_token"] = rt
        return body


class Handler(BaseHTTPRequestHandler):
    server_version = "ocicachefs-token-issuer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # silence the default access log; we log ourselves
        pass

    def reply(self, status, obj, note, counted=True):
        issuer = self.server.issuer
        n = issuer.count("requests") if counted else "-"
        if status == 401:
            issuer.count("denied")
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="token"')
        self.end_headers()
        self.wfile.write(data)
        path = self.path.split("?")[0]
        print(f"token_issuer[{n}] {self.command} {path} {note} -> {status}", file=sys.stderr,
              flush=True)

    def basic_credentials(self):
        """(user, password) from the Authorization header, None when absent, False if garbled."""
        h = self.headers.get("Authorization", "")
        if not h.lower().startswith("basic "):
            return None
        try:
            user, _, pw = base64.b64decode(h[6:].strip()).decode().partition(":")
            return user, pw
        except Exception:
            return False

    def do_GET(self):
        issuer = self.server.issuer
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        if url.path == "/stats":
            with issuer.lock:
                stats = dict(issuer.stats)
            return self.reply(200, stats, "", counted=False)
        if url.path != "/token":
            return self.reply(404, {"error": "not found"}, "")
        scopes = q.get("scope", [])
        service = q.get("service", [None])[0]
        offline = q.get("offline_token", [""])[0].lower() == "true"
        creds = self.basic_credentials()
        note = "scopes=" + " ".join(scopes)
        if creds is None:
            return self.reply(200, issuer.answer(None, service, scopes, False),
                              "user=<anonymous> " + note)
        if creds is False or not issuer.check_password(*creds):
            user = creds[0] if creds else "?"
            return self.reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                                "message": "invalid credentials"}]},
                              f"user={user} bad credentials")
        return self.reply(200, issuer.answer(creds[0], service, scopes, offline),
                          f"user={creds[0]} grant=basic {note}")

    def do_POST(self):
        issuer = self.server.issuer
        if urllib.parse.urlsplit(self.path).path == "/users":
            length = int(self.headers.get("Content-Length") or 0)
            try:
                users = json.loads(self.rfile.read(length).decode())
                assert isinstance(users, dict) and all(isinstance(v, str) for v in users.values())
            except Exception:
                return self.reply(400, {"error": "expected a JSON object of user: password"}, "", counted=False)
            with issuer.lock:
                issuer.users.update(users)
                count = len(issuer.users)
            return self.reply(200, {"users": count}, "users=" + ",".join(sorted(users)), counted=False)
        if urllib.parse.urlsplit(self.path).path != "/token":
            return self.reply(404, {"error": "not found"}, "")
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
        get = lambda k: form.get(k, [""])[0]
        # OAuth2 form: scopes are space-separated in one field; also accept repeated fields.
        scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
        service = get("service") or None
        offline = get("access_type") == "offline" or get("offline_token").lower() == "true"
        grant = get("grant_type")
        note = f"grant={grant} scopes=" + " ".join(scopes)
        if grant == "password":
            user = get("username")
            if not issuer.check_password(user, get("password")):
                return self.reply(401, {"error": "invalid_grant"}, f"user={user} bad credentials")
        elif grant == "refresh_token":
            with issuer.lock:
                user = issuer.refresh.get(get("refresh_token"))
            if user is None:
                return self.reply(401, {"error": "invalid_grant"}, "unknown refresh token")
        else:
            return self.reply(400, {"error": "unsupported_grant_type"}, note)
        return self.reply(200, issuer.answer(user, service, scopes, offline),
                          f"user={user} {note}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where token.key / token.crt are written")
    ap.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0 = free port)")
    ap.add_argument("--users", default="", help="user:password[,user2:pw2] (first = user #1)")
    ap.add_argument("--issuer", default="ocicachefs-test-issuer", help="JWT iss claim")
    ap.add_argument("--service", default="ocicachefs-test-registry",
                    help="aud claim when the request names no service")
    ap.add_argument("--ttl", type=int, default=300, help="token lifetime in seconds")
    ap.add_argument("--exp-offset", type=int, default=0, metavar="SECONDS",
                    help="added to the exp claim only (expires_in stays TTL); -60 cancels "
                         "docker-registry's 60 s leeway")
    ap.add_argument("--anonymous-pull", metavar="REPO",
                    help="anonymous (no credentials) requests get pull on this repository")
    ap.add_argument("--refresh-token", metavar="TOKEN",
                    help="a fixed refresh token accepted as user #1")
    args = ap.parse_args()
    issuer = Issuer(args)
    ThreadingHTTPServer.request_queue_size = 128  # default backlog 5 is small for parallel tests
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.issuer = issuer
    print(f"ready {server.server_address[1]}", flush=True)
    print(f"token_issuer: kid={issuer.kid} cert={os.path.join(args.dir, 'token.crt')}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
