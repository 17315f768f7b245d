"""dcm2niix, the reference: run it on a folder and compare a reconstruction with its output in world space.

dcm2niix (Debian package ``dcm2niix``, installed by ci/install-system.sh) writes its voxels in another
order than we do (rows flipped, sometimes slices reversed), so nothing is compared by raw array index:
both grids are mapped into world space through their affines, and values are compared where the voxel
centres coincide.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from services.ingest.volume import SeriesVolume

WORLD_TOL_MM = 1e-3


@dataclass(frozen=True)
class Dcm2niixOutput:
    """One NIfTI dcm2niix wrote, with its sidecars; ``log`` is what dcm2niix printed for the whole folder."""

    image: nib.Nifti1Image
    path: Path
    bvals: np.ndarray | None
    bvecs: np.ndarray | None
    log: str


def dcm2niix_binary() -> str:
    found = shutil.which("dcm2niix")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("dcm2niix is missing: ci/install-system.sh installs it (Debian package dcm2niix)")
        pytest.skip("dcm2niix is not installed: run ci/install-system.sh (Debian package dcm2niix)")
    return found


def run_dcm2niix(folder: Path, out: Path, *extra: str) -> tuple[list[Dcm2niixOutput], str]:
    """dcm2niix on ``folder`` (uncompressed NIfTI, BIDS sidecars off); returns its outputs sorted by name."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [dcm2niix_binary(), "-z", "n", "-b", "n", "-f", "%s_%e", *extra, "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    outputs = []
    for path in sorted(out.glob("*.nii")):
        image = nib.load(path)
        assert isinstance(image, nib.Nifti1Image)
        bval, bvec = path.with_suffix(".bval"), path.with_suffix(".bvec")
        outputs.append(
            Dcm2niixOutput(
                image=image,
                path=path,
                bvals=np.loadtxt(bval, ndmin=1) if bval.exists() else None,
                bvecs=np.loadtxt(bvec, ndmin=2) if bvec.exists() else None,
                log=log,
            )
        )
    return outputs, log


def to_reference_grid(array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder ``array`` (axis permutation + flips) into the voxel order of the reference; returns the
    reordered array and the affine that goes with it (the caller checks it equals the reference's)."""
    transform = ornt_transform(io_orientation(affine), io_orientation(ref_affine))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape[:3])


def max_corner_distance_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest world distance between the same voxel centre under two affines (reached at a corner)."""
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in shape[:3]])]).T
    return float(np.max(np.linalg.norm((affine_a @ corners - affine_b @ corners)[:3], axis=0)))


def assert_same_world_grid(volume: SeriesVolume, ref: nib.Nifti1Image, tol_mm: float = WORLD_TOL_MM) -> np.ndarray:
    """Same grid in world space (shape, every voxel centre within ``tol_mm``); returns our array in the
    reference's voxel order."""
    array, affine = to_reference_grid(volume.array, volume.affine, ref.affine)
    assert array.shape == ref.shape, (array.shape, ref.shape)
    assert max_corner_distance_mm(affine, ref.affine, ref.shape) < tol_mm
    return array


def world_overlap(
    volume: SeriesVolume, ref: nib.Nifti1Image, tol_mm: float = WORLD_TOL_MM
) -> tuple[np.ndarray, np.ndarray]:
    """Our values and the reference's at the voxel centres both grids share (grids may differ in extent).

    Every voxel centre of ours must fall on a voxel centre of the reference's lattice (within ``tol_mm``);
    returns the two ``(voxel, frame)`` value arrays over the common voxels (one frame for 3-D).
    """
    index_map = np.linalg.inv(ref.affine) @ volume.affine  # our voxel index -> reference voxel index
    shape = volume.array.shape[:3]
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    ref_ijk = ijk @ index_map[:3, :3].T + index_map[:3, 3]
    rounded = np.round(ref_ijk)
    zooms = np.linalg.norm(ref.affine[:3, :3], axis=0)
    assert float(np.max(np.abs(ref_ijk - rounded) * zooms)) < tol_mm, "the two lattices do not coincide"
    rounded = rounded.astype(int)
    inside = np.all((rounded >= 0) & (rounded < np.array(ref.shape[:3])), axis=1)
    ours = volume.array.reshape(int(np.prod(shape)), -1)[inside]
    theirs = np.asarray(ref.dataobj)[tuple(rounded[inside].T)].reshape(len(ours), -1)
    return ours, theirs


def world_bvecs(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL-convention ``(3, n)`` b-vectors of an image with ``affine`` -> ``(n, 3)`` unit vectors in RAS world."""
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    vectors = np.array(bvecs, dtype=float).T
    if np.linalg.det(rotation) > 0:
        vectors[:, 0] = -vectors[:, 0]
    return vectors @ rotation.T
