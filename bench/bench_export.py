"""The benchmark's `export` part (issue 14, writable mounts), driven by bench.py: what a client
exporting a cache into a `--writable` mount costs until the remote holds it, against plain
uploads of the same bytes to the same endpoint.

  1. Export of a cache of 8 random layers (args.size in all: 1 GiB, 256 MiB with --quick) into a
     fresh writable mount, replaying buildctl's `type=local` export (bench/export_replay.py), to
     the registry and to S3: time from the export's first operation until `ocicachefs unmount`
     returns (it returns once the tag is published), against `curl` uploads of the same blobs,
     8 at once, then the tag (registry: POST + monolithic PUT per blob, then the manifest PUT;
     S3: PutObject per object, then `manifests/<name>`). Target: ≥ 0.8× curl's throughput.
  2. Re-export of that cache through a fresh writable mount on a fresh cache directory, as an
     unchanged re-export (same manifest) and as a fresh BuildKit re-exports it (same layers, a new
     cache config and manifest): requests and bytes sent. Target: no blob bytes, one manifest PUT.
  3. The CI job with its export: a cache of 10 tags (2 GiB; 256 MiB with --quick), the job mounts
     it writable, imports one tag's chain (a tenth), exports two new layers and the tag, unmounts;
     against restoring and saving the whole directory as a CI cache action does (download
     everything, the same import and export on the local copy, upload everything).

The registry is the docker-registry run.sh started; S3 is moto behind the caching nginx (uploads
pass through it: run.sh lets it take bodies of any size and stream them, and logs each request's
length to cache.upload.log). Layers are fresh random bytes in every run, so no upload finds its
blob already on the remote.
"""
import calendar
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

import boto3
from botocore.config import Config

import bench_s3
from bench_s3 import fmt_bytes, fmt_s, fmt_size_name, med, spread

HERE = os.path.dirname(os.path.abspath(__file__))
REPLAY = os.path.join(HERE, "export_replay.py")
MiB = 1 << 20
LAYERS = 8                      # item 1: the cache is this many layers of args.size / LAYERS
CURL_PARALLEL = 8               # item 1: curls at once
NEW_LAYERS_MIB = (64, 64)       # item 3: what the CI job exports (divided by --ci-scale)
CI_TAG = f"ci-{bench_s3.CI_TAG}"
REPO, CI_REPO = "bench/export", "bench/ci-export"
BUCKET, CI_BUCKET = "bench-export", "bench-ci-export"
REGION, KEY_ID, SECRET = bench_s3.REGION, bench_s3.KEY_ID, bench_s3.SECRET
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CACHECONFIG = "application/vnd.buildkit.cacheconfig.v0"
ACCEPT = "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
CREATED = "2026-01-01T00:00:00Z"
REGISTRY_LINE = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')
# run.sh's `upload` log format: method, $uri, "$args", status, $request_length, $body_bytes_sent,
# $request_time, $msec.
UPLOAD_LINE = re.compile(r'^(\S+) (\S+) "([^"]*)" (\d{3}) (\d+) (\d+) ([\d.]+) ([\d.]+)$')
# The registry's own line per request (logrus): when it ended and how long it took.
LOGRUS_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')
GO_DURATION = re.compile(r'([\d.]+)(ns|µs|us|ms|s|m|h)')
GO_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
TARGETS = ("registry", "s3")
# The publishers' defaults: the upload queue's 4 workers; blobs above `--upload-cutoff` (256 MiB)
# go in 16 MiB pieces: RegistryPublisher's PATCHes, S3Publisher's parts, 4 at once.
UPLOADS_AT_ONCE, PIECE = 4, 16 * MiB
PIECES_ABOVE = {"registry": 256 * MiB, "s3": 256 * MiB}
MULTIPART_PARTS = 4
TARGET_RATIO = 0.8


def fmt_rate(nbytes, s):
    r = nbytes / s
    return f"{r / 1e9:.2f} GB/s" if r >= 1e9 else f"{r / 1e6:.0f} MB/s"


def go_duration(text):
    return sum(float(n) * GO_UNITS[u] for n, u in GO_DURATION.findall(text))


def rfc3339_seconds(text):
    """'2026-12-02T20:44:50.542709075Z' as seconds since the epoch."""
    whole, _, frac = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + (float("0." + frac) if frac else 0.0)


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BenchFailure(Exception):
    pass


# ---------------------------------------------------------------- what gets exported

def random_layers(directory, label, sizes):
    """Files of fresh random bytes, one per size: [{digest, size, src, mediaType}]."""
    os.makedirs(directory, exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        path = os.path.join(directory, f"{label}-layer{i}")
        h, left = hashlib.sha256(), size
        with open(path, "wb") as f:
            while left:
                piece = os.urandom(min(8 * MiB, left))
                h.update(piece)
                f.write(piece)
                left -= len(piece)
        out.append({"digest": "sha256:" + h.hexdigest(), "size": size, "src": path, "mediaType": LAYER_TYPE})
    return out


def layer_descriptor(layer):
    # Opaque bytes: the "uncompressed" digest (BuildKit's diffID) is the blob's own.
    return {"mediaType": layer.get("mediaType", LAYER_TYPE), "digest": layer["digest"], "size": layer["size"],
            "annotations": {"buildkit/createdat": CREATED, "containerd.io/uncompressed": layer["digest"]}}


def cache_config(layers, salt):
    """A BuildKit cache config chaining the layers, parent first; `salt` changes its records
    (what a fresh BuildKit writes differs from the last export even when the layers do not)."""
    entries = []
    for i, layer in enumerate(layers):
        entry = {"blob": layer["digest"]}
        if i == 0:
            entry["parent"] = -1
        elif i > 1:
            entry["parent"] = i - 1        # BuildKit omits parent 0 (omitempty)
        entries.append(entry)
    records = [{"digest": sha(f"bench-export-record:{salt}:{i}".encode()),
                "layers": [{"layer": i, "createdAt": CREATED}], **({"inputs": [[{"link": i - 1}]]} if i else {})}
               for i in range(len(layers))]
    return json.dumps({"layers": entries, "records": records}, separators=(",", ":")).encode()


def s3_manifest_object(layers, salt):
    """The `manifests/<name>` object of BuildKit's S3 cache: the cache config with each layer's
    descriptor in its annotations."""
    config = json.loads(cache_config(layers, salt))
    for entry, layer in zip(config["layers"], layers):
        entry["annotations"] = {"mediaType": layer.get("mediaType", LAYER_TYPE), "diffID": layer["digest"],
                                "size": layer["size"], "createdAt": CREATED}
    return json.dumps(config, separators=(",", ":")).encode()


def write_plan(directory, label, layers, tag, salt):
    """The config and image manifest over `layers`, as files, and the replay's plan (written to
    DIR/LABEL.plan.json): {"path", "plan", "config", "manifest"} (config and manifest: descriptor
    plus bytes)."""
    config_bytes = cache_config(layers, salt)
    config = {"mediaType": CACHECONFIG, "digest": sha(config_bytes), "size": len(config_bytes)}
    manifest_bytes = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config,
                                 "layers": [layer_descriptor(l) for l in layers]}, separators=(",", ":")).encode()
    manifest = {"mediaType": MANIFEST_TYPE, "digest": sha(manifest_bytes), "size": len(manifest_bytes)}
    small = []
    for name, data, desc in (("config", config_bytes, config), ("manifest", manifest_bytes, manifest)):
        path = os.path.join(directory, f"{label}-{name}")
        with open(path, "wb") as f:
            f.write(data)
        small.append({"digest": desc["digest"], "size": desc["size"], "src": path})
    plan = {"layers": [{"digest": l["digest"], "size": l["size"], "src": l.get("src", "")} for l in layers],
            "blobs": small, "tag": tag, "manifest": manifest}
    path = os.path.join(directory, f"{label}.plan.json")
    with open(path, "w") as f:
        json.dump(plan, f)
    return {"path": path, "plan": plan, "layers": layers, "config": dict(config, bytes=config_bytes),
            "manifest": dict(manifest, bytes=manifest_bytes), "salt": salt}


# ---------------------------------------------------------------- the remotes

class Registry:
    name = "registry"

    def moto_cpu(self):
        return 0.0

    def __init__(self, bench, repo):
        self.b, self.repo = bench, repo
        self.base = f"http://{bench.registry}/v2/{repo}"

    def source(self, tag):
        return f"type=registry,ref={self.b.registry}/{self.repo}:{tag}"

    def offset(self):
        return os.path.getsize(self.b.reg_log)

    def server_cpu(self):
        return self.b.cpu_of(self.b.a.registry_pid)

    def traffic(self, since, sizes, manifest_sizes):
        """What the registry's access log shows after `since`, for this repository: requests by
        'METHOD kind STATUS', bytes of GET responses (down), and bytes sent up: the sizes of the
        blobs whose upload completed (digest in the closing PUT; the log has no request sizes)
        plus the manifests PUT (their sizes by tag from `manifest_sizes`)."""
        with open(self.b.reg_log, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        t = {"requests": {}, "count": 0, "down": 0, "up": 0, "uploaded": [], "manifest_puts": 0, "spans": []}
        prefix = f"/v2/{self.repo}/"
        for line in text.splitlines():
            if 'msg="response completed"' not in line:
                continue
            f = {k: v.strip('"') for k, v in LOGRUS_FIELD.findall(line)}
            uri, method = f.get("http.request.uri", ""), f.get("http.request.method")
            if not uri.startswith(prefix) or "time" not in f:
                continue
            end = rfc3339_seconds(f["time"])
            span = (end - go_duration(f.get("http.response.duration", "0s")), end)
            if "/blobs/uploads" in uri and method in ("POST", "PATCH", "PUT"):
                t["spans"].append(("blob",) + span)
            elif "/manifests/" in uri and method == "PUT":
                t["spans"].append(("tag",) + span)
        for m in REGISTRY_LINE.finditer(text):
            method, path, status, nbytes = m.groups()
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            kind = "uploads" if rest.startswith("blobs/uploads") else rest.split("/", 1)[0]
            key = f"{method} {kind} {status}"
            t["requests"][key] = t["requests"].get(key, 0) + 1
            t["count"] += 1
            if method == "GET" and status in ("200", "206") and nbytes != "-":
                t["down"] += int(nbytes)
            if method == "PUT" and kind == "uploads" and status == "201":
                digest = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("digest", [""])[0]
                if digest not in sizes:
                    raise BenchFailure(f"the registry completed an upload of {digest!r}, which this run did not make")
                t["uploaded"].append(digest)
                t["up"] += sizes[digest]
            if method == "PUT" and kind == "manifests" and status == "201":
                t["manifest_puts"] += 1
                t["up"] += manifest_sizes[rest.split("/", 1)[1]]
        return t

    def location(self, cmd, what):
        """Runs curl printing the response's headers; the Location it gives, made absolute."""
        p = subprocess.run(cmd, capture_output=True, text=True)
        loc = next((line.split(":", 1)[1].strip() for line in p.stdout.splitlines()
                    if line.lower().startswith("location:")), None)
        if p.returncode != 0 or not loc:
            raise BenchFailure(f"{what}: {p.stdout.strip()[:200]} {p.stderr.strip()[-200:]}")
        return urllib.parse.urljoin(self.base + "/", loc)

    def start_upload(self):
        return self.location(["curl", "-sS", "-X", "POST", "-o", "/dev/null", "-D", "-", f"{self.base}/blobs/uploads/"],
                             f"POST {self.base}/blobs/uploads/")

    @staticmethod
    def with_digest(location, digest):
        return location + ("&" if "?" in location else "?") + "digest=" + digest

    def upload_blob(self, path, digest, size):
        """POST, then one monolithic PUT of the file (curl -T)."""
        put(["curl", "-sS", "-H", "Expect:", "-H", "Content-Type: application/octet-stream", "-T", path,
             self.with_digest(self.start_upload(), digest)], "201", size)

    def upload_chunked(self, parts, digest):
        """POST, a PATCH per file in `parts`, one after another (each to the Location the last
        answer gave), then the closing PUT: the requests RegistryPublisher makes for a large blob."""
        loc, offset = self.start_upload(), 0
        for part in parts:
            n = os.path.getsize(part)
            loc = self.location(["curl", "-sS", "-X", "PATCH", "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
                                 "-H", f"Content-Range: {offset}-{offset + n - 1}", "-T", part, "-o", "/dev/null", "-D", "-",
                                 loc], f"PATCH {offset}-{offset + n - 1} of {digest}")
            offset += n
        p = subprocess.run(["curl", "-sS", "-X", "PUT", "-o", "/dev/null", "-w", "%{http_code}",
                            self.with_digest(loc, digest)], capture_output=True, text=True)
        if p.stdout.strip() != "201":
            raise BenchFailure(f"closing PUT of {digest}: HTTP {p.stdout} {p.stderr[-300:]}")

    def put_tag(self, tag, manifest_path, size, media_type=MANIFEST_TYPE):
        put(["curl", "-sS", "-H", "Expect:", "-H", f"Content-Type: {media_type}", "-T", manifest_path,
             f"{self.base}/manifests/{tag}"], "201", size)

    def tag_manifest(self, tag):
        p = self.b.run(["curl", "-sSf", "-H", ACCEPT, f"{self.base}/manifests/{tag}"])
        return p.stdout.encode()

    def tag_digest(self, tag):
        return sha(self.tag_manifest(tag))

    def forget(self, digests):
        """Removes these blobs' data from the registry's storage: the runs' layers are never asked
        for again, and each run adds a cache's worth."""
        for d in digests:
            shutil.rmtree(os.path.dirname(self.b.registry_blob_file(d)), ignore_errors=True)


class S3:
    name = "s3"

    def __init__(self, bench, bucket):
        self.b, self.a, self.bucket = bench, bench.a, bucket
        self.url = f"http://127.0.0.1:{self.a.nginx_port}"
        self.log = os.path.join(self.a.nginx_dir, "cache.upload.log")
        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.a.moto_port}", region_name=REGION,
                                   aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                                   config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
        if not os.path.exists(self.log):
            raise BenchFailure(f"{self.log} is missing: run.sh's nginx logs each request's length there")
        try:
            self.client.create_bucket(Bucket=bucket)
        except (self.client.exceptions.BucketAlreadyOwnedByYou, self.client.exceptions.BucketAlreadyExists):
            pass

    def source(self, name):
        return (f"type=s3,bucket={self.bucket},region={REGION},name={name},endpoint_url={self.url},"
                f"use_path_style=true,access_key_id={KEY_ID},secret_access_key={SECRET}")

    def offset(self):
        return os.path.getsize(self.log) if os.path.exists(self.log) else 0

    def server_cpu(self):
        master = self.a.nginx_pid
        try:
            kids = open(f"/proc/{master}/task/{master}/children").read().split()
        except OSError:
            kids = []
        return self.b.cpu_of(self.a.moto_pid) + self.b.cpu_of(master) + sum(self.b.cpu_of(int(k)) for k in kids)

    def moto_cpu(self):
        return self.b.cpu_of(self.a.moto_pid)

    def traffic(self, since, sizes=None, manifest_sizes=None):
        """What nginx logged after `since` for this bucket: requests by 'METHOD kind STATUS',
        response bytes (down) and request bytes, request line and headers included (up)."""
        t = {"requests": {}, "count": 0, "down": 0, "up": 0, "uploaded": [], "manifest_puts": 0, "spans": []}
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        for line in text.splitlines():
            m = UPLOAD_LINE.match(line.strip())
            if not m:
                continue
            method, uri, args, status, req_len, body_sent, took, end = m.groups()
            if not (uri == f"/{self.bucket}" or uri.startswith(f"/{self.bucket}/")):
                continue
            key = urllib.parse.unquote(uri[len(self.bucket) + 2:])
            kind = "blobs" if key.startswith("blobs/") else "manifests" if key.startswith("manifests/") else "bucket"
            if "uploadId" in args:
                kind += " part" if method == "PUT" else " multipart"
            elif "uploads" in args.split("&"):
                kind += " multipart"
            k = f"{method} {kind} {status}"
            t["requests"][k] = t["requests"].get(k, 0) + 1
            t["count"] += 1
            t["down"] += int(body_sent)
            t["up"] += int(req_len)
            span = (float(end) - float(took), float(end))
            if method == "PUT" and status == "200" and kind == "manifests":
                t["manifest_puts"] += 1
                t["spans"].append(("tag",) + span)
            elif kind.startswith("blobs") and method in ("PUT", "POST"):
                t["spans"].append(("blob",) + span)
            if status == "200" and kind.startswith("blobs") and (
                    (method == "PUT" and "uploadId" not in args) or (method == "POST" and "uploadId" in args)):
                t["uploaded"].append(key[len("blobs/"):])
        return t

    def curl_put(self, key, path, size):
        put(["curl", "-sS", "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY_ID}:{SECRET}", "-H", "Expect:",
             "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", path, f"{self.url}/{self.bucket}/{key}"], "200", size)

    def upload_blob(self, path, digest, size):
        self.curl_put(f"blobs/{digest}", path, size)

    def upload_multipart(self, parts, digest, parallel):
        """CreateMultipartUpload, UploadPart of each file in `parts` (`parallel` at once),
        CompleteMultipartUpload: the requests S3Publisher makes for a large blob."""
        url = f"{self.url}/{self.bucket}/blobs/{digest}"
        sign = ["curl", "-sS", "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY_ID}:{SECRET}", "-H", "Expect:"]
        p = subprocess.run(sign + ["-X", "POST", f"{url}?uploads"], capture_output=True, text=True)
        m = re.search(r"<UploadId>([^<]+)</UploadId>", p.stdout)
        if p.returncode != 0 or not m:
            raise BenchFailure(f"CreateMultipartUpload {url}: {p.stdout[-300:]} {p.stderr[-300:]}")
        upload = urllib.parse.quote(m.group(1), safe="")
        etags = [None] * len(parts)

        def part(i):
            p = subprocess.run(sign + ["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", parts[i], "-o", "/dev/null",
                                       "-D", "-", f"{url}?partNumber={i + 1}&uploadId={upload}"], capture_output=True, text=True)
            etag = next((line.split(":", 1)[1].strip() for line in p.stdout.splitlines()
                         if line.lower().startswith("etag:")), None)
            if p.returncode != 0 or " 200" not in p.stdout.split("\n", 1)[0] or not etag:
                raise BenchFailure(f"UploadPart {i + 1} of {url}: {p.stdout[:200]} {p.stderr[-300:]}")
            etags[i] = etag
        in_parallel(parallel, [lambda i=i: part(i) for i in range(len(parts))])
        body = ("<CompleteMultipartUpload>" + "".join(f"<Part><PartNumber>{i + 1}</PartNumber><ETag>{e}</ETag></Part>"
                                                     for i, e in enumerate(etags)) + "</CompleteMultipartUpload>")
        # Not curl's default form type: the server would take the body for form fields.
        p = subprocess.run(sign + ["-X", "POST", "-H", "Content-Type: application/xml", "--data-binary", body,
                                   "-o", "/dev/null", "-w", "%{http_code}",
                                   f"{url}?uploadId={upload}"], capture_output=True, text=True)
        if p.stdout.strip() != "200":
            raise BenchFailure(f"CompleteMultipartUpload {url}: HTTP {p.stdout} {p.stderr[-300:]}")

    def manifest_object(self, name):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"manifests/{name}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def keys(self):
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def delete(self, keys):
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    def forget(self, digests):
        present = self.keys()
        self.delete(k for k in present if k.startswith("blobs/") and k[len("blobs/"):] in set(digests))


def put(cmd, code, size):
    """Runs a curl upload, checking its HTTP status and the bytes it sent."""
    p = subprocess.run(cmd[:1] + ["-o", "/dev/null", "-w", "%{http_code} %{size_upload}"] + cmd[1:],
                       capture_output=True, text=True)
    fields = p.stdout.split()
    if p.returncode != 0 or len(fields) != 2 or fields[0] != code or int(fields[1]) != size:
        raise BenchFailure(f"{cmd[-1]}: {p.stdout.strip()} (expected {code}, {size} bytes) {p.stderr.strip()[-300:]}")


def in_parallel(n, jobs):
    """Runs the callables `jobs`, n at once; the first failure is raised once all have ended."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()


class CPUWatch:
    """CPU seconds a daemon uses from now until it exits (sampled every 50 ms)."""

    def __init__(self, bench, pid):
        self.b, self.pid = bench, pid
        self.first = self.last = bench.cpu_of(pid)
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while os.path.exists(f"/proc/{self.pid}"):
            now = self.b.cpu_of(self.pid)
            if now:
                self.last = now
            time.sleep(0.05)

    def total(self, timeout=30):
        self.thread.join(timeout)
        return self.last - self.first


# ---------------------------------------------------------------- the part

class ExportPart:
    def __init__(self, bench, args):
        self.b, self.a, self.R = bench, args, bench.R
        self.E = self.R.setdefault("export", {"seed": {}})
        self.work = bench.work
        self.mnt = os.path.join(self.work, "exportmnt")
        self.src = os.path.join(self.work, "export-src")
        os.makedirs(self.mnt, exist_ok=True)
        os.makedirs(self.src, exist_ok=True)
        self.mounted = False

    def log(self, msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cleanup(self):
        if self.mounted:
            subprocess.run([self.a.binary, "unmount", self.mnt], capture_output=True)
            self.mounted = False

    # ---- the mount and the replay
    def daemon_pid(self):
        digest = hashlib.sha256(os.path.realpath(self.mnt).encode()).hexdigest()[:32]
        with open(f"/run/ocicachefs/{digest}.pid") as f:
            return int(f.read().strip())

    def mount(self, source, cache):
        self.b.run([self.a.binary, "mount", "--writable", "--cache-dir", cache, source, self.mnt])
        self.mounted = True
        return self.daemon_pid()

    def unmount(self):
        """`ocicachefs unmount`; returns what it printed (the upload progress)."""
        p = self.b.run([self.a.binary, "unmount", self.mnt])
        self.mounted = False
        return p.stderr

    def note_daemon_log(self, cache, what):
        """Keeps the warnings and errors the daemon logged (its log is in the cache directory,
        which is removed after each export)."""
        try:
            with open(os.path.join(cache, "ocicachefs.log"), errors="replace") as f:
                # The first export's "no tag yet" warning is expected.
                lines = [l.strip() for l in f if re.search(r" (warning|error|critical) ", l)
                         and "the mount is empty until a cache is exported" not in l]
        except OSError:
            return
        if lines:
            self.E.setdefault("daemon_log", []).append({"what": what, "lines": lines[:5], "count": len(lines)})

    def replay(self, layout, plan_path):
        p = self.b.run([sys.executable, REPLAY, layout, plan_path])
        return json.loads(p.stdout)

    def timeline(self, key, t, wall0):
        """When, counted from `wall0` (the export's first write), the blob uploads began and ended
        and the tag's PUT ended, from the server's log."""
        blob = [s for s in t["spans"] if s[0] == "blob"]
        tag = [s for s in t["spans"] if s[0] == "tag"]
        if blob:
            self.b.sample(f"{key}_t_upload", min(s[1] for s in blob) - wall0)
            self.b.sample(f"{key}_t_blobs", max(s[2] for s in blob) - wall0)
        if tag:
            self.b.sample(f"{key}_t_tag", max(s[2] for s in tag) - wall0)

    @staticmethod
    def bytes_left_at_unmount(text):
        """The first progress line of `ocicachefs unmount`: bytes still to upload when it began."""
        m = re.search(r"uploading for \d+ s: (\d+) blob\(s\) \((\d+) bytes\)", text or "")
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def export_through_mount(self, remote, tag, set_, sizes, key):
        """Mount writable on a fresh cache directory, replay the export, unmount; samples under
        `key`. Returns the traffic."""
        cache = self.b.new_cache_dir()
        pid = self.mount(remote.source(tag), cache)
        watch = CPUWatch(self.b, pid)
        os.sync()
        since, busy0, server0, moto0 = remote.offset(), self.b.machine_busy(), remote.server_cpu(), remote.moto_cpu()
        r = self.replay(self.mnt, set_["path"])
        text = self.unmount()
        end = time.monotonic()
        self.b.sample(f"{key}_cpu_machine", self.b.machine_busy() - busy0)
        self.b.sample(f"{key}_cpu_server", remote.server_cpu() - server0)
        if remote.name == "s3":
            self.b.sample(f"{key}_cpu_moto", remote.moto_cpu() - moto0)
        self.b.sample(f"{key}_cpu_daemon", watch.total())
        self.b.sample(key, end - r["first"])
        self.b.sample(f"{key}_writes", r["index_closed"] - r["first"])
        self.b.sample(f"{key}_drain", end - r["index_closed"])
        _, bytes_left = self.bytes_left_at_unmount(text)
        self.b.sample(f"{key}_wire_left", bytes_left)
        t = remote.traffic(since, sizes, {tag: set_["manifest"]["size"]})
        self.b.sample(f"{key}_wire_up", t["up"])
        self.b.sample(f"{key}_requests", t["count"])
        self.E[f"{key}_requests"] = t["requests"]
        self.E[f"{key}_written"] = r["written"]
        self.b.sample(f"{key}_t_commit", r["commits"][0] - r["first"])
        self.timeline(key, t, r["first_wall"])
        self.check_tag(remote, tag, set_)
        self.note_daemon_log(cache, key)
        self.b.rm(cache)
        return t

    def check_tag(self, remote, tag, set_):
        if remote.name == "registry":
            got = remote.tag_digest(tag)
            if got != set_["manifest"]["digest"]:
                raise BenchFailure(f"after the export, {remote.source(tag)} is {got}, not {set_['manifest']['digest']}")
        else:
            obj = remote.manifest_object(tag)
            layers = [l["blob"] for l in json.loads(obj)["layers"]] if obj else None
            if layers != [l["digest"] for l in set_["layers"]]:
                raise BenchFailure(f"after the export, manifests/{tag} in s3://{remote.bucket} names {layers}")

    def curl_upload(self, remote, tag, set_, sizes, key, parallel=CURL_PARALLEL, in_pieces=False):
        """The baseline: every blob, `parallel` at once, then the tag. With `in_pieces`, each layer
        as the publisher sends it, from the files of its 16 MiB pieces, 4 layers at once: to a
        registry, PATCHes in series; to S3, a multipart upload, 4 parts at once."""
        os.sync()
        since, busy0, server0, moto0 = remote.offset(), self.b.machine_busy(), remote.server_cpu(), remote.moto_cpu()
        start, wall0 = time.monotonic(), time.time()
        if remote.name == "registry":
            config = {"digest": set_["config"]["digest"], "size": set_["config"]["size"], "src": set_["plan"]["blobs"][0]["src"]}
            if in_pieces:
                in_parallel(UPLOADS_AT_ONCE, [lambda l=l: remote.upload_chunked(l["parts"], l["digest"])
                                              for l in set_["layers"]])
                remote.upload_blob(config["src"], config["digest"], config["size"])
            else:
                in_parallel(parallel, [lambda b=b: remote.upload_blob(b["src"], b["digest"], b["size"])
                                       for b in set_["layers"] + [config]])
            remote.put_tag(tag, set_["plan"]["blobs"][1]["src"], set_["manifest"]["size"])
            manifest_size = set_["manifest"]["size"]
        else:
            if in_pieces:
                in_parallel(UPLOADS_AT_ONCE, [lambda l=l: remote.upload_multipart(l["parts"], l["digest"], MULTIPART_PARTS)
                                              for l in set_["layers"]])
            else:
                in_parallel(parallel, [lambda l=l: remote.upload_blob(l["src"], l["digest"], l["size"])
                                       for l in set_["layers"]])
            obj = os.path.join(self.src, f"{tag}.s3-manifest")
            with open(obj, "wb") as f:
                f.write(s3_manifest_object(set_["layers"], set_["salt"]))
            manifest_size = os.path.getsize(obj)
            remote.curl_put(f"manifests/{tag}", obj, manifest_size)
        self.b.sample(key, time.monotonic() - start)
        self.b.sample(f"{key}_cpu_machine", self.b.machine_busy() - busy0)
        self.b.sample(f"{key}_cpu_server", remote.server_cpu() - server0)
        if remote.name == "s3":
            self.b.sample(f"{key}_cpu_moto", remote.moto_cpu() - moto0)
        t = remote.traffic(since, sizes, {tag: manifest_size})
        self.timeline(key, t, wall0)
        self.b.sample(f"{key}_wire_up", t["up"])
        self.b.sample(f"{key}_requests", t["count"])
        self.E[f"{key}_requests"] = t["requests"]
        self.check_tag(remote, tag, set_)
        return t

    # ---- 1 and 2
    def make_set(self, label, tag, sizes=None, salt=None):
        sizes = sizes or [self.a.size // LAYERS] * LAYERS
        layers = random_layers(self.src, label, sizes)
        return write_plan(self.src, label, layers, tag, salt or label)

    @staticmethod
    def sizes_of(*sets):
        out = {}
        for s in sets:
            for l in s["layers"]:
                out[l["digest"]] = l["size"]
            out[s["config"]["digest"]] = s["config"]["size"]
            out[s["manifest"]["digest"]] = s["manifest"]["size"]
        return out

    def drop_files(self, set_):
        for l in set_["layers"]:
            for path in [l.get("src")] + l.get("parts", []):
                if path and os.path.exists(path):
                    os.unlink(path)

    @staticmethod
    def split_parts(set_):
        """Each layer's PIECE-sized pieces as files of their own (curl uploads whole files)."""
        for l in set_["layers"]:
            l["parts"] = []
            with open(l["src"], "rb") as f:
                while piece := f.read(PIECE):
                    path = f"{l['src']}.part{len(l['parts'])}"
                    with open(path, "wb") as out:
                        out.write(piece)
                    l["parts"].append(path)
        os.sync()

    def bench_export(self):
        remotes = [Registry(self.b, REPO), S3(self.b, BUCKET)]
        layer = self.a.size // LAYERS
        self.E["export"] = {"size": LAYERS * layer, "layers": LAYERS, "layer_size": layer}
        first = None
        for run in range(self.a.export_runs):
            ours = self.make_set(f"ours{run}", f"e{run}")
            theirs = self.make_set(f"curl{run}", f"c{run}")
            # The publishers' own request pattern, where the layers are large enough to be sent in pieces.
            pieced = [r for r in remotes if layer > PIECES_ABOVE[r.name]]
            pieces = self.make_set(f"pieces{run}", f"p{run}") if pieced else None
            if pieces:
                self.split_parts(pieces)
            sizes = self.sizes_of(*[x for x in (ours, theirs, pieces) if x])
            os.sync()
            # The client's own cost: the same replay into a directory on the cache's disk.
            local = os.path.join(self.work, "export-local")
            self.b.rm(local)
            os.makedirs(local)
            r = self.replay(local, ours["path"])
            self.b.sample("export_local", r["index_closed"] - r["first"])
            self.b.rm(local)
            for remote in remotes:
                # Whichever goes first meets what the run's set-up left behind (write-back, a server
                # still settling): the two take turns, and each run's pair is compared on its own.
                curl_first = run % 2 == 1
                if curl_first:
                    self.curl_upload(remote, f"c{run}", theirs, sizes, f"export_curl_{remote.name}")
                t = self.export_through_mount(remote, f"e{run}", ours, sizes, f"export_{remote.name}")
                self.E[f"export_{remote.name}_uploaded"] = len(t["uploaded"])
                if not curl_first:
                    self.curl_upload(remote, f"c{run}", theirs, sizes, f"export_curl_{remote.name}")
                if remote in pieced:
                    self.curl_upload(remote, f"p{run}", pieces, sizes, f"export_curlpieces_{remote.name}", in_pieces=True)
                self.log(f"export run {run + 1}, {remote.name}: ocicachefs {fmt_s(self.b.s(f'export_{remote.name}')[-1])} "
                         f"(writes {fmt_s(self.b.s(f'export_{remote.name}_writes')[-1])}), curl "
                         f"{fmt_s(self.b.s(f'export_curl_{remote.name}')[-1])}")
            for done in (x for x in (theirs, pieces) if x):
                self.drop_files(done)
                for remote in remotes:
                    remote.forget([l["digest"] for l in done["layers"]])
            if first is None:
                first = ours
            else:
                self.drop_files(ours)
                for remote in remotes:
                    remote.forget([l["digest"] for l in ours["layers"]])
        self.bench_reexport(remotes, first)
        self.drop_files(first)
        for remote in remotes:
            remote.forget([l["digest"] for l in first["layers"]])

    def bench_reexport(self, remotes, first):
        """Item 2: run 1's export again through a fresh mount and cache directory, unchanged and
        as a fresh BuildKit writes it (same layers, new cache config and manifest)."""
        tag = first["plan"]["tag"]
        fresh = write_plan(self.src, "reexport", first["layers"], tag, "reexport")
        sizes = self.sizes_of(first, fresh)
        for remote in remotes:
            for variant, set_ in (("same", first), ("fresh", fresh)):
                key = f"reexport_{variant}_{remote.name}"
                cache = self.b.new_cache_dir()
                self.mount(remote.source(tag), cache)
                since = remote.offset()
                r = self.replay(self.mnt, set_["path"])
                text = self.unmount()
                self.b.sample(key, time.monotonic() - r["first"])
                t = remote.traffic(since, sizes, {tag: set_["manifest"]["size"]})
                layer_sizes = {l["digest"]: l["size"] for l in first["layers"]}
                self.b.sample(f"{key}_wire_up", t["up"])
                self.b.sample(f"{key}_wire_layers", sum(layer_sizes.get(d, 0) for d in t["uploaded"]))
                self.b.sample(f"{key}_requests", t["count"])
                self.b.sample(f"{key}_manifest_requests", t["manifest_puts"])
                self.E[f"{key}_requests"] = t["requests"]
                self.E[f"{key}_written"] = r["written"]
                self.E[f"{key}_skipped"] = r["skipped"]
                self.E[f"{key}_unmount"] = text.strip().splitlines()[-3:]
                self.check_tag(remote, tag, set_)
                self.note_daemon_log(cache, key)
                self.b.rm(cache)
                self.log(f"re-export ({variant}) to {remote.name}: {t['count']} requests ("
                         + ", ".join(f"{n} × {k}" for k, n in sorted(t["requests"].items())) + f"), {fmt_bytes(t['up'])} sent")

    # ---- 3, the CI job with its export
    def seed_ci(self):
        t0 = time.perf_counter()
        sizes = [s * MiB // self.a.ci_scale for s in bench_s3.CI_SIZES_MIB]
        out = os.path.join(self.work, "seed-export-ci-reg.json")
        self.b.run([sys.executable, os.path.join(HERE, "registry_push.py"), "chains", "--registry", self.b.registry,
                    "--repo", CI_REPO, "--chains", str(bench_s3.CI_CHAINS), "--sizes", ",".join(map(str, sizes)),
                    "--tag-prefix", "ci-", "--seed", "33", "--out", out])
        with open(out) as f:
            self.ci_reg = json.load(f)["tags"]
        out = os.path.join(self.work, "seed-export-ci-s3.json")
        self.b.run([sys.executable, os.path.join(HERE, "s3_push.py"), "chains", "--endpoint",
                    f"http://127.0.0.1:{self.a.moto_port}", "--bucket", CI_BUCKET, "--chains", str(bench_s3.CI_CHAINS),
                    "--sizes", ",".join(map(str, sizes)), "--name-prefix", "ci-", "--seed", "32", "--out", out])
        with open(out) as f:
            self.ci_s3 = json.load(f)["names"]
        self.ci_remotes = {"registry": Registry(self.b, CI_REPO), "s3": S3(self.b, CI_BUCKET)}
        s3 = self.ci_remotes["s3"]
        self.ci_keys = s3.keys()
        for key, size in self.ci_keys.items():     # nginx keeps each object once fetched
            self.prime(s3, key, size)
        self.ci_original = {"registry": self.ci_remotes["registry"].tag_manifest(CI_TAG),
                            "s3": s3.manifest_object(CI_TAG)}
        self.ci_server_files = {
            "registry": [self.b.registry_blob_file(l["digest"]) for t in self.ci_reg.values() for l in t["layers"]],
            "s3": [self.nginx_file(k) for k in self.ci_keys]}
        self.E["seed"]["ci_seconds"] = round(time.perf_counter() - t0, 1)
        self.E["ci"] = {"chains": bench_s3.CI_CHAINS, "layers": len(sizes), "new_layers": len(NEW_LAYERS_MIB),
                        "total_layer_bytes": {"registry": sum(l["size"] for t in self.ci_reg.values() for l in t["layers"]),
                                              "s3": sum(l["size"] for m in self.ci_s3.values() for l in m["layers"])},
                        "chain_bytes": {"registry": sum(l["size"] for l in self.ci_reg[CI_TAG]["layers"]),
                                        "s3": sum(l["size"] for l in self.ci_s3[CI_TAG]["layers"])},
                        "new_bytes": sum(s * MiB // self.a.ci_scale for s in NEW_LAYERS_MIB)}
        self.log(f"seeded the CI caches for the export ({bench_s3.CI_CHAINS} tags, "
                 f"{fmt_bytes(self.E['ci']['total_layer_bytes']['s3'])} each in S3 and the registry) in "
                 f"{self.E['seed']['ci_seconds']} s")

    def nginx_file(self, key, bucket=CI_BUCKET):
        h = hashlib.md5(f"/{bucket}/{key}".encode()).hexdigest()
        return os.path.join(self.a.nginx_dir, "cache", h[-1], h[-3:-1], h)

    def prime(self, s3, key, size):
        p = self.b.run(["curl", "-sS", "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY_ID}:{SECRET}",
                        "-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"{s3.url}/{s3.bucket}/{key}"])
        if p.stdout.split() != ["200", str(size)]:
            raise BenchFailure(f"priming {key}: {p.stdout}")
        path, deadline = self.nginx_file(key, s3.bucket), time.monotonic() + 10
        while not os.path.exists(path) or os.path.getsize(path) < size:
            if time.monotonic() > deadline:
                raise BenchFailure(f"nginx did not cache {key} at {path}")
            time.sleep(0.05)

    def cold_start(self, files):
        """Page cache dropped, then the server's copies (and the new layers' sources) read once:
        only the client side is cold, as in the ci part."""
        self.b.drop_caches()
        for path in files:
            self.b.run(["dd", f"if={path}", "of=/dev/null", "bs=8M"])

    def ci_plan(self, src, run, label):
        chain = self.ci_reg[CI_TAG]["layers"] if src == "registry" else self.ci_s3[CI_TAG]["layers"]
        new = random_layers(self.src, label, [s * MiB // self.a.ci_scale for s in NEW_LAYERS_MIB])
        layers = [dict(l, mediaType=l.get("mediaType", LAYER_TYPE)) for l in chain] + new
        return write_plan(self.src, label, layers, CI_TAG, label)

    def ci_sizes(self, src, set_, layout=None):
        sizes = self.sizes_of(set_)
        if src == "registry":
            for t in self.ci_reg.values():
                for l in t["layers"]:
                    sizes[l["digest"]] = l["size"]
        if layout:
            blobs = os.path.join(layout, "blobs/sha256")
            for name in os.listdir(blobs):
                sizes["sha256:" + name] = os.path.getsize(os.path.join(blobs, name))
        return sizes

    def ci_restore(self, src, set_):
        """The cache as seeded again: the tag back on its first manifest, new S3 objects removed."""
        remote = self.ci_remotes[src]
        if src == "registry":
            path = os.path.join(self.src, "ci-original-manifest")
            with open(path, "wb") as f:
                f.write(self.ci_original["registry"])
            media = json.loads(self.ci_original["registry"])["mediaType"]
            remote.put_tag(CI_TAG, path, len(self.ci_original["registry"]), media)
            remote.forget([l["digest"] for l in set_["layers"][-len(NEW_LAYERS_MIB):]])
        else:
            remote.client.put_object(Bucket=remote.bucket, Key=f"manifests/{CI_TAG}", Body=self.ci_original["s3"])
            remote.delete(k for k in remote.keys() if k not in self.ci_keys)
        self.drop_files(set_)

    def ci_mounted(self, src, run):
        remote = self.ci_remotes[src]
        set_ = self.ci_plan(src, run, f"ci-mount-{src}{run}")
        sizes = self.ci_sizes(src, set_)
        self.cold_start(self.ci_server_files[src] + [l["src"] for l in set_["layers"] if l.get("src")])
        cache = self.b.new_cache_dir()
        since = remote.offset()
        start = time.monotonic()
        self.mount(remote.source(CI_TAG), cache)
        mounted = time.monotonic()
        read = bench_s3.S3Parts.replay_import(self.mnt, CI_TAG)
        imported = time.monotonic()
        r = self.replay(self.mnt, set_["path"])
        self.unmount()
        end = time.monotonic()
        t = remote.traffic(since, sizes, {CI_TAG: set_["manifest"]["size"]})
        self.check_tag(remote, CI_TAG, set_)
        key = f"ciexp_mount_{src}"
        self.b.sample(key, end - start)
        self.b.sample(f"{key}_mount", mounted - start)
        self.b.sample(f"{key}_import", imported - mounted)
        self.b.sample(f"{key}_export", r["index_closed"] - imported)
        self.b.sample(f"{key}_drain", end - r["index_closed"])
        self.b.sample(f"{key}_wire_down", t["down"])
        self.b.sample(f"{key}_wire_up", t["up"])
        self.b.sample(f"{key}_requests", t["count"])
        self.E[f"{key}_requests"] = t["requests"]
        self.E[f"ci_read_{src}"] = read
        self.note_daemon_log(cache, key)
        self.b.rm(cache)
        self.ci_restore(src, set_)
        return read

    def ci_whole(self, src, run, read):
        remote = self.ci_remotes[src]
        set_ = self.ci_plan(src, run, f"ci-whole-{src}{run}")
        dest = os.path.join(self.work, "ci-export-whole")
        self.b.rm(dest)
        os.makedirs(dest)
        self.cold_start(self.ci_server_files[src] + [l["src"] for l in set_["layers"] if l.get("src")])
        since = remote.offset()
        start = time.monotonic()
        if src == "registry":
            layout, keys = dest, None
            manifests = self.download_registry(remote, dest)
        else:
            keys = self.download_s3(remote, dest)
            layout = bench_s3.S3Parts.s3_layout(dest, keys)
        downloaded = time.monotonic()
        read2 = bench_s3.S3Parts.replay_import(layout, CI_TAG)
        if read2 != read:
            raise BenchFailure(f"the CI import read {read2} bytes from the download, {read} through the mount")
        imported = time.monotonic()
        self.replay(layout, set_["path"])
        exported = time.monotonic()
        if src == "registry":
            manifest_sizes = self.upload_registry(remote, layout, manifests | {set_["manifest"]["digest"]})
        else:
            manifest_sizes = self.upload_s3(remote, dest, layout, keys, set_)
        end = time.monotonic()
        sizes = self.ci_sizes(src, set_, layout)
        t = remote.traffic(since, sizes, manifest_sizes)
        self.check_tag(remote, CI_TAG, set_)
        key = f"ciexp_whole_{src}"
        self.b.sample(key, end - start)
        self.b.sample(f"{key}_download", downloaded - start)
        self.b.sample(f"{key}_import", imported - downloaded)
        self.b.sample(f"{key}_export", exported - imported)
        self.b.sample(f"{key}_upload", end - exported)
        self.b.sample(f"{key}_wire_down", t["down"])
        self.b.sample(f"{key}_wire_up", t["up"])
        self.b.sample(f"{key}_requests", t["count"])
        self.E[f"{key}_requests"] = t["requests"]
        self.b.rm(dest)
        self.ci_restore(src, set_)

    def curl_jobs(self, jobs):
        """jobs: [(cmd, path or None, expected size or None)], CI_PARALLEL curls at once."""
        def one(job):
            cmd, _, expect = job
            p = subprocess.run(cmd, capture_output=True, text=True)
            fields = p.stdout.split()
            if p.returncode != 0 or len(fields) != 2 or fields[0] != "200" or (expect is not None and int(fields[1]) != expect):
                raise BenchFailure(f"{cmd[-1]}: {p.stdout.strip()} {p.stderr.strip()[-300:]}")
        in_parallel(bench_s3.CI_PARALLEL, [lambda j=j: one(j) for j in jobs])

    def download_registry(self, remote, dest):
        """Every tag's manifest and every blob they name into an OCI layout, CI_PARALLEL curls at
        once (a CI cache restore of the whole directory); returns the manifests' digests."""
        tags = sorted(json.loads(self.b.run(["curl", "-sSf", f"{remote.base}/tags/list"]).stdout)["tags"])
        blobs_dir = os.path.join(dest, "blobs/sha256")
        os.makedirs(blobs_dir)
        fmt = ["-w", "%{http_code} %{size_download}"]
        self.curl_jobs([(["curl", "-sS", "-H", ACCEPT, "-o", os.path.join(dest, f"manifest-{t}"), *fmt,
                          f"{remote.base}/manifests/{t}"], None, None) for t in tags])
        index, blobs, digests = [], {}, set()
        for t in tags:
            raw = open(os.path.join(dest, f"manifest-{t}"), "rb").read()
            digest = sha(raw)
            digests.add(digest)
            os.rename(os.path.join(dest, f"manifest-{t}"), os.path.join(blobs_dir, digest.split(":", 1)[1]))
            m = json.loads(raw)
            index.append({"mediaType": m["mediaType"], "digest": digest, "size": len(raw),
                          "annotations": {"org.opencontainers.image.ref.name": t}})
            for d in m.get("manifests", []) + m.get("layers", []) + ([m["config"]] if "config" in m else []):
                blobs[d["digest"]] = d["size"]
        self.curl_jobs([(["curl", "-sS", "-o", os.path.join(blobs_dir, d.split(":", 1)[1]), *fmt,
                          f"{remote.base}/blobs/{d}"], None, size) for d, size in sorted(blobs.items(), key=lambda kv: -kv[1])])
        with open(os.path.join(dest, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": index}, f)
        with open(os.path.join(dest, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        return digests

    def upload_registry(self, remote, layout, manifest_digests):
        """Every blob of the layout but the manifests (POST + PUT, CI_PARALLEL at once), then every
        tag of index.json; returns the manifests' sizes by tag."""
        blobs_dir = os.path.join(layout, "blobs/sha256")
        blobs = [(os.path.join(blobs_dir, n), "sha256:" + n) for n in os.listdir(blobs_dir)
                 if "sha256:" + n not in manifest_digests]
        blobs.sort(key=lambda b: -os.path.getsize(b[0]))
        in_parallel(bench_s3.CI_PARALLEL, [lambda b=b: remote.upload_blob(b[0], b[1], os.path.getsize(b[0])) for b in blobs])
        with open(os.path.join(layout, "index.json")) as f:
            entries = json.load(f)["manifests"]
        sizes = {}
        jobs = []
        for e in entries:
            tag = e["annotations"]["org.opencontainers.image.ref.name"]
            sizes[tag] = e["size"]
            path = os.path.join(blobs_dir, e["digest"].split(":", 1)[1])
            jobs.append(lambda tag=tag, path=path, e=e: remote.put_tag(tag, path, e["size"], e["mediaType"]))
        in_parallel(bench_s3.CI_PARALLEL, jobs)
        return sizes

    def download_s3(self, remote, dest):
        """List the bucket, download every object (CI_PARALLEL curls at once); returns {key: size}."""
        keys, token = {}, None
        sign = ["--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY_ID}:{SECRET}"]
        while True:
            url = f"{remote.url}/{remote.bucket}?list-type=2" + (f"&continuation-token={urllib.parse.quote(token)}" if token else "")
            root = ET.fromstring(self.b.run(["curl", "-sSf", *sign, url]).stdout)
            ns = {"s": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
            q = (lambda t: f"s:{t}") if ns else (lambda t: t)
            for c in root.findall(q("Contents"), ns):
                keys[c.find(q("Key"), ns).text] = int(c.find(q("Size"), ns).text)
            if root.findtext(q("IsTruncated"), "false", ns) != "true":
                break
            token = root.findtext(q("NextContinuationToken"), None, ns)
        jobs = []
        for key, size in sorted(keys.items(), key=lambda kv: -kv[1]):
            out = os.path.join(dest, key)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            jobs.append((["curl", "-sS", *sign, "-o", out, "-w", "%{http_code} %{size_download}",
                          f"{remote.url}/{remote.bucket}/{key}"], None, size))
        self.curl_jobs(jobs)
        return keys

    def upload_s3(self, remote, dest, layout, keys, set_):
        """Every object back (the new tag's `manifests/` object in place of the old one), plus the
        new layers, CI_PARALLEL at once, blobs before manifests; returns {}."""
        new_layers = set_["layers"][-len(NEW_LAYERS_MIB):]
        blobs = [(k, os.path.join(dest, k)) for k in keys if k.startswith("blobs/")]
        blobs += [(f"blobs/{l['digest']}", os.path.join(layout, "blobs/sha256", l["digest"].split(":", 1)[1]))
                  for l in new_layers]
        blobs.sort(key=lambda b: -os.path.getsize(b[1]))
        in_parallel(bench_s3.CI_PARALLEL, [lambda b=b: remote.curl_put(b[0], b[1], os.path.getsize(b[1])) for b in blobs])
        tag_object = os.path.join(dest, f"manifests/{CI_TAG}")
        with open(tag_object, "wb") as f:
            f.write(s3_manifest_object(set_["layers"], set_["salt"]))
        manifests = [(k, os.path.join(dest, k)) for k in keys if k.startswith("manifests/")]
        in_parallel(bench_s3.CI_PARALLEL, [lambda m=m: remote.curl_put(m[0], m[1], os.path.getsize(m[1])) for m in manifests])
        return {}

    def bench_ci(self):
        self.seed_ci()
        for run in range(self.a.runs):
            for src in TARGETS:
                read = self.ci_mounted(src, run)
                self.ci_whole(src, run, read)
                self.log(f"ci export {src} run {run + 1}: mounted {fmt_s(self.b.s(f'ciexp_mount_{src}')[-1])}, "
                         f"{fmt_bytes(self.b.s(f'ciexp_mount_{src}_wire_down')[-1])} down, "
                         f"{fmt_bytes(self.b.s(f'ciexp_mount_{src}_wire_up')[-1])} up; whole directory "
                         f"{fmt_s(self.b.s(f'ciexp_whole_{src}')[-1])}, "
                         f"{fmt_bytes(self.b.s(f'ciexp_whole_{src}_wire_down')[-1])} down, "
                         f"{fmt_bytes(self.b.s(f'ciexp_whole_{src}_wire_up')[-1])} up")

    def go(self):
        try:
            self.bench_export()
            self.bench_ci()
        except BenchFailure as e:
            raise self.b.error(str(e))
        finally:
            self.cleanup()


# ---------------------------------------------------------------- report

class ExportReport:
    """Rows, target verdicts, explanations and method notes for the `export` part."""

    NAMES = {"registry": "the registry", "s3": "S3"}

    def __init__(self, bench, args):
        self.b, self.a, self.R = bench, args, bench.R
        self.E = self.R.get("export")
        self.rows = []

    def m(self, key):
        return med(self.b.s(key))

    def row(self, what, ours, base_name, base, ratio, target=""):
        self.rows.append(("14", what, ours, base_name, base, ratio, target))

    @staticmethod
    def requests_text(counts):
        return ", ".join(f"{n} × {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def run_ratios(self, t):
        """Each run's curl time ÷ the export's: a slow spell of the machine slows both of a run's
        pair more than it slows the medians of each."""
        return [c / o for o, c in zip(self.b.s(f"export_{t}"), self.b.s(f"export_curl_{t}"))]

    def paired_ratio(self, t):
        return med(self.run_ratios(t))

    def build(self):
        if not self.E or "export" not in self.E:
            return
        ex = self.E["export"]
        size, layer = ex["size"], ex["layer_size"]
        for t in TARGETS:
            ours, base = self.m(f"export_{t}"), self.m(f"export_curl_{t}")
            curl = ("`curl` POST + monolithic PUT of each blob (layers, config), 8 at once, then the manifest PUT"
                    if t == "registry" else "`curl` PutObject of each layer, 8 at once, then `manifests/<name>`")
            self.row(f"export of a {fmt_size_name(size)} cache ({ex['layers']} × {fmt_bytes(layer)} random layers) through a "
                     f"`--writable` mount to {self.NAMES[t]}: first write → `ocicachefs unmount` returned (tag published)",
                     f"{fmt_s(ours)} ({fmt_rate(size, ours)})", curl + ", same endpoint",
                     f"{fmt_s(base)} ({fmt_rate(size, base)})", f"{self.paired_ratio(t):.2f}× curl's throughput",
                     f"≥ {TARGET_RATIO:.2f}×")
            if self.b.s(f"export_curlpieces_{t}"):
                mp = self.m(f"export_curlpieces_{t}")
                how = (f"per layer POST, {PIECE // MiB} MiB PATCHes one after another, the closing PUT; then the config, "
                       f"the manifest PUT" if t == "registry" else
                       f"per layer CreateMultipartUpload, {PIECE // MiB} MiB UploadParts ({MULTIPART_PARTS} at once), "
                       f"CompleteMultipartUpload; then `manifests/<name>`")
                self.row(f"same export to {self.NAMES[t]}", f"{fmt_s(ours)} ({fmt_rate(size, ours)})",
                         f"`curl` making the publisher's requests: {how}; {UPLOADS_AT_ONCE} layers at once",
                         f"{fmt_s(mp)} ({fmt_rate(size, mp)})", f"{mp / ours:.2f}× its throughput")
            up, cup = self.m(f"export_{t}_wire_up"), self.m(f"export_curl_{t}_wire_up")
            n, cn = self.m(f"export_{t}_requests"), self.m(f"export_curl_{t}_requests")
            self.row(f"same: bytes sent ({int(n)} requests)", fmt_bytes(up), f"the curl uploads ({int(cn)} requests)",
                     fmt_bytes(cup), f"{up / cup:.3f}×")
        first = {t: self.m(f"export_{t}_wire_up") for t in TARGETS}
        for t in TARGETS:
            for variant, what, target in (
                    ("same", "unchanged (the same manifest)", "no blob bytes, ≤ 1 manifest PUT"),
                    ("fresh", "as a fresh BuildKit writes it (same layers, new cache config and manifest)",
                     "no layer bytes, 1 manifest PUT")):
                key = f"reexport_{variant}_{t}"
                up = self.m(f"{key}_wire_up")
                self.row(f"re-export to {self.NAMES[t]}, {what}, through a fresh mount and cache directory: bytes sent "
                         f"({int(self.m(f'{key}_requests'))} requests, {int(self.m(f'{key}_manifest_requests'))} manifest "
                         f"PUT, {fmt_bytes(self.m(f'{key}_wire_layers'))} of layers)",
                         fmt_bytes(up), "the first export", fmt_bytes(first[t]), f"{up / first[t]:.4f}×", target)
        ci = self.E.get("ci")
        if not ci:
            return
        for t in TARGETS:
            ours, base = self.m(f"ciexp_mount_{t}"), self.m(f"ciexp_whole_{t}")
            self.row(f"CI job from {self.NAMES[t]}: mount `--writable`, import `{CI_TAG}` ({ci['layers']} layers, "
                     f"{fmt_bytes(ci['chain_bytes'][t])} of a {fmt_bytes(ci['total_layer_bytes'][t])} cache), export "
                     f"{ci['new_layers']} new layers ({fmt_bytes(ci['new_bytes'])}) and the tag, unmount: time",
                     fmt_s(ours), f"restore the whole cache ({bench_s3.CI_PARALLEL} curls at once), the same import and "
                     f"export on the local copy, then save the whole directory (upload everything, "
                     f"{bench_s3.CI_PARALLEL} at once)", fmt_s(base), f"{ours / base:.3f}× the time")
            down, up = self.m(f"ciexp_mount_{t}_wire_down"), self.m(f"ciexp_mount_{t}_wire_up")
            bdown, bup = self.m(f"ciexp_whole_{t}_wire_down"), self.m(f"ciexp_whole_{t}_wire_up")
            self.row("same: bytes received + sent", f"{fmt_bytes(down)} + {fmt_bytes(up)}", "the whole-directory restore and save",
                     f"{fmt_bytes(bdown)} + {fmt_bytes(bup)}", f"{(down + up) / (bdown + bup):.3f}×")

    def targets(self):
        if not self.E or "export" not in self.E:
            return ""
        ex = self.E["export"]
        size = ex["size"]
        out = []
        local = self.m("export_local")
        for t in TARGETS:
            ours, base = self.m(f"export_{t}"), self.m(f"export_curl_{t}")
            r = self.paired_ratio(t)
            pairs = ", ".join(f"{x:.2f}" for x in self.run_ratios(t))
            writes, drain = self.m(f"export_{t}_writes"), self.m(f"export_{t}_drain")
            left = self.m(f"export_{t}_wire_left")
            nproc = os.cpu_count() or 1
            busy, cbusy = self.m(f"export_{t}_cpu_machine") / (ours * nproc), self.m(f"export_curl_{t}_cpu_machine") / (base * nproc)
            facts = [
                f"the client's writes into the mount (from its first operation to the close of `index.json`) took "
                f"{fmt_s(writes)}{spread(self.b.s(f'export_{t}_writes'))}, against {fmt_s(local)}"
                f"{spread(self.b.s('export_local'))} for the same replay into a directory on the cache's disk",
                f"when `ocicachefs unmount` started, blobs of {fmt_bytes(left)} ({left / size * 100:.0f}%) were not yet "
                f"completely uploaded, and it returned {fmt_s(drain)} later",
                f"the daemon used {self.m(f'export_{t}_cpu_daemon'):.2f} CPU-s from mounting to exiting, the "
                f"{'registry' if t == 'registry' else 'server (moto and nginx)'} "
                f"{self.m(f'export_{t}_cpu_server'):.2f} (curl's uploads: {self.m(f'export_curl_{t}_cpu_server'):.2f}); "
                f"the machine's {nproc} cores were {busy * 100:.0f}% busy during the export and {cbusy * 100:.0f}% during "
                f"the curl uploads",
                f"requests: ocicachefs {self.requests_text(self.E.get(f'export_{t}_requests', {}))}; curl "
                f"{self.requests_text(self.E.get(f'export_curl_{t}_requests', {}))}"]
            pieces = self.b.s(f"export_curlpieces_{t}")
            if t == "s3" and self.b.s("export_s3_cpu_moto"):
                text = (f"moto alone (one Python process) used {self.m('export_s3_cpu_moto'):.2f} CPU-s for ocicachefs's "
                        f"uploads against {self.m('export_curl_s3_cpu_moto'):.2f} for curl's PutObjects")
                if pieces:
                    text += f" and {self.m('export_curlpieces_s3_cpu_moto'):.2f} for curl's multipart uploads (below)"
                facts.append(text)
            if pieces:
                mp = med(pieces)
                facts.append(f"`curl` making the same requests as ocicachefs ({'16 MiB PATCHes in series' if t == 'registry' else 'multipart, 16 MiB parts'}, "
                             f"{UPLOADS_AT_ONCE} layers at once) took {fmt_s(mp)}{spread(pieces)}, {base / mp:.2f}× the "
                             f"throughput of the {'monolithic PUTs' if t == 'registry' else 'PutObjects'}; ocicachefs reached "
                             f"{mp / ours:.2f}× of it")
            out.append(f"- **Export to {self.NAMES[t]} ≥ {TARGET_RATIO}× `curl`'s throughput** (issue 14; time from the "
                       f"export's first write until `ocicachefs unmount` returns ≤ {1 / TARGET_RATIO:.2f}× curl's): "
                       f"{'**met**' if r >= TARGET_RATIO else '**missed**'} — {r:.2f}×, the median of the runs' ratios "
                       f"({pairs}; medians of the times {fmt_s(ours)}{spread(self.b.s(f'export_{t}'))} against "
                       f"{fmt_s(base)}{spread(self.b.s(f'export_curl_{t}'))})"
                       + (f", {(TARGET_RATIO - r) / TARGET_RATIO * 100:.0f}% short" if r < TARGET_RATIO else "")
                       + ". Facts: " + "; ".join(facts) + ".")
        for t in TARGETS:
            parts, ok = [], True
            for variant, want_puts in (("same", (0, 1)), ("fresh", (1,))):
                key = f"reexport_{variant}_{t}"
                layers, puts = max(self.b.s(f"{key}_wire_layers")), self.b.s(f"{key}_manifest_requests")
                good = layers == 0 and all(p in want_puts for p in puts)
                ok = ok and good
                parts.append(f"{'unchanged' if variant == 'same' else 'new config and manifest'}: "
                             f"{fmt_bytes(layers)} of layers, {int(max(puts))} manifest PUT, "
                             f"{fmt_bytes(self.m(f'{key}_wire_up'))} sent in all "
                             f"({self.requests_text(self.E.get(f'{key}_requests', {})) or 'no requests'}), the client wrote "
                             f"{fmt_bytes(self.E.get(f'{key}_written', 0))} into the mount and found "
                             f"{self.E.get(f'{key}_skipped', 0)} blobs already there")
            out.append(f"- **Re-export of an unchanged cache through a fresh mount and cache directory sends no blob "
                       f"bytes and one manifest PUT** ({self.NAMES[t]}): {'**met**' if ok else '**missed**'} — "
                       + "; ".join(parts) + ".")
        if self.E.get("ci"):
            ci = self.E["ci"]
            for t in TARGETS:
                ours, base = self.m(f"ciexp_mount_{t}"), self.m(f"ciexp_whole_{t}")
                out.append(
                    f"- CI job with its export, from {self.NAMES[t]} (no target in issue 14; issue 4's CI target for the "
                    f"import alone is ≤ 0.3× the time and ≤ 0.12× the bytes): {ours / base:.3f}× the time "
                    f"({fmt_s(ours)}{spread(self.b.s(f'ciexp_mount_{t}'))} against {fmt_s(base)}"
                    f"{spread(self.b.s(f'ciexp_whole_{t}'))}), "
                    f"{(self.m(f'ciexp_mount_{t}_wire_down') + self.m(f'ciexp_mount_{t}_wire_up')) / (self.m(f'ciexp_whole_{t}_wire_down') + self.m(f'ciexp_whole_{t}_wire_up')):.3f}× "
                    f"the bytes; the chain is {ci['chain_bytes'][t] / ci['total_layer_bytes'][t] * 100:.1f}% of the "
                    f"cache's layer bytes and the new layers {fmt_bytes(ci['new_bytes'])}.")
        return "\n".join(out)

    def where_time(self):
        if not self.E or "export" not in self.E:
            return ""
        out = []
        size = self.E["export"]["size"]
        for t in TARGETS:
            k, c = f"export_{t}", f"export_curl_{t}"
            ours = self.m(k)
            text = (f"- Export to {self.NAMES[t]} ({fmt_s(ours)}), counted from the client's first write: the first blob "
                    f"committed (renamed into `blobs/sha256`) at {fmt_s(self.m(f'{k}_t_commit'))}")
            if self.b.s(f"{k}_t_upload"):
                up, blobs = self.m(f"{k}_t_upload"), self.m(f"{k}_t_blobs")
                text += (f", the first upload request began at {fmt_s(up)} and the last blob upload ended at "
                         f"{fmt_s(blobs)} ({fmt_rate(size, blobs - up)} from the first request to the last, per the "
                         f"server's log)")
            text += (f"; the client's writes ended with `index.json`'s close at {fmt_s(self.m(f'{k}_writes'))} "
                     f"({fmt_rate(size, self.m(f'{k}_writes'))} into the mount; the same replay into a local directory "
                     f"took {fmt_s(self.m('export_local'))}), when blobs of {fmt_bytes(self.m(f'{k}_wire_left'))} were not "
                     f"yet completely uploaded")
            if self.b.s(f"{k}_t_tag"):
                text += f"; the tag's PUT ended at {fmt_s(self.m(f'{k}_t_tag'))}"
            text += f" and `ocicachefs unmount` returned at {fmt_s(ours)}."
            if self.b.s(f"{c}_t_blobs") and self.b.s(f"{c}_t_tag"):
                text += (f" curl: the blob uploads ended at {fmt_s(self.m(f'{c}_t_blobs'))} "
                         f"({fmt_rate(size, self.m(f'{c}_t_blobs'))}), the tag's PUT at {fmt_s(self.m(f'{c}_t_tag'))}, "
                         f"all done at {fmt_s(self.m(c))}.")
            out.append(text)
        logged = self.E.get("daemon_log", [])
        out.append("- The daemons' logs (in each cache directory) had "
                   + ("no warning or error." if not logged else
                      "warnings or errors: " + "; ".join(f"{x['what']}: {x['count']} line(s), e.g. `{x['lines'][0][:200]}`"
                                                         for x in logged[:4]) + "."))
        if self.E.get("ci"):
            for t in TARGETS:
                k, w = f"ciexp_mount_{t}", f"ciexp_whole_{t}"
                out.append(
                    f"- CI job with its export ({self.NAMES[t]}): mounted {fmt_s(self.m(k))} = mount "
                    f"{fmt_s(self.m(f'{k}_mount'))} + import {fmt_s(self.m(f'{k}_import'))} + export writes "
                    f"{fmt_s(self.m(f'{k}_export'))} + unmount until published {fmt_s(self.m(f'{k}_drain'))}; the "
                    f"whole directory {fmt_s(self.m(w))} = download {fmt_s(self.m(f'{w}_download'))} + import "
                    f"{fmt_s(self.m(f'{w}_import'))} + export {fmt_s(self.m(f'{w}_export'))} + upload "
                    f"{fmt_s(self.m(f'{w}_upload'))}.")
        return "\n".join(out)

    def how(self):
        if not self.E or "export" not in self.E:
            return ""
        ex = self.E["export"]
        text = (
            f"14. Export: per run, {ex['layers']} layers of {fmt_bytes(ex['layer_size'])} of fresh random bytes (files "
            f"written and synced before the clock starts), a BuildKit cache config chaining them and an image "
            f"manifest. `ocicachefs mount --writable` on a fresh `--cache-dir` (not timed; the tag does not exist "
            f"yet), then `bench/export_replay.py` replays buildctl v0.32.2's `type=local` export into the mount "
            f"(../shared/reference/buildkit-cache.md 4b: fs-verity probe; per blob an `ingest/` directory with its "
            f"small files, `data` written in 1 MiB pieces, fsync, rename into `blobs/sha256`, directory fsync, "
            f"chmod 0444; up to 4 layers at once, then config and manifest; `index.json.lock` flocked, `oci-layout`, "
            f"`index.json` rewritten with pwrite at 0 + ftruncate), then `ocicachefs unmount`. Time: from the "
            f"replay's first operation (CLOCK_MONOTONIC, taken in the replay) until `ocicachefs unmount` returned; "
            f"the tag is then checked on the remote. Baseline in the same run, another fresh set of the same sizes: "
            f"{CURL_PARALLEL} `curl` processes at once (registry: `POST /blobs/uploads/` then `PUT -T FILE` with "
            f"the digest, for each layer and the config, then `PUT /manifests/TAG`; S3: `PUT -T FILE` of "
            f"`blobs/sha256:HEX` with `--aws-sigv4` and an unsigned payload, then `manifests/<name>`), `Expect:` "
            f"disabled; the export goes first in odd runs, the baseline in even ones, and the ratio is the median of "
            f"the runs' own ratios. Where the layers are larger than what a publisher sends in one request "
            f"(`--upload-cutoff`, 256 MiB), a third fresh set goes up by `curl` making the publisher's own requests "
            f"from files of the layers' 16 MiB pieces, 4 layers at once (registry: POST, PATCHes with "
            f"`Content-Range` one after another, the closing PUT, then the config and the manifest PUT; S3: "
            f"CreateMultipartUpload, UploadParts 4 at once, CompleteMultipartUpload, then `manifests/<name>`). "
            f"`sync` before each. The client's own cost: the same replay into a directory on the work disk, "
            f"no mount. Bytes sent: S3, the sum of `$request_length` (request line, headers and body) in nginx's "
            f"upload log; registry, the sizes of the blobs whose upload completed (digest in the closing PUT) plus "
            f"the manifest bodies (the registry logs no request sizes). Re-export: after the last run, the first "
            f"run's cache through a fresh mount and cache directory, the replay unchanged (every blob found by "
            f"`stat`, `index.json` rewritten naming the same manifest) and with a new cache config and manifest "
            f"over the same layers (what a fresh BuildKit that imported the cache writes), each followed by "
            f"`ocicachefs unmount`; requests from the logs.")
        if self.E.get("ci"):
            ci = self.E["ci"]
            text += (
                f" CI job: a cache of {ci['chains']} tags, each a chain of {ci['layers']} layers (the ci part's sizes), "
                f"in its own registry repository and S3 bucket. Mounted: page cache dropped and the server's copies "
                f"read once (as in the ci part); the clock runs from `ocicachefs mount --writable` through the ci "
                f"part's import replay of `{CI_TAG}` and the export replay of its chain plus {ci['new_layers']} new "
                f"layers ({fmt_bytes(ci['new_bytes'])}) under the same tag, to `ocicachefs unmount` returning. "
                f"Baseline, as a CI cache action restoring and saving a directory: list and download the whole "
                f"cache ({bench_s3.CI_PARALLEL} curls at once), the same import and export replays on the local copy, "
                f"then upload everything back ({bench_s3.CI_PARALLEL} at once: registry, every blob then every tag's "
                f"manifest; S3, every object, the new layers, then the `manifests/` objects). After each, the tag is "
                f"put back on its first manifest and new S3 objects are removed. Bytes received: GET responses in "
                f"the registry's log, `$body_bytes_sent` in nginx's.")
        return text

    def not_measured(self):
        return "" if self.E else "- 14: exports through a writable mount, re-export, the CI job with its export (part `export`)."

    def section(self, command, started):
        """The part's results on their own, for a run that measures only this part."""
        lines = ["| # | measurement | ocicachefs | baseline | baseline value | ratio | issue target |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        samples = ["| sample | runs | median |", "| --- | --- | --- |"]
        for k, xs in self.R["samples"].items():
            if not k.startswith(("export_", "reexport_", "ciexp_")):
                continue
            if "wire" in k:
                samples.append(f"| `{k}` | {', '.join(fmt_bytes(x) for x in xs)} | {fmt_bytes(med(xs))} |")
            elif "requests" in k:
                samples.append(f"| `{k}` | {', '.join(str(int(x)) for x in xs)} | {int(med(xs))} |")
            else:
                samples.append(f"| `{k}` | {', '.join(f'{x:.3f}' for x in xs)} s | {med(xs):.3f} s |")
        return (f"## Exports through a writable mount (issue 14)\n\n"
                f"Measured {started} with `{command}` (release build of commit {self.a.build_commit or '?'}"
                f"{', Sources/ changed' if self.a.build_dirty else ''}; {self.b.machine_state()}); "
                f"medians of {self.a.export_runs} runs (the CI job: "
                f"{self.a.runs}), the export and its `curl` baseline taking turns going first.\n\n"
                + "\n".join(lines) + "\n\n" + self.targets() + "\n\n" + self.where_time() + "\n\n"
                + self.how() + "\n\n" + "\n".join(samples) + "\n")
