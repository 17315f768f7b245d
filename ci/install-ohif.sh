#!/usr/bin/env bash
# The prebuilt OHIF v3 viewer (npm package @ohif/app, its dist/ folder) in .tools/ohif/<version>/dist, for the
# viewer check of the inference service's DICOM SEG (tests/inference/test_viewer_ohif.py serves it as static
# files next to a proxy to the test Orthanc's DICOMweb). `make install` calls this; .tools/ is gitignored.
#
# Idempotent: nothing to do (and no output) when the marker of this exact version and tarball is there.
# The tarball comes from the npm registry through `npm pack` (the configured registry, nothing else) and must
# match the pinned integrity below before anything is unpacked. Source maps (*.map, ~40 MB) are left out.
# npm is on the machine image; a machine without it gets Debian's npm through ci/install-system.sh.
set -euo pipefail

OHIF_VERSION="3.13.2"
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${VOXELFLOW_OHIF_DIR:-${ROOT}/.tools/ohif}/${OHIF_VERSION}"
MARKER="${DEST}/.installed"

if [[ -f "${MARKER}" && "$(cat "${MARKER}")" == "${OHIF_INTEGRITY}" && -f "${DEST}/dist/index.html" ]]; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  "${ROOT}/ci/install-system.sh" npm
fi

mkdir -p "$(dirname "${DEST}")"
WORK="$(mktemp -d "$(dirname "${DEST}")/ohif-dl.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT

echo "voxelflow: fetching @ohif/app@${OHIF_VERSION} with npm pack"
(cd "${WORK}" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null)
TARBALL="${WORK}/ohif-app-${OHIF_VERSION}.tgz"
actual="$(python3 -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "${TARBALL}")"
if [[ "${actual}" != "${OHIF_INTEGRITY}" ]]; then
  echo "voxelflow: @ohif/app@${OHIF_VERSION} tarball integrity ${actual} is not the pinned ${OHIF_INTEGRITY}" >&2
  exit 1
fi

mkdir -p "${WORK}/unpacked"
tar -xzf "${TARBALL}" -C "${WORK}/unpacked" --exclude='*.map' package/dist
rm -rf "${DEST}"
mv "${WORK}/unpacked/package" "${DEST}"
printf '%s\n' "${OHIF_INTEGRITY}" >"${MARKER}"
echo "voxelflow: OHIF ${OHIF_VERSION} viewer installed in ${DEST}/dist"
