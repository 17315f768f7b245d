"""Object-storage keys shared between services (one bucket per deployment; table in docs/contracts.md).

The series volumes (``volumes/…``) also fix here, once, what a 4-D volume is (see :func:`volume_key`).

Writers and readers both build keys with these functions, so the layout is written once. Other keys with a
single home stay there: ``datasets/{version}/manifest.json`` (:func:`shared.datasets.manifest_key`; its
fingerprint, read by the preprocessing API and by training, is here: :func:`fingerprint_key`),
``cases/sha256/…`` and ``preprocessed/{pipeline}/{case}.pt`` (``shared.datasets``).
"""

from __future__ import annotations

import re

#: a site name as it appears in keys and queue names
SITE_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,62})"

VOLUMES_PREFIX = "volumes"
DATASETS_PREFIX = "datasets"
FEDERATED_PREFIX = "federated"
#: what a site keeps for itself: never listed nor read by the aggregator (a deployment can deny it the prefix)
SITE_PRIVATE_PREFIX = "site-private"
INFERENCE_PREFIX = "inference"
#: the Triton model repository inside the bucket: ``triton/{model}/config.pbtxt``, ``triton/{model}/{version}/…``
TRITON_PREFIX = "triton"


# --- series volumes: ingest writes one NIfTI per volume of a reconstructed series, preprocessing reads it ---
#
# The volume is a NIfTI-1 image, gzipped, with qform = sform (code 1) = the RAS affine of voxel centres.
# 3-D: shape (X, Y, Z) = (DICOM columns, rows, slices). 4-D (one volume, several frames: an fMRI run, a DWI
# acquisition, an enhanced file with repeated positions): shape (X, Y, Z, T), axis 3 the frames in
# acquisition order, what they are in the series record's ``frame_axis`` ("time" | "diffusion"). A
# diffusion volume has FSL-format sidecars beside it, as dcm2niix writes them: ``.bval`` (one line, one
# b-value in s/mm² per frame) and ``.bvec`` (three lines x, y, z, one unit vector per frame, in the
# voxel axes, x negated when the affine's determinant is positive). Several echoes or image types of one
# series are several volumes (``name`` = ``e1``, ``e2`` / ``magnitude``, ``fieldmap``), never a 5th axis.

#: frame-axis values of a 4-D volume
FRAME_AXES = ("time", "diffusion")


def volume_key(series_uid: str, generation: int, name: str) -> str:
    """``volumes/{series_uid}/g{generation}/{name}.nii.gz``; ``name`` is ``volume`` for a one-volume series."""
    return f"{VOLUMES_PREFIX}/{series_uid}/g{generation}/{name}.nii.gz"


def volume_bval_key(series_uid: str, generation: int, name: str) -> str:
    """The b-values of a diffusion volume (FSL ``.bval``), beside :func:`volume_key`."""
    return f"{VOLUMES_PREFIX}/{series_uid}/g{generation}/{name}.bval"


def volume_bvec_key(series_uid: str, generation: int, name: str) -> str:
    """The b-vectors of a diffusion volume (FSL ``.bvec``), beside :func:`volume_key`."""
    return f"{VOLUMES_PREFIX}/{series_uid}/g{generation}/{name}.bvec"


# --- dataset versions: the preprocessing service writes them, training and the aggregator read them ---


def fingerprint_key(version_id: str) -> str:
    """``datasets/{version}/fingerprint.json``: the version's ``shared.datasets.fingerprint.DatasetFingerprint``
    (spacings, shapes, foreground intensities, label sizes of its labelled cases), written when it is built;
    what a training plan is derived from."""
    return f"{DATASETS_PREFIX}/{version_id}/fingerprint.json"


# --- federated runs: aggregation writes the run's config and global weights, the sites their updates ---


def run_prefix(run_id: str) -> str:
    return f"{FEDERATED_PREFIX}/{run_id}/"


def config_key(run_id: str) -> str:
    """The run's ``shared.training.TrainingConfig`` as YAML."""
    return f"{run_prefix(run_id)}training-config.yaml"


def test_evaluation_key(run_id: str) -> str:
    """Per-case records of the final model on holdout.test (written once; a resumed finish reuses them)."""
    return f"{run_prefix(run_id)}test-evaluation.json"


def round_prefix(run_id: str, round_index: int) -> str:
    return f"{run_prefix(run_id)}round-{round_index:04d}/"


def global_key(run_id: str, round_index: int) -> str:
    """The weights round ``round_index`` starts from; its existence means round ``round_index - 1`` is aggregated.

    For ``round_index == rounds`` it is the final model.
    """
    return f"{round_prefix(run_id, round_index)}global.pt"


def server_state_key(run_id: str, round_index: int) -> str:
    """Server optimiser moments after round ``round_index - 1`` (FedAdam/FedYogi only)."""
    return f"{round_prefix(run_id, round_index)}server-state.pt"


def attempt_id(run_id: str, round_index: int, site: str) -> str:
    """The idempotency key of one site's round task; also its Celery task id."""
    return f"{run_id}-r{round_index}-{site}"


def attempt_prefix(run_id: str, round_index: int, site: str, attempt: str) -> str:
    """Everything one attempt of a site's round writes lives under here."""
    return f"{round_prefix(run_id, round_index)}{site}/{attempt}/"


def weights_key(run_id: str, round_index: int, site: str, attempt: str) -> str:
    """The site's state dict after local training (written before ``update.json``)."""
    return f"{attempt_prefix(run_id, round_index, site, attempt)}weights.pt"


def update_key(run_id: str, round_index: int, site: str, attempt: str) -> str:
    """The ``ModelUpdate`` (proto JSON), written last: its existence means "delivered"."""
    return f"{attempt_prefix(run_id, round_index, site, attempt)}update.json"


def site_run_prefix(run_id: str, site: str) -> str:
    """Everything ``site`` keeps to itself about a run: outside ``federated/``, so the aggregator never sees it."""
    return f"{SITE_PRIVATE_PREFIX}/{site}/{FEDERATED_PREFIX}/{run_id}/"


def checkpoint_key(run_id: str, round_index: int, site: str, attempt: str) -> str:
    """The site's resume point inside a round (model, optimiser, scheduler, epoch, RNG). Site-private: it holds
    the optimiser state and the weights before any clipping."""
    return f"{site_run_prefix(run_id, site)}round-{round_index:04d}/{attempt}/checkpoint.pt"


def site_state_key(run_id: str, site: str, round_index: int) -> str:
    """What ``site`` carries out of round ``round_index`` into its next round: its optimiser state and, under
    FedBN, its own normalisation layers (``{"round", "optimizer", "norm"}``, the weights codec)."""
    return f"{site_run_prefix(run_id, site)}round-{round_index:04d}/site-state.pt"


def parse_site_state_key(run_id: str, site: str, key: str) -> int | None:
    """The round of a :func:`site_state_key`; None for any other key."""
    match = re.fullmatch(rf"{re.escape(site_run_prefix(run_id, site))}round-(\d{{4,}})/site-state\.pt", key)
    return int(match.group(1)) if match else None


def parse_update_key(run_id: str, key: str) -> tuple[int, str, str] | None:
    """``federated/{run}/round-{r}/{site}/{attempt}/update.json`` → (r, site, attempt); None otherwise."""
    match = re.fullmatch(
        rf"{FEDERATED_PREFIX}/{re.escape(run_id)}/round-(\d{{4,}})/({SITE_PATTERN})/([^/]+)/update\.json", key
    )
    if match is None:
        return None
    return int(match.group(1)), match.group(2), match.group(3)


# --- inference requests: inputs and outputs of one segmentation request ---


def inference_prefix(request_id: str) -> str:
    return f"{INFERENCE_PREFIX}/{request_id}/"


def inference_input_key(request_id: str) -> str:
    return f"{inference_prefix(request_id)}input.nii.gz"


def inference_mask_key(request_id: str) -> str:
    return f"{inference_prefix(request_id)}mask.nii.gz"


def inference_seg_key(request_id: str) -> str:
    return f"{inference_prefix(request_id)}seg.dcm"


def inference_sr_key(request_id: str) -> str:
    """The DICOM SR measurement report (TID 1500, structure volumes), written with the SEG."""
    return f"{inference_prefix(request_id)}sr.dcm"


def inference_findings_key(request_id: str) -> str:
    return f"{inference_prefix(request_id)}findings.json"


# --- the Triton model repository ---


def triton_model_prefix(model_name: str) -> str:
    """``triton/{model}`` (no trailing slash): ``config.pbtxt`` and one folder per version below it."""
    return f"{TRITON_PREFIX}/{model_name}"
