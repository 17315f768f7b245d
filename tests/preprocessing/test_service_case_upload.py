# ruff: noqa: F811  (pytest fixtures imported from service_fixtures are re-bound as arguments)
"""``PUT /collections/{collection}/cases/{case_id}``: how a client (``voxelflow datasets import-msd``, a user's
script) adds cases without the service seeing its file system. Real PostgreSQL and S3."""

from __future__ import annotations

import json
from pathlib import Path

from tests.preprocessing.service_fixtures import (  # noqa: F401  (fixtures)
    PreprocessingService,
    preprocessing_env,
    preprocessing_service,
)

LABELS = json.dumps({"0": "background", "1": "Anterior", "2": "Posterior"})


def _files(folder: Path, case: str, with_label: bool = True) -> dict[str, tuple[str, bytes]]:
    files = {"image": (f"{case}.nii.gz", (folder / "imagesTr" / f"{case}.nii.gz").read_bytes())}
    if with_label:
        files["label"] = (f"{case}.nii.gz", (folder / "labelsTr" / f"{case}.nii.gz").read_bytes())
    return files


def test_a_case_is_added_once_and_unchanged_when_sent_again(
    preprocessing_service: PreprocessingService, hippocampus_dir: Path
) -> None:
    form = {"modality": "MR", "label_names": LABELS}
    with preprocessing_service.client() as client:
        first = client.put(
            "/collections/upload-test/cases/hippocampus_004",
            files=_files(hippocampus_dir, "hippocampus_004"),
            data=form,
        )
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["state"] == "added" and body["case"]["modality"] == "MR"
        assert body["case"]["label_key"] and body["case"]["stats"]["shape"][:3] == [36, 52, 38]
        again = client.put(
            "/collections/upload-test/cases/hippocampus_004",
            files=_files(hippocampus_dir, "hippocampus_004"),
            data=form,
        )
        assert again.status_code == 200 and again.json()["state"] == "unchanged"
        listed = client.get("/cases", params={"collection": "upload-test"}).json()
    assert listed["total"] == 1


def test_bad_uploads_are_refused_with_their_reason(
    preprocessing_service: PreprocessingService, hippocampus_dir: Path
) -> None:
    with preprocessing_service.client() as client:
        # a label from another case is off the image grid
        mismatched = _files(hippocampus_dir, "hippocampus_006")
        mismatched["label"] = _files(hippocampus_dir, "hippocampus_007")["label"]
        response = client.put("/collections/upload-bad/cases/c1", files=mismatched, data={"label_names": LABELS})
        assert response.status_code == 422 and "label" in response.json()["detail"]
        not_nifti = {"image": ("x.nii", b"this is not a NIfTI file")}
        response = client.put("/collections/upload-bad/cases/c2", files=not_nifti)
        assert response.status_code == 422 and "not a readable NIfTI" in response.json()["detail"]
        response = client.put(
            "/collections/upload-bad/cases/c3",
            files=_files(hippocampus_dir, "hippocampus_006"),
            data={"label_names": "[1"},
        )
        assert response.status_code == 422 and "label_names" in response.json()["detail"]
        # what the OpenAPI document says label_names holds: label values as keys, text names as values
        for names in ('{"one": "x"}', '{"1": 2}', '{"1": "a\\u0000b"}', '["x"]'):
            response = client.put(
                "/collections/upload-bad/cases/c3",
                files=_files(hippocampus_dir, "hippocampus_006"),
                data={"label_names": names},
            )
            assert response.status_code == 422 and "label_names" in response.json()["detail"], names
        assert client.put("/collections/bad name/cases/c4", files=not_nifti).status_code == 422
        # an empty field is not taken for an absent one (FastAPI would use the default in silence)
        response = client.put(
            "/collections/upload-bad/cases/c3", files=_files(hippocampus_dir, "hippocampus_006"), data={"modality": ""}
        )
        assert response.status_code == 422 and "modality" in response.json()["detail"]
        # the same case id from another source is a conflict; the stored case is untouched
        sent = client.put("/collections/upload-bad/cases/c5", files=_files(hippocampus_dir, "hippocampus_006"))
        assert sent.status_code == 201
        other = client.put(
            "/collections/upload-bad/cases/c5",
            files=_files(hippocampus_dir, "hippocampus_007"),
            data={"source": "msd:elsewhere/imagesTr/hippocampus_007.nii.gz"},
        )
        assert other.status_code == 409 and "already has case" in other.json()["detail"]
        assert client.get(f"/cases/{sent.json()['case']['id']}").json()["image_key"] == sent.json()["case"]["image_key"]
    with preprocessing_service.client("pacs") as pacs:
        assert pacs.put("/collections/upload-bad/cases/c6", files=not_nifti).status_code == 403
    with preprocessing_service.client("") as anonymous:
        assert anonymous.put("/collections/upload-bad/cases/c6", files=not_nifti).status_code == 401
