"""Whole-volume prediction by sliding windows, the same for every backend.

The windows, their order and the blending are MONAI's ``sliding_window_inference`` (non-buffered,
``padding_mode="constant"``): the windows of ``monai.data.utils.dense_patch_slices`` at MONAI's scan
interval, each batch of ``sw_batch_size`` windows sent to the backend, every window's logits multiplied by
the importance map (``compute_importance_map``: Gaussian by default) and added into the output, which is
then divided by the summed weights; a volume smaller than the window is zero-padded first and cropped
back. The parity tests compare it with MONAI's function itself.

Why it is not a call to ``sliding_window_inference`` any more: everything around the backend call is
small-tensor work (cutting windows, weighting, accumulating, two whole-volume zero fills), and PyTorch runs
each of those element-wise ops on its intra-op thread pool, whose workers spin and contend with the
backend's own pool on a machine whose cores are shared (the predictor's stitching then took two thirds as long as
the network on the hippocampus crops: cProfile in docs/inference-backends.md). Here it is numpy on the
calling thread, in place on the float32 arrays the backend returns (no tensor round trip per batch, no
float64), and the only torch object is the result, a zero-copy view of the output array.

What the predictor saves per volume besides: the window importance map is computed once per predictor
rather than once per volume, and a larger ``sw_batch_size`` means fewer backend calls (round trips, for
Triton) per volume.

Test-time mirroring (``mirror_axes``, nnU-Net's default): the volume is also predicted flipped along every
combination of those axes, each prediction flipped back, and the softmax probabilities averaged. The
model's stored ``inference.mirror_axes`` sets it, so evaluation and serving mirror alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from shared.inference.backends import BackendError, InferenceBackend


class SlidingWindowPredictor:
    """``predictor(volume)`` → logits of the same spatial size, computed window batch by window batch."""

    def __init__(
        self,
        backend: InferenceBackend,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        mode: str = "gaussian",
        mirror_axes: Sequence[int] = (),
    ) -> None:
        if len(roi_size) != 3:
            raise ValueError(f"roi_size must have three sizes, got {tuple(roi_size)}")
        if sw_batch_size < 1:
            raise ValueError("sw_batch_size must be >= 1")
        if not 0 <= overlap < 1:
            raise ValueError("overlap must be in [0, 1)")
        if any(a not in (0, 1, 2) for a in mirror_axes) or len(set(mirror_axes)) != len(mirror_axes):
            raise ValueError(f"mirror_axes must be distinct spatial axes 0, 1, 2; got {tuple(mirror_axes)}")
        self.backend = backend
        self.roi_size = tuple(int(s) for s in roi_size)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        #: windows sent to the backend since construction (the service turns this into windows/s)
        self.windows_processed = 0
        self._importance_map: torch.Tensor | None = None

    def importance_map(self) -> torch.Tensor:
        """The per-window blending weights ``(1, 1, *roi_size)``, computed once (MONAI recomputes per call)."""
        if self._importance_map is None:
            weights = compute_importance_map(self.roi_size, mode=self.mode, device="cpu", dtype=torch.float32)
            self._importance_map = weights[None, None].contiguous()
        return self._importance_map

    def _predict_windows(self, windows: torch.Tensor | np.ndarray) -> np.ndarray:
        """The backend's logits for a batch of windows, as a writable C-contiguous float32 array."""
        batch = windows.detach().to("cpu", torch.float32).numpy() if isinstance(windows, torch.Tensor) else windows
        logits = self.backend.infer(batch)
        if logits.shape[0] != batch.shape[0] or tuple(logits.shape[2:]) != tuple(batch.shape[2:]):
            raise BackendError(f"backend returned logits {logits.shape} for windows {tuple(batch.shape)}")
        self.windows_processed += int(batch.shape[0])
        # Triton hands back read-only buffers; the blending multiplies in place
        return np.require(logits, np.float32, ["C", "W"])

    def scan_interval(self, image_size: Sequence[int]) -> tuple[int, ...]:
        """MONAI's window step per axis: ``roi * (1 - overlap)``, the whole axis where it equals the window."""
        steps = []
        for size, roi in zip(image_size, self.roi_size, strict=True):
            steps.append(roi if roi == size else max(int(roi * (1 - self.overlap)), 1))
        return tuple(steps)

    def batch_sizes(self, spatial_shape: Sequence[int], images: int = 1) -> set[int]:
        """How many windows each backend call carries for ``images`` volumes of ``spatial_shape``."""
        image_size = [max(int(s), r) for s, r in zip(spatial_shape, self.roi_size, strict=True)]
        total = images * len(dense_patch_slices(image_size, self.roi_size, self.scan_interval(image_size)))
        sizes = {min(self.sw_batch_size, total)}
        if total > self.sw_batch_size and total % self.sw_batch_size:
            sizes.add(total % self.sw_batch_size)
        return sizes

    def warm_up(self, spatial_shape: Sequence[int], in_channels: int = 1) -> None:
        """One call of every batch size a volume of ``spatial_shape`` is sent in, on zeros, uncounted: a backend
        that prepares per batch size (OpenVINO compiles each shape, ONNX Runtime sizes its arena) is ready
        before the first real volume."""
        for size in sorted(self.batch_sizes(spatial_shape)):
            self.backend.infer(np.zeros((size, in_channels, *self.roi_size), np.float32))

    def _sliding_window(self, inputs: np.ndarray) -> np.ndarray:
        """Blended logits ``(N, K, *spatial)`` for ``inputs (N, C, *spatial)`` float32 (see the module doc)."""
        batch_size, _, *spatial = inputs.shape
        # MONAI pads a volume smaller than the window on both sides (half before, the rest after)
        short = [max(r - s, 0) for s, r in zip(spatial, self.roi_size, strict=True)]
        pad = [(0, 0), (0, 0)] + [(d // 2, d - d // 2) for d in short]
        if any(before or after for before, after in pad):
            inputs = np.pad(inputs, pad, mode="constant", constant_values=0.0)
        image_size = tuple(int(s) for s in inputs.shape[2:])
        slices = dense_patch_slices(image_size, self.roi_size, self.scan_interval(image_size))
        weights = self.importance_map().numpy()[0]  # (1, *roi): broadcasts over the classes
        count = np.zeros(image_size, np.float32)
        for window in slices:
            count[window] += weights[0]
        # (image, all channels, window) index per window, in MONAI's order: every window of image 0 first
        windows: list[tuple[Any, ...]] = [(n, slice(None), *window) for n in range(batch_size) for window in slices]
        output: np.ndarray | None = None
        for start in range(0, len(windows), self.sw_batch_size):
            chunk = windows[start : start + self.sw_batch_size]
            logits = self._predict_windows(np.stack([inputs[index] for index in chunk]))
            if output is None:
                output = np.zeros((batch_size, logits.shape[1], *image_size), np.float32)
            logits *= weights
            for index, window_logits in zip(chunk, logits, strict=True):
                output[index] += window_logits
        assert output is not None  # a volume has at least one window
        output /= count
        if any(before or after for before, after in pad):
            crop = tuple(slice(before, size - after) for (before, after), size in zip(pad, output.shape, strict=True))
            output = np.ascontiguousarray(output[crop])
        return output

    def mirror_flips(self) -> list[tuple[int, ...]]:
        """The tensor dims flipped per pass: ``()`` (as is) and every non-empty combination of mirror axes."""
        dims = [a + 2 for a in self.mirror_axes]
        return [combo for r in range(len(dims) + 1) for combo in combinations(dims, r)]

    def __call__(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores ``(N, K, X, Y, Z)`` for a volume ``(C, X, Y, Z)`` or a batch ``(N, C, X, Y, Z)``: logits, or
        with mirroring the mean softmax over the flips (argmax gives the label either way)."""
        device = volume.device if isinstance(volume, torch.Tensor) else torch.device("cpu")
        if isinstance(volume, torch.Tensor):
            volume = volume.detach().to("cpu").numpy()
        inputs = np.asarray(volume, dtype=np.float32)
        if inputs.ndim == 4:
            inputs = inputs[None]
        if inputs.ndim != 5:
            raise ValueError(f"volume must be (C, X, Y, Z) or (N, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        if not self.backend.ready:
            raise BackendError("backend has no model loaded")
        if not self.mirror_axes:
            return torch.from_numpy(self._sliding_window(inputs)).to(device)
        flips = self.mirror_flips()
        total: torch.Tensor | None = None
        with torch.no_grad():
            for dims in flips:
                flipped = np.ascontiguousarray(np.flip(inputs, dims)) if dims else inputs
                probabilities = torch.softmax(torch.from_numpy(self._sliding_window(flipped)), dim=1)
                probabilities = probabilities.flip(dims) if dims else probabilities
                total = probabilities if total is None else total.add_(probabilities)
        assert total is not None
        return (total / len(flips)).to(device)
