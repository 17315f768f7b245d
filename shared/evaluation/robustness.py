"""Robustness evaluation: graded image corruptions and L∞ adversarial attacks, scored by the served pipeline.

Every perturbation acts on the network input — the image after the model's own stored inference transforms
(resample, reorient, normalise, pad), channel-first ``(C, X, Y, Z)`` — so strengths are in units of the
normalised intensity the model sees, the same for every model, and the mask still goes back through the
inversion onto the hospital's grid before it is scored (:func:`shared.evaluation.runner.evaluate_cases`).

The catalogue (:data:`CORRUPTIONS`; levels 1..5, fixed parameters, MONAI transforms):

=============  ==================================  =========================================================
name           MONAI transform                     strength parameter per level 1..5
=============  ==================================  =========================================================
noise          RandGaussianNoise (prob 1)          std = (0.05, 0.1, 0.2, 0.3, 0.5) x the image's std
bias_field     RandBiasField (degree 3, prob 1)    coefficients drawn in ±(0.02, 0.05, 0.1, 0.15, 0.2)
kspace_spike   KSpaceSpikeNoise                    one spike at a fixed k-space location, log-intensity
                                                   (8, 9, 10, 11, 12): herringbone / ghost-like artefact
gibbs          GibbsNoise                          alpha (0.3, 0.45, 0.6, 0.75, 0.9): k-space truncation
low_res        RandSimulateLowResolution (prob 1)  zoom (0.8, 0.6, 0.5, 0.4, 0.3): down- then up-sample
contrast       AdjustContrast                      gamma (0.8, 1.25, 0.6, 1.6, 2.0) over the image range
ghosting       k-space (torch.fft; MONAI has none)  every 4th phase-encoding plane scaled by 1 - (0.2, 0.4,
                                                   0.6, 0.8, 1.0): periodic ghosts along that axis
motion         k-space (torch.fft; MONAI has none)  the last (0.1, 0.2, 0.3, 0.4, 0.5) of k-space from the
                                                   volume translated (1, 2, 3, 4, 6) voxels: one movement
fgsm           torch autograd, one step            L∞ eps (0.01, 0.02, 0.05, 0.1, 0.2)
pgd            torch autograd, 5 steps of eps/4    L∞ eps (0.01, 0.02, 0.05, 0.1, 0.2), projected
=============  ==================================  =========================================================

Determinism: the random transforms are seeded per case (:func:`case_seed`: a hash of the case id, the
corruption and the level), so a report is reproducible and a candidate and the champion see the same noise.

Adversarial attacks need gradients, so they run on the PyTorch network only (the registered model, not the
ONNX or Triton backend). The loss is MONAI's DiceCE against the model's own clean prediction (the
"predicted label" attack of Madry et al.): the ground truth lives on the hospital's grid, not in the
network's space, and the clean prediction is what an attacker moves the model away from. The whole
preprocessed volume is attacked through MONAI's sliding-window inference with gradients on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    AdjustContrast,
    GibbsNoise,
    KSpaceSpikeNoise,
    MapTransform,
    RandBiasField,
    RandGaussianNoise,
    RandSimulateLowResolution,
)

from shared.contracts import artifacts

LEVELS = (1, 2, 3, 4, 5)
NOISE_STD = (0.05, 0.1, 0.2, 0.3, 0.5)
BIAS_COEFF = (0.02, 0.05, 0.1, 0.15, 0.2)
SPIKE_LOG_INTENSITY = (8.0, 9.0, 10.0, 11.0, 12.0)
GIBBS_ALPHA = (0.3, 0.45, 0.6, 0.75, 0.9)
LOW_RES_ZOOM = (0.8, 0.6, 0.5, 0.4, 0.3)
CONTRAST_GAMMA = (0.8, 1.25, 0.6, 1.6, 2.0)
GHOST_INTENSITY = (0.2, 0.4, 0.6, 0.8, 1.0)
GHOST_PERIOD = 4
MOTION_SHIFT = (1.0, 2.0, 3.0, 4.0, 6.0)
MOTION_FRACTION = (0.1, 0.2, 0.3, 0.4, 0.5)
ADVERSARIAL_EPS = (0.01, 0.02, 0.05, 0.1, 0.2)
PGD_STEPS = 5

#: a perturbation: (network input (C, X, Y, Z), level, seed) → perturbed input of the same shape
Perturbation = Callable[[torch.Tensor, int, int], torch.Tensor]


def case_seed(case_id: str, corruption: str, level: int) -> int:
    """A seed fixed by (case, corruption, level): the same noise for every model evaluated."""
    digest = hashlib.sha256(f"{case_id}/{corruption}/{level}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _level(values: Sequence[float], level: int) -> float:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    return values[level - 1]


def _as_tensor(out: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out).to(like.dtype)


def gaussian_noise(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    std = float(image.std()) * _level(NOISE_STD, level)
    transform = RandGaussianNoise(prob=1.0, mean=0.0, std=std, sample_std=False)
    transform.set_random_state(seed)
    return _as_tensor(transform(image), image)


def bias_field(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    coeff = _level(BIAS_COEFF, level)
    transform = RandBiasField(degree=3, coeff_range=(-coeff, coeff), prob=1.0)
    transform.set_random_state(seed)
    # the field multiplies intensities: shift to positive, apply, shift back (normalised images are ~N(0,1))
    low = image.min()
    return _as_tensor(transform(image - low), image) + low


def kspace_spike(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    shape = image.shape[1:]
    rng = np.random.default_rng(seed)
    # a spike off the k-space centre (a quarter of the way out on each axis, jittered per case)
    loc = tuple(int(s // 2 + max(1, s // 4) * rng.choice((-1, 1))) for s in shape)
    transform = KSpaceSpikeNoise(loc=loc, k_intensity=_level(SPIKE_LOG_INTENSITY, level))
    return _as_tensor(transform(image), image)


def gibbs(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    return _as_tensor(GibbsNoise(alpha=_level(GIBBS_ALPHA, level))(image), image)


def low_resolution(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    zoom = _level(LOW_RES_ZOOM, level)
    transform = RandSimulateLowResolution(prob=1.0, zoom_range=(zoom, zoom))
    transform.set_random_state(seed)
    return _as_tensor(transform(image), image)


def contrast(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    return _as_tensor(AdjustContrast(gamma=_level(CONTRAST_GAMMA, level))(image), image)


def _kspace(image: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, image.ndim))
    return torch.fft.fftshift(torch.fft.fftn(image.to(torch.float32), dim=dims), dim=dims)


def _image_of(kspace: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, kspace.ndim))
    return torch.fft.ifftn(torch.fft.ifftshift(kspace, dim=dims), dim=dims).real.to(like.dtype)


def ghosting(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    """Periodic ghosts along a phase-encoding axis: every ``GHOST_PERIOD``-th k-space plane (the centre
    kept) scaled by ``1 - intensity``, as an inconsistency repeating each TR (pulsation, Nyquist ghost) does.

    Why k-space by hand: MONAI has spikes and Gibbs but no ghosting or motion transform (TorchIO's
    RandomGhosting is the model; not a dependency). The axis is drawn per case from the seed."""
    intensity = _level(GHOST_INTENSITY, level)
    axis = 1 + int(np.random.default_rng(seed).integers(image.ndim - 1))
    k = _kspace(image)
    size = k.shape[axis]
    weights = torch.ones(size)
    weights[::GHOST_PERIOD] = 1.0 - intensity
    weights[size // 2] = 1.0  # the centre line carries the image's contrast: kept, as scanners sample it
    shape = [1] * k.ndim
    shape[axis] = size
    return _image_of(k * weights.reshape(shape), image)


def motion(image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
    """Rigid motion during the acquisition: the last ``MOTION_FRACTION`` of the k-space planes of a
    phase-encoding axis (sequential order) come from the volume translated by ``MOTION_SHIFT`` voxels in a
    random direction, a translation being a linear phase ramp in k-space. The result shows the ghosting and
    blurring along that axis of a patient who moved once. Why both grow with the level: a larger movement
    alone saturates (the phase error is bounded), a movement earlier in the scan corrupts more of k-space."""
    shift, fraction = _level(MOTION_SHIFT, level), _level(MOTION_FRACTION, level)
    rng = np.random.default_rng(seed)
    axis = 1 + int(rng.integers(image.ndim - 1))
    direction = rng.normal(size=image.ndim - 1)
    direction = direction / np.linalg.norm(direction) * shift
    k = _kspace(image)
    spatial = k.shape[1:]
    ramp = torch.zeros(spatial, dtype=torch.float64)
    for dim, (size, d) in enumerate(zip(spatial, direction, strict=True)):
        freq = torch.fft.fftshift(torch.fft.fftfreq(size, dtype=torch.float64))
        view = [1] * len(spatial)
        view[dim] = size
        ramp = ramp + (freq * float(d)).reshape(view)
    moved = k * torch.exp(-2j * torch.pi * ramp).to(k.dtype)[None]
    size = spatial[axis - 1]
    start = size - max(1, round(size * fraction))
    index = [slice(None)] * k.ndim
    index[axis] = slice(start, None)
    k[tuple(index)] = moved[tuple(index)]
    return _image_of(k, image)


@dataclass(frozen=True)
class Attack:
    """An L∞ attack on a PyTorch network (FGSM: ``steps=1``, step = eps; PGD: ``steps`` steps of eps/4)."""

    network: torch.nn.Module
    roi_size: tuple[int, ...]
    steps: int = 1
    sw_batch_size: int = 1

    def __call__(self, image: torch.Tensor, level: int, seed: int) -> torch.Tensor:
        eps = _level(ADVERSARIAL_EPS, level)
        return adversarial(self.network, image, eps, self.roi_size, steps=self.steps, sw_batch_size=self.sw_batch_size)


def adversarial(
    network: torch.nn.Module,
    image: torch.Tensor,
    eps: float,
    roi_size: Sequence[int],
    *,
    steps: int = 1,
    step_size: float | None = None,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """``image`` (C, X, Y, Z) moved within an L∞ ball of ``eps`` to raise the DiceCE loss against the
    network's clean prediction: one signed-gradient step of ``eps`` (FGSM), or ``steps`` projected steps of
    ``step_size`` (default eps/4; PGD, started at the clean image for determinism)."""
    if eps < 0:
        raise ValueError("eps must be >= 0")
    step = eps if steps == 1 else (step_size if step_size is not None else eps / 4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    was_training = network.training
    network.eval()
    with torch.inference_mode(False), torch.enable_grad():
        clean = image.detach().clone().to(torch.float32)[None]

        def predict(x: torch.Tensor) -> torch.Tensor:
            out = sliding_window_inference(x, roi_size, sw_batch_size, network, overlap=0.25, mode="gaussian")
            assert isinstance(out, torch.Tensor)
            return out

        with torch.no_grad():
            target = predict(clean).argmax(dim=1, keepdim=True)
        adv = clean.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = loss_fn(predict(adv), target)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = torch.clamp(adv, clean - eps, clean + eps).detach()
    network.train(was_training)
    return adv[0].to(image.dtype)


#: name → (perturbation, what level 1..5 sets) for the image corruptions; attacks are added per network
CORRUPTIONS: dict[str, tuple[Perturbation, str]] = {
    "noise": (gaussian_noise, f"std x image std {NOISE_STD}"),
    "bias_field": (bias_field, f"coefficient range ±{BIAS_COEFF}"),
    "kspace_spike": (kspace_spike, f"log k-space spike {SPIKE_LOG_INTENSITY}"),
    "gibbs": (gibbs, f"alpha {GIBBS_ALPHA}"),
    "low_res": (low_resolution, f"zoom {LOW_RES_ZOOM}"),
    "contrast": (contrast, f"gamma {CONTRAST_GAMMA}"),
    "ghosting": (ghosting, f"every {GHOST_PERIOD}th k-space plane scaled by 1 - {GHOST_INTENSITY}"),
    "motion": (motion, f"translation in voxels {MOTION_SHIFT} for the last fraction {MOTION_FRACTION} of k-space"),
}
ADVERSARIAL = ("fgsm", "pgd")


def catalogue(network: torch.nn.Module | None, roi_size: Sequence[int]) -> dict[str, Perturbation]:
    """Every perturbation by name; the attacks only when a PyTorch ``network`` is given."""
    found: dict[str, Perturbation] = {name: fn for name, (fn, _) in CORRUPTIONS.items()}
    if network is not None:
        roi = tuple(int(r) for r in roi_size)
        found["fgsm"] = Attack(network, roi, steps=1)
        found["pgd"] = Attack(network, roi, steps=PGD_STEPS)
    return found


class Corruptd(MapTransform):
    """Dict wrapper of one perturbation at one level, for a Compose: ``data[key]`` perturbed with the seed
    of ``data[case_key]`` (or ``seed`` when the data carries no case id)."""

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        perturbation: Perturbation,
        level: int,
        name: str,
        case_key: str = "case_id",
        seed: int = 0,
    ) -> None:
        super().__init__(keys)
        self.perturbation, self.level, self.name, self.case_key, self.seed = perturbation, level, name, case_key, seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key)
        seed = case_seed(str(case), self.name, self.level) if case is not None else self.seed
        for key in self.key_iterator(d):
            d[key] = self.perturbation(torch.as_tensor(d[key]), self.level, seed)
        return d


def robustness_summary(clean: Mapping[str, float], perturbed: Mapping[tuple[str, int], float]) -> dict[str, Any]:
    """Rows (corruption, level, dice, drop = clean - dice) and ``mean_drop`` over every row.

    ``clean``: {"dice": mean foreground Dice clean}; ``perturbed``: {(corruption, level): mean Dice}."""
    base = float(clean["dice"])
    rows = [
        {"corruption": name, "level": level, "dice": float(dice), "drop": base - float(dice)}
        for (name, level), dice in sorted(perturbed.items())
    ]
    mean_drop = float(np.mean([r["drop"] for r in rows])) if rows else 0.0
    return {"clean_dice": base, "rows": rows, "mean_drop": mean_drop}


def write_robustness(folder: Any, summary: Mapping[str, Any]) -> list[Any]:
    """``robustness.json`` and ``robustness.png`` (Dice against level, one line per corruption, the clean
    Dice dashed) in ``folder``; the paths written."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / artifacts.ROBUSTNESS_FILE
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    figure, axes = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["corruption"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["corruption"] == name]
        axes.plot([r["level"] for r in rows], [r["dice"] for r in rows], marker="o", label=name)
    axes.axhline(summary["clean_dice"], color="black", linestyle="--", label="clean")
    axes.set_xlabel("strength level")
    axes.set_ylabel("mean Dice")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7)
    png_path = out / artifacts.ROBUSTNESS_PLOT_FILE
    figure.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return [json_path, png_path]
