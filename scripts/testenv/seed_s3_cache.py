#!/usr/bin/env python3
"""Upload a cache in BuildKit's exact S3 layout (what `--cache-to type=s3` writes).

Objects: `<prefix>blobs/sha256:<hex>` for every layer, and `<prefix>manifests/<name>` for
each name: a BuildKit cache config whose layers carry the annotations BuildKit's S3 exporter
writes (mediaType, diffID, size, createdAt). Layers are real gzip'd tars of deterministic
pseudo-random content.

Prints `seeded s3://BUCKET/PREFIX` and, with --out, a JSON summary:
{"names": [...], "manifest_objects": {name: {"key", "digest", "size"}},
 "layers": [{"digest", "size", "diffID", "key"}]}
"""
import argparse
import gzip
import hashlib
import io
import json
import random
import tarfile

import boto3
from botocore.config import Config


def make_layer(index, size, seed):
    rng = random.Random(seed * 1000 + index)
    payload = rng.randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"seed/layer{index}.bin")
        info.size = len(payload)
        info.mtime = 1714564800
        tar.addfile(info, io.BytesIO(payload))
    uncompressed = raw.getvalue()
    compressed = gzip.compress(uncompressed, compresslevel=1, mtime=0)
    return compressed, "sha256:" + hashlib.sha256(uncompressed).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--name", default="buildkit", help="one or more names separated by ';'")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--layer-size", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--omit-size", action="store_true", help="leave out the size annotations")
    parser.add_argument("--access-key", default="testing")
    parser.add_argument("--secret-key", default="testing")
    parser.add_argument("--out")
    args = parser.parse_args()

    s3 = boto3.client("s3", endpoint_url=args.endpoint, region_name=args.region,
                      aws_access_key_id=args.access_key, aws_secret_access_key=args.secret_key,
                      config=Config(s3={"addressing_style": "path"}))
    try:
        if args.region == "us-east-1":
            s3.create_bucket(Bucket=args.bucket)
        else:
            s3.create_bucket(Bucket=args.bucket, CreateBucketConfiguration={"LocationConstraint": args.region})
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass

    layers = []
    config_layers = []
    for index in range(args.layers):
        blob, diff_id = make_layer(index, args.layer_size, args.seed)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        key = f"{args.prefix}blobs/{digest}"
        s3.put_object(Bucket=args.bucket, Key=key, Body=blob)
        layers.append({"digest": digest, "size": len(blob), "diffID": diff_id, "key": key})
        annotations = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "diffID": diff_id,
                       "createdAt": "2025-06-01T10:00:00Z"}
        if not args.omit_size:
            annotations["size"] = len(blob)
        entry = {"blob": digest, "annotations": annotations}
        if index == 0:
            entry["parent"] = -1
        elif index > 1:
            entry["parent"] = index - 1  # BuildKit omits parent 0 (omitempty)
        config_layers.append(entry)
    records = [{"digest": "sha256:" + hashlib.sha256(f"record{i}".encode()).hexdigest(),
                "layers": [{"layer": i, "createdAt": "2025-06-01T10:00:00Z"}],
                **({"inputs": [[{"link": i - 1}]]} if i else {})} for i in range(args.layers)]
    config = json.dumps({"layers": config_layers, "records": records}, separators=(",", ":")).encode()

    manifests = {}
    for name in [n for n in args.name.split(";") if n]:
        key = f"{args.prefix}manifests/{name}"
        s3.put_object(Bucket=args.bucket, Key=key, Body=config)
        manifests[name] = {"key": key, "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)}

    print(f"seeded s3://{args.bucket}/{args.prefix}", flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"names": list(manifests), "manifest_objects": manifests, "layers": layers}, out, indent=1)


if __name__ == "__main__":
    main()
