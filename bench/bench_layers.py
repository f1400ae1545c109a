#!/usr/bin/env python3
"""The `layers` part of bench/run.sh (issue 15's benchmark of the `layers/` view).

Builds a real tar of a mixed tree (pseudo-random files and text-like files, so gzip's ratio is a
realistic 2-4x), compresses it with `gzip` (default level, one member) and with `zstd` (default
level: one frame, as BuildKit writes its zstd layers), and pushes each as the layer of a
BuildKit-style cache index (cache config beside it, the tar's sha256 as the descriptor's
`containerd.io/uncompressed` annotation). Then, per compression:

  cold     `stat` + `dd bs=1M` of MNT/layers/sha256/HEX on a fresh mount and --cache-dir, page
           cache dropped and the registry's copy warm (as the other cold reads); the `stat` is
           the first pass (size, diffID, checkpoints), the `dd` the read itself. Baseline:
           `curl URL | gzip -dc > /dev/null` (`zstd -dc`) of the same blob, same registry.
  random   1 MiB reads at offsets between 1/2 and the end of the layer through a new mount over
           the same cache directory (the index and the blob are there), page cache dropped
           before each; baseline: decompressing the cached blob from its start to that offset's
           end (`gzip -dc FILE | head -c END`), page cache dropped as well.
  rss      VmHWM of the daemon after the cold read and after the random reads; in full mode
           (--huge-size), a layer whose tar is that size read through `layers/` against the same
           blob read through `blobs/`, each on a fresh mount and cache.

Every figure is a median of --runs runs; the daemon's CPU-seconds are given next to each cold
read's time (less sensitive than wall time to the other work on this machine).
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (the shared helpers: mounts, dd, curl, drop_caches, /proc)
import registry_push  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
DECOMPRESS = {"gzip": "gzip -dc", "zstd": "zstd -dc"}
COMPRESS = {"gzip": ["gzip", "-c"], "zstd": ["zstd", "-q", "-c"]}
RANDOM_READS = 8

med = bench.med
fmt_s = bench.fmt_s
fmt_rate = bench.fmt_rate
fmt_bytes = bench.fmt_bytes
fmt_size_name = bench.fmt_size_name


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the layer's content

def write_tree(root, total, seed):
    """A directory tree of about `total` bytes: a fifth pseudo-random files (incompressible:
    binaries, archives), the rest text-like (lines from a word list; gzip alone makes them about
    4× smaller), so the whole tar compresses about 2.5× with gzip."""
    rng = random.Random(f"ocicachefs-bench-layers:{seed}")
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
             for _ in range(800)]
    lines = [" " * rng.choice((0, 4, 8)) + " ".join(rng.choices(words, k=rng.randint(2, 10))) + "\n"
             for _ in range(2000)]
    written, n = 0, 0
    while written < total:
        d = os.path.join(root, f"d{n // 64:04d}", f"s{n % 8}")
        os.makedirs(d, exist_ok=True)
        size = min(total - written, int(rng.lognormvariate(11.5, 1.6)) + 1)   # median ~100 KiB, a few MiB-sized
        size = min(size, 16 * MiB)
        path = os.path.join(d, f"f{n:06d}")
        with open(path, "wb") as f:
            if rng.random() < 0.2:
                f.write(rng.randbytes(size))
            else:
                left = size
                while left:
                    text = "".join(rng.choices(lines, k=min(16384, left // 40 + 1))).encode()[:left]
                    f.write(text)
                    left -= len(text)
        written += size
        n += 1
    return n


def make_layer(work, name, tar_size, seed, compressions):
    """{compression: path} of the compressed tar, and the tar's (sha256, size)."""
    src, tar = os.path.join(work, f"{name}-src"), os.path.join(work, f"{name}.tar")
    os.makedirs(src)
    files = write_tree(src, tar_size, seed)
    subprocess.run(["tar", "-C", src, "--sort=name", "--mtime=2024-05-01 12:00Z", "--owner=0", "--group=0",
                    "--numeric-owner", "-cf", tar, "."], check=True)
    subprocess.run(["rm", "-rf", src], check=True)
    h, size = hashlib.sha256(), 0
    with open(tar, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    out = {}
    for c in compressions:
        path = f"{tar}.{c}"
        start = time.perf_counter()
        with open(path, "wb") as f:
            subprocess.run(COMPRESS[c] + [tar], stdout=f, check=True)
        out[c] = path
        log(f"{name}: {c} of the {fmt_bytes(size)} tar ({files} files): {fmt_bytes(os.path.getsize(path))} "
            f"in {time.perf_counter() - start:.1f} s")
    os.unlink(tar)
    return out, "sha256:" + h.hexdigest(), size


def push_layer(registry, repo, path, media_type, diff_id):
    """Streams the file as one blob and tags a BuildKit cache index naming it (the diffID as
    `containerd.io/uncompressed`, as BuildKit annotates its layers)."""
    p = registry_push.Pusher(registry, repo)
    h, size = hashlib.sha256(), os.path.getsize(path)

    def body():
        with open(path, "rb") as f:
            while block := f.read(registry_push.CHUNK):
                h.update(block)
                yield block

    location = p.start_upload()
    r = p.check(p.session().patch(location, data=body(), headers={"Content-Type": "application/octet-stream"}), 202)
    digest = "sha256:" + h.hexdigest()
    p.finish(p.url(r.headers["Location"]), digest)
    layer = {"mediaType": media_type, "digest": digest, "size": size,
             "annotations": {"buildkit/createdat": "2024-05-01T12:00:00.000000000Z",
                             "containerd.io/uncompressed": diff_id}}
    cfg = json.dumps({"layers": [{"blob": digest}],
                      "records": [{"layers": [{"layer": 0, "createdAt": "2024-05-01T12:00:00.000000000Z"}],
                                   "digest": registry_push.sha(f"bench-layers:{digest}".encode())}]},
                     separators=(",", ":")).encode()
    cfg_desc = p.push_bytes(cfg, registry_push.CACHECONFIG)
    index = json.dumps({"schemaVersion": 2, "mediaType": registry_push.INDEX, "manifests": [layer, cfg_desc]},
                       separators=(",", ":")).encode()
    p.check(p.session().put(p.url(f"/v2/{repo}/manifests/bench"), data=index,
                            headers={"Content-Type": registry_push.INDEX}), 201)
    return {"ref": f"{registry}/{repo}:bench", "repo": repo, "digest": digest, "size": size}


# ---------------------------------------------------------------- the measurements

class LayersPart:
    def __init__(self, b, args):
        self.b, self.a = b, args
        self.R = b.R.setdefault("layers", {"seed": {}})
        self.L = {}

    def s(self, key):
        return self.b.s(f"layers_{key}")

    def sample(self, key, value):
        return self.b.sample(f"layers_{key}", value)

    def layer_path(self, info, view):
        return os.path.join(self.b.mnt, view, "sha256", info["digest"].split(":", 1)[1])

    def seed(self):
        start = time.perf_counter()
        files, diff_id, tar_size = make_layer(self.b.work, "layer", self.a.size, 1, ("gzip", "zstd"))
        for c, path in files.items():
            info = push_layer(self.b.registry, f"bench/layers-{c}", path, MEDIA[c], diff_id)
            info.update(tar_size=tar_size, diff_id=diff_id)
            self.L[c] = info
            os.unlink(path)
            self.R["seed"][c] = {"blob": info["size"], "tar": tar_size, "ratio": tar_size / info["size"]}
        self.R["seed"]["seconds"] = round(time.perf_counter() - start, 1)
        if self.a.huge_size:
            start = time.perf_counter()
            files, diff_id, tar_size = make_layer(self.b.work, "huge", self.a.huge_size, 2, ("gzip",))
            self.huge = push_layer(self.b.registry, "bench/layers-huge", files["gzip"], MEDIA["gzip"], diff_id)
            self.huge.update(tar_size=tar_size, diff_id=diff_id)
            os.unlink(files["gzip"])
            self.R["seed"]["huge"] = {"blob": self.huge["size"], "tar": tar_size,
                                      "seconds": round(time.perf_counter() - start, 1)}
        else:
            self.huge = None
        log(f"seeded the layers in {time.perf_counter() - start:.1f} s")

    def cold_server(self, info):
        self.b.drop_caches()
        self.b.warm_file(self.b.registry_blob_file(info["digest"]))

    def cold(self, c, info):
        """One cold read through a fresh mount and cache; returns the cache directory."""
        b, path = self.b, self.layer_path(info, "layers")
        cache = b.new_cache_dir()
        b.mount(info["ref"], cache)
        pid = b.daemon_pid()
        self.sample(f"{c}_idle_hwm", b.proc_status(pid, "VmHWM"))
        self.cold_server(info)
        since, cpu0 = b.log_offset(), b.cpu_split(pid)
        start = time.perf_counter()
        st = os.stat(path)
        t_stat = time.perf_counter() - start
        if st.st_size != info["tar_size"]:
            raise bench.BenchError(f"{path}: stat says {st.st_size} bytes, the tar has {info['tar_size']}")
        cpu1 = b.cpu_split(pid)
        t_dd = b.dd(path, info["tar_size"])
        cpu2 = b.cpu_split(pid)
        self.sample(f"{c}_cold", t_stat + t_dd)
        self.sample(f"{c}_cold_stat", t_stat)
        self.sample(f"{c}_cold_dd", t_dd)
        self.sample(f"{c}_cold_cpu_daemon", sum(cpu2) - sum(cpu0))
        self.sample(f"{c}_cold_cpu_daemon_pass", sum(cpu1) - sum(cpu0))
        self.sample(f"{c}_cold_cpu_daemon_user", cpu2[0] - cpu0[0])
        self.sample(f"{c}_cold_hwm", b.proc_status(pid, "VmHWM"))
        self.sample(f"{c}_cold_wire", b.settle(since, info["repo"], cache)[0])
        b.unmount()
        return cache

    def baseline_stream(self, c, info):
        url = self.b.blob_url(info["repo"], info["digest"])
        self.cold_server(info)
        t, _ = self.b.timed(["bash", "-o", "pipefail", "-c",
                             f"curl -sS --fail {shlex.quote(url)} | {DECOMPRESS[c]} > /dev/null"])
        self.sample(f"{c}_stream", t)
        self.sample(f"{c}_stream_cpu", self.b.last_cpu)

    def offsets(self, info, run):
        rng = random.Random(f"ocicachefs-bench-layers-offsets:{run}")
        size = info["tar_size"]
        return sorted(rng.randrange(size // 2, size - MiB) for _ in range(RANDOM_READS))

    def random_reads(self, c, info, cache, run):
        b = self.b
        path = self.layer_path(info, "layers")
        blob = os.path.join(cache, "blobs/sha256", info["digest"].split(":", 1)[1])
        if not os.path.exists(blob):
            raise bench.BenchError(f"the cold read left no complete blob at {blob}")
        b.drop_caches()
        since = b.log_offset()
        b.mount(info["ref"], cache)
        pid = b.daemon_pid()
        ours, base = [], []
        for offset in self.offsets(info, run):
            b.drop_caches()
            fd = os.open(path, os.O_RDONLY)
            try:
                start = time.perf_counter()
                got = os.pread(fd, MiB, offset)
                while len(got) < MiB:   # a FUSE read may answer in pieces
                    more = os.pread(fd, MiB - len(got), offset + len(got))
                    if not more:
                        break
                    got += more
                ours.append(time.perf_counter() - start)
            finally:
                os.close(fd)
            if len(got) != MiB:
                raise bench.BenchError(f"{path}: read {len(got)} bytes at {offset}, expected 1 MiB")
            b.drop_caches()
            t, _ = b.timed(["bash", "-c", f"{DECOMPRESS[c]} < {shlex.quote(blob)} | head -c {offset + MiB} > /dev/null"])
            base.append(t)
        self.sample(f"{c}_random_hwm", b.proc_status(pid, "VmHWM"))
        b.unmount()
        self.sample(f"{c}_random_wire", b.wire(since, info["repo"])[0])
        self.sample(f"{c}_random", med(ours))
        self.sample(f"{c}_random_max", max(ours))
        self.sample(f"{c}_random_base", med(base))

    def rss_huge(self):
        b, info = self.b, self.huge
        for view in ("layers", "blobs"):
            cache = b.new_cache_dir()
            b.mount(info["ref"], cache)
            pid = b.daemon_pid()
            self.cold_server(info)
            start = time.perf_counter()
            expect = info["tar_size"] if view == "layers" else info["size"]
            if view == "layers":
                os.stat(self.layer_path(info, view))
            b.dd(self.layer_path(info, view), expect)
            self.sample(f"huge_{view}_seconds", time.perf_counter() - start)
            self.sample(f"huge_{view}_hwm", b.proc_status(pid, "VmHWM"))
            b.unmount()
            b.rm(cache)

    def go(self):
        bench.record_machine_state(self.R, self.b.work, "before")
        self.seed()
        for run in range(self.a.runs):
            for c, info in self.L.items():
                cache = self.cold(c, info)
                self.baseline_stream(c, info)
                self.random_reads(c, info, cache, run)
                b = self.b
                b.rm(cache)
                log(f"run {run + 1} {c}: cold {fmt_s(self.s(f'{c}_cold')[-1])} (pass {fmt_s(self.s(f'{c}_cold_stat')[-1])}, "
                    f"daemon {self.s(f'{c}_cold_cpu_daemon')[-1]:.2f} CPU-s), curl | {DECOMPRESS[c]} "
                    f"{fmt_s(self.s(f'{c}_stream')[-1])}; random 1 MiB {fmt_s(self.s(f'{c}_random')[-1])} vs "
                    f"{fmt_s(self.s(f'{c}_random_base')[-1])}")
        if self.huge:
            for _ in range(self.a.rss_runs):
                self.rss_huge()
            log(f"huge: layers/ VmHWM {fmt_bytes(med(self.s('huge_layers_hwm')))}, "
                f"blobs/ {fmt_bytes(med(self.s('huge_blobs_hwm')))}")
        bench.record_machine_state(self.R, self.b.work, "after")


# ---------------------------------------------------------------- report

class LayersReport:
    def __init__(self, part, args):
        self.p, self.a, self.R = part, args, part.R
        self.rows, self.verdicts = [], []

    def m(self, key):
        return med(self.p.s(key))

    def build(self):
        for c, info in self.p.L.items():
            tool = DECOMPRESS[c]
            size, blob = info["tar_size"], info["size"]
            ours, base = self.m(f"{c}_cold"), self.m(f"{c}_stream")
            ratio = base / ours
            sz = f"{fmt_size_name(size)} tar, {c} blob {fmt_bytes(blob)}"
            self.rows.append((f"cold sequential read of `layers/sha256/HEX` ({sz}): `stat` + `dd bs=1M`",
                              f"{fmt_s(ours)} ({fmt_rate(size, ours)} of tar)", f"`curl | {tool} > /dev/null`",
                              f"{fmt_s(base)} ({fmt_rate(size, base)})", f"{ratio:.2f}×", "≥ 0.90×"))
            self.verdicts.append((f"{c} cold sequential read ≥ 0.9× `curl | {tool}`", ratio >= 0.9, f"{ratio:.2f}×"))
            self.rows.append(("same: the first pass alone (`stat`), then the `dd`",
                              f"{fmt_s(self.m(f'{c}_cold_stat'))} + {fmt_s(self.m(f'{c}_cold_dd'))}", "", "", "", ""))
            cpu, cpu_base = self.m(f"{c}_cold_cpu_daemon"), self.m(f"{c}_stream_cpu")
            self.rows.append(("same: the daemon's CPU-seconds (of which the pass)",
                              f"{cpu:.2f} ({self.m(f'{c}_cold_cpu_daemon_pass'):.2f})",
                              f"`curl` + `{tool.split()[0]}` CPU-seconds", f"{cpu_base:.2f}", f"{cpu / cpu_base:.2f}× the CPU", ""))
            wire = self.m(f"{c}_cold_wire")
            self.rows.append(("same: bytes from the registry", fmt_bytes(wire), "the blob", fmt_bytes(blob),
                              f"{wire / blob:.3f}×", ""))
            r, rb = self.m(f"{c}_random"), self.m(f"{c}_random_base")
            self.rows.append((f"1 MiB read at a random offset in the second half, index there (median of {RANDOM_READS} per run)",
                              fmt_s(r), f"`{tool} FILE | head -c OFFSET+1MiB` of the cached blob", fmt_s(rb),
                              f"{r / rb:.3f}× the time", "≤ 0.10×"))
            self.verdicts.append((f"{c} random 1 MiB read ≤ 1/10 of decompressing to it", r / rb <= 0.1, f"{r / rb:.3f}×"))
            self.rows.append(("same: bytes from the registry (blob complete in the cache)",
                              fmt_bytes(max(self.p.s(f"{c}_random_wire"))), "", "", "", ""))
            for key, what in (("cold_hwm", "after the cold read"), ("random_hwm", "after the random reads (new mount)")):
                self.rows.append((f"peak RSS (VmHWM) of the daemon {what}", fmt_bytes(self.m(f"{c}_{key}")),
                                  "the daemon right after mounting", fmt_bytes(self.m(f"{c}_idle_hwm")),
                                  f"+{fmt_bytes(self.m(f'{c}_{key}') - self.m(f'{c}_idle_hwm'))}", ""))
        if self.p.huge:
            hl, hb = self.m("huge_layers_hwm"), self.m("huge_blobs_hwm")
            size = self.p.huge["tar_size"]
            self.rows.append((f"peak RSS streaming a {fmt_size_name(size)} layer through `layers/` (`stat` + `dd`)",
                              fmt_bytes(hl), "the same blob through `blobs/`", fmt_bytes(hb), f"+{fmt_bytes(hl - hb)}",
                              "≤ +16 MiB"))
            self.verdicts.append((f"{fmt_size_name(size)} layer's peak RSS within 16 MiB of `blobs/`", hl - hb <= 16 * MiB,
                                  f"+{fmt_bytes(hl - hb)}"))
            self.rows.append(("same: read times", fmt_s(self.m("huge_layers_seconds")), "", fmt_s(self.m("huge_blobs_seconds")),
                              "", ""))

    def table(self):
        lines = ["| measurement | ocicachefs | baseline | baseline value | ratio | issue 15 target |",
                 "| --- | --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def targets(self):
        out = [f"- **{what}**: {'**met**' if ok else '**missed**'} — {value}" for what, ok, value in self.verdicts]
        if not self.p.huge:
            out.append("- **4 GiB layer's peak RSS within 16 MiB of `blobs/`**: not measured in this run "
                       "(quick mode, BENCH_SKIP_4G=1, or --huge-size 0).")
        return "\n".join(out)

    def raw(self):
        lines = ["| sample | runs | median |", "| --- | --- | --- |"]
        for key, xs in self.p.b.R["samples"].items():
            if not key.startswith("layers_"):
                continue
            if "wire" in key or "hwm" in key:
                vals, m = ", ".join(fmt_bytes(x) for x in xs), fmt_bytes(med(xs))
            else:
                vals, m = ", ".join(f"{x:.3f}" for x in xs) + " s", f"{med(xs):.3f} s"
            lines.append(f"| `{key}` | {vals} | {m} |")
        return "\n".join(lines)

    def section(self, command, started, heading="##"):
        seed = self.R["seed"]
        layers = "; ".join(f"{c}: {fmt_bytes(v['blob'])} ({v['ratio']:.2f}× smaller than the tar)"
                           for c, v in seed.items() if isinstance(v, dict) and "ratio" in v)
        tar = next(v["tar"] for v in seed.values() if isinstance(v, dict) and "ratio" in v)
        huge = seed.get("huge")
        return f"""{heading} The `layers/` view (issue 15)

- command: `{command}`; {started}; {bench.machine_state(self.R)}
- the layer: a {fmt_bytes(tar)} tar (`tar --sort=name`) of a fifth pseudo-random files and the rest
  text-like lines, compressed by `gzip` (level 6, one member) and `zstd` (level 3, one frame, as
  BuildKit writes zstd layers); {layers}; each pushed to docker-registry as the layer of a
  BuildKit cache index with the tar's sha256 as `containerd.io/uncompressed`
  {f"(and a {fmt_bytes(huge['tar'])} tar as a {fmt_bytes(huge['blob'])} gzip blob for the peak-RSS case)" if huge else ""}
- medians of {self.a.runs} runs; every cold read on a fresh mount and `--cache-dir`, with the page cache
  dropped and the registry's copy read once first (only the client side is cold); ratios are
  throughput ÷ the baseline's for reads (above 1 = faster), time ÷ the baseline's for the random reads

{self.table()}

Targets:

{self.targets()}

How: the cold read is `os.stat` of `MNT/layers/sha256/HEX` (the lookup runs the first pass: the
whole blob fetched, decompressed, hashed against the diffID, checkpoints written) followed by
`dd bs=1M` of it; the daemon's CPU-seconds are from `/proc/PID/stat`. The random reads are 1 MiB
`pread`s at {RANDOM_READS} offsets per run drawn between the layer's middle and its end, each through
a new mount over the cache the cold read left, page cache dropped before each; their baseline
decompresses the cached blob (the same local file the mount reads) from its start with `gzip -dc`
or `zstd -dc` through `head -c OFFSET+1MiB`. VmHWM is from `/proc/PID/status` of the daemon.

{self.raw()}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--registry-dir", required=True)
    ap.add_argument("--registry-port", type=int, required=True)
    ap.add_argument("--registry-pid", type=int)
    ap.add_argument("--size", type=int, default=GiB, help="the tar's size of the benchmarked layer")
    ap.add_argument("--huge-size", type=int, default=0, help="the tar's size of the peak-RSS layer (0: skip)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rss-runs", type=int, default=1)
    ap.add_argument("--doc", help="write the section here")
    ap.add_argument("--append", action="store_true", help="append to --doc (another part's report is there)")
    ap.add_argument("--command", default="bench/run.sh --only layers")
    args = ap.parse_args()
    args.parts = "layers"
    b = bench.Bench(args)
    part = LayersPart(b, args)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        part.go()
    except bench.BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        b.cleanup()
        with open(os.path.join(b.work, "results-layers.json"), "w") as f:
            json.dump(b.R, f, indent=1, default=str)
    report = LayersReport(part, args)
    report.build()
    text = report.section(args.command, started)
    print("\n" + text)
    if args.doc:
        with open(args.doc, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "# Performance: the `layers/` view\n\n") + text)
        log(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
