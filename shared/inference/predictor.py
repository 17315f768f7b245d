"""Whole-volume prediction by sliding windows, the same for every backend.

MONAI's ``sliding_window_inference`` cuts the volume into ``roi_size`` windows, batches them
``sw_batch_size`` at a time, and blends the window logits back (Gaussian weighting by default). The
predictor callable it is given sends each batch of windows to the backend as numpy and returns the
logits as a tensor, so the ONNX Runtime and Triton paths differ only in ``backend.infer``.

What the predictor saves per volume: the window importance map (a Gaussian over the whole window, as
large as one window of logits) is computed once per predictor rather than once per volume, and the
windows MONAI cuts (already contiguous float32) reach the backend without a copy. A larger
``sw_batch_size`` means fewer backend calls (round trips, for Triton) per volume.

Test-time mirroring (``mirror_axes``, nnU-Net's default): the volume is also predicted flipped along every
combination of those axes, each prediction flipped back, and the softmax probabilities averaged. The
model's stored ``inference.mirror_axes`` sets it, so evaluation and serving mirror alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

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
            self._importance_map = weights[None, None]
        return self._importance_map

    def _predict_windows(self, windows: torch.Tensor) -> torch.Tensor:
        logits = self.backend.infer(windows.detach().to("cpu", torch.float32).numpy())
        if logits.shape[0] != windows.shape[0] or tuple(logits.shape[2:]) != tuple(windows.shape[2:]):
            raise BackendError(f"backend returned logits {logits.shape} for windows {tuple(windows.shape)}")
        self.windows_processed += int(windows.shape[0])
        # Triton hands back read-only buffers; torch wants a writable, contiguous array
        return torch.from_numpy(np.require(logits, np.float32, ["C", "W"])).to(windows.device)

    def mirror_flips(self) -> list[tuple[int, ...]]:
        """The tensor dims flipped per pass: ``()`` (as is) and every non-empty combination of mirror axes."""
        dims = [a + 2 for a in self.mirror_axes]
        return [combo for r in range(len(dims) + 1) for combo in combinations(dims, r)]

    def _sliding_window(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(
            inputs,
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            predictor=self._predict_windows,
            overlap=self.overlap,
            mode=self.mode,
            roi_weight_map=self.importance_map(),
        )
        assert isinstance(logits, torch.Tensor)  # a tensor-returning predictor gives a tensor back
        return logits

    def __call__(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores ``(N, K, X, Y, Z)`` for a volume ``(C, X, Y, Z)`` or a batch ``(N, C, X, Y, Z)``: logits, or
        with mirroring the mean softmax over the flips (argmax gives the label either way)."""
        inputs = torch.as_tensor(volume, dtype=torch.float32)
        if inputs.ndim == 4:
            inputs = inputs.unsqueeze(0)
        if inputs.ndim != 5:
            raise ValueError(f"volume must be (C, X, Y, Z) or (N, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        if not self.backend.ready:
            raise BackendError("backend has no model loaded")
        with torch.no_grad():
            if not self.mirror_axes:
                return self._sliding_window(inputs)
            flips = self.mirror_flips()
            total: torch.Tensor | None = None
            for dims in flips:
                flipped = inputs.flip(dims) if dims else inputs
                probabilities = torch.softmax(self._sliding_window(flipped), dim=1)
                probabilities = probabilities.flip(dims) if dims else probabilities
                total = probabilities if total is None else total.add_(probabilities)
            assert total is not None
            return total / len(flips)
