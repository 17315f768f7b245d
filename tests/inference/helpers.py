"""Small real inputs for the export/backend/Triton tests: a tiny MONAI UNet and hippocampus volumes.

Parity does not need a trained network, so the UNet is randomly initialised with a fixed seed (a
different seed gives a genuinely different model, which the version-swap tests rely on).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.networks.nets import UNet

#: the window the exported model takes; hippocampus volumes (31..43 x 40..59 x 24..47) need several
ROI = (32, 32, 32)
CASES = ("hippocampus_004", "hippocampus_006")


def tiny_unet(seed: int = 0, out_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet(3, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def hippocampus_cases(data_dir: Path, names: tuple[str, ...] = CASES) -> list[np.ndarray]:
    """Whole MSD hippocampus images as (1, X, Y, Z) float32, z-scored per volume (their ranges differ wildly)."""
    cases = []
    for name in names:
        image = np.asarray(nib.load(data_dir / "msd_task04_hippocampus" / "imagesTr" / f"{name}.nii.gz").dataobj)
        image = image.astype(np.float32)
        cases.append(((image - image.mean()) / (image.std() + 1e-6))[None])
    return cases
