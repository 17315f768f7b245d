#!/usr/bin/env python3
"""Whole-volume inference latency: Triton and embedded ONNX Runtime next to MONAI in PyTorch.

``make bench-inference`` (or ``python ci/bench_inference.py --volumes 8 --repeat 2``):

1. builds a MONAI UNet (random weights: speed does not depend on training) and exports it to ONNX with
   ``services.inference.export`` (parity-checked on the benchmark volumes before anything is timed);
2. starts a private stack (SeaweedFS S3 + tritonserver from .venv-triton) on a free port range in a temp
   state dir, writes the Triton model repository to S3 and loads it through the model-control API;
3. runs the same real MSD hippocampus volumes (z-scored) through three paths, on the same machine in the
   same run: ``SlidingWindowPredictor`` over ``TritonBackend`` (gRPC), ``SlidingWindowPredictor`` over
   ``OnnxRuntimeBackend`` (in process) — the inference service's code path — and plain
   ``monai.inferers.sliding_window_inference`` on the PyTorch network;
4. prints p50/p99 latency per volume and volumes/s with the ratio to PyTorch, and writes
   ``out/bench-inference.json``. PyTorch and ONNX Runtime use CUDA when a GPU is present (Triton then gets
   KIND_GPU instances); the thread count is the same for every path (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402

from services.inference.backends import TritonBackend  # noqa: E402
from services.inference.export import export_onnx, parity_check  # noqa: E402
from services.inference.triton_repository import config_from_onnx, write_model_version  # noqa: E402
from shared.data import shared_data_dir  # noqa: E402
from shared.inference import InferenceBackend, OnnxRuntimeBackend, SlidingWindowPredictor  # noqa: E402
from shared.stack import PortOffsets, Stack, StackConfig  # noqa: E402
from shared.stack.process import port_in_use  # noqa: E402
from shared.storage import open_object_store  # noqa: E402

MODEL = "bench-hippocampus"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_volumes(count: int) -> list[np.ndarray]:
    data = shared_data_dir()
    if data is None:
        raise SystemExit("shared data not found: set VOXELFLOW_SHARED_DATA or provide ../shared/data")
    paths = sorted((data / "msd_task04_hippocampus" / "imagesTr").glob("*.nii.gz"))[:count]
    volumes = []
    for path in paths:
        nifti = nib.load(path)
        assert isinstance(nifti, nib.Nifti1Image)
        image = nifti.get_fdata(dtype=np.float32)
        volumes.append(((image - image.mean()) / (image.std() + 1e-6))[None])
    return volumes


def time_path(
    predict: Callable[[np.ndarray], torch.Tensor], volumes: list[np.ndarray], repeat: int, warmup: int
) -> list[float]:
    for volume in volumes[:warmup]:
        predict(volume)
    latencies = []
    for _ in range(repeat):
        for volume in volumes:
            start = time.perf_counter()
            predict(volume)
            latencies.append(time.perf_counter() - start)
    return latencies


def summarise(name: str, latencies: list[float]) -> dict[str, float | str | int]:
    values = np.asarray(latencies)
    return {
        "path": name,
        "volumes": len(values),
        "p50_ms": float(np.percentile(values, 50) * 1000),
        "p99_ms": float(np.percentile(values, 99) * 1000),
        "volumes_per_s": float(len(values) / values.sum()),
    }


def free_base_port() -> int:
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(33000, 60000 - PortOffsets.SPAN, 10)
        if not any(port_in_use(base + offset) for offset in range(PortOffsets.SPAN)):
            return base
    raise SystemExit("no free port range found")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8, help="hippocampus volumes (default 8)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes over the volumes (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed volumes per path first (default 2)")
    parser.add_argument("--roi", default="32,32,32", help="sliding-window size (default 32,32,32)")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--channels", default="16,32,64", help="UNet channels (default 16,32,64)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every path (default 2)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton path")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "out" / "bench-inference.json")
    args = parser.parse_args(argv)

    roi = tuple(int(s) for s in args.roi.split(","))
    channels = tuple(int(c) for c in args.channels.split(","))
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    network = UNet(3, 1, 3, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=2).eval()
    volumes = load_volumes(args.volumes)
    log(
        f"{len(volumes)} volumes, shapes {sorted({v.shape[1:] for v in volumes})[:3]}..., window {roi}, device {device}"
    )

    results = []
    with tempfile.TemporaryDirectory(prefix="vf-bench-inference-") as tmp:
        work = Path(tmp)
        onnx_path = export_onnx(network, 1, roi, work / "model.onnx")
        report = parity_check(network, onnx_path, volumes[:2])
        log(f"parity: {report.summary()}")
        if not report.passed:
            raise SystemExit("the exported model does not reproduce PyTorch; not benchmarking it")

        gpu_net = network.to(device)

        def pytorch(volume: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                out = sliding_window_inference(
                    torch.from_numpy(volume)[None].to(device),
                    roi,
                    args.sw_batch_size,
                    gpu_net,
                    overlap=args.overlap,
                    mode="gaussian",
                )
            assert isinstance(out, torch.Tensor)
            return out.cpu()

        def through(backend: InferenceBackend) -> SlidingWindowPredictor:
            return SlidingWindowPredictor(backend, roi, args.sw_batch_size, args.overlap)

        embedded = OnnxRuntimeBackend(intra_op_threads=args.threads)
        embedded.load(MODEL, 1, onnx_path)
        log("timing PyTorch (MONAI sliding_window_inference)")
        results.append(summarise("pytorch-monai", time_path(pytorch, volumes, args.repeat, args.warmup)))
        log("timing embedded ONNX Runtime")
        results.append(
            summarise("onnxruntime-embedded", time_path(through(embedded), volumes, args.repeat, args.warmup))
        )

        if not args.no_triton:
            stack = Stack(StackConfig(state_dir=work / "stack", base_port=free_base_port(), ephemeral=True), log=log)
            try:
                stack.up(only=["s3", "triton"])
                store = open_object_store(stack.storage_url(stack.config.app_bucket))
                config = config_from_onnx(
                    onnx_path,
                    MODEL,
                    instance_kind="KIND_GPU" if gpu else "KIND_CPU",
                    max_batch_size=max(8, args.sw_batch_size),
                    preferred_batch_sizes=(args.sw_batch_size,),
                    parameters={"intra_op_threads": str(args.threads)},
                )
                write_model_version(store, config, 1, onnx_path)
                triton = TritonBackend(stack.triton_url, repository_dir=stack.triton_model_repository, store=store)
                triton.load(MODEL, 1)
                log("timing Triton (gRPC, Python backend running ONNX Runtime)")
                results.append(summarise("triton-grpc", time_path(through(triton), volumes, args.repeat, args.warmup)))
                triton.unload()
                triton.close()
            finally:
                stack.down(purge=True)

    base = next(r for r in results if r["path"] == "pytorch-monai")
    for row in results:
        row["speedup_vs_pytorch"] = float(row["volumes_per_s"]) / float(base["volumes_per_s"])
    print(f"\n{'path':<22} {'volumes':>7} {'p50 ms':>9} {'p99 ms':>9} {'vol/s':>8} {'x PyTorch':>10}")
    for row in results:
        print(
            f"{row['path']:<22} {row['volumes']:>7} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} "
            f"{row['volumes_per_s']:>8.2f} {row['speedup_vs_pytorch']:>10.2f}"
        )
    meta = {
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
        "threads": args.threads,
        "roi": roi,
        "channels": channels,
        "sw_batch_size": args.sw_batch_size,
        "overlap": args.overlap,
        "parity_max_abs_logit_diff": report.max_abs_logit_diff,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    log(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
