"""Parity cases for the export gate: from an MSD folder or a dataset version, always the model's own spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.inference.parity_cases import ParityCasesError, cases_from_msd, load_parity_cases
from shared.datasets import CaseRecord, DatasetManifest, preprocess_case, save_manifest, store_case_file
from shared.preprocessing import load_spec
from shared.storage import ObjectStore, open_object_store
from tests.service_harness import require_shared_data

SPEC = load_spec("mr_hippocampus")


@pytest.fixture(scope="module")
def msd() -> Path:
    return require_shared_data() / "msd_task04_hippocampus"


@pytest.fixture(scope="module")
def store(s3_url: str) -> ObjectStore:
    return open_object_store(s3_url)


def build_version(store: ObjectStore, msd: Path, names: list[str]) -> str:
    """A dataset version of real cases whose cache is built by preprocessing's own writer."""
    records = []
    for name in names:
        image_key, image_sha = store_case_file(store, msd / "imagesTr" / f"{name}.nii.gz")
        label_key, label_sha = store_case_file(store, msd / "labelsTr" / f"{name}.nii.gz")
        records.append(
            CaseRecord(
                case_id=name,
                patient=name,
                site="site-a",
                modality="MR",
                image_key=image_key,
                label_key=label_key,
                image_sha256=image_sha,
                label_sha256=label_sha,
                source=f"msd:imagesTr/{name}.nii.gz",
            )
        )
    splits = {"holdout": {"train": [names[1]], "val": [], "test": [names[0]]}}
    manifest = save_manifest(store, DatasetManifest.create("parity-test", records, splits, SPEC))
    for record in records:
        preprocess_case(store, record, SPEC)
    return manifest.version_id


def test_dataset_version_cases_are_the_model_preprocessing_of_the_same_images(store: ObjectStore, msd: Path) -> None:
    version_id = build_version(store, msd, ["hippocampus_004", "hippocampus_006"])
    from_version = load_parity_cases(version_id, SPEC, store, limit=2)
    # held-out test case first; the cached "preprocess" stage equals the "inference" stage on the image
    (from_folder,) = cases_from_msd(msd, SPEC, limit=1)  # hippocampus_004 is the first in dataset.json
    assert len(from_version) == 2 and from_version[0].shape == from_folder.shape
    np.testing.assert_allclose(from_version[0], from_folder, atol=1e-5)
    assert not np.array_equal(from_version[0], from_version[1])  # two different cases

    with pytest.raises(ParityCasesError, match="preprocessed with"):
        load_parity_cases(version_id, load_spec("mr_brain"), store)  # another preprocessing: refused


def test_unreadable_sources_are_refused_clearly(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ParityCasesError, match="not found"):
        load_parity_cases("ds-0123456789abcdef", SPEC, store)
    with pytest.raises(ParityCasesError, match="not a readable MSD folder"):
        load_parity_cases(str(tmp_path), SPEC, store)
    with pytest.raises(ParityCasesError, match="at least one"):
        load_parity_cases(str(tmp_path), SPEC, store, limit=0)
