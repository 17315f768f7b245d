"""``make demo``: the voxelflow story so far, end to end on the bundled data, with visible progress.

Starts the local stack (PostgreSQL, Redis, S3, Orthanc as the hospital PACS, and the ingest API,
worker and DICOM receiver), loads the TCIA brain MR studies into Orthanc, has voxelflow pull them over
DICOMweb, waits until every series is reconstructed into a volume or flagged, prints what happened,
and writes a PNG of each reconstructed hippocampus-crop volume. The stack keeps running afterwards so
the results can be explored (``make down`` stops it). It talks to the services only over HTTP.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import httpx

from shared.auth import Role, create_token
from shared.data import shared_data_dir
from shared.db.base import make_engine, make_session_factory, session_scope
from shared.stack import Stack, StackConfig
from shared.storage import open_object_store

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ["postgres", "redis", "s3", "orthanc", "ingest-api", "ingest-worker", "ingest-dimse"]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        sys.exit("demo data not found: put it at ../shared/data or set VOXELFLOW_SHARED_DATA")
    return found


def load_into_pacs(orthanc_url: str, folder: Path) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    with httpx.Client(base_url=orthanc_url, timeout=60) as pacs:
        for index, path in enumerate(files, 1):
            pacs.post("/instances", content=path.read_bytes()).raise_for_status()
            if index % 50 == 0 or index == len(files):
                say(f"  PACS: {index}/{len(files)} instances loaded")
        studies = pacs.get("/dicom-web/studies").json()
    return [study["0020000D"]["Value"][0] for study in studies]


def wait_until(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    sys.exit(f"[demo] timed out after {timeout:.0f} s waiting for {what}")


def render_png(volume_bytes: bytes, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(gzip.decompress(volume_bytes))
    data = image.get_fdata()
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for axis, (name, plane) in zip(
        axes,
        (
            ("sagittal", data[data.shape[0] // 2, :, :]),
            ("coronal", data[:, data.shape[1] // 2, :]),
            ("axial", data[:, :, data.shape[2] // 2]),
        ),
        strict=True,
    ):
        axis.imshow(plane.T, cmap="gray", origin="lower")
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo", help="where the PNGs go")
    args = parser.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VOXELFLOW_SERIES_STABLE_SECONDS", "5")

    stack = Stack(StackConfig.from_env(), log=say)
    say("1/5 starting the local stack (PostgreSQL, Redis, S3, Orthanc PACS, ingest API/worker/receiver)")
    env = stack.up(only=COMPONENTS)
    api = stack.components["ingest-api"].url

    say("2/5 loading the TCIA brain MR studies into Orthanc (the hospital PACS)")
    studies = load_into_pacs(stack.orthanc_url, data_dir() / "tcia_brain_tumor_progression_mr")
    say(f"  PACS holds {len(studies)} studies")

    session_factory = make_session_factory(make_engine(env["VOXELFLOW_DATABASE_URL"]))
    with session_scope(session_factory) as session:
        token = create_token(session, f"demo-operator-{int(time.time())}", Role.OPERATOR)
    client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=120)

    say("3/5 voxelflow pulls every study from the PACS over DICOMweb (QIDO-RS + WADO-RS)")
    jobs = [client.post("/pacs/orthanc/retrieve", json={"study_instance_uid": uid}).json()["id"] for uid in studies]
    for job_id in jobs:
        job = wait_until(
            lambda job_id=job_id: (
                (j := client.get(f"/pacs/jobs/{job_id}").json())["status"] in ("done", "failed") and j
            ),
            600,
            "pull jobs",
        )
        say(f"  pull {job_id[:8]}: {job['status']}, {job['instances_stored']} stored, {job['instances_failed']} failed")

    say("4/5 waiting until every series is complete and reconstructed (or flagged)")
    series = []
    for study in client.get("/dicomweb/studies").json():
        study_uid = study["0020000D"]["Value"][0]
        series += client.get(f"/dicomweb/studies/{study_uid}/series").json()

    def all_final():  # type: ignore[no-untyped-def]
        states = [client.get(f"/series/{s['0020000E']['Value'][0]}").json() for s in series]
        return states if all(state["status"] in ("volume", "flagged") for state in states) else None

    states = wait_until(all_final, 600, "series reconstruction")

    say("5/5 results")
    store = open_object_store(env["VOXELFLOW_STORAGE_URL"])
    print(f"\n{'series #':>8} {'modality':<8} {'patient (pseudonym)':<30} {'n':>3}  {'status':<8} detail")
    for info, state in zip(series, states, strict=True):
        number = info.get("00200011", {}).get("Value", ["?"])[0]
        modality = info.get("00080060", {}).get("Value", ["?"])[0]
        detail = state["non_volumetric_reason"] or ""
        if state["volumes"]:
            volume = state["volumes"][0]
            detail = (
                f"{'x'.join(map(str, volume['shape']))} voxels @ "
                + "x".join(f"{s:.2f}" for s in volume["spacing_mm"])
                + " mm"
            )
        pseudonym = client.get(f"/dicomweb/studies/{state['study_instance_uid']}/metadata").json()[0]
        patient = pseudonym.get("00100020", {}).get("Value", ["?"])[0]
        print(f"{number:>8} {modality:<8} {patient:<30} {state['instance_count']:>3}  {state['status']:<8} {detail}")
        if state["volumes"]:
            png = out / f"{patient}-series{number}.png"
            render_png(store.get_bytes(state["volumes"][0]["key"]), png, f"{patient} series {number} ({detail})")
    print()
    say(f"PNG views (sagittal/coronal/axial) of every reconstructed volume: {out}/")
    say(f"ingest API (OpenAPI): {api}/docs    Orthanc (PACS): {stack.orthanc_url}/app/explorer.html")
    say(f"done in {time.monotonic() - started:.0f} s; the stack keeps running: `make down` stops it")


if __name__ == "__main__":
    main()
