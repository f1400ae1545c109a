#!/usr/bin/env python3
"""A stand-in for `buildctl build` and `docker buildx build` in the CI recipe tests
(Tests/IntegrationTests/RecipeTests.swift): BuildKit is not installed where the tests run.

The BUILD is stood in for; the cache traffic is not. Installed on PATH as `buildctl` and as
`docker` (it goes by $BUILDKIT_STANDIN_TOOL, else the name it was called by), it performs on
the `type=local` cache directories exactly the file operations BuildKit v0.32.2's client
performs there (shared/reference/buildkit-cache.md sections 2, 3, 4 and 4b):

- import (`--import-cache` / `--cache-from type=local,src=DIR[,tag=T]`): the fs-verity probe;
  `index.json.lock` created, share-locked, `index.json` read, unlocked, closed, unlinked; the
  tag's manifest and cache config stat-ed and read whole (at most 1 MiB each); then the layers of
  the cached steps, base first, one at a time, each copied whole in 1 MiB `pread`s with an
  open/close per chunk, and checked against its digest (as buildkitd does on commit);
- export (`--export-cache` / `--cache-to type=local,dest=DIR[,tag=T][,mode=max]`): the probe;
  per blob `stat`, `ingest/<id>/` with ref, total, startedat/updatedat, `data` written in 1 MiB
  pieces, fsync, rename into `blobs/sha256/<hex>`, fsync of the directory, utimensat, the ingest
  directory removed, chmod 0444 (layers up to four at once, then the cache config, then the
  manifest); then `index.json.lock` locked exclusively, `oci-layout`, `index.json` read, written
  at offset 0, truncated and closed, the lock released and unlinked.

The "build" itself: every RUN/COPY/ADD line of the Dockerfile is a step whose layer is
deterministic pseudo-random bytes derived from the instructions up to it. A step is CACHED when
the imported cache config has a record with its cache key; otherwise it is "built". The cache
written is BuildKit's image-manifest variant (v0.21+): a manifest whose config is the cache
config. As a fresh buildkitd does, every export writes a new cache config and manifest.

Each run appends one JSON line to $BUILDKIT_STANDIN_REPORT (when set): the steps with their
outcome and layer digest, what the import found, and what the export wrote.

Anything it does not understand (a flag, a cache type other than local) is an error, so a
recipe cannot pass with a command BuildKit would reject or that this stand-in ignores.
"""
import concurrent.futures
import errno
import fcntl
import hashlib
import json
import os
import sys
import time

CHUNK = 1 << 20
LAYER_THREADS = 4
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CACHE_CONFIG_TYPE = "application/vnd.buildkit.cacheconfig.v0"
FS_IOC_ENABLE_VERITY = 0x40806685  # _IOW('f', 133, struct fsverity_enable_arg /* 128 bytes */)
TOLERATED_PROBE_ERRORS = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL, errno.EROFS, errno.EPERM)


class Refused(Exception):
    """What BuildKit would refuse: printed as `error: …`, exit status 1."""


def progress(text):
    print(text, file=sys.stderr, flush=True)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# MARK: command lines

def parse_attributes(text, flag):
    attributes = {}
    for field in text.split(","):
        key, sep, value = field.partition("=")
        if not sep:
            raise Refused(f"{flag} {text}: `{field}` is not KEY=VALUE")
        attributes[key] = value
    if attributes.get("type") != "local":
        raise Refused(f"{flag} {text}: the stand-in replays type=local caches only")
    return attributes


def parse_buildctl(args):
    """buildctl [--addr A] build --frontend dockerfile.v0 --local context=D --local dockerfile=D
    [--opt K=V] [--import-cache SPEC]... [--export-cache SPEC]... [--output SPEC] [--progress P]"""
    while args and args[0].startswith("--") and args[0] != "build":
        flag = args.pop(0)
        if flag in ("--addr", "--tlscacert", "--tlscert", "--tlskey", "--tlsservername"):
            args.pop(0)
        elif flag not in ("--debug",):
            raise Refused(f"buildctl: unknown global flag {flag}")
    if not args or args.pop(0) != "build":
        raise Refused("buildctl: only `buildctl build` is stood in for")
    plan = {"imports": [], "exports": [], "context": None, "dockerfile": None}
    while args:
        flag = args.pop(0)
        if "=" in flag and flag.startswith("--"):
            flag, value = flag.split("=", 1)
            args.insert(0, value)
        if not args:
            raise Refused(f"buildctl build: {flag} needs a value")
        value = args.pop(0)
        if flag == "--frontend":
            if value != "dockerfile.v0":
                raise Refused(f"buildctl build: frontend {value} is not stood in for")
        elif flag == "--local":
            name, _, directory = value.partition("=")
            if name not in ("context", "dockerfile"):
                raise Refused(f"buildctl build: --local {value}")
            plan[name] = directory
        elif flag == "--import-cache":
            plan["imports"].append(parse_attributes(value, flag))
        elif flag == "--export-cache":
            plan["exports"].append(parse_attributes(value, flag))
        elif flag in ("--opt", "--output", "--progress", "--metadata-file"):
            pass  # the image and its output are not stood in for
        else:
            raise Refused(f"buildctl build: unknown flag {flag}")
    if plan["context"] is None or plan["dockerfile"] is None:
        raise Refused("buildctl build: needs --local context=DIR and --local dockerfile=DIR")
    plan["dockerfile"] = os.path.join(plan["dockerfile"], "Dockerfile")
    return plan


def parse_docker(args):
    """docker buildx build [--cache-from SPEC]... [--cache-to SPEC]... [-t T] [-f F] [--load|--push] CONTEXT"""
    if args[:2] != ["buildx", "build"]:
        raise Refused("docker: only `docker buildx build` is stood in for")
    args = args[2:]
    plan = {"imports": [], "exports": [], "context": None, "dockerfile": None}
    while args:
        flag = args.pop(0)
        if flag.startswith("--") and "=" in flag:
            flag, value = flag.split("=", 1)
            args.insert(0, value)
        if flag in ("--load", "--push", "--pull", "--no-cache"):
            if flag == "--no-cache":
                raise Refused("docker buildx build: --no-cache would ignore the imported cache")
            continue
        if not flag.startswith("-"):
            if plan["context"] is not None:
                raise Refused(f"docker buildx build: a second context {flag}")
            plan["context"] = flag
            continue
        if not args:
            raise Refused(f"docker buildx build: {flag} needs a value")
        value = args.pop(0)
        if flag == "--cache-from":
            plan["imports"].append(parse_attributes(value, flag))
        elif flag == "--cache-to":
            plan["exports"].append(parse_attributes(value, flag))
        elif flag in ("-f", "--file"):
            plan["dockerfile"] = value
        elif flag in ("-t", "--tag", "--platform", "--build-arg", "--progress", "--label", "--target", "--builder"):
            pass  # the image and its output are not stood in for
        else:
            raise Refused(f"docker buildx build: unknown flag {flag}")
    if plan["context"] is None:
        raise Refused("docker buildx build: no context given")
    if plan["dockerfile"] is None:
        plan["dockerfile"] = os.path.join(plan["context"], "Dockerfile")
    return plan


# MARK: the stood-in build

def layer_bytes(key, size):
    """`size` bytes that do not compress, determined by `key`."""
    out = bytearray()
    counter = 0
    seed = key.encode()
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def steps_of(dockerfile):
    try:
        with open(dockerfile) as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise Refused(f"failed to read dockerfile: {e}")
    instructions = [line for line in lines if line.split(" ", 1)[0].upper() in ("RUN", "COPY", "ADD")]
    if not instructions:
        raise Refused(f"{dockerfile} has no RUN, COPY or ADD step")
    base = next((line for line in lines if line.upper().startswith("FROM ")), "FROM scratch")
    steps, key = [], sha256(base.encode())
    for number, instruction in enumerate(instructions):
        key = sha256((key + "\n" + instruction).encode())
        steps.append({"instruction": instruction, "key": key, "size": (3 << 19) + number * 300_000})
    return steps


# MARK: file operations

def open_file(path, flags, mode=0o666):
    """open(2), then the F_GETFL/F_SETFL pair Go's runtime does on every descriptor."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    status = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, status | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETFL, status)
    return fd


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_tree(path):
    """Go's os.RemoveAll of a directory: unlink (EISDIR), rmdir (ENOTEMPTY), each entry, rmdir."""
    for attempt in (os.unlink, os.rmdir):
        try:
            attempt(path)
            return
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
    for name in sorted(os.listdir(path)):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def verity_probe(root):
    """containerd 2.x store: mkdir .fsverity-check-N, `supported` created, reopened read-only,
    FS_IOC_ENABLE_VERITY on it, the directory removed; failures are warnings. Returns the
    read-only descriptor, which stays open until the store is done with."""
    probe = os.path.join(root, f".fsverity-check-{os.getpid()}{time.monotonic_ns() % 100000}")
    try:
        os.mkdir(probe, 0o700)
    except OSError as e:
        if e.errno in TOLERATED_PROBE_ERRORS:
            progress(f"WARN: fs-verity probe in {root}: {e.strerror}")
            return None
        raise
    supported = os.path.join(probe, "supported")
    os.close(open_file(supported, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
    readonly = open_file(supported, os.O_RDONLY)
    argument = bytearray(128)
    argument[0], argument[4], argument[9] = 1, 1, 0x10  # version 1, SHA-256, 4096-byte blocks
    try:
        fcntl.ioctl(readonly, FS_IOC_ENABLE_VERITY, bytes(argument))
        raise Refused(f"{root} accepted FS_IOC_ENABLE_VERITY: every blob would be opened again for fs-verity")
    except OSError as e:
        if e.errno not in TOLERATED_PROBE_ERRORS:
            raise
    remove_tree(probe)
    return readonly


def stat_size(path):
    return os.stat(path).st_size


def read_small_blob(root, digest):
    """The manifest or the cache config: stat (1 MiB limit), open, one pread, close."""
    path = os.path.join(root, "blobs", "sha256", digest.split(":", 1)[1])
    size = stat_size(path)
    stat_size(path)
    if size > CHUNK:
        raise Refused(f"blob {digest} is too large ({size} > {CHUNK})")
    fd = open_file(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise Refused(f"short read of {path}: {len(data)} of {size}")
    return data


def copy_layer(root, digest, size):
    """containerd's content server: per 1 MiB chunk stat, stat, open, pread, close, until a
    pread returns nothing; then the digest is checked, as buildkitd does when it commits."""
    path = os.path.join(root, "blobs", "sha256", digest.split(":", 1)[1])
    hasher, total, offset = hashlib.sha256(), 0, 0
    while True:
        for _ in range(2):
            if stat_size(path) != size:
                raise Refused(f"stat of {path} says {stat_size(path)} bytes, the descriptor {size}")
        fd = open_file(path, os.O_RDONLY)
        try:
            piece = os.pread(fd, CHUNK, offset)
        finally:
            os.close(fd)
        if not piece:
            break
        hasher.update(piece)
        total += len(piece)
        offset += len(piece)
    if total != size or "sha256:" + hasher.hexdigest() != digest:
        raise Refused(f"failed to load cached layer {digest}: got {total} bytes hashing to sha256:{hasher.hexdigest()}")


def read_index_shared(root):
    """client/ociindex: the lock file created and share-locked, index.json read, lock dropped."""
    lock_path = os.path.join(root, "index.json.lock")
    lock = open_file(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        try:
            with open(os.path.join(root, "index.json"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)
    os.unlink(lock_path)
    return json.loads(data) if data else None


# MARK: import

def import_cache(attributes, steps):
    """Returns what the import found, and marks the cached steps."""
    root, tag = attributes.get("src", ""), attributes.get("tag", "latest")
    found = {"src": root, "tag": tag, "manifest": None, "layersRead": []}
    os.stat(root)
    probe = verity_probe(root)
    try:
        index = read_index_shared(root)
        entries = (index or {}).get("manifests") or []
        entry = next((e for e in entries if (e.get("annotations") or {}).get(CONTAINERD_NAME) == tag), None) or \
            next((e for e in entries if (e.get("annotations") or {}).get(REF_NAME) == tag), None)
        if entry is None:
            progress(f"WARN: local cache import at {root} not found due to err: tag {tag} not found in index.json")
            return found
        manifest_digest = entry["digest"]
        manifest = json.loads(read_small_blob(root, manifest_digest))
        found["manifest"] = manifest_digest
        if manifest.get("mediaType") == INDEX_TYPE or "manifests" in manifest:
            descriptors = manifest.get("manifests") or []
            config_descriptor = next((d for d in descriptors if d.get("mediaType") == CACHE_CONFIG_TYPE), None)
            layer_descriptors = [d for d in descriptors if d.get("mediaType") != CACHE_CONFIG_TYPE]
        else:
            config_descriptor = manifest.get("config")
            layer_descriptors = manifest.get("layers") or []
        if config_descriptor is None or config_descriptor.get("mediaType") != CACHE_CONFIG_TYPE:
            raise Refused(f"{manifest_digest} in {root} is not a BuildKit cache manifest")
        sizes = {d["digest"]: d["size"] for d in layer_descriptors}
        for d in layer_descriptors:
            if "containerd.io/uncompressed" not in (d.get("annotations") or {}):
                raise Refused(f"missing uncompressed annotation for {d['digest']}")
        config = json.loads(read_small_blob(root, config_descriptor["digest"]))
        blob_of = {}
        for record in config.get("records") or []:
            layers = record.get("layers") or []
            if layers:
                blob_of[record.get("digest")] = config["layers"][layers[0]["layer"]]["blob"]
        # The solver loads the results of the cached prefix of steps, base first.
        for step in steps:
            blob = blob_of.get(step["key"])
            if blob is None or blob not in sizes:
                break
            copy_layer(root, blob, sizes[blob])
            step["cached"], step["layer"] = True, blob
            found["layersRead"].append(blob)
        return found
    finally:
        if probe is not None:
            os.close(probe)


# MARK: export

def timestamp():
    """RFC 3339 with nanoseconds: 30 bytes, as Go writes startedat/updatedat and createdAt."""
    now = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)).encode() + b".%09dZ" % (now % 10**9)


def write_stamp(path):
    """startedat/updatedat: 30 bytes written O_SYNC to `<name>.tmp`, renamed onto the name."""
    temporary = path + ".tmp"
    fd = open_file(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_SYNC)
    try:
        write_all(fd, timestamp())
    finally:
        os.close(fd)
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    os.rename(temporary, path)


def write_small(path, data):
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def export_blob(root, role, digest, data):
    """containerd's local content writer and its commit. Returns False when the blob was there."""
    target = os.path.join(root, "blobs", "sha256", digest.split(":", 1)[1])
    try:
        os.stat(target)
        return False
    except FileNotFoundError:
        pass
    try:
        os.mkdir(os.path.join(root, "ingest"), 0o777)
    except FileExistsError:
        pass
    ref = f"{role}-{digest}"
    ingest = os.path.join(root, "ingest", hashlib.sha256(ref.encode()).hexdigest())
    os.mkdir(ingest, 0o755)
    write_small(os.path.join(ingest, "ref"), ref.encode())
    write_small(os.path.join(ingest, "total"), str(len(data)).encode())
    write_stamp(os.path.join(ingest, "startedat"))
    write_stamp(os.path.join(ingest, "updatedat"))
    data_path = os.path.join(ingest, "data")
    fd = open_file(data_path, os.O_WRONLY | os.O_CREAT)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        for offset in range(0, len(data), CHUNK):
            write_all(fd, data[offset:offset + CHUNK])
        os.fsync(fd)
        if os.fstat(fd).st_size != len(data):
            raise Refused(f"{data_path}: fstat says {os.fstat(fd).st_size} bytes, {len(data)} were written")
    finally:
        os.close(fd)
    for directory in (os.path.join(root, "blobs"), os.path.join(root, "blobs", "sha256")):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
    for look in (os.stat, os.lstat):
        try:
            look(target)
        except FileNotFoundError:
            pass
    os.rename(data_path, target)
    directory = open_file(os.path.join(root, "blobs", "sha256"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    os.utime(target)
    remove_tree(ingest)
    os.chmod(target, 0o444)
    return True


def write_index(root, tag, manifest_digest, manifest_size):
    """client/ociindex: exclusive lock, oci-layout, index.json read, rewritten in place with
    pwrite at 0 and ftruncate, closed (the mount's commit point for the tag), lock unlinked."""
    lock_path = os.path.join(root, "index.json.lock")
    lock = open_file(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise Refused(f"could not lock {lock_path}: {e.strerror}")
        write_small(os.path.join(root, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}')
        index_path = os.path.join(root, "index.json")
        fd = open_file(index_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            existing = b""
            while True:
                piece = os.read(fd, 1 << 16)
                if not piece:
                    break
                existing += piece
            entries = json.loads(existing).get("manifests") or [] if existing else []
            entries = [e for e in entries if (e.get("annotations") or {}).get(REF_NAME) != tag]
            entries.append({"mediaType": MANIFEST_TYPE, "digest": manifest_digest, "size": manifest_size,
                            "annotations": {REF_NAME: tag}})
            data = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries},
                              separators=(",", ":")).encode()
            if os.pwrite(fd, data, 0) != len(data):
                raise Refused(f"short pwrite of {index_path}")
            os.ftruncate(fd, len(data))
        finally:
            # BuildKit ignores the error close returns; so does this.
            try:
                os.close(fd)
            except OSError as e:
                progress(f"(close of {index_path} failed: {e.strerror}; BuildKit does not look)")
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)
    os.unlink(lock_path)


def export_cache(attributes, steps):
    root, tag = attributes.get("dest", ""), attributes.get("tag", "latest")
    os.makedirs(root, 0o755, exist_ok=True)
    probe = verity_probe(root)
    try:
        created = timestamp().decode()
        layers = []
        for step in steps:
            if step.get("layer") is None:
                data = layer_bytes(step["key"], step["size"])
                step["layer"], step["bytes"] = sha256(data), data
            layers.append(step)
        listed = sorted({step["layer"] for step in layers})
        position = {digest: number for number, digest in enumerate(listed)}
        size_of = {step["layer"]: step["size"] for step in layers}
        config_layers = [None] * len(listed)
        records = []
        for number, step in enumerate(layers):
            entry = {"blob": step["layer"]}
            if number > 0:
                entry["parent"] = position[layers[number - 1]["layer"]]
            config_layers[position[step["layer"]]] = entry
            record = {"digest": step["key"], "layers": [{"layer": position[step["layer"]], "createdAt": created}]}
            if number > 0:
                record["inputs"] = [[{"selector": "", "link": number - 1}]]
            records.append(record)
        # A fresh buildkitd writes a new config (and so a new manifest) even for the same layers:
        # createdAt, to the nanosecond, differs.
        config = json.dumps({"layers": config_layers, "records": records},
                            separators=(",", ":")).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CACHE_CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": digest, "size": size_of[digest],
                        "annotations": {"buildkit/createdat": created,
                                        "containerd.io/uncompressed": sha256(b"uncompressed " + digest.encode())}}
                       for digest in listed],
        }, separators=(",", ":")).encode()

        written = []
        fresh = [step for step in layers if "bytes" in step]
        with concurrent.futures.ThreadPoolExecutor(LAYER_THREADS) as pool:
            outcomes = list(pool.map(lambda step: export_blob(root, "layer", step["layer"], step["bytes"]), fresh))
        written += [step["layer"] for step, outcome in zip(fresh, outcomes) if outcome]
        for step in layers:
            if "bytes" not in step:
                os.stat(os.path.join(root, "blobs", "sha256", step["layer"].split(":", 1)[1]))  # AlreadyExists
        for role, data in (("config", config), ("manifest", manifest)):
            if export_blob(root, role, sha256(data), data):
                written.append(sha256(data))
        write_index(root, tag, sha256(manifest), len(manifest))
        return {"dest": root, "tag": tag, "manifest": sha256(manifest), "config": sha256(config), "written": written}
    finally:
        if probe is not None:
            os.close(probe)


def main():
    tool = os.environ.get("BUILDKIT_STANDIN_TOOL") or os.path.basename(sys.argv[0])
    try:
        if tool == "docker":
            plan = parse_docker(sys.argv[1:])
        elif tool == "buildctl":
            plan = parse_buildctl(sys.argv[1:])
        else:
            raise Refused(f"called as {tool}: install it as `buildctl` or `docker`")
        steps = steps_of(plan["dockerfile"])
        progress(f"[stand-in {tool}] the build is stood in for; the cache's file operations are BuildKit's")
        imports = [import_cache(attributes, steps) for attributes in plan["imports"]]
        for number, step in enumerate(steps, 1):
            progress(f"#{number + 1} [{number}/{len(steps)}] {step['instruction']}")
            progress(f"#{number + 1} {'CACHED' if step.get('cached') else 'DONE'}")
        exports = [export_cache(attributes, steps) for attributes in plan["exports"]]
        report = {"tool": tool, "imports": imports, "exports": exports,
                  "steps": [{"instruction": s["instruction"], "cached": bool(s.get("cached")), "layer": s.get("layer")}
                            for s in steps]}
    except Refused as e:
        progress(f"error: {e}")
        return 1
    except OSError as e:
        progress(f"error: {e}")
        return 1
    if os.environ.get("BUILDKIT_STANDIN_REPORT"):
        with open(os.environ["BUILDKIT_STANDIN_REPORT"], "a") as out:
            out.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
