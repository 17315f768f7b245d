"""``voxelflow evaluate`` end to end: a model trained here for a few steps on real hippocampus cases,
registered in the real MLflow, evaluated through the CLI with the model's own stored preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.cli import main
from shared.registry import registry_client
from tests.evaluation.conftest import CASES, register_tiny_model


def test_evaluate_cli_on_hippocampus(
    mlflow_uri: str, msd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("VOXELFLOW_MLFLOW_TRACKING_URI", mlflow_uri)
    _, name = register_tiny_model(msd_folder, registry_client(mlflow_uri), "evaluate-cli", "evaluate")

    out = tmp_path / "report.csv"
    capsys.readouterr()  # MLflow prints a run link while logging; the CLI's table is what follows
    main(
        [
            "evaluate",
            "--model",
            f"models:/{name}@candidate",
            "--data",
            str(msd_folder),
            "--out",
            str(out),
            "--bootstrap",
            "200",
        ]
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("label") and "anterior" in table and "posterior" in table
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"]["uri"] == f"models:/{name}/1" and report["data"]["cases"] == 3
    assert {(r["case_id"], r["label_name"]) for r in report["cases"]} == {
        (c, n) for c in CASES for n in ("anterior", "posterior")
    }
    # metrics are computed on the original grid: truth voxel counts equal the raw label files' counts
    import nibabel as nib
    import numpy as np

    raw = np.asarray(nib.load(msd_folder / "labelsTr" / "hippocampus_006.nii.gz").dataobj)
    row = next(r for r in report["cases"] if r["case_id"] == "hippocampus_006" and r["label"] == 1)
    assert row["truth_voxels"] == int((raw == 1).sum())
    assert all(0.0 <= r["dice"] <= 1.0 for r in report["cases"])
    dice = report["summary"]["anterior"]["dice"]
    assert dice["n"] == 3 and dice["ci_low"] <= dice["mean"] <= dice["ci_high"]
    assert len(out.read_text().splitlines()) == 1 + 6

    with pytest.raises(SystemExit, match="not a registry URI"):
        main(["evaluate", "--model", "hippo-latest", "--data", str(msd_folder)])
    with pytest.raises(SystemExit, match=r"no dataset\.json"):
        main(["evaluate", "--model", f"models:/{name}/1", "--data", str(tmp_path)])
