#!/usr/bin/env bash
# The benchmark suite (issue 4): builds a release ocicachefs, starts its own servers on
# 127.0.0.1 (docker-registry; moto behind a caching nginx for S3) and, for the shaped link, two
# network namespaces joined by a user-space delay line; measures every figure against a
# baseline taken in the same run, prints a table and writes docs/performance.md.
#
# Parts (all of them in a plain run):
#   registry  items 1, 2, 4, 6, 7, 8 against the registry (mount time, cold/warm reads, bytes, RSS, buildctl pattern)
#   s3        item 2, S3 half: cold read through the mount vs curl, from S3 (moto behind nginx's cache)
#   shaped    item 3: the same behind a per-connection rate cap and added latency, vs 1 and 8 curl streams
#   peers     item 5: cold and warm vs rclone mount --vfs-cache-mode full and s3fs (use_cache), same object
#   ci        item 9: a 2 GiB cache, a job reading one tag's chain (10%), vs downloading the whole cache first
#             issue 16: that job vs restoring a cache of only its chain; 4 such jobs at once through 4 mounts
#             sharing one cache directory vs 4 whole-cache restores at once (bytes, time, every layer hashed)
#   wide      issue 13 item 4: mount and `ls -l` of caches of 20,000 and 100,000 blobs, vs a 1-blob mount
#             and `ls -l` of as many empty files on tmpfs (seeding 100,000 blobs takes a minute or two)
#   export    issue 14: a buildctl-style export of a 1 GiB cache (8 layers) through a --writable mount
#             to the registry and to S3 until `ocicachefs unmount` returns, vs curl uploads of the same
#             blobs 8 at once; its re-export through a fresh mount (requests, bytes); the CI job with
#             its export vs restoring and saving the whole cache directory
#   layers    issue 15: the `layers/` view of a 1 GiB tar (256 MiB quick) as a gzip and a zstd layer:
#             cold sequential read vs `curl | gzip -dc` (`zstd -dc`), random 1 MiB reads once indexed vs
#             decompressing up to them, the daemon's CPU and peak RSS; full mode: a 4 GiB layer's peak
#             RSS through `layers/` vs `blobs/` (bench/bench_layers.py; its section follows the others)
#
#   bench/run.sh                 full mode, every part: 1 GiB blob, the 4 GiB peak-RSS case; writes docs/performance.md
#   bench/run.sh --quick         256 MiB blob, 256 MiB CI cache, no 4 GiB case; writes no doc unless --doc
#   --only PART[,PART...]        run only these parts (writes no doc unless --doc)
#   --doc FILE                   write the report to FILE (full mode's default: docs/performance.md)
#   --keep                       keep the work directory (servers' storage, logs, results.json) for inspection
#
# Environment: BENCH_SKIP_4G=1 skips the 4 GiB case in full mode; BENCH_TMPDIR (default /tmp) is
# where the work directory goes (~16 GiB free needed in full mode); BENCH_SCRATCH_PATH builds the
# binary in that scratch directory instead of .build; BENCH_DELAY_MS (one-way delay of the shaped
# link, default 10) and BENCH_RATE (the per-connection cap in nginx's syntax, default 25m: 8 capped
# streams then need 210 MB/s; uncapped, the link (delay line and both nginx on 2 cores) carried
# 270-410 MB/s in quick runs and 600-720 MB/s in full runs, so the cap stays the binding limit;
# the report checks that in every run).
# Needs root (drop_caches, read_ahead_kb, FUSE mounts, network namespaces), /dev/fuse,
# /dev/net/tun, the README's setup (scripts/setup.sh) and gcc; installs nginx-light, rclone and
# s3fs with apt-get when a part needs them and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

all_parts="registry,s3,shaped,peers,ci,wide,export,layers"
quick=0 keep=0 doc="" parts="$all_parts" only=0
args_text=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; args_text+=" --quick" ;;
        --keep) keep=1 ;;
        --doc) doc="$2"; args_text+=" --doc $2"; shift ;;
        --only) parts="$2"; only=1; args_text+=" --only $2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "run.sh: $*" >&2; exit 1; }
has() { [[ ",$parts," == *",$1,"* ]]; }
for p in ${parts//,/ }; do
    [[ ",$all_parts," == *",$p,"* ]] || die "unknown part '$p' in --only (parts: $all_parts)"
done
need_registry=0 need_s3=0
{ has registry || has ci || has wide || has export || has layers; } && need_registry=1
{ has s3 || has shaped || has peers || has ci || has export; } && need_s3=1

[ "$(id -u)" -eq 0 ] || die "needs root (drop_caches, read_ahead_kb, FUSE mounts, network namespaces)"
[ -c /dev/fuse ] || die "/dev/fuse is missing"
for tool in swift docker-registry curl gcc pkg-config fusermount3 mountpoint findmnt dd python3; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh; gcc: apt-get install gcc)"
done
python3 -c 'import requests' 2>/dev/null || die "python3 requests missing (run scripts/setup.sh)"
examples=/usr/share/doc/libfuse3-dev/examples
if has registry; then
    [ -f "$examples/passthrough_ll.c" ] && [ -f "$examples/passthrough_helpers.h" ] ||
        die "libfuse3-dev's passthrough_ll.c example is missing (apt-get install libfuse3-dev)"
fi
if [ "$need_s3" -eq 1 ]; then
    python3 -c 'import boto3, moto.server' 2>/dev/null || die "python3 boto3 or moto missing (run scripts/setup.sh)"
    # The bench's own prerequisites (not the test suite's): nginx for the caching S3 endpoint and
    # the shaped edge, rclone and s3fs for the peers part.
    missing=()
    command -v nginx >/dev/null || missing+=(nginx-light)
    if has peers; then
        command -v rclone >/dev/null || missing+=(rclone)
        command -v s3fs >/dev/null || missing+=(s3fs)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing the benchmark's prerequisites: ${missing[*]}" >&2
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
    command -v nginx >/dev/null || die "nginx not found after installing nginx-light"
fi
if has layers; then
    for tool in tar gzip zstd; do command -v "$tool" >/dev/null || die "$tool not found (apt-get install tar gzip zstd)"; done
fi
if has shaped; then
    for tool in ip nsenter; do command -v "$tool" >/dev/null || die "$tool not found (apt-get install iproute2 util-linux)"; done
    [ -c /dev/net/tun ] || die "/dev/net/tun is missing (the shaped link's delay line needs TUN devices)"
fi

if [ "$quick" -eq 1 ]; then
    size=$((256 << 20)) huge=0 layers_huge=0 need_gib=3 ci_scale=8
else
    size=$((1 << 30)) huge=$((4 << 30)) need_gib=16 ci_scale=1
    layers_huge=$huge
    has registry || huge=0
    if [ "${BENCH_SKIP_4G:-0}" = 1 ]; then huge=0 layers_huge=0 need_gib=9; args_text="BENCH_SKIP_4G=1 bench/run.sh$args_text"; fi
    [ -n "$doc" ] || [ "$only" -eq 1 ] || doc="$root/docs/performance.md"
fi
[[ "$args_text" == BENCH_SKIP_4G* ]] || args_text="bench/run.sh$args_text"
[ -n "${BENCH_SCRATCH_PATH:-}" ] && args_text="BENCH_SCRATCH_PATH=$BENCH_SCRATCH_PATH $args_text"
delay_ms=${BENCH_DELAY_MS:-10}
rate=${BENCH_RATE:-25m}
[ "$delay_ms" != 10 ] && args_text="BENCH_DELAY_MS=$delay_ms $args_text"
[ "$rate" != 25m ] && args_text="BENCH_RATE=$rate $args_text"

tmp_base=${BENCH_TMPDIR:-/tmp}
avail_gib=$(df -P -BG "$tmp_base" | awk 'NR==2{sub("G","",$4); print $4}')
has wide && need_gib=$((need_gib + 2))   # 120,000 small blobs in the registry's storage
# export: two caches' worth of layers at a time (sources, registry, moto, the mount's cache) and
# the CI caches in both stores
has export && need_gib=$((need_gib + (quick ? 3 : 10)))
# layers: the tar and its two compressed copies while seeding, the registry's and a cache's copies
# (the 4 GiB layer: its tar, its gzip, the registry's copy and a cache's)
has layers && need_gib=$((need_gib + (quick ? 2 : 5) + (layers_huge ? 11 : 0)))
[ "$avail_gib" -ge "$need_gib" ] || die "$tmp_base has ${avail_gib} GiB free, this mode needs about $need_gib GiB (set BENCH_TMPDIR)"

# What the binary is built from, recorded now (other commits may land while the bench runs).
build_commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
build_dirty=$(git status --porcelain -- Sources Package.swift 2>/dev/null | wc -l)
build=(scripts/build-release.sh)
[ -n "${BENCH_SCRATCH_PATH:-}" ] && build+=(--scratch-path "$BENCH_SCRATCH_PATH")
echo "== building the release binary (${build[*]})" >&2
"${build[@]}" >&2
binary="$("${build[@]}" --show-bin-path)/ocicachefs"
[ -x "$binary" ] || die "no binary at $binary after the build"

work=$(mktemp -d "$tmp_base/ocicachefs-bench.XXXXXX")
mkdir -p "$work/pids"
registry_pid="" moto_pid="" nginx_pid="" edge_pid="" delay_pid="" netns_cli="" netns_srv=""
stop_pid() {  # PID [SIGNAL]: stop a process this script started, and wait for it (bounded)
    local pid=$1 sig=${2:-TERM}
    [ -n "$pid" ] || return 0
    kill "-$sig" "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null
}
cleanup() {
    set +e
    # Every FUSE mount under the work directory (ocicachefs, passthrough_ll, s3fs, rclone).
    findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do
        "$binary" unmount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m"
    done
    # Daemons bench.py started (passthrough_ll, s3fs, rclone) left PID files; stop each only if
    # that PID still runs a command naming this work directory.
    for f in "$work"/passthrough_ll.pid "$work"/pids/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$work"; then
            stop_pid "$pid"
        fi
    done
    stop_pid "$edge_pid" QUIT
    stop_pid "$delay_pid"
    stop_pid "$nginx_pid" QUIT
    stop_pid "$moto_pid"
    stop_pid "$registry_pid"
    for ns in "$netns_cli" "$netns_srv"; do [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null; done
    if [ "$keep" -eq 1 ]; then echo "run.sh: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {  # URL SECONDS WHAT LOG: poll until the URL answers at all
    local url=$1 secs=$2 what=$3 logf=$4
    for _ in $(seq $((secs * 20))); do
        curl -s -o /dev/null --max-time 1 "$url" && return 0
        sleep 0.05
    done
    die "$what did not answer at $url within ${secs} s (see $logf)"
}

bench_args=(--work "$work" --binary "$binary" --size "$size" --huge-size "$huge" --parts "$parts"
            --ci-scale "$ci_scale" --command "$args_text" --build-commit "$build_commit" --build-dirty "$build_dirty")

if has registry; then
    echo "== compiling libfuse's passthrough_ll example into $work/pt" >&2
    mkdir -p "$work/pt"
    cp "$examples/passthrough_ll.c" "$examples/passthrough_helpers.h" "$work/pt/"
    gcc -O2 -o "$work/pt/passthrough_ll" "$work/pt/passthrough_ll.c" $(pkg-config fuse3 --cflags --libs)
    bench_args+=(--passthrough "$work/pt/passthrough_ll")
fi

if [ "$need_registry" -eq 1 ]; then
    echo "== starting docker-registry" >&2
    python3 scripts/testenv/registry.py --dir "$work/registry" > "$work/registry.out" &
    registry_pid=$!
    for _ in $(seq 200); do
        port=$(awk '/^port/{print $2}' "$work/registry.out")
        [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break
        sleep 0.05
    done
    curl -sf "http://127.0.0.1:$port/v2/" >/dev/null || die "docker-registry did not start (see $work/registry/registry.log)"
    bench_args+=(--registry-dir "$work/registry" --registry-port "$port" --registry-pid "$registry_pid")
fi

if [ "$need_s3" -eq 1 ]; then
    echo "== starting moto and a caching nginx in front of it" >&2
    python3 scripts/testenv/s3.py --log "$work/moto.log" > "$work/moto.out" &
    moto_pid=$!   # s3.py execs the server, so this is the server
    for _ in $(seq 100); do grep -q '^port' "$work/moto.out" && break; sleep 0.05; done
    moto_port=$(awk '/^port/{print $2}' "$work/moto.out")
    [ -n "$moto_port" ] || die "moto did not print its port (see $work/moto.log)"
    wait_http "http://127.0.0.1:$moto_port/" 20 moto "$work/moto.log"
    nginx_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$work/nginx/cache" "$work/nginx/tmp"
    temp_paths="client_body_temp_path $work/nginx/tmp/body; proxy_temp_path $work/nginx/tmp/proxy;
    fastcgi_temp_path $work/nginx/tmp/fastcgi; uwsgi_temp_path $work/nginx/tmp/uwsgi; scgi_temp_path $work/nginx/tmp/scgi;"
    cat > "$work/nginx/cache.conf" <<CONF
# Whole-object cache in front of moto (moto reads the whole object for every GET, even a small
# range): nginx fetches each object once and answers HEADs and ranges itself.
user root;
worker_processes 2;
daemon off;
pid $work/nginx/cache.pid;
error_log $work/nginx/cache.error.log warn;
events { worker_connections 1024; }
http {
    log_format bench '\$request_method \$uri \$status \$body_bytes_sent "\$http_range" \$upstream_cache_status \$request_time \$msec \$connection';
    access_log $work/nginx/cache.access.log bench;
    # What uploads send (request line, headers and body), for the export part.
    log_format upload '\$request_method \$uri "\$args" \$status \$request_length \$body_bytes_sent \$request_time \$msec';
    access_log $work/nginx/cache.upload.log upload;
    # Uploads (the export part) pass through as they arrive, whatever their size.
    client_max_body_size 0;
    proxy_request_buffering off;
    $temp_paths
    proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=s3:10m max_size=16g inactive=1d use_temp_path=off;
    upstream moto { server 127.0.0.1:$moto_port; keepalive 16; }
    server {
        listen 127.0.0.1:$nginx_port;
        listen unix:$work/nginx/s3.sock;
        location / {
            proxy_pass http://moto;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_read_timeout 600s;
            proxy_cache s3;
            proxy_cache_key \$uri;
            proxy_cache_convert_head on;
            proxy_cache_valid 200 1d;
            proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 600s;
            proxy_cache_bypass \$args;
            proxy_no_cache \$args;
        }
    }
}
CONF
    nginx -t -c "$work/nginx/cache.conf" > "$work/nginx/cache.test.log" 2>&1 || die "nginx rejects $work/nginx/cache.conf: $(tail -2 "$work/nginx/cache.test.log")"
    nginx -c "$work/nginx/cache.conf" 2>> "$work/nginx/cache.error.log" &
    nginx_pid=$!
    wait_http "http://127.0.0.1:$nginx_port/" 10 "nginx (cache)" "$work/nginx/cache.error.log"
    bench_args+=(--moto-port "$moto_port" --moto-pid "$moto_pid" --nginx-port "$nginx_port" --nginx-pid "$nginx_pid"
                 --nginx-dir "$work/nginx")
fi

if has shaped; then
    echo "== shaped link: namespaces, a ${delay_ms} ms one-way delay line, nginx with limit_rate $rate per connection" >&2
    netns_cli="ocb-cli-$$" netns_srv="ocb-srv-$$"
    ip netns add "$netns_cli" || die "ip netns add failed"
    ip netns add "$netns_srv" || die "ip netns add failed"
    ip -n "$netns_cli" link set lo up
    ip -n "$netns_srv" link set lo up
    cli_addr=10.203.0.1 srv_addr=10.203.0.2
    case "$rate" in
        *k) cap_bps=$(( ${rate%k} * 1024 )) ;;
        *m) cap_bps=$(( ${rate%m} * 1048576 )) ;;
        *[0-9]) cap_bps=$rate ;;
        *) die "BENCH_RATE=$rate: use nginx's syntax (e.g. 50m)" ;;
    esac
    # nginx's limit_rate lets the first second's worth of every response through unthrottled, so
    # the delay line enforces the same cap on each connection from port 80, packet by packet.
    python3 bench/delayline.py --ns-a "$netns_cli" --ns-b "$netns_srv" --addr-a "$cli_addr" --addr-b "$srv_addr" \
        --delay-ms "$delay_ms" --cap-bps "$cap_bps" --cap-ports 80 --ready "$work/delayline.ready" > "$work/delayline.log" 2>&1 &
    delay_pid=$!
    for _ in $(seq 100); do [ -f "$work/delayline.ready" ] && break; kill -0 "$delay_pid" 2>/dev/null || break; sleep 0.05; done
    [ -f "$work/delayline.ready" ] || die "the delay line did not come up: $(tail -2 "$work/delayline.log")"
    mkdir -p "$work/nginx/edge-tmp"
    cat > "$work/nginx/edge.conf" <<CONF
# The object store's edge, in its own network namespace behind the delay line: every
# connection to port 80 is capped at $rate per second (limit_rate here, and packet by packet in
# the delay line, since limit_rate lets each response's first second through at once).
# Port 81 has no cap (to measure what the link itself carries).
user root;
worker_processes 2;
daemon off;
pid $work/nginx/edge.pid;
error_log $work/nginx/edge.error.log warn;
events { worker_connections 1024; }
http {
    log_format bench '\$request_method \$uri \$status \$body_bytes_sent "\$http_range" \$server_port \$request_time \$msec \$connection';
    access_log $work/nginx/edge.access.log bench;
    client_body_temp_path $work/nginx/edge-tmp/body; proxy_temp_path $work/nginx/edge-tmp/proxy;
    fastcgi_temp_path $work/nginx/edge-tmp/fastcgi; uwsgi_temp_path $work/nginx/edge-tmp/uwsgi; scgi_temp_path $work/nginx/edge-tmp/scgi;
    upstream cache { server unix:$work/nginx/s3.sock; keepalive 32; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$http_host;
    proxy_read_timeout 600s;
    proxy_max_temp_file_size 0;
    server { listen $srv_addr:80; limit_rate $rate; location / { proxy_pass http://cache; } }
    server { listen $srv_addr:81; location / { proxy_pass http://cache; } }
}
CONF
    nsenter --net="/run/netns/$netns_srv" nginx -t -c "$work/nginx/edge.conf" > "$work/nginx/edge.test.log" 2>&1 ||
        die "nginx rejects $work/nginx/edge.conf: $(tail -2 "$work/nginx/edge.test.log")"
    nsenter --net="/run/netns/$netns_srv" nginx -c "$work/nginx/edge.conf" 2>> "$work/nginx/edge.error.log" &
    edge_pid=$!   # nsenter execs nginx: this is its master
    ok=0
    for _ in $(seq 200); do
        nsenter --net="/run/netns/$netns_cli" curl -s -o /dev/null --max-time 1 "http://$srv_addr:81/" && { ok=1; break; }
        sleep 0.05
    done
    [ "$ok" -eq 1 ] || die "the edge nginx did not answer through the delay line (see $work/nginx/edge.error.log, $work/delayline.log)"
    bench_args+=(--netns "$netns_cli" --edge "$srv_addr" --delay-ms "$delay_ms" --rate "$rate" --cap-bps "$cap_bps" --delay-pid "$delay_pid"
                 --edge-pid "$edge_pid")
fi

[ "$quick" -eq 1 ] && bench_args+=(--quick)
[ -n "$doc" ] && bench_args+=(--doc "$doc")
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN { exit !(l > 1.0) }'; then
    echo "run.sh: warning: load average $load1: other work on this machine makes the figures noisier" >&2
fi
echo "== measuring ($([ "$quick" -eq 1 ] && echo quick || echo full) mode; parts $parts)" >&2
other_parts=$(tr "," "\n" <<< "$parts" | { grep -vx layers || true; } | paste -sd, -)
if [ -n "$other_parts" ]; then
    # bench.py measures the other parts (its last --parts wins).
    python3 bench/bench.py "${bench_args[@]}" --parts "$other_parts"
fi
if has layers; then
    layers_args=(--work "$work" --binary "$binary" --registry-dir "$work/registry" --registry-port "$port"
                 --registry-pid "$registry_pid" --size "$size" --huge-size "$layers_huge" --command "$args_text")
    [ -n "$doc" ] && layers_args+=(--doc "$doc")
    [ -n "$doc" ] && [ -n "$other_parts" ] && layers_args+=(--append)
    python3 bench/bench_layers.py "${layers_args[@]}"
fi
[ -n "$doc" ] || echo "run.sh: this run leaves docs/performance.md alone (pass --doc FILE to write a report)" >&2
