"""Prediction time per case on the CPU: network vs everything else, and peak RAM.

    python benchmarks/predict_time.py [--threads 2] [--wait-minutes 30] [--cases 3]

One real LA case of ../shared/data/la2018_h5, cropped/padded to 192 x 140 x 88 (x, y, z) and
written as NIfTI (0.625 mm), is predicted by ``predict_cases`` (what ``versemi_predict`` runs)
with a randomly initialised network of the size the plan gives LA (target spacing 0.625 mm, U-Net
features 32-64-128-256-320-320, the plan's patch), each run in a fresh subprocess:

- mirroring on, one case, as versemi_predict runs by default (``--precision auto``, reading and
  writing in the background);
- mirroring off, ``--cases`` copies of the case, once with reading/writing in the background and
  once one stage after another (how prediction ran before), so the overlap is measured in one run;
- bf16 against fp32 (mirroring off, one case), only where the CPU has native bf16 units.

Timed: the network (everything inside the sliding window, mirroring included:
``ensemble_probabilities``) and everything else (wall time minus the network: discovering and
checking the input, reading, the preprocessing pipeline, resampling back, threshold, un-crop,
writing), with the time each of those steps took (in background threads they overlap the
network); peak RAM is the subprocess's ru_maxrss (after the model is built, and at the end).
Target: other / network <= 15 %.

Before timing, it waits (up to ``--wait-minutes``) until no ``versemi_train`` process runs, printing
the load average; if one still runs it times anyway and says so. Prints a table and writes
``benchmarks/_work/predict_time.json``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H5 = REPO.parent / "shared" / "data" / "la2018_h5"
SHAPE_XYZ = (192, 140, 88)
SPACING = 0.625
FEATURES = [32, 64, 128, 256, 320, 320]
# wall time per case of the earlier version (benchmarks/RESULTS.md, 2026-11-25, under load): the speed target's reference
RECORDED_WALL_S = {"on": 474.3, "off": 72.8}
BUSY_PATTERN = "versemi_" + "train"  # built, so this script's own command line never matches it


# ----- the input case -----
def pick_case() -> tuple[str, tuple[int, int, int]]:
    """The train.list case whose (x, y, z) shape is closest to SHAPE_XYZ."""
    import h5py

    ids = [line.strip() for line in (H5 / "train.list").read_text(encoding="utf-8").splitlines() if line.strip()]
    best = None
    for case_id in ids:
        with h5py.File(H5 / case_id / "mri_norm2.h5", "r") as f:
            shape = tuple(f["image"].shape)
        distance = sum(abs(a - b) for a, b in zip(shape, SHAPE_XYZ))
        if best is None or distance < best[0]:
            best = (distance, case_id, shape)
    return best[1], best[2]


def fit(array, shape):
    """Centre-crop or edge-pad ``array`` to ``shape``."""
    import numpy as np

    for axis, (have, want) in enumerate(zip(array.shape, shape)):
        if have > want:
            start = (have - want) // 2
            array = np.take(array, range(start, start + want), axis=axis)
        elif have < want:
            pad = [(0, 0)] * array.ndim
            pad[axis] = ((want - have) // 2, want - have - (want - have) // 2)
            array = np.pad(array, pad, mode="edge")
    return array


def write_case(folder: Path) -> tuple[Path, str, tuple[int, int, int]]:
    import h5py
    import numpy as np

    from versemi.datasets.io import Geometry, write_image

    case_id, shape = pick_case()
    with h5py.File(H5 / case_id / "mri_norm2.h5", "r") as f:
        image = fit(f["image"][()].astype(np.float32), SHAPE_XYZ)
    path = folder / "input" / "la_0000.nii.gz"
    geometry = Geometry((SPACING,) * 3, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(image.transpose(2, 1, 0), geometry, path)  # h5 (x, y, z) -> (z, y, x)
    return path, case_id, shape


# ----- the plan and model -----
def la_plan():
    """A plan as versemi_plan_and_preprocess makes for LA (median shape of the 80 cases)."""
    import h5py
    import numpy as np

    from versemi.plans.topology import plan_patch_and_topology

    shapes = []
    for case_id in (H5 / "train.list").read_text(encoding="utf-8").split():
        with h5py.File(H5 / case_id / "mri_norm2.h5", "r") as f:
            shapes.append(f["image"].shape[::-1])
    median = np.median(np.array(shapes), axis=0)
    topology = plan_patch_and_topology([SPACING] * 3, median, 1, 8.0)
    network = topology.network_plan("unet")
    assert network["features"] == FEATURES, network["features"]
    plans = {"experiment": "LA-timing", "in_channels": 1, "num_prompts": 2, "synthetic_prompt": 1,
             "prompts": [{"index": 0, "dataset": "LA", "label": "left_atrium", "label_value": 1},
                         {"index": 1, "dataset": None, "label": "synthetic", "label_value": None}],
             "datasets": {"LA": {"target_spacing": [SPACING] * 3,
                                 "normalization": [{"channel": "MRI", "scheme": "zscore",
                                                    "use_nonzero_mask": False}]}}}
    return plans, topology.patch_size, network


def worker(cases: list[Path], mirroring: bool, threads: int, background: bool, precision: str) -> dict:
    import torch

    from versemi.inference import predictor, sliding_window
    from versemi.nets import build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plans, patch, network_plan = la_plan()
    network = build_network(network_plan, 1, plans["num_prompts"]).eval()
    ensemble = predictor.Ensemble(plans, "3d_fullres", [predictor.FoldModel("all", Path("-"), "random", network,
                                                                            list(patch))], torch.device("cpu"),
                                  precision)
    with torch.no_grad():  # warm-up: the first convolution of a process sets up its kernels
        network(torch.zeros(1, 1, *[2 * d for d in network.divisor]), torch.zeros(1, 1, dtype=torch.long))
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    timings: dict[str, float] = {}
    windows = {"count": 0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def count_windows(function):
        def wrapper(network, *args, **kwargs):
            def forward(x, prompts):
                windows["count"] += x.shape[0]
                return network(x, prompts)
            return function(forward, *args, **kwargs)
        return wrapper

    # network: all of ensemble_probabilities (sliding window, mirroring, stitching)
    predictor.ensemble_probabilities = timed("network", predictor.ensemble_probabilities)
    sliding_window.sliding_window_probabilities = count_windows(sliding_window.sliding_window_probabilities)
    for name in ("read_image", "crop_to_nonzero", "network_grid", "resize_probabilities", "uncrop", "write_image",
                 "_header_problems", "_discover"):
        setattr(predictor, name, timed(name, getattr(predictor, name)))
    output = cases[0].parent.parent / f"output_{'mirror' if mirroring else 'plain'}_{background}_{precision}"
    started = time.perf_counter()
    predictor.predict_cases(cases, output, "LA", ensemble, mirroring=mirroring, overwrite=True, show_progress=False,
                            background_io=background)
    total = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    network_s = timings.pop("network")
    return {"mirroring": mirroring, "cases": len(cases), "background_io": background, "precision": precision,
            "patch": list(patch), "features": network_plan["features"], "forward_windows": windows["count"],
            "total_s": total, "network_s": network_s, "other_s": total - network_s, "other_parts_s": timings,
            "peak_rss_mb": peak_kb / 1024, "rss_after_model_mb": baseline_kb / 1024, "threads": threads}


# ----- the driver -----
def busy() -> list[str]:
    found = subprocess.run(["pgrep", "-f", BUSY_PATTERN], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if int(pid) != os.getpid()]


def wait_until_idle(minutes: float) -> bool:
    deadline = time.time() + minutes * 60
    while True:
        pids = busy()
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        if not pids:
            print(f"no {BUSY_PATTERN} process runs; load average {load}", flush=True)
            return True
        if time.time() >= deadline:
            print(f"still busy after {minutes:g} min ({BUSY_PATTERN} pids {' '.join(pids)}); timing anyway, load "
                  f"average {load}", flush=True)
            return False
        print(f"waiting: {BUSY_PATTERN} running (pids {' '.join(pids)}), load average {load}", flush=True)
        time.sleep(min(60.0, max(1.0, deadline - time.time())))


def run_worker(cases: list[Path], mirroring: bool, background: bool, precision: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--precision", precision,
               "--mirroring", "on" if mirroring else "off", "--background", "on" if background else "off",
               "--case", *map(str, cases)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"mirroring {'on' if mirroring else 'off'}, {len(cases)} case(s), background I/O "
          f"{'on' if background else 'off'}, {precision}: {result['total_s']:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--wait-minutes", type=float, default=30.0)
    parser.add_argument("--cases", type=int, default=3, help="copies of the case in the runs without mirroring")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mirroring", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--background", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.case, args.mirroring == "on", args.threads, args.background == "on",
                                args.precision)))
        return
    if not H5.is_dir():
        sys.exit(f"skipped: real LA data not found at {H5} (this benchmark needs ../shared/data/la2018_h5 beside "
                 "the checkout)")
    from versemi.model.precision import cpu_has_bf16

    with tempfile.TemporaryDirectory(prefix="predict_time_") as tmp:
        case, case_id, shape = write_case(Path(tmp))
        copies = [case] + [case.with_name(f"la{i}_0000.nii.gz") for i in range(1, args.cases)]
        for copy in copies[1:]:
            shutil.copyfile(case, copy)
        print(f"case {case_id}: h5 shape {shape} (x, y, z) cropped/padded to {SHAPE_XYZ}, {SPACING} mm", flush=True)
        idle = wait_until_idle(args.wait_minutes)
        load_before = os.getloadavg()
        runs = [([case], True, True, "auto"), (copies, False, False, "auto"), (copies, False, True, "auto")]
        if cpu_has_bf16():
            runs += [([case], False, True, "fp32"), ([case], False, True, "bf16")]
        results = [run_worker(cases, mirroring, background, precision, args.threads)
                   for cases, mirroring, background, precision in runs]
        load_after = os.getloadavg()
    first = results[0]
    print(f"\nplan: LA-like, target spacing {SPACING} mm, patch {first['patch']} (z, y, x), U-Net features "
          f"{first['features']}, random weights; CPU, {args.threads} threads; load average "
          f"{', '.join(f'{v:.2f}' for v in load_before)} before, {', '.join(f'{v:.2f}' for v in load_after)} after"
          f"{'' if idle else ' (a versemi_train run shared the CPU)'}")
    if not cpu_has_bf16():
        print("bf16: this CPU has no native bf16 units (AMX, AVX512-BF16), so --precision auto runs fp32 and bf16 "
              "is not timed")
    print("| mirroring | cases | background I/O | precision | windows x flips per case | network s per case | "
          "other s per case | other / network | wall s per case | peak RAM MB (after model) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        n = r["cases"]
        print(f"| {'on' if r['mirroring'] else 'off'} | {n} | {'on' if r['background_io'] else 'off'} | "
              f"{r['precision']} | {r['forward_windows'] // n} | {r['network_s'] / n:.1f} | {r['other_s'] / n:.2f} | "
              f"{100 * r['other_s'] / r['network_s']:.1f} % | {r['total_s'] / n:.1f} | {r['peak_rss_mb']:.0f} "
              f"({r['rss_after_model_mb']:.0f}) |")
    print("\nsteps outside the network, summed over the cases (s; in background threads they overlap it):")
    for r in results:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["other_parts_s"].items(), key=lambda kv: -kv[1]))
        print(f"  mirroring {'on' if r['mirroring'] else 'off'}, background {'on' if r['background_io'] else 'off'}, "
              f"{r['precision']}: {parts}")
    serial, overlapped = results[1], results[2]
    print(f"\nbackground I/O: wall time {overlapped['total_s']:.1f} s against {serial['total_s']:.1f} s one stage "
          f"after another ({serial['total_s'] / overlapped['total_s']:.3f}x) for {serial['cases']} cases")
    for r in results:
        before = RECORDED_WALL_S["on" if r["mirroring"] else "off"]
        print(f"mirroring {'on' if r['mirroring'] else 'off'}, {r['precision']}, background "
              f"{'on' if r['background_io'] else 'off'}: wall per case {r['total_s'] / r['cases']:.1f} s, "
              f"{before / (r['total_s'] / r['cases']):.2f}x faster than the recorded {before:.1f} s "
              "(recorded under load; target 2x)")
    verdict = all(r["other_s"] / r["network_s"] <= 0.15 for r in results)
    print(f"\ntarget other/network <= 15 %: {'PASS' if verdict else 'FAIL'}")
    target = REPO / "benchmarks" / "_work" / "predict_time.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"case": case_id, "source_shape_xyz": shape, "shape_xyz": SHAPE_XYZ,
                                  "load_before": load_before, "load_after": load_after, "idle": idle,
                                  "results": results}, indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
