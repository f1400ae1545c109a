#!/usr/bin/env bash
# The benchmark suite, part 1 (issue 4, items 1, 2, 4, 6, 7 and 8): builds a release ocicachefs,
# starts its own docker-registry on 127.0.0.1, pushes benchmark caches, measures every figure
# against a baseline taken in the same run, prints a table and writes docs/performance.md.
#
#   bench/run.sh            full mode: 1 GiB blob, the 4 GiB peak-RSS case; writes docs/performance.md
#   bench/run.sh --quick    256 MiB blob, no 4 GiB case (a couple of minutes); writes no doc unless --doc
#   --doc FILE              write the report to FILE (full mode's default: docs/performance.md)
#   --keep                  keep the work directory (registry, caches, results.json) for inspection
#
# Environment: BENCH_SKIP_4G=1 skips the 4 GiB case in full mode; BENCH_TMPDIR (default /tmp) is
# where the work directory goes (registry storage and caches: ~12 GiB free needed in full mode).
# Needs root (drop_caches, read_ahead_kb, FUSE mounts), /dev/fuse and the README's setup
# (scripts/setup.sh), plus gcc for libfuse's passthrough_ll example.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

quick=0 keep=0 doc=""
args_text=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; args_text+=" --quick" ;;
        --keep) keep=1 ;;
        --doc) doc="$2"; args_text+=" --doc $2"; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "run.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (drop_caches, read_ahead_kb and FUSE mounts)"
[ -c /dev/fuse ] || die "/dev/fuse is missing"
for tool in swift docker-registry curl gcc pkg-config fusermount3 mountpoint dd python3; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh; gcc: apt-get install gcc)"
done
python3 -c 'import requests' 2>/dev/null || die "python3 requests missing (run scripts/setup.sh)"
examples=/usr/share/doc/libfuse3-dev/examples
[ -f "$examples/passthrough_ll.c" ] && [ -f "$examples/passthrough_helpers.h" ] ||
    die "libfuse3-dev's passthrough_ll.c example is missing (apt-get install libfuse3-dev)"

if [ "$quick" -eq 1 ]; then
    size=$((256 << 20)) huge=0 need_gib=2
else
    size=$((1 << 30)) huge=$((4 << 30)) need_gib=12
    if [ "${BENCH_SKIP_4G:-0}" = 1 ]; then huge=0 need_gib=5; args_text="BENCH_SKIP_4G=1 bench/run.sh$args_text"; fi
    [ -n "$doc" ] || doc="$root/docs/performance.md"
fi
[[ "$args_text" == BENCH_SKIP_4G* ]] || args_text="bench/run.sh$args_text"

tmp_base=${BENCH_TMPDIR:-/tmp}
avail_gib=$(df -P -BG "$tmp_base" | awk 'NR==2{sub("G","",$4); print $4}')
[ "$avail_gib" -ge "$need_gib" ] || die "$tmp_base has ${avail_gib} GiB free, this mode needs about $need_gib GiB (set BENCH_TMPDIR)"

echo "== building the release binary (swift build -c release --product ocicachefs)" >&2
swift build -c release --product ocicachefs >&2
binary="$root/.build/release/ocicachefs"

work=$(mktemp -d "$tmp_base/ocicachefs-bench.XXXXXX")
registry_pid=""
cleanup() {
    set +e
    for m in "$work/mnt" "$work/ptmnt"; do
        if mountpoint -q "$m" 2>/dev/null; then
            "$binary" unmount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || umount -l "$m"
        fi
    done
    # passthrough_ll is started by bench.py; stop it only if that PID is still our binary.
    if [ -f "$work/passthrough_ll.pid" ]; then
        pt_pid=$(cat "$work/passthrough_ll.pid")
        if [ -r "/proc/$pt_pid/cmdline" ] && tr '\0' ' ' < "/proc/$pt_pid/cmdline" | grep -q "$work/pt/passthrough_ll"; then
            kill "$pt_pid" 2>/dev/null
        fi
    fi
    if [ -n "$registry_pid" ]; then
        kill "$registry_pid" 2>/dev/null
        wait "$registry_pid" 2>/dev/null
    fi
    if [ "$keep" -eq 1 ]; then echo "run.sh: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== compiling libfuse's passthrough_ll example into $work/pt" >&2
mkdir -p "$work/pt"
cp "$examples/passthrough_ll.c" "$examples/passthrough_helpers.h" "$work/pt/"
gcc -O2 -o "$work/pt/passthrough_ll" "$work/pt/passthrough_ll.c" $(pkg-config fuse3 --cflags --libs)

echo "== starting docker-registry" >&2
python3 scripts/testenv/registry.py --dir "$work/registry" > "$work/registry.out" &
registry_pid=$!
for _ in $(seq 200); do
    port=$(awk '/^port/{print $2}' "$work/registry.out")
    [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break
    sleep 0.05
done
curl -sf "http://127.0.0.1:$port/v2/" >/dev/null || die "docker-registry did not start (see $work/registry/registry.log)"

bench_args=(--work "$work" --registry-dir "$work/registry" --registry-port "$port" --registry-pid "$registry_pid" --binary "$binary"
            --passthrough "$work/pt/passthrough_ll" --size "$size" --huge-size "$huge" --command "$args_text")
[ "$quick" -eq 1 ] && bench_args+=(--quick)
[ -n "$doc" ] && bench_args+=(--doc "$doc")
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN { exit !(l > 1.0) }'; then
    echo "run.sh: warning: load average $load1: other work on this machine makes the figures noisier" >&2
fi
echo "== measuring ($([ "$quick" -eq 1 ] && echo quick || echo full) mode)" >&2
python3 bench/bench.py "${bench_args[@]}"
[ -n "$doc" ] || echo "run.sh: quick mode leaves docs/performance.md alone (pass --doc FILE to write a report)" >&2
