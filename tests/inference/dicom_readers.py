"""Real third-party DICOM readers the output tests check against (installed from PyPI, requirements-dev.txt).

- dcmqi's ``segimage2itkimage`` (the DCMQI converter 3D Slicer uses) reads a SEG back to a NIfTI label map;
- dicom3tools' ``dciodvfy`` (David Clunie's IOD verifier, the standard's IOD and module tables compiled in)
  lists every IOD error of an instance.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

BIN = Path(sys.executable).parent

#: dicom3tools 20260927 requires Referenced Segment Number (TID 1411) only for a reference to Segmentation
#: Storage; the standard also allows it for Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7,
#: the class of a LABELMAP SEG), which this dciodvfy does not know yet. This one message is dropped for an
#: SR whose referenced SEG is a label map, nothing else.
LABELMAP_SEG_REFERENCE_GAP = (
    "Shall not be present for Referenced SOP Class that is not segmentation - attribute <ReferencedSegmentNumber>"
)


def iod_errors(path: Path, *, references_labelmap_seg: bool = False) -> list[str]:
    """The ``Error`` lines dciodvfy prints for one file (warnings are not IOD errors)."""
    run = subprocess.run([str(BIN / "dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    if references_labelmap_seg:
        errors = [line for line in errors if LABELMAP_SEG_REFERENCE_GAP not in line]
    return errors


def dcmqi_label_map(seg_path: Path, workdir: Path) -> nib.Nifti1Image:
    """The SEG as dcmqi reads it: all segments merged into one label map (values = segment numbers)."""
    out = workdir / "dcmqi"
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [
            str(BIN / "segimage2itkimage"),
            "--inputDICOM",
            str(seg_path),
            "--outputDirectory",
            str(out),
            "--outputType",
            "nifti",
            "--mergeSegments",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    images = sorted(out.glob("*.nii.gz"))
    assert len(images) == 1, [p.name for p in images]
    return nib.load(images[0])


def same_label_map_in_world(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """Voxel-for-voxel equality after both are put in RAS order (their affines must then agree)."""
    a, b = nib.as_closest_canonical(a), nib.as_closest_canonical(b)
    if not np.allclose(a.affine, b.affine, atol=1e-4):
        return False
    return bool(np.array_equal(np.asarray(a.dataobj).astype(np.int64), np.asarray(b.dataobj).astype(np.int64)))
