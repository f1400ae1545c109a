#!/usr/bin/env bash
# The long run of the fetcher's reference-model test: a million random interleavings by
# default (the test suite runs a few thousand). SEQUENCES=N and SEED=S change them.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --build-tests
OCICACHEFS_MODEL_SEQUENCES="${SEQUENCES:-1000000}" OCICACHEFS_MODEL_SEED="${SEED:-1}" \
    swift test --skip-build --filter TransferMachineModelTests
