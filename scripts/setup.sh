#!/usr/bin/env bash
# Installs what building, the demo and the tests need on Debian 12, then builds.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

packages=(fuse3 libfuse3-dev libcurl4-openssl-dev libzstd-dev zlib1g-dev
          docker-registry skopeo apache2-utils curl python3 python3-pip zstd iproute2)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The test servers' helper scripts (token issuer, cache seeders, moto's S3 server) use these;
# the tests parse Prometheus text with prometheus_client's parser and the CI recipes with PyYAML.
python_packages=(cryptography requests boto3 "moto[server]" prometheus-client pyyaml)
python3 -c 'import cryptography, requests, boto3, moto.server, flask, prometheus_client, yaml' 2>/dev/null ||
    python3 -m pip install --quiet "${python_packages[@]}" 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages "${python_packages[@]}"

command -v swift >/dev/null || { echo "setup: swift is not on PATH (expected Swift 6 toolchain)" >&2; exit 1; }
swift build
