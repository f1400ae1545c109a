#!/usr/bin/env python3
"""Signs a table of S3 requests with botocore's S3SigV4Auth and writes them as Swift test data.

    python3 scripts/sigv4/generate_vectors.py            # rewrites Tests/RemoteStoreTests/SigV4Vectors.swift
    python3 scripts/sigv4/generate_vectors.py --stdout   # prints it (the Swift live test compares this)

URLs are built here independently of the Swift code, with botocore's own percent_encode (keys
keep '/', everything outside A-Z a-z 0-9 - _ . ~ is encoded), so the Swift test checks
SigV4.s3ObjectURL as well as the canonical request, string to sign and Authorization header.
The output depends only on this table and botocore's signing, never on the clock.
"""

import datetime
import os
import sys
import types

try:
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from botocore.utils import percent_encode, percent_encode_sequence
except ImportError as error:  # the Swift live test shows this message
    sys.exit(f"generate_vectors.py needs botocore ({error}); install it with: python3 -m pip install botocore")

EXAMPLE_KEY = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
MAY_24_2013 = 1369353600  # 2013-05-24T00:00:00Z
LEAP_DAY_2024 = 1709251199  # 2024-02-29T23:59:59Z
MINIO = "http://127.0.0.1:9000"
AWS = "https://s3.us-east-1.amazonaws.com"


def vector(name, method="GET", endpoint=MINIO, bucket="cache", key="", path_style=True, query=(),
           headers=(), body=None, unsigned=False, token=None, region="us-east-1", timestamp=MAY_24_2013,
           credentials=EXAMPLE_KEY):
    return dict(name=name, method=method, endpoint=endpoint, bucket=bucket, key=key, path_style=path_style,
                query=list(query), headers=list(headers), body=body, unsigned=unsigned, token=token,
                region=region, timestamp=timestamp, credentials=credentials)


VECTORS = [
    vector("GET blob with Range, path style, MinIO port", key="blobs/sha256:0123abcd",
           headers=[("Range", "bytes=0-9")]),
    vector("HEAD manifest, virtual-hosted, AWS", method="HEAD", endpoint=AWS, key="manifests/v1.2", path_style=False),
    vector("ListObjectsV2 with reserved characters in the prefix", endpoint=AWS, path_style=False,
           query=[("list-type", "2"), ("prefix", "a b+c/d"), ("delimiter", "/")]),
    vector("ListObjectsV2 path style, bucket URL without key",
           query=[("prefix", "blobs/sha256:"), ("list-type", "2"), ("continuation-token", "1==+/x")]),
    vector("Empty query value (acl=)", endpoint=AWS, bucket="examplebucket", path_style=False, query=[("acl", "")]),
    vector("Repeated query names sorted by value, '=' and '&' and unicode in values",
           query=[("b", "2"), ("a", "z"), ("a", "y"), ("c", "x=y&z"), ("d", "caf\u00e9 \u2713"), ("E", "")]),
    vector("PUT with a body and Content-Type", method="PUT", key="blobs/sha256:feed",
           headers=[("Content-Type", "application/octet-stream")], body="hello, world\n"),
    vector("PUT with an empty body", method="PUT", key="empty", body=""),
    vector("PUT with UNSIGNED-PAYLOAD over HTTPS", method="PUT", endpoint=AWS, key="ingest/part 1",
           path_style=False, body="not hashed", unsigned=True),
    vector("GET with UNSIGNED-PAYLOAD", endpoint=AWS, key="x", unsigned=True),
    vector("Session token, eu-west-1, 2024 leap day", endpoint="https://s3.eu-west-1.amazonaws.com",
           bucket="team-cache", key="index.json", path_style=False, token="FQoGZXIvYXdzEXAMPLE//token+/=",
           region="eu-west-1", timestamp=LEAP_DAY_2024),
    vector("Key with spaces, unicode and reserved characters",
           key="dir/my file \u00fc \u65e5\u672c/!'()*$&=;,@:+%.txt"),
    vector("Key with repeated and dot segments is not normalized", key="a//b/./c/../d/"),
    vector("Key with an encoded-looking sequence is encoded once", key="literal%20and%2Fslash"),
    vector("HTTPS on a non-default port, virtual-hosted", endpoint="https://s3.example.test:8443",
           bucket="b1", key="k", path_style=False),
    vector("HTTP default port is not part of Host", endpoint="http://minio.local:80", key="k"),
    vector("HTTPS default port is not part of Host", endpoint="https://minio.local:443", key="k"),
    vector("IPv6 loopback endpoint", endpoint="http://[::1]:9000", key="blobs/sha256:1"),
    vector("Header values trimmed and collapsed; User-Agent and Expect unsigned", method="PUT", key="meta",
           headers=[("X-Amz-Meta-Note", "  a   b \t c  "), ("User-Agent", "ocicachefs/1"), ("Expect", "100-continue"),
                    ("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg=="), ("x-amz-meta-empty", "")], body=""),
    vector("Repeated header joined with commas", key="k",
           headers=[("X-Amz-Meta-Tag", "one"), ("x-amz-meta-tag", "two")]),
    vector("DELETE object", method="DELETE", key="blobs/sha256:dead"),
    vector("Other credentials and region", endpoint=AWS, bucket="b", key="k", path_style=False,
           credentials=("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), region="ap-southeast-2",
           timestamp=1700000000),
]


def build_url(v):
    scheme, rest = v["endpoint"].split("://", 1)
    authority = rest.rstrip("/")
    key = percent_encode(v["key"], safe="/~")
    if v["path_style"]:
        url = f"{scheme}://{authority}/{v['bucket']}" + (f"/{key}" if v["key"] else "")
    else:
        url = f"{scheme}://{v['bucket']}.{authority}/{key}"
    if v["query"]:
        url += "?" + percent_encode_sequence(v["query"])
    return url


class RecordingSigner(botocore.auth.S3SigV4Auth):
    def canonical_request(self, request):
        self.recorded_canonical_request = super().canonical_request(request)
        return self.recorded_canonical_request

    def string_to_sign(self, request, canonical_request):
        self.recorded_string_to_sign = super().string_to_sign(request, canonical_request)
        return self.recorded_string_to_sign


def sign(v):
    url = build_url(v)
    request = AWSRequest(method=v["method"], url=url,
                         data=None if v["body"] is None else v["body"].encode("utf-8"))
    for name, value in v["headers"]:
        request.headers[name] = value  # appends: repeated names stay repeated
    if v["unsigned"]:
        request.context["client_config"] = types.SimpleNamespace(s3={"payload_signing_enabled": False})
    when = datetime.datetime.fromtimestamp(v["timestamp"], datetime.timezone.utc)
    botocore.auth.get_current_datetime = lambda: when
    access_key, secret_key = v["credentials"]
    signer = RecordingSigner(Credentials(access_key, secret_key, v["token"]), "s3", v["region"])
    signer.add_auth(request)
    return url, signer.recorded_canonical_request, signer.recorded_string_to_sign, request.headers["Authorization"]


def swift_string(text):
    if text is None:
        return "nil"
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("\\u{%X}" % ord(ch))
    return '"' + "".join(out) + '"'


def swift_pairs(pairs):
    if not pairs:
        return "[]"
    return "[" + ", ".join(f"({swift_string(a)}, {swift_string(b)})" for a, b in pairs) + "]"


def render():
    lines = [
        "// Generated by scripts/sigv4/generate_vectors.py from botocore's S3SigV4Auth; do not edit.",
        "// Regenerate: python3 scripts/sigv4/generate_vectors.py (SigV4Tests checks this file is current).",
        "",
        "struct SigV4Vector: Sendable {",
        "    var name: String",
        "    var method: String",
        "    var endpoint: String",
        "    var bucket: String",
        "    var key: String",
        "    var pathStyle: Bool",
        "    var query: [(String, String)]",
        "    var headers: [(String, String)]",
        "    /// UTF-8 text; nil is no body.",
        "    var body: String?",
        "    /// nil: sign the body's SHA-256.",
        "    var payloadHash: String?",
        "    var accessKeyID: String",
        "    var secretAccessKey: String",
        "    var sessionToken: String?",
        "    var region: String",
        "    /// Seconds since 1970.",
        "    var timestamp: Int",
        "    // What botocore produced:",
        "    var url: String",
        "    var canonicalRequest: String",
        "    var stringToSign: String",
        "    var authorization: String",
        "}",
        "",
        "extension SigV4Vector {",
        "    static let all: [SigV4Vector] = [",
    ]
    for v in VECTORS:
        url, canonical, to_sign, authorization = sign(v)
        fields = [
            ("name", swift_string(v["name"])),
            ("method", swift_string(v["method"])),
            ("endpoint", swift_string(v["endpoint"])),
            ("bucket", swift_string(v["bucket"])),
            ("key", swift_string(v["key"])),
            ("pathStyle", "true" if v["path_style"] else "false"),
            ("query", swift_pairs(v["query"])),
            ("headers", swift_pairs(v["headers"])),
            ("body", swift_string(v["body"])),
            ("payloadHash", swift_string("UNSIGNED-PAYLOAD" if v["unsigned"] else None)),
            ("accessKeyID", swift_string(v["credentials"][0])),
            ("secretAccessKey", swift_string(v["credentials"][1])),
            ("sessionToken", swift_string(v["token"])),
            ("region", swift_string(v["region"])),
            ("timestamp", str(v["timestamp"])),
            ("url", swift_string(url)),
            ("canonicalRequest", swift_string(canonical)),
            ("stringToSign", swift_string(to_sign)),
            ("authorization", swift_string(authorization)),
        ]
        lines.append("        SigV4Vector(")
        lines += [f"            {label}: {value}," for label, value in fields[:-1]]
        lines.append(f"            {fields[-1][0]}: {fields[-1][1]}),")
    lines += ["    ]", "}", ""]
    return "\n".join(lines)


def main():
    text = render()
    if sys.argv[1:] == ["--stdout"]:
        sys.stdout.write(text)
        return
    if sys.argv[1:]:
        sys.exit("usage: generate_vectors.py [--stdout]")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = os.path.join(root, "Tests", "RemoteStoreTests", "SigV4Vectors.swift")
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {len(VECTORS)} vectors to {os.path.relpath(target, root)}")


if __name__ == "__main__":
    main()
