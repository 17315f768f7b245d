#!/usr/bin/env python3
"""Whole-volume inference latency: the service's paths (ONNX Runtime, INT8, Triton) next to MONAI in PyTorch.

``make bench-inference`` (or ``python ci/bench_inference.py --volumes 8 --repeat 2``), two cases:

- ``hippocampus``: real MSD hippocampus volumes (z-scored, ~36x50x38) with a small UNet (16-32-64) and a
  32³ window (``--roi``, ``--channels``);
- ``ct-512``: one 512x512xN CT (``--ct-slices``, default 100) built from the bundled TotalSegmentator CT
  series (20 real 512x512 slices, mirrored along z until N), HU clipped to [-1000, 1000] and scaled to
  [-1, 1], with a production-sized CT UNet (16-32-64-128-256, 96³ windows); ``--ct-slices 0`` skips it.

For each case the script builds the UNet (random weights: speed does not depend on training), exports it
to ONNX (``services.inference.export``), quantises it to INT8 (static QDQ, calibrated on windows of the
case's volumes, ``shared.inference.quantize``), serves the fp32 ONNX from a private tritonserver (SeaweedFS
S3 + tritonserver from .venv-triton, model-control API) and times, per volume and interleaved (each
volume through every path before the next, so load from other work on a shared machine hits every path
alike): plain ``monai.inferers.sliding_window_inference`` on the PyTorch network, and the inference
service's ``SlidingWindowPredictor`` over ``OnnxRuntimeBackend`` (fp32 and INT8), over ``OpenVinoBackend``
(fp32 and bf16) and over ``TritonBackend`` (gRPC). Every path gets the same model, volumes, window,
overlap, Gaussian blending, ``--sw-batch-size`` and ``--threads``, and none spin-waits between calls
(PyTorch's OpenMP included: ``OMP_WAIT_POLICY=PASSIVE``). Each path's logits are compared with
PyTorch's (max |diff|, label agreement Dice); an fp32 path that does not reproduce PyTorch fails the run.

It prints p50/p99 per volume, volumes/s, CPU time per volume and the ratios to PyTorch, model sizes, and
the peak RSS of an inference worker (a fresh process: ONNX Runtime backend + predictor + argmax) on the
ct-512 volume, and writes ``out/bench-inference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The same thread behaviour for every path: ONNX Runtime and OpenVINO are set not to spin-wait between calls,
# so PyTorch's OpenMP pool must not either (read once when torch loads libgomp, hence before the import). With
# its default busy-waiting on a machine whose cores are shared, the baseline was 4-5x slower in wall time and
# burnt 5x the CPU time (docs/inference-backends.md): a speed-up against that would measure the spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402

from services.inference.backends import TritonBackend  # noqa: E402
from services.inference.export import export_onnx, label_dice  # noqa: E402
from services.inference.triton_repository import config_from_onnx, write_model_version  # noqa: E402
from shared.data import shared_data_dir  # noqa: E402
from shared.inference import (  # noqa: E402
    InferenceBackend,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    SlidingWindowPredictor,
)
from shared.inference.quantize import calibration_windows, quantize_int8  # noqa: E402
from shared.stack import PortOffsets, Stack, StackConfig  # noqa: E402
from shared.stack.process import port_in_use  # noqa: E402
from shared.storage import open_object_store  # noqa: E402

#: fp32 paths must reproduce PyTorch this closely, relative to the largest |logit| (a deep 5-level UNet with
#: random weights has logits in the tens, and fused kernels round differently), and keep the labels
LOGIT_TOLERANCE = 1e-3
MIN_LABEL_DICE = 0.99
#: OpenVINO fp32 is held to the same labels but a looser logit bound: on the CT volume's air-only windows
#: (constant input, so instance norm divides rounding noise by sqrt(eps)) its fused MVN differs from PyTorch
#: by ~3e-3 of the logit range (ONNX Runtime by ~1e-3 there); elsewhere it agrees to ~1e-5
PATH_LOGIT_TOLERANCE = {"openvino-embedded": 1e-2}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def zscore(image: np.ndarray) -> np.ndarray:
    return ((image - image.mean()) / (image.std() + 1e-6)).astype(np.float32)


def load_hippocampus(count: int) -> list[np.ndarray]:
    data = shared_data_dir()
    if data is None:
        raise SystemExit("shared data not found: set VOXELFLOW_SHARED_DATA or provide ../shared/data")
    paths = sorted((data / "msd_task04_hippocampus" / "imagesTr").glob("*.nii.gz"))[:count]
    volumes = []
    for path in paths:
        nifti = nib.load(path)
        assert isinstance(nifti, nib.Nifti1Image)
        volumes.append(zscore(nifti.get_fdata(dtype=np.float32))[None])
    return volumes


def load_ct_volume(slices: int) -> np.ndarray:
    """``(1, 512, 512, slices)`` float32: the bundled CT series mirrored along z, HU in [-1000, 1000] → [-1, 1]."""
    import pydicom

    data = shared_data_dir()
    if data is None:
        raise SystemExit("shared data not found: set VOXELFLOW_SHARED_DATA or provide ../shared/data")
    datasets = [pydicom.dcmread(p) for p in sorted((data / "totalsegmentator_ct_example" / "dicom").glob("CT.*"))]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    series = np.stack(
        [d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets], -1
    )
    volume = np.empty((1, *series.shape[:2], slices), np.float32)
    forth_and_back = np.concatenate([series, series[..., ::-1]], axis=-1)  # mirrored: no seam at the joins
    for start in range(0, slices, forth_and_back.shape[-1]):
        chunk = forth_and_back[..., : slices - start]
        volume[0, ..., start : start + chunk.shape[-1]] = chunk
    np.clip(volume, -1000, 1000, out=volume)
    volume /= 1000.0
    return volume


def summarise(name: str, latencies: list[float], cpu_times: list[float]) -> dict[str, float | str | int]:
    values = np.asarray(latencies)
    return {
        "path": name,
        "volumes": len(values),
        # CPU seconds of this process (all its threads) per volume: what other load on the machine changes
        # least; for Triton only the client's share (the server is another process)
        "cpu_p50_ms": float(np.percentile(cpu_times, 50) * 1000),
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def proc_status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process (Linux); unlike ``ru_maxrss``, not inherited through fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker_rss(onnx_path: Path, volume_path: Path, roi: tuple[int, ...], sw_batch_size: int, threads: int) -> dict:
    """Peak RSS of a fresh process that does what the inference worker does with one volume."""
    command = [sys.executable, __file__, "--rss-child", str(onnx_path), str(volume_path)]
    command += ["--roi", ",".join(map(str, roi)), "--sw-batch-size", str(sw_batch_size), "--threads", str(threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_child(onnx_path: Path, volume_path: Path, roi: tuple[int, ...], sw_batch_size: int, threads: int) -> None:
    """The inference worker's memory on one volume: backend loaded, volume in, logits out, labels."""
    from shared.inference import argmax_labels

    torch.set_num_threads(threads)
    backend = OnnxRuntimeBackend(intra_op_threads=threads)
    backend.load("rss", 1, onnx_path)
    predictor = SlidingWindowPredictor(backend, roi, sw_batch_size, 0.25)
    warm = torch.zeros(sw_batch_size, 1, *roi)
    predictor._predict_windows(warm)  # the session's arena holds one batch's activations from here on
    del warm
    before = proc_status_mib("VmRSS")
    volume = np.load(volume_path)
    with torch.inference_mode():
        logits = predictor(volume)
        classes = int(logits.shape[1])
        labels = argmax_labels(logits[0]).to(torch.uint8)
        del logits
    voxels = int(labels.numel())
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"rss_before_mib": before, "peak_rss_mib": peak, "voxels": voxels, "classes": classes}))


def rss_budget_bytes_per_voxel(classes: int) -> float:
    """What one voxel may cost the worker at its peak: the float32 input, K float32 logits, MONAI's float32
    count map, the argmax (int64, then float32 for the inverse transforms, then uint8), with half again for
    transients (window batches, allocator slack). A whole-volume float64 copy alone would add 8 bytes."""
    return 1.5 * (4 + 4 * classes + 4 + 8 + 4 + 1)


def run_case(
    case: str,
    network: torch.nn.Module,
    volumes: list[np.ndarray],
    roi: tuple[int, int, int],
    args: argparse.Namespace,
    repeat: int,
    warmup_batches: int,
    work: Path,
    stack: Stack | None,
) -> tuple[list[dict], dict]:
    """Time every path on ``volumes`` (interleaved per volume); returns the rows and the case's meta."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = 0  # set from the first output
    onnx_path = export_onnx(network, 1, roi, work / f"{case}.onnx")
    sizes = {"pytorch-monai": onnx_path.stat().st_size, "onnxruntime-embedded": onnx_path.stat().st_size}
    network = network.to(device)

    def pytorch(volume: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            out = sliding_window_inference(
                torch.from_numpy(volume)[None].to(device),
                roi,
                args.sw_batch_size,
                network,
                overlap=args.overlap,
                mode="gaussian",
            )
        assert isinstance(out, torch.Tensor)
        return out.cpu()

    def through(backend: InferenceBackend) -> SlidingWindowPredictor:
        return SlidingWindowPredictor(backend, roi, args.sw_batch_size, args.overlap)

    paths: dict[str, Callable[[np.ndarray], torch.Tensor]] = {"pytorch-monai": pytorch}
    embedded = OnnxRuntimeBackend(intra_op_threads=args.threads)
    embedded.load(case, 1, onnx_path)
    paths["onnxruntime-embedded"] = through(embedded)
    if not args.no_openvino:
        # the same ONNX file compiled by OpenVINO: fp32 (held to PyTorch like ONNX Runtime) and bf16 (AMX)
        for name, precision in (("openvino-embedded", "f32"), ("openvino-bf16", "bf16")):
            if precision == "bf16" and args.no_bf16:
                continue
            openvino = OpenVinoBackend(threads=args.threads, precision=precision)
            openvino.load(case, 1, onnx_path)
            paths[name] = through(openvino)
            sizes[name] = onnx_path.stat().st_size
    if not args.no_int8:
        int8_path = quantize_int8(onnx_path, work / f"{case}-int8.onnx", calibration_windows(volumes, roi))
        int8 = OnnxRuntimeBackend(intra_op_threads=args.threads)
        int8.load(case, 1, int8_path)
        paths["onnxruntime-int8"] = through(int8)
        sizes["onnxruntime-int8"] = int8_path.stat().st_size
    triton = None
    if stack is not None:
        store = open_object_store(stack.storage_url(stack.config.app_bucket))
        config = config_from_onnx(
            onnx_path,
            case,
            instance_kind="KIND_GPU" if device.type == "cuda" else "KIND_CPU",
            max_batch_size=max(8, args.sw_batch_size),
            preferred_batch_sizes=(args.sw_batch_size,),
            parameters={"intra_op_threads": str(args.threads)},
        )
        write_model_version(store, config, 1, onnx_path)
        triton = TritonBackend(stack.triton_url, repository_dir=stack.triton_model_repository, store=store)
        triton.load(case, 1)
        paths["triton-grpc"] = through(triton)
        sizes["triton-grpc"] = onnx_path.stat().st_size

    # warm every path up on a few window batches (session set-up, thread pools, gRPC channel), not on volumes
    warm = torch.from_numpy(np.stack([w[0] for w in calibration_windows(volumes[:1], roi, args.sw_batch_size)]))
    for predict in paths.values():
        for _ in range(warmup_batches):
            if isinstance(predict, SlidingWindowPredictor):
                predict._predict_windows(warm)
            else:
                with torch.no_grad():
                    network(warm.to(device))
        if isinstance(predict, SlidingWindowPredictor):  # and every remainder batch size the volumes need
            for shape in {v.shape[1:] for v in volumes}:
                predict.warm_up(shape, int(volumes[0].shape[0]))

    latencies: dict[str, list[float]] = {name: [] for name in paths}
    cpu_times: dict[str, list[float]] = {name: [] for name in paths}
    max_diff = dict.fromkeys(paths, 0.0)
    logit_scale = 1.0
    agreement: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for rep in range(repeat):
        for index, volume in enumerate(volumes):
            shift = (rep * len(volumes) + index) % len(order)  # rotate who goes first
            outputs = {}
            for name in order[shift:] + order[:shift]:
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs[name] = paths[name](volume)
                latencies[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
            if rep == 0:
                reference = outputs["pytorch-monai"][0]
                classes = int(reference.shape[0])
                ref_labels = reference.argmax(0).numpy()
                logit_scale = max(logit_scale, float(reference.abs().max()))
                for name, logits in outputs.items():
                    max_diff[name] = max(max_diff[name], float((logits[0] - reference).abs().max()))
                    agreement[name].append(label_dice(ref_labels, logits[0].argmax(0).numpy(), classes))
            log(f"  {case} volume {index + 1}/{len(volumes)} pass {rep + 1}/{repeat}")
            del outputs

    for name in ("onnxruntime-embedded", "openvino-embedded", "triton-grpc"):
        if name in max_diff and (
            max_diff[name] > PATH_LOGIT_TOLERANCE.get(name, LOGIT_TOLERANCE) * logit_scale
            or min(agreement[name]) < MIN_LABEL_DICE
        ):
            raise SystemExit(
                f"{case}: {name} does not reproduce PyTorch (max |logit diff| {max_diff[name]:.3g} for logits up "
                f"to {logit_scale:.3g}, label Dice {min(agreement[name]):.4f})"
            )
    rows = []
    for name in paths:
        row = summarise(name, latencies[name], cpu_times[name])
        row.update(
            case=case,
            model_bytes=sizes[name],
            max_abs_logit_diff=max_diff[name],
            min_label_dice_vs_pytorch=min(agreement[name]),
        )
        rows.append(row)
    if triton is not None:
        triton.unload()
        triton.close()
    meta = {
        "roi": roi,
        "classes": classes,
        "volume_shapes": sorted({v.shape[1:] for v in volumes}),
        "max_abs_logit": logit_scale,
    }
    return rows, {"onnx_path": onnx_path, **meta}


def window(text: str) -> tuple[int, int, int]:
    """``"96,96,96"`` → ``(96, 96, 96)``."""
    x, y, z = (int(s) for s in text.split(","))
    return x, y, z


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8, help="hippocampus volumes (default 8)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes over the hippocampus volumes (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed window batches per path first (default 2)")
    parser.add_argument("--roi", default="32,32,32", help="hippocampus sliding-window size (default 32,32,32)")
    parser.add_argument("--sw-batch-size", type=int, default=8, help="windows per backend call, every path (8)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--channels", default="16,32,64", help="hippocampus UNet channels (default 16,32,64)")
    parser.add_argument("--ct-slices", type=int, default=100, help="ct-512 volume depth (default 100; 0: skip)")
    parser.add_argument("--ct-roi", default="96,96,96", help="ct-512 window (default 96,96,96)")
    parser.add_argument("--ct-channels", default="16,32,64,128,256", help="ct-512 UNet channels")
    parser.add_argument("--ct-repeat", type=int, default=1, help="timed passes over the ct-512 volume (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every path (default 2)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton path")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 path")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO paths")
    parser.add_argument("--no-bf16", action="store_true", help="skip the OpenVINO bf16 path")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "out" / "bench-inference.json")
    parser.add_argument("--rss-child", nargs=2, type=Path, metavar=("ONNX", "VOLUME_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        onnx_file, volume_file = args.rss_child
        rss_child(onnx_file, volume_file, window(args.roi), args.sw_batch_size, args.threads)
        return 0

    load_start = os.getloadavg()[0]
    roi = window(args.roi)
    ct_roi = window(args.ct_roi)
    gpu = torch.cuda.is_available()
    torch.set_num_threads(args.threads)

    def unet(channels: str, out_channels: int) -> torch.nn.Module:
        torch.manual_seed(0)
        widths = tuple(int(c) for c in channels.split(","))
        return UNet(3, 1, out_channels, channels=widths, strides=(2,) * (len(widths) - 1), num_res_units=2).eval()

    results: list[dict] = []
    metas: dict[str, dict] = {}
    rss: dict | None = None
    with tempfile.TemporaryDirectory(prefix="vf-bench-inference-") as tmp:
        work = Path(tmp)
        stack = None
        if not args.no_triton:
            stack = Stack(StackConfig(state_dir=work / "stack", base_port=free_base_port(), ephemeral=True), log=log)
        try:
            if stack is not None:
                stack.up(only=["s3", "triton"])
            hippocampus = load_hippocampus(args.volumes)
            log(f"hippocampus: {len(hippocampus)} volumes, window {roi}, sw_batch_size {args.sw_batch_size}")
            rows, meta = run_case(
                "hippocampus", unet(args.channels, 3), hippocampus, roi, args, args.repeat, args.warmup, work, stack
            )
            results += rows
            metas["hippocampus"] = meta
            if args.ct_slices:
                ct = load_ct_volume(args.ct_slices)
                log(f"ct-512: volume {ct.shape[1:]}, window {ct_roi}")
                rows, meta = run_case(
                    "ct-512", unet(args.ct_channels, 2), [ct], ct_roi, args, args.ct_repeat, 1, work, stack
                )
                results += rows
                metas["ct-512"] = meta
                np.save(work / "ct.npy", ct)
                rss = worker_rss(meta["onnx_path"], work / "ct.npy", ct_roi, args.sw_batch_size, args.threads)
        finally:
            if stack is not None:
                stack.down(purge=True)

    print(
        f"\n{args.threads} threads per path, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    for case in metas:
        rows = [r for r in results if r["case"] == case]
        base = next(r for r in rows if r["path"] == "pytorch-monai")
        fp32 = next(r for r in rows if r["path"] == "onnxruntime-embedded")
        for row in rows:
            row["speedup_vs_pytorch"] = float(row["volumes_per_s"]) / float(base["volumes_per_s"])
            # the ratio of medians: what a shared, noisy machine changes least
            row["p50_speedup_vs_pytorch"] = float(base["p50_ms"]) / float(row["p50_ms"])
            row["speedup_vs_onnx_fp32"] = float(row["volumes_per_s"]) / float(fp32["volumes_per_s"])
            row["cpu_speedup_vs_pytorch"] = float(base["cpu_p50_ms"]) / float(row["cpu_p50_ms"])
        print(
            f"\n{case}: volumes {metas[case]['volume_shapes'][:3]}, window {metas[case]['roi']}, "
            f"logits up to {metas[case]['max_abs_logit']:.3g}"
        )
        print(
            f"{'path':<22} {'volumes':>7} {'p50 ms':>9} {'p99 ms':>9} {'vol/s':>8} {'x PyTorch':>10} "
            f"{'x PT p50':>8} {'x ONNX':>7} {'cpu ms':>8} {'x PT cpu':>8} {'MB':>6} {'max|dlogit|':>11} "
            f"{'Dice vs PT':>10}"
        )
        for row in rows:
            print(
                f"{row['path']:<22} {row['volumes']:>7} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} "
                f"{row['volumes_per_s']:>8.2f} {row['speedup_vs_pytorch']:>10.2f} "
                f"{row['p50_speedup_vs_pytorch']:>8.2f} {row['speedup_vs_onnx_fp32']:>7.2f} "
                f"{row['cpu_p50_ms']:>8.1f} {row['cpu_speedup_vs_pytorch']:>8.2f} "
                f"{row['model_bytes'] / 1e6:>6.2f} {row['max_abs_logit_diff']:>11.2g} "
                f"{row['min_label_dice_vs_pytorch']:>10.4f}"
            )
    if rss is not None:
        grown = (rss["peak_rss_mib"] - rss["rss_before_mib"]) * 2**20 / rss["voxels"]
        budget = rss_budget_bytes_per_voxel(int(rss["classes"]))
        print(
            f"\ninference worker on the ct-512 volume: peak RSS {rss['peak_rss_mib']:.0f} MiB "
            f"({rss['rss_before_mib']:.0f} MiB with the model loaded, +{grown:.1f} bytes per voxel; "
            f"budget {budget:.1f}: " + ("within" if grown <= budget else "OVER") + ")"
        )
        rss.update(bytes_per_voxel=grown, budget_bytes_per_voxel=budget)
    meta_out = {
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start_end": (load_start, os.getloadavg()[0]),
        "sw_batch_size": args.sw_batch_size,
        "overlap": args.overlap,
        "cases": {k: {kk: vv for kk, vv in v.items() if kk != "onnx_path"} for k, v in metas.items()},
        "worker_rss": rss,
        "bench_peak_rss_mib": peak_rss_mib(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta_out, "results": results}, indent=2, default=str))
    log(f"written to {args.json}")
    if rss is not None and rss["bytes_per_voxel"] > rss["budget_bytes_per_voxel"]:
        log("the inference worker's peak memory is over its budget (a whole-volume copy crept in?)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
