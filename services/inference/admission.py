"""Backpressure: refuse early and say when to come back, rather than queue without bound and time out.

Synchronous requests take a slot of a bounded pool (``max_concurrent`` running + ``max_queue`` waiting).
Beyond it the caller gets 429 with Retry-After at once; a request that waited ``wait_seconds`` without a slot
gets 503. Before running on a GPU, :func:`check_gpu_memory` refuses work whose estimated footprint does
not fit in the free memory (minus a reserve), because a CUDA out-of-memory error mid-request would fail
that request *and* others sharing the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.inference import metrics


class OverloadedError(Exception):
    """The service cannot take this request now; ``status`` is 429 (busy) or 503 (unavailable)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class AdmissionController:
    def __init__(self, max_concurrent: int, max_queue: int, wait_seconds: float, retry_after: int):
        self.capacity = max_concurrent + max_queue
        self.wait_seconds = wait_seconds
        self.retry_after = retry_after
        self._running = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self._admitted >= self.capacity:
                metrics.rejected_total.labels("queue_full").inc()
                raise OverloadedError(
                    429, "queue_full", f"{self._admitted} requests admitted (limit {self.capacity})", self.retry_after
                )
            self._admitted += 1
            metrics.queue_depth.set(self._admitted)
        try:
            if not self._running.acquire(timeout=self.wait_seconds):
                metrics.rejected_total.labels("wait_timeout").inc()
                raise OverloadedError(
                    503, "wait_timeout", f"no inference slot within {self.wait_seconds}s", self.retry_after
                )
            try:
                yield
            finally:
                self._running.release()
        finally:
            with self._lock:
                self._admitted -= 1
                metrics.queue_depth.set(self._admitted)


def estimate_inference_bytes(
    in_channels: int, out_channels: int, roi_size: tuple[int, ...], sw_batch_size: int, activation_factor: float = 32.0
) -> int:
    """Rough device footprint of one sliding-window step: input + logits windows, times an activation factor
    (a 3-D U-Net keeps ~16-64 feature maps of the window's size alive; 32 is a middle estimate)."""
    voxels = 1
    for size in roi_size:
        voxels *= int(size)
    per_window = voxels * 4 * (in_channels + out_channels) * activation_factor
    return int(per_window * sw_batch_size)


def fits_in_memory(required_bytes: int, free_bytes: int, reserve_fraction: float) -> bool:
    """The guard's decision: does the work fit in free memory after keeping ``reserve_fraction`` aside?"""
    return required_bytes <= free_bytes * (1.0 - reserve_fraction)


def cuda_free_bytes() -> int | None:
    """Free memory of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def check_gpu_memory(
    required_bytes: int,
    reserve_fraction: float,
    retry_after: int,
    free_bytes: Callable[[], int | None] = cuda_free_bytes,
) -> None:
    """Raise 503 when a GPU is present and the work would not fit; no-op on CPU."""
    free = free_bytes()
    if free is None or fits_in_memory(required_bytes, free, reserve_fraction):
        return
    metrics.rejected_total.labels("gpu_memory").inc()
    raise OverloadedError(
        503,
        "gpu_memory",
        f"needs ~{required_bytes / 2**20:.0f} MiB of GPU memory, {free / 2**20:.0f} MiB free "
        f"(reserve {reserve_fraction:.0%})",
        retry_after,
    )
