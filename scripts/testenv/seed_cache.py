#!/usr/bin/env python3
"""Push a BuildKit-style registry cache or a plain image to a registry over the HTTP API.

Variants (--variant):
  index        BuildKit index variant: OCI image index (Docker manifest list with
               --docker-media-types) whose manifests[] = the layer descriptors + one
               application/vnd.buildkit.cacheconfig.v0 descriptor.
  manifest     BuildKit image-manifest variant: image manifest whose config is the cacheconfig.
  image        plain image manifest with an image config (linux/amd64).
  image-index  OCI index (Docker manifest list) holding one plain image manifest (linux/amd64).

Layers are real tar+gzip archives, each holding one file of --layer-size pseudo-random bytes
derived from --seed (same seed + index -> same layer on this machine). Every layer descriptor
carries annotations containerd.io/uncompressed and buildkit/createdat. The cache config is
what BuildKit writes (Go json: compact, `parent` omitted when 0 because of omitempty).

Stdout contract: one line `pushed 127.0.0.1:PORT/REPO:TAG@sha256:...` on success.
--out FILE gets {"manifest": {mediaType, digest, size}, "blobs": [{mediaType, digest, size,
role: layer|config|cacheconfig|manifest}], "ref": "127.0.0.1:PORT/REPO:TAG", "variant": ...};
"blobs" lists every blob an OCI layout of the tag needs, including the top-level manifest
itself and the child manifest of image-index (both role "manifest").

Separate mode: --corrupt-blob DIGEST --registry-dir DIR overwrites that blob's stored data in
the registry's filesystem storage with the same number of different bytes (every byte XOR 0xFF),
to simulate a server that lies. Stdout: `corrupted DIGEST PATH`.
Exit status is non-zero with a message on stderr on any failure.
"""
import argparse
import base64
import datetime
import gzip
import hashlib
import json
import os
import random
import re
import sys
import tarfile
import tempfile
import urllib.parse

import requests

CACHECONFIG = "application/vnd.buildkit.cacheconfig.v0"
MEDIA = {
    "oci": {"index": "application/vnd.oci.image.index.v1+json",
            "manifest": "application/vnd.oci.image.manifest.v1+json",
            "layer": "application/vnd.oci.image.layer.v1.tar+gzip",
            "config": "application/vnd.oci.image.config.v1+json"},
    "docker": {"index": "application/vnd.docker.distribution.manifest.list.v2+json",
               "manifest": "application/vnd.docker.distribution.manifest.v2+json",
               "layer": "application/vnd.docker.image.rootfs.diff.tar.gzip",
               "config": "application/vnd.docker.container.image.v1+json"},
}
INVERT = bytes(b ^ 0xFF for b in range(256))  # translate() table: byte XOR 0xFF
BASE_TIME = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def die(msg):
    sys.exit(f"seed_cache.py: {msg}")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def created_at(i: int) -> str:
    # RFC 3339 with nanoseconds, as Go's time.MarshalText writes it.
    return (BASE_TIME + datetime.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S") + ".123456789Z"


class HashWriter:
    """File-like sink that hashes and counts what passes through to `sink`."""
    def __init__(self, sink):
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self):
        pass


class RandomReader:
    """read(n) over `size` deterministic bytes; generated in fixed 1 MiB blocks so the content
    does not depend on how the caller chunks its reads."""
    def __init__(self, seed: str, size: int):
        self.rng, self.left, self.block, self.pos = random.Random(seed), size, b"", 0

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        parts = []
        while n > 0:
            if self.pos == len(self.block):
                self.block, self.pos = self.rng.randbytes(1 << 20), 0
            take = min(n, len(self.block) - self.pos)
            parts.append(self.block[self.pos:self.pos + take])
            self.pos += take
            n -= take
            self.left -= take
        return b"".join(parts)


def make_layer(seed: int, i: int, size: int, level: int):
    """-> (temp file, compressed digest, compressed size, uncompressed digest)."""
    tmp = tempfile.TemporaryFile()
    comp = HashWriter(tmp)
    # mtime=0 and no file name: a reproducible gzip header. Random data does not compress,
    # so the level only changes speed (level 1 deflates ~35 MB/s here, 0 = stored blocks).
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=comp, mtime=0, compresslevel=level)
    raw = HashWriter(gz)
    tar = tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT)
    info = tarfile.TarInfo(f"seed/layer{i}.bin")
    info.size, info.mtime, info.mode = size, int(BASE_TIME.timestamp()), 0o644
    info.uname = info.gname = "root"
    tar.addfile(info, RandomReader(f"ocicachefs:{seed}:{i}", size))
    tar.close()
    gz.close()
    tmp.flush()
    return tmp, "sha256:" + comp.hash.hexdigest(), comp.size, "sha256:" + raw.hash.hexdigest()


class Registry:
    """Minimal distribution-API client: handles Basic and Bearer (token) challenges."""
    def __init__(self, host, repo, user, password):
        self.base, self.repo = f"http://{host}", repo
        self.user, self.password = user, password
        self.session, self.authz = requests.Session(), None

    def authenticate(self, challenge: str):
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        creds = (self.user, self.password or "") if self.user else None
        if scheme == "basic":
            if not creds:
                die("registry wants Basic auth: pass --user/--password")
            self.authz = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        elif scheme == "bearer":
            # Always ask for pull,push on our repo, whatever scope the challenge names.
            query = {"service": params.get("service", ""),
                     "scope": f"repository:{self.repo}:pull,push"}
            r = self.session.get(params["realm"], params=query, auth=creds)
            if r.status_code != 200:
                die(f"token endpoint {params['realm']} answered {r.status_code}: {r.text[:200]}")
            body = r.json()
            self.authz = "Bearer " + (body.get("token") or body["access_token"])
        else:
            die(f"unsupported auth challenge: {challenge!r}")

    def request(self, method, url, body=None, headers=None):
        url = urllib.parse.urljoin(self.base + "/", url)  # Location may be relative
        for attempt in (1, 2):
            if hasattr(body, "seek"):
                body.seek(0)
            h = dict(headers or {})
            if self.authz:
                h["Authorization"] = self.authz
            r = self.session.request(method, url, data=body, headers=h, allow_redirects=False)
            if r.status_code == 401 and attempt == 1:
                self.authenticate(r.headers.get("WWW-Authenticate", ""))
                continue
            return r

    def expect(self, r, *codes):
        if r.status_code not in codes:
            die(f"{r.request.method} {r.url} -> {r.status_code}: {r.text[:300]}")
        return r

    def push_blob(self, digest, body):
        path = f"/v2/{self.repo}/blobs/"
        if self.request("HEAD", path + digest).status_code == 200:
            return  # already there (re-seeding, or shared between variants)
        r = self.expect(self.request("POST", path + "uploads/"), 202)
        loc = urllib.parse.urljoin(self.base + "/", r.headers["Location"])
        loc += ("&" if "?" in loc else "?") + "digest=" + digest  # Location may carry a query
        self.expect(self.request("PUT", loc, body, {"Content-Type": "application/octet-stream"}), 201)

    def push_manifest(self, ref, media_type, data, digest):
        r = self.expect(self.request("PUT", f"/v2/{self.repo}/manifests/{ref}", data,
                                     {"Content-Type": media_type}), 201)
        if r.headers.get("Docker-Content-Digest") not in (None, digest):
            die(f"registry computed {r.headers['Docker-Content-Digest']}, expected {digest}")


def corrupt(digest, registry_dir):
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        die(f"bad digest {digest!r}")
    path = os.path.join(registry_dir, "docker/registry/v2/blobs/sha256", hexpart[:2], hexpart, "data")
    if not os.path.isfile(path):
        die(f"no stored blob at {path}")
    with open(path, "r+b") as f:
        while True:
            pos, chunk = f.tell(), f.read(1 << 20)
            if not chunk:
                break
            f.seek(pos)
            f.write(chunk.translate(INVERT))  # same length, every byte different
    print(f"corrupted {digest} {path}", flush=True)


def build_and_push(args):
    mt = MEDIA["docker" if args.docker_media_types else "oci"]
    reg = Registry(args.registry, args.repo, args.user, args.password)
    reg.expect(reg.request("GET", "/v2/"), 200)  # authenticate once before streaming bodies
    blobs = []  # summary entries, in push order

    layers = []
    for i in range(args.layers):
        tmp, digest, size, diff_id = make_layer(args.seed, i, args.layer_size, args.gzip_level)
        reg.push_blob(digest, tmp)
        tmp.close()
        layers.append({"mediaType": mt["layer"], "digest": digest, "size": size,
                       "annotations": {"buildkit/createdat": created_at(i),
                                       "containerd.io/uncompressed": diff_id}})
        blobs.append({"mediaType": mt["layer"], "digest": digest, "size": size, "role": "layer"})

    def push_json_blob(obj, media_type, role, indent=None):
        data = json.dumps(obj, indent=indent, separators=None if indent else (",", ":")).encode()
        desc = {"mediaType": media_type, "digest": sha(data), "size": len(data)}
        reg.push_blob(desc["digest"], data)
        blobs.append(dict(desc, role=role))
        return desc

    if args.variant in ("index", "manifest"):
        cfg_layers, records = [], []
        for i, layer in enumerate(layers):
            entry = {"blob": layer["digest"]}
            if i - 1 != 0:  # Go's omitempty drops parent 0, exactly as BuildKit does
                entry["parent"] = i - 1
            cfg_layers.append(entry)
            rec = {"layers": [{"layer": i, "createdAt": created_at(i)}],
                   "digest": sha(f"ocicachefs-record:{args.seed}:{i}".encode())}
            if i > 0:
                rec["inputs"] = [[{"link": i - 1}]]
            records.append(rec)
        cfg = push_json_blob({"layers": cfg_layers, "records": records}, CACHECONFIG, "cacheconfig")
        if args.variant == "index":
            top_type = mt["index"]
            top = {"schemaVersion": 2, "mediaType": top_type, "manifests": layers + [cfg]}
        else:
            top_type = mt["manifest"]
            top = {"schemaVersion": 2, "mediaType": top_type, "config": cfg, "layers": layers}
        top_data = json.dumps(top, separators=(",", ":")).encode()  # BuildKit: compact json
    else:
        diff_ids = [l["annotations"]["containerd.io/uncompressed"] for l in layers]
        config = {"created": created_at(len(layers)), "architecture": "amd64", "os": "linux",
                  "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                             "Cmd": ["/bin/sh"], "WorkingDir": "/"},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids},
                  "history": [{"created": created_at(i), "created_by": f"seed_cache.py layer {i}"}
                              for i in range(len(layers))]}
        cfg = push_json_blob(config, mt["config"], "config", indent=2)
        manifest = {"schemaVersion": 2, "mediaType": mt["manifest"], "config": cfg, "layers": layers}
        # Image exporters usually indent: a good test that bytes are served as stored.
        man_data = json.dumps(manifest, indent=2).encode()
        if args.variant == "image":
            top_type, top_data = mt["manifest"], man_data
        else:
            man_desc = {"mediaType": mt["manifest"], "digest": sha(man_data), "size": len(man_data)}
            reg.push_manifest(man_desc["digest"], mt["manifest"], man_data, man_desc["digest"])
            blobs.append(dict(man_desc, role="manifest"))
            top_type = mt["index"]
            top = {"schemaVersion": 2, "mediaType": top_type,
                   "manifests": [dict(man_desc, platform={"architecture": "amd64", "os": "linux"})]}
            top_data = json.dumps(top, indent=2).encode()

    top_desc = {"mediaType": top_type, "digest": sha(top_data), "size": len(top_data)}
    reg.push_manifest(args.tag, top_type, top_data, top_desc["digest"])
    blobs.append(dict(top_desc, role="manifest"))

    # Verify: the tag resolves to our bytes, and every non-manifest blob has the right size.
    r = reg.expect(reg.request("GET", f"/v2/{args.repo}/manifests/{args.tag}",
                               headers={"Accept": top_type}), 200)
    if sha(r.content) != top_desc["digest"] or r.headers.get("Docker-Content-Digest") != top_desc["digest"]:
        die(f"manifest verification failed: got {sha(r.content)} "
            f"(header {r.headers.get('Docker-Content-Digest')}), want {top_desc['digest']}")
    for b in blobs:
        if b["role"] != "manifest":
            r = reg.expect(reg.request("HEAD", f"/v2/{args.repo}/blobs/{b['digest']}"), 200)
            if int(r.headers.get("Content-Length", -1)) != b["size"]:
                die(f"blob {b['digest']} has size {r.headers.get('Content-Length')}, want {b['size']}")

    ref = f"{args.registry}/{args.repo}:{args.tag}"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"manifest": top_desc, "blobs": blobs, "ref": ref, "variant": args.variant},
                      f, indent=2)
            f.write("\n")
    print(f"pushed {ref}@{top_desc['digest']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", metavar="127.0.0.1:PORT")
    ap.add_argument("--repo", metavar="NAME")
    ap.add_argument("--tag", default="cache")
    ap.add_argument("--variant", choices=["index", "manifest", "image-index", "image"], default="index")
    ap.add_argument("--docker-media-types", action="store_true",
                    help="Docker v2 media types (manifest list, schema2, rootfs.diff.tar.gzip)")
    ap.add_argument("--layers", type=int, default=2, help="number of layers (default 2)")
    ap.add_argument("--layer-size", type=int, default=1 << 20,
                    help="bytes of random content per layer (default 1 MiB)")
    ap.add_argument("--seed", type=int, default=1, help="content seed (default 1)")
    ap.add_argument("--gzip-level", type=int, default=1, choices=range(10), metavar="0-9",
                    help="gzip level (default 1; 0 is much faster for big layers; "
                         "changes the digests)")
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--out", metavar="FILE", help="write the JSON summary here")
    ap.add_argument("--corrupt-blob", metavar="DIGEST", help="corrupt mode: blob to overwrite")
    ap.add_argument("--registry-dir", metavar="DIR", help="corrupt mode: the registry's --dir")
    args = ap.parse_args()
    if args.corrupt_blob:
        if not args.registry_dir:
            ap.error("--corrupt-blob needs --registry-dir")
        return corrupt(args.corrupt_blob, args.registry_dir)
    if not args.registry or not args.repo:
        ap.error("--registry and --repo are required")
    if args.layers < 0 or args.layer_size < 0:
        ap.error("--layers and --layer-size must be >= 0")
    try:
        build_and_push(args)
    except requests.RequestException as e:
        die(f"HTTP error: {e}")


if __name__ == "__main__":
    main()
