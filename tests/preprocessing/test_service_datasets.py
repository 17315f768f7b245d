# ruff: noqa: F811  (pytest fixtures imported from service_fixtures are re-bound as arguments)
"""The preprocessing service end to end on real servers (PostgreSQL, Redis, S3) and a real Celery worker:
MSD import of the 208 hippocampus cases, dataset versions through the API, splits on real data, the
series-ready path from ingest's message, label upload, and the precompute cache."""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.preprocessing.service_fixtures import (  # noqa: F401  (fixtures)
    PreprocessingService,
    preprocessing_env,
    preprocessing_service,
    preprocessing_worker,
)
from tests.service_harness import patched_environ, wait_for

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def imported(preprocessing_service: PreprocessingService, hippocampus_dir: Path) -> dict[str, object]:
    """All 208 hippocampus cases imported once (the import is what `voxelflow datasets import-msd` runs)."""
    from services.preprocessing.msd_import import import_msd

    ctx = preprocessing_service.ctx
    started = time.perf_counter()
    result = import_msd(ctx.store, ctx.session_factory, hippocampus_dir, collection="hippocampus")  # type: ignore[attr-defined]
    return {"result": result, "seconds": time.perf_counter() - started}


def _build(service: PreprocessingService, body: dict[str, object]) -> dict[str, object]:
    with service.client() as client:
        response = client.post("/datasets", json=body)
        assert response.status_code == 202, response.text
        build_id = response.json()["id"]
        done = wait_for(
            lambda: (r := client.get(f"/datasets/builds/{build_id}").json())["status"] in ("done", "failed") and r,
            timeout=120,
            what="dataset build",
        )
    return done


def test_msd_import_is_complete_content_addressed_and_idempotent(
    preprocessing_service: PreprocessingService, hippocampus_dir: Path, imported: dict[str, object]
) -> None:
    from services.preprocessing.msd_import import import_msd

    result = imported["result"]
    assert result.errors == {}  # type: ignore[attr-defined]
    assert len(result.case_ids) == 208 and result.modality == "MR"  # type: ignore[attr-defined]
    print(f"import of 208 hippocampus cases: {imported['seconds']:.1f} s")
    ctx = preprocessing_service.ctx
    # same bytes → same key; the object holds exactly the file's bytes
    image = hippocampus_dir / "imagesTr" / "hippocampus_004.nii.gz"
    import hashlib

    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    assert ctx.store.get_bytes(f"cases/sha256/{sha}.nii.gz") == image.read_bytes()  # type: ignore[attr-defined]
    again = import_msd(ctx.store, ctx.session_factory, hippocampus_dir, collection="hippocampus")  # type: ignore[attr-defined]
    assert again.counts == {"added": 0, "updated": 0, "unchanged": 208}
    with preprocessing_service.client() as client:
        page = client.get("/cases", params={"collection": "hippocampus", "limit": 5}).json()
    assert page["total"] == 208 and page["cases"][0]["case_id"] == "hippocampus_004"


def test_bad_msd_case_is_reported_and_the_rest_imported(
    preprocessing_service: PreprocessingService, hippocampus_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from services.preprocessing.msd_import import import_msd
    from shared.datasets.msd import MsdFormatError

    folder = tmp_path / "msd"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    index = json.loads((hippocampus_dir / "dataset.json").read_text())
    index["training"] = index["training"][:3]
    for entry in index["training"]:
        for part in ("image", "label"):
            shutil.copy(hippocampus_dir / entry[part], folder / entry[part])
    # the second label comes from another case: wrong shape for its image
    other = hippocampus_dir / "labelsTr" / "hippocampus_017.nii.gz"
    shutil.copy(other, folder / index["training"][1]["label"])
    (folder / "dataset.json").write_text(json.dumps(index))
    ctx = preprocessing_service.ctx
    result = import_msd(ctx.store, ctx.session_factory, folder, collection="broken")  # type: ignore[attr-defined]
    bad = Path(index["training"][1]["image"]).name.removesuffix(".nii.gz")
    assert list(result.errors) == [bad] and "shape" in result.errors[bad]
    assert len(result.case_ids) == 2
    with pytest.raises(MsdFormatError, match=r"no dataset\.json"):
        import_msd(ctx.store, ctx.session_factory, tmp_path, collection="x")  # type: ignore[attr-defined]


def test_dataset_version_through_the_service(
    preprocessing_service: PreprocessingService,
    preprocessing_worker: object,
    imported: dict[str, object],
    hippocampus_dir: Path,
) -> None:
    body = {
        "name": "hippocampus-3sites",
        "collection": "hippocampus",
        "sites": {"strategy": "intensity", "n_sites": 3, "seed": 1},
        "splits": {"k_folds": 5, "seed": 1},
    }
    build = _build(preprocessing_service, body)
    assert build["status"] == "done", build
    version_id = build["version_id"]
    assert version_id.startswith("ds-")
    with preprocessing_service.client() as client:
        version = client.get(f"/datasets/{version_id}").json()
        assert version["case_count"] == 208 and sum(version["site_counts"].values()) == 208
        assert version["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
        splits = client.get(f"/datasets/{version_id}/splits").json()
        assert set(splits) == {"holdout", *(f"fold-{i}" for i in range(5)), "loso-site-1", "loso-site-2", "loso-site-3"}
        qc = client.get(f"/datasets/{version_id}/qc")
        assert qc.status_code == 200, qc.text
        report = qc.json()["report"]
        # every real hippocampus case passes; the unnormalised intensities (up to 1.7e6) are reported, not hidden
        assert report["n_cases"] == 208 and report["n_excluded"] == 0, report["excluded"]
        assert report["finding_counts"].get("intensity_unnormalised", 0) > 0
        # a PACS token may not read datasets; no token at all is 401
        assert (
            client.get(
                "/datasets", headers={"Authorization": f"Bearer {preprocessing_service.tokens['pacs']}"}
            ).status_code
            == 403
        )
        assert client.get("/datasets", headers={"Authorization": ""}).status_code == 401
    # the manifest is readable through shared.datasets and sound on the real data
    from services.preprocessing.splits import split_violations
    from shared.datasets import load_manifest

    manifest = load_manifest(preprocessing_service.ctx.store, version_id)  # type: ignore[attr-defined]
    case_patient = {c.case_id: c.patient for c in manifest.cases}
    assert split_violations(manifest.splits, case_patient) == []
    patients_per_fold = [{case_patient[c] for c in manifest.splits[f"fold-{i}"]["val"]} for i in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not patients_per_fold[i] & patients_per_fold[j]  # no patient in two folds
    test_patients = {case_patient[c] for c in manifest.splits["holdout"]["test"]}
    assert not test_patients & set().union(*patients_per_fold)
    # non-IID by intensity: site means are strictly ordered
    means = {}
    with preprocessing_service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        from services.preprocessing.models import Case

        stats = {
            c.case_id: c.stats["intensity_mean"] for c in session.query(Case).filter(Case.collection == "hippocampus")
        }
    for site in manifest.sites:
        values = [stats[c.case_id] for c in manifest.cases if c.site == site]
        means[site] = max(values), min(values)
    assert means["site-1"][0] <= means["site-2"][1] and means["site-2"][0] <= means["site-3"][1]
    # the same request again is the same content-addressed version
    assert _build(preprocessing_service, {**body})["version_id"] == version_id
    _check_fingerprint_and_plan(preprocessing_service, dict(body), str(version_id), hippocampus_dir)


def _check_fingerprint_and_plan(
    service: PreprocessingService, body: dict[str, Any], version_id: str, hippocampus_dir: Path
) -> None:
    """The build stored the version's fingerprint once; GET /datasets/{id}/plan derives the plan from it."""
    from sqlalchemy import select

    from shared.contracts.layout import fingerprint_key
    from shared.datasets.fingerprint import DatasetFingerprint, fingerprint_msd_folder
    from shared.db.models import AuditEvent

    store = service.ctx.store  # type: ignore[attr-defined]
    key = fingerprint_key(version_id)
    stored = DatasetFingerprint.from_json(store.get_bytes(key))
    assert stored.case_count == 208 and stored.modalities == ["MR"]
    assert stored.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert set(stored.label_stats) == {1, 2} and all(s.cases_present == 208 for s in stored.label_stats.values())
    # the same statistics as fingerprinting the MSD folder itself (cases in the version's order)
    assert sorted(stored.shapes) == sorted(fingerprint_msd_folder(hippocampus_dir).shapes)
    # idempotent: a rebuild finds the stored fingerprint and reads no case (a marker put there survives it);
    # a version without one (built before fingerprints were stored) gets it on a rebuild
    marker = stored.model_copy(update={"name": "marker"})
    store.put_bytes(key, marker.to_json().encode())
    assert _build(service, {**body})["version_id"] == version_id
    assert DatasetFingerprint.from_json(store.get_bytes(key)).name == "marker"
    store.delete(key)
    assert _build(service, {**body})["version_id"] == version_id
    assert DatasetFingerprint.from_json(store.get_bytes(key)) == stored
    with service.client() as client:
        response = client.get(f"/datasets/{version_id}/plan")
        assert response.status_code == 200, response.text
        planned = response.json()
        assert planned["fingerprint_key"] == key
        assert planned["config"]["patch"] == {"sampler": "whole", "size": [48, 64, 48], "divisible": 8}
        assert planned["plan"]["target_spacing"] == [1.0, 1.0, 1.0]
        small = client.get(f"/datasets/{version_id}/plan", params={"memory_budget_gib": 0.01}).json()
        assert small["plan"]["memory_budget_gib"] == 0.01 and small["plan"]["batch_size"] == 2  # the floor
        assert client.get(f"/datasets/{version_id}/plan", params={"memory_budget_gib": 0}).status_code == 422
        assert client.get(f"/datasets/{version_id}/plan", params={"memory_budget_gib": "x"}).status_code == 422
        assert client.get("/datasets/ds-0000000000000000/plan").status_code == 404
        assert client.get(f"/datasets/{version_id}/plan", headers={"Authorization": ""}).status_code == 401
        pacs = {"Authorization": f"Bearer {service.tokens['pacs']}"}
        assert client.get(f"/datasets/{version_id}/plan", headers=pacs).status_code == 403

    def audited() -> list[AuditEvent] | None:  # the middleware writes the row once the response is sent
        with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
            rows = list(session.scalars(select(AuditEvent).where(AuditEvent.path == f"/datasets/{version_id}/plan")))
        seen = {(e.status_code, e.outcome) for e in rows}
        return rows if seen >= {(200, "success"), (401, "denied"), (403, "denied")} else None

    events = wait_for(audited, timeout=30, what="audit rows of the plan requests")
    assert any(version_id in e.object_uids and e.status_code == 200 for e in events)
    # `voxelflow plan ds-…` prints the same plan through the API
    import io
    from contextlib import redirect_stdout

    import yaml

    from shared.cli import main

    out = io.StringIO()
    env = {"VOXELFLOW_PREPROCESSING_API_URL": service.url, "VOXELFLOW_TOKEN": service.tokens["researcher"]}
    with patched_environ(env), redirect_stdout(out):
        main(["plan", version_id])
    assert yaml.safe_load(out.getvalue().split("# the whole plan")[0]) == planned["config"]
    with patched_environ(env), pytest.raises(SystemExit, match="no dataset version ds-0000000000000000"):
        main(["plan", "ds-0000000000000000"])


def test_quality_control_excludes_failing_cases_with_their_reasons(
    preprocessing_service: PreprocessingService, preprocessing_worker: object, hippocampus_dir: Path, tmp_path: Path
) -> None:
    """An empty mask and a constant image pass import (they are valid NIfTI on the right grid) but fail QC:
    the version is built from the other cases, and the two are listed in qc.excluded with their reasons."""
    import json
    import shutil

    from services.preprocessing.msd_import import import_msd
    from shared.datasets import load_manifest

    folder = tmp_path / "msd"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    index = json.loads((hippocampus_dir / "dataset.json").read_text())
    index["training"] = index["training"][:8]
    for entry in index["training"]:
        for part in ("image", "label"):
            shutil.copy(hippocampus_dir / entry[part], folder / entry[part])
    empty_label, constant_image = folder / index["training"][0]["label"], folder / index["training"][1]["image"]
    for path, fill in ((empty_label, 0), (constant_image, 7)):
        original = nib.load(str(path))
        data = np.full(original.shape, fill, dtype=original.get_data_dtype())
        nib.save(nib.Nifti1Image(data, original.affine, original.header), str(path))
    (folder / "dataset.json").write_text(json.dumps(index))
    ctx = preprocessing_service.ctx
    result = import_msd(ctx.store, ctx.session_factory, folder, collection="qc-broken")  # type: ignore[attr-defined]
    assert result.errors == {} and len(result.case_ids) == 8
    build = _build(
        preprocessing_service,
        {"name": "qc-broken", "collection": "qc-broken", "splits": {"k_folds": 2, "seed": 3}},
    )
    assert build["status"] == "done", build
    manifest = load_manifest(ctx.store, build["version_id"])  # type: ignore[attr-defined]
    bad = {Path(index["training"][i]["image"]).name.removesuffix(".nii.gz") for i in (0, 1)}
    excluded = manifest.qc["excluded"]
    assert set(excluded) == bad
    assert any("label_empty" in reason for reasons in excluded.values() for reason in reasons)
    assert any("image_constant" in reason for reasons in excluded.values() for reason in reasons)
    assert len(manifest.cases) == 6 and not bad & {c.case_id for c in manifest.cases}
    in_splits = {c for split in manifest.splits.values() for part in split.values() for c in part}
    assert not bad & in_splits


def test_bad_build_requests_are_refused_clearly(preprocessing_service: PreprocessingService) -> None:
    with preprocessing_service.client() as client:
        # a collection that does not exist is a reference to nothing: 404, as an unknown id would be
        assert client.post("/datasets", json={"name": "x", "collection": "nope"}).status_code == 404
        r = client.post("/datasets", json={"name": "x", "sites": {"strategy": "manifest", "manifest_csv": "a,b\n1,2"}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sites", "manifest_csv"]
        r = client.post("/datasets", json={"name": "x", "sites": {"strategy": "manifest"}})
        assert r.status_code == 422 and "needs sites.manifest_csv" in r.json()["detail"]
        two_sites = "case_id,site\nc1,north\nc1,south\n"
        r = client.post("/datasets", json={"name": "x", "sites": {"strategy": "manifest", "manifest_csv": two_sites}})
        assert r.status_code == 422 and "two sites" in r.json()["detail"]
        assert client.post("/datasets", json={"name": "x", "sites": {"n_sites": 0}}).status_code == 422


def test_unsatisfiable_build_fails_with_its_reason(
    preprocessing_service: PreprocessingService, preprocessing_worker: object, imported: dict[str, object]
) -> None:
    build = _build(
        preprocessing_service,
        {
            "name": "too-many-sites",
            "collection": "hippocampus",
            "case_ids": ["hippocampus_004", "hippocampus_006"],
            "sites": {"n_sites": 3},
        },
    )
    assert build["status"] == "failed" and "cannot fill 3 sites" in build["error"]


def test_series_ready_label_upload_and_precompute(
    preprocessing_service: PreprocessingService, preprocessing_worker: object, hippocampus_dir: Path, tmp_path: Path
) -> None:
    """Ingest's message → candidate case; a label attached by upload; a version; precompute twice (cached)."""
    from shared.contracts.tasks import SERIES_READY_TASK

    ctx = preprocessing_service.ctx
    uids = []
    for n, case in enumerate(("hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_017")):
        key = f"volumes/1.2.826.0.1.{n}/g0/volume.nii.gz"
        ctx.store.put_file(key, str(hippocampus_dir / "imagesTr" / f"{case}.nii.gz"))  # type: ignore[attr-defined]
        uid = f"1.2.826.0.1.{n}"
        uids.append((uid, case))
        message = {
            "series_instance_uid": uid,
            "study_instance_uid": f"1.2.826.0.2.{n}",
            "patient_pseudonym": f"pp{n // 2}",
            "modality": "MR",
            "site": f"hospital-{n % 2}",
            "volume_uri": key,
            "instance_count": 30,
        }
        ctx.celery.send_task(SERIES_READY_TASK, args=[message], queue="preprocessing")  # type: ignore[attr-defined]
    ctx.celery.send_task(  # type: ignore[attr-defined]
        SERIES_READY_TASK,
        args=[{"series_instance_uid": "1.2.9", "patient_pseudonym": "p", "non_volumetric_reason": "localizer: x"}],
        queue="preprocessing",
    )
    with preprocessing_service.client() as client:
        # other tests' ingested series land in the same catalogue: look for this test's four
        wanted = {uid for uid, _ in uids}

        def recorded() -> dict[str, dict[str, object]] | None:
            page = client.get("/cases", params={"collection": "catalogue", "limit": 500}).json()
            found = {c["case_id"]: c for c in page["cases"] if c["case_id"] in wanted}
            return found if len(found) == 4 else None

        ids = wait_for(recorded, what="catalogue cases")
        assert {c["site"] for c in ids.values()} == {"hospital-0", "hospital-1"}
        # a label on the wrong grid is refused and nothing changes
        wrong = (hippocampus_dir / "labelsTr" / "hippocampus_019.nii.gz").read_bytes()
        r = client.put(f"/cases/{ids[uids[0][0]]['id']}/label", content=wrong)
        assert r.status_code == 422 and "shape" in r.json()["detail"]
        for uid, case in uids:
            raw = gzip.decompress((hippocampus_dir / "labelsTr" / f"{case}.nii.gz").read_bytes())  # .nii works too
            r = client.put(f"/cases/{ids[uid]['id']}/label", content=raw)
            assert r.status_code == 200, r.text
            assert r.json()["label_key"].startswith("cases/sha256/")
    build = _build(
        preprocessing_service,
        {
            "name": "catalogue",
            "collection": "catalogue",
            "case_ids": sorted(wanted),
            "sites": {"strategy": "source"},
            "splits": {"k_folds": 0, "val_fraction": 0.0, "test_fraction": 0.5},
        },
    )
    assert build["status"] == "done", build
    version_id = build["version_id"]
    with preprocessing_service.client() as client:
        splits = client.get(f"/datasets/{version_id}/splits").json()
        assert set(splits) == {"holdout", "loso-hospital-0", "loso-hospital-1"}
        job = client.post(f"/datasets/{version_id}/precompute", json={}).json()
        first = wait_for(lambda: (j := client.get(f"/precompute/{job['id']}").json())["finished_at"] and j, timeout=120)
        assert (first["status"], first["computed"], first["cached"]) == ("done", 4, 0), first
        job2 = client.post(f"/datasets/{version_id}/precompute", json={}).json()
        second = wait_for(
            lambda: (j := client.get(f"/precompute/{job2['id']}").json())["finished_at"] and j, timeout=60
        )
        assert (second["computed"], second["cached"]) == (0, 4)  # the rerun costs nothing
    from shared.datasets import cache_key, load_cached, load_manifest

    manifest = load_manifest(ctx.store, version_id)  # type: ignore[attr-defined]
    case = manifest.cases[0]
    cached = load_cached(ctx.store, cache_key(manifest.preprocessing_hash, case.case_hash))  # type: ignore[attr-defined]
    label_path = tmp_path / "label.nii.gz"
    ctx.store.download_file(case.label_key, str(label_path))  # type: ignore[attr-defined]
    label = np.asarray(nib.load(str(label_path)).dataobj)
    assert cached["image"].dtype == torch.float32 and cached["image"].shape[0] == 1
    assert int((cached["label"] > 0).sum()) == int((label > 0).sum())  # padding adds no foreground
