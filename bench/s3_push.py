#!/usr/bin/env python3
"""Upload benchmark caches in BuildKit's S3 layout (what `--cache-to type=s3` writes), for the
benchmark's S3 parts. Same layout as scripts/testenv/seed_s3_cache.py (`blobs/sha256:<hex>`
objects and one `manifests/<name>` cache config per name, with BuildKit's per-layer
annotations), but the layers are opaque deterministic pseudo-random bytes (same seed and size
-> same digest) streamed by multipart upload, so a 1 GiB layer needs no 1 GiB buffer and no
gzip; nothing in a mount benchmark unpacks them.

  big    --size BYTES --name N --seed S      one layer under one name
  chains --chains K --sizes A,B,C --name-prefix P --seed S
                                             K names P0..P(K-1), each a chain of layers of
                                             sizes A, B, C... (parent first); no layer shared

Stdout and --out FILE: JSON {"bucket", "names": {name: {"key", "digest", "size",
"layers": [{digest, size, key}]}}, "seconds"}.
"""
import argparse
import hashlib
import json
import random
import sys
import time

import boto3
from botocore.config import Config

PART = 64 << 20
BLOCK = 1 << 20
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def blocks(size, seed):
    rng = random.Random(f"ocicachefs-bench-s3:{seed}")
    left = size
    while left:
        b = rng.randbytes(min(BLOCK, left))
        left -= len(b)
        yield b


def digest_of(size, seed):
    h = hashlib.sha256()
    for b in blocks(size, seed):
        h.update(b)
    return "sha256:" + h.hexdigest()


def put_layer(s3, bucket, size, seed):
    digest = digest_of(size, seed)
    key = f"blobs/{digest}"
    if size <= PART:
        s3.put_object(Bucket=bucket, Key=key, Body=b"".join(blocks(size, seed)))
    else:
        up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts, buf, h = [], bytearray(), hashlib.sha256()

        def flush():
            n = len(parts) + 1
            r = s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=n, Body=bytes(buf))
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
            buf.clear()
        for b in blocks(size, seed):
            h.update(b)
            buf += b
            if len(buf) >= PART:
                flush()
        if buf:
            flush()
        if "sha256:" + h.hexdigest() != digest:
            sys.exit("s3_push.py: the pseudo-random stream is not deterministic")
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up, MultipartUpload={"Parts": parts})
    return {"digest": digest, "size": size, "key": key}


def put_manifest(s3, bucket, name, layers):
    config_layers = []
    for i, layer in enumerate(layers):
        entry = {"blob": layer["digest"], "annotations": {
            "mediaType": LAYER_TYPE, "diffID": layer["digest"], "size": layer["size"],
            "createdAt": "2025-06-01T10:00:00Z"}}
        if i == 0:
            entry["parent"] = -1
        elif i > 1:
            entry["parent"] = i - 1      # BuildKit omits parent 0 (omitempty)
        config_layers.append(entry)
    records = [{"digest": "sha256:" + hashlib.sha256(f"bench-record:{name}:{i}".encode()).hexdigest(),
                "layers": [{"layer": i, "createdAt": "2025-06-01T10:00:00Z"}],
                **({"inputs": [[{"link": i - 1}]]} if i else {})} for i in range(len(layers))]
    config = json.dumps({"layers": config_layers, "records": records}, separators=(",", ":")).encode()
    key = f"manifests/{name}"
    s3.put_object(Bucket=bucket, Key=key, Body=config)
    return {"key": key, "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config),
            "layers": layers}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["big", "chains"])
    ap.add_argument("--endpoint", required=True, help="http://127.0.0.1:PORT (moto itself, not a cache)")
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--size", type=int, help="bytes (mode big)")
    ap.add_argument("--name", default="big", help="name (mode big)")
    ap.add_argument("--chains", type=int, default=10)
    ap.add_argument("--sizes", help="comma-separated layer sizes in bytes (mode chains)")
    ap.add_argument("--name-prefix", default="ci-")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    start = time.perf_counter()
    s3 = boto3.client("s3", endpoint_url=args.endpoint, region_name=args.region,
                      aws_access_key_id="testing", aws_secret_access_key="testing",
                      config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
    try:
        s3.create_bucket(Bucket=args.bucket)
    except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        pass
    names = {}
    if args.mode == "big":
        if not args.size:
            sys.exit("s3_push.py: big needs --size")
        names[args.name] = put_manifest(s3, args.bucket, args.name, [put_layer(s3, args.bucket, args.size, args.seed)])
    else:
        sizes = [int(x) for x in (args.sizes or "").split(",") if x]
        if not sizes:
            sys.exit("s3_push.py: chains needs --sizes")
        for k in range(args.chains):
            name = f"{args.name_prefix}{k}"
            layers = [put_layer(s3, args.bucket, size, args.seed * 1000 + k * 100 + i) for i, size in enumerate(sizes)]
            names[name] = put_manifest(s3, args.bucket, name, layers)
    result = {"bucket": args.bucket, "names": names, "seconds": round(time.perf_counter() - start, 3)}
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
