"""Prediction on a CPU by backend: eager PyTorch against OpenVINO (``versemi_predict --backend``),
and ONNX Runtime, measured here only, with the masks compared.

    python benchmarks/predict_backends.py --checkpoint RUN/fold_all/checkpoint_final.pth \\
        --images WORK/raw/LA/imagesTs --cases 4 [--threads 2] [--window]

Part 1, a trained model on real cases: each backend and precision in a fresh subprocess predicts
the first ``--cases`` images of ``--images`` (in their own geometry, mirroring off, as
``versemi_predict --no-mirroring``) with ``predict_cases``. Timed: the conversion (OpenVINO:
convert, agreement check and compile, from an empty cache; ONNX Runtime: export and session) and
the wall time per case after it. Each mask is compared with eager fp32 torch's (Dice per case).

Part 2 (``--window``): one batch-2 window through the network that the plan gives LA at full
resolution (U-Net 32-64-128-256-320-320, patch of ``predict_time.la_plan``, random weights), the
size a GPU-sized plan runs at on a CPU.

Runs one after another, in the order torch fp32, the others, torch fp32 again, and reports each
backend's time against the mean of the two torch fp32 runs. Prints tables; writes
``benchmarks/_work/predict_backends.json``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONNX_NOTE = "ONNX Runtime, benchmark only"


# ----- ONNX Runtime, measured but not offered by versemi_predict -----
class OnnxRuntimeNetwork:
    """The network exported to ONNX and run by an ONNX Runtime session, called like the network."""

    def __init__(self, network, patch_size, in_channels: int, folder: Path, threads: int) -> None:
        import onnxruntime
        import torch

        from versemi.inference.cpu_runtime import _WholeNetwork

        path = folder / "model.onnx"
        example = (torch.zeros(1, in_channels, *patch_size), torch.zeros(1, 1, dtype=torch.long))
        torch.onnx.export(_WholeNetwork(network).eval(), example, str(path), input_names=["images", "prompts"],
                          output_names=["logits"], dynamic_axes={"images": {0: "b"}, "prompts": {0: "b", 1: "k"},
                                                                 "logits": {0: "b", 1: "k"}}, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images, prompts):
        import numpy as np
        import torch

        matrix = prompts[:, None] if prompts.dim() == 1 else prompts
        logits = self.session.run(None, {"images": np.ascontiguousarray(images.float().numpy()),
                                         "prompts": matrix.numpy().astype(np.int64)})[0]
        logits = torch.from_numpy(logits)
        return logits[:, 0] if prompts.dim() == 1 else logits


def put_on_backend(ensemble, backend: str, precision: str, threads: int, scratch: Path) -> str:
    """Set the ensemble's precision and backend; returns a description."""
    from versemi.inference.cpu_runtime import use_backend

    ensemble.precision = precision
    if backend == "onnxruntime":
        for model in ensemble.models:
            model.network = OnnxRuntimeNetwork(model.network, model.patch_size, ensemble.in_channels, scratch, threads)
        return ONNX_NOTE
    return use_backend(ensemble, backend)


# ----- part 1: a trained model on real cases (worker) -----
def case_worker(checkpoint: Path, images: list[Path], output: Path, backend: str, precision: str, threads: int) -> dict:
    import torch

    from versemi.inference import load_models, predict_cases

    torch.set_num_threads(threads)
    ensemble = load_models(checkpoint)
    prompt = ensemble.plans["prompts"][0]["dataset"]  # the first dataset's structure
    started = time.perf_counter()
    description = put_on_backend(ensemble, backend, precision, threads, output.parent)
    conversion = time.perf_counter() - started
    started = time.perf_counter()
    predict_cases(images, output, prompt, ensemble, mirroring=False, overwrite=True, show_progress=False)
    wall = time.perf_counter() - started
    return {"backend": backend, "precision": precision, "description": description, "conversion_s": conversion,
            "wall_s_per_case": wall / len(images), "cases": len(images)}


# ----- part 2: one window of the full-resolution LA network (worker) -----
def window_worker(backend: str, precision: str, threads: int, scratch: Path) -> dict:
    import torch

    import predict_time
    from versemi.inference import load_models  # noqa: F401  (the package imported before use_backend's)
    from versemi.inference.models import Ensemble, FoldModel
    from versemi.inference.sliding_window import inference_dtype
    from versemi.nets import build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plans, patch, network_plan = predict_time.la_plan()
    network = build_network(network_plan, 1, plans["num_prompts"]).eval()
    checkpoint = scratch / "random_weights.pth"
    if not checkpoint.exists():
        torch.save(network.state_dict(), checkpoint)  # the cache is keyed by this file's digest
    ensemble = Ensemble(plans, "3d_fullres", [FoldModel("all", checkpoint, "random", network, list(patch))],
                        torch.device("cpu"))
    started = time.perf_counter()
    description = put_on_backend(ensemble, backend, precision, threads, scratch)
    conversion = time.perf_counter() - started
    runner = ensemble.models[0].network
    generator = torch.Generator().manual_seed(1)
    window = torch.randn(2, 1, *patch, generator=generator)
    prompts = torch.zeros(2, 1, dtype=torch.long)
    dtype = inference_dtype(precision, torch.device("cpu")) if backend == "torch" else None
    seconds = []
    with torch.no_grad():
        for _ in range(3):  # the first call of a process sets up kernels: the median of 3 counts
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = runner(window, prompts)
            seconds.append(time.perf_counter() - started)
    probabilities = torch.softmax(logits.float(), dim=2)[:, :, 1]
    torch.save(probabilities, scratch / f"window_{backend}_{precision}.pt")
    return {"backend": backend, "precision": precision, "description": description, "conversion_s": conversion,
            "window_s": sorted(seconds)[1], "patch": list(patch), "features": network_plan["features"]}


# ----- the driver -----
def run(arguments: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        [str(REPO / "benchmarks"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--worker", *arguments, "--threads", str(threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def configurations(onnx: bool) -> list[tuple[str, str]]:
    from versemi.model.precision import cpu_has_bf16

    found = [("torch", "fp32")]
    if cpu_has_bf16():
        found.append(("torch", "bf16"))
    found.append(("openvino", "fp32"))
    if cpu_has_bf16():
        found.append(("openvino", "bf16"))
    if onnx:
        found.append(("onnxruntime", "fp32"))
    return found + [("torch", "fp32")]


def dice(a, b) -> float:
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * float((a & b).sum()) / total


def part_cases(args, scratch: Path, order) -> list[dict]:
    from versemi.datasets.io import read_image

    images = sorted(args.images.glob("*_0000.*"))[: args.cases]
    if not images:
        sys.exit(f"no images CASE_0000.ext in {args.images}")
    cache = args.checkpoint.parent / f"{args.checkpoint.name}.openvino"
    if cache.exists():
        shutil.rmtree(cache)  # conversion timed from an empty cache
    results = []
    for i, (backend, precision) in enumerate(order):
        output = scratch / f"cases_{i}_{backend}_{precision}"
        output.mkdir()
        result = run(["--part", "cases", "--backend", backend, "--precision", precision, "--checkpoint",
                      str(args.checkpoint), "--output", str(output), "--image", *map(str, images)], args.threads)
        result["masks"] = {p.name: read_image([p])[0][0] > 0 for p in sorted(output.glob("*.nii.gz"))}
        print(f"{backend} {precision}: {result['wall_s_per_case']:.2f} s per case "
              f"(conversion {result['conversion_s']:.1f} s)", flush=True)
        results.append(result)
    reference = results[0]["masks"]
    for result in results:
        result["dice_vs_torch_fp32"] = {name: dice(reference[name], mask) for name, mask in result.pop("masks").items()}
    return results


def part_window(args, scratch: Path, order) -> list[dict]:
    import torch

    results = []
    for backend, precision in order:
        result = run(["--part", "window", "--backend", backend, "--precision", precision, "--output", str(scratch)],
                     args.threads)
        print(f"window, {backend} {precision}: {result['window_s']:.2f} s (conversion {result['conversion_s']:.1f} s)",
              flush=True)
        results.append(result)
    reference = torch.load(scratch / "window_torch_fp32.pt")
    for result in results:
        other = torch.load(scratch / f"window_{result['backend']}_{result['precision']}.pt")
        result["max_probability_difference"] = float((other - reference).abs().max())
        result["voxels_disagreeing"] = float(((other > 0.5) != (reference > 0.5)).float().mean())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained versemi checkpoint (part 1)")
    parser.add_argument("--images", type=Path, help="folder of CASE_0000.ext images for it (part 1)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--window", action="store_true", help="also part 2: one window of the full-resolution network")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("cases", "window"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.part == "cases":
            result = case_worker(args.checkpoint, args.image, args.output, args.backend, args.precision, args.threads)
        else:
            result = window_worker(args.backend, args.precision, args.threads, args.output)
        print(json.dumps(result))
        return
    if args.checkpoint is None and not args.window:
        sys.exit("give --checkpoint and --images (part 1), --window (part 2), or both")
    try:
        import onnxruntime  # noqa: F401
        onnx = True
    except ImportError:
        onnx = False
        print("ONNX Runtime is not installed (pip install onnxruntime): its rows are left out")
    order = configurations(onnx)
    load_before = os.getloadavg()
    report: dict = {"cpu": cpu_name(), "threads": args.threads, "load_before": load_before}
    with tempfile.TemporaryDirectory(prefix="predict_backends_") as tmp:
        if args.checkpoint is not None:
            report["cases"] = part_cases(args, Path(tmp), order)
        if args.window:
            report["window"] = part_window(args, Path(tmp), order)
    report["load_after"] = os.getloadavg()
    print(f"\nCPU {report['cpu']}, {args.threads} threads, load average {load_before[0]:.2f} before, "
          f"{report['load_after'][0]:.2f} after")
    for part, key, unit in (("cases", "wall_s_per_case", "s per case"), ("window", "window_s", "s per window")):
        if part not in report:
            continue
        rows = report[part]
        reference = (rows[0][key] + rows[-1][key]) / 2
        print(f"\n| backend ({part}) | precision | {unit} | speed-up vs torch fp32 | conversion s | agreement |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            if part == "cases":
                values = list(row["dice_vs_torch_fp32"].values())
                agreement = f"Dice min {min(values):.4f} over {len(values)} case(s)"
            else:
                agreement = (f"{100 * row['voxels_disagreeing']:.3f} % voxels differ, max |dp| "
                             f"{row['max_probability_difference']:.4f}")
            print(f"| {row['backend']} | {row['precision']} | {row[key]:.2f} | {reference / row[key]:.2f}x | "
                  f"{row['conversion_s']:.1f} | {agreement} |")
    target = REPO / "benchmarks" / "_work" / "predict_backends.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {target}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
