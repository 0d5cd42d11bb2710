"""The first training steps of a joint plan: mixed batches against one dataset per batch.

A joint plan has one patch for all datasets, so a batch mixes patches of several datasets. With
``--patch-per-dataset`` a dataset of smaller images gets a patch of its own, and then each batch
holds one dataset (``versemi.training.data``). This script trains SupervisedTrainer in-process on
an already planned and preprocessed joint experiment for ``--steps`` optimizer steps and records
the loss of every step with the dataset(s) of its batch, for one variant:

- ``shared-sgd``: the plan's one patch, mixed batches, the default SGD (lr 1e-2, Nesterov 0.99);
- ``own-sgd``: each dataset's own patch (``dataset_patch_sizes``, computed as the planner does
  where the plan has none), one dataset per batch, SGD;
- ``same-sgd``: one dataset per batch, every dataset at the shared patch (batch composition alone);
- ``each-sgd``: each dataset's own patch, a sub-batch of every dataset in every step (gradients
  accumulated: ``--dataset-batches each``), SGD; ``each-adam`` the same with Adam;
- ``own-adam`` / ``shared-adam``: as above with Adam, lr 3e-3.

Network: the plan's CPU preset; fold ``all``; no time budget (steps are counted, not timed).

    python benchmarks/joint_first_steps.py run --plans-root WORK/versemi_plans \\
        --experiment LA8_Hippocampus10_dev_absent --variant own-sgd --steps 120 --out WORK/first_steps
    python benchmarks/joint_first_steps.py report --out WORK/first_steps

``run`` writes ``<out>/<variant>_seed<seed>.json`` (an existing one is reused); ``report`` writes
``first_steps.md`` (mean loss per dataset over windows of steps) and ``first_steps.png``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = {"shared-sgd": ("shared", "sgd"), "own-sgd": ("own", "sgd"), "same-sgd": ("same", "sgd"),
            "shared-adam": ("shared", "adam"), "own-adam": ("own", "adam"), "each-sgd": ("own", "sgd"),
            "each-adam": ("own", "adam")}
WINDOWS = [(1, 20), (41, 60), (81, 100), (101, 120)]


def patches_of(plans: dict, patch: str) -> dict | None:
    """The plan's ``dataset_patch_sizes`` for the variant's patch setting."""
    from versemi.plans.planner import dataset_patch_sizes
    from versemi.plans.topology import pool_and_conv_props

    configuration = plans["configurations"]["3d_fullres"]
    if patch == "shared":
        return None
    if patch == "same":  # one dataset per batch, all at the shared patch
        return {name: list(configuration["patch_size"]) for name in plans["dataset_names"]}
    own = configuration.get("dataset_patch_sizes")
    if own is None:
        topology = pool_and_conv_props(configuration["topology_spacing"], configuration["patch_size"])
        own = dataset_patch_sizes(plans["datasets"], topology)
    if not own:
        raise SystemExit("no dataset of this plan is smaller than its patch: nothing to compare")
    return own


def run(args) -> None:
    import torch
    from versemi.model.config import TrainingConfig
    from versemi.training.trainers import find_trainer

    out = args.out / f"{args.variant}_seed{args.seed}.json"
    if out.is_file():
        print(f"{out}: done earlier, reused")
        return
    torch.set_num_threads(args.threads)
    plans = json.loads((args.plans_root / args.experiment / "plans.json").read_text(encoding="utf-8"))
    patch, optimizer = VARIANTS[args.variant]
    configuration = plans["configurations"]["3d_fullres"]
    configuration.pop("dataset_patch_sizes", None)
    own = patches_of(plans, patch)
    if own:
        configuration["dataset_patch_sizes"] = own
    config = TrainingConfig(num_workers=0, network_size="cpu", optimizer=optimizer,
                            lr=3e-3 if optimizer == "adam" else None, epochs=10,
                            iterations_per_epoch=max(1, args.steps // 10), seed=args.seed,
                            dataset_batches="each" if args.variant.startswith("each") else "one")
    trainer = find_trainer("SupervisedTrainer")(plans, args.plans_root, "3d_fullres", "all",
                                                args.out / "runs" / f"{args.variant}_seed{args.seed}", config)
    trainer.setup()
    names = plans["dataset_names"]
    steps, started = [], time.time()
    for iteration in range(args.steps):
        batch = trainer.labeled_source[iteration]
        terms = trainer.optimize(iteration, batch, None)
        parts = batch.get("sub_batches", [batch])
        steps.append({"loss": terms["loss"], "supervised": terms.get("supervised", terms["loss"]),
                      "datasets": sorted({names[i] for part in parts for i in part["dataset"].tolist()}),
                      # a step of sub-batches: each dataset's own loss (SupervisedTrainer: its supervised loss)
                      "per_dataset": {name: terms[f"loss_{name}"] for name in names if f"loss_{name}" in terms},
                      "samples": sum(int(part["data"].shape[0]) for part in parts),
                      "shape": [list(part["data"].shape[2:]) for part in parts]})
        if (iteration + 1) % 10 == 0:
            recent = steps[-10:]
            print(f"{time.strftime('%H:%M:%S')} {args.variant} step {iteration + 1}: loss "
                  f"{np.mean([s['loss'] for s in recent]):.3f} ({time.time() - started:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"variant": args.variant, "seed": args.seed, "experiment": args.experiment,
                               "dataset_patch_sizes": own, "patch_size": configuration["patch_size"],
                               "optimizer": optimizer, "steps": steps, "seconds": time.time() - started}, indent=1))
    print(f"wrote {out}")


def loss_of(step: dict, dataset: str) -> float:
    """The supervised loss of ``dataset`` in a step: its sub-batch's where the step had one per dataset."""
    return step.get("per_dataset", {}).get(dataset, step["supervised"])


def window_mean(steps: list[dict], dataset: str, low: int, high: int) -> float | None:
    """Mean supervised loss of the steps low..high (1-based) whose batch holds ``dataset``."""
    values = [loss_of(s, dataset) for s in steps[low - 1:high] if dataset in s["datasets"]]
    return float(np.mean(values)) if values else None


def report(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(args.out.glob("*_seed*.json"))]
    if not records:
        raise SystemExit(f"no runs in {args.out}")
    datasets = sorted({d for r in records for s in r["steps"] for d in s["datasets"]})
    header = "| variant | seed | own patches | steps | " + " | ".join(
        f"{d} loss, steps {lo}-{hi}" for d in datasets for lo, hi in WINDOWS) + " |"
    rows = [header, "|" + "---|" * (4 + len(datasets) * len(WINDOWS))]
    for r in records:
        cells = []
        for d in datasets:
            for lo, hi in WINDOWS:
                value = window_mean(r["steps"], d, lo, hi) if len(r["steps"]) >= hi else None
                cells.append("" if value is None else f"{value:.3f}")
        rows.append(f"| {r['variant']} | {r['seed']} | {r['dataset_patch_sizes'] or 'none'} | {len(r['steps'])} | "
                    + " | ".join(cells) + " |")
    text = ("Supervised loss (Dice + CE of each sample's own prompt) per dataset, mean over the steps of each window "
            "whose batch holds that dataset; SupervisedTrainer, the plan's CPU preset, fold all.\n\n" + "\n".join(rows))
    (args.out / "first_steps.md").write_text(text + "\n", encoding="utf-8")
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for k, r in enumerate(records):
            points = [(i + 1, loss_of(s, d)) for i, s in enumerate(r["steps"]) if d in s["datasets"]]
            if not points:
                continue
            x, y = np.array(points).T
            smooth = np.convolve(y, np.ones(5) / 5, mode="valid") if len(y) >= 5 else y
            ax.plot(x[len(x) - len(smooth):], smooth, color=f"C{k}", label=f"{r['variant']} seed {r['seed']}")
        ax.set_title(f"{d}: supervised loss (5-batch mean)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "first_steps.png", dpi=90)
    plt.close(fig)
    print(text)
    print(f"wrote {args.out / 'first_steps.md'}, {args.out / 'first_steps.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--plans-root", type=Path, required=True)
    run_parser.add_argument("--experiment", required=True)
    run_parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    run_parser.add_argument("--steps", type=int, default=120)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--threads", type=int, default=1)
    run_parser.add_argument("--out", type=Path, required=True)
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out = args.out.absolute()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
