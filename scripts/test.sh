#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests against a real docker-registry and
# real FUSE mounts. Needs root (or a user allowed to mount FUSE) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build --build-tests
# One test at a time: the integration tests start servers and mounts and wait on them, and
# run side by side on two cores they starve each other's waits into time-outs.
swift test --skip-build --no-parallel
scripts/fuzz.sh 3  # every parser's libFuzzer target for 3 s (docs/FUZZING.md)
