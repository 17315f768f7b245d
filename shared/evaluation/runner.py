"""Evaluate a registered model on labelled NIfTI cases, in each case's original geometry, as it is served.

Why the served pipeline: a Dice worth reporting is the Dice of what the inference service returns. Each
case goes through ``shared.inference`` — the very code the service runs per request: the NIfTI read as an
upload is read, the model's own stored inference transforms (resample, reorient, normalise, pad), the
sliding-window predictor (window, overlap, Gaussian blending) over a backend, argmax, inversion onto the
image grid as the hospital gave it, and optionally the largest-component filter. Only the backend may
differ: the registered PyTorch network in this process (:class:`~shared.inference.TorchModuleBackend`),
or the version's ONNX export (:class:`~shared.inference.OnnxRuntimeBackend`), which is what is served.
The metrics then compare the mask with the untouched ground truth there, in millimetres.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.evaluation.metrics import case_metrics
from shared.inference import InferenceBackend, SlidingWindowPredictor, TorchModuleBackend, read_nifti, segment_array

log = logging.getLogger("voxelflow.evaluation")
DEFAULT_ROI_SIZE = (48, 64, 48)


def roi_size_of(training_config_yaml: str) -> tuple[int, int, int]:
    """The sliding-window size the model was validated with (``validation.roi_size``), else a default."""
    import yaml

    data = yaml.safe_load(training_config_yaml) or {}
    roi = (data.get("validation") or {}).get("roi_size") if isinstance(data, dict) else None
    return tuple(int(r) for r in roi) if roi else DEFAULT_ROI_SIZE  # type: ignore[return-value]


def inference_options(training_config_yaml: str) -> dict[str, Any]:
    """The ``inference`` mapping (``mirror_axes``, ``largest_component_labels``) of a stored training config:
    how the model was scored, so how it is served; {} for versions trained before the section existed."""
    import yaml

    try:
        data = yaml.safe_load(training_config_yaml) or {}
    except yaml.YAMLError:
        return {}
    section = data.get("inference") if isinstance(data, dict) else None
    return dict(section) if isinstance(section, dict) else {}


def as_backend(model: torch.nn.Module | InferenceBackend) -> InferenceBackend:
    """A backend for ``model``: a PyTorch network runs in this process, a backend is used as given."""
    return TorchModuleBackend(model) if isinstance(model, torch.nn.Module) else model


def evaluate_cases(
    model: torch.nn.Module | InferenceBackend,
    spec: Any,
    labels: dict[int, str],
    pairs: Sequence[tuple[Path, Path]],
    roi_size: Sequence[int],
    sw_batch_size: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
    *,
    overlap: float = 0.25,
    largest_component: bool | Sequence[int] = False,
    mirror_axes: Sequence[int] = (),
    perturbation: tuple[str, Callable[[torch.Tensor, int, int], torch.Tensor], int] | None = None,
) -> list[dict[str, Any]]:
    """Records of :func:`case_metrics` with ``case_id`` for every (image, label) pair.

    ``model``: the registered PyTorch network, or a loaded backend (e.g. ONNX Runtime on the export).
    ``overlap`` and ``largest_component`` are the inference service's settings of the same names
    (``VOXELFLOW_INFERENCE_OVERLAP``, ``…_KEEP_LARGEST_COMPONENT``; defaults equal); ``mirror_axes`` and a
    list of labels for ``largest_component`` come from the model's stored ``inference`` section.
    ``perturbation``: (name, perturbation, level) of :mod:`shared.evaluation.robustness`, applied to the
    network input of every case (seeded per case) before the same predictor runs.
    """
    from shared.preprocessing import PreprocessingSpec, build_transforms

    if not isinstance(spec, PreprocessingSpec):
        spec = PreprocessingSpec.from_dict(dict(spec))
    transforms = build_transforms(spec, "inference", load=False)  # what ServedModel.transforms is
    predictor = SlidingWindowPredictor(
        as_backend(model), roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mirror_axes=mirror_axes
    )
    records: list[dict[str, Any]] = []
    for done, (image_path, label_path) in enumerate(pairs, start=1):
        case_id = Path(image_path).name.removesuffix(".gz").removesuffix(".nii")
        array, affine = read_nifti(image_path)
        predict: Callable[[torch.Tensor], torch.Tensor] = predictor
        if perturbation is not None:
            predict = _perturbed(predictor, perturbation, case_id)
        mask = segment_array(
            predict, transforms, labels, array, affine, name=case_id, largest_component=largest_component
        ).mask
        truth, truth_affine = read_nifti(label_path)
        if mask.shape != truth.shape:
            raise ValueError(
                f"{case_id}: prediction restored to {mask.shape} but the label is {truth.shape}: "
                "image and label grids differ"
            )
        spacing = [float(s) for s in np.linalg.norm(truth_affine[:3, :3], axis=0)]
        for record in case_metrics(mask, truth, labels, spacing):
            records.append({"case_id": case_id, **record})
        if progress:
            progress(done, len(pairs), case_id)
    return records


def _perturbed(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    perturbation: tuple[str, Callable[[torch.Tensor, int, int], torch.Tensor], int],
    case_id: str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predictor`` on the perturbed network input ``(1, C, X, Y, Z)``, seeded by (case, name, level)."""
    from shared.evaluation.robustness import case_seed

    name, perturb, level = perturbation
    seed = case_seed(case_id, name, level)
    return lambda batch: predictor(perturb(batch[0], level, seed)[None])
