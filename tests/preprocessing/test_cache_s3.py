"""The preprocessed-case cache on a real S3 server (SeaweedFS via the s3_url fixture)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from shared.datasets import (
    CachedCaseDataset,
    CaseRecord,
    cache_key,
    load_cached,
    make_loader,
    preprocess_case,
    preprocess_cases,
    store_case_file,
)
from shared.preprocessing import build_transforms, load_spec
from shared.storage import open_object_store
from tests.preprocessing.conftest import hippo_pair

NUMBERS = ("004", "033", "243")


@pytest.fixture(scope="module")
def store(new_s3_bucket):
    return open_object_store(new_s3_bucket("cache"))


def record(store, hippocampus: Path, number: str, site: str = "site-a") -> CaseRecord:
    pair = hippo_pair(hippocampus, number)
    image_key, image_sha = store_case_file(store, pair["image"])
    label_key, label_sha = store_case_file(store, pair["label"])
    return CaseRecord(
        case_id=f"hippocampus_{number}",
        patient=f"hippocampus_{number}",
        site=site,
        modality="MR",
        image_key=image_key,
        label_key=label_key,
        image_sha256=image_sha,
        label_sha256=label_sha,
        source=f"msd:imagesTr/hippocampus_{number}.nii.gz",
    )


def test_raw_files_are_content_addressed(store, hippocampus: Path) -> None:
    pair = hippo_pair(hippocampus, "004")
    key, sha = store_case_file(store, pair["image"])
    assert key == f"cases/sha256/{sha}.nii.gz"
    etag = store.stat(key).etag
    assert store_case_file(store, pair["image"]) == (key, sha)
    assert store.stat(key).etag == etag
    assert store.get_bytes(key) == Path(pair["image"]).read_bytes()


def test_bulk_build_then_rerun_costs_nothing(store, hippocampus: Path) -> None:
    spec = load_spec("mr_hippocampus")
    cases = [record(store, hippocampus, n) for n in NUMBERS]
    calls: list[tuple[int, int, str, str]] = []
    first = preprocess_cases(store, cases, spec, progress=lambda *args: calls.append(args))
    assert first.failed == {} and first.built == 3 and first.cached == 0
    assert [c[0] for c in calls] == [1, 2, 3] and {c[3] for c in calls} == {"built"}
    etags = {key: store.stat(key).etag for key in first.keys.values()}
    second = preprocess_cases(store, cases, spec)
    assert second.built == 0 and second.cached == 3 and second.keys == first.keys
    assert {key: store.stat(key).etag for key in second.keys.values()} == etags

    # the stored dict is the contract's format and equals what the preprocess stage gives directly
    case = cases[2]  # hippocampus_243: float32 label
    entry = load_cached(store, cache_key(spec.hash, case.case_hash))
    assert set(entry) == {"image", "label", "affine", "case_id", "pipeline_hash"}
    assert entry["case_id"] == case.case_id and entry["pipeline_hash"] == spec.hash
    assert entry["image"].dtype == torch.float32 and entry["label"].dtype == torch.uint8
    assert entry["affine"].dtype == torch.float64 and entry["affine"].shape == (4, 4)
    direct = build_transforms(spec, "preprocess")(hippo_pair(hippocampus, "243"))
    assert torch.equal(entry["image"], direct["image"].as_tensor())
    assert torch.equal(entry["label"], direct["label"].as_tensor().to(torch.uint8))
    assert torch.equal(entry["affine"], direct["image"].affine)


def test_a_corrupt_case_fails_alone_with_its_reason(store, hippocampus: Path) -> None:
    spec = load_spec("mr_hippocampus")
    good = record(store, hippocampus, "006")
    # bytes of one image stored under the address of another: the manifest's sha256 catches it
    wrong = record(store, hippocampus, "065").model_copy(update={"image_key": good.image_key})
    missing = good.model_copy(
        update={"case_id": "missing", "image_sha256": "0" * 64, "image_key": "cases/sha256/" + "0" * 64 + ".nii.gz"},
    )
    missing = CaseRecord.model_validate({**missing.model_dump(), "case_hash": ""})
    result = preprocess_cases(store, [wrong, good, missing], spec)
    assert list(result.keys) == ["hippocampus_006"]
    assert "the manifest says" in result.failed["hippocampus_065"]
    assert "missing from the store" in result.failed["missing"]
    assert not store.exists(cache_key(spec.hash, wrong.case_hash))


def test_loader_reads_the_cache_with_augmentation(store, hippocampus: Path) -> None:
    spec = load_spec("mr_hippocampus")
    cases = [record(store, hippocampus, n) for n in NUMBERS]
    for case in cases:
        preprocess_case(store, case, spec)
    dataset = CachedCaseDataset(store, cases, spec.hash)
    seen: list[str] = []
    dataset.prefetch(progress=lambda done, total, case_id, outcome: seen.append(case_id))
    assert sorted(seen) == sorted(c.case_id for c in cases)
    plain = dataset[0]
    assert plain["image"].shape[0] == 1 and plain["case_id"] == "hippocampus_004"

    loader = make_loader(store, cases, spec.hash, build_transforms(spec, "augment"), batch_size=2, shuffle=False)
    batches = list(loader)
    assert [len(b["case_id"]) for b in batches] == [2, 1]
    first = batches[0]
    assert first["image"].ndim == 5 and first["image"].shape[:2] == (2, 1)
    assert first["label"].shape == first["image"].shape  # padded to the largest case of the batch
    assert set(torch.unique(first["label"]).tolist()) <= {0.0, 1.0, 2.0}
    assert first["case_id"] == ["hippocampus_004", "hippocampus_033"]

    with pytest.raises(Exception, match="not cached"):
        CachedCaseDataset(store, cases, "f" * 64)[0]


def test_cached_entry_loads_with_weights_only(store, hippocampus: Path) -> None:
    """Readers use torch.load(weights_only=True): the entry must hold only tensors and strings."""
    spec = load_spec("mr_hippocampus")
    key = preprocess_case(store, record(store, hippocampus, "004"), spec)
    entry = torch.load(io.BytesIO(store.get_bytes(key)), weights_only=True)
    assert all(isinstance(v, torch.Tensor | str) for v in entry.values())
