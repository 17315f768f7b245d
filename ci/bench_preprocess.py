#!/usr/bin/env python3
"""Preprocessing throughput: voxelflow's cached pipeline next to a plain MONAI pipeline, same cases, same run.

``make bench-preprocess`` (or ``python ci/bench_preprocess.py --limit 40``):

1. starts a private S3 (SeaweedFS) through :mod:`shared.stack` on a free port range in a temp state dir and
   uploads the raw hippocampus cases content-addressed (untimed: that is ingest's/import's work);
2. **plain MONAI**: ``LoadImaged → EnsureChannelFirstd → Orientationd → Spacingd → NormalizeIntensityd →
   DivisiblePadd`` (the steps of ``mr_hippocampus``, written out by hand) over the local files through a
   MONAI ``Dataset`` + ``DataLoader``, one epoch; every epoch of a plain pipeline costs this again;
3. **voxelflow, first build**: ``preprocess_cases`` (download from S3, verify sha256, preprocess, upload the
   ``.pt``) and then one epoch of ``CachedCaseDataset`` through ``ThreadDataLoader`` read back from S3;
4. **voxelflow, cached rerun**: a fresh process's view: ``preprocess_cases`` finds every key (a ``stat``
   each) and a new ``CachedCaseDataset`` reads every case from S3 once;
5. **voxelflow, in-memory epoch**: the next epoch of that dataset (what every further training epoch costs).

Prints cases/s with the ratio to plain MONAI and writes ``out/bench-preprocess.json``. The outputs of both
pipelines are compared on the first case, so the numbers are for the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from shared.data import shared_data_dir  # noqa: E402

DATASET = "msd_task04_hippocampus"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Row:
    pipeline: str
    cases: int
    seconds: float
    cases_per_s: float
    ratio: float | None = None


def plain_monai_epoch(pairs: list[dict[str, str]]) -> tuple[float, dict]:
    """The pipeline a MONAI user writes by hand; returns (seconds for one epoch, first item)."""
    import monai.transforms as mt
    from monai.data import DataLoader, Dataset

    keys = ["image", "label"]
    transform = mt.Compose(
        [
            mt.LoadImaged(keys=keys, image_only=True),
            mt.EnsureChannelFirstd(keys=keys),
            mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            mt.Spacingd(keys=keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
            mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            mt.DivisiblePadd(keys=keys, k=16),
        ]
    )
    loader = DataLoader(Dataset(pairs, transform), batch_size=1, num_workers=0)
    start = time.perf_counter()
    first = None
    for batch in loader:
        first = first or batch
    return time.perf_counter() - start, first


def cached_epoch(loader) -> tuple[float, dict]:
    start = time.perf_counter()
    first = None
    for batch in loader:
        first = first or batch
    return time.perf_counter() - start, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="number of cases (default: all 208)")
    parser.add_argument("--workers", type=int, default=2, help="threads of preprocess_cases (S3 + compute overlap)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "bench-preprocess.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    root = shared_data_dir()
    if root is None or not (root / DATASET).is_dir():
        raise SystemExit(f"shared data with {DATASET}/ not found: set VOXELFLOW_SHARED_DATA")
    images = sorted((root / DATASET / "imagesTr").glob("*.nii.gz"))
    if args.limit:
        images = images[: args.limit]
    pairs = [{"image": str(p), "label": str(p.parent.parent / "labelsTr" / p.name)} for p in images]

    from shared.datasets import CaseRecord, make_loader, preprocess_cases, store_case_file
    from shared.preprocessing import load_spec
    from shared.stack import Stack, StackConfig
    from shared.storage import open_object_store
    from tests.conftest import free_base_port

    spec = load_spec("mr_hippocampus")
    state = Path(tempfile.mkdtemp(prefix="vf-bench-pp-"))
    stack = Stack(StackConfig(state_dir=state / "stack", base_port=free_base_port(), ephemeral=True), log=log)
    rows: list[Row] = []
    try:
        log(f"starting private S3 in {state}")
        stack.up(only=["s3"])
        client = stack.minio_client()
        if not client.bucket_exists("bench"):
            client.make_bucket("bench")
        store = open_object_store(stack.storage_url("bench"))

        log(f"uploading {len(pairs)} raw cases (untimed)")
        cases = []
        for pair in pairs:
            image_key, image_sha = store_case_file(store, pair["image"])
            label_key, label_sha = store_case_file(store, pair["label"])
            case_id = Path(pair["image"]).name.removesuffix(".nii.gz")
            cases.append(
                CaseRecord(
                    case_id=case_id,
                    patient=case_id,
                    site="bench",
                    modality="MR",
                    image_key=image_key,
                    label_key=label_key,
                    image_sha256=image_sha,
                    label_sha256=label_sha,
                    source=f"msd:imagesTr/{case_id}.nii.gz",
                )
            )
        n = len(cases)

        log("plain MONAI pipeline, one epoch")
        seconds, plain_first = plain_monai_epoch(pairs)
        rows.append(Row("plain MONAI (per epoch)", n, seconds, n / seconds))

        log("voxelflow first build: preprocess_cases + one epoch from S3")

        def progress(done: int, total: int, case_id: str, outcome: str) -> None:
            if done % 25 == 0 or done == total:
                log(f"  {done}/{total} {outcome}")

        start = time.perf_counter()
        built = preprocess_cases(store, cases, spec, progress=progress, workers=args.workers)
        loader = make_loader(store, cases, spec.hash, batch_size=1, shuffle=False)
        _, cached_first = cached_epoch(loader)
        seconds = time.perf_counter() - start
        if built.failed or built.built != n:
            raise SystemExit(f"first build did not build every case: {built.failed or built.built}")
        rows.append(Row("voxelflow first build", n, seconds, n / seconds))

        log("voxelflow cached rerun: preprocess_cases (all cached) + new dataset read from S3")
        start = time.perf_counter()
        rerun = preprocess_cases(store, cases, spec, workers=args.workers)
        loader = make_loader(store, cases, spec.hash, batch_size=1, shuffle=False, prefetch=True)
        cached_epoch(loader)
        seconds = time.perf_counter() - start
        if rerun.cached != n:
            raise SystemExit(f"rerun rebuilt cases: {rerun}")
        rows.append(Row("voxelflow cached rerun", n, seconds, n / seconds))

        log("voxelflow in-memory epoch")
        seconds, _ = cached_epoch(loader)
        rows.append(Row("voxelflow in-memory epoch", n, seconds, n / seconds))

        same = torch.equal(plain_first["image"].as_tensor(), cached_first["image"]) and torch.equal(
            plain_first["label"].as_tensor().to(torch.uint8), cached_first["label"]
        )
        if not same:
            raise SystemExit("plain MONAI and voxelflow outputs differ on the first case: the comparison is unfair")
    finally:
        stack.down(purge=True)

    base = rows[0].cases_per_s
    for row in rows:
        row.ratio = row.cases_per_s / base
    header = f"{'pipeline':<28} {'cases':>6} {'seconds':>8} {'cases/s':>8} {'vs plain':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.pipeline:<28} {r.cases:>6} {r.seconds:>8.2f} {r.cases_per_s:>8.1f} {r.ratio:>7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "spec": spec.name,
        "pipeline_hash": spec.hash,
        "cases": len(pairs),
        "workers": args.workers,
        "torch_threads": args.threads,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
        "outputs_identical_on_first_case": True,
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
