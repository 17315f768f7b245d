"""What evaluation scores is what the service serves: the same label map, voxel for voxel, on a real case.

The served side is the service's own request path (``volume_from_nifti`` → ``segment_volume`` on a
``ServedModel`` built by ``served_model``, ONNX Runtime on the export); the evaluated side is
``shared.evaluation.runner.evaluate_cases`` on the image file. The served mask is written as the case's
label, so evaluation reports Dice 1 and equal voxel counts for every label exactly when both paths give
the same label map.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from services.inference.export import export_onnx
from services.inference.model_server import VersionArtifacts, served_model
from services.inference.segmentation import segment_volume
from services.inference.sources import volume_from_nifti
from shared.evaluation.runner import evaluate_cases
from shared.inference import OnnxRuntimeBackend
from shared.preprocessing import load_spec
from tests.inference.helpers import ROI, tiny_unet

LABELS = {0: "background", 1: "anterior", 2: "posterior"}
CASE = "hippocampus_004"


@pytest.fixture(scope="module")
def network_and_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    network = tiny_unet(seed=3)
    return network, export_onnx(network, 1, ROI, tmp_path_factory.mktemp("onnx") / "model.onnx")


def served_mask(onnx_path: Path, image: Path, largest_component: bool) -> np.ndarray:
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    backend.load("hippo", 1, onnx_path)
    spec = load_spec("mr_hippocampus")
    artifacts = VersionArtifacts("hippo", "1", "run", spec.to_dict(), LABELS, has_onnx=True)
    model = served_model(artifacts, backend, ROI, 1, sw_batch_size=4, overlap=0.25, on_close=backend.unload)
    try:
        return segment_volume(model, volume_from_nifti(image.read_bytes()), largest_component=largest_component).mask
    finally:
        model.close()


@pytest.mark.parametrize("largest_component", [False, True])
def test_evaluation_scores_exactly_the_served_label_map(
    hippocampus_dir: Path, network_and_export: tuple[torch.nn.Module, Path], tmp_path: Path, largest_component: bool
) -> None:
    network, onnx_path = network_and_export
    image = hippocampus_dir / "imagesTr" / f"{CASE}.nii.gz"
    mask = served_mask(onnx_path, image, largest_component)
    present = [v for v in LABELS if v and (mask == v).any()]
    assert present, "the served mask has no foreground: the comparison would prove nothing"
    as_label = tmp_path / f"{CASE}_served.nii.gz"
    nib.save(nib.Nifti1Image(mask, nib.load(image).affine), as_label)

    spec = load_spec("mr_hippocampus")
    onnx = OnnxRuntimeBackend(intra_op_threads=1)
    onnx.load("hippo", 1, onnx_path)
    records = evaluate_cases(
        onnx, spec, LABELS, [(image, as_label)], ROI, sw_batch_size=2, largest_component=largest_component
    )
    assert [r["dice"] for r in records] == [1.0, 1.0]
    assert all(r["predicted_voxels"] == r["truth_voxels"] for r in records)

    # the PyTorch network in process (what `voxelflow evaluate` runs before an export): the same windows
    # and blending, so at most a voxel on an argmax tie differs from the served ONNX export
    torch_records = evaluate_cases(network, spec, LABELS, [(image, as_label)], ROI, largest_component=largest_component)
    for record in torch_records:
        assert record["dice"] > 0.999 and abs(record["predicted_voxels"] - record["truth_voxels"]) <= 1
