#!/usr/bin/env python3
"""Replays, on an OCI layout directory, the file operations buildctl v0.32.2 makes when it
exports a cache with `--export-cache type=local,dest=DIR` (as observed with strace, see
../shared/reference/buildkit-cache.md section 4b), for the benchmark's `export` part.

  export_replay.py LAYOUT PLAN.json

PLAN.json: {"layers": [BLOB...], "blobs": [BLOB...], "tag": NAME, "manifest": DESCRIPTOR}
where BLOB is {"digest": "sha256:HEX", "size": N, "src": FILE}: the layers are written up to
four at once (one thread each), then the other blobs (cache config, manifest) one after
another, then index.json points NAME at DESCRIPTOR. A blob already in blobs/sha256 is not
written again (a `stat` finds it), as buildctl skips it.

Per blob: `stat` of blobs/sha256/HEX; `ingest/<id>/` with `ref`, `total` and the
`startedat`/`updatedat` pair (O_SYNC temporaries renamed into place); `data` opened without
O_TRUNC, sequential 1 MiB writes from SRC, fsync, fstat, close; `rename` into blobs/sha256/HEX;
fsync of blobs/sha256; utimensat; the ingest directory removed; chmod 0444. Then
`index.json.lock` (O_CREAT, flock LOCK_EX|LOCK_NB), `oci-layout`, index.json read, written at
offset 0 and truncated, closed; the lock released and unlinked. Before all of it, the fs-verity
probe (its errors are ignored, as buildctl's are).

Prints one JSON line: CLOCK_MONOTONIC seconds (comparable with the benchmark's
time.monotonic()) of the first operation (`first`; `first_wall` is the same instant in wall-clock
time, for servers' logs), of each blob's rename (`commits`), of the last blob's commit
(`blobs_done`) and of index.json's close (`index_closed`), the bytes written into blobs and the
blobs skipped.
"""
import concurrent.futures
import errno
import fcntl
import hashlib
import json
import os
import sys
import threading
import time

PIECE = 1 << 20
LAYER_THREADS = 4
REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
# _IOW('f', 133, struct fsverity_enable_arg), the argument being 128 bytes.
FS_IOC_ENABLE_VERITY = 0x40806685
TOLERATED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL, errno.EROFS, errno.EPERM)


def stamp(path):
    """startedat/updatedat: a 30-byte timestamp written O_SYNC to a temporary, renamed onto the name."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_SYNC, 0o666)
    try:
        os.write(fd, time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()).encode().ljust(30)[:30])
    finally:
        os.close(fd)
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    os.rename(tmp, path)


def remove_tree(path):
    """buildctl's removal: unlink (EISDIR), rmdir (ENOTEMPTY), then each entry, then rmdir."""
    for attempt in (os.unlink, os.rmdir):
        try:
            attempt(path)
            return
        except OSError:
            pass
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def verity_probe(layout):
    """mkdir .fsverity-check-N, create `supported`, FS_IOC_ENABLE_VERITY on it, remove both."""
    probe = os.path.join(layout, f".fsverity-check-{os.getpid()}{time.monotonic_ns() % 100000}")
    try:
        os.mkdir(probe, 0o700)
    except OSError as e:
        if e.errno in TOLERATED:
            return
        raise
    target = os.path.join(probe, "supported")
    os.close(os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666))
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, bytes(128))
    except OSError as e:
        if e.errno not in TOLERATED:
            raise
    finally:
        os.close(fd)
    remove_tree(probe)


class Export:
    def __init__(self, layout):
        self.layout = layout
        self.blobs_dir = os.path.join(layout, "blobs", "sha256")
        self.lock = threading.Lock()
        self.written = 0
        self.skipped = 0
        self.commits = []

    def write_blob(self, blob):
        hexd = blob["digest"].split(":", 1)[1]
        target = os.path.join(self.blobs_dir, hexd)
        try:
            os.stat(target)
            with self.lock:
                self.skipped += 1
            return
        except FileNotFoundError:
            pass
        ingest = os.path.join(self.layout, "ingest")
        os.makedirs(ingest, 0o777, exist_ok=True)
        ref = f"bench-export-{blob['digest']}"
        work = os.path.join(ingest, hashlib.sha256(ref.encode()).hexdigest())
        os.mkdir(work, 0o755)
        for name, text in (("ref", ref), ("total", str(blob["size"]))):
            fd = os.open(os.path.join(work, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        stamp(os.path.join(work, "startedat"))
        stamp(os.path.join(work, "updatedat"))
        data = os.path.join(work, "data")
        out = os.open(data, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.lseek(out, 0, os.SEEK_SET)
            done = 0
            with open(blob["src"], "rb", buffering=0) as src:
                buf = bytearray(PIECE)
                view = memoryview(buf)
                while n := src.readinto(buf):
                    put = 0
                    while put < n:
                        put += os.write(out, view[put:n])
                    done += n
            if done != blob["size"]:
                raise RuntimeError(f"{blob['src']} holds {done} bytes, the plan says {blob['size']}")
            os.fsync(out)
            os.fstat(out)
        finally:
            os.close(out)
        os.makedirs(self.blobs_dir, 0o755, exist_ok=True)
        for look in (os.stat, os.lstat):
            try:
                look(target)
            except FileNotFoundError:
                pass
        os.rename(data, target)
        committed = time.monotonic()
        dirfd = os.open(self.blobs_dir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        os.utime(target)
        remove_tree(work)
        os.chmod(target, 0o444)
        with self.lock:
            self.written += blob["size"]
            self.commits.append(committed)

    def write_index(self, tag, manifest):
        lock_path = os.path.join(self.layout, "index.json.lock")
        lock = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fd = os.open(os.path.join(self.layout, "oci-layout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(fd, b'{"imageLayoutVersion":"1.0.0"}')
            finally:
                os.close(fd)
            fd = os.open(os.path.join(self.layout, "index.json"), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                old = b""
                while chunk := os.read(fd, PIECE):
                    old += chunk
                index = json.loads(old) if old.strip() else {"schemaVersion": 2, "manifests": []}
                entries = [m for m in index.get("manifests") or [] if (m.get("annotations") or {}).get(REF_NAME) != tag]
                entries.append(dict(manifest, annotations={REF_NAME: tag}))
                new = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries},
                                 separators=(",", ":")).encode()
                os.pwrite(fd, new, 0)
                os.ftruncate(fd, len(new))
            finally:
                os.close(fd)
            fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)
        os.unlink(lock_path)


def export(layout, plan):
    os.umask(0)
    result = {"first": time.monotonic(), "first_wall": time.time()}
    verity_probe(layout)
    ex = Export(layout)
    with concurrent.futures.ThreadPoolExecutor(LAYER_THREADS) as pool:
        for f in [pool.submit(ex.write_blob, b) for b in plan["layers"]]:
            f.result()
    for blob in plan.get("blobs", []):
        ex.write_blob(blob)
    result["blobs_done"] = time.monotonic()
    ex.write_index(plan["tag"], plan["manifest"])
    result["index_closed"] = time.monotonic()
    result["commits"] = sorted(ex.commits)
    result["written"] = ex.written
    result["skipped"] = ex.skipped
    return result


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: export_replay.py LAYOUT PLAN.json")
    with open(sys.argv[2]) as f:
        plan = json.load(f)
    print(json.dumps(export(sys.argv[1], plan)), flush=True)


if __name__ == "__main__":
    main()
