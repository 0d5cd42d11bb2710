"""The fold-based training loop, written once. Methods are subclasses that override hooks.

A subclass sets ``uses_unlabeled`` and overrides ``train_step`` (and, if it needs to,
``build_network``, ``on_train_start``, ``stage_starts``, ``on_stage_start``, ``on_epoch_start``,
``after_optimizer_step``, ``unlabeled_from`` or ``budget_phases``); the loop does the rest: data
streams in background workers, optimizer and poly LR, mixed precision, EMA teachers (``add_teacher``),
further networks trained beside the main one (``add_network``), a schedule fitted to a time budget,
checkpoints, resume, a warm start from another run's weights (``--init-from``, ``warm_start``),
a supervised warm-up before a semi-supervised method starts (``--supervised-warm-up``, ``warm_up``),
validation, logging of every loss term, DDP. A method's stages, ramp-ups and ``unlabeled_from``
count from the method's start (``method_epoch`` of ``method_epochs``), after the warm-up.
The shared pieces of the methods' mathematics live beside it: ``losses`` (masked Dice + CE),
``mixing`` (boxes, block masks, copy-paste), ``pseudo_labels``, ``feature_taps``, ``prompts``.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..console import progress_bar
from ..errors import input_error
from ..model.checkpoint import MAIN_MEMBER, load_checkpoint, save_checkpoint
from ..model.config import TrainingConfig, effective_configuration, resolve_network_size
from ..model.layout import checkpoint_file
from ..model.plans_view import PlansView
from ..model.precision import autocast_dtype
from ..nets import build_network
from ..model.absent_views import AbsentView, trained_views
from .architectures import second_network
from .budget import check_against_clock, fit_schedule, seconds_left
from .data import BatchSource, CaseStore, StreamSettings, batch_loader, sub_batch_pairs
from .losses import DiceCE, exclusion_loss, finest, multiscale, prompt_columns
from .method_settings import pinned, resolve_method_settings, unsaved
from .progress import TrainingLog
from .prompts import known_absent_matrix
from .schedules import sigmoid_rampup
from .state import TrainerState, random_state, set_random_state
from .teacher import EMATeacher
from .validation import pseudo_dice_counts, sliding_window_validation
from .warm_start import WarmStart
from .warm_up import describe as describe_warm_up
from .warm_up import split_iterations

EMA_DICE_MOMENTUM = 0.9

# the iterations over which declared absences reach full weight in the shared supervised step
KNOWN_ABSENT_RAMP_ITERATIONS = 200


@dataclass
class ExtraNetwork:
    """A network trained beside the main one (``Trainer.add_network``)."""

    model: torch.nn.Module        # the module whose weights are checkpointed
    network: torch.nn.Module      # what a step calls: the model wrapped (DDP, compile) like the main one
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    network_plan: dict | None     # a prediction member's plan; None: used in training only (e.g. a projection head)


def fold_split(plans: dict, fold: str) -> dict:
    """Case keys of one fold (``0``..``4``) or of ``all`` (every labeled case trains; no validation)."""
    folds = plans["splits"]["folds"]
    if fold == "all":
        labeled = sorted({k for f in folds for k in f["train_labeled"] + f["val"]})
        return {"train_labeled": labeled, "val": [], "train_unlabeled": folds[0]["train_unlabeled"]}
    return folds[int(fold)]


class Trainer:
    """Supervised-loss plumbing shared by all methods; see ``SupervisedTrainer`` for the simplest."""

    uses_unlabeled = False
    # the main network's name among the members of a trainer with several (``add_network``, ``--member``)
    network_name = MAIN_MEMBER
    # settings a method reads from --method, with their defaults, and named sets of them
    method_defaults: dict = {}
    method_presets: dict[str, dict] = {}
    # the method setting holding the share of the epochs of a leading stage that only prepares the
    # networks for the next (e.g. BCP's labeled pre-training): a warm start replaces it (``_finish_warm_start``)
    warm_up_setting: str | None = None
    # whether the method's own step learns the structures the plan declares absent (plans
    # known_absent); the supervised step (SupervisedTrainer, every warm-up) always does
    learns_known_absent: bool = False

    def __init__(self, plans: dict, plans_root: Path, configuration: str, fold: str, output_folder: Path,
                 config: TrainingConfig, device: str | torch.device = "cpu"):
        self.plans, self.plans_root, self.configuration, self.fold = plans, plans_root, configuration, fold
        self.output_folder, self.config = Path(output_folder), config
        self.started = time.time()
        self.settings = resolve_method_settings(type(self).__name__, self.method_defaults, self.method_presets,
                                                config.method)
        self.device = torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        view = PlansView(plans)
        plan = view.configuration(configuration)
        # on a CPU the plan's CPU preset, unless overridden (stored in the settings, so --continue keeps it)
        self.network_size_note = resolve_network_size(plans, configuration, config, self.device.type)
        # the patch and network after the run's overrides, as the checkpoint records them
        self.effective = effective_configuration(plans, configuration, config)
        self.patch_size = list(self.effective.patch_size)
        self.spatial_dims = view.spatial_dims(configuration)  # 2: trains on slices, (1, y, x) patches
        self.batch_size = max(1, (config.batch_size or plan["batch_size"]) // self.world_size)
        self.num_prompts = plans["num_prompts"]
        self.synthetic_prompt = plans["synthetic_prompt"]
        self.real_prompts = view.real_prompt_indices
        self.prompt_names = view.prompt_names()
        self.unlabeled_batch_size = max(1, (config.unlabeled_batch_size or config.batch_size or plan["batch_size"])
                                        // self.world_size)
        self.split = fold_split(plans, fold)
        self.loss = DiceCE()
        # (datasets, prompts) 0/1: structures the plan declares absent from each dataset's images
        self.known_absent = known_absent_matrix(plans, self.device)
        self.current_iteration: int | None = None  # the batch being optimized (None outside the loop)
        self.epoch, self.best_ema = 0, -1.0
        self.teachers: dict[str, EMATeacher] = {}
        self.extra_networks: dict[str, ExtraNetwork] = {}
        self.log = TrainingLog(self.output_folder)
        self.warm_start: dict | None = None          # what the run started from (--init-from), checkpointed
        self._warm_source: WarmStart | None = None   # the checkpoint, while setup loads from it

    # ----- hooks a method may override -----
    def network_plan(self) -> dict:
        """The plan's network after the run's overrides (``model.config.effective_configuration``)."""
        return copy.deepcopy(self.effective.network_plan)

    def build_network(self) -> torch.nn.Module:
        return build_network(self.network_plan(), self.plans["in_channels"], self.num_prompts)

    def on_train_start(self) -> None:
        """Called once the network, optimizer and data exist (e.g. to create a teacher)."""

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """Losses of one iteration; ``loss`` is the one optimized, every entry is logged.
        Supervised Dice + CE by default (summed over the deep-supervision levels, if any), and the
        structures declared absent learnt as absent (``supervised_terms``)."""
        terms = self.supervised_terms(self.network, labeled)
        return {**terms, "loss": sum(terms.values())} if len(terms) > 1 else {"loss": terms["supervised"]}

    # ----- structures declared absent (plans ``known_absent``) -----
    @property
    def declares_absence(self) -> bool:
        return bool(self.known_absent.any())

    def absent_prompts(self, datasets: torch.Tensor) -> torch.Tensor:
        """(B, K) 0/1: the prompts whose structure cannot occur in each sample's images."""
        return self.known_absent[datasets.to(self.known_absent.device)]

    def known_absent_note(self) -> str:
        view = PlansView(self.plans)
        declared = "; ".join(f"{name}: {', '.join(view.known_absent(name))}" for name in view.dataset_names
                             if view.known_absent(name))
        own_step = self.learns_known_absent or type(self).train_step is Trainer.train_step
        where = "every step" if own_step else \
            f"the supervised warm-up only ({type(self).__name__}'s method losses do not use them)"
        ramp = "" if self.warm_start is not None else \
            f", ramped up over the first {KNOWN_ABSENT_RAMP_ITERATIONS} iterations in the supervised step"
        views = "".join(f"; also on {view.dataset}'s images as {view.shown_as}'s plan and patch {list(view.patch)} "
                        f"show them ({self.labeled_source.patches_per_view} patch a step)" for view, _ in self.absent_views)
        return (f"structures declared absent from a dataset's images (known_absent), learnt absent in {where}{ramp}: "
                f"{declared}{views}")

    def supervised_terms(self, network: torch.nn.Module, labeled: dict) -> dict[str, torch.Tensor]:
        """Dice + CE of each labeled sample's own prompt; where the plan declares structures absent
        from a sample's dataset, also their exclusion loss over the whole image (``known_absent``).
        Then every prompt is asked in the same backbone pass; without a declaration only the own one."""
        x, own = labeled["data"], labeled["prompt"]
        if not self.declares_absence:
            return {"supervised": multiscale(self.loss, network(x, own), labeled["target"])}
        prompts = torch.arange(self.num_prompts, device=x.device).expand(x.shape[0], -1)
        out = network(x, prompts)  # (B, K, 2, *S) per level
        return {"supervised": multiscale(self.loss, prompt_columns(out, own), labeled["target"]),
                "known_absent": self.known_absent_ramp() * exclusion_loss(finest(out), self.absent_prompts(labeled["dataset"]))}

    def known_absent_ramp(self) -> float:
        """The weight of the declared absences in the shared supervised step: a sigmoid ramp from 0 to
        1 over the first ``KNOWN_ABSENT_RAMP_ITERATIONS`` of a run from random weights (1 after a
        warm start, and outside the loop). From the first step at full weight, the absences (every
        other dataset's prompts pushed to background over whole images) can drown the own prompts
        before they learn any foreground: one joint LA + hippocampus run stayed at a supervised loss
        of 1.1 for 550 iterations (Dice 0 on both datasets), where the same seed without the
        declaration learnt (benchmarks/RESULTS.md)."""
        if self.current_iteration is None or self.warm_start is not None:
            return 1.0
        return sigmoid_rampup(self.current_iteration / KNOWN_ABSENT_RAMP_ITERATIONS)

    def stage_starts(self) -> list[int]:
        """The first method epoch (``method_epoch``) of stage 2, 3, ... (empty: one stage). Stages may
        change the step's work."""
        return []

    @property
    def stage(self) -> int:
        """The method's current stage, 1-based (1 during the supervised warm-up)."""
        if self.in_warm_up:
            return 1
        return 1 + sum(self.method_epoch >= start for start in self.stage_starts())

    def on_stage_start(self, stage: int) -> None:
        """Called when the loop enters stage 2, 3, ... (before that epoch's first step)."""

    def on_epoch_start(self) -> None:
        """Called before every epoch's first step (e.g. to move a schedule)."""

    def after_optimizer_step(self, iteration: int) -> None:
        """Called after each optimizer step; by default every EMA teacher follows the student."""
        for teacher in self.teachers.values():
            teacher.update(self.model)

    def unlabeled_from(self) -> int | None:
        """First iteration of the method (counted from its start) whose ``train_step`` needs an
        unlabeled batch (None: never). Before it, the unlabeled stream is neither loaded nor augmented."""
        return 0 if self.uses_unlabeled else None

    def budget_phases(self) -> list[tuple[int, float]]:
        """(method epoch, share of the method's iterations) of each phase whose step cost differs;
        the time-budget warm-up times a few steps of each. One phase per stage."""
        epochs = max(1, self.method_epochs)
        bounds = [0] + [min(start, epochs) for start in self.stage_starts()] + [epochs]
        return [(start, (stop - start) / epochs) for start, stop in zip(bounds, bounds[1:]) if stop > start]

    # ----- the shared supervised warm-up (versemi.training.warm_up) -----
    @property
    def warm_up_epochs(self) -> int:
        """Epochs trained supervised before the method starts (always 0 without unlabeled data)."""
        return int(self.config.warm_up_epochs or 0) if self.uses_unlabeled else 0

    @property
    def in_warm_up(self) -> bool:
        return self.epoch < self.warm_up_epochs

    @property
    def supervised_throughout(self) -> bool:
        """The method never starts (the warm-up is the whole schedule): the trainer is then
        SupervisedTrainer, so only its main network trains and predicts. Training further members
        as well would halve a two-network trainer's iterations for a model averaged with copies
        that the method never used."""
        return self.uses_unlabeled and self.config.epochs is not None and self.warm_up_epochs >= self.config.epochs

    @property
    def method_epoch(self) -> int:
        """The epoch counted from the method's start (0 during the warm-up)."""
        return max(0, self.epoch - self.warm_up_epochs)

    @property
    def method_epochs(self) -> int:
        """The method's share of the schedule, in epochs: what its stages and ramp-ups divide."""
        return max(1, self.config.epochs - self.warm_up_epochs)

    def method_stage_epochs(self) -> list[int]:
        """The run's epochs at which stage 2, 3, ... start."""
        return [self.warm_up_epochs + start for start in self.stage_starts()]

    def first_unlabeled_iteration(self) -> int | None:
        """The run's first iteration that reads an unlabeled batch (None: never)."""
        first = self.unlabeled_from() if self.unlabeled_source is not None else None
        return None if first is None else self.warm_up_epochs * self.config.iterations_per_epoch + first

    def resolve_warm_up(self) -> None:
        """Fix ``config.warm_up_epochs`` from the request and the schedule (a time budget fixes it
        while fitting the schedule; ``--continue`` keeps the saved value)."""
        if self.config.warm_up_epochs is not None:
            return
        if not self.uses_unlabeled:
            self.config.warm_up_epochs = 0
            return
        per_epoch, epochs = self.config.iterations_per_epoch, self.config.epochs
        warm = split_iterations(self.config.supervised_warm_up, epochs * per_epoch, self.warm_start is not None)
        self.config.warm_up_epochs = min(epochs, math.ceil(warm / per_epoch))

    def warm_up_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """A step of the warm-up: each segmenter the trainer trains learns the labeled batch on its
        own, so a one-network trainer takes SupervisedTrainer's step exactly (and so does every
        trainer whose method never starts: ``supervised_throughout``)."""
        networks = [self.network]
        if not self.supervised_throughout:
            networks += [e.network for e in self.extra_networks.values() if e.network_plan is not None]
        if len(networks) == 1:
            return Trainer.train_step(self, labeled, unlabeled)
        losses = [sum(self.supervised_terms(network, labeled).values()) for network in networks]
        names = self.members()
        return {"loss": sum(losses[1:], losses[0]), **{f"supervised_{name}": loss for name, loss in zip(names, losses)}}

    def on_warm_up_end(self) -> None:
        """The method starts: every teacher restarts from the warmed-up network, as after a warm start."""
        for teacher in self.teachers.values():
            teacher.copy_from(self.model)
        if self.is_main:
            self.log.write(f"supervised warm-up done after epoch {self.epoch}: {type(self).__name__}'s method starts"
                           f"{', teachers copied from the network' if self.teachers else ''}")

    def add_teacher(self, decay: float, name: str = "teacher") -> EMATeacher:
        """An EMA copy of the network, updated after every optimizer step and checkpointed."""
        self.teachers[name] = EMATeacher(self.model, decay).to(self.device)
        return self.teachers[name]

    def add_network(self, name: str, network_plan: dict | None = None, module: torch.nn.Module | None = None,
                    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None
                    ) -> torch.nn.Module:
        """A further network trained beside the main one; returns it, ready to call in ``train_step``.

        Give ``network_plan`` for a segmenter built like the main one (``build_network``): it is a
        member of the trained model, and prediction averages the members' probabilities (or uses
        one, ``--member``). Give ``module`` for a part used in training only (e.g. a projection
        head). Either way the network gets its own optimizer (the main one's settings, or
        ``optimizer(parameters)``) and poly LR schedule, is wrapped in DDP like the main network,
        has its gradients clipped and stepped after the one backward of the step's loss, follows
        the main network's train/eval mode, and is checkpointed, resumed and restored with it.
        Call it from ``on_train_start``.
        """
        if (network_plan is None) == (module is None):
            raise ValueError("add_network needs exactly one of network_plan (a member) or module (training only)")
        taken = {self.network_name, *self.extra_networks, *self.teachers}
        if name in taken:
            raise ValueError(f"network name {name!r} is taken (names in use: {', '.join(sorted(taken))})")
        if network_plan is not None:
            network_plan = dict(network_plan)
            module = build_network(network_plan, self.plans["in_channels"], self.num_prompts)
            if self._warm_source is not None:
                self._warm_source.load_member(name, network_plan, module)
        model = module.to(self.device)
        network = self._wrap(model)
        chosen = (optimizer or self._make_optimizer)(model.parameters())
        self.extra_networks[name] = ExtraNetwork(model, network, chosen, self._make_scheduler(chosen), network_plan)
        return network

    def starts_untrained(self, name: str) -> None:
        """Says that the further network ``name`` (added as a ``module``, which a warm start never
        loads) starts untrained although the method needs it trained: under ``--init-from`` the
        warm-up stage (``warm_up_setting``) is then kept to train it, and the log says so."""
        if self._warm_source is not None:
            self._warm_source.leave(name)

    def add_second_network(self, architecture: str, base_features: int) -> torch.nn.Module:
        """The second segmenter of a two-network method, a member beside the main one: the
        architecture ``architectures.second_network`` picks for this plan (``second_name``), named
        in the training log."""
        self.second_name, plan = second_network(type(self).__name__, self.network_plan(), self.effective.all_patch_sizes,
                                                architecture, base_features)
        network = self.add_network(self.second_name, plan)
        if self.is_main:
            self.log.write(f"second network: {self.second_name} (second_architecture {architecture})")
        return network

    def members(self) -> dict[str, torch.nn.Module]:
        """The networks that predict, by name: the main one, then every extra network with a plan
        (only the main one where the method never starts: ``supervised_throughout``)."""
        if self.supervised_throughout:
            return {self.network_name: self.model}
        return {self.network_name: self.model,
                **{name: e.model for name, e in self.extra_networks.items() if e.network_plan is not None}}

    def predict_logits(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """What the trained model says, as logits: the main network's, or, with several members, the
        log of the mean of their probabilities (so a softmax of it is the members' mean)."""
        members = list(self.members().values())
        if len(members) == 1:
            return members[0](x, prompts)
        mean = sum(torch.softmax(m(x, prompts).float(), dim=-4) for m in members) / len(members)
        return torch.log(mean.clamp_min(1e-12))

    def train_mode(self, mode: bool = True) -> None:
        """The main network and every extra network in training (or eval) mode."""
        self.network.train(mode)
        for extra in self.extra_networks.values():
            extra.network.train(mode)

    def extra_state(self) -> dict:
        """Method state to checkpoint besides network and optimizer (e.g. a teacher)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ----- setup -----
    def setup(self, warm_start: bool = True) -> None:
        """Data, networks, optimizers; ``warm_start``: from ``config.init_from`` if set (False when
        the run's own checkpoint is resumed instead)."""
        torch.manual_seed(self.config.seed)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        train = self.split["train_labeled"] + (self.split["train_unlabeled"] if self.uses_unlabeled else [])
        self.absent_views = self._absent_views(train)
        view_keys = [key for view, keys in self.absent_views if view.cached for key in keys]
        self.store = CaseStore(self.plans, self.plans_root, self.configuration, train + self.split["val"] + view_keys)
        self.model = self.build_network().to(self.device)
        divisor = getattr(self.model, "divisor", (1, 1, 1))
        for patch in self.effective.all_patch_sizes:
            if any(p % d for p, d in zip(patch, divisor)):
                raise input_error("--patch-size", f"patch {patch} is not divisible by the network's "
                                                  f"downsampling {list(divisor)}", "choose multiples of it")
        if warm_start and self.config.init_from:
            # before on_train_start: the teachers made there copy the loaded weights
            self._warm_source = WarmStart(self.config.init_from, self.network_plan(), self.plans)
            self._warm_source.load_main(self.model, self.network_name)
        self.network = self._wrap(self.model)
        self.optimizer = self._make_optimizer(self.model.parameters())
        self.scheduler = self._make_scheduler(self.optimizer)
        self.autocast_dtype = autocast_dtype(self.config.precision, self.config.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        seed = self.config.seed * 1000 + self.rank
        self.labeled_source = BatchSource(self.store, self.split["train_labeled"], self.plans,
                                          self._stream(True, augment=True), seed, "labeled", self.absent_views)
        self.unlabeled_source = BatchSource(self.store, self.split["train_unlabeled"], self.plans,
                                            self._stream(False, augment=True, batch_size=self.unlabeled_batch_size),
                                            seed, "unlabeled") \
            if self.uses_unlabeled and self.split["train_unlabeled"] else None
        self.val_source = BatchSource(self.store, self.split["val"], self.plans, self._stream(True, augment=False),
                                      self.config.seed, "validation") if self.split["val"] else None
        self.on_train_start()
        if self._warm_source is not None:
            self._finish_warm_start(self._warm_source)
            self._warm_source = None

    def _finish_warm_start(self, source: WarmStart) -> None:
        """Skips the warm-up stage (``warm_up_setting``) when the checkpoint gave every member, and
        records and logs the start.

        The warm-up stage's share becomes 0 (also in ``config.method``, so ``--continue`` keeps it):
        the run starts in the stage after it with the whole schedule, the poly LR from its first
        value and the method's ramp-ups from 0, as a new run of that stage would; a pre-trained
        checkpoint is what the warm-up stage would have produced, and a fine-tune wants the full
        LR and enough epochs. A stage that would train a member the checkpoint lacks is kept.
        """
        skipped = self.warm_up_setting if self.warm_up_setting and not source.left else None
        if skipped:
            self.settings[skipped] = self.config.method[skipped] = 0
        self.warm_start = {**source.record(), "skipped_stage": skipped}
        if not self.is_main:
            return
        self.log.write(source.headline)
        for name in source.left:
            self.log.write(f"warm start: network {name!r} left as initialised (the checkpoint holds no member "
                           f"{name!r} of its plan)")
        if skipped:
            self.log.write(f"warm start: stage 1 skipped ({skipped} 0), training starts in stage {self.stage}")
        elif self.warm_up_setting and self.stage == 1:
            self.log.write(f"warm start: stage 1 kept, it trains {', '.join(source.left)} first")

    def _absent_views(self, train: list[str]) -> list[tuple[AbsentView, list[str]]]:
        """The other datasets' views of the training images where declared absences are learnt too
        (``model.absent_views``), each with the store keys of its cases: the dataset's training cases."""
        if not (self.config.absent_views and self.declares_absence):
            return []
        views = []
        for view in trained_views(self.plans, self.configuration, self.effective.patch_for):
            cases = [key.split("/", 1)[1] for key in train if key.split("/", 1)[0] == view.dataset]
            if cases:
                views.append((view, [f"{view.folder}/{case}" for case in cases]))
        return views

    def _stream(self, labeled: bool, augment: bool, batch_size: int | None = None) -> StreamSettings:
        augmentation = self.config.augmentation if augment else type(self.config.augmentation)(enabled=False)
        return StreamSettings(batch_size or self.batch_size, self.patch_size, labeled, self.config.oversample_foreground,
                              augmentation, self.spatial_dims, self.effective.dataset_patch_sizes,
                              self.config.dataset_batches if augment else "one")  # validation: one dataset per batch

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module a step calls: DDP across processes, compiled on CUDA when asked."""
        network = model
        if self.world_size > 1:
            network = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.compile and self.device.type == "cuda":
            network = torch.compile(network)
        return network

    def _make_optimizer(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=c.learning_rate, momentum=c.momentum,
                                   weight_decay=c.weight_decay, nesterov=True)
        if c.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=c.learning_rate, betas=tuple(c.adam_betas),
                                    weight_decay=c.weight_decay)
        raise input_error("--optimizer", f"unknown optimizer {c.optimizer!r}", "use sgd or adam")

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Poly decay per epoch (it reads ``config.epochs`` when it steps: a time budget may set it later)."""
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: (1 - min(epoch, self.config.epochs - 1) / self.config.epochs) ** self.config.poly_exponent)

    def learning_rate_factor(self, epoch: int) -> float:
        """The poly schedule's factor of the initial learning rate at ``epoch`` (``_make_scheduler``)."""
        return (1 - min(epoch, self.config.epochs - 1) / self.config.epochs) ** self.config.poly_exponent

    def learning_rate_share(self, start_epoch: int) -> float:
        """How far the learning rate has decayed since ``start_epoch``: 0 there, towards 1 at the end
        (1 - lr(epoch) / lr(start)). Methods use it to trust their own outputs more as training
        settles (M&N's learning-rate-guided sampling). A constant learning rate (``poly_exponent`` 0)
        gives the share of the epochs since ``start_epoch`` instead."""
        if self.epoch < start_epoch:
            return 0.0
        if self.config.poly_exponent <= 0:
            return (self.epoch - start_epoch) / max(1, self.config.epochs - start_epoch)
        return 1 - self.learning_rate_factor(self.epoch) / self.learning_rate_factor(start_epoch)

    def _optimized(self) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """(model, optimizer) of the main network, then of every extra network."""
        return [(self.model, self.optimizer)] + [(e.model, e.optimizer) for e in self.extra_networks.values()]

    # ----- checkpoints -----
    def checkpoint_path(self, kind: str) -> Path:
        return checkpoint_file(self.output_folder, kind)

    def save(self, kind: str) -> None:
        if self.is_main:
            save_checkpoint(self.checkpoint_path(kind), self.checkpoint_contents())

    def checkpoint_contents(self) -> dict:
        """What a checkpoint holds (``versemi.model.checkpoint``): the run, the model as trained,
        the trainer's state and the random generators."""
        return {
            "trainer": type(self).__name__, "fold": self.fold, "configuration": self.configuration,
            "config": self.config.to_dict(), "plans": self.plans,
            # the patch and network as trained, so prediction rebuilds it without a Trainer (unless a method
            # builds its own network); further networks (add_network) carry their plans in "networks"
            "patch_size": list(self.patch_size),
            "dataset_patch_sizes": self.effective.dataset_patch_sizes,
            "network_plan": self.network_plan() if type(self).build_network is Trainer.build_network else None,
            "network_name": self.network_name,
            **TrainerState.capture(self).to_checkpoint(),
            "rng": random_state(),
        }

    def saved_checkpoint(self) -> Path | None:
        """checkpoint_latest (or final) of this run; None when there is none yet."""
        return next((path for path in map(self.checkpoint_path, ("latest", "final")) if path.is_file()), None)

    def resume(self) -> bool:
        """Continue from ``saved_checkpoint``; False when there is none yet."""
        path = self.saved_checkpoint()
        if path is None:
            return False
        checkpoint = load_checkpoint(path, self.device)
        TrainerState.from_checkpoint(checkpoint).apply(self, path)
        set_random_state(checkpoint["rng"])
        return True

    def method_state(self) -> dict:
        """The teachers' weights (by name) and the method's own extra state."""
        return {**{name: t.network.state_dict() for name, t in self.teachers.items()}, **self.extra_state()}

    def load_method_state(self, state: dict) -> None:
        for name, teacher in self.teachers.items():
            teacher.network.load_state_dict(state[name])
        self.load_extra_state(state)

    # ----- the loop -----
    def seed_iteration(self, iteration: int) -> None:
        """Seed every generator from the iteration number: a resumed run repeats the same draws."""
        seed = zlib.crc32(f"{self.config.seed}/{self.rank}/{iteration}".encode())
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _log_unsaved_settings(self) -> None:
        """A resumed run saved before method settings were stored in full: say which settings it
        takes from this version's defaults (a default may have changed since it started)."""
        missing = unsaved(self.method_defaults, self.method_presets, self.config.method)
        if missing:
            self.log.write("method settings not saved with this run (an earlier version stored only those given) "
                           "take this version's defaults: "
                           + ", ".join(f"{key}={self.settings[key]!r}" for key in missing))

    def run(self, resume: bool = False) -> None:
        resuming = resume and self.saved_checkpoint() is not None
        self.setup(warm_start=not resuming)  # a resumed run is not warm-started again
        resumed = resuming and self.resume()
        timed_here = not resumed and bool(self.config.time_budget) and not self.config.budget
        if timed_here:
            self.config.budget = fit_schedule(self)
            if self.is_main:
                self.log.write(self.config.budget["message"])
                print(self.config.budget["message"], flush=True)
        self.resolve_warm_up()
        if resumed and self.is_main:
            self.log.write(f"resumed at epoch {self.epoch}")
            self._log_unsaved_settings()
        elif self.is_main:
            precision = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "float32"
            own = "".join(f", {name} its own {patch} x {self.labeled_source.batch_size_for(patch)}"
                          for name, patch in (self.effective.dataset_patch_sizes or {}).items())
            self.log.write(f"{type(self).__name__} fold {self.fold}: patch {self.patch_size}{own}, batch {self.batch_size} "
                           f"x {self.world_size} process(es) "
                           f"(+{self.unlabeled_batch_size if self.uses_unlabeled else 0} unlabeled), {self.config.epochs} epochs of "
                           f"{self.config.iterations_per_epoch} iterations on {self.device} in {precision}; "
                           f"method settings {self.settings}")
            if self.network_size_note:
                self.log.write(self.network_size_note)
            if self.effective.dataset_patch_sizes:
                self.log.write(f"each step trains a sub-batch of each of the {len(self.plans['dataset_names'])} "
                               "datasets at its own patch, gradients accumulated into one optimizer step"
                               if self.config.dataset_batches == "each" else "each step trains on one dataset")
            if self.effective.dataset_patch_sizes and self.config.optimizer == "sgd":
                self.log.write("note: with batches of one dataset (patches per dataset), SGD stalled at the start of "
                               "joint runs where Adam learnt (benchmarks/RESULTS.md): consider --optimizer adam --lr 3e-3")
            elif self.effective.dataset_patch_sizes:
                self.log.write(f"optimizer {self.config.optimizer}, lr {self.config.learning_rate:g} (a plan with patches "
                               "per dataset trains with Adam 3e-3 unless --optimizer is given)")
            if self.declares_absence:
                self.log.write(self.known_absent_note())
            if self.uses_unlabeled:
                self.log.write(describe_warm_up(self.config.supervised_warm_up, self.warm_up_epochs, self.config.epochs,
                                                self.config.iterations_per_epoch, self.warm_start is not None))
        self.config.method = pinned(self.settings, self.config.method)  # so --continue keeps them
        self.training_batches = self.batches_left()
        while self.epoch < self.config.epochs:
            started = time.time()
            if self.warm_up_epochs and self.epoch == self.warm_up_epochs:
                self.on_warm_up_end()
            if self.epoch in self.method_stage_epochs():
                self.on_stage_start(self.stage)
            self.on_epoch_start()
            train_loss, iteration_losses, terms = self.train_epoch()
            val_loss, dice = self.validate_epoch()
            lr = self.optimizer.param_groups[0]["lr"]
            self.epoch += 1
            if check_against_clock(self, timed_here):  # before the next epoch's LR, which reads the epochs
                self.training_batches = self.batches_left()
            self.scheduler.step()
            for extra in self.extra_networks.values():
                extra.scheduler.step()
            self._record_epoch(train_loss, iteration_losses, terms, val_loss, dice, lr, time.time() - started)
        self.save("final")
        if self.is_main and self.split["val"]:
            summary = sliding_window_validation(self)
            self.log.write(f"validation summary: mean Dice {summary['mean_dice']}")
        if self.is_main:
            self.log.write("training done")

    def batches_left(self):
        """The batches of the schedule from the current epoch to its end."""
        per_epoch = self.config.iterations_per_epoch
        return self.batch_stream(self.epoch * per_epoch, self.config.epochs * per_epoch)

    def batch_stream(self, start: int, stop: int):
        """(labeled, unlabeled or None) batches ``start`` .. ``stop - 1``.

        The background workers are started once per run, not per epoch: fewer process starts, and
        no fork after validation has used the data in this process. The unlabeled workers start
        only at ``first_unlabeled_iteration()``: the warm-up, or a stage that does not use unlabeled
        data, does not pay for it.
        """
        workers = self.config.num_workers
        labeled = batch_loader(self.labeled_source, start, stop, workers)
        first = self.first_unlabeled_iteration()
        if first is None or first >= stop:
            yield from ((batch, None) for batch in labeled)
            return
        unlabeled = None
        for iteration, batch in zip(range(start, stop), labeled):
            if iteration >= first and unlabeled is None:
                unlabeled = iter(batch_loader(self.unlabeled_source, iteration, stop, workers))
            yield batch, (next(unlabeled) if unlabeled is not None else None)

    def optimize(self, iteration: int, labeled: dict, unlabeled: dict | None) -> dict[str, float]:
        """One optimizer step on batch number ``iteration``; returns every loss term as a float."""
        self.seed_iteration(iteration)
        self.current_iteration = iteration
        optimized = self._optimized()
        for _, optimizer in optimized:
            optimizer.zero_grad(set_to_none=True)
        terms = self._accumulate(labeled, unlabeled)
        for model, optimizer in optimized:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.grad_clip)
        for _, optimizer in optimized:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.after_optimizer_step(iteration)
        return {name: float(value.detach()) for name, value in terms.items()}

    def _accumulate(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """The gradients of one optimizer step, and its terms. A step of sub-batches (one per dataset,
        each at its own patch: ``dataset_batches`` "each") runs the step once per sub-batch, labeled
        and unlabeled of the same dataset, and backpropagates the mean of their losses one sub-batch
        at a time (only one sub-batch's activations are held); its terms are the means, plus the
        loss of each dataset (``loss_<dataset>``)."""
        step = self.warm_up_step if self.in_warm_up else self.train_step
        pairs = sub_batch_pairs(labeled, unlabeled)
        terms: dict[str, torch.Tensor] = {}
        names = self.plans["dataset_names"]
        for own, other in pairs:
            own = self._to_device(own)
            other = self._to_device(other) if other is not None else None
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                part = step(own, other)
            # one backward per sub-batch; each optimizer steps its own parameters after the last
            self.scaler.scale(part["loss"] / len(pairs)).backward()
            for name, value in part.items():
                terms[name] = terms.get(name, 0) + value.detach() / len(pairs)
            if len(pairs) > 1:
                terms[f"loss_{names[int(own['dataset'][0])]}"] = part["loss"].detach()
        if labeled.get("absent_views"):
            views = self.absent_view_loss([self._to_device(view) for view in labeled["absent_views"]])
            terms["known_absent_views"] = views
            terms["loss"] = terms["loss"] + views
        return terms

    def absent_view_loss(self, views: list[dict]) -> torch.Tensor:
        """The declared absences on the other datasets' views of the images (``model.absent_views``):
        the exclusion loss of every predicting network (only the main one in the warm-up), mean over
        views and networks, ramped up as in the supervised step and, once the method runs, weighted as
        the method weighs the absences on its own images (``weight_known_absent``, where it has one).
        Each view's backward runs at once, so only one view's activations are held; returns the loss,
        already backpropagated."""
        supervised = self.in_warm_up or self.supervised_throughout
        networks = [self.network] if supervised else \
            [self.network] + [e.network for e in self.extra_networks.values() if e.network_plan is not None]
        weight = self.known_absent_ramp() * (1.0 if supervised else self.settings.get("weight_known_absent", 1.0))
        total = torch.zeros((), device=self.device)
        if not weight:
            return total
        for network in networks:
            for view in views:
                x = view["data"]
                prompts = torch.arange(self.num_prompts, device=x.device).expand(x.shape[0], -1)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    loss = weight * exclusion_loss(finest(network(x, prompts)), self.absent_prompts(view["dataset"]))
                loss = loss / (len(views) * len(networks))
                self.scaler.scale(loss).backward()
                total = total + loss.detach()
        return total

    def train_epoch(self) -> tuple[float, list[float], dict[str, float]]:
        """Mean loss, the loss of each iteration, and the mean of every term of the epoch."""
        self.train_mode(True)
        n = self.config.iterations_per_epoch
        start = self.epoch * n
        losses, terms = [], {}
        self.data_wait = 0.0  # seconds the step waited for the loaders this epoch
        bar = progress_bar(itertools.islice(self.training_batches, n), total=n,
                           desc=f"epoch {self.epoch + 1}/{self.config.epochs}", show=self.is_main, leave=False)
        waiting = time.perf_counter()
        for offset, (labeled, unlabeled) in enumerate(bar):
            self.data_wait += time.perf_counter() - waiting
            step = self.optimize(start + offset, labeled, unlabeled)
            for name, value in step.items():
                terms.setdefault(name, []).append(value)
            losses.append(step["loss"])
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            waiting = time.perf_counter()
        return float(np.mean(losses)), losses, {name: float(np.mean(v)) for name, v in terms.items()}

    def snapshot(self) -> TrainerState:
        """A copy of everything a step changes (the time-budget warm-up puts it back afterwards)."""
        return copy.deepcopy(TrainerState.capture(self))

    def restore(self, state: TrainerState) -> None:
        state.apply(self)

    @torch.no_grad()
    def validate_epoch(self) -> tuple[float, dict[str, float]]:
        """Validation loss and pseudo-Dice per prompt on patches of the fold's validation cases (of
        the members' mean where the trainer trains several networks)."""
        if self.val_source is None or not self.is_main:
            return float("nan"), {}
        self.train_mode(False)
        counts, losses = {}, []
        for batch in batch_loader(self.val_source, 0, self.config.val_iterations, 0):
            batch = self._to_device(batch)
            logits = self.predict_logits(batch["data"], batch["prompt"])
            losses.append(float(self.loss(logits, batch["target"])))
            pseudo_dice_counts(logits, batch, counts)
        dice = {self.prompt_names[p]: 2 * tp / max(2 * tp + fp + fn, 1) for p, (tp, fp, fn) in sorted(counts.items())}
        return float(np.mean(losses)), dice

    def _record_epoch(self, train_loss, iteration_losses, terms, val_loss, dice, lr, seconds) -> None:
        if not self.is_main:
            return
        mean_dice = float(np.mean(list(dice.values()))) if dice else float("nan")
        previous = self.log.history["ema_dice"][-1] if self.log.history["ema_dice"] else None
        ema = mean_dice if previous is None or math.isnan(previous) else \
            EMA_DICE_MOMENTUM * previous + (1 - EMA_DICE_MOMENTUM) * mean_dice
        self.log.record(epoch=self.epoch, train_loss=train_loss, val_loss=val_loss, dice=dice, ema_dice=ema,
                        lr=lr, epoch_seconds=seconds, iteration_losses=iteration_losses, terms=terms,
                        data_wait_seconds=self.data_wait)
        remaining = seconds_left(self, seconds)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "loss")
        shown = f" ({shown})" if shown else ""
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
                  if self.device.type == "cuda" else "")
        self.log.write(f"epoch {self.epoch}/{self.config.epochs}: train loss {train_loss:.4f}{shown}, "
                       f"data wait {self.data_wait:.1f} s{memory}, "
                       f"val loss {val_loss:.4f}, "
                       f"pseudo-Dice {({k: round(v, 4) for k, v in dice.items()})}, {seconds:.1f} s, "
                       f"ETA {remaining / 60:.1f} min")
        if not math.isnan(ema) and ema > self.best_ema:
            self.best_ema = ema
            self.save("best")
        self.save("latest")
        self.log.plot()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def distributed_device(requested: str) -> str:
    """Join the process group when started by torchrun; returns this process's device."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return requested
    use_cuda = requested.startswith("cuda") and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def leave_process_group() -> None:
    """Leave the process group after a finished run. Without this, gloo's worker threads can outlive
    the interpreter and abort the process at exit ("terminate called without an active exception").
    Called only after success: after a failure the other processes may still be waiting in a
    collective, and leaving would hang them."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
