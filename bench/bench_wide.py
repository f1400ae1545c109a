"""The benchmark's `wide` part (issue 13 item 4), driven by bench.py: a cache naming very many
blobs. Mounting one whose manifest named 20,000 descriptors took 8.3 s and `ls -l` of its
blobs 6.9 s, about 4x per doubling; the target is that mounting and listing 100,000 blobs each
stay under a second.

The caches (bench/registry_push.py wide, into the docker-registry run.sh started):
  20,000 layers   one image manifest of 20,000 layer descriptors (about 3 MB, the issue's case),
                  its config a BuildKit cache config chaining them
  100,000 layers  an OCI index of five such manifests (ocicachefs refuses a manifest or config
                  over 4 MiB, so no single document can name 100,000 layers)
  1 layer         the same form with one layer: the mount baseline
Layers are a few hundred bytes each, written straight into the registry's storage; the mount
only needs their descriptors (sizes known, content fetched lazily).

Per size and run, on a fresh cache directory: `ocicachefs mount` (it returns once index.json is
readable through the kernel), `stat` of one blob, `ls -f MNT/blobs/sha256 | wc -l` (the readdir
alone), then, once the kernel has forgotten the names, `ls -l MNT/blobs/sha256 | wc -l` twice, the
daemon's RSS and CPU; baselines in the same run: the 1-layer mount and `ls -f`, `ls -l` of a tmpfs
directory holding as many empty files with the same names. (libfuse's passthrough_ll is no
baseline here: it holds a descriptor per inode the kernel looks up, and a container's limit of
open files, 20,000 on the bench machine, stops its listing short.)
"""
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (20000, 100000)
PER_MANIFEST = 20000
TARGET_SECONDS = 1.0
LS_ENV = dict(os.environ, LC_ALL="C")


def med(xs):
    return statistics.median(xs)


def fmt_s(s):
    return "—" if s is None else (f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s")


def fmt_mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def spread(xs):
    return "" if len(xs) < 2 else f" [{fmt_s(min(xs))}–{fmt_s(max(xs))}]"


class WidePart:
    def __init__(self, bench, args):
        self.b, self.a, self.R = bench, args, bench.R
        self.W = self.R.setdefault("wide", {"sizes": list(SIZES), "seed": {}})
        self.mnt = bench.mnt
        self.tmpfs = os.path.join(bench.work, "wide-tmpfs")
        self.tmpfs_mounted = False

    def log(self, msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cleanup(self):
        if self.tmpfs_mounted:
            subprocess.run(["umount", self.tmpfs], capture_output=True)
            self.tmpfs_mounted = False

    # ------------------------------------------------------------ seeding
    def seed(self):
        push = os.path.join(HERE, "registry_push.py")
        self.caches = {}
        for n in (1,) + SIZES:
            name = f"wide-{n}"
            out = os.path.join(self.b.work, f"seed-{name}.json")
            t, _ = self.b.timed([sys.executable, push, "wide", "--registry", self.b.registry, "--repo", f"bench/{name}",
                                 "--tag", "bench", "--count", str(n), "--per-manifest", str(PER_MANIFEST),
                                 "--storage", self.b.reg_dir, "--out", out])
            with open(out) as f:
                info = json.load(f)
            # Entries of blobs/sha256: the layers, each manifest and its config, and the index.
            info["entries"] = n + 2 * len(info["manifests"]) + (1 if n > PER_MANIFEST else 0)
            self.caches[n] = info
            self.W["seed"][str(n)] = {"seconds": round(t, 1), "manifests": len(info["manifests"]),
                                      "manifest_bytes": [m["size"] for m in info["manifests"]],
                                      "top": info["manifest"]["mediaType"].rsplit(".", 2)[-2],
                                      "entries": info["entries"]}
            self.log(f"seeded {info['ref']}: {n} layer(s) in {len(info['manifests'])} manifest(s) in {t:.1f} s")

    def make_baseline_dirs(self):
        """A tmpfs with, per size, a directory of that many empty files named as the blobs are."""
        os.makedirs(self.tmpfs, exist_ok=True)
        self.b.run(["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=400k", "tmpfs", self.tmpfs])
        self.tmpfs_mounted = True
        for n in SIZES:
            d = os.path.join(self.tmpfs, str(n))
            os.mkdir(d)
            for layer in self.caches[n]["layers"]:
                open(os.path.join(d, layer["digest"].split(":", 1)[1]), "wb").close()

    # ------------------------------------------------------------ measuring
    def ls(self, directory, expect):
        """Seconds of `ls -l DIR | wc -l`, checked to list `expect` entries (plus its total line)."""
        t, p = self.b.timed(["sh", "-c", 'ls -l "$1" | wc -l', "sh", directory])
        lines = int(p.stdout.strip())
        if lines != expect + 1:
            raise self.b.error(f"ls -l {directory} printed {lines} lines, expected {expect} entries + 1")
        return t

    def readdir(self, directory, expect):
        """Seconds of `ls -f DIR | wc -l`: the directory read and nothing else (no sorting, no
        stat), checked to list `expect` entries plus `.` and `..`."""
        t, p = self.b.timed(["sh", "-c", 'ls -f "$1" | wc -l', "sh", directory])
        lines = int(p.stdout.strip())
        if lines != expect + 2:
            raise self.b.error(f"ls -f {directory} printed {lines} lines, expected {expect} entries + 2")
        return t

    def forget_names(self):
        """Makes the kernel forget every name and inode it cached (sending FORGETs to FUSE
        daemons), so that the next listing is a first one again."""
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")

    def stat_size(self, path, expect):
        t, p = self.b.timed(["stat", "-c", "%s", path])
        if int(p.stdout.strip()) != expect:
            raise self.b.error(f"stat {path}: size {p.stdout.strip()}, expected {expect}")
        return t

    def documents(self, n):
        """(URL, size, headers) of what mounting the cache fetches: the tag's manifest (or
        index), each image manifest under an index, and each config."""
        info = self.caches[n]
        base = f"http://{self.b.registry}/v2/bench/wide-{n}"
        accept = "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
        docs = [(f"{base}/manifests/bench", info["manifest"]["size"], [accept])]
        if n > PER_MANIFEST:
            docs += [(f"{base}/manifests/{m['digest']}", m["size"], [accept]) for m in info["manifests"]]
        docs += [(f"{base}/blobs/{c['digest']}", c["size"], []) for c in info["configs"]]
        return docs

    def fetch_documents(self, n):
        """Seconds `curl` takes to GET, one after another, what mounting the cache fetches."""
        start = time.perf_counter()
        for url, size, headers in self.documents(n):
            self.b.curl(url, size, headers=headers)
        return time.perf_counter() - start

    def fetch_documents_parallel(self, n):
        """The same as the mount fetches it: the tag's document first, then the rest four at
        a time (one curl process each), as the mount fetches an index's manifests."""
        docs = self.documents(n)
        start = time.perf_counter()
        self.b.curl(docs[0][0], docs[0][1], headers=docs[0][2])
        rest = docs[1:]
        for i in range(0, len(rest), 4):
            batch = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                       *sum((["-H", h] for h in headers), []), url], stdout=subprocess.PIPE, text=True)
                     for url, _, headers in rest[i:i + 4]]
            for (url, size, _), p in zip(rest[i:i + 4], batch):
                out, _ = p.communicate()
                if out.split() != ["200", str(size)]:
                    raise self.b.error(f"curl {url}: {out}")
        return time.perf_counter() - start

    def mount_and_list(self, n, key):
        info = self.caches[n]
        cache = self.b.new_cache_dir()
        t, _ = self.b.timed([self.a.binary, "mount", "--cache-dir", cache, f"type=registry,ref={info['ref']}", self.mnt])
        self.b.mounted.add(self.mnt)
        try:
            self.b.sample(f"wide_mount_{key}", t)
            with open(os.path.join(self.mnt, "index.json"), "rb") as f:
                if b"org.opencontainers.image.ref.name" not in f.read():
                    raise self.b.error(f"index.json of {info['ref']} names no tag")
            pid = self.b.daemon_pid()
            self.b.sample(f"wide_rss_mounted_{key}", self.b.proc_status(pid, "VmRSS"))
            layer = info["layers"][len(info["layers"]) // 2]
            blob = self.b.blob_path(layer["digest"])
            self.b.sample(f"wide_stat_{key}", self.stat_size(blob, layer["size"]))
            listing = os.path.join(self.mnt, "blobs/sha256")
            self.b.sample(f"wide_readdir_{key}", self.readdir(listing, info["entries"]))
            self.forget_names()
            cpu0 = self.b.cpu_of(pid)
            self.b.sample(f"wide_ls_{key}", self.ls(listing, info["entries"]))
            self.b.sample(f"wide_ls_cpu_daemon_{key}", self.b.cpu_of(pid) - cpu0)
            self.b.sample(f"wide_ls_again_{key}", self.ls(listing, info["entries"]))
            self.b.sample(f"wide_rss_{key}", self.b.proc_status(pid, "VmRSS"))
            self.b.sample(f"wide_hwm_{key}", self.b.proc_status(pid, "VmHWM"))
            self.b.sample(f"wide_cpu_daemon_{key}", self.b.cpu_of(pid))
            if n == 1:
                # The content is real: the one layer reads back through the mount with its digest.
                with open(blob, "rb") as f:
                    data = f.read()
                if len(data) != layer["size"] or "sha256:" + hashlib.sha256(data).hexdigest() != layer["digest"]:
                    raise self.b.error(f"{blob} read back wrong through the mount")
        finally:
            self.b.unmount()
            self.b.rm(cache)

    def go(self):
        self.seed()
        self.make_baseline_dirs()
        runs = self.a.runs
        for run in range(runs):
            self.mount_and_list(1, "1")
            for n in SIZES:
                self.mount_and_list(n, str(n))
                d = os.path.join(self.tmpfs, str(n))
                self.b.sample(f"wide_tmpfs_readdir_{n}", self.readdir(d, n))
                self.b.sample(f"wide_tmpfs_ls_{n}", self.ls(d, n))
                self.b.sample(f"wide_tmpfs_stat_{n}", self.stat_size(os.path.join(d, os.listdir(d)[0]), 0))
                self.b.sample(f"wide_curl_docs_{n}", self.fetch_documents(n))
                self.b.sample(f"wide_curl_docs_parallel_{n}", self.fetch_documents_parallel(n))
            self.log(f"wide run {run + 1}: mount 1 {fmt_s(self.b.s('wide_mount_1')[-1])}, "
                     + ", ".join(f"{n}: mount {fmt_s(self.b.s(f'wide_mount_{n}')[-1])}, ls -l {fmt_s(self.b.s(f'wide_ls_{n}')[-1])} "
                                 f"(tmpfs {fmt_s(self.b.s(f'wide_tmpfs_ls_{n}')[-1])})" for n in SIZES))
        self.cleanup()


# ---------------------------------------------------------------- report

class WideReport:
    def __init__(self, bench, args):
        self.b, self.a, self.R = bench, args, bench.R
        self.W = self.R.get("wide")
        self.rows = []

    def m(self, key):
        return med(self.b.s(key))

    def row(self, what, ours, base_name, base, ratio, target=""):
        self.rows.append(("13.4", what, ours, base_name, base, ratio, target))

    def build(self):
        if not self.W:
            return
        for n in SIZES:
            target = "< 1 s" if n == 100000 else ""
            mount, mount1 = self.m(f"wide_mount_{n}"), self.m("wide_mount_1")
            self.row(f"`ocicachefs mount`, {n:,} blobs ({self.layout(n)})", fmt_s(mount),
                     "the same mount of a 1-blob cache", fmt_s(mount1), f"{mount / mount1:.1f}× the time", target)
            docs = self.m(f"wide_curl_docs_{n}")
            self.row("same mount", fmt_s(mount), "`curl` GETs, one after another, of the manifests and configs it fetches",
                     fmt_s(docs), f"{mount / docs:.1f}× the time")
            if n > PER_MANIFEST:
                parallel = self.m(f"wide_curl_docs_parallel_{n}")
                self.row("same mount", fmt_s(mount), "the same `curl` GETs, the index first, then four at a time",
                         fmt_s(parallel), f"{mount / parallel:.1f}× the time")
            readdir, tmpfs_readdir = self.m(f"wide_readdir_{n}"), self.m(f"wide_tmpfs_readdir_{n}")
            self.row(f"`ls -f MNT/blobs/sha256 \\| wc -l` (readdir only), {n:,} blobs, first listing after mounting",
                     fmt_s(readdir), f"`ls -f` of a tmpfs directory of {n:,} empty files", fmt_s(tmpfs_readdir),
                     f"{readdir / tmpfs_readdir:.1f}× the time", target)
            ls, tmpfs = self.m(f"wide_ls_{n}"), self.m(f"wide_tmpfs_ls_{n}")
            self.row(f"`ls -l MNT/blobs/sha256 \\| wc -l` (readdir, stat of every entry, sorting), {n:,} blobs, "
                     "first listing after the kernel forgot the names", fmt_s(ls),
                     f"`ls -l` of a tmpfs directory of {n:,} empty files", fmt_s(tmpfs), f"{ls / tmpfs:.1f}× the time")
            rss, rss1 = self.m(f"wide_rss_{n}"), self.m("wide_rss_1")
            self.row(f"daemon RSS after listing {n:,} blobs", fmt_mib(rss), "the same after listing the 1-blob cache",
                     fmt_mib(rss1), f"{rss / rss1:.2f}×")

    def layout(self, n):
        s = self.W["seed"][str(n)]
        if s["manifests"] == 1:
            return f"one image manifest of {s['manifest_bytes'][0] / 1e6:.1f} MB"
        return f"an index of {s['manifests']} image manifests of {max(s['manifest_bytes']) / 1e6:.1f} MB"

    @staticmethod
    def exponent(t_small, t_big, n_small, n_big):
        return math.log(t_big / t_small) / math.log(n_big / n_small)

    def targets(self):
        if not self.W:
            return ""
        big, small = SIZES[-1], SIZES[0]
        mount, readdir, ls = self.m(f"wide_mount_{big}"), self.m(f"wide_readdir_{big}"), self.m(f"wide_ls_{big}")
        ok = mount < TARGET_SECONDS and readdir < TARGET_SECONDS
        return (f"- **Mount and `readdir` of {big:,} blobs each under a second** (issue 13 item 4): "
                f"{'**met**' if ok else '**missed**'} — mount {fmt_s(mount)}{spread(self.b.s(f'wide_mount_{big}'))}, "
                f"`ls -f` {fmt_s(readdir)}{spread(self.b.s(f'wide_readdir_{big}'))}. `ls -l`, which also stats every "
                f"entry and sorts and formats 100,000 lines, {fmt_s(ls)}{spread(self.b.s(f'wide_ls_{big}'))}, "
                f"{ls / self.m(f'wide_tmpfs_ls_{big}'):.1f}× the same `ls -l` on tmpfs. From {small:,} to {big:,} blobs (5×) "
                f"mounting took {mount / self.m(f'wide_mount_{small}'):.1f}× as long and `ls -l` "
                f"{ls / self.m(f'wide_ls_{small}'):.1f}× (time ∝ n^{self.exponent(self.m(f'wide_mount_{small}'), mount, small, big):.2f} "
                f"and n^{self.exponent(self.m(f'wide_ls_{small}'), ls, small, big):.2f}; 1 is linear, 2 quadratic).")

    def where_time(self):
        if not self.W:
            return ""
        out = []
        for n in SIZES:
            mount = self.m(f"wide_mount_{n}")
            out.append(
                f"- {n:,} blobs: mount {fmt_s(mount)} against {fmt_s(self.m('wide_mount_1'))} for one blob; the daemon's "
                f"CPU from start to after both listings {self.m(f'wide_cpu_daemon_{n}'):.2f} s, of which the first "
                f"listing {self.m(f'wide_ls_cpu_daemon_{n}'):.2f} s; RSS {fmt_mib(self.m(f'wide_rss_mounted_{n}'))} "
                f"once mounted, {fmt_mib(self.m(f'wide_rss_{n}'))} after listing (VmHWM {fmt_mib(self.m(f'wide_hwm_{n}'))}). "
                f"A second `ls -l` on the same mount {fmt_s(self.m(f'wide_ls_again_{n}'))} (the kernel keeps the "
                f"entries' attributes, but every listing reads the directory from the daemon again). `stat` of one "
                f"blob before any listing {fmt_s(self.m(f'wide_stat_{n}'))} (tmpfs {fmt_s(self.m(f'wide_tmpfs_stat_{n}'))}: "
                f"mostly starting `stat`).")
        return "\n".join(out)

    def how(self):
        if not self.W:
            return ""
        seeds = ", ".join(f"{int(k):,}: {v['seconds']} s" for k, v in self.W["seed"].items())
        return ("13.4. `bench/registry_push.py wide` writes N layers of 256–767 bytes straight into the registry's "
                "storage (data and the repository's link, as a push leaves them), then pushes through the API a "
                "BuildKit cache config chaining each 20,000 layers, an image manifest of those layers with that "
                "config (the registry checks each layer exists), and above 20,000 an OCI index of the manifests "
                f"(seeding, not measured: {seeds}). Per run and size, a fresh `--cache-dir`: wall time of "
                "`ocicachefs mount` (it returns once index.json is readable through the kernel); `stat -c %s` of "
                "the middle layer (size checked); `ls -f MNT/blobs/sha256 | wc -l` (readdir only: no sort, no stat; "
                "line count checked); `sync` and `echo 2 > /proc/sys/vm/drop_caches`, so that the kernel forgets "
                "every name the listing gave it; `LC_ALL=C ls -l MNT/blobs/sha256 | wc -l` (line count checked: "
                "the layers, manifests, configs and index, plus ls's total line), then again; `VmRSS`/`VmHWM` of "
                "the daemon after the listings. Baselines in the same run: the same mount of a 1-layer cache; "
                "`ls -f` and `ls -l` of a tmpfs directory holding one empty file per layer, named by its digest; `curl` "
                "(one process per request, one after another) of the manifest or index, each image manifest under "
                "it and each config: what the mount itself fetches; and the same with the index first, then the "
                "rest four at a time, as the mount fetches them.")

    def not_measured(self):
        return "" if self.W else "- 13.4: mount and listing of 20,000 and 100,000 blobs (part `wide`)."

    def section(self, command, started):
        """The part's results on their own, for a run that measures only this part."""
        lines = ["| # | measurement | ocicachefs | baseline | baseline value | ratio | issue target |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        keys = [k for k in self.R["samples"] if k.startswith("wide_")]
        samples = ["| sample | runs | median |", "| --- | --- | --- |"]
        for k in keys:
            xs = self.b.s(k)
            if "rss" in k or "hwm" in k:
                samples.append(f"| `{k}` | {', '.join(fmt_mib(x) for x in xs)} | {fmt_mib(med(xs))} |")
            else:
                samples.append(f"| `{k}` | {', '.join(f'{x:.3f}' for x in xs)} s | {med(xs):.3f} s |")
        return (f"## Many blobs (issue 13 item 4)\n\n"
                f"Measured {started} with `{command}` (release build of commit {self.a.build_commit or '?'}"
                f"{', Sources/ changed' if self.a.build_dirty else ''}; {self.b.machine_state()}); "
                f"medians of {self.a.runs} runs. The rest of this "
                f"document comes from its own full run; a full run measures this part too.\n\n"
                + "\n".join(lines) + "\n\n" + self.targets() + "\n\n" + self.where_time() + "\n\n"
                + self.how() + "\n\n" + "\n".join(samples) + "\n")
