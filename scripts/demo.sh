#!/usr/bin/env bash
# The main job on an embedded default: a loopback docker-registry seeded with a small
# BuildKit-style cache, mounted read-only and lazily, its layout listed and one blob verified.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null

work=$(mktemp -d /tmp/ocicachefs-demo.XXXXXX)
registry_pid=""
cleanup() {
    .build/debug/ocicachefs unmount "$work/mnt" 2>/dev/null || true
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt"

python3 scripts/testenv/registry.py --dir "$work/registry" > "$work/registry.out" &
registry_pid=$!
until port=$(awk '/^port/{print $2}' "$work/registry.out") && [ -n "$port" ]; do sleep 0.05; done
until curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do sleep 0.05; done
python3 scripts/testenv/seed_cache.py --registry "127.0.0.1:$port" --repo demo/cache --tag main \
    --variant index --layers 3 --layer-size 2000000 --out "$work/seed.json" >/dev/null
blob_gets() { grep -E '"GET /v2/demo/cache/blobs/' "$work/registry/registry.log" | grep -cE '" (200|206) ' || true; }

echo "== ocicachefs mount --cache-dir $work/cache type=registry,ref=127.0.0.1:$port/demo/cache:main $work/mnt"
.build/debug/ocicachefs mount --cache-dir "$work/cache" "type=registry,ref=127.0.0.1:$port/demo/cache:main" "$work/mnt"
echo "== the layout (sizes known before any layer is downloaded; blob GETs so far: $(blob_gets), the cache config)"
(cd "$work/mnt" && find . -printf '%M %10s %p\n' | sort -k3)
echo "== index.json"
cat "$work/mnt/index.json"; echo
layer=$(python3 -c 'import json,sys; print([b["digest"][7:] for b in json.load(open(sys.argv[1]))["blobs"] if b["role"]=="layer"][0])' "$work/seed.json")
echo "== reading one layer through the mount"
actual=$(sha256sum < "$work/mnt/blobs/sha256/$layer" | cut -d' ' -f1)
echo "name:   $layer"
echo "sha256: $actual"
[ "$actual" = "$layer" ] && echo "verified; blob GETs now: $(blob_gets) (only what was read crossed the network)"
.build/debug/ocicachefs unmount "$work/mnt"
echo "== unmounted"
