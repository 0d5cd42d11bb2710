#!/usr/bin/env python3
"""Benchmark: versemi_plan_and_preprocess against nnU-Net v2's nnUNetv2_plan_and_preprocess.

Measures wall time and peak RAM (summed RSS of the whole process tree, sampled every 50 ms from
/proc, so no psutil is needed) of fingerprint + plan + preprocessing cache on the same raw LA
dataset (80 cases converted from the h5 files), and of our run on the synthetic demo datasets.
Then compares the results: target spacing (must be identical) and the foreground intensity
0.5 / 99.5 percentiles (ours within 1 % of nnU-Net's).

    python benchmarks/preprocess.py [--h5 PATH] [--workdir benchmarks/_work] [--np 2]
                                    [--skip-nnunet] [--skip-real] [--repeat N]

nnU-Net lives in its own virtual environment, benchmarks/.venv-nnunet (created on first use).
Every run starts cold: its output folders are deleted first, so no fingerprint is reused.
The figures go to <workdir>/preprocess_results.json, each command's output to <workdir>/logs/.
The conversion h5 -> NIfTI is timed separately and is not part of the compared figures.
Timings are wall-clock on a shared machine: the load average is recorded next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAIN_BIN = REPO / ".venv" / "bin"
NNUNET_VENV = REPO / "benchmarks" / ".venv-nnunet"
# torch is pinned in both installs: unpinned, nnunetv2's dependencies (timm -> torchvision) pull
# the newest torch and several GB of CUDA packages.
TORCH_SPEC, NNUNET_SPEC = "torch==2.13.0", "nnunetv2==2.8.1"
NNUNET_ID, NNUNET_NAME = 1, "Dataset001_LA"
LA, DEMOS = "LA", ("DemoLA", "DemoPancreas")
SAMPLE_INTERVAL_S = 0.05
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# targets
MAX_TIME_RATIO, MAX_RAM_RATIO, MAX_PERCENTILE_REL_DIFF = 0.5, 1.0, 0.01
PERCENTILES = ("percentile_00_5", "percentile_99_5")


# ---------------------------------------------------------------- run and measure

@dataclass
class Measurement:
    name: str
    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # the compared figure: max over time of the tree's summed RSS
    peak_processes: int  # processes in the tree at that moment
    max_single_rss_bytes: int  # largest RSS of any one process (what /usr/bin/time -v reports)
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, RSS in bytes) of every process, read from /proc/<pid>/stat."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # fields from 'state' on (the name may hold spaces)
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[21]) * PAGE_SIZE)
    return table


def tree_rss(root: int) -> tuple[int, int, int]:
    """Summed RSS, process count and largest single RSS of `root` and all its descendants.

    A descendant is found through its parent chain, or through its session id: the command is
    started in its own session, so workers whose parent has died (re-parented) still count.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    members = {root} | {pid for pid, (_, sid, _) in table.items() if sid == root}
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    members &= table.keys()
    sizes = [table[pid][2] for pid in members]
    return sum(sizes), len(sizes), max(sizes, default=0)


def run_measured(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Measurement:
    """Run `command`, output to <log_dir>/<name>.log; sample the process tree's RSS meanwhile."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    print(f"  running {name}: {' '.join(command)}", flush=True)
    peak, peak_procs, single = 0, 0, 0
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                rss, count, largest = tree_rss(proc.pid)
                single = max(single, largest)
                if rss > peak:
                    peak, peak_procs = rss, count
                time.sleep(SAMPLE_INTERVAL_S)
        except BaseException:  # Ctrl-C: its own session would outlive us, so end its process group
            os.killpg(proc.pid, signal.SIGTERM)
            raise
        wall = time.perf_counter() - start
    result = Measurement(name, command, proc.returncode, wall, peak, peak_procs, single, str(log_path))
    status = "ok" if result.ok else f"FAILED (exit {proc.returncode}), see {log_path}"
    print(f"    {wall:7.1f} s  {peak / 1e9:5.2f} GB peak  {status}", flush=True)
    if not result.ok:
        print(_tail(log_path), file=sys.stderr)
    return result


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join("      | " + line for line in text[-lines:])


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- nnU-Net environment

def ensure_nnunet_env(log_dir: Path, venv: Path = NNUNET_VENV) -> dict | None:
    """Create the nnU-Net virtual environment unless it exists; return the setup timings if created."""
    if (venv / "bin" / "nnUNetv2_plan_and_preprocess").is_file():
        return None
    print(f"creating the nnU-Net environment {venv} (about a minute)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = {
        "venv": ["python3", "-m", "venv", str(venv)],
        "torch": pip + [TORCH_SPEC],
        "nnunetv2": pip + [NNUNET_SPEC, TORCH_SPEC],
        # compile every module now: a fresh venv otherwise spends ~20 s of the first timed run on it
        "compileall": [str(venv / "bin" / "python"), "-m", "compileall", "-q", "-j", "0",
                       str(_site_packages(venv))],
    }
    timings = {}
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "nnunet_setup.log", "wb") as log:
        for step, command in steps.items():
            start = time.perf_counter()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            timings[f"{step}_s"] = round(time.perf_counter() - start, 1)
            if done.returncode and step != "compileall":
                raise RuntimeError(f"nnU-Net setup step {step!r} failed, see {log.name}")
    timings["total_s"] = round(sum(timings.values()), 1)
    print(f"  nnU-Net environment ready: {timings}", flush=True)
    return timings


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"), venv / "lib")


def link_nnunet_raw(dataset: Path, nnunet_raw: Path) -> Path:
    """<nnunet_raw>/Dataset001_LA: a copy of dataset.json, the image and label files symlinked."""
    target = fresh_dir(nnunet_raw / NNUNET_NAME)
    shutil.copy2(dataset / "dataset.json", target / "dataset.json")
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir()
        for path in sorted((dataset / sub).iterdir()):
            (target / sub / path.name).symlink_to(path.resolve())
    return target


# ---------------------------------------------------------------- the runs

def base_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VERSEMI_ROOT=str(workdir), VERSEMI_RAW=str(workdir / "raw"),
               VERSEMI_PLANS=str(workdir / "versemi_plans"))
    return env


def convert_la(h5_root: Path, workdir: Path) -> Measurement:
    command = [str(MAIN_BIN / "versemi_convert"), "la-h5", str(h5_root), "-o", str(workdir / "raw" / LA)]
    return run_measured("convert_la_h5", command, base_env(workdir), workdir / "logs")


def make_synthetic(workdir: Path) -> Measurement:
    command = [str(MAIN_BIN / "versemi_make_synthetic"), "-o", str(workdir / "raw")]
    return run_measured("make_synthetic", command, base_env(workdir), workdir / "logs")


def run_versemi(name: str, datasets: list[str], workdir: Path, num_processes: int) -> Measurement:
    fresh_dir(workdir / "versemi_plans")  # cold: no fingerprint or cache reuse
    command = [str(MAIN_BIN / "versemi_plan_and_preprocess"), "-d", *datasets, "-np", str(num_processes)]
    return run_measured(name, command, base_env(workdir), workdir / "logs")


def run_nnunet(name: str, workdir: Path, num_processes: int) -> Measurement:
    root = workdir / "nnunet"
    for sub in ("preprocessed", "results"):
        fresh_dir(root / sub)
    env = base_env(workdir)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"))
    command = [str(NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID),
               "-c", "3d_fullres", "-np", str(num_processes)]
    return run_measured(name, command, env, workdir / "logs")


def best_of(runs: list[Measurement]) -> Measurement:
    """The fastest successful repeat, its peak raised to the highest peak seen in any repeat."""
    good = [r for r in runs if r.ok] or runs
    best = min(good, key=lambda r: r.wall_s)
    return Measurement(best.name, best.command, best.returncode, best.wall_s,
                       max(r.peak_rss_bytes for r in good), best.peak_processes,
                       max(r.max_single_rss_bytes for r in good), best.log)


# ---------------------------------------------------------------- reading the results

def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def versemi_figures(plans_root: Path, datasets: list[str]) -> dict[str, dict]:
    """Per dataset: target spacing (z, y, x), patch size, foreground intensity statistics of channel 0."""
    plans_file = plans_root / "_".join(datasets) / "plans.json"
    if not plans_file.is_file():  # the experiment was named differently: take the plan holding them
        plans_file = next(p for p in sorted(plans_root.glob("*/plans.json"))
                          if set(datasets) <= set(read_json(p).get("datasets", {})))
    plans = read_json(plans_file)
    configuration = plans["configurations"]["3d_fullres"]
    figures = {}
    for name in datasets:
        fingerprint = read_json(plans_root / name / "fingerprint.json")
        figures[name] = {
            "target_spacing": [float(s) for s in plans["datasets"][name]["target_spacing"]],
            "patch_size": configuration["patch_size"],
            "batch_size": configuration.get("batch_size"),
            "intensity": fingerprint["foreground_intensity_properties_per_channel"]["0"],
            "plans": str(plans_file),
        }
    return figures


def try_read(results: dict, label: str, read, *args):
    """read(*args), or None with a note when the outputs are not where or what we expect."""
    try:
        return read(*args)
    except (OSError, KeyError, ValueError, StopIteration) as exc:
        results["notes"].append(f"could not read the {label} figures: {exc!r}")
        return None


def nnunet_figures(workdir: Path) -> dict:
    folder = workdir / "nnunet" / "preprocessed" / NNUNET_NAME
    plans = read_json(folder / "nnUNetPlans.json")["configurations"]["3d_fullres"]
    fingerprint = read_json(folder / "dataset_fingerprint.json")
    return {
        "target_spacing": [float(s) for s in plans["spacing"]],
        "patch_size": plans["patch_size"],
        "batch_size": plans["batch_size"],
        "n_stages": plans["architecture"]["arch_kwargs"]["n_stages"],
        "intensity": fingerprint["foreground_intensity_properties_per_channel"]["0"],
        "plans": str(folder / "nnUNetPlans.json"),
    }


# ---------------------------------------------------------------- comparison

def compare(ours: Measurement, theirs: Measurement, our_fig: dict, their_fig: dict) -> list[dict]:
    """One entry per target: name, figures, PASS or FAIL."""
    def check(name: str, passed: bool, detail: str) -> dict:
        return {"check": name, "result": "PASS" if passed else "FAIL", "detail": detail}

    time_ratio = ours.wall_s / theirs.wall_s
    ram_ratio = ours.peak_rss_bytes / theirs.peak_rss_bytes
    checks = [
        check("wall time <= 0.5x nnU-Net", time_ratio <= MAX_TIME_RATIO,
              f"{ours.wall_s:.1f} s vs {theirs.wall_s:.1f} s = {time_ratio:.2f}x"),
        check("peak RAM <= nnU-Net", ram_ratio <= MAX_RAM_RATIO,
              f"{_gb(ours.peak_rss_bytes)} vs {_gb(theirs.peak_rss_bytes)} = {ram_ratio:.2f}x"),
        check("target spacing identical", _same(our_fig["target_spacing"], their_fig["target_spacing"]),
              f"{our_fig['target_spacing']} vs {their_fig['target_spacing']} (z, y, x)"),
    ]
    for key in PERCENTILES:
        a, b = our_fig["intensity"][key], their_fig["intensity"][key]
        rel = abs(a - b) / max(abs(b), 1e-12)
        checks.append(check(f"{key} within 1 %", rel <= MAX_PERCENTILE_REL_DIFF,
                            f"{a:.6g} vs {b:.6g}: {100 * rel:.3f} %"))
    return checks


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 * max(abs(y), 1.0) for x, y in zip(a, b))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------- printing

def print_report(results: dict) -> None:
    print("\n== preprocessing benchmark ==")
    print(f"machine: {results['machine']['cpus']} CPUs, load average at start "
          f"{results['machine']['load_average_start']}, at end {results['machine']['load_average_end']}")
    if results.get("nnunet_setup"):
        print(f"nnU-Net environment created: {results['nnunet_setup']}")
    print(f"\n{'run':<28}{'wall s':>9}{'peak RAM':>11}{'procs':>7}{'1 proc':>10}  status")
    for run in results["runs"].values():
        status = "ok" if run["returncode"] == 0 else f"FAILED exit {run['returncode']}"
        print(f"{run['name']:<28}{run['wall_s']:>9.1f}{_gb(run['peak_rss_bytes']):>11}"
              f"{run['peak_processes']:>7}{_gb(run['max_single_rss_bytes']):>10}  {status}")
    if results.get("figures"):
        print(f"\n{'plan / fingerprint':<24}{'target spacing (z,y,x)':<26}{'patch':<16}{'batch':>6}"
              f"{'p0.5':>11}{'p99.5':>11}{'mean':>9}{'std':>9}")
        for label, fig in results["figures"].items():
            intensity = fig["intensity"]
            spacing = "x".join(f"{s:g}" for s in fig["target_spacing"])
            patch = "x".join(str(p) for p in fig["patch_size"])
            print(f"{label:<24}{spacing:<26}{patch:<16}{str(fig.get('batch_size')):>6}"
                  f"{intensity['percentile_00_5']:>11.5f}{intensity['percentile_99_5']:>11.5f}"
                  f"{intensity['mean']:>9.4f}{intensity['std']:>9.4f}")
    if results.get("ratios"):
        print(f"\nours / nnU-Net: wall time {results['ratios']['wall_time']:.2f}x, "
              f"peak RAM {results['ratios']['peak_ram']:.2f}x")
    for item in results.get("checks", []):
        print(f"{item['result']}  {item['check']:<30} {item['detail']}")
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"\nfigures written to {results['output']}")


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h5", type=Path, default=REPO.parent / "shared" / "data" / "la2018_h5",
                        help="LA 2018 h5 root: <ID>/mri_norm2.h5 (default: ../shared/data/la2018_h5)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "_work",
                        help="scratch folder, emptied at the start (default: benchmarks/_work)")
    parser.add_argument("--np", type=int, default=2, dest="num_processes", help="worker processes (default 2)")
    parser.add_argument("--skip-nnunet", action="store_true", help="run only our side")
    parser.add_argument("--skip-real", action="store_true", help="only the synthetic demo datasets")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each compared command N times, alternating; report the fastest (default 1)")
    return parser.parse_args(argv)


def benchmark_real(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    """Convert LA, run ours and nnU-Net on it (alternating when repeated), compare."""
    runs = results["runs"]
    convert = convert_la(args.h5.resolve(), workdir)
    runs[convert.name] = asdict(convert)
    if not convert.ok:
        results["notes"].append("conversion failed: no real-data figures")
        return
    if not args.skip_nnunet:
        results["nnunet_setup"] = ensure_nnunet_env(workdir / "logs")
        link_nnunet_raw(workdir / "raw" / LA, workdir / "nnunet" / "raw")
    ours_runs, their_runs = [], []
    for i in range(args.repeat):
        suffix = f"_{i + 1}" if args.repeat > 1 else ""
        ours_runs.append(run_versemi(f"versemi_LA{suffix}", [LA], workdir, args.num_processes))
        if not args.skip_nnunet:
            their_runs.append(run_nnunet(f"nnunet_LA{suffix}", workdir, args.num_processes))
    for run in ours_runs + their_runs:
        runs[run.name] = asdict(run)
    ours = best_of(ours_runs)
    our_fig = try_read(results, "versemi LA", versemi_figures, workdir / "versemi_plans", [LA]) if ours.ok else None
    if our_fig:
        results["figures"]["versemi LA"] = our_fig[LA]
    if not their_runs:
        return
    theirs = best_of(their_runs)
    their_fig = try_read(results, "nnU-Net LA", nnunet_figures, workdir) if theirs.ok else None
    if their_fig:
        results["figures"]["nnU-Net LA"] = their_fig
    if ours.ok and theirs.ok:
        results["compared"] = {"versemi": asdict(ours), "nnunet": asdict(theirs)}
        results["ratios"] = {"wall_time": ours.wall_s / theirs.wall_s,
                             "peak_ram": ours.peak_rss_bytes / theirs.peak_rss_bytes}
        if our_fig and their_fig:
            results["checks"] = compare(ours, theirs, our_fig[LA], their_fig)


def benchmark_synthetic(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    make = make_synthetic(workdir)
    results["runs"][make.name] = asdict(make)
    if not make.ok:
        return
    demo = run_versemi("versemi_" + "_".join(DEMOS), list(DEMOS), workdir, args.num_processes)
    results["runs"][demo.name] = asdict(demo)
    figures = try_read(results, "demo", versemi_figures, workdir / "versemi_plans", list(DEMOS)) if demo.ok else None
    for name, fig in (figures or {}).items():
        results["figures"][f"versemi {name}"] = fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if REPO.is_relative_to(args.workdir.resolve()):
        print(f"refusing --workdir {args.workdir}: it is emptied first and holds the repository", file=sys.stderr)
        return 2
    workdir = fresh_dir(args.workdir.resolve())
    missing = [b for b in ("versemi_convert", "versemi_make_synthetic", "versemi_plan_and_preprocess")
               if not (MAIN_BIN / b).is_file()]
    if missing:
        print(f"missing in {MAIN_BIN}: {', '.join(missing)} (run `make venv` first)", file=sys.stderr)
        return 2
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"num_processes": args.num_processes, "repeat": args.repeat, "h5": str(args.h5),
                     "sample_interval_s": SAMPLE_INTERVAL_S,
                     "peak_ram": "max over time of the summed RSS of the command's process tree "
                                 "(shared pages count once per process); '1 proc': largest single RSS"},
        "nnunet_setup": None, "runs": {}, "figures": {}, "notes": [],
        "output": str(workdir / "preprocess_results.json"),
    }
    if args.skip_real:
        results["notes"].append("real-data part skipped (--skip-real)")
    elif not args.h5.is_dir():
        results["notes"].append(f"real-data part skipped: no h5 folder at {args.h5}")
        print(f"SKIP real data: {args.h5} does not exist", flush=True)
    else:
        benchmark_real(args, workdir, results)
    benchmark_synthetic(args, workdir, results)
    results["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    with open(results["output"], "w") as f:
        json.dump(results, f, indent=2)
    print_report(results)
    return 0 if all(run["returncode"] == 0 for run in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
