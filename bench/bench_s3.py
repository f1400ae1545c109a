"""The benchmark's second part (issue 4, items 2's S3 half, 3, 5 and 9), driven by bench.py.

Parts:
  s3      item 2 (S3): cold read of a blob through an S3 mount vs curl of the same object
  shaped  item 3: the same through a per-connection rate cap plus added latency, vs one curl
          stream and vs 8 parallel ranged curl streams through the same path
  peers   item 5: cold and warm vs rclone mount --vfs-cache-mode full and s3fs (use_cache)
  ci      item 9: a cache of 10 tags, a job importing one tag's chain (10% of the bytes),
          mounted vs downloading the whole cache first, from the registry and from S3

The S3 endpoint is moto behind a caching nginx (run.sh starts both): moto reads the whole
object for every GET, nginx keeps whole objects and answers ranges itself. Objects are fetched
through nginx once after seeding; before each cold read the page cache is dropped and the
nginx cache file (or registry blob) is read once, so only the client side is cold.
"""
import concurrent.futures
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import buildctl_pattern  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
BUCKET, CI_BUCKET, REGION = "bench", "bench-ci", "us-east-1"
KEY_ID, SECRET = "testing", "testing"
NGINX_LINE = re.compile(r'^(\S+) (\S+) (\d{3}) (\d+) "([^"]*)" (\S+) ([\d.]+) ([\d.]+) (\d+)$')
CACHECONFIG = "application/vnd.buildkit.cacheconfig.v0"
INDEX_TYPES = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
CI_TAG = 3                       # the job imports ci-3
CI_CHAINS = 10
CI_SIZES_MIB = (80, 64, 40, 20)  # one chain = 204 MiB; 10 chains = 2040 MiB
CI_PARALLEL = 4                  # curls at once in the whole-cache download
CI_CONCURRENT = 4                # CI jobs at once on one machine (issue 16)


def med(xs):
    return statistics.median(xs)


def fmt_s(s):
    return "—" if s is None else (f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s")


def fmt_rate(nbytes, s):
    r = nbytes / s
    return f"{r / 1e9:.2f} GB/s" if r >= 1e9 else f"{r / 1e6:.0f} MB/s"


def fmt_bytes(n):
    if n >= GiB:
        return f"{n / GiB:.3f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def fmt_size_name(n):
    return f"{n // GiB} GiB" if n % GiB == 0 else f"{n // MiB} MiB"


def spread(xs):
    return "" if len(xs) < 2 else f" [{fmt_s(min(xs))}–{fmt_s(max(xs))}]"


class S3Parts:
    def __init__(self, bench, args):
        self.b, self.a = bench, args
        self.R = bench.R
        self.work = bench.work
        self.parts = set(args.parts.split(","))
        self.cache_url = f"http://127.0.0.1:{args.nginx_port}"
        self.nginx_dir = args.nginx_dir
        self.cache_log = os.path.join(self.nginx_dir, "cache.access.log")
        self.edge_log = os.path.join(self.nginx_dir, "edge.access.log")
        self.mnt = os.path.join(self.work, "s3mnt")
        self.peer_mnt = os.path.join(self.work, "peermnt")
        os.makedirs(self.mnt, exist_ok=True)
        os.makedirs(self.peer_mnt, exist_ok=True)
        self.mounted = set()
        self.peer_proc = None
        self.P = self.R.setdefault("part2", {})

    # ------------------------------------------------------------ helpers
    def log(self, msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def ns(self, netns):
        return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []

    def source(self, name, endpoint, bucket=BUCKET):
        return (f"type=s3,bucket={bucket},region={REGION},name={name},endpoint_url={endpoint},use_path_style=true,"
                f"access_key_id={KEY_ID},secret_access_key={SECRET}")

    def mount(self, source, cache, netns=None, mnt=None):
        """Mount (inside netns's network namespace if given) and read index.json; seconds."""
        mnt = mnt or self.mnt
        start = time.perf_counter()
        self.b.run(self.ns(netns) + [self.a.binary, "mount", "--cache-dir", cache, source, mnt])
        self.mounted.add(mnt)
        with open(os.path.join(mnt, "index.json"), "rb") as f:
            index = f.read()
        elapsed = time.perf_counter() - start
        if b"org.opencontainers.image.ref.name" not in index:
            raise self.b.error(f"index.json of {source} names no tag: {index[:200]!r}")
        return elapsed

    def unmount(self, mnt=None):
        mnt = mnt or self.mnt
        self.b.run([self.a.binary, "unmount", mnt])
        self.mounted.discard(mnt)

    def daemon_pid(self, mnt=None):
        mnt = mnt or self.mnt
        digest = hashlib.sha256(os.path.realpath(mnt).encode()).hexdigest()[:32]
        with open(f"/run/ocicachefs/{digest}.pid") as f:
            return int(f.read().strip())

    def cleanup(self):
        for m in list(self.mounted):
            subprocess.run([self.a.binary, "unmount", m], capture_output=True)
            self.mounted.discard(m)
        self.peer_unmount()

    # ---- the S3 side
    def nginx_file(self, key, bucket=BUCKET):
        h = hashlib.md5(f"/{bucket}/{key}".encode()).hexdigest()
        return os.path.join(self.nginx_dir, "cache", h[-1], h[-3:-1], h)

    def s3_curl_cmd(self, url, out="/dev/null", rng=None, netns=None):
        cmd = self.ns(netns) + ["curl", "-sS", "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY_ID}:{SECRET}",
                                "-o", out, "-w", "%{http_code} %{size_download}"]
        if rng:
            cmd += ["-r", f"{rng[0]}-{rng[1]}"]
        return cmd + [url]

    def s3_curl(self, url, expect, out="/dev/null", netns=None):
        t, p = self.b.timed(self.s3_curl_cmd(url, out, netns=netns))
        code, size = p.stdout.split()
        if code != "200" or int(size) != expect:
            raise self.b.error(f"curl {url}: HTTP {code}, {size} bytes (expected {expect})")
        return t

    def ranged_curls(self, url, size, streams, netns=None):
        """`streams` curl processes at once, each one range of 1/streams of the object; wall seconds."""
        step = -(-size // streams)
        ranges = [(o, min(size, o + step) - 1) for o in range(0, size, step)]
        start = time.perf_counter()
        procs = [subprocess.Popen(self.s3_curl_cmd(url, rng=r, netns=netns), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in ranges]
        outs = [p.communicate() for p in procs]
        elapsed = time.perf_counter() - start
        for (o, e), (out, err), p in zip(ranges, outs, procs):
            fields = out.split()
            if p.returncode != 0 or len(fields) != 2 or fields[0] != "206" or int(fields[1]) != e - o + 1:
                raise self.b.error(f"ranged curl {o}-{e} of {url}: {out.strip()} {err.strip()[-300:]}")
        return elapsed

    def prime(self, keys, bucket=BUCKET):
        """Fetch every object once through the caching nginx, then check nginx stored it."""
        for key, size in keys:
            self.s3_curl(f"{self.cache_url}/{bucket}/{key}", size)
            path = self.nginx_file(key, bucket)
            deadline = time.monotonic() + 10     # nginx moves the file into place after the response
            while not os.path.exists(path) or os.path.getsize(path) < size:
                if time.monotonic() > deadline:
                    raise self.b.error(f"nginx did not cache {key} at {path}")
                time.sleep(0.05)

    def warm_server(self, files):
        for path in files:
            self.b.run(["dd", f"if={path}", "of=/dev/null", "bs=8M"])

    def cold_start(self, files):
        self.b.drop_caches()
        self.warm_server(files)

    @staticmethod
    def log_offset(path):
        return os.path.getsize(path) if os.path.exists(path) else 0

    @staticmethod
    def nginx_requests(path, since, prefix=f"/{BUCKET}/"):
        """[(method, uri, status, bytes, range, start, end, connection)] logged after `since`."""
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        out = []
        for line in text.splitlines():
            m = NGINX_LINE.match(line.strip())
            if m and m.group(2).startswith(prefix):
                method, uri, status, nbytes, rng, _, rtime, msec, conn = m.groups()
                out.append((method, uri, int(status), int(nbytes), rng, float(msec) - float(rtime), float(msec),
                            int(conn)))
        return out

    @staticmethod
    def summarize(reqs, blob_only=True):
        blob = [r for r in reqs if "/blobs/" in r[1]] if blob_only else reqs
        gets = [r for r in blob if r[0] == "GET" and r[2] in (200, 206)]
        events = sorted([(r[5], 1) for r in blob] + [(r[6], -1) for r in blob])
        peak = cur = 0
        for _, d in events:
            cur += d
            peak = max(peak, cur)
        sizes = {}
        for r in gets:
            sizes[(r[2], r[3])] = sizes.get((r[2], r[3]), 0) + 1
        rates = [r[3] / max(r[6] - r[5], 1e-3) for r in gets if r[3] >= MiB]
        return {"bytes": sum(r[3] for r in blob), "requests": len(blob), "gets": len(gets),
                "connections": len({r[7] for r in blob}),
                "peak": peak, "sizes": sorted(sizes.items(), key=lambda kv: -kv[1])[:3],
                "methods": sorted({f"{r[0]} {r[2]}" for r in blob}),
                "per_request_rate": med(rates) if rates else None}

    def settle_log(self, path, since, dirs=(), quiet=1.5, limit=180, prefix=f"/{BUCKET}/"):
        """Wait until the access log and the given directories stop changing (a download the
        read started runs on in the background); return the requests logged since `since`."""
        def state():
            total = 0
            for d in dirs:
                for root, _, names in os.walk(d):
                    for n in names:
                        try:
                            st = os.stat(os.path.join(root, n))
                        except FileNotFoundError:
                            continue
                        total += st.st_size + st.st_blocks
            return self.log_offset(path), total
        last, stable, deadline = None, time.monotonic(), time.monotonic() + limit
        while time.monotonic() < deadline:
            now = state()
            if now != last:
                last, stable = now, time.monotonic()
            elif time.monotonic() - stable >= quiet:
                break
            time.sleep(0.25)
        return self.nginx_requests(path, since, prefix)

    # ------------------------------------------------------------ seeding
    def seed(self):
        t0 = time.perf_counter()
        push = os.path.join(HERE, "s3_push.py")
        moto = f"http://127.0.0.1:{self.a.moto_port}"
        need_big = self.parts & {"s3", "shaped", "peers"}
        self.big = None
        if need_big:
            out = os.path.join(self.work, "seed-s3-big.json")
            self.b.run([sys.executable, push, "big", "--endpoint", moto, "--bucket", BUCKET, "--size",
                        str(self.a.size), "--name", "big", "--seed", "11", "--out", out])
            with open(out) as f:
                info = json.load(f)["names"]["big"]
            self.big = info
            self.prime([(info["key"], info["size"])] + [(l["key"], l["size"]) for l in info["layers"]])
            self.P["seed_big_seconds"] = round(time.perf_counter() - t0, 1)
            self.log(f"seeded s3://{BUCKET}/{info['layers'][0]['key']} ({fmt_bytes(self.a.size)}) and warmed nginx's "
                     f"cache in {self.P['seed_big_seconds']} s")
        if "ci" in self.parts:
            t1 = time.perf_counter()
            sizes = [s * MiB // self.a.ci_scale for s in CI_SIZES_MIB]
            out = os.path.join(self.work, "seed-s3-ci.json")
            self.b.run([sys.executable, push, "chains", "--endpoint", moto, "--bucket", CI_BUCKET, "--chains",
                        str(CI_CHAINS), "--sizes", ",".join(map(str, sizes)), "--name-prefix", "ci-", "--seed", "12",
                        "--out", out])
            with open(out) as f:
                self.ci_s3 = json.load(f)["names"]
            objs = []
            for name, m in self.ci_s3.items():
                objs.append((m["key"], m["size"]))
                objs += [(l["key"], l["size"]) for l in m["layers"]]
            self.prime(objs, CI_BUCKET)
            out = os.path.join(self.work, "seed-reg-ci.json")
            self.b.run([sys.executable, os.path.join(HERE, "registry_push.py"), "chains", "--registry",
                        self.b.registry, "--repo", "bench/ci", "--chains", str(CI_CHAINS), "--sizes",
                        ",".join(map(str, sizes)), "--tag-prefix", "ci-", "--seed", "13", "--out", out])
            with open(out) as f:
                self.ci_reg = json.load(f)["tags"]
            self.P["seed_ci_seconds"] = round(time.perf_counter() - t1, 1)
            self.log(f"seeded the CI caches ({CI_CHAINS} tags × {len(sizes)} layers, "
                     f"{fmt_bytes(CI_CHAINS * sum(sizes))} each in S3 and in the registry) in "
                     f"{self.P['seed_ci_seconds']} s")

    # ------------------------------------------------------------ item 2, S3 half
    def big_facts(self):
        layer = self.big["layers"][0]
        hexd = layer["digest"].split(":", 1)[1]
        return layer, hexd, f"/{BUCKET}/{layer['key']}", self.nginx_file(layer["key"])

    def bench_s3(self):
        layer, hexd, uri, server_file = self.big_facts()
        size = layer["size"]
        url = self.cache_url + uri
        blob = os.path.join(self.mnt, "blobs/sha256", hexd)
        for run in range(self.a.runs):
            cache = self.b.new_cache_dir()
            self.b.sample("s3_mount", self.mount(self.source("big", self.cache_url), cache))
            pid = self.daemon_pid()
            self.cold_start([server_file])
            since = self.log_offset(self.cache_log)
            cpu0, busy0 = self.b.cpu_of(pid), self.b.machine_busy()
            cpu_nginx0 = self.nginx_cpu()
            self.b.sample("s3_cold", self.b.dd(blob, size))
            self.b.sample("s3_cold_cpu_machine", self.b.machine_busy() - busy0)
            self.b.sample("s3_cold_cpu_nginx", self.nginx_cpu() - cpu_nginx0)
            reqs = self.settle_log(self.cache_log, since, [cache])
            self.b.sample("s3_cold_cpu_daemon", self.b.cpu_of(pid) - cpu0)
            s = self.summarize(reqs)
            self.b.sample("s3_cold_wire", s["bytes"])
            self.b.sample("s3_cold_gets", s["gets"])
            self.P["s3_cold_summary"] = s
            self.unmount()
            self.b.rm(cache)
            self.cold_start([server_file])
            cpu_nginx0 = self.nginx_cpu()
            self.b.sample("s3_curl", self.s3_curl(url, size))
            self.b.sample("s3_curl_cpu", self.b.last_cpu)
            self.b.sample("s3_curl_cpu_nginx", self.nginx_cpu() - cpu_nginx0)
            self.cold_start([server_file])
            self.b.sample("s3_curl8", self.ranged_curls(url, size, 8))
            self.log(f"s3 run {run + 1}: cold {fmt_s(self.b.s('s3_cold')[-1])}, curl {fmt_s(self.b.s('s3_curl')[-1])}, "
                     f"8 ranged curls {fmt_s(self.b.s('s3_curl8')[-1])}")

    def nginx_cpu(self, edge=False):
        """CPU seconds of an nginx master and its workers."""
        master = self.a.edge_pid if edge else self.a.nginx_pid
        total = self.b.cpu_of(master)
        try:
            kids = open(f"/proc/{master}/task/{master}/children").read().split()
        except OSError:
            kids = []
        return total + sum(self.b.cpu_of(int(k)) for k in kids)

    # ------------------------------------------------------------ item 3, the shaped link
    def connect_times(self, port, n=15):
        code = ("import socket, sys, time\nts = []\nfor _ in range(%d):\n    t = time.perf_counter()\n"
                "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n    ts.append(time.perf_counter() - t)\n"
                "    s.close()\n    time.sleep(0.02)\nprint(' '.join(str(x) for x in ts))\n") % n
        p = self.b.run(self.ns(self.a.netns) + [sys.executable, "-c", code, self.a.edge, str(port)])
        return [float(x) for x in p.stdout.split()]

    def bench_shaped(self):
        layer, hexd, uri, server_file = self.big_facts()
        size, netns = layer["size"], self.a.netns
        capped, uncapped = f"http://{self.a.edge}:80", f"http://{self.a.edge}:81"
        blob = os.path.join(self.mnt, "blobs/sha256", hexd)
        # The link itself: round-trip time (TCP connect) and what it carries without the cap.
        rtts = self.connect_times(81)
        lo = self.b.run([sys.executable, "-c", "import socket,time\nts=[]\nfor _ in range(15):\n t=time.perf_counter();"
                         f"s=socket.create_connection(('127.0.0.1',{self.a.nginx_port}));ts.append(time.perf_counter()-t);"
                         "s.close()\nprint(sorted(ts)[7])"]).stdout
        self.P["rtt"] = {"samples": rtts, "median": med(rtts), "loopback": float(lo)}
        self.cold_start([server_file])
        cpu_dl0 = self.b.cpu_of(self.a.delay_pid)
        self.P["link_curl8"] = self.ranged_curls(uncapped + uri, size, 8, netns=netns)
        self.P["link_curl8_cpu_delayline"] = self.b.cpu_of(self.a.delay_pid) - cpu_dl0
        self.log(f"shaped link: connect {med(rtts) * 1000:.1f} ms (loopback {float(lo) * 1000:.2f} ms); uncapped 8 "
                 f"streams {fmt_rate(size, self.P['link_curl8'])}")
        for run in range(self.a.runs):
            cache = self.b.new_cache_dir()
            self.b.sample("shaped_mount", self.mount(self.source("big", capped), cache, netns=netns))
            pid = self.daemon_pid()
            self.cold_start([server_file])
            since = self.log_offset(self.edge_log)
            cpu0, dl0, busy0 = self.b.cpu_of(pid), self.b.cpu_of(self.a.delay_pid), self.b.machine_busy()
            self.b.sample("shaped_cold", self.b.dd(blob, size))
            self.b.sample("shaped_cold_cpu_machine", self.b.machine_busy() - busy0)
            self.b.sample("shaped_cold_cpu_delayline", self.b.cpu_of(self.a.delay_pid) - dl0)
            reqs = self.settle_log(self.edge_log, since, [cache])
            self.b.sample("shaped_cold_cpu_daemon", self.b.cpu_of(pid) - cpu0)
            s = self.summarize(reqs)
            self.b.sample("shaped_cold_wire", s["bytes"])
            self.b.sample("shaped_cold_gets", s["gets"])
            self.b.sample("shaped_cold_peak", s["peak"])
            self.P["shaped_cold_summary"] = s
            self.unmount()
            self.b.rm(cache)
            self.cold_start([server_file])
            self.b.sample("shaped_curl", self.s3_curl(capped + uri, size, netns=netns))
            self.cold_start([server_file])
            dl0 = self.b.cpu_of(self.a.delay_pid)
            since = self.log_offset(self.edge_log)
            self.b.sample("shaped_curl8", self.ranged_curls(capped + uri, size, 8, netns=netns))
            self.b.sample("shaped_curl8_cpu_delayline", self.b.cpu_of(self.a.delay_pid) - dl0)
            self.P["shaped_curl8_summary"] = self.summarize(self.nginx_requests(self.edge_log, since))
            self.log(f"shaped run {run + 1}: cold {fmt_s(self.b.s('shaped_cold')[-1])} "
                     f"({self.b.s('shaped_cold_gets')[-1]} GETs, at most {s['peak']} at once), curl "
                     f"{fmt_s(self.b.s('shaped_curl')[-1])}, 8 ranged curls {fmt_s(self.b.s('shaped_curl8')[-1])}")

    # ------------------------------------------------------------ item 5, rclone and s3fs
    def peer_mount(self, tool, cache):
        """Start rclone or s3fs in the foreground on self.peer_mnt over the caching nginx."""
        log_path = os.path.join(self.work, f"{tool}.log")
        env = dict(os.environ)
        if tool == "s3fs":
            pw = os.path.join(self.work, "s3fs.passwd")
            with open(pw, "w") as f:
                f.write(f"{KEY_ID}:{SECRET}\n")
            os.chmod(pw, 0o600)
            cmd = ["s3fs", BUCKET, self.peer_mnt, "-f", "-o",
                   f"url={self.cache_url},endpoint={REGION},passwd_file={pw},use_path_request_style,use_cache={cache}"]
        else:
            env.pop("AWS_CA_BUNDLE", None)   # rclone 1.60 fails with LoadCustomCABundleError when it is set
            env.update({"RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                        "RCLONE_CONFIG_BENCH_ENV_AUTH": "false", "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": KEY_ID,
                        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET, "RCLONE_CONFIG_BENCH_REGION": REGION,
                        "RCLONE_CONFIG_BENCH_ENDPOINT": self.cache_url, "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"})
            conf = os.path.join(self.work, "rclone.conf")
            open(conf, "a").close()
            cmd = ["rclone", "mount", f"bench:{BUCKET}", self.peer_mnt, "--config", conf, "--vfs-cache-mode", "full",
                   "--cache-dir", cache]
        start = time.perf_counter()
        self.peer_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"), env=env)
        with open(os.path.join(self.work, "pids", f"{tool}.pid"), "w") as f:
            f.write(f"{self.peer_proc.pid}\n")
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.peer_mnt):
            if self.peer_proc.poll() is not None or time.monotonic() > deadline:
                self.peer_unmount()
                raise self.b.error(f"{tool} did not mount {self.peer_mnt} (see {log_path})")
            time.sleep(0.02)
        return time.perf_counter() - start

    def peer_unmount(self):
        if self.peer_proc is None:
            return
        if os.path.ismount(self.peer_mnt):
            subprocess.run(["umount", self.peer_mnt], capture_output=True)
        try:
            self.peer_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.peer_proc.terminate()
            try:
                self.peer_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.peer_proc.kill()
                self.peer_proc.wait()
            if os.path.ismount(self.peer_mnt):
                subprocess.run(["umount", "-l", self.peer_mnt], capture_output=True)
        self.peer_proc = None

    def read_ahead(self, mnt):
        try:
            with open(self.b.bdi_path(mnt)) as f:
                return int(f.read())
        except OSError:
            return None

    def bench_peers(self):
        layer, hexd, uri, server_file = self.big_facts()
        size = layer["size"]
        ours = os.path.join(self.mnt, "blobs/sha256", hexd)
        theirs = os.path.join(self.peer_mnt, layer["key"])
        ra = self.P.setdefault("peer_read_ahead_kb", {})
        for run in range(self.a.runs):
            # Cold: a fresh cache for each tool, nothing in the page cache, the server side warm.
            caches = {}
            for tool in ("ocicachefs", "s3fs", "rclone"):
                cache = caches[tool] = self.b.new_cache_dir()
                os.makedirs(cache, exist_ok=True)
                if tool == "ocicachefs":
                    self.mount(self.source("big", self.cache_url), cache)
                    path, pid = ours, self.daemon_pid()
                    ra[tool] = self.read_ahead(self.mnt)
                else:
                    self.peer_mount(tool, cache)
                    path, pid = theirs, self.peer_proc.pid
                    ra[tool] = self.read_ahead(self.peer_mnt)
                    os.stat(path)      # the lookup (a HEAD or a listing) is not part of the read
                self.cold_start([server_file])
                since = self.log_offset(self.cache_log)
                cpu0, busy0 = self.b.cpu_of(pid), self.b.machine_busy()
                self.b.sample(f"peer_cold_{tool}", self.b.dd(path, size))
                self.b.sample(f"peer_cold_machine_{tool}", self.b.machine_busy() - busy0)
                self.b.sample(f"peer_cold_hwm_{tool}", self.b.proc_status(pid, "VmHWM"))
                reqs = self.settle_log(self.cache_log, since, [cache])
                self.b.sample(f"peer_cold_cpu_{tool}", self.b.cpu_of(pid) - cpu0)
                s = self.summarize(reqs)
                self.b.sample(f"peer_cold_wire_{tool}", s["bytes"])
                self.b.sample(f"peer_cold_gets_{tool}", s["gets"])
                self.P[f"peer_cold_summary_{tool}"] = s
                if tool == "ocicachefs":
                    self.unmount()
                else:
                    self.peer_unmount()
            # Warm: a new mount over each tool's own (complete) cache, after drop_caches.
            for tool in ("ocicachefs", "s3fs", "rclone"):
                if tool == "ocicachefs":
                    self.mount(self.source("big", self.cache_url), caches[tool])
                    path = ours
                else:
                    self.peer_mount(tool, caches[tool])
                    path = theirs
                    os.stat(path)
                self.b.drop_caches()
                since = self.log_offset(self.cache_log)
                self.b.sample(f"peer_warm_{tool}", self.b.dd(path, size))
                reqs = self.settle_log(self.cache_log, since, [caches[tool]], quiet=0.75)
                self.b.sample(f"peer_warm_wire_{tool}", self.summarize(reqs)["bytes"])
                if tool == "ocicachefs":
                    self.unmount()
                else:
                    self.peer_unmount()
            for cache in caches.values():
                self.b.rm(cache)
            # What verifying the digest costs one core (Python's hashlib, OpenSSL, over the
            # page-cached object): ocicachefs does it on every cold read, s3fs and rclone never.
            self.b.warm_file(server_file)
            self.b.sample("peer_sha256", self.b.sha256_seconds(server_file))
            self.log(f"peers run {run + 1}: cold " + ", ".join(
                f"{t} {fmt_s(self.b.s(f'peer_cold_{t}')[-1])}" for t in ("ocicachefs", "s3fs", "rclone")) +
                "; warm " + ", ".join(f"{t} {fmt_s(self.b.s(f'peer_warm_{t}')[-1])}" for t in ("ocicachefs", "s3fs", "rclone")))

    # ------------------------------------------------------------ item 9, the CI case
    @staticmethod
    def replay_import(layout, tag):
        """What buildctl's local cache import reads from an OCI layout for TAG: index.json under
        the lock file (created, flocked shared, unlinked), the manifest and the cache config read
        whole (stat, open, pread, close), then each layer of the chain, parent first, by 1 MiB
        chunks (stat, stat, open, pread, close). Returns the layer bytes read (the manifest's size
        differs between a registry's, ocicachefs's synthesized one and the baseline's)."""
        import fcntl
        lock = os.path.join(layout, "index.json.lock")
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with open(os.path.join(layout, "index.json"), "rb") as f:
            index = json.load(f)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        os.unlink(lock)
        entry = next(m for m in index["manifests"]
                     if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)

        def whole(digest):
            path = os.path.join(layout, "blobs/sha256", digest.split(":", 1)[1])
            size = os.stat(path).st_size
            os.stat(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            if len(data) != size:
                raise OSError(f"short read of {path}")
            return data
        total = 0
        manifest = json.loads(whole(entry["digest"]))
        if "layers" in manifest:
            config, layers = manifest["config"], manifest["layers"]
        else:
            config = next(m for m in manifest["manifests"] if m["mediaType"] == CACHECONFIG)
            layers = [m for m in manifest["manifests"] if m["mediaType"] != CACHECONFIG]
        whole(config["digest"])
        buf = buildctl_pattern.aligned_buffer(MiB)
        for layer in layers:
            total += buildctl_pattern.read_blob(os.path.join(layout, "blobs/sha256", layer["digest"].split(":", 1)[1]),
                                                buf=buf)
        return total

    def parallel_curls(self, jobs):
        """jobs: [(cmd, out_path, expected_bytes)], CI_PARALLEL at once."""
        def one(job):
            cmd, out, expect = job
            p = subprocess.run(cmd, capture_output=True, text=True)
            fields = p.stdout.split()
            if p.returncode != 0 or len(fields) != 2 or fields[0] != "200" or (expect is not None and int(fields[1]) != expect):
                raise self.b.error(f"{' '.join(cmd[-1:])}: {p.stdout.strip()} {p.stderr.strip()[-300:]}")
            return int(fields[1])
        with concurrent.futures.ThreadPoolExecutor(CI_PARALLEL) as pool:
            return sum(pool.map(one, jobs))

    def download_registry_cache(self, dest, only_tag=None):
        """The whole cache directory from the registry: every tag's manifest, every blob, into an
        OCI layout, CI_PARALLEL curls at once (as a CI cache restore would, before the job).
        With only_tag, that tag's blobs alone: a cache directory holding only the job's chain."""
        base = f"http://{self.b.registry}/v2/bench/ci"
        if only_tag:
            tags = [only_tag]
        else:
            p = self.b.run(["curl", "-sSf", f"{base}/tags/list"])
            tags = sorted(json.loads(p.stdout)["tags"])
        blobs_dir = os.path.join(dest, "blobs/sha256")
        os.makedirs(blobs_dir, exist_ok=True)
        index = []
        mjobs = []
        for tag in tags:
            out = os.path.join(dest, f"manifest-{tag}")
            mjobs.append((["curl", "-sS", "-H", f"Accept: {INDEX_TYPES}", "-o", out, "-w", "%{http_code} %{size_download}",
                           f"{base}/manifests/{tag}"], out, None))
        self.parallel_curls(mjobs)
        blobs = {}
        for tag in tags:
            raw = open(os.path.join(dest, f"manifest-{tag}"), "rb").read()
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            os.rename(os.path.join(dest, f"manifest-{tag}"), os.path.join(blobs_dir, digest.split(":", 1)[1]))
            m = json.loads(raw)
            index.append({"mediaType": m["mediaType"], "digest": digest, "size": len(raw),
                          "annotations": {"org.opencontainers.image.ref.name": tag}})
            for d in m.get("manifests", []) + m.get("layers", []) + ([m["config"]] if "config" in m else []):
                blobs[d["digest"]] = d["size"]
        jobs = [(["curl", "-sS", "-o", os.path.join(blobs_dir, d.split(":", 1)[1]), "-w", "%{http_code} %{size_download}",
                  f"{base}/blobs/{d}"], None, size) for d, size in sorted(blobs.items(), key=lambda kv: -kv[1])]
        self.parallel_curls(jobs)
        with open(os.path.join(dest, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": index}, f)
        with open(os.path.join(dest, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')

    def download_s3_cache(self, dest, base=None, netns=None):
        """The whole cache directory from S3: list the bucket's objects and download every one,
        CI_PARALLEL curls at once, keeping BuildKit's key layout (blobs/sha256:<hex>,
        manifests/<name>); then the layout a local import reads (index.json naming each name's
        manifest) is written next to it, as a cache action restoring a type=local directory has it."""
        keys, token = {}, None
        while True:
            url = f"{base or self.cache_url}/{CI_BUCKET}?list-type=2" + (f"&continuation-token={token}" if token else "")
            p = self.b.run(self.ns(netns) + ["curl", "-sSf", "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY_ID}:{SECRET}", url])
            root = ET.fromstring(p.stdout)
            ns = {"s": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
            q = (lambda t: f"s:{t}") if ns else (lambda t: t)
            for c in root.findall(q("Contents"), ns):
                keys[c.find(q("Key"), ns).text] = int(c.find(q("Size"), ns).text)
            if (root.findtext(q("IsTruncated"), "false", ns)) != "true":
                break
            token = root.findtext(q("NextContinuationToken"), None, ns)
        jobs = []
        for key, size in sorted(keys.items(), key=lambda kv: -kv[1]):
            out = os.path.join(dest, key)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            jobs.append((self.s3_curl_cmd(f"{base or self.cache_url}/{CI_BUCKET}/{key}", out=out, netns=netns),
                         None, size))
        self.parallel_curls(jobs)
        return keys

    @staticmethod
    def s3_layout(dest, keys):
        """An OCI layout over the downloaded S3 objects (hard links; index.json and one synthesized
        manifest per name), so the same import replay runs on both copies."""
        blobs = os.path.join(dest, "layout/blobs/sha256")
        os.makedirs(blobs, exist_ok=True)
        for key in keys:
            if key.startswith("blobs/sha256:"):
                os.link(os.path.join(dest, key), os.path.join(blobs, key.split(":", 1)[1]))
        index = []
        for key in keys:
            if not key.startswith("manifests/"):
                continue
            name = key.split("/", 1)[1]
            raw = open(os.path.join(dest, key), "rb").read()
            cfg_digest = hashlib.sha256(raw).hexdigest()
            with open(os.path.join(blobs, cfg_digest), "wb") as f:
                f.write(raw)
            layers = [{"mediaType": l["annotations"]["mediaType"], "digest": l["blob"], "size": l["annotations"]["size"]}
                      for l in json.loads(raw)["layers"]]
            m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "config": {"mediaType": CACHECONFIG, "digest": "sha256:" + cfg_digest, "size": len(raw)},
                            "layers": layers}).encode()
            md = hashlib.sha256(m).hexdigest()
            with open(os.path.join(blobs, md), "wb") as f:
                f.write(m)
            index.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + md,
                          "size": len(m), "annotations": {"org.opencontainers.image.ref.name": name}})
        with open(os.path.join(dest, "layout/index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": index}, f)
        return os.path.join(dest, "layout")

    def registry_requests(self, since, repo="bench/ci"):
        with open(self.b.reg_log, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        total = count = 0
        for m in re.finditer(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)', text):
            method, path, status, nbytes = m.groups()
            if path.startswith(f"/v2/{repo}/") and status in ("200", "206"):
                count += 1
                total += 0 if (nbytes == "-" or method == "HEAD") else int(nbytes)
        return total, count

    def registry_settle(self, since, dirs):
        last, stable, deadline = None, time.monotonic(), time.monotonic() + 180
        while time.monotonic() < deadline:
            now = (self.b.log_offset(), sum(os.stat(os.path.join(r, n)).st_blocks for d in dirs
                                            for r, _, ns in os.walk(d) for n in ns
                                            if os.path.exists(os.path.join(r, n))))
            if now != last:
                last, stable = now, time.monotonic()
            elif time.monotonic() - stable >= 1.5:
                break
            time.sleep(0.25)
        return self.registry_requests(since)

    def ci_sources(self):
        """registry, s3 (loopback), and s3 behind the shaped link when that part runs too."""
        return ["registry", "s3"] + (["s3-shaped"] if "shaped" in self.parts else [])

    def bench_ci(self):
        tag = f"ci-{CI_TAG}"
        s3_total = sum(l["size"] for m in self.ci_s3.values() for l in m["layers"])
        s3_chain = sum(l["size"] for l in self.ci_s3[tag]["layers"])
        total_bytes = {"registry": sum(l["size"] for t in self.ci_reg.values() for l in t["layers"]),
                       "s3": s3_total, "s3-shaped": s3_total}
        chain_bytes = {"registry": sum(l["size"] for l in self.ci_reg[tag]["layers"]), "s3": s3_chain,
                       "s3-shaped": s3_chain}
        self.P["ci"] = {"tag": tag, "total_layer_bytes": total_bytes, "chain_bytes": chain_bytes,
                        "layers": len(self.ci_s3[tag]["layers"]), "chains": CI_CHAINS, "parallel": CI_PARALLEL,
                        "sources": self.ci_sources()}
        s3_files = [self.nginx_file(l["key"], CI_BUCKET) for m in self.ci_s3.values() for l in m["layers"]]
        server_files = {
            "registry": [self.b.registry_blob_file(l["digest"]) for t in self.ci_reg.values() for l in t["layers"]],
            "s3": s3_files, "s3-shaped": s3_files}
        edge = f"http://{self.a.edge}:80" if "shaped" in self.parts else None
        for run in range(max(self.a.runs, self.a.ci_runs)):
            for src in self.ci_sources():
                if run >= (self.a.runs if src == "s3-shaped" else self.a.ci_runs):
                    continue
                netns = self.a.netns if src == "s3-shaped" else None
                logfile = self.edge_log if src == "s3-shaped" else self.cache_log

                def since_now():
                    return self.b.log_offset() if src == "registry" else self.log_offset(logfile)

                def measured(since, dirs=None):
                    if src == "registry":
                        return self.registry_settle(since, dirs) if dirs else self.registry_requests(since)
                    reqs = (self.settle_log(logfile, since, dirs, prefix=f"/{CI_BUCKET}") if dirs else
                            self.nginx_requests(logfile, since, prefix=f"/{CI_BUCKET}"))
                    s = self.summarize(reqs, blob_only=False)
                    return s["bytes"], s["requests"]
                # Mounted: mount, then the import's reads through the mount.
                cache = self.b.new_cache_dir()
                self.cold_start(server_files[src])
                since = since_now()
                if src == "registry":
                    source = f"type=registry,ref={self.b.registry}/bench/ci:{tag}"
                else:
                    source = self.source(tag, edge if src == "s3-shaped" else self.cache_url, CI_BUCKET)
                start = time.perf_counter()
                t_mount = self.mount(source, cache, netns=netns)
                read = self.replay_import(self.mnt, tag)
                elapsed = time.perf_counter() - start
                wire, reqs = measured(since, [cache])
                self.unmount()
                self.b.rm(cache)
                self.b.sample(f"ci_mount_{src}", elapsed)
                self.b.sample(f"ci_mount_only_{src}", t_mount)
                self.b.sample(f"ci_mount_wire_{src}", wire)
                self.b.sample(f"ci_mount_requests_{src}", reqs)
                self.P[f"ci_read_{src}"] = read
                # Whole cache directory first, then the same reads on the local copy.
                dest = os.path.join(self.work, f"ci-download-{src}")
                self.b.rm(dest)
                os.makedirs(dest)
                self.cold_start(server_files[src])
                since = since_now()
                start = time.perf_counter()
                if src == "registry":
                    self.download_registry_cache(dest)
                    layout = dest
                else:
                    keys = self.download_s3_cache(dest, edge if src == "s3-shaped" else None, netns)
                    layout = self.s3_layout(dest, keys)
                t_dl = time.perf_counter() - start
                read2 = self.replay_import(layout, tag)
                elapsed = time.perf_counter() - start
                if read2 != read:
                    raise self.b.error(f"CI replay read {read2} bytes from the download, {read} through the mount")
                wire, reqs = measured(since)
                self.b.rm(dest)
                self.b.sample(f"ci_dl_{src}", elapsed)
                self.b.sample(f"ci_dl_only_{src}", t_dl)
                self.b.sample(f"ci_dl_wire_{src}", wire)
                self.b.sample(f"ci_dl_requests_{src}", reqs)
                self.log(f"ci {src} run {run + 1}: mounted {fmt_s(self.b.s(f'ci_mount_{src}')[-1])}, "
                         f"{fmt_bytes(self.b.s(f'ci_mount_wire_{src}')[-1])}; whole download + reads "
                         f"{fmt_s(elapsed)}, {fmt_bytes(wire)}")

    def bench_ci_whole_chain_and_concurrent(self):
        """Issue 16's two CI measurements, from the registry.

        Whole chain: the mounted job above (every layer of the chain read, cold mount) against a
        cache directory that holds only that chain, restored first (CI_PARALLEL curls) and read
        locally: the job reads the whole cache, so only speed can win.

        Concurrent: CI_CONCURRENT jobs on one machine, each its own mount, all sharing one fresh
        --cache-dir, the import replays running at once; against as many independent
        whole-cache restores, each followed by its replay, all at once. Afterwards every layer is
        read again through every mount and hashed (byte-exact), and the registry's log must show
        the chain's bytes once (one download per blob)."""
        tag = f"ci-{CI_TAG}"
        chain = self.ci_reg[tag]["layers"]
        chain_bytes = sum(l["size"] for l in chain)
        server_files = [self.b.registry_blob_file(l["digest"]) for t in self.ci_reg.values() for l in t["layers"]]
        source = f"type=registry,ref={self.b.registry}/bench/ci:{tag}"
        mounts = [os.path.join(self.work, f"ci-job-{n}") for n in range(CI_CONCURRENT)]
        for mnt in mounts:
            os.makedirs(mnt, exist_ok=True)
        for run in range(self.a.ci_runs):
            # Whole chain: restore only the chain, then read it locally.
            dest = os.path.join(self.work, "ci-chain-restore")
            self.b.rm(dest)
            os.makedirs(dest)
            self.cold_start(server_files)
            start = time.perf_counter()
            self.download_registry_cache(dest, only_tag=tag)
            t_dl = time.perf_counter() - start
            read = self.replay_import(dest, tag)
            elapsed = time.perf_counter() - start
            if read != chain_bytes:
                raise self.b.error(f"the chain restore read {read} bytes of layers, expected {chain_bytes}")
            self.b.rm(dest)
            self.b.sample("ci_chain_restore_registry", elapsed)
            self.b.sample("ci_chain_restore_dl_registry", t_dl)

            # Concurrent jobs through mounts sharing one cache directory.
            cache = self.b.new_cache_dir()
            self.cold_start(server_files)
            since = self.b.log_offset()
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(CI_CONCURRENT) as pool:
                def job(mnt):
                    self.mount(source, cache, mnt=mnt)
                    return self.replay_import(mnt, tag)
                reads = list(pool.map(job, mounts))
            elapsed = time.perf_counter() - start
            wire, reqs = self.registry_settle(since, [cache])
            if reads != [chain_bytes] * CI_CONCURRENT:
                raise self.b.error(f"concurrent jobs read {reads} bytes of layers, expected {chain_bytes} each")
            for mnt in mounts:
                for layer in chain:
                    path = os.path.join(mnt, "blobs/sha256", layer["digest"].split(":", 1)[1])
                    h = hashlib.sha256()
                    with open(path, "rb") as f:
                        while block := f.read(MiB):
                            h.update(block)
                    if "sha256:" + h.hexdigest() != layer["digest"]:
                        raise self.b.error(f"{path} through the concurrent job's mount does not match its digest")
            for mnt in mounts:
                self.unmount(mnt)
            self.b.rm(cache)
            self.b.sample("ci4_mount_registry", elapsed)
            self.b.sample("ci4_mount_wire_registry", wire)
            self.b.sample("ci4_mount_requests_registry", reqs)

            # As many independent whole-cache restores, each then its replay, all at once.
            dests = [os.path.join(self.work, f"ci-restore-{n}") for n in range(CI_CONCURRENT)]
            for dest in dests:
                self.b.rm(dest)
                os.makedirs(dest)
            self.cold_start(server_files)
            since = self.b.log_offset()
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(CI_CONCURRENT) as pool:
                def restore(dest):
                    self.download_registry_cache(dest)
                    return self.replay_import(dest, tag)
                reads = list(pool.map(restore, dests))
            elapsed = time.perf_counter() - start
            wire, reqs = self.registry_requests(since)
            for dest in dests:
                self.b.rm(dest)
            if reads != [chain_bytes] * CI_CONCURRENT:
                raise self.b.error(f"concurrent restores read {reads} bytes of layers, expected {chain_bytes} each")
            self.b.sample("ci4_dl_registry", elapsed)
            self.b.sample("ci4_dl_wire_registry", wire)
            self.log(f"ci run {run + 1}: chain restore + reads {fmt_s(self.b.s('ci_chain_restore_registry')[-1])}; "
                     f"{CI_CONCURRENT} concurrent jobs mounted {fmt_s(self.b.s('ci4_mount_registry')[-1])} "
                     f"({fmt_bytes(self.b.s('ci4_mount_wire_registry')[-1])}), restored "
                     f"{fmt_s(elapsed)} ({fmt_bytes(wire)})")

    # ------------------------------------------------------------ all
    def go(self):
        self.seed()
        if "s3" in self.parts:
            self.bench_s3()
        if "shaped" in self.parts:
            self.bench_shaped()
        if "peers" in self.parts:
            self.bench_peers()
        if "ci" in self.parts:
            self.bench_ci()
            self.bench_ci_whole_chain_and_concurrent()


# ---------------------------------------------------------------- report of part 2

class S3Report:
    """Rows, target verdicts, explanations and method notes for the parts bench_s3 ran."""

    def __init__(self, bench, args):
        self.b, self.a, self.R = bench, args, bench.R
        self.P = self.R.get("part2", {})
        self.parts = set(args.parts.split(","))
        self.size = args.size
        self.rows = []

    def peer_cpu_text(self):
        """Why the cold comparison comes out as it does: how busy the machine was, and the checking
        only ocicachefs does."""
        nproc = os.cpu_count() or 1
        busy = {t: self.m(f"peer_cold_machine_{t}") / (self.m(f"peer_cold_{t}") * nproc)
                for t in ("ocicachefs", "s3fs", "rclone")}
        extra = self.m("peer_cold_cpu_ocicachefs") - self.m("peer_cold_cpu_s3fs")
        return (f"During the cold reads the machine's {nproc} cores were {busy['ocicachefs'] * 100:.0f}% busy with "
                f"ocicachefs, {busy['s3fs'] * 100:.0f}% with s3fs and {busy['rclone'] * 100:.0f}% with rclone (the "
                f"client, nginx and `dd` share them)"
                + (", so CPU bounds these reads. " if busy["ocicachefs"] >= 0.85 else ". ")
                + f"ocicachefs checks what the others "
                f"do not: the object's SHA-256 (one core needs {self.m('peer_sha256'):.2f} s for it over the "
                f"page-cached object) and a CRC-32 of every 1 MiB block for its journal; its daemon used "
                f"{extra:.2f} CPU-s more than s3fs's.")

    def m(self, key):
        return med(self.b.s(key))

    def has(self, part):
        return part in self.parts and bool(self.P)

    def row(self, num, what, ours, base_name, base, ratio, target=""):
        self.rows.append((num, what, ours, base_name, base, ratio, target))

    def speed_row(self, num, what, key, base_name, base_key, target="", nbytes=None):
        nbytes = nbytes or self.size
        ours, base = self.m(key), self.m(base_key)
        self.row(num, what, f"{fmt_s(ours)} ({fmt_rate(nbytes, ours)})", base_name,
                 f"{fmt_s(base)} ({fmt_rate(nbytes, base)})", f"{base / ours:.2f}×", target)
        return base / ours

    def ci_name(self, src):
        if src == "s3-shaped":
            return f"S3 behind the shaped link ({self.a.rate}/connection, +{2 * self.a.delay_ms:g} ms RTT)"
        return "the registry" if src == "registry" else "S3"

    @staticmethod
    def verdict(ok):
        return "**met**" if ok else "**missed**"

    @staticmethod
    def pattern(s):
        parts = [f"{n} × {status} of {fmt_bytes(size)}" for (status, size), n in s["sizes"]]
        rest = s["gets"] - sum(n for _, n in s["sizes"])
        if rest:
            parts.append(f"{rest} others")
        return f"{s['gets']} GETs ({', '.join(parts)})"

    def link_text(self):
        rtt = self.P["rtt"]
        return (f"{self.a.rate} per connection (nginx `limit_rate` plus the delay line's per-connection pacing at "
                f"{self.a.cap_bps / 1e6:.1f} MB/s), {self.a.delay_ms:g} ms each way: TCP connect "
                f"{rtt['median'] * 1000:.1f} ms median through the link against {rtt['loopback'] * 1000:.2f} ms on loopback")

    # ---- table
    def build(self):
        sz = fmt_size_name(self.size)
        self.ratio = {}
        if self.has("s3"):
            self.ratio["s3_curl"] = self.speed_row(
                "2 (S3)", f"cold sequential read of a {sz} S3 object through the mount (`dd bs=1M`)", "s3_cold",
                "`curl -o /dev/null` (SigV4) of the object from the same endpoint", "s3_curl")
            self.ratio["s3_curl8"] = self.speed_row("2 (S3)", "same cold read", "s3_cold",
                                                    "8 parallel ranged `curl` streams, same endpoint", "s3_curl8")
            gib = self.size / GiB
            self.row("2 (S3)", "daemon CPU per GiB during the same cold read (until the download settled)",
                     f"{self.m('s3_cold_cpu_daemon') / gib:.2f} CPU-s", "`curl -o /dev/null`'s CPU per GiB",
                     f"{self.m('s3_curl_cpu') / gib:.2f} CPU-s", f"{self.m('s3_cold_cpu_daemon') / self.m('s3_curl_cpu'):.1f}×",
                     "≤ 1.3 CPU-s (issue 16)")
            wire = self.m("s3_cold_wire")
            self.row("2 (S3)", f"bytes from S3, cold full read ({int(self.m('s3_cold_gets'))} GET)", fmt_bytes(wire),
                     "distinct bytes read", fmt_bytes(self.size), f"{wire / self.size:.3f}×", "≤ 1.01×")
        if self.has("shaped"):
            link = f"{self.a.rate}/connection, +{2 * self.a.delay_ms:g} ms RTT"
            self.ratio["shaped_curl"] = self.speed_row(
                "3", f"cold read of the {sz} object behind the shaped link ({link})", "shaped_cold",
                "one `curl` stream through the same path", "shaped_curl")
            self.ratio["shaped_curl8"] = self.speed_row(
                "3", "same cold read", "shaped_cold", "8 parallel ranged `curl` streams through the same path",
                "shaped_curl8", "≥ 0.90×")
            self.row("3", "daemon CPU per GiB during the same cold read", f"{self.m('shaped_cold_cpu_daemon') / (self.size / GiB):.2f} CPU-s",
                     "", "", "", "")
            ours, rtt = self.m("shaped_mount"), self.P["rtt"]["median"]
            self.row("3", "mount until `index.json` is read, over the shaped link", fmt_s(ours),
                     "one TCP connect through the link (≈ 1 RTT)", f"{rtt * 1000:.1f} ms", f"{ours / rtt:.1f}× the time")
        if self.has("peers"):
            for tool, name in (("s3fs", "`s3fs`"), ("rclone", "`rclone mount --vfs-cache-mode full`")):
                self.ratio[f"cold_{tool}"] = self.speed_row(
                    "5", f"cold read of the {sz} object through the mount", "peer_cold_ocicachefs",
                    f"{name} cold, same object, same endpoint", f"peer_cold_{tool}",
                    "≥ 1.2×, every run faster (issue 16)" if tool == "s3fs" else "clearly faster")
            for tool in ("ocicachefs", "s3fs", "rclone"):
                self.row("5", f"CPU per GiB of the cold read: `{tool}`'s daemon",
                         f"{self.m(f'peer_cold_cpu_{tool}') / (self.size / GiB):.2f} CPU-s", "", "", "", "")
            for tool, name in (("s3fs", "`s3fs -o use_cache`"), ("rclone", "`rclone mount --vfs-cache-mode full`")):
                self.ratio[f"warm_{tool}"] = self.speed_row(
                    "5", "warm read after `drop_caches`, new mount over its own complete cache", "peer_warm_ocicachefs",
                    f"{name}, the same", f"peer_warm_{tool}", "> 1×" if tool == "s3fs" else "")
            ours = self.m("peer_cold_hwm_ocicachefs")
            for tool in ("s3fs", "rclone"):
                theirs = self.m(f"peer_cold_hwm_{tool}")
                self.row("5", "peak RSS (VmHWM) after the cold read", fmt_bytes(ours), f"`{tool}`", fmt_bytes(theirs),
                         f"{ours / theirs:.2f}×")
        if self.has("ci"):
            ci = self.P["ci"]
            for src in ci.get("sources", ["registry", "s3"]):
                name = self.ci_name(src)
                total = ci["total_layer_bytes"][src]
                what = (f"CI job from {name}: mount + import of `{ci['tag']}` ({ci['layers']} layers, "
                        f"{fmt_bytes(ci['chain_bytes'][src])} of a {fmt_bytes(total)} cache)")
                ours, base = self.m(f"ci_mount_{src}"), self.m(f"ci_dl_{src}")
                self.ratio[f"ci_time_{src}"] = ours / base
                self.row("9", what + ": time to the end of the reads", fmt_s(ours),
                         f"download the whole cache ({ci['parallel']} curls at once), then the same reads locally",
                         fmt_s(base), f"{ours / base:.3f}× the time", "≤ 0.30×")
                ours, base = self.m(f"ci_mount_wire_{src}"), self.m(f"ci_dl_wire_{src}")
                self.ratio[f"ci_bytes_{src}"] = ours / base
                self.row("9", "same: bytes transferred", fmt_bytes(ours), "the whole-cache download", fmt_bytes(base),
                         f"{ours / base:.3f}×", "≤ 0.12×")
            if self.b.s("ci_chain_restore_registry"):
                ours, base = self.m("ci_mount_registry"), self.m("ci_chain_restore_registry")
                self.ratio["ci_chain"] = ours / base
                self.row("9", f"whole-chain import from the registry: the mounted job above (every layer of `{ci['tag']}` read, "
                         "cold mount)", fmt_s(ours),
                         f"restore a cache directory holding only that chain ({ci['parallel']} curls at once), then the "
                         "same reads locally", fmt_s(base), f"{ours / base:.3f}× the time", "≤ 0.9× (issue 16)")
                ours, base = self.m("ci4_mount_registry"), self.m("ci4_dl_registry")
                self.ratio["ci4_time"] = ours / base
                self.row("9", f"{CI_CONCURRENT} CI jobs at once from the registry, each its own mount, one shared "
                         "`--cache-dir`: mount + import, until the last ends", fmt_s(ours),
                         f"{CI_CONCURRENT} independent whole-cache restores, each then the same reads, all at once",
                         fmt_s(base), f"{ours / base:.3f}× the time", "")
                ours, base = self.m("ci4_mount_wire_registry"), self.m("ci4_dl_wire_registry")
                self.row("9", f"same: bytes from the registry ({int(self.m('ci4_mount_requests_registry'))} requests)",
                         fmt_bytes(ours), f"the {CI_CONCURRENT} restores", fmt_bytes(base), f"{ours / base:.3f}×",
                         f"the chain once ({fmt_bytes(ci['chain_bytes']['registry'])})")

    # ---- targets
    def targets(self):
        out = []
        sz = fmt_size_name(self.size)
        if self.has("shaped"):
            r = self.ratio["shaped_curl8"]
            s = self.P["shaped_cold_summary"]
            c8 = self.P["shaped_curl8_summary"]
            cap = self.a.cap_bps
            ours_t, c8_t = self.m("shaped_cold"), self.m("shaped_curl8")
            peak = int(max(self.b.s("shaped_cold_peak")))
            why = [f"each cold read made {self.pattern(s)} over {s['connections']} TCP connections, with at most "
                   f"{peak} requests open at once as nginx logged them (the 8 curl streams: 8 ranges of "
                   f"{fmt_bytes(self.size // 8)} on 8 connections at once)",
                   f"at {cap / 1e6:.1f} MB/s per connection {peak} connections carry at most "
                   f"{peak * cap / 1e6:.0f} MB/s and 8 carry {8 * cap / 1e6:.0f} MB/s; the read ran at "
                   f"{fmt_rate(self.size, ours_t)} and the 8 curls at {fmt_rate(self.size, c8_t)}",
                   f"the link itself carried {fmt_rate(self.size, self.P['link_curl8'])} with 8 uncapped streams "
                   f"(the delay line used {self.P['link_curl8_cpu_delayline']:.2f} CPU-s for it), "
                   + ("so the cap, not the link, bounds 8 capped streams"
                      if self.size / self.P["link_curl8"] > 1.1 * 8 * cap else
                      "so on this machine the link (the CPU of the delay line, both nginx and the clients on 2 cores) "
                      "and not only the cap bounds 8 capped streams: lower `BENCH_RATE` to keep the cap binding"),
                   f"every range costs at least one round trip ({self.P['rtt']['median'] * 1000:.1f} ms) before its "
                   f"first byte: {s['gets']} ranges over at most {peak} connections is "
                   f"{s['gets'] / max(peak, 1):.1f} round trips in series per connection, against 1 for each curl stream"]
            out.append(f"- **Behind a per-connection cap ≥ 0.9× of 8 parallel ranged curl streams** ({self.link_text()}): "
                       f"{self.verdict(r >= 0.9)} — {r:.2f}×"
                       + (f", {(0.9 - r) / 0.9 * 100:.0f}% short (the read would have to be {0.9 / r:.2f}× faster)"
                          if r < 0.9 else "") + ". Facts: " + "; ".join(why) + ".")
        elif "registry" in self.parts:
            out.append("- **Behind a per-connection cap ≥ 0.9× of 8 parallel ranged curl streams**: not measured in this "
                       "run (part `shaped`).")
        if self.has("peers"):
            rs, rr = self.ratio["cold_s3fs"], self.ratio["cold_rclone"]
            ours = self.b.s("peer_cold_ocicachefs")

            def clearly(tool):
                return self.ratio[f"cold_{tool}"] >= 1.2 and max(ours) < min(self.b.s(f"peer_cold_{tool}"))
            facts = []
            ra = self.P.get("peer_read_ahead_kb", {})
            for tool in ("ocicachefs", "s3fs", "rclone"):
                s = self.P[f"peer_cold_summary_{tool}"]
                facts.append(f"{tool} {fmt_s(self.m(f'peer_cold_{tool}'))}{spread(self.b.s(f'peer_cold_{tool}'))}, "
                             f"{self.pattern(s)} on {s['connections']} connection{'s' if s['connections'] != 1 else ''}, at most {s['peak']} at once, {fmt_bytes(s['bytes'])} in all, "
                             f"{self.m(f'peer_cold_cpu_{tool}'):.2f} CPU-s, read_ahead_kb {ra.get(tool)}")
            out.append(
                f"- **Cold clearly faster than s3fs and rclone cold** (\"clearly\" taken as ≥ 1.2× and every "
                f"ocicachefs run faster than every run of the other): {self.verdict(clearly('s3fs') and clearly('rclone'))}"
                f" — {rs:.2f}× s3fs ({'clearly' if clearly('s3fs') else 'not clearly'}), {rr:.2f}× rclone "
                f"({'clearly' if clearly('rclone') else 'not clearly'}). Cold reads of the {sz} object: "
                + "; ".join(facts) + ". "
                + self.peer_cpu_text())
            w = self.ratio["warm_s3fs"]
            facts = []
            for tool in ("ocicachefs", "s3fs", "rclone"):
                wire = max(self.b.s(f"peer_warm_wire_{tool}"))
                facts.append(f"{tool} {fmt_s(self.m(f'peer_warm_{tool}'))}{spread(self.b.s(f'peer_warm_{tool}'))} "
                             f"({fmt_bytes(wire)} from S3 at most)")
            out.append(
                f"- **Warm after `drop_caches` faster than s3fs with its own cache** (`use_cache`): "
                f"{self.verdict(w > 1)} — {w:.2f}× s3fs, {self.ratio['warm_rclone']:.2f}× rclone. Each tool remounted "
                f"over its own complete cache, page cache dropped: " + "; ".join(facts) + ".")
        elif "registry" in self.parts:
            out.append("- **Cold clearly faster than s3fs and rclone cold; warm faster than s3fs with `use_cache`**: not "
                       "measured in this run (part `peers`).")
        if self.has("ci"):
            ci = self.P["ci"]
            for src in ci.get("sources", ["registry", "s3"]):
                name = self.ci_name(src)
                t, nb = self.ratio[f"ci_time_{src}"], self.ratio[f"ci_bytes_{src}"]
                mount_only, dl_only = self.m(f"ci_mount_only_{src}"), self.m(f"ci_dl_only_{src}")
                out.append(
                    f"- **CI case from {name}: ≤ 0.12× the bytes and ≤ 0.3× the time of downloading the whole cache "
                    f"directory**: bytes {self.verdict(nb <= 0.12)} ({nb:.3f}×: {fmt_bytes(self.m(f'ci_mount_wire_{src}'))} "
                    f"in {int(self.m(f'ci_mount_requests_{src}'))} requests against "
                    f"{fmt_bytes(self.m(f'ci_dl_wire_{src}'))} in {int(self.m(f'ci_dl_requests_{src}'))}; the chain "
                    f"is {ci['chain_bytes'][src] / ci['total_layer_bytes'][src] * 100:.1f}% of the layer bytes), time "
                    f"{self.verdict(t <= 0.3)} ({t:.3f}×: {fmt_s(self.m(f'ci_mount_{src}'))}"
                    f"{spread(self.b.s(f'ci_mount_{src}'))}, of which mounting {fmt_s(mount_only)}, against "
                    f"{fmt_s(self.m(f'ci_dl_{src}'))}{spread(self.b.s(f'ci_dl_{src}'))}, of which the download "
                    f"{fmt_s(dl_only)})."
                    + ("" if t <= 0.3 else
                       f" To meet it the mounted job would have to end within {fmt_s(0.3 * self.m(f'ci_dl_{src}'))}; mounting took "
                       f"{mount_only / self.m(f'ci_mount_{src}') * 100:.0f}% of its time (page cache dropped before "
                       f"it, as on a fresh runner" + (f"; item 1's mount with a warm page cache took "
                                                       f"{fmt_s(med(self.b.s('mount_one')))}" if self.b.s("mount_one") else "")
                       + f"), and the chain's reads, one blob after another as buildctl reads them, the rest, at "
                       f"{fmt_rate(ci['chain_bytes'][src], self.m(f'ci_mount_{src}') - mount_only)}; the baseline's "
                       f"download ran at {fmt_rate(self.m(f'ci_dl_wire_{src}'), dl_only)} with {ci['parallel']} "
                       f"streams" + (" on loopback." if src != "s3-shaped" else ".")))
            if "ci_chain" in self.ratio:
                r = self.ratio["ci_chain"]
                mount_only = self.m("ci_mount_only_registry")
                out.append(
                    f"- **Whole-chain import ≤ 0.9× restoring the cache first** (issue 16; the registry, every layer of "
                    f"the chain read, the cache directory holding only that chain): {self.verdict(r <= 0.9)} — {r:.3f}× "
                    f"({fmt_s(self.m('ci_mount_registry'))}, of which mounting {fmt_s(mount_only)}, against "
                    f"{fmt_s(self.m('ci_chain_restore_registry'))}{spread(self.b.s('ci_chain_restore_registry'))}, of which "
                    f"the restore {fmt_s(self.m('ci_chain_restore_dl_registry'))} at "
                    f"{fmt_rate(ci['chain_bytes']['registry'], self.m('ci_chain_restore_dl_registry'))} with "
                    f"{ci['parallel']} streams; the mounted reads ran at "
                    f"{fmt_rate(ci['chain_bytes']['registry'], self.m('ci_mount_registry') - mount_only)}: buildctl reads "
                    f"the layers one after another while the mount fetches the rest of the chain on up to 4 more "
                    f"connections, every byte received, written, hashed and served by the daemon on the machine's "
                    f"{os.cpu_count()} cores, which the registry shares).")
                wire, chain = self.m("ci4_mount_wire_registry"), ci["chain_bytes"]["registry"]
                out.append(
                    f"- **{CI_CONCURRENT} concurrent CI jobs sharing one cache directory: one download per blob, all "
                    f"byte-exact** (issue 16): {self.verdict(wire <= chain * 1.01 + MiB)} — {fmt_bytes(wire)} from the "
                    f"registry for a chain of {fmt_bytes(chain)} read by {CI_CONCURRENT} jobs, every layer hashed "
                    f"through every mount afterwards; {self.ratio['ci4_time']:.3f}× the time of {CI_CONCURRENT} "
                    f"independent whole-cache restores ({fmt_s(self.m('ci4_mount_registry'))} against "
                    f"{fmt_s(self.m('ci4_dl_registry'))}, which moved {fmt_bytes(self.m('ci4_dl_wire_registry'))}).")
        elif "registry" in self.parts:
            out.append("- **CI case: ≤ 0.12× the bytes and ≤ 0.3× the time of downloading the whole cache directory**: "
                       "not measured in this run (part `ci`).")
        return "\n".join(out)

    # ---- where the time goes
    def where_time(self):
        out = []
        sz = fmt_size_name(self.size)
        if self.has("s3"):
            s = self.P["s3_cold_summary"]
            out.append(
                f"- S3 cold {sz} read ({fmt_s(self.m('s3_cold'))}{spread(self.b.s('s3_cold'))}): {self.pattern(s)}, at most "
                f"{s['peak']} at once, {fmt_bytes(self.m('s3_cold_wire'))} from nginx; CPU during the read: daemon "
                f"{self.m('s3_cold_cpu_daemon'):.2f} s (until the download settled), nginx "
                f"{self.m('s3_cold_cpu_nginx'):.2f} s, whole machine {self.m('s3_cold_cpu_machine'):.2f} CPU-s "
                f"({self.m('s3_cold_cpu_machine') / (self.m('s3_cold') * (os.cpu_count() or 1)) * 100:.0f}% of "
                f"{os.cpu_count()} cores); `curl` {fmt_s(self.m('s3_curl'))} used {self.m('s3_curl_cpu'):.2f} CPU-s "
                f"and nginx {self.m('s3_curl_cpu_nginx'):.2f}.")
        if self.has("shaped"):
            out.append(
                f"- Shaped link: {self.link_text()}. Per cold read the delay line used "
                f"{self.m('shaped_cold_cpu_delayline'):.2f} CPU-s, the daemon {self.m('shaped_cold_cpu_daemon'):.2f}; "
                f"one `curl` stream took {fmt_s(self.m('shaped_curl'))} "
                f"({fmt_rate(self.size, self.m('shaped_curl'))}, the cap being {self.a.cap_bps / 1e6:.1f} MB/s).")
        if self.has("peers"):
            out.append(
                f"- Peers: ocicachefs sets its mount's read_ahead_kb itself; s3fs (libfuse 2) and rclone run with their "
                f"defaults as users would (read_ahead_kb: " + ", ".join(f"{t} {v}" for t, v in self.P.get('peer_read_ahead_kb', {}).items())
                + "). Peak RSS after the cold read: "
                + ", ".join(f"{t} {fmt_bytes(self.m(f'peer_cold_hwm_{t}'))}" for t in ("ocicachefs", "s3fs", "rclone"))
                + ".")
        if self.has("ci"):
            ci = self.P["ci"]
            for src in ci.get("sources", ["registry", "s3"]):
                out.append(
                    f"- CI ({self.ci_name(src)}): the mounted job {fmt_s(self.m(f'ci_mount_{src}'))} = mount "
                    f"{fmt_s(self.m(f'ci_mount_only_{src}'))} + reads {fmt_s(self.m(f'ci_mount_{src}') - self.m(f'ci_mount_only_{src}'))}"
                    f" ({fmt_bytes(self.P[f'ci_read_{src}'])} of layers read); the baseline {fmt_s(self.m(f'ci_dl_{src}'))} = "
                    f"download {fmt_s(self.m(f'ci_dl_only_{src}'))} "
                    f"({fmt_rate(self.m(f'ci_dl_wire_{src}'), self.m(f'ci_dl_only_{src}'))}) + the same reads on the local "
                    f"copy {fmt_s(self.m(f'ci_dl_{src}') - self.m(f'ci_dl_only_{src}'))}."
                    + (f" The mounted reads ran at "
                       f"{fmt_rate(ci['chain_bytes'][src], self.m(f'ci_mount_{src}') - self.m(f'ci_mount_only_{src}'))}, "
                       f"{ci['chain_bytes'][src] / (self.m(f'ci_mount_{src}') - self.m(f'ci_mount_only_{src}')) / self.a.cap_bps:.1f}"
                       f"× one connection's cap; the download at "
                       f"{self.m(f'ci_dl_wire_{src}') / self.m(f'ci_dl_only_{src}') / self.a.cap_bps:.1f}× it."
                       if src == "s3-shaped" else ""))
        return "\n".join(out)

    # ---- setup and method
    def setup(self):
        if not self.P:
            return ""
        text = ("S3 parts: moto (`moto_server`, in-memory S3) behind Debian's nginx as a caching reverse proxy "
                "(`proxy_cache`, key `$uri`, whole objects, ranges answered by nginx), because moto reads the whole "
                "object for every GET. Every object is fetched through nginx once after seeding; before each cold "
                "read or download the page cache is dropped and nginx's cache file is read once, so only the client "
                "side is cold. S3 layers are opaque pseudo-random bytes in BuildKit's layout (`blobs/sha256:<hex>`, "
                "`manifests/<name>`); requests carry SigV4 signatures (curl's `--aws-sigv4`).")
        if "shaped" in self.parts:
            text += (f" The shaped link: the clients (curl, the ocicachefs daemon, started with `nsenter --net`) run in "
                     f"one network namespace, a second nginx (`limit_rate {self.a.rate}`, proxying to the caching nginx "
                     f"over a unix socket) in another; the two are joined only by TUN devices and "
                     f"`bench/delayline.py`, which holds every packet {self.a.delay_ms:g} ms each way and paces each "
                     f"connection from port 80 to {self.a.cap_bps / 1e6:.1f} MB/s (nginx's `limit_rate` lets the first "
                     f"second's worth of every response through at once, so alone it never slows 8 MiB ranges).")
        return text

    def how(self):
        out = []
        if "s3" in self.parts:
            out.append("2 (S3). `dd bs=1M` of `MNT/blobs/sha256/HEX` on a fresh `type=s3` mount (endpoint the caching "
                       "nginx, `use_path_style=true`) and cache directory; baselines `curl --aws-sigv4 -o /dev/null` "
                       "of the object and 8 `curl -r` processes, each 1/8 of it, at once. Bytes: the sum of "
                       "`$body_bytes_sent` of the blob requests in nginx's access log, after it and the cache "
                       "directory stopped changing for 1.5 s.")
        if "shaped" in self.parts:
            out.append("3. The same read and baselines through the shaped link (see above); the round trip is the "
                       "median TCP connect time of 15 connections to the edge from the client namespace; the link's "
                       "own capacity is 8 ranged `curl`s to the uncapped port 81. Bytes and request overlap from the "
                       "edge nginx's access log (`$msec` − `$request_time` to `$msec` per request: nginx's own view, "
                       "which ends when the last byte is in its socket buffer).")
        if "peers" in self.parts:
            out.append("5. Per run, for each tool in turn on a fresh cache: mount, `stat` the file, drop caches, warm "
                       "nginx's file, `dd bs=1M` (cold); then, for each tool, a new mount over its own complete cache, "
                       "`drop_caches`, `dd bs=1M` (warm). s3fs 1.90: `-o url=…,endpoint=us-east-1,passwd_file=…,"
                       "use_path_request_style,use_cache=DIR`; rclone 1.60: `mount --vfs-cache-mode full "
                       "--cache-dir DIR` (remote from `RCLONE_CONFIG_*`, `AWS_CA_BUNDLE` unset). VmHWM from "
                       "`/proc/PID/status` of each daemon after its cold read.")
        if "ci" in self.parts:
            ci = self.P.get("ci", {})
            out.append(
                f"9. A cache of {CI_CHAINS} tags `ci-0`…`ci-{CI_CHAINS - 1}`, each a chain of "
                f"{len(CI_SIZES_MIB)} layers of {', '.join(str(s // self.a.ci_scale if s % self.a.ci_scale == 0 else s / self.a.ci_scale) for s in CI_SIZES_MIB)} "
                f"MiB (no layer shared), pushed both to the registry (one repository, BuildKit's index variant) and "
                f"to S3 (BuildKit's layout). The job imports `ci-{CI_TAG}`, replaying buildctl's local import: "
                f"`index.json.lock` created, flocked shared and unlinked around reading `index.json`; manifest and "
                f"cache config read whole (stat, open, pread, close); each layer of the chain, parent first, by "
                f"1 MiB chunks (stat, stat, open, pread, close). Mounted: the clock runs from `ocicachefs mount` "
                f"to the last read (unmounting excluded). Baseline, as a CI cache action restoring a directory: "
                f"list the cache (registry `tags/list` and each tag's manifest; S3 `ListObjectsV2`), download every "
                f"object with {CI_PARALLEL} `curl`s at once into a directory, write the layout's `index.json`, then "
                f"the same replay on the local copy. Bytes: response bodies in the registry's log (every GET of the "
                f"repository) and in nginx's access log (every request on the bucket)."
                + (" With the `shaped` part, the S3 case runs a third time through the shaped link: the mount and "
                   "the baseline's curls in the client namespace, bytes from the edge nginx's log."
                   if "shaped" in self.parts else ""))
        return "\n".join(out)

    def not_measured(self):
        out = []
        if "s3" not in self.parts:
            out.append("- 2 (S3 half): cold read from an S3 endpoint vs curl (part `s3`).")
        if "shaped" not in self.parts:
            out.append("- 3: behind a per-connection cap and added latency vs 1 and 8 curl streams (part `shaped`).")
        if "peers" not in self.parts:
            out.append("- 5: cold and warm vs rclone and s3fs (part `peers`).")
        if "ci" not in self.parts:
            out.append("- 9: the CI case (part `ci`).")
        return "\n".join(out)
