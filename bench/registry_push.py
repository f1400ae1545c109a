#!/usr/bin/env python3
"""Push benchmark caches straight through the distribution API (no tar, no gzip).

The cache is BuildKit's index variant: an OCI image index whose manifests[] are the layer
descriptors plus one application/vnd.buildkit.cacheconfig.v0 blob. Layers are opaque
deterministic pseudo-random bytes (same --seed and size -> same digest); nothing in a mount
benchmark unpacks them.

  big  --size BYTES   one layer, streamed to the registry in a chunked PATCH while its digest
                      is computed (no temporary file: a 4 GiB layer costs only the registry's copy)
  many --count N --size BYTES
                      N small layers, pushed by a few threads (monolithic POST+PUT each)
  chains --chains K --sizes A,B,C [--tag-prefix P]
                      K tags P0..P(K-1) in one repository, each an index whose layers are a
                      chain of sizes A, B, C... (streamed like big; no layer shared)
  wide --count N --per-manifest M --storage DIR
                      N small layers (a few hundred bytes, sizes vary) in BuildKit's image-manifest
                      variant: image manifests of at most M layers each, their config a cache
                      config chaining the layers; more than M layers go into several such
                      manifests under one OCI index (ocicachefs refuses any manifest or config
                      over 4 MiB, so no single document can name 100,000 layers). The layer
                      blobs are written straight into the registry's filesystem storage DIR
                      (what a push leaves there: blobs/sha256/XX/HEX/data and the repository's
                      _layers link), since 100,000 pushes take minutes; configs, manifests and
                      the index go through the API, and the registry checks on each manifest
                      PUT that every layer it names exists.

Stdout: the JSON {"ref", "manifest": {...}, "layers": [{digest, size}...], "seconds"}
(also written to --out FILE). Loopback registries without auth only.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import sys
import threading
import time
import urllib.parse

import requests

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
CACHECONFIG = "application/vnd.buildkit.cacheconfig.v0"
CHUNK = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pusher:
    def __init__(self, registry: str, repo: str):
        self.base, self.repo = f"http://{registry}", repo
        self.local = threading.local()

    def session(self):
        # One keep-alive session per thread (requests.Session is not thread-safe).
        if not hasattr(self.local, "s"):
            self.local.s = requests.Session()
        return self.local.s

    def url(self, location: str) -> str:
        return urllib.parse.urljoin(self.base + "/", location)

    def check(self, r, *codes):
        if r.status_code not in codes:
            sys.exit(f"registry_push.py: {r.request.method} {r.url} -> {r.status_code}: {r.text[:300]}")
        return r

    def start_upload(self):
        r = self.check(self.session().post(self.url(f"/v2/{self.repo}/blobs/uploads/")), 202)
        return self.url(r.headers["Location"])

    def finish(self, location, digest, body=b""):
        loc = location + ("&" if "?" in location else "?") + "digest=" + urllib.parse.quote(digest)
        self.check(self.session().put(loc, data=body,
                                      headers={"Content-Type": "application/octet-stream"}), 201)

    def push_bytes(self, data: bytes, media_type=LAYER) -> dict:
        digest = sha(data)
        self.finish(self.start_upload(), digest, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def push_stream(self, size: int, seed: int) -> dict:
        """One chunked PATCH of `size` pseudo-random bytes, hashed on the way."""
        rng, h = random.Random(f"ocicachefs-bench:{seed}"), hashlib.sha256()

        def body():
            left = size
            while left:
                block = rng.randbytes(min(CHUNK, left))
                h.update(block)
                left -= len(block)
                yield block

        location = self.start_upload()
        r = self.check(self.session().patch(location, data=body(),
                                            headers={"Content-Type": "application/octet-stream"}), 202)
        digest = "sha256:" + h.hexdigest()
        self.finish(self.url(r.headers["Location"]), digest)
        return {"mediaType": LAYER, "digest": digest, "size": size}

    def push_index(self, tag: str, layers: list) -> dict:
        described = []
        for layer in layers:
            described.append(dict(layer, annotations={
                "buildkit/createdat": "2024-05-01T12:00:00.000000000Z",
                # Opaque bytes: the "uncompressed" digest is the blob's own.
                "containerd.io/uncompressed": layer["digest"]}))
        cfg_layers = []
        for i, layer in enumerate(layers):
            entry = {"blob": layer["digest"]}
            if i - 1 != 0:
                entry["parent"] = i - 1
            cfg_layers.append(entry)
        records = [{"layers": [{"layer": i, "createdAt": "2024-05-01T12:00:00.000000000Z"}],
                    "digest": sha(f"bench-record:{i}".encode())} for i in range(len(layers))]
        cfg = json.dumps({"layers": cfg_layers, "records": records}, separators=(",", ":")).encode()
        cfg_desc = self.push_bytes(cfg, CACHECONFIG)
        index = json.dumps({"schemaVersion": 2, "mediaType": INDEX,
                            "manifests": described + [cfg_desc]}, separators=(",", ":")).encode()
        r = self.check(self.session().put(self.url(f"/v2/{self.repo}/manifests/{tag}"), data=index,
                                          headers={"Content-Type": INDEX}), 201)
        digest = sha(index)
        if r.headers.get("Docker-Content-Digest") not in (None, digest):
            sys.exit(f"registry_push.py: registry computed {r.headers['Docker-Content-Digest']}, expected {digest}")
        return {"mediaType": INDEX, "digest": digest, "size": len(index)}


def push_big(registry, repo, tag, size, seed):
    p = Pusher(registry, repo)
    layer = p.push_stream(size, seed)
    return {"ref": f"{registry}/{repo}:{tag}", "manifest": p.push_index(tag, [layer]), "layers": [layer]}


def push_many(registry, repo, tag, count, size, seed, threads=8):
    p = Pusher(registry, repo)
    datas = []
    for i in range(count):
        rng = random.Random(f"ocicachefs-bench-small:{seed}:{i}")
        datas.append(rng.randbytes(size))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        layers = list(pool.map(p.push_bytes, datas))
    return {"ref": f"{registry}/{repo}:{tag}", "manifest": p.push_index(tag, layers), "layers": layers}


def push_chains(registry, repo, prefix, chains, sizes, seed):
    p = Pusher(registry, repo)
    tags = {}
    for k in range(chains):
        layers = [p.push_stream(size, seed * 1000 + k * 100 + i) for i, size in enumerate(sizes)]
        tag = f"{prefix}{k}"
        tags[tag] = {"ref": f"{registry}/{repo}:{tag}", "manifest": p.push_index(tag, layers), "layers": layers}
    return {"tags": tags}


def wide_layer(seed: int, i: int) -> bytes:
    """Layer i of a wide cache: 256-767 deterministic bytes."""
    block = hashlib.sha256(f"ocicachefs-bench-wide:{seed}:{i}".encode()).digest()
    return (block * 24)[:256 + i % 512]


def write_stored_blob(storage: str, repo: str, data: bytes) -> dict:
    """Stores a blob as distribution's filesystem driver does after a push: the content under
    blobs/ and a link in the repository (the registry is not asked for it before its manifest)."""
    digest = sha(data)
    hexd = digest.split(":", 1)[1]
    v2 = os.path.join(storage, "docker/registry/v2")
    for directory, name, body in ((os.path.join(v2, "blobs/sha256", hexd[:2], hexd), "data", data),
                                  (os.path.join(v2, "repositories", repo, "_layers/sha256", hexd), "link", digest.encode())):
        try:
            os.mkdir(directory)
        except FileNotFoundError:
            os.makedirs(directory)
        except FileExistsError:
            pass
        with open(os.path.join(directory, name), "wb") as f:
            f.write(body)
    return {"mediaType": LAYER, "digest": digest, "size": len(data)}


def push_wide(registry, repo, tag, count, per_manifest, storage, seed):
    p = Pusher(registry, repo)
    layers = [write_stored_blob(storage, repo, wide_layer(seed, i)) for i in range(count)]
    manifests, configs = [], []
    for start in range(0, count, per_manifest):
        part = layers[start:start + per_manifest]
        # The cache config of BuildKit's image-manifest variant: one chain over the part's
        # layers (parent omitted for 0, as Go's omitempty writes it; -1 for the base) and one
        # record naming its tip.
        cfg_layers = [{"blob": l["digest"], **({"parent": i - 1} if i != 1 else {})} for i, l in enumerate(part)]
        cfg = json.dumps({"layers": cfg_layers, "records": [{"layers": [{"layer": len(part) - 1}],
                          "digest": sha(f"bench-wide-record:{seed}:{start}".encode())}]}, separators=(",", ":")).encode()
        configs.append(p.push_bytes(cfg, CACHECONFIG))
        body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": configs[-1],
                           "layers": part}, separators=(",", ":")).encode()
        ref = tag if count <= per_manifest else sha(body)
        p.check(p.session().put(p.url(f"/v2/{repo}/manifests/{ref}"), data=body, headers={"Content-Type": MANIFEST}), 201)
        manifests.append({"mediaType": MANIFEST, "digest": sha(body), "size": len(body)})
    top = manifests[0]
    if count > per_manifest:
        body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}, separators=(",", ":")).encode()
        p.check(p.session().put(p.url(f"/v2/{repo}/manifests/{tag}"), data=body, headers={"Content-Type": INDEX}), 201)
        top = {"mediaType": INDEX, "digest": sha(body), "size": len(body)}
    return {"ref": f"{registry}/{repo}:{tag}", "manifest": top, "manifests": manifests, "configs": configs, "layers": layers}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["big", "many", "chains", "wide"])
    ap.add_argument("--registry", required=True, metavar="127.0.0.1:PORT")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--tag", default="bench")
    ap.add_argument("--size", type=int, help="bytes per layer (big, many)")
    ap.add_argument("--chains", type=int, default=10, help="tags (mode chains)")
    ap.add_argument("--sizes", help="comma-separated layer sizes of each chain (mode chains)")
    ap.add_argument("--tag-prefix", default="ci-")
    ap.add_argument("--count", type=int, default=1, help="layers (modes many, wide)")
    ap.add_argument("--per-manifest", type=int, default=20000, help="layers per image manifest (mode wide)")
    ap.add_argument("--storage", help="the registry's filesystem storage root (mode wide)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", metavar="FILE")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.mode == "chains":
        sizes = [int(x) for x in (args.sizes or "").split(",") if x]
        if not sizes:
            sys.exit("registry_push.py: chains needs --sizes")
        result = push_chains(args.registry, args.repo, args.tag_prefix, args.chains, sizes, args.seed)
    elif args.mode == "wide":
        if not args.storage:
            sys.exit("registry_push.py: wide needs --storage")
        result = push_wide(args.registry, args.repo, args.tag, args.count, args.per_manifest, args.storage, args.seed)
    elif not args.size:
        sys.exit("registry_push.py: big and many need --size")
    elif args.mode == "big":
        result = push_big(args.registry, args.repo, args.tag, args.size, args.seed)
    else:
        result = push_many(args.registry, args.repo, args.tag, args.count, args.size, args.seed)
    result["seconds"] = round(time.perf_counter() - start, 3)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if args.mode not in ("many", "wide") else json.dumps({k: v for k, v in result.items() if k != "layers"}))


if __name__ == "__main__":
    main()
