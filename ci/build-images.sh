#!/usr/bin/env bash
# Build every voxelflow image for real with podman (`make images`), from the project's own Dockerfiles.
#
#   ci/build-images.sh                 the base image (if missing), then every service image and mlflow
#   ci/build-images.sh ingest ...      only the images named (service directory names, or mlflow)
#
# No container registry is reachable from these machines, so the base image is made locally from Debian
# packages: `mmdebstrap --variant=minbase` bookworm with python3 (3.11, like python:3.11-slim-bookworm) and
# python3-venv, `podman import`ed as localhost/voxelflow-base:bookworm and passed to the Dockerfiles as
# BASE_IMAGE and BUILDER_IMAGE (their defaults are the fully qualified docker.io python images).
# Images are tagged localhost/voxelflow/<service>:<git sha> and :dev, carry VOXELFLOW_GIT_SHA (model
# lineage) and the OCI revision label. Sizes and build times are printed at the end.
#
# Settings the machines need (written to .voxelflow/images/containers.conf, used through CONTAINERS_CONF):
# Debian's runc (crun fails on this cgroup v1 setup) and default ulimits. pip inside a build sees the
# host's CA bundle read-only; a local wheel directory (VOXELFLOW_WHEELS, default /opt/wheels when present)
# provides the CPU torch wheel where PyTorch's index is not reachable.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.voxelflow/images"
BASE_IMAGE="${VOXELFLOW_BASE_IMAGE:-localhost/voxelflow-base:bookworm}"
SUITE="${VOXELFLOW_DEBIAN_SUITE:-bookworm}"
MIRROR="${VOXELFLOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELS="${VOXELFLOW_WHEELS:-$([ -d /opt/wheels ] && echo /opt/wheels || true)}"
SERVICES=(ingest preprocessing training_worker aggregation model_registry inference)
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=("${SERVICES[@]}" mlflow)
fi

ci/install-system.sh podman buildah mmdebstrap runc

mkdir -p "$STATE"
cat >"$STATE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$STATE/containers.conf"

SHA="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    SHA="${SHA}-dirty"
fi
TAG="${SHA:0:12}"
TIMES="$STATE/times.txt"
: >"$TIMES"

seconds() { date +%s; }

# ---- base image: Debian minbase + python3, from Debian packages only ---------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
    start=$(seconds)
    tarball="$STATE/base-$SUITE.tar"
    rm -f "$tarball"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$SUITE" "$tarball" "$MIRROR"
    podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE_IMAGE"
    rm -f "$tarball"
    echo "base $(($(seconds) - start))" >>"$TIMES"
fi

build_args=(
    --network host
    --build-arg "BASE_IMAGE=$BASE_IMAGE"
    --build-arg "BUILDER_IMAGE=$BASE_IMAGE"
    --build-arg "VOXELFLOW_GIT_SHA=$SHA"
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
    --build-arg PIP_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
)
if [ -n "$WHEELS" ]; then
    build_args+=(--volume "$WHEELS:/wheels:ro" --build-arg PIP_WHEELS=/wheels)
    # torch comes from the wheel directory (its +cpu wheel); without PyTorch's index, PyPI is the index
    build_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")
fi

for target in "${TARGETS[@]}"; do
    if [ "$target" = mlflow ]; then
        dockerfile=docker/mlflow/Dockerfile
        context=docker/mlflow
    else
        dockerfile="services/$target/Dockerfile"
        context=.
    fi
    [ -f "$dockerfile" ] || { echo "voxelflow: no image $target ($dockerfile missing)" >&2; exit 2; }
    start=$(seconds)
    echo "voxelflow: building localhost/voxelflow/$target:$TAG"
    podman build "${build_args[@]}" -f "$dockerfile" \
        -t "localhost/voxelflow/$target:$TAG" -t "localhost/voxelflow/$target:dev" "$context"
    echo "$target $(($(seconds) - start))" >>"$TIMES"
done

# Summary: size (podman's, counting every layer of the image), build seconds of this run and the revision
# label of each image; then what the store takes on disk, where the service images share the base and the
# venv layer (their Dockerfiles are identical up to and including the venv COPY).
echo
echo "voxelflow images, built from $SHA (build seconds also in $TIMES):"
printf '  %-52s %10s %8s  %s\n' image size build-s revision
if grep -q '^base ' "$TIMES"; then
    printf '  %-52s %10s %8s\n' "$BASE_IMAGE" "$(podman image inspect "$BASE_IMAGE" --format '{{.Size}}' | numfmt --to=si --format=%.2f)" \
        "$(sed -n 's/^base //p' "$TIMES")"
fi
for target in "${TARGETS[@]}"; do
    image="localhost/voxelflow/$target:$TAG"
    size="$(podman image inspect "$image" --format '{{.Size}}' | numfmt --to=si --format=%.2f)"
    revision="$(podman image inspect "$image" --format '{{index .Labels "org.opencontainers.image.revision"}}')"
    printf '  %-52s %10s %8s  %s\n' "$image" "$size" "$(sed -n "s/^$target //p" "$TIMES")" "${revision:--}"
done
echo "  image store on disk (shared layers counted once): $(du -sh "$(podman info --format '{{.Store.GraphRoot}}')" | cut -f1)"
