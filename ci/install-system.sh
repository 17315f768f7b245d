#!/usr/bin/env bash
# The Debian packages voxelflow needs, in one place: `make demo`, `make test` and `.ci/run` call this first.
#
#   ci/install-system.sh              check, and install whatever of PACKAGES is missing
#   ci/install-system.sh PKG...       the same for the packages named instead (used by the tests)
#
# Everything present: one dpkg-query call and no output, so a rerun costs a few milliseconds.
# Something missing: as root it runs apt-get; otherwise through `sudo -n` (never a password prompt:
# `make` may run without a terminal); without either it prints one line with the exact command to run
# as root and exits 1. Installing keeps the packages' own system services from starting, because
# voxelflow starts private servers itself (shared.stack, the tests) and Orthanc's and Prometheus' default services
# would hold 4242/8042 and 9090.
set -euo pipefail

# Orthanc + DICOMweb plugin (the PACS), dcmtk (echoscu/storescu), PostgreSQL, Redis; prometheus (+ promtool)
# for the tests that run the chart's scrape jobs, dashboards and alert rules on a real Prometheus; python3-venv makes
# the virtual environment (`make install-python`); dcm2niix is the reference the series -> volume tests compare
# against (tests/ingest/test_reconstruction_dcm2niix.py); chromium (headless) opens the OHIF viewer on the
# inference service's DICOM SEG (tests/inference/test_viewer_ohif.py); orthanc-postgresql is Orthanc's PostgreSQL
# index plugin, the second PACS configuration `make bench-ingest` compares with. Add new system dependencies here
# and nowhere else.
PACKAGES=(orthanc orthanc-dicomweb orthanc-postgresql dcmtk postgresql redis-server python3-venv prometheus dcm2niix chromium)
if [ "$#" -gt 0 ]; then
    PACKAGES=("$@")
fi

# dpkg-query prints one "name status" line per known package and fails for unknown names; a package is
# present only when its line says "install ok installed".
installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)"
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! grep -qx "${pkg} install ok installed" <<<"$installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

install_cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "voxelflow: missing Debian packages ${missing[*]}; run as root: apt-get update && ${install_cmd}" >&2
    exit 1
fi

echo "voxelflow: installing Debian packages ${missing[*]}"
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
# A fresh machine (a container image) has no package lists yet: update first, once.
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive ${install_cmd} -q

# Belt and braces: if a service started anyway (systemd hosts ignore policy-rc.d in some setups),
# stop Orthanc's, which would otherwise bind 4242/8042 on all interfaces, and Prometheus' (9090). Without
# systemd only the system service's own process (its pidfile): `service X stop` would also kill every other
# Orthanc or Prometheus on the machine (their init scripts stop by executable), such as a voxelflow stack's.
for service in orthanc:/run/orthanc.pid prometheus:/run/prometheus/prometheus.pid; do
    name=${service%%:*} pidfile=${service#*:}
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        "${SUDO[@]}" systemctl disable --now "$name" >/dev/null 2>&1 || true
    elif [ -s "$pidfile" ]; then
        "${SUDO[@]}" kill "$(cat "$pidfile")" >/dev/null 2>&1 || true
        "${SUDO[@]}" rm -f "$pidfile"
    fi
done
echo "voxelflow: Debian packages installed"
