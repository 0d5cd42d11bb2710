"""``versemi_train``: pick the experiment, fold and trainer, then run the loop."""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import paths
from ..atomic import read_json
from ..console import add_quiet_option
from ..errors import input_error
from ..locks import folder_lock
from ..model.augmentation_settings import AugmentationSettings
from ..model.config import NETWORK_SIZES, TrainingConfig, effective_configuration
from ..model.layout import find_experiment, output_folder, parse_fold
from ..model.plans_view import PlansView
from ..model.precision import PRECISIONS
from .trainer import distributed_device, leave_process_group
from .trainers import find_trainer
from .warm_up import MIN_METHOD_ITERATIONS, WARM_UP_ITERATIONS, parse_request


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="versemi_train", description="Train one fold of a planned experiment.")
    p.add_argument("configuration", help="e.g. 3d_fullres")
    p.add_argument("fold", help="fold0 .. fold4, 0 .. 4, or all")
    p.add_argument("-e", "--experiment", help="planned experiment (needed when several exist)")
    p.add_argument("-tr", "--trainer", default="VerSemiTrainer", help="trainer class (default VerSemiTrainer)")
    p.add_argument("--continue", dest="resume", action="store_true", help="resume from the latest checkpoint")
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="start from the weights of another run's checkpoint (any trainer, the same network plan, "
                        "prompts and channels); a pre-training stage is skipped. --continue does not load it again")
    p.add_argument("--pretrained-2d", type=Path, metavar="PATH",
                   help="MNTrainer: weights of its 2d network (a state dict of the plan's 2d network, or a 2d "
                        "checkpoint of this experiment); nothing is downloaded. Default: this experiment's "
                        "SupervisedTrainer 2d run of the same fold, where it has finished")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations-per-epoch", type=int)
    p.add_argument("--val-iterations", type=int)
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int, help="background processes per data stream (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-gpus", type=int, default=1, help="start this many DDP processes (same as torchrun)")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="fit the whole schedule (LR decay, stages, ramp-ups) into this many minutes: a short "
                        "warm-up times real steps, then fixes epochs x iterations (stored for --continue)")
    p.add_argument("--supervised-warm-up", metavar="auto|SHARE",
                   help="a semi-supervised trainer first trains supervised, then its method starts (default auto: "
                        f"half the schedule and at least {WARM_UP_ITERATIONS} iterations, where "
                        f"{MIN_METHOD_ITERATIONS} are left for the method; "
                        "a shorter schedule stays supervised, a warm start gets none); a share in [0, 1] of the "
                        "schedule instead, 0 to start the method at once")
    p.add_argument("--dataset-batches", choices=("each", "one"),
                   help="where the datasets of a joint plan have patches of their own (--patch-per-dataset at "
                        "planning): each (default) step trains a sub-batch of every dataset at its own patch, their "
                        "gradients accumulated into one optimizer step; one: one dataset per step. With either, "
                        "SGD stalled where Adam learnt, so such plans train with Adam 3e-3 unless --optimizer is "
                        "given (benchmarks/RESULTS.md)")
    p.add_argument("--absent-views", choices=("on", "off"),
                   help="where a dataset declares another dataset's structures absent (--known-absent at planning) "
                        "and that dataset prepares images another way or with another patch: on (default) also "
                        "learns the absence on the dataset's images as that dataset shows them to its prompts, which "
                        "is how versemi_predict -p all shows them (one patch per view per step; the views are cached "
                        "by versemi_plan_and_preprocess); off: on the dataset's own view only")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="mixed precision (default auto: bf16 on CPUs with bf16 units and on CUDA)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (same as --precision fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    p.add_argument("--no-augmentation", action="store_true")
    p.add_argument("--network-size", choices=NETWORK_SIZES,
                   help="auto (default): the plan's CPU preset when training on a CPU (a quarter of the features, "
                        "batch at most 4: a plateau within about 30 minutes), the plan's size otherwise; plan or cpu "
                        "to choose. --features and --batch-size override either")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="override the plan (quick runs)")
    p.add_argument("--batch-size", type=int, help="override the plan (quick runs)")
    p.add_argument("--unlabeled-batch-size", type=int, help="unlabeled samples per step (default: the batch size)")
    p.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=None,
                   help="override the plan's deep supervision (nnU-Net's weighted multi-scale loss)")
    p.add_argument("--features", type=int, nargs="+", help="override the plan's features per stage (quick runs)")
    p.add_argument("--method", default="{}", help='method settings as JSON, e.g. \'{"stage1_fraction": 0.5}\', '
                                                  'or a preset name (\'paper\', same as \'{"preset": "paper"}\')')
    p.add_argument("--plans-root", type=Path)
    add_quiet_option(p)
    return p


def make_config(args, saved: dict | None) -> TrainingConfig:
    fixed = [flag for flag, value in (("--epochs", args.epochs), ("--iterations-per-epoch", args.iterations_per_epoch))
             if value is not None]
    if args.time_budget is not None and fixed:
        raise input_error(f"--time-budget {args.time_budget:g} with {' and '.join(fixed)}",
                          "the time budget sets the epochs and the iterations per epoch itself",
                          f"give either --time-budget or {' / '.join(fixed)}, not both")
    config = TrainingConfig.from_dict(saved) if saved else TrainingConfig()
    for name in ("epochs", "iterations_per_epoch", "val_iterations", "optimizer", "lr", "seed", "num_workers",
                 "batch_size", "unlabeled_batch_size", "features", "deep_supervision", "precision", "time_budget"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.patch_size:
        config.patch_size = list(args.patch_size)
    if args.no_amp:
        config.amp = False
    if args.compile:
        config.compile = True
    if args.no_augmentation:
        config.augmentation = AugmentationSettings(enabled=False)
    if args.init_from is not None:
        config.init_from = str(args.init_from.resolve())
    config.method.update(parse_method(args.method))
    if args.pretrained_2d is not None:
        config.method["pretrained_2d"] = str(args.pretrained_2d.resolve())
    if args.network_size is not None:
        if saved and args.network_size not in ("auto", config.network_size):
            raise input_error(f"--network-size {args.network_size}", f"this run trains the {config.network_size} size",
                              "continue it without the option, or start a new run in another folder")
        if not saved:
            config.network_size = args.network_size
    if args.supervised_warm_up is not None:
        config.supervised_warm_up = _kept_on_continue("--supervised-warm-up", args.supervised_warm_up,
                                                      parse_request(args.supervised_warm_up),
                                                      config.supervised_warm_up, saved)
    if args.dataset_batches is not None:
        config.dataset_batches = _kept_on_continue("--dataset-batches", args.dataset_batches, args.dataset_batches,
                                                   config.dataset_batches, saved)
    if args.absent_views is not None:
        config.absent_views = _kept_on_continue("--absent-views", args.absent_views, args.absent_views == "on",
                                                config.absent_views, saved,
                                                "on" if config.absent_views else "off")
    if config.time_budget is not None and config.time_budget <= 0:
        raise input_error(f"--time-budget {config.time_budget:g}", "is not a positive number of minutes",
                          "give the minutes the whole training may take, e.g. --time-budget 20")
    return config


def _kept_on_continue(flag: str, given: str, value, started_with, saved: dict | None, shown: str | None = None):
    """``value`` (what ``flag given`` asks for), refused on --continue where the run started with
    another (``shown``: how that one is written on the command line)."""
    if saved and value != started_with:
        raise input_error(f"{flag} {given}", f"this run was started with {flag} {shown or started_with}",
                          "continue it without the option, or start a new run in another folder")
    return value


def parse_method(text: str) -> dict:
    """``--method``: a JSON object of settings, or the bare name of a preset."""
    if text.strip().isidentifier():
        return {"preset": text.strip()}
    try:
        method = json.loads(text)
    except ValueError as exc:
        raise input_error("--method", f"is not JSON ({exc})", 'write e.g. --method \'{"stage1_fraction": 0.5}\'')
    if not isinstance(method, dict):
        raise input_error("--method", f"{text!r} is not a JSON object", 'write e.g. --method \'{"stage1_fraction": 0.5}\'')
    return method


# Plans with a patch per dataset train on one-dataset batches, where SGD (lr 1e-2, Nesterov 0.99)
# stalled and Adam learnt both datasets of the real LA + hippocampus pair (benchmarks/RESULTS.md)
PER_DATASET_PATCH_OPTIMIZER = ("adam", 3e-3)


def choose_optimizer(args, config: TrainingConfig, plans: dict, configuration: str, saved: dict | None) -> str | None:
    """A new run of a plan whose datasets have patches of their own trains with Adam 3e-3 unless
    ``--optimizer`` says otherwise; returns the note that says so (None where nothing changed)."""
    if saved or args.optimizer is not None \
            or not effective_configuration(plans, configuration, config).dataset_patch_sizes:
        return None
    config.optimizer, default_lr = PER_DATASET_PATCH_OPTIMIZER
    if config.lr is None:
        config.lr = default_lr
    return (f"the plan gives datasets patches of their own: optimizer {config.optimizer}, lr {config.lr:g} "
            "(SGD stalled on such batches; --optimizer sgd to use it anyway)")


def train(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        from torch.distributed.run import main as torchrun
        torchrun(["--standalone", f"--nproc_per_node={args.num_gpus}", "-m", "versemi.train",
                  *[a for a in (argv if argv is not None else sys.argv[1:])]])
        return 0
    fold = parse_fold(args.fold)
    plans_root = args.plans_root or paths.plans_root()
    experiment = find_experiment(plans_root, args.experiment)
    plans = read_json(plans_root / experiment / "plans.json")
    if not PlansView(plans).has_configuration(args.configuration):
        raise input_error(plans_root / experiment / "plans.json", f"has no configuration {args.configuration!r}",
                          f"use one of {', '.join(plans['configurations'])}")
    trainer_class = find_trainer(args.trainer)
    if args.pretrained_2d is not None and "pretrained_2d" not in trainer_class.method_defaults:
        raise input_error(f"--pretrained-2d {args.pretrained_2d}", f"{args.trainer} trains no 2d network beside the "
                                                                   "3d one", "use it with -tr MNTrainer, or leave it out")
    folder = output_folder(experiment, args.trainer, args.configuration, fold)
    saved = None
    if args.resume and (folder / "checkpoint_latest.pth").is_file():
        from ..model.checkpoint import load_checkpoint
        saved = load_checkpoint(folder / "checkpoint_latest.pth")["config"]
    elif not args.resume and (folder / "checkpoint_latest.pth").is_file():
        raise input_error(folder, "this fold was already trained (checkpoints exist)",
                          "resume it with --continue, or move the folder away to start over")
    device = distributed_device(args.device)
    config = make_config(args, saved)
    optimizer_note = choose_optimizer(args, config, plans, args.configuration, saved)
    if optimizer_note and os.environ.get("RANK", "0") == "0":
        print(f"versemi_train: {optimizer_note}", flush=True)
    # one run per fold at a time; under DDP the first process holds the lock for all of them
    with folder_lock(folder, "versemi_train") if os.environ.get("RANK", "0") == "0" else nullcontext():
        trainer = trainer_class(plans, plans_root, args.configuration, fold, folder, config, device)
        trainer.run(resume=args.resume)
    leave_process_group()
    if trainer.is_main:
        print(f"trained {args.trainer} fold {fold}: {folder}")
    return 0
