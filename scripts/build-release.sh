#!/bin/sh
# Builds the release binary as installed and benchmarked; extra arguments go to `swift build`
# (e.g. --scratch-path DIR, or --show-bin-path to print where the binary is).
#
# --static-swift-stdlib links the Swift runtime and Foundation in: the binary runs without a
# Swift toolchain, starts faster and maps fewer library pages. lld with packed relative
# relocations (glibc 2.36's DT_RELR) shrinks the 1.9 MiB of relocations the loader reads at
# every start to 34 KiB.
set -eu
cd "$(dirname "$0")/.."
exec swift build -c release --static-swift-stdlib --product ocicachefs \
    -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs "$@"
