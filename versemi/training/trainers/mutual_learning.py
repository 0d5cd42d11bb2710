"""Deep mutual learning among partially labeled datasets (Liu, Qu, Xie, Shi and Song, "Deep Mutual
Learning among Partially Labeled Datasets for Multi-Organ Segmentation", arXiv:2407.12611, 2024).

The setting VerSemi is about: datasets that each label only some structures, and one model that
segments every structure of every dataset. Two networks (members of the trained model; prediction
averages them, ``-p all`` writes every structure as one label map) learn in two stages:

Stage 1, partial structures (``stage1_fraction`` of the epochs, labeled images only). Each
network learns each labeled image's own structure (Dice + CE with the sample's own prompt) and, because structures of
different datasets do not overlap, that the other datasets' structures are absent where the
image's own labels hold ("non-overlapping organ labels"). Mutual difference learning: the two
networks' bottleneck features are pushed apart (the positive part of their cosine similarity), so
that they see the image differently and their mean pseudo-labels better.

Stage 2, every structure. Frozen copies of both stage-1 networks pseudo-label, by their mean
probability, every structure an image's labels do not give: the other datasets' structures on
labeled images, every structure on unlabeled ones (voxels whose mean is at least
``pseudo_threshold`` confident, with weight ``pseudo_weight``); true labels and the exclusion
stay. Mutual similarity learning: each network's probabilities move towards the other's
(mean squared difference, each side's target detached), and the network with the lower
supervised loss on the batch hands its bottleneck features to the other as a target
(1 - cosine similarity; "dynamic feature similarity").

Deliberate differences from the paper. No public code exists and only its abstract and summary
were available, so every formula below is this project's reading, with its weights as settings:
- the paper's partial-organ and full-organ models are separate networks trained one after the
  other; here the same two networks continue into stage 2 (their stage-1 copies, frozen, make
  the pseudo-labels online rather than offline): one run, one budget, comparable with the others;
- two networks of the same plan started from different weights (the paper's pairs may differ in
  architecture);
- feature difference and similarity on the bottleneck, by cosine similarity; prediction
  similarity by mean squared difference of probabilities (deep mutual learning uses KL);
- unlabeled images of the datasets (the semi-supervised part) are pseudo-labeled in stage 2 like
  the structures a labeled image lacks;
- optional (``pseudo_reliability``, off by default as in the paper): each structure's
  pseudo-labels count by how well the frozen pair segments it, their Dice against the true labels
  of the structure's own dataset, accumulated over the labeled images of the stage-2 batches
  (training data only). Measured on the demo pair it changed nothing: at 12 minutes both settings
  score alike, and at 4 minutes (60 iterations) both predict nothing, the weighted run with its
  pseudo-labels weighted 0. There the networks have not learned to find a structure yet, with or
  without pseudo-labels (``benchmarks/RESULTS.md``);
- where the plan declares structures absent from a dataset's images (``known_absent``), they are
  learnt absent from its whole images, labeled and unlabeled (``exclusion_loss``, weighted by
  ``exclusion_weight``) and never pseudo-labeled there;
- ``exclusion`` assumes, as the paper does, that the datasets' structures never overlap; set its
  weight to 0 for datasets whose structures may contain each other (an organ and its tumour);
- with deep supervision, the supervised terms are nnU-Net's weighted sum; the others use the
  full resolution.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ...errors import input_error
from ..feature_taps import BackboneTap
from ..losses import exclusion_loss, finest, foreground_probability, masked_dice_ce, multiscale, prompt_columns
from ..prompts import DatasetPrompts
from ..pseudo_labels import confidence, hard_labels
from ..teacher import EMATeacher
from ..trainer import Trainer

DEFAULTS = {
    "stage1_fraction": 0.3,              # share of the epochs learning partial structures
    "exclusion_weight": 1.0,             # other datasets' structures absent where own labels hold
    "feature_difference_weight": 0.1,    # stage 1: the two networks' features pushed apart
    "pseudo_threshold": 0.9,             # stage 2: pseudo-labels where the frozen mean is this confident
    "pseudo_weight": 1.0,
    "pseudo_reliability": False,         # stage 2: a structure's pseudo-labels weighted by the frozen pair's Dice
    "prediction_similarity_weight": 0.5,  # stage 2: each network's probabilities towards the other's
    "feature_similarity_weight": 0.1,    # stage 2: the worse network's features towards the better's
}
# the paper's two stages of equal length, with hard pseudo-labels from the stage-1 models
PRESETS = {"paper": {**DEFAULTS, "stage1_fraction": 0.5, "pseudo_threshold": 0.5}}
PEER = "peer"


class MutualLearningTrainer(Trainer):
    """Two networks that learn partial structures apart, then every structure from each other."""

    uses_unlabeled = True
    method_defaults = DEFAULTS
    method_presets = PRESETS
    learns_known_absent = True
    # a warm start that loads both networks (a MutualLearningTrainer checkpoint) replaces stage 1: the
    # loaded pair is frozen as the pseudo-labelers; from a checkpoint without the peer, stage 1 stays,
    # since a frozen peer of initial weights would pseudo-label noise
    warm_up_setting = "stage1_fraction"

    def on_train_start(self) -> None:
        s = self.settings
        if not 0.0 <= s["stage1_fraction"] < 1.0:
            raise input_error("--method", f"stage1_fraction = {s['stage1_fraction']} must lie in [0, 1)",
                              "give the share of the epochs spent on partial structures, e.g. 0.3")
        if not 0.5 <= s["pseudo_threshold"] < 1.0:
            raise input_error("--method", f"pseudo_threshold = {s['pseudo_threshold']} must lie in [0.5, 1)",
                              "give the confidence a pseudo-label needs, e.g. 0.9 (0.5: every voxel)")
        negative = [k for k, v in s.items() if k.endswith("_weight") and v < 0]
        if negative:
            raise input_error("--method", f"{', '.join(negative)} must not be negative", "give weights >= 0")
        self.peer = self.add_network(PEER, self.network_plan())
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)
        # the frozen stage-1 networks (decay 1: they never follow the students); checkpointed by name
        self.teachers["stage1_main"] = EMATeacher(self.model, 1.0).to(self.device)
        self.teachers["stage1_peer"] = EMATeacher(self.extra_networks[PEER].model, 1.0).to(self.device)
        # per real prompt: 2 |frozen prediction & truth| and |frozen prediction| + |truth| on labeled images
        self.overlap = torch.zeros(2, len(self.dataset_prompts.indices), device=self.device, dtype=torch.float64)

    def extra_state(self) -> dict:
        return {"frozen_pair_overlap": self.overlap.clone()}

    def load_extra_state(self, state: dict) -> None:
        if "frozen_pair_overlap" in state:
            self.overlap.copy_(state["frozen_pair_overlap"])

    def reliability(self) -> torch.Tensor:
        """(R,) the frozen pair's Dice per real prompt so far (0 for a prompt not yet seen labeled)."""
        twice_shared, total = self.overlap
        return torch.where(total > 0, twice_shared / total.clamp_min(1e-8), torch.zeros_like(total)).float()

    def measure_reliability(self, frozen: torch.Tensor, own_column: torch.Tensor, target: torch.Tensor) -> None:
        """Adds the frozen pair's overlap with the labeled images' true labels (their own prompt)."""
        n = target.shape[0]
        predicted = (frozen[torch.arange(n, device=frozen.device), own_column] >= 0.5).double().flatten(1)
        truth = target[:, 0].double().flatten(1)
        step = torch.zeros_like(self.overlap)
        step[0].index_add_(0, own_column, 2 * (predicted * truth).sum(1))
        step[1].index_add_(0, own_column, predicted.sum(1) + truth.sum(1))
        if dist.is_initialized() and self.world_size > 1:  # every process weighs alike
            dist.all_reduce(step)
        self.overlap += step

    def stage_starts(self) -> list[int]:
        return [round(self.settings["stage1_fraction"] * self.method_epochs)]

    def unlabeled_from(self) -> int | None:
        """Unlabeled images are first used in stage 2: stage 1 learns from labels only."""
        return self.stage_starts()[0] * self.config.iterations_per_epoch

    def on_stage_start(self, stage: int) -> None:
        self.teachers["stage1_main"].copy_from(self.model)
        self.teachers["stage1_peer"].copy_from(self.extra_networks[PEER].model)

    def after_optimizer_step(self, iteration: int) -> None:
        """The stage-1 copies stay frozen: nothing follows the students."""

    # ----- the step -----
    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        real = self.dataset_prompts.indices                      # (R,) prompt indices
        n = labeled["data"].shape[0]
        images = labeled["data"] if unlabeled is None else torch.cat([labeled["data"], unlabeled["data"]])
        prompts = real.expand(images.shape[0], -1)               # every real prompt for every image
        own_column = (labeled["prompt"].to(real.device)[:, None] == real[None]).float().argmax(1)  # (n,)
        outputs, features = {}, {}
        for name, network in (("main", self.network), (PEER, self.peer)):
            with BackboneTap(network) as tap:
                outputs[name] = network(images, prompts)         # (B, R, 2, ...) or a deep-supervision list
            features[name] = tap.last.bottleneck.flatten(1)
        terms: dict[str, torch.Tensor] = {}
        supervised = {name: multiscale(self.loss, prompt_columns(logits, own_column), labeled["target"])
                      for name, logits in outputs.items()}
        terms["supervised"] = sum(supervised.values())
        probabilities = {name: foreground_probability(finest(logits)) for name, logits in outputs.items()}  # (B, R, ...)
        # other datasets' structures are absent where the labeled image's own labels hold, and
        # everywhere in the images of a dataset that declares them absent (plans known_absent)
        datasets = labeled["dataset"] if unlabeled is None else torch.cat([labeled["dataset"], unlabeled["dataset"]])
        declared = self.absent_prompts(datasets)[:, real]        # (B, R)
        other = (1 - self.dataset_prompts.own(labeled["dataset"])) * (1 - declared[:n])  # (n, R)
        where_own = labeled["foreground"][:, :1] > 0.5            # (n, 1, ...)
        terms["exclusion"] = self.settings["exclusion_weight"] * sum(
            self._absent(p[:n], where_own, other) for p in probabilities.values())
        if self.declares_absence:
            terms["known_absent"] = self.settings["exclusion_weight"] * sum(
                exclusion_loss(finest(logits), declared) for logits in outputs.values())
        cosine = torch.nn.functional.cosine_similarity(features["main"].float(), features[PEER].float(), dim=1)
        if self.stage == 1:
            terms["feature_difference"] = self.settings["feature_difference_weight"] * cosine.clamp_min(0).mean()
        else:
            terms.update(self._mutual_similarity(images, prompts, n, other, declared, probabilities, features,
                                                 supervised, outputs, own_column, labeled["target"]))
        terms["loss"] = sum(value for key, value in terms.items() if key != "pseudo_reliability")
        return terms

    def _mutual_similarity(self, images, prompts, n, other, declared, probabilities, features, supervised,
                           outputs, own_column, target) -> dict[str, torch.Tensor]:
        s = self.settings
        with torch.no_grad():
            frozen = (foreground_probability(finest(self.teachers["stage1_main"](images, prompts)))
                      + foreground_probability(finest(self.teachers["stage1_peer"](images, prompts)))) / 2
        # what an image's labels do not give: other datasets' structures (labeled), everything (unlabeled)
        missing = torch.ones(images.shape[0], prompts.shape[1], device=images.device)
        missing[:n] = other
        missing = missing * (1 - declared)  # a structure declared absent is learnt absent, not pseudo-labeled
        confident = (confidence(frozen) >= s["pseudo_threshold"]).float() * missing[(...,) + (None,) * 3]
        logged = {}
        if s["pseudo_reliability"]:
            self.measure_reliability(frozen[:n], own_column, target)
            reliability = self.reliability()
            confident = confident * reliability[None, :, None, None, None]
            logged["pseudo_reliability"] = reliability.mean().detach()  # logged, not a loss
        targets = hard_labels(frozen)
        pseudo = sum(self._pseudo_loss(finest(logits), targets, confident) for logits in outputs.values())
        similarity = sum(((probabilities[a] - probabilities[b].detach()) ** 2).mean()
                         for a, b in (("main", PEER), (PEER, "main")))
        better, worse = ("main", PEER) if supervised["main"] <= supervised[PEER] else (PEER, "main")
        transfer = 1 - torch.nn.functional.cosine_similarity(features[worse].float(),
                                                              features[better].detach().float(), dim=1).mean()
        return {**logged, "pseudo": s["pseudo_weight"] * pseudo,
                "prediction_similarity": s["prediction_similarity_weight"] * similarity,
                "feature_similarity": s["feature_similarity_weight"] * transfer}

    # ----- pieces -----
    @staticmethod
    def _absent(probability: torch.Tensor, where: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Mean foreground probability of the ``prompts`` (n, R) 0/1 columns at the ``where`` voxels:
        0 when the network rightly finds nothing there."""
        weight = where.float() * prompts[(...,) + (None,) * 3]   # (n, R, ...)
        return (probability * weight).sum() / weight.sum().clamp_min(1.0)

    @staticmethod
    def _pseudo_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Masked Dice + CE of every (image, prompt) pair against the pseudo-labels, where ``weight`` holds."""
        b, r = logits.shape[:2]
        return masked_dice_ce(logits.reshape(b * r, *logits.shape[2:]), targets.reshape(b * r, 1, *targets.shape[2:]),
                              weight.reshape(b * r, 1, *weight.shape[2:]))
