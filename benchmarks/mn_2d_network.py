"""M&N's 2d network scored on its own, in the 2d configuration, beside SupervisedTrainer in 2d.

``MNTrainer`` co-trains a 2d network with the plan's 3d one and predicts with the 3d network only.
Does the co-training also leave a better 2d model? This scores the 2d network of finished M&N runs
of ``hippocampus_converged.py``: its weights go into a copy of the 2d checkpoint it started from
(the run's ``--pretrained-2d``, a 2d run of the same experiment, which gives the plans, the 2d
configuration and the network plan), and the 40 test cases are predicted slice by slice in their
own geometry and scored as ``hippocampus_converged.py`` scores its runs (Dice, HD95 and ASD in mm,
both labels, no test-time mirroring).

    python benchmarks/mn_2d_network.py --work /work/hippo3 \
        --run 'MN_pretrained-2d=sup2d_40min_seed0.pth_from40min' --budget 20 --seeds 0 1

Prints one row per seed and their mean, beside the 2d checkpoint it started from and, where they
have finished, the ``--reference`` runs (default: SupervisedTrainer in 2d continuing the same 2d
checkpoint, ``compare --configuration 2d --from-budget 40``). Results are cached per run in
``<run>/network_2d/evaluation.json``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

import budget_runs
from hippocampus_converged import LABELS, METRICS, _mean

REFERENCE = "Supervised_2d_from40min"


def checkpoint_with_2d_network(mn_checkpoint: Path, out: Path) -> tuple[Path, Path]:
    """A 2d checkpoint written to ``out``: the one M&N's 2d network started from (returned second),
    holding that network's trained weights."""
    state = torch.load(mn_checkpoint, map_location="cpu", weights_only=False)
    source = Path(state["config"]["method"]["pretrained_2d"])
    if not source.is_file():
        raise SystemExit(f"{mn_checkpoint}: its 2d network started from {source}, which is gone; this script needs "
                         "that 2d checkpoint (M&N runs started from a bare state dict cannot be scored here)")
    scored = torch.load(source, map_location="cpu", weights_only=False)
    if scored.get("configuration") != "2d":
        raise SystemExit(f"{source} is not a 2d run's checkpoint (configuration {scored.get('configuration')!r})")
    scored["network"] = state["networks"]["network_2d"]["network"]
    scored["trainer"] = f"{state['trainer']} (its 2d network)"
    scored.pop("optimizer", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(scored, partial)
    os.replace(partial, out)
    return out, source


def run_scoring(runs: Path, checkpoint: Path) -> dict | None:
    """The cached evaluation of the run of this work folder whose final checkpoint is ``checkpoint``."""
    for marker in runs.glob("*/*/checkpoint.txt"):
        evaluation = marker.parent / "evaluation.json"
        if Path(marker.read_text(encoding="utf-8")) == checkpoint and evaluation.is_file():
            return json.loads(evaluation.read_text(encoding="utf-8"))
    return None


def score(checkpoint: Path, raw: Path, folder: Path) -> dict:
    """Predict the test cases with ``checkpoint`` and score both labels (cached in ``folder``)."""
    from versemi.evaluation import evaluate_folders

    cached = folder / "evaluation.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    seconds = budget_runs.predict_test_cases(checkpoint, raw, folder / "predictions", mirroring=False)
    summary = evaluate_folders(raw / "labelsTs", folder / "predictions", voxel_units=False, labels=list(LABELS),
                               output_dir=folder / "evaluation")
    per_label = {str(label): summary["mean"][str(label)] for label in LABELS}
    result = {"mean": {m: _mean([per_label[str(label)][m] for label in LABELS]) for m in METRICS},
              "per_label": per_label, "predict_seconds": seconds, "checkpoint": str(checkpoint)}
    cached.write_text(json.dumps(result, indent=2))
    return result


def row(name: str, results: list[dict]) -> str:
    def stat(metric: str, scale: float) -> str:
        values = [scale * r["mean"][metric] for r in results]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{spread}"
    per_seed = ", ".join(f"{100 * r['mean']['dice']:.2f}" for r in results)
    return f"| {name} | {len(results)} | {stat('dice', 100)} ({per_seed}) | {stat('hd95', 1)} | {stat('asd', 1)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the work folder of hippocampus_converged.py")
    parser.add_argument("--run", required=True, help="the M&N runs' folder name under <work>/runs")
    parser.add_argument("--budget", type=float, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reference", default=REFERENCE, help="runs folder of the 2d reference rows")
    args = parser.parse_args()
    raw = args.work / "raw" / "Hippocampus"
    runs = args.work / "runs"
    mn, start = [], None
    for seed in args.seeds:
        folder = runs / args.run / f"{args.budget:g}min_seed{seed}"
        marker = folder / "checkpoint.txt"
        if not marker.is_file():
            raise SystemExit(f"{folder}: no finished run (no checkpoint.txt); train it with hippocampus_converged.py")
        checkpoint_3d = Path(marker.read_text(encoding="utf-8"))
        scored, start = checkpoint_with_2d_network(checkpoint_3d, folder / "network_2d" / "checkpoint_2d.pth")
        mn.append(score(scored, raw, folder / "network_2d"))
        print(f"seed {seed}: M&N's 2d network {100 * mn[-1]['mean']['dice']:.2f} Dice", flush=True)
    reference_files = [runs / args.reference / f"{args.budget:g}min_seed{seed}" / "evaluation.json"
                       for seed in args.seeds]
    references = [json.loads(f.read_text(encoding="utf-8")) for f in reference_files if f.is_file()]
    print(f"\nM&N runs {runs / args.run}; 2d network started from {start}\n")
    print("| model (2d, slice by slice) | seeds | Dice % (mean of 2 labels; per seed) | HD95 mm | ASD mm |")
    print("|---|---|---|---|---|")
    start_scores = run_scoring(runs, start)
    if start_scores:
        print(row("the 2d checkpoint both continue", [start_scores]))
    if references:
        print(row(f"{args.reference} ({args.budget:g} min)", references))
    print(row(f"M&N's 2d network ({args.run}, {args.budget:g} min)", mn))


if __name__ == "__main__":
    main()
