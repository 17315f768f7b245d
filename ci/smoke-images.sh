#!/usr/bin/env bash
# Run the images `make images` built the way the chart runs their pods, against a private local stack
# (PostgreSQL, Redis, S3, MLflow on ports from VOXELFLOW_SMOKE_BASE_PORT, default 27400)
# (`make images-smoke`; not part of `make test`):
#   non-root (UID 10001), read-only root filesystem with a tmpfs /tmp, all capabilities dropped,
#   no-new-privileges, --network host on 127.0.0.1, configured only through VOXELFLOW_* variables.
#
#   ci/smoke-images.sh                 the ingest API and the preprocessing worker
#   ci/smoke-images.sh ingest:api preprocessing:worker aggregation:worker ...   service:process pairs
#
# The inference API stays unready (503) until a champion model is registered and loaded: its /readyz is
# reported, not required.
# Checks for each container: it stays up, /healthz, /readyz (against the stack) and /metrics (APIs) or /metrics
# (workers) answer, it runs as 10001, its root
# filesystem refuses writes, and VOXELFLOW_GIT_SHA is the commit the image was built from.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.voxelflow/images"
export CONTAINERS_CONF="$STATE/containers.conf"
[ -f "$CONTAINERS_CONF" ] || { echo "voxelflow: no images built yet; run make images" >&2; exit 1; }
PY="${VOXELFLOW_PYTHON:-$ROOT/.venv/bin/python}"
BASE_PORT="${VOXELFLOW_SMOKE_BASE_PORT:-27400}"
TAG="${VOXELFLOW_IMAGE_TAG:-dev}"
PAIRS=("$@")
if [ "${#PAIRS[@]}" -eq 0 ]; then
    PAIRS=(ingest:api preprocessing:worker)
fi
stack=("$PY" -m shared.stack --state-dir "$STATE/stack" --base-port "$BASE_PORT")

names=()
cleanup() {
    for n in "${names[@]}"; do
        podman logs "$n" >"$STATE/$n.log" 2>&1 || true
        podman rm -f "$n" >/dev/null 2>&1 || true
    done
    "${stack[@]}" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

"${stack[@]}" up --only postgres,redis,s3,mlflow >/dev/null
"${stack[@]}" env | grep -v '^#' >"$STATE/smoke.env"

port=$((BASE_PORT + 50))
failed=0
for pair in "${PAIRS[@]}"; do
    service="${pair%%:*}"
    process="${pair#*:}"
    image="localhost/voxelflow/$service:$TAG"
    name="vf-smoke-${service//_/-}-$process"
    port=$((port + 1))
    names+=("$name")
    podman rm -f "$name" >/dev/null 2>&1 || true
    extra=()
    queue="$service"
    [ "$service" = training_worker ] && queue=training.smoke  # one Deployment per site, queue training.<site>
    [ "$process" = api ] && extra=(--host 127.0.0.1)  # uvicorn: the last --host wins over the entrypoint's
    podman run -d --name "$name" --network host --read-only --tmpfs /tmp:rw,size=256m \
        --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
        --env-file "$STATE/smoke.env" \
        -e VOXELFLOW_HTTP_PORT="$port" -e VOXELFLOW_METRICS_PORT="$port" -e VOXELFLOW_CELERY_POOL=solo \
        -e VOXELFLOW_LOG_JSON=false -e OMP_NUM_THREADS=1 -e VOXELFLOW_SITE=smoke -e VOXELFLOW_CELERY_QUEUE="$queue" \
        "$image" "$process" "${extra[@]}" >/dev/null
    path=/metrics
    [ "$process" = api ] && path=/healthz
    ok=0
    for _ in $(seq 1 240); do
        if curl -fsS "http://127.0.0.1:$port$path" >/dev/null 2>&1; then ok=1; break; fi
        if [ "$(podman inspect -f '{{.State.Running}}' "$name")" != true ]; then break; fi
        sleep 1
    done
    ready=-
    if [ "$process" = api ] && [ "$ok" = 1 ]; then
        ready="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz" || true)"
        metrics="$(curl -fsS "http://127.0.0.1:$port/metrics" || true)"  # not piped: grep -q + pipefail
        grep -q '^voxelflow_' <<<"$metrics" || ok=0
    fi
    uid="$(podman exec "$name" id -u 2>/dev/null || echo '?')"
    if podman exec "$name" sh -c 'touch /app/written 2>/dev/null'; then ro=writable; else ro=read-only; fi
    sha="$(podman exec "$name" sh -c 'echo "$VOXELFLOW_GIT_SHA"' 2>/dev/null || echo '?')"
    expected="$(podman image inspect -f '{{index .Labels "org.opencontainers.image.revision"}}' "$image")"
    echo "$image $process: http $path $([ $ok = 1 ] && echo ok || echo FAILED), /readyz $ready, uid $uid, root fs $ro, VOXELFLOW_GIT_SHA $sha"
    if [ "$ok" != 1 ] || [ "$uid" != 10001 ] || [ "$ro" != read-only ] || [ "$sha" != "$expected" ] || [ "$sha" = unknown ] \
        || { [ "$ready" != - ] && [ "$ready" != 200 ] && [ "$service" != inference ]; }; then
        failed=1
        podman logs --tail 40 "$name" >&2 || true
    fi
done
exit "$failed"
