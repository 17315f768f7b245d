"""shared.datasets manifests: content-addressed version ids, immutability, selection, validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.datasets import (
    CaseRecord,
    DatasetManifest,
    ManifestConflictError,
    ManifestError,
    compute_case_hash,
    load_manifest,
    save_manifest,
)
from shared.preprocessing import load_spec
from shared.storage import open_object_store


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def case(n: int, site: str = "site-a", label: bool = True) -> CaseRecord:
    image, lab = sha(f"image{n}"), sha(f"label{n}") if label else None
    return CaseRecord(
        case_id=f"c{n:03d}",
        patient=f"p{n // 2}",
        site=site,
        modality="MR",
        image_key=f"cases/sha256/{image}.nii.gz",
        label_key=f"cases/sha256/{lab}.nii.gz" if lab else None,
        image_sha256=image,
        label_sha256=lab,
        source=f"msd:imagesTr/c{n:03d}.nii.gz",
    )


CASES = [case(0), case(1), case(2, "site-b"), case(3, "site-b"), case(4, "site-b", label=False)]
SPLITS = {"holdout": {"train": ["c000", "c002", "c003"], "val": ["c001"], "test": ["c004"]}}


@pytest.fixture()
def spec():
    return load_spec("mr_hippocampus")


@pytest.fixture()
def store(tmp_path: Path):
    return open_object_store(tmp_path.as_uri())


def make(spec, cases=CASES, splits=SPLITS, **kwargs) -> DatasetManifest:
    return DatasetManifest.create("hippo", list(cases), splits, spec, labels={1: "anterior", 2: "posterior"}, **kwargs)


def test_case_hash_is_the_contract_formula() -> None:
    record = CASES[0]
    expected = hashlib.sha256(f"{record.image_sha256}:{record.label_sha256}".encode()).hexdigest()
    assert record.case_hash == expected == compute_case_hash(record.image_sha256, record.label_sha256)
    assert CASES[4].case_hash == hashlib.sha256(f"{CASES[4].image_sha256}:".encode()).hexdigest()
    with pytest.raises(ValidationError, match="does not match"):
        CaseRecord.model_validate({**record.model_dump(), "case_hash": "0" * 64})
    with pytest.raises(ValidationError, match="sha256"):
        CaseRecord.model_validate({**record.model_dump(), "image_sha256": "xyz", "case_hash": ""})
    with pytest.raises(ValidationError, match="both be set"):
        CaseRecord.model_validate({**record.model_dump(), "label_key": None, "case_hash": ""})


def test_version_id_is_content_addressed(spec) -> None:
    manifest = make(spec)
    assert manifest.version_id.startswith("ds-") and len(manifest.version_id) == 19
    # order of cases and of split members does not matter; name and time do not either
    shuffled = {"holdout": {"test": ["c004"], "val": ["c001"], "train": ["c003", "c000", "c002"]}}
    same = DatasetManifest.create("other name", list(reversed(CASES)), shuffled, spec)
    assert same.version_id == manifest.version_id
    # what a version is made of does
    moved = [case(0, "site-b"), *CASES[1:]]
    assert make(spec, cases=moved).version_id != manifest.version_id
    resplit = {"holdout": {"train": ["c000", "c002"], "val": ["c001", "c003"], "test": ["c004"]}}
    assert make(spec, splits=resplit).version_id != manifest.version_id
    assert make(load_spec("mr_brain")).version_id != manifest.version_id
    assert manifest.preprocessing_hash == spec.hash and manifest.preprocessing["hash"] == spec.hash


def test_select_by_split_part_and_site(spec) -> None:
    manifest = make(spec)
    assert [c.case_id for c in manifest.select()] == ["c000", "c002", "c003"]
    assert [c.case_id for c in manifest.select("holdout", "train", site="site-b")] == ["c002", "c003"]
    assert [c.case_id for c in manifest.select(part="test")] == ["c004"]
    assert manifest.sites == ["site-a", "site-b"]
    with pytest.raises(KeyError, match="no split 'fold-0'"):
        manifest.select("fold-0")
    with pytest.raises(ValueError, match="part must be one of"):
        manifest.select(part="training")


def test_inconsistent_manifests_are_refused(spec) -> None:
    with pytest.raises(ValidationError, match="not in the manifest"):
        make(spec, splits={"holdout": {"train": ["c999"]}})
    with pytest.raises(ValidationError, match="more than one part"):
        make(spec, splits={"holdout": {"train": ["c000"], "val": ["c000"]}})
    with pytest.raises(ValidationError, match="duplicate case ids"):
        make(spec, cases=[*CASES, CASES[0]])
    with pytest.raises(ValidationError, match="both included and excluded"):
        make(spec, excluded={"c000": ["label_empty: label has no foreground voxels"]})


def test_save_load_round_trip_and_immutability(spec, store) -> None:
    excluded = {"c900": ["geometry_mismatch: label grid does not lie on image grid"]}
    manifest = make(spec, excluded=excluded)
    save_manifest(store, manifest)
    loaded = load_manifest(store, manifest.version_id)
    assert loaded == manifest
    assert loaded.labels == {1: "anterior", 2: "posterior"} and loaded.qc == {"excluded": excluded}

    again = make(spec, excluded=excluded)  # same content, later created_at: a no-op returning the stored one
    assert again.created_at != manifest.created_at
    assert save_manifest(store, again).created_at == manifest.created_at

    renamed = DatasetManifest.create("hippo-v2", CASES, SPLITS, spec, labels={1: "anterior", 2: "posterior"})
    assert renamed.version_id == manifest.version_id
    with pytest.raises(ManifestConflictError, match="immutable"):
        save_manifest(store, renamed)
    assert load_manifest(store, manifest.version_id).name == "hippo"


def test_load_errors(spec, store) -> None:
    with pytest.raises(KeyError, match="not found"):
        load_manifest(store, "ds-0000000000000000")
    with pytest.raises(ManifestError, match="not a dataset version id"):
        load_manifest(store, "../etc")
    manifest = make(spec)
    data = json.loads(manifest.to_json())
    data["cases"][0]["site"] = "site-z"  # edited in the bucket: no longer matches its id
    store.put_bytes(f"datasets/{manifest.version_id}/manifest.json", json.dumps(data).encode())
    with pytest.raises(ManifestError, match="does not match the content"):
        load_manifest(store, manifest.version_id)
