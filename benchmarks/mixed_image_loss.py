"""What a copy-paste method's mixed images ask of a trained model: the loss of the same voxels
with and without the paste.

    python benchmarks/mixed_image_loss.py --plans-root WORK/versemi_plans --dataset Hippocampus10_dev \
        --checkpoint CHECKPOINT [--features 8 16 32 64] [--batch-size 4] [--batches 8] [--trainer BCPTrainer] \
        [--box-ratio 0.667]

Builds the trainer's self-training step from the checkpoint (``--init-from``: its EMA teacher is
the checkpoint), draws real augmented batches from the plan's labeled and unlabeled cases, and
pastes them as the step does (u's box into l, l's box into u). For each batch it prints the masked
Dice + CE (finest output) of every piece of the mixed images against its target (labels, or the
teacher's pseudo-labels), and of the labeled pieces' voxels in their own unmixed images, plus the
plain supervised loss of the labeled batch. A model that segments an image well but its pasted
pieces badly is asked, by the method, to learn a task other than its own. Not a test; nothing is
trained or written.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from versemi.model.config import TrainingConfig
from versemi.training.losses import finest, masked_dice_ce
from versemi.training.mixing import Regions, shuffled
from versemi.training.trainers import find_trainer

COLUMNS = ["plain supervised", "labeled outside, mixed", "same voxels unmixed", "labeled inside, mixed",
           "same voxels unmixed ", "pseudo-labeled inside, mixed", "pseudo-labeled outside, mixed"]


def piece_losses(trainer, labeled: dict, unlabeled: dict) -> list[float]:
    """The row of ``COLUMNS`` for one labeled and one unlabeled batch (2 pairs)."""
    labeled = shuffled(labeled)
    supervised = trainer.supervised_terms(trainer.network, labeled)["supervised"]
    known = Regions.whole(labeled["data"], labeled["prompt"], labeled["target"])
    guessed = trainer.pseudo_labeled(unlabeled)
    a, b = slice(0, 2), slice(2, 4)
    inside = trainer.mixing_mask(2, known.images)
    groups = [known.rows(a).paste(guessed.rows(a), inside), guessed.rows(b).paste(known.rows(b), inside)]
    mixed = finest(trainer.network(torch.cat([g.images for g in groups]), torch.cat([g.prompts for g in groups])))

    def slot(group: Regions, logits: torch.Tensor, s: int) -> float:
        return float(masked_dice_ce(logits[:, s], group.targets[:, s:s + 1], group.masks[:, s:s + 1]))

    def unmixed(rows: slice, where: torch.Tensor) -> float:
        logits = finest(trainer.network(known.images[rows], known.prompts[rows]))[:, 0]
        return float(masked_dice_ce(logits, known.targets[rows], where))

    return [float(supervised), slot(groups[0], mixed[:2], 0), unmixed(a, 1 - inside), slot(groups[1], mixed[2:], 1),
            unmixed(b, inside), slot(groups[0], mixed[:2], 1), slot(groups[1], mixed[2:], 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans-root", type=Path, required=True)
    parser.add_argument("--dataset", required=True, help="the plans' identifier (a folder of --plans-root)")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--features", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--trainer", default="BCPTrainer", help="a copy-paste trainer (BCP, M3HL or CAD)")
    parser.add_argument("--box-ratio", type=float, default=None, help="the box's side per axis (BCP, CAD; default: the trainer's)")
    args = parser.parse_args()
    if args.batch_size < 4:
        parser.error("--batch-size must be at least 4 (two pairs to paste)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plans = json.loads((args.plans_root / args.dataset / "plans.json").read_text())
    config = TrainingConfig(epochs=10, iterations_per_epoch=args.batches, batch_size=args.batch_size,
                            features=args.features, num_workers=0, init_from=str(args.checkpoint), seed=0,
                            method={} if args.box_ratio is None else {"box_ratio": args.box_ratio})
    with tempfile.TemporaryDirectory() as scratch:
        trainer = find_trainer(args.trainer)(plans, args.plans_root, "3d_fullres", "all", Path(scratch), config)
        trainer.setup()
        trainer.on_train_start()
        trainer.train_mode(False)
        rows = []
        with torch.no_grad():
            for i in range(args.batches):
                rows.append(piece_losses(trainer, trainer.labeled_source[i], trainer.unlabeled_source[i]))
                print(f"batch {i}: " + ", ".join(f"{name.strip()} {value:.3f}" for name, value in zip(COLUMNS, rows[-1])),
                      flush=True)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    print("| " + " | ".join(f"{statistics.mean(c):.3f} ± {statistics.stdev(c):.3f}" for c in zip(*rows)) + " |")


if __name__ == "__main__":
    main()
