#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests against a real docker-registry and
# real FUSE mounts. Needs root (or a user allowed to mount FUSE) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build --build-tests
swift test --skip-build
