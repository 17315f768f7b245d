"""``make demo``: the whole voxelflow story on the bundled data, with visible progress.

1. start the local stack (PostgreSQL, Redis, S3, Orthanc as the hospital PACS, MLflow, Triton, every service);
2. load the TCIA brain MR studies into Orthanc; voxelflow pulls them over DICOMweb and reconstructs volumes;
3. import the MSD hippocampus set, build a 3-site dataset version (splits, QC) and precompute it;
4. run a short federated training (FedAvg over 3 site workers), tracked in MLflow;
5. register the model, promote it through the gate, export it (ONNX + parity gate) and serve it on Triton;
6. segment each study's hippocampus-crop series, send the DICOM SEGs back to Orthanc;
7. print Dice on the test split, latency per study, the URLs, and write PNGs (curves, overlays).

Defaults are sized for a 2-core CPU (a few minutes); ``--full`` runs the long schedule. The demo is a client
of the platform: it talks to the services over HTTP only, with the same calls ``voxelflow datasets
import-msd`` and ``voxelflow models export`` make (:mod:`shared.client`). The stack keeps running
afterwards (``make down`` stops it).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from shared.auth import Role, create_token
from shared.client import ServiceClient, export_model, import_msd_folder
from shared.data import shared_data_dir
from shared.db.base import make_engine, make_session_factory, session_scope
from shared.stack import Stack, StackConfig
from shared.training.config import load_config

MODEL_NAME = "hippocampus"
SITES = ("site-1", "site-2", "site-3")
FINAL = ("succeeded", "failed", "rejected")  # states of a segmentation request that do not change any more
# what the services of the demo stack are told (before they start): the model they share, short poll intervals
DEMO_ENV = {
    "VOXELFLOW_SERIES_STABLE_SECONDS": "5",
    "VOXELFLOW_MODEL_NAME": MODEL_NAME,
    "VOXELFLOW_REGISTERED_MODEL_NAME": MODEL_NAME,
    "VOXELFLOW_ALIAS_POLL_SECONDS": "2",
    "VOXELFLOW_STACK_SITES": ",".join(SITES),
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # the demo prints its own progress, one line per step
}


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        sys.exit("demo data not found: put it at ../shared/data or set VOXELFLOW_SHARED_DATA")
    return found


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    sys.exit(f"[demo] timed out after {timeout:.0f} s waiting for {what}")


def checked(response: httpx.Response, *expected: int) -> Any:
    if response.status_code not in (expected or (200,)):
        sys.exit(f"[demo] {response.request.method} {response.request.url} → {response.status_code}: {response.text}")
    return response.json()


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        for key, value in DEMO_ENV.items():
            os.environ.setdefault(key, value)
        self.stack = Stack(StackConfig.from_env(), log=say)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ helpers
    def client(self, service: str, role: Role) -> httpx.Client:
        base = self.stack.components[service].url
        return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {self.tokens[role]}"}, timeout=300)

    def api(self, service: str, role: Role) -> ServiceClient:
        """The platform client the CLI uses, for one of the stack's services."""
        return ServiceClient(service, self.tokens[role], self.stack.components[f"{service}-api"].url, timeout=300)

    def step(self, number: int, text: str) -> None:
        say(f"{number}/7 {text}")

    # ------------------------------------------------------------------------------------------ steps
    def start_stack(self) -> None:
        self.step(1, "starting the local stack: PostgreSQL, Redis, S3, Orthanc, MLflow, Triton and every service")
        self.env = self.stack.up(with_services=True)
        self.session_factory = make_session_factory(make_engine(self.env["VOXELFLOW_DATABASE_URL"]))
        stamp = int(time.time())
        with session_scope(self.session_factory) as session:
            self.tokens = {role: create_token(session, f"demo-{role.value}-{stamp}", role) for role in Role}

    def pacs_to_volumes(self) -> None:
        self.step(2, "loading the TCIA brain MR studies into Orthanc (the PACS); voxelflow pulls them over DICOMweb")
        files = sorted(
            p for p in (data_dir() / "tcia_brain_tumor_progression_mr").rglob("*") if p.is_file() and p.suffix != ""
        )
        files = [p for p in files if p.name != "SHA256SUMS"] or files
        with httpx.Client(base_url=self.stack.orthanc_url, timeout=60) as pacs:
            for index, path in enumerate(files, 1):
                pacs.post("/instances", content=path.read_bytes()).raise_for_status()
                if index % 100 == 0 or index == len(files):
                    say(f"  PACS: {index}/{len(files)} instances loaded")
            studies = [s["0020000D"]["Value"][0] for s in pacs.get("/dicom-web/studies").json()]
        with self.client("ingest-api", Role.OPERATOR) as ingest:
            jobs = [
                checked(ingest.post("/pacs/orthanc/retrieve", json={"study_instance_uid": uid}), 200, 202)["id"]
                for uid in studies
            ]
            for job_id in jobs:

                def finished(job_id: str = job_id) -> dict[str, Any] | None:
                    job: dict[str, Any] = ingest.get(f"/pacs/jobs/{job_id}").json()
                    return job if job["status"] in ("done", "failed") else None

                job = wait_until(finished, 600, "pull jobs")
                say(f"  pull {job_id[:8]}: {job['status']}, {job['instances_stored']} stored")
            series = []
            for study in ingest.get("/dicomweb/studies").json():
                series += ingest.get(f"/dicomweb/studies/{study['0020000D']['Value'][0]}/series").json()

            def all_final() -> list[dict[str, Any]] | None:
                states = [ingest.get(f"/series/{s['0020000E']['Value'][0]}").json() for s in series]
                return states if all(s["status"] in ("volume", "flagged") for s in states) else None

            states = wait_until(all_final, 600, "series reconstruction")
        volumes = sum(s["status"] == "volume" for s in states)
        say(f"  {len(studies)} studies, {len(series)} series: {volumes} reconstructed into volumes")
        self.pacs_studies = studies

    def dataset(self) -> None:
        self.step(3, "importing the MSD hippocampus set; a 3-site dataset version (patient-level splits, QC); cache")
        started = time.monotonic()
        with self.api("preprocessing", Role.RESEARCHER) as preprocessing:
            imported = import_msd_folder(preprocessing, data_dir() / "msd_task04_hippocampus", "hippocampus")
        if imported["errors"]:
            sys.exit(f"[demo] the preprocessing service refused cases: {imported['errors']}")
        say(
            f"  uploaded {sum(imported['counts'].values())} cases ({imported['counts']}) "
            f"in {time.monotonic() - started:.1f} s"
        )
        body = {
            "name": "hippocampus-3sites",
            "collection": "hippocampus",
            "sites": {"strategy": "iid", "n_sites": len(SITES), "seed": 0},
            "splits": {"k_folds": 5, "seed": 0},
        }
        with self.client("preprocessing-api", Role.RESEARCHER) as pp:
            build_id = checked(pp.post("/datasets", json=body), 202)["id"]
            build = wait_until(
                lambda: (b := pp.get(f"/datasets/builds/{build_id}").json())["status"] in ("done", "failed") and b,
                300,
                "dataset build",
            )
            if build["status"] != "done":
                sys.exit(f"[demo] dataset build failed: {build}")
            self.version_id = build["version_id"]
            version = pp.get(f"/datasets/{self.version_id}").json()
            qc = pp.get(f"/datasets/{self.version_id}/qc").json()["report"]
            say(
                f"  version {self.version_id}: {version['case_count']} cases, sites {version['site_counts']}, "
                f"QC excluded {qc.get('n_excluded', 0)}"
            )
            job = checked(pp.post(f"/datasets/{self.version_id}/precompute", json={}), 200, 202)

            def precomputed() -> dict[str, Any] | None:
                state: dict[str, Any] = pp.get(f"/precompute/{job['id']}").json()
                return state if state.get("finished_at") else None

            state = wait_until(precomputed, 900, "preprocessing cache")
            say(f"  preprocessed cache: {state['computed']} computed, {state['cached']} already cached")

    def federated_training(self) -> None:
        rounds, epochs = self.args.rounds, self.args.local_epochs
        self.step(4, f"federated training: FedAvg, {len(SITES)} sites, {rounds} rounds x {epochs} local epochs")
        body = {
            "dataset_version": self.version_id,
            "sites": list(SITES),
            "rounds": rounds,
            "local_epochs": epochs,
            "strategy": "fedavg",
            # the bundled recipe (docs/training.md): its schedule spans rounds x local epochs
            "training_config": load_config(self.args.config).model_dump(mode="json"),
            "round_timeout_seconds": 3600,
        }
        started = time.monotonic()
        with self.client("aggregation-api", Role.OPERATOR) as agg:
            run = checked(agg.post("/federated-runs", json=body), 200, 201, 202)
            run_id = run["id"]
            reported: set[int] = set()

            def finished() -> dict[str, Any] | None:
                state: dict[str, Any] = agg.get(f"/federated-runs/{run_id}").json()
                for rnd in state.get("round_progress", []):
                    if rnd["status"] == "aggregated" and rnd["round"] not in reported:
                        reported.add(rnd["round"])
                        sites = ", ".join(
                            f"{s['site']} loss {s['metrics'].get('train_loss', float('nan')):.3f}"
                            for s in rnd["sites"]
                            if s["metrics"]
                        )
                        dice = rnd["metrics"].get("val_dice_mean", rnd["metrics"].get("val_dice"))
                        dice_text = f"{dice:.3f}" if isinstance(dice, int | float) else "n/a"
                        say(f"  round {rnd['round']}/{rounds}: {sites}; global val Dice {dice_text}")
                return state if state["status"] in ("succeeded", "failed", "cancelled") else None

            state = wait_until(finished, 6 * 3600, "the federated run", interval=3)
        if state["status"] != "succeeded":
            sys.exit(f"[demo] federated run {run_id} ended {state['status']}: {state.get('error')}")
        self.timings["training"] = time.monotonic() - started
        self.run = state
        say(f"  run {run_id} succeeded in {self.timings['training']:.0f} s (MLflow run {state['mlflow_run_id']})")

    def register_and_serve(self) -> None:
        self.step(5, "registry: the run's model version → gate → champion; export ONNX (parity gate) → Triton")
        with self.client("model-registry-api", Role.OPERATOR) as registry:
            versions = checked(registry.get(f"/models/{MODEL_NAME}/versions"))
            mine = [v for v in versions if v.get("tags", {}).get("federated_run_id") == self.run["id"]] or versions
            self.model_version = str(mine[0]["version"])
            detail = checked(registry.get(f"/models/{MODEL_NAME}/versions/{self.model_version}"))
            self.version_detail = detail
            self.model_uri = f"models:/{MODEL_NAME}/{self.model_version}"
            say(f"  registered {self.model_uri}, held-out test Dice {detail.get('tags', {}).get('test_dice', '?')}")
        started = time.monotonic()
        with self.api("inference", Role.OPERATOR) as inference:
            result = export_model(inference, {"model_uri": self.model_uri})["result"]
        parity = result["parity"]
        say(
            f"  export in {time.monotonic() - started:.0f} s: "
            f"parity max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
            f"Dice vs PyTorch {min(parity['per_case_dice']):.4f}; {result['tensorrt']['reason']}"
        )
        with self.client("model-registry-api", Role.OPERATOR) as registry:
            promoted = registry.post(f"/models/{MODEL_NAME}/versions/{self.model_version}/promote", json={})
            if promoted.status_code == 409:
                detail = promoted.json().get("detail", promoted.json())
                reasons = detail.get("reasons") if isinstance(detail, dict) else None
                say(f"  the promotion gate refused: {'; '.join(reasons) if reasons else detail}")
                say("  (a short CPU schedule; `--full` trains longer) promoting anyway as admin, audited with a reason")
                with self.client("model-registry-api", Role.ADMIN) as admin:
                    checked(
                        admin.post(
                            f"/models/{MODEL_NAME}/versions/{self.model_version}/promote",
                            json={"force": True, "reason": "make demo: short CPU schedule below the production gate"},
                        )
                    )
            else:
                checked(promoted)
        say(f"  {self.model_uri} is now @champion")
        with self.client("inference-api", Role.OPERATOR) as inference_http:

            def serving() -> dict[str, Any] | None:
                response = inference_http.get("/readyz")
                return response.json() if response.status_code == 200 else None

            wait_until(serving, 600, "the inference service to load the champion")
        backend = self.stack.components["inference-api"].env.get("VOXELFLOW_BACKEND")
        say(f"  inference serves {self.model_uri} (backend: {backend})")

    def segment_studies(self) -> None:
        self.step(6, "segmenting each study's hippocampus-crop series; DICOM SEG back to Orthanc")
        pacs_root = f"{self.stack.orthanc_url}/dicom-web"
        crops = []
        with httpx.Client(base_url=pacs_root, timeout=60) as pacs:
            for study in self.pacs_studies:
                for series in pacs.get(f"/studies/{study}/series").json():
                    description = series.get("0008103E", {}).get("Value", [""])[0]
                    modality = series.get("00080060", {}).get("Value", [""])[0]
                    if modality == "MR" and "crop" in description.lower():
                        crops.append((study, series["0020000E"]["Value"][0], description))
        self.results = []
        with self.client("inference-api", Role.OPERATOR) as inference:
            for study, series_uid, description in crops:
                url = f"{pacs_root}/studies/{study}/series/{series_uid}"
                started = time.monotonic()
                result = checked(
                    inference.post("/v1/segmentations", json={"dicomweb_series_url": url, "send_to_pacs": True}),
                    200,
                    202,
                )
                if result["status"] not in FINAL:

                    def finished(rid: str = result["request_id"]) -> dict[str, Any] | None:
                        state: dict[str, Any] = inference.get(f"/v1/segmentations/{rid}").json()
                        return state if state["status"] in FINAL else None

                    result = wait_until(
                        finished,
                        900,
                        "segmentation job",
                    )
                latency = time.monotonic() - started
                volumes = ", ".join(f"{f['name']} {f['volume_ml']:.2f} mL" for f in result.get("findings") or [])
                say(f"  {description or series_uid[-12:]}: {result['status']} in {latency:.1f} s; {volumes}")
                mask = inference.get(f"/v1/segmentations/{result['request_id']}/mask").content
                self.results.append(
                    {
                        "series": series_uid,
                        "description": description,
                        "study": study,
                        "latency": latency,
                        "mask": mask,
                        **result,
                    }
                )
        with httpx.Client(base_url=pacs_root, timeout=60) as pacs:
            segs = pacs.get("/series", params={"Modality": "SEG"}).json()
        say(f"  Orthanc now holds {len(segs)} SEG series")

    def report(self) -> None:
        self.step(7, "results")
        detail = self.version_detail
        per_case = detail.get("per_case_dice") or []
        test_dice = detail.get("tags", {}).get("test_dice")
        print()
        print(f"  model                {self.model_uri} (dataset {self.version_id})")
        print(f"  federated training   {self.args.rounds} rounds, {len(SITES)} sites, {self.timings['training']:.0f} s")
        test_dice = f"{float(test_dice):.3f}" if test_dice is not None else "n/a"
        print(f"  test-split Dice      {test_dice} over {len(per_case)} held-out cases (mean of labels)")
        for row in self.results:
            series = f"{row['description'] or 'series'} …{row['series'][-12:]}"
            print(f"  latency              {series}: {row['latency']:.2f} s")
        print(f"  MLflow UI            {self.stack.mlflow_uri}/#/models/{MODEL_NAME}")
        print(f"  Orthanc (PACS)       {self.stack.orthanc_url}/app/explorer.html")
        print()
        self.plots()

    def plots(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import nibabel as nib
        import numpy as np

        rounds = [r for r in self.run.get("round_progress", []) if r["sites"]]
        if rounds:
            figure, axis = plt.subplots(figsize=(6, 3.5))
            for site in SITES:
                losses = [
                    next((float(s["metrics"]["train_loss"]) for s in r["sites"] if s["site"] == site), float("nan"))
                    for r in rounds
                ]
                axis.plot([r["round"] for r in rounds], losses, marker="o", label=f"{site} train loss")
            dice = [r["metrics"].get("val_dice_mean", float("nan")) for r in rounds]
            twin = axis.twinx()
            twin.plot(
                [r["round"] for r in rounds], dice, color="black", linestyle="--", marker="s", label="global val Dice"
            )
            twin.set_ylim(0, 1)
            twin.set_ylabel("Dice")
            axis.set_xlabel("round")
            axis.set_ylabel("loss")
            axis.set_xticks([r["round"] for r in rounds])
            handles = axis.get_legend_handles_labels()
            extra = twin.get_legend_handles_labels()
            axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="center right")
            figure.tight_layout()
            figure.savefig(self.out / "training-curves.png", dpi=110)
            plt.close(figure)
        for row in self.results:
            raw = row["mask"]
            labels = np.asarray(
                nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).dataobj
            )
            image = self.source_volume(row["study"], row["series"])
            if image.shape != labels.shape:
                say(f"  no overlay for {row['series']}: mask {labels.shape} vs image {image.shape}")
                continue
            z = int(np.argmax((labels > 0).sum(axis=(0, 1)))) if labels.any() else labels.shape[2] // 2
            figure, axes = plt.subplots(1, 2, figsize=(6, 3.4))
            for axis, overlay in zip(axes, (False, True), strict=True):
                axis.imshow(image[:, :, z].T, cmap="gray", origin="lower")
                if overlay:
                    axis.imshow(np.ma.masked_equal(labels[:, :, z].T, 0), cmap="autumn", alpha=0.5, origin="lower")
                axis.axis("off")
            figure.suptitle(f"{MODEL_NAME} v{self.model_version}: series …{row['series'][-12:]}, slice {z}", fontsize=8)
            figure.tight_layout()
            path = self.out / f"overlay-{row['series'][-12:]}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
        say(f"PNGs (training curves, segmentation overlays): {self.out}/")

    def source_volume(self, study: str, series: str) -> Any:
        """The series as the PACS holds it (WADO-RS), as a volume on the mask's grid: highdicom's
        (slice, row, column) volume with its axes in the (column, row, slice) order the service writes."""
        import highdicom as hd
        import numpy as np
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(f"{self.stack.orthanc_url}/dicom-web")
        images = [ds for ds in client.retrieve_series(study, series) if "PixelData" in ds]
        volume = hd.get_volume_from_series(images, dtype=np.float32, rtol=0.01, orientation_tol=1e-4)
        return volume.permute_spatial_axes([2, 1, 0]).array


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="voxelflow demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="out/demo", help="where the PNGs go")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default sized for a 2-core CPU)")
    parser.add_argument("--local-epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--config", default="hippocampus_unet", help="bundled training config name or YAML path")
    parser.add_argument("--full", action="store_true", help="the long schedule: 20 rounds x 10 local epochs")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.local_epochs = 20, 10
    started = time.monotonic()
    demo = Demo(args)
    demo.start_stack()
    demo.pacs_to_volumes()
    demo.dataset()
    demo.federated_training()
    demo.register_and_serve()
    demo.segment_studies()
    demo.report()
    say(f"done in {time.monotonic() - started:.0f} s; the stack keeps running: `make down` stops it")


if __name__ == "__main__":  # `python -m shared.demo` = `voxelflow demo`: the CLI's one-line errors
    from shared.cli import main as cli_main

    cli_main(["demo", *sys.argv[1:]])
