"""Inference metrics (names are part of the platform contract used by dashboards, alerts and autoscaling).

``rate(voxelflow_inference_windows_total[1m])`` is windows/s; the sync queue gauge and the Celery queue
length (``voxelflow_celery_queue_length{queue="inference"}``) drive autoscaling. GPU utilisation and memory
come from NVML (pynvml) at scrape time when a GPU and pynvml are present; nothing is exported otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from shared.observability.metrics import LATENCY_BUCKETS

requests_total = Counter(
    "voxelflow_inference_requests_total",
    "Segmentation requests finished, by route (champion/candidate), model version, mode and outcome.",
    ["route", "model_version", "mode", "outcome"],
)
request_duration_seconds = Histogram(
    "voxelflow_inference_request_duration_seconds",
    "Segmentation latency end to end (fetch, preprocess, inference, postprocess, outputs).",
    ["mode"],
    buckets=LATENCY_BUCKETS,
)
inference_duration_seconds = Histogram(
    "voxelflow_inference_model_duration_seconds",
    "Model time per request (sliding-window inference over all windows), by model version.",
    ["route", "model_version"],
    buckets=LATENCY_BUCKETS,
)
windows_total = Counter(
    "voxelflow_inference_windows_total",
    "Sliding windows inferred (rate() = windows/s), by model version.",
    ["route", "model_version"],
)
routing_series_total = Counter(
    "voxelflow_routing_series_total",
    "Series routed automatically by a routing rule, by rule name and outcome: routed (a segmentation request "
    "made), succeeded (segmented and sent to the destination), failed (given up: permanent error or retries spent).",
    ["rule", "outcome"],
)
queue_depth = Gauge(
    "voxelflow_inference_queue_depth", "Synchronous requests admitted and not finished (running + waiting)."
)
rejected_total = Counter(
    "voxelflow_inference_rejected_total",
    "Requests refused by admission control: queue_full (429), not_ready / wait_timeout / gpu_memory (503).",
    ["reason"],
)
model_info = Gauge(
    "voxelflow_inference_model_info", "1 for each model version being served, by route.", ["route", "name", "version"]
)
model_swaps_total = Counter(
    "voxelflow_inference_model_swaps_total", "Versions loaded, warmed up and swapped in, by route.", ["route"]
)
model_load_failures_total = Counter(
    "voxelflow_inference_model_load_failures_total",
    "Versions that failed to load or warm up (the previous one kept serving), by alias.",
    ["alias"],
)


class NvmlCollector(Collector):
    """GPU utilisation and memory through NVML, read at scrape time."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util = GaugeMetricFamily("voxelflow_gpu_utilization_ratio", "GPU utilisation (0-1).", labels=["gpu"])
        used = GaugeMetricFamily("voxelflow_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("voxelflow_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        nvml = self._nvml
        with contextlib.suppress(Exception):
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(index)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
        yield from (util, used, total)


_nvml_registered = False


def register_nvml_collector() -> bool:
    """Export GPU metrics when pynvml is installed and a driver answers; a no-op (False) otherwise."""
    global _nvml_registered
    if _nvml_registered:
        return True
    try:
        REGISTRY.register(NvmlCollector())
    except Exception:  # ImportError without pynvml, NVMLError without a driver/GPU
        return False
    _nvml_registered = True
    return True
