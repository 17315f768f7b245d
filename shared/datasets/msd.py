"""Reading a Medical Segmentation Decathlon folder: ``dataset.json`` and its ``imagesTr``/``labelsTr`` pairs.

One reader for every consumer: the preprocessing service imports the cases into its catalogue
(``services.preprocessing.msd_import``), ``voxelflow evaluate`` scores a model on the labelled pairs, the
export parity gate preprocesses the first images, and the benchmark/test loader
(``shared.training.msd.load_msd_cases``) finds a case's files. Only reading is here; nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# MSD writes free-text modality names; the catalogue uses DICOM modality codes.
MODALITY_CODES = {"MRI": "MR", "MR": "MR", "CT": "CT", "PET": "PT", "US": "US"}


class MsdFormatError(ValueError):
    """The folder is not a readable MSD dataset (no dataset.json, missing keys, files outside the folder)."""


@dataclass(frozen=True)
class MsdIndex:
    root: Path
    name: str
    modality: str
    labels: dict[int, str]
    pairs: list[tuple[Path, Path | None]]


def read_msd_index(folder: Path) -> MsdIndex:
    folder = folder.resolve()
    index_path = folder / "dataset.json"
    if not index_path.is_file():
        raise MsdFormatError(f"{folder} is not an MSD dataset: no dataset.json")
    try:
        index = json.loads(index_path.read_text())
        training = index["training"]
        labels = {int(k): str(v) for k, v in index["labels"].items()}
        modalities = [str(v) for v in dict(index.get("modality", {})).values()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MsdFormatError(f"{index_path}: not MSD dataset.json ({type(exc).__name__}: {exc})") from exc
    codes = sorted({MODALITY_CODES.get(m.upper(), m.upper()) for m in modalities}) or ["OT"]
    pairs: list[tuple[Path, Path | None]] = []
    for entry in training:
        image = (folder / entry["image"]).resolve()
        label = (folder / entry["label"]).resolve() if entry.get("label") else None
        for path in (image, label):
            if path is not None and not path.is_relative_to(folder):
                raise MsdFormatError(f"{path} is outside the dataset folder {folder}")
        pairs.append((image, label))
    if not pairs:
        raise MsdFormatError(f"{index_path} lists no training cases")
    return MsdIndex(folder, str(index.get("name") or folder.name), "+".join(codes), labels, pairs)


def case_id_of(image: Path) -> str:
    return image.name.removesuffix(".gz").removesuffix(".nii")
