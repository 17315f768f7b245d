"""The platform's Prometheus metrics. Names here are a contract: dashboards and alert rules in the Helm
chart use exactly these, and a test checks them against a live ``/metrics`` scrape."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

http_requests_total = Counter(
    "voxelflow_http_requests_total", "HTTP requests handled.", ["service", "method", "route", "status"]
)
http_request_duration_seconds = Histogram(
    "voxelflow_http_request_duration_seconds",
    "HTTP request latency, from first byte received to last byte sent.",
    ["service", "method", "route"],
    buckets=LATENCY_BUCKETS,
)
http_requests_in_progress = Gauge("voxelflow_http_requests_in_progress", "HTTP requests being handled.", ["service"])
celery_tasks_total = Counter(
    "voxelflow_celery_tasks_total", "Celery tasks finished, by final state.", ["service", "task", "state"]
)
celery_task_duration_seconds = Histogram(
    "voxelflow_celery_task_duration_seconds",
    "Celery task run time.",
    ["service", "task"],
    buckets=LATENCY_BUCKETS,
)
celery_queue_length = Gauge("voxelflow_celery_queue_length", "Messages waiting in a Celery queue.", ["queue"])
dead_letters = Gauge("voxelflow_dead_letters", "Failed tasks kept for inspection and retry.", ["service"])
