"""INT8 ONNX models by static QDQ quantisation, calibrated on real (preprocessed) cases.

Why static QDQ: activations get fixed scales from calibration windows (no per-call range search), and the
QDQ form keeps one graph that ONNX Runtime on CPU (QLinearConv kernels) and TensorRT both read. A
quantised model is a candidate only: the export path serves it after it passes the Dice gate against its
fp32 parent (``services.inference.export``), never on the strength of having been produced.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from shared.inference.backends import INPUT_NAME


def calibration_windows(
    volumes: Iterable[np.ndarray], roi_size: tuple[int, int, int], per_volume: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Up to ``per_volume`` windows ``(1, C, *roi_size)`` cut from each preprocessed ``(C, X, Y, Z)`` volume.

    The centre window first (where the anatomy is), then random ones; volumes smaller than the window are
    zero-padded, as the sliding-window predictor pads them.
    """
    rng = np.random.default_rng(seed)
    windows = []
    for volume in volumes:
        array = np.asarray(volume, dtype=np.float32)
        pad = [(0, 0)] + [(0, max(0, r - s)) for r, s in zip(roi_size, array.shape[1:], strict=True)]
        array = np.pad(array, pad)
        spare = [s - r for s, r in zip(array.shape[1:], roi_size, strict=True)]
        for index in range(per_volume):
            start = [m // 2 for m in spare] if index == 0 else [int(rng.integers(0, m + 1)) for m in spare]
            box = tuple(slice(b, b + r) for b, r in zip(start, roi_size, strict=True))
            windows.append(np.ascontiguousarray(array[(slice(None), *box)][None]))
    if not windows:
        raise ValueError("INT8 calibration needs at least one volume")
    return windows


def quantize_int8(onnx_path: str | Path, output_path: str | Path, windows: Iterable[np.ndarray]) -> Path:
    """Write the static-QDQ INT8 form of ``onnx_path`` (u8 activations, per-channel s8 weights, min/max).

    ``windows``: float32 batches ``(N, C, *roi)`` of preprocessed training cases (:func:`calibration_windows`).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [np.ascontiguousarray(w, dtype=np.float32) for w in windows]
    if not batches:
        raise ValueError("INT8 calibration needs at least one window")

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vf-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output_path),
            Windows(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return output_path
