#!/usr/bin/env bash
# Debian packages the local stack and the test suite run: Orthanc + DICOMweb plugin (the PACS), dcmtk
# (echoscu/storescu), PostgreSQL and Redis. Idempotent: installs only what is missing, runs
# `apt-get update` at most once, and keeps the packages' own system services from starting, because
# voxelflow starts private servers itself (shared.stack) and Orthanc's default service would hold 4242/8042.
set -euo pipefail

PACKAGES=(orthanc orthanc-dicomweb dcmtk postgresql redis-server)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-system: run as root or install sudo" >&2; exit 1; }
    SUDO=(sudo)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system: all of ${PACKAGES[*]} already installed"
    exit 0
fi

echo "install-system: installing ${missing[*]}"
# policy-rc.d exit 101 = "do not start services" for invoke-rc.d during this install only.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    own_policy=1
fi
cleanup() { if [ "$own_policy" -eq 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Belt and braces: if a service started anyway (systemd hosts ignore policy-rc.d in some setups),
# stop Orthanc's, which would otherwise bind 4242/8042 on all interfaces.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now orthanc >/dev/null 2>&1 || true
elif command -v service >/dev/null; then
    "${SUDO[@]}" service orthanc stop >/dev/null 2>&1 || true
fi
echo "install-system: done"
