#!/usr/bin/env bash
# The long runs of the reference-model tests (the test suite runs a few thousand sequences
# of each): a million random interleavings of the fetcher's state machine, and a hundred
# thousand operation sequences on the scratch namespace. SEQUENCES=N, NAMESPACE_SEQUENCES=N
# and SEED=S change them.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --build-tests
OCICACHEFS_MODEL_SEQUENCES="${SEQUENCES:-1000000}" OCICACHEFS_MODEL_SEED="${SEED:-1}" \
    swift test --skip-build --filter TransferMachineModelTests
OCICACHEFS_MODEL_SEQUENCES="${NAMESPACE_SEQUENCES:-100000}" OCICACHEFS_MODEL_SEED="${SEED:-1}" \
    swift test --skip-build --filter ScratchNamespaceModelTests
