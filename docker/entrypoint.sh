#!/bin/sh
# voxelflow container entrypoint: the first argument picks the process, the rest is passed through.
#   api     uvicorn services.$VOXELFLOW_SERVICE.main:app on :8000 (/healthz /readyz /metrics /docs)
#   worker  celery -A services.$VOXELFLOW_SERVICE.worker worker -Q $VOXELFLOW_CELERY_QUEUE -P $VOXELFLOW_CELERY_POOL
#           (default pool solo: tasks run in the process whose /metrics server Prometheus scrapes; the
#           training worker must run solo, -c 1)
#   beat    celery -A services.$VOXELFLOW_SERVICE.worker beat (schedule file on /tmp: root fs is read-only)
#   dimse   python -m services.ingest.dimse (DICOM C-STORE SCP, ingest only)
#   anything else is exec'd as is (e.g. `alembic upgrade head`, `python -c ...`).
set -eu

: "${VOXELFLOW_SERVICE:?VOXELFLOW_SERVICE must name the service package (ingest, inference, ...)}"
cmd="${1:-api}"
[ "$#" -gt 0 ] && shift

case "$cmd" in
  api)
    exec uvicorn "services.${VOXELFLOW_SERVICE}.main:app" \
      --host 0.0.0.0 --port "${VOXELFLOW_HTTP_PORT:-8000}" \
      --proxy-headers --forwarded-allow-ips "${VOXELFLOW_FORWARDED_ALLOW_IPS:-*}" \
      --no-server-header --timeout-keep-alive 5 \
      --h11-max-incomplete-event-size 65536 "$@"
    ;;
  worker)
    queue="${VOXELFLOW_CELERY_QUEUE:-$VOXELFLOW_SERVICE}"
    exec celery -A "services.${VOXELFLOW_SERVICE}.worker" worker \
      -Q "$queue" --pool "${VOXELFLOW_CELERY_POOL:-solo}" --concurrency "${VOXELFLOW_CELERY_CONCURRENCY:-1}" \
      --hostname "${VOXELFLOW_SERVICE}@${HOSTNAME:-%h}" --without-heartbeat --without-mingle \
      --loglevel "${VOXELFLOW_LOG_LEVEL:-INFO}" "$@"
    ;;
  beat)
    exec celery -A "services.${VOXELFLOW_SERVICE}.worker" beat \
      --schedule /tmp/celerybeat-schedule --loglevel "${VOXELFLOW_LOG_LEVEL:-INFO}" "$@"
    ;;
  dimse)
    if [ "$VOXELFLOW_SERVICE" != "ingest" ]; then
      echo "dimse is an ingest process (VOXELFLOW_SERVICE=$VOXELFLOW_SERVICE)" >&2
      exit 64
    fi
    exec python -m services.ingest.dimse "$@"
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac
