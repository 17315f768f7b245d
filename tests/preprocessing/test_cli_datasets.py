# ruff: noqa: F811  (pytest fixtures imported from service_fixtures are re-bound as arguments)
"""``voxelflow datasets``: a client of the preprocessing API (uploads, build, list, show), as a user's own script
would be; real service, real worker, real PostgreSQL/Redis/S3. Every user mistake ends in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.cli import main
from tests.preprocessing.service_fixtures import (  # noqa: F401  (fixtures)
    PreprocessingService,
    preprocessing_env,
    preprocessing_service,
    preprocessing_worker,
)
from tests.service_harness import free_port


@pytest.fixture
def msd_subset(hippocampus_dir: Path, tmp_path: Path) -> Path:
    """An MSD folder of 24 hippocampus cases, the last one with a label off its image grid."""
    folder = tmp_path / "hippocampus-subset"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    index = json.loads((hippocampus_dir / "dataset.json").read_text())
    index["training"] = index["training"][:24]
    for entry in index["training"]:
        for part in ("image", "label"):
            shutil.copy(hippocampus_dir / entry[part], folder / entry[part])
    shutil.copy(hippocampus_dir / "labelsTr" / "hippocampus_017.nii.gz", folder / index["training"][-1]["label"])
    (folder / "dataset.json").write_text(json.dumps(index))
    return folder


def test_import_build_list_show_through_the_api(
    preprocessing_service: PreprocessingService,
    preprocessing_worker: object,
    msd_subset: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VOXELFLOW_PREPROCESSING_API_URL", preprocessing_service.url)
    monkeypatch.setenv("VOXELFLOW_TOKEN", preprocessing_service.tokens["researcher"])
    main(["datasets", "import-msd", str(msd_subset), "--collection", "cli-subset", "--sites", "2", "--folds", "0"])
    captured = capsys.readouterr()
    version_id = captured.out.strip()
    assert version_id.startswith("ds-")
    assert "'added': 23" in captured.err and "1 case(s) refused" in captured.err and "shape" in captured.err
    # the same folder again: nothing new is stored, the same version comes back
    main(["datasets", "import-msd", str(msd_subset), "--collection", "cli-subset", "--sites", "2", "--folds", "0"])
    again = capsys.readouterr()
    assert "'unchanged': 23" in again.err and again.out.strip() == version_id
    main(["datasets", "list"])
    assert version_id in capsys.readouterr().out
    main(["datasets", "show", version_id])
    shown = json.loads(capsys.readouterr().out)
    assert (
        shown["cases"] == 23
        and sum(shown["sites"].values()) == 23
        and set(shown["splits"]) == {"holdout", "loso-site-1", "loso-site-2"}
    )


def test_user_mistakes_end_in_one_line(
    preprocessing_service: PreprocessingService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VOXELFLOW_PREPROCESSING_API_URL", preprocessing_service.url)
    monkeypatch.setenv("VOXELFLOW_TOKEN", preprocessing_service.tokens["researcher"])

    def message(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        assert isinstance(exited.value.code, str), exited.value.code  # a message, not a bare status
        return exited.value.code

    assert "no dataset version 'ds-0123456789abcdef'" in message("datasets", "show", "ds-0123456789abcdef")
    assert "is not an MSD dataset" in message("datasets", "import-msd", str(tmp_path))
    monkeypatch.setenv("VOXELFLOW_TOKEN", "vf_not_a_token")
    assert "refused the token" in message("datasets", "list")
    monkeypatch.setenv("VOXELFLOW_TOKEN", preprocessing_service.tokens["pacs"])
    assert "role may not" in message("datasets", "list")
    monkeypatch.delenv("VOXELFLOW_TOKEN")
    assert "voxelflow tokens create" in message("datasets", "list")
    monkeypatch.setenv("VOXELFLOW_TOKEN", "vf_x")
    monkeypatch.setenv("VOXELFLOW_PREPROCESSING_API_URL", f"http://127.0.0.1:{free_port()}")
    assert "is not reachable" in message("datasets", "list")
    monkeypatch.setenv("VOXELFLOW_STORAGE_URL", tmp_path.as_uri())
    assert "unknown dataset version" in message("train", "--dataset", "ds-0123456789abcdef")
    assert "not an MSD dataset" in message("evaluate", "--model", "notauri", "--data", str(tmp_path))
    config = tmp_path / "bad.yaml"
    config.write_text("model: [unclosed\n")
    assert "YAML" in message("train", "--dataset", "ds-0123456789abcdef", "--config", str(config))
