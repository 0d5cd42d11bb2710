"""M&N (Yeung et al., "Semi-supervised 3D medical segmentation from 2D natural images pretrained
model"; public code pakheiyeung/M-N): a 2d network and the plan's 3d network, co-trained on each
other's pseudo-masks. Trains the 3d configuration; prediction uses the 3d network alone.

- **The 2d network** is the plan's 2d configuration's U-Net (its CPU preset on a CPU), run slice
  by slice over the same 3d patches (``training.slices``), so its masks land voxel for voxel on
  the 3d network's. The paper starts it from a model pretrained on natural images (a SegFormer with
  LoRA); nothing is downloaded here: ``--pretrained-2d PATH`` takes such weights from the user (a
  state dict of the 2d network, or a versemi checkpoint of a 2d run of this experiment: its
  network plan is then used). Without it (``pretrained_2d`` "auto"), this project's own 2d
  configuration stands in for the pretrained model: the 2d network starts from this experiment's
  SupervisedTrainer 2d run of the same fold, trained on the same labeled scans (``versemi_train 2d
  FOLD -tr SupervisedTrainer``), where it has finished; otherwise (and with ``pretrained_2d`` "")
  from random weights, trained in stage 1, also after a warm start of the 3d network. Measured on
  the hippocampus (benchmarks/RESULTS.md, continuing a converged 3d model for 20 minutes): with a
  2d partner from a converged 2d run M&N gained +0.07 Dice over SupervisedTrainer (3 seeds), and
  its 2d network ended 0.71 Dice above SupervisedTrainer continuing that 2d run (3 seeds each);
  with a 2d network from random weights it lost 1.67.
- **Stage 1** (``transition_fraction`` of the method's epochs): both networks learn the labeled
  patches (Dice + CE; the 2d network on their slices).
- **Stage 2**: each network learns a batch of labeled patches and unlabeled patches whose targets
  are the other network's hard masks on them. The share of unlabeled rows in the batch is
  learning-rate guided (``sampling`` "learning_rate", ``Trainer.learning_rate_share``): 0 when
  stage 2 starts, rising as the learning rate decays (the models settle), at least one labeled
  row kept; ``sampling`` "linear" is the public code's epoch-linear ramp.

Choices the text leaves open, or differences from the public code:
- both networks learn in every step of stage 2 (one forward each over the same images: each
  one's output, detached, is the other's target), where the public code alternates epochs between
  them (``freq_switch``) and re-labels the unlabeled scans with the 3d model between stages;
- the loss is the Dice + CE of every trainer here on the other network's hard mask (p > 0.5),
  where the public code uses Dice + KL on its soft output;
- one poly learning-rate schedule for both (the public code: linear warm-up, then cosine with
  restarts); the same optimizer settings for both networks;
- several prompts: each unlabeled patch is asked one prompt of its own dataset, drawn at random,
  by both networks;
- the shared supervised warm-up trains both networks on their own labeled loss, which is stage 1:
  with it, ``transition_fraction`` can be 0.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import input_error
from ...model.layout import checkpoint_file, model_folder
from ...model.plans_view import PlansView
from ...nets import build_network
from ..losses import foreground_probability, multiscale
from ..prompts import DatasetPrompts
from ..pseudo_labels import hard_labels
from ..slices import through_slices
from ..trainer import Trainer

CONFIGURATION_2D = "2d"
AUTO = "auto"
OWN_2D_TRAINER = "SupervisedTrainer"  # the 2d run that stands in for the paper's pretrained 2d model
SAMPLINGS = ("learning_rate", "linear")
DEFAULTS = {
    "transition_fraction": 0.3,   # stage 1: both networks on labeled patches only
    "sampling": "learning_rate",  # the unlabeled share of a stage-2 batch: from the LR decay, or linear
    "pretrained_2d": AUTO,        # weights of the 2d network (--pretrained-2d); auto: the experiment's own 2d run; "": none
}
PRESETS = {"paper": {**DEFAULTS, "sampling": "linear"}}
PRETRAINED_FORMAT = ("a PyTorch file holding the state dict of this experiment's 2d network (torch.save(network."
                     "state_dict(), PATH) of the network versemi.nets.build_network makes from the plan's "
                     "configurations.2d network), or a versemi checkpoint of a 2d run (versemi_train 2d ...) of "
                     "an experiment with the same prompts and channels")


class MNTrainer(Trainer):
    """The plan's 3d network and a 2d network co-trained on each other's masks (module docstring)."""

    uses_unlabeled = True
    method_defaults = DEFAULTS
    method_presets = PRESETS
    warm_up_setting = "transition_fraction"  # a warm start (a trained 3d model) skips stage 1 where it gives both

    def on_train_start(self) -> None:
        s = self.settings
        if self.spatial_dims != 3:
            raise input_error(f"versemi_train {self.configuration} -tr MNTrainer",
                              "M&N co-trains a 2d network with the plan's 3d network", "train the 3d configuration: "
                                                                                        "versemi_train 3d_fullres FOLD -tr MNTrainer")
        if s["sampling"] not in SAMPLINGS:
            raise input_error("--method", f"sampling {s['sampling']!r} is unknown", f"use one of {', '.join(SAMPLINGS)}")
        if not 0 <= s["transition_fraction"] <= 1:
            raise input_error("--method", f"transition_fraction {s['transition_fraction']} is not in [0, 1]",
                              "give the share of the method's epochs trained on labeled patches only, e.g. 0.3")
        plan, weights = self.network_2d_plan()
        self.network_2d = self.add_network("network_2d", module=build_network(plan, self.plans["in_channels"],
                                                                               self.num_prompts))
        if weights is None:
            self.starts_untrained("network_2d")  # a warm start of the 3d network keeps stage 1 to train it
        else:
            try:
                self.extra_networks["network_2d"].model.load_state_dict(weights)
            except RuntimeError as exc:
                raise input_error(s["pretrained_2d"], "does not fit the 2d network of this plan "
                                                      f"({str(exc).splitlines()[0][:200]} ...)",
                                  f"give --pretrained-2d {PRETRAINED_FORMAT}") from exc
        self.divisor_2d = tuple(self.extra_networks["network_2d"].model.divisor)
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)

    def network_2d_plan(self) -> tuple[dict, dict | None]:
        """(the 2d network's plan, its pretrained weights or None)."""
        view = PlansView(self.plans)
        if self.settings["pretrained_2d"] == AUTO:
            self.settings["pretrained_2d"] = self.config.method["pretrained_2d"] = self.own_2d_run()
        if self.settings["pretrained_2d"]:
            return load_pretrained_2d(Path(self.settings["pretrained_2d"]), self.default_2d_plan(view))
        return self.default_2d_plan(view), None

    def own_2d_run(self) -> str:
        """The final checkpoint of this experiment's SupervisedTrainer 2d run of the same fold, or ""
        where there is none; resolved once and kept in the run's settings, so ``--continue`` and the
        checkpoint name the file that was used."""
        found = checkpoint_file(model_folder(self.output_folder.parent.parent, OWN_2D_TRAINER, CONFIGURATION_2D)
                                / self.output_folder.name, "final")
        if self.is_main:
            self.log.write(f"M&N's 2d network starts from {found}, this experiment's own 2d run" if found.is_file()
                           else f"M&N's 2d network starts from random weights: no 2d run at {found}; train one "
                                f"first (versemi_train 2d {self.fold} -tr {OWN_2D_TRAINER}) to start from it, as "
                                "the measured gain did")
        return str(found) if found.is_file() else ""

    def default_2d_plan(self, view: PlansView) -> dict:
        if not view.has_configuration(CONFIGURATION_2D):
            raise input_error("plans.json", "has no 2d configuration, which M&N's 2d network is built from (planned "
                                            "by an earlier version)", "plan the experiment again "
                                                                      "(versemi_plan_and_preprocess adds it)")
        configuration = view.configuration(CONFIGURATION_2D)
        plan = {**configuration["network"], "deep_supervision": False}
        wanted = self.config.features or (configuration["cpu_preset"]["features"] if self.config.network_size == "cpu"
                                          else None)
        if wanted:  # the 3d run's size: the same override, or the 2d CPU preset beside the 3d one
            plan["features"] = [wanted[min(i, len(wanted) - 1)] for i in range(len(plan["strides"]))]
        return plan

    def transition_epochs(self) -> int:
        return round(self.settings["transition_fraction"] * self.method_epochs)

    def stage_starts(self) -> list[int]:
        return [self.transition_epochs()]

    def unlabeled_from(self) -> int:
        return self.transition_epochs() * self.config.iterations_per_epoch

    def pseudo_rows(self, batch: int) -> int:
        """Unlabeled rows of a stage-2 batch of ``batch`` rows (at least one row stays labeled)."""
        start = self.warm_up_epochs + self.transition_epochs()
        if self.settings["sampling"] == "linear":
            share = (self.epoch - start) / max(1, self.config.epochs - start)
        else:
            share = self.learning_rate_share(start)
        return min(batch - 1, int(share * batch))

    def both_losses(self, images: torch.Tensor, prompts: torch.Tensor, targets_3d: torch.Tensor,
                    targets_2d: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Dice + CE of the 3d network and of the 2d network (slice by slice) on ``images``; the 2d
        network's targets are ``targets_2d`` (default: the 3d network's)."""
        logits_3d = self.network(images, prompts)
        logits_2d = through_slices(self.network_2d, images, prompts, self.divisor_2d)
        return {"network_3d": multiscale(self.loss, logits_3d, targets_3d),
                "network_2d": self.loss(logits_2d, targets_3d if targets_2d is None else targets_2d)}

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        if self.stage == 1 or unlabeled is None:
            terms = self.both_losses(labeled["data"], labeled["prompt"], labeled["target"])
            return {**terms, "loss": terms["network_3d"] + terms["network_2d"]}
        batch = labeled["data"].shape[0]
        pseudo = min(self.pseudo_rows(batch), unlabeled["data"].shape[0])
        kept = batch - pseudo
        images = torch.cat([labeled["data"][:kept], unlabeled["data"][:pseudo]])
        prompts = torch.cat([labeled["prompt"][:kept], self.dataset_prompts.draw(unlabeled["dataset"][:pseudo])])
        logits_3d = self.network(images, prompts)
        logits_2d = through_slices(self.network_2d, images, prompts, self.divisor_2d)
        known = labeled["target"][:kept]
        with torch.no_grad():  # each network's masks on the unlabeled rows teach the other
            from_2d = hard_labels(foreground_probability(logits_2d[kept:]))[:, None]
            full_3d = logits_3d if torch.is_tensor(logits_3d) else logits_3d[0]
            from_3d = hard_labels(foreground_probability(full_3d[kept:]))[:, None]
        terms = {"network_3d": multiscale(self.loss, logits_3d, torch.cat([known, from_2d])),
                 "network_2d": self.loss(logits_2d, torch.cat([known, from_3d])),
                 "pseudo_rows": torch.tensor(float(pseudo))}
        return {**terms, "loss": terms["network_3d"] + terms["network_2d"]}


def load_pretrained_2d(path: Path, default_plan: dict) -> tuple[dict, dict]:
    """(network plan, state dict) of user-supplied 2d weights; an input error naming the expected
    format when the file is not one."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as exc:
        raise input_error(path, "does not exist", f"give --pretrained-2d {PRETRAINED_FORMAT}") from exc
    except Exception as exc:  # any unreadable file: say what it should be
        raise input_error(path, f"is not a PyTorch file ({type(exc).__name__})",
                          f"give --pretrained-2d {PRETRAINED_FORMAT}") from exc
    plan, weights = default_plan, content
    if isinstance(content, dict) and "network" in content and "configuration" in content:  # a versemi checkpoint
        stored = content.get("network_plan") or {}
        if stored.get("spatial_dims") != 2:
            raise input_error(path, f"is a checkpoint of the {content['configuration']} configuration, not a 2d "
                                    "network", f"give --pretrained-2d {PRETRAINED_FORMAT}")
        plan, weights = stored, content["network"]
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise input_error(path, "holds no state dict of tensors", f"give --pretrained-2d {PRETRAINED_FORMAT}")
    return plan, weights
