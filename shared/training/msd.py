"""Raw MSD cases (imagesTr/labelsTr NIfTI) as cached-case dicts, for the benchmark and the tests.

Platform training reads preprocessed dataset versions (shared.training.data); this loader exists so the
benchmark and the unit tests can run on the bundled hippocampus set without a preprocessing run. The steps
mirror the hippocampus preprocessing spec; the files are those ``dataset.json`` names (``shared.datasets.msd``,
the one MSD reader): load, channel first, RAS, z-score over non-zero voxels, pad to 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _plain(value: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor would not survive ``torch.load(weights_only=True)``)."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def load_msd_cases(root: Path, case_ids: list[str]) -> list[dict[str, Any]]:
    from monai.transforms import (
        Compose,
        DivisiblePadd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
    )

    pipeline = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS"),
            NormalizeIntensityd("image", nonzero=True),
            DivisiblePadd(["image", "label"], k=16),
        ]
    )
    from shared.datasets.msd import case_id_of, read_msd_index

    pairs = {case_id_of(image): (image, label) for image, label in read_msd_index(Path(root)).pairs}
    cases = []
    for case_id in case_ids:
        if case_id not in pairs or pairs[case_id][1] is None:
            raise KeyError(f"{root}/dataset.json lists no labelled case {case_id!r}")
        image, label = pairs[case_id]
        item = pipeline({"image": str(image), "label": str(label)})
        cases.append(
            {
                "image": _plain(item["image"]).float().contiguous(),
                "label": _plain(item["label"]).to(torch.uint8).contiguous(),
                "case_id": case_id,
            }
        )
    return cases
