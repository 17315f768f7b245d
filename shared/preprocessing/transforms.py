"""voxelflow's own transforms, for what MONAI does not ship: CT windows by name and N4 bias-field correction.

Each is an array transform plus its ``…d`` dictionary wrapper, in MONAI's style, so a YAML step can name
them exactly like a MONAI transform. Everything MONAI already has (orientation, spacing, z-score,
percentile scaling, cropping, padding, augmentation) is used from MONAI directly, never re-implemented.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from monai.utils.type_conversion import convert_to_dst_type

__all__ = [
    "WINDOW_PRESETS",
    "CTWindow",
    "CTWindowd",
    "N4BiasFieldCorrection",
    "N4BiasFieldCorrectiond",
]

#: Radiological CT windows as (level, width) in HU. Values are the usual reading-room presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1200.0),
    "mediastinum": (50.0, 350.0),
    "bone": (300.0, 1500.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}


class CTWindow(Transform):
    """Clip HU to a window and map it linearly to ``[b_min, b_max]``.

    A window is named (``preset``) or given as ``level``/``width``; the work is done by MONAI's
    ScaleIntensityRange with ``clip=True``. Naming the window, rather than writing a_min/a_max in every
    YAML file, is what keeps lung and mediastinum pipelines comparable across specs.
    """

    def __init__(
        self,
        preset: str | None = None,
        level: float | None = None,
        width: float | None = None,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
    ) -> None:
        if preset is not None:
            if level is not None or width is not None:
                raise ValueError("CTWindow: give either preset or level/width, not both")
            if preset not in WINDOW_PRESETS:
                raise ValueError(f"CTWindow: unknown preset {preset!r}; known: {', '.join(sorted(WINDOW_PRESETS))}")
            level, width = WINDOW_PRESETS[preset]
        if level is None or width is None:
            raise ValueError("CTWindow: needs a preset or both level and width")
        if width <= 0:
            raise ValueError(f"CTWindow: width must be positive, got {width}")
        self.level, self.width = float(level), float(width)
        self._scale = ScaleIntensityRange(
            a_min=self.level - self.width / 2, a_max=self.level + self.width / 2, b_min=b_min, b_max=b_max, clip=clip
        )

    def __call__(self, img: Any) -> Any:
        return self._scale(img)


class CTWindowd(MapTransform):
    """Dictionary wrapper of :class:`CTWindow`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **window: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = CTWindow(**window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


class N4BiasFieldCorrection(Transform):
    """N4 bias-field correction (SimpleITK's N4BiasFieldCorrectionImageFilter) per channel.

    Input is channel-first ``(C, X, Y, Z)``. The field is estimated on a shrunk copy (``shrink_factor``)
    inside an Otsu foreground mask and applied at full resolution, which is how SimpleITK's own example
    keeps N4 affordable; voxel spacing is taken from the MetaTensor affine when there is one.
    """

    def __init__(
        self,
        shrink_factor: int = 4,
        iterations: Sequence[int] = (50, 50, 30),
        convergence_threshold: float = 1e-6,
        mask_otsu: bool = True,
    ) -> None:
        if int(shrink_factor) < 1:
            raise ValueError(f"N4BiasFieldCorrection: shrink_factor must be >= 1, got {shrink_factor}")
        if not iterations or any(int(i) < 1 for i in iterations):
            raise ValueError(f"N4BiasFieldCorrection: iterations must be positive integers, got {iterations}")
        self.shrink_factor = int(shrink_factor)
        self.iterations = [int(i) for i in iterations]
        self.convergence_threshold = float(convergence_threshold)
        self.mask_otsu = bool(mask_otsu)

    def _correct(self, volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        import SimpleITK as sitk

        # SimpleITK indexes arrays (z, y, x); transpose so that sitk's x is our first axis.
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.astype(np.float32).transpose(2, 1, 0)))
        image.SetSpacing([float(s) for s in spacing])
        shift = float(volume.min())
        if shift <= 0:  # N4 works on log intensities: it needs strictly positive input
            image = image - shift + 1.0
        if self.mask_otsu:
            mask = sitk.OtsuThreshold(image, 0, 1, 200)
            if not np.any(sitk.GetArrayViewFromImage(mask)):
                mask = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
                mask.CopyInformation(image)
        else:
            mask = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
            mask.CopyInformation(image)
        small = sitk.Shrink(image, [self.shrink_factor] * image.GetDimension())
        small_mask = sitk.Shrink(mask, [self.shrink_factor] * image.GetDimension())
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(self.iterations)
        corrector.SetConvergenceThreshold(self.convergence_threshold)
        corrector.Execute(small, small_mask)
        log_field = corrector.GetLogBiasFieldAsImage(image)
        corrected = image / sitk.Exp(log_field)
        out = sitk.GetArrayFromImage(corrected).transpose(2, 1, 0)
        if shift <= 0:
            out = out + shift - 1.0
        return out.astype(np.float32)

    def __call__(self, img: Any) -> Any:
        array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if array.ndim != 4:
            raise ValueError(f"N4BiasFieldCorrection expects a channel-first 3-D image (C, X, Y, Z), got {array.shape}")
        spacing: Sequence[float] = (1.0, 1.0, 1.0)
        if isinstance(img, MetaTensor):
            spacing = [float(s) for s in np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)]
        out = np.stack([self._correct(channel, spacing) for channel in array])
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class N4BiasFieldCorrectiond(MapTransform):
    """Dictionary wrapper of :class:`N4BiasFieldCorrection`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **options: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.n4 = N4BiasFieldCorrection(**options)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.n4(d[key])
        return d
