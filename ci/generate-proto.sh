#!/usr/bin/env bash
# Regenerate the Python modules for proto/voxelflow/v1/*.proto into shared/proto (or $1 for a check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-shared/proto}"
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" proto/voxelflow/v1/*.proto
