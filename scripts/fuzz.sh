#!/usr/bin/env bash
# Fuzzes every parser of remote or user input with libFuzzer (docs/FUZZING.md).
#
#   scripts/fuzz.sh [SECONDS | --runs N] [TARGET...]
#
# Each target (all by default) runs for SECONDS (default 5) or N executions, starting from its
# seed corpus in Fuzz/corpus/TARGET; what it learns goes to .build-fuzz/corpus/TARGET and stays
# for the next run. A crash, a hang (an input taking over 10 s) or a leak of memory past 2 GB
# stops the run: libFuzzer leaves the input as .build-fuzz/artifacts/TARGET/crash-* (or
# timeout-*, oom-*) and the script exits 1. Replay one with:
#
#   .build-fuzz/release/ocicachefs-fuzz TARGET .build-fuzz/artifacts/TARGET/crash-…
set -euo pipefail
cd "$(dirname "$0")/.."

budget=(-max_total_time=5)
if [ "${1-}" = "--runs" ]; then
    budget=(-runs="$2")
    shift 2
elif [[ "${1-}" =~ ^[0-9]+$ ]]; then
    budget=(-max_total_time="$1")
    shift
fi

# libFuzzer's runtime without its main, from the toolchain's clang (Package.swift explains).
clang="$(dirname "$(readlink -f "$(command -v swiftc)")")/clang"
runtime=$("$clang" -print-file-name="libclang_rt.fuzzer_no_main-$(uname -m).a")
[ -f "$runtime" ] || { echo "fuzz: $runtime not found; this toolchain has no libFuzzer" >&2; exit 1; }

scratch=.build-fuzz
mkdir -p "$scratch"
if ! OCICACHEFS_LIBFUZZER_RUNTIME="$runtime" swift build -c release --scratch-path "$scratch" \
    --product ocicachefs-fuzz >"$scratch/build.log" 2>&1; then
    grep -v '^\[' "$scratch/build.log" >&2
    echo "fuzz: the build failed" >&2
    exit 1
fi
fuzzer="$scratch/release/ocicachefs-fuzz"

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(ls Fuzz/corpus)

# A trap must reach libFuzzer's signal handler, which saves the input; Swift's backtracer would
# take the signal first and end the process without it.
export SWIFT_BACKTRACE=enable=no

status=0
for target in "${targets[@]}"; do
    [ -d "Fuzz/corpus/$target" ] || { echo "fuzz: no corpus Fuzz/corpus/$target" >&2; exit 1; }
    mkdir -p "$scratch/corpus/$target" "$scratch/artifacts/$target"
    log="$scratch/artifacts/$target/last-run.log"
    # The first directory takes new inputs; the seed corpus in the repository is only read.
    if "$fuzzer" "$target" "${budget[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$scratch/artifacts/$target/" "$scratch/corpus/$target" "Fuzz/corpus/$target" \
        >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        seconds=$(sed -n 's/^stat::\(average_exec_per_sec\): *//p' "$log")
        echo "fuzz: $target: ${runs:-?} executions, no crash (${seconds:-?} exec/s)"
    else
        status=1
        echo "fuzz: $target FAILED; the log is $log:" >&2
        grep -E '^(==|SUMMARY|artifact_prefix|Test unit written|.*Fatal error|.*fuzz check failed)' "$log" | head -20 >&2
    fi
done
exit "$status"
