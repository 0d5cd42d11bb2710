"""C3S3: complementary competition and contrastive selection (He, Lin, Chen, Xu and Zheng, "C3S3:
Complementary Competition and Contrastive Selection for Semi-Supervised Medical Image
Segmentation", ICME 2025, arXiv 2506.07368; public code Y-TARL/C3S3, 3D LA and Pancreas-CT).

Two sub-networks of different architecture train side by side on the same batches. Per step:
- supervised Dice + CE of each network on the labeled samples (the mean over the two views);
- dynamic complementary competition (DCC): each network's score on the labeled samples is
  ``alpha * CE + (1 - alpha) * Dice`` (summed over the views); the one with the lower score
  teaches: its foreground probabilities on the unlabeled samples, sharpened with temperature T,
  are the detached targets of the other's (MSE, weight ``weight_pseudo`` x a sigmoid ramp-up);
- consistency: 1 - cosine similarity between the two views' logits, per network;
- outcome-driven contrastive learning (ODCL) on the projected full-resolution decoder features
  of the two networks at the same voxel (their cosine), for every pair of views: where both
  networks say foreground (the intersection of their predictions) the features are pulled
  together against every other voxel, and where neither does (outside the union) likewise; the
  voxels where the networks disagree, the boundaries, are negatives of both. It refines the
  boundaries. Its positives are the networks' own predictions, so its value moves when they flip.

Prediction averages the two networks (``--member unet`` or ``--member vnet`` picks one).

Networks: the plan's nnU-Net-style U-Net (``unet``, the main one) and the V-Net of the VerSemi
public code (``vnet``), both prompt-conditioned (``training.architectures``). They are the two
architectures ``versemi.nets`` offers, and they differ where it matters for complementary errors:
the U-Net has the plan's (possibly anisotropic) kernels and strides and concatenating skips at
every resolution, the V-Net isotropic 2x steps, additive skips, more convolutions per stage and
no full-resolution skip. ``second_architecture: "unet"`` gives a second U-Net of the plan's
topology (another initialisation) for patches that the V-Net cannot take (it needs multiples of 16);
``auto``, the default, takes the V-Net where it fits and the second U-Net elsewhere.

Deliberate differences from the public code:
- the public sub-networks are a V-Net and a ResNet-34-encoder network (batch norm, dropout 0.5);
  here a U-Net and a V-Net as above, without dropout; the V-Net has 16 base filters as there
  (``second_base_features``; fewer when the U-Net's first stage is narrower, e.g. with
  ``--features`` in quick runs);
- the two views: the public code feeds the same batch twice, the views differing only through
  dropout; these networks have none, so the second view adds Gaussian noise (``view_noise`` 0.1,
  clipped to +-0.2); ``two_views: false`` uses one view (half the cost, no consistency term, one
  contrastive pair);
- the contrastive loss (``losses.voxel_contrast``) is the public code's formula, written with a
  log-sum-exp so that it stays finite for any number of voxels;
- it contrasts ``contrast_voxels`` (8192) voxel positions drawn at random each step, the same for
  both networks and every view, instead of every voxel of the batch: the projection head is per
  voxel, so only those voxels are projected. Over every voxel (``contrast_voxels: 0``, the
  paper preset) a 40x64x80 LA step with two views took 94 s on one CPU core, with 8192 voxels
  32 s; the term's gradient is a softmax over the negatives either way. The public code builds
  its loss with ``sample_num=50`` and a top-k sampler it never calls;
- the public code adds the contrastive term to both networks' losses and back-propagates both,
  so its gradient counts twice: ``weight_contrastive`` 2.0 reproduces that;
- one optimizer per network (as there) with the trainer's settings and poly decay, instead of
  SGD (lr 0.01, momentum 0.9, weight decay 1e-4) decayed x0.1 every 2500 iterations;
- the sigmoid ramp-up runs over ``rampup_fraction`` of the epochs: the public ramp spans 40 x 150
  = 6000 iterations of a 2500-iteration run, so it never completes (2.4, the default);
- the cosine consistency is taken along the last spatial axis, as the public code does;
- several datasets: each unlabeled sample is asked one prompt drawn among its own dataset's
  (``DatasetPrompts``), the same for both networks and views; the labeled ones their own;
- with several processes (DDP) the competition scores are summed over the processes, so every
  process picks the same teacher;
- with deep supervision, the supervised terms and scores are nnU-Net's weighted sums over the
  output resolutions; the other terms use the full resolution;
- the final weights of both networks are kept (the public code stores both; the test script
  evaluates them).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...errors import input_error
from ..feature_taps import BackboneTap
from ..losses import finest, foreground_probability, multiscale, voxel_contrast
from ..prompts import DatasetPrompts
from ..pseudo_labels import sharpened
from ..schedules import sigmoid_rampup
from ..trainer import Trainer

DEFAULTS = {
    "alpha": 0.8,                 # competition score alpha CE + (1 - alpha) Dice (public LA; 0.5 Pancreas)
    "temperature": 0.1,           # sharpening of the teacher's probabilities
    "weight_pseudo": 0.1,         # the other network's MSE to them (public LA; 0.5 Pancreas)
    "rampup_fraction": 2.4,       # sigmoid ramp-up of weight_pseudo over this share of the epochs
    "weight_consistency": 1.0,    # 1 - cosine between the two views' logits, per network
    "weight_contrastive": 2.0,    # outcome-driven contrastive loss (the public code counts it twice)
    "contrastive_temperature": 0.1,
    "projector_dim": 64,          # projection head: 1x1x1 conv, PReLU, 1x1x1 conv to this many channels
    "contrast_voxels": 8192,      # voxel positions contrasted per step; 0: every voxel (the public code)
    "two_views": True,
    "view_noise": 0.1,            # std of the Gaussian noise of the second view (clipped to +-2 std)
    "second_architecture": "auto",  # the V-Net where the patch allows, else "unet" (training.architectures)
    "second_base_features": 16,   # the V-Net's first-stage width
}
PRESETS = {"paper": {**DEFAULTS, "contrast_voxels": 0}}


def projection_head(channels: int, dim: int) -> nn.Module:
    """Per-voxel projection of decoder features for the contrastive loss."""
    return nn.Sequential(nn.Conv3d(channels, channels, 1), nn.PReLU(), nn.Conv3d(channels, dim, 1))


def voxel_rows(volume: torch.Tensor, n_views: int) -> torch.Tensor:
    """(n_views * n, C, *S) -> (n_views, n * prod(S), C): each view's voxels as rows, in the same
    order for every view."""
    channels = volume.shape[1]
    per_view = volume.reshape(n_views, -1, channels, volume[0, 0].numel())
    return per_view.transpose(2, 3).reshape(n_views, -1, channels)


def project_rows(head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The per-voxel projection head on voxel rows (V, K, C): unit-length rows (V, K, D)."""
    projected = head(rows.transpose(1, 2)[..., None, None])  # a 1x1x1 head sees K voxels in a line
    return F.normalize(projected.flatten(2).transpose(1, 2).float(), dim=-1)


def outcome_contrast(unit_a: torch.Tensor, unit_b: torch.Tensor, foreground_a: torch.Tensor,
                     foreground_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """ODCL between two networks: the cosine of their unit-length features (K, D) at each of K
    voxels, contrasted twice, with the intersection of their foregrounds (K,) as positives and
    with the complement of the union as positives."""
    similarity = (unit_a * unit_b).sum(-1)
    both, either = foreground_a & foreground_b, foreground_a | foreground_b
    return voxel_contrast(similarity, both, temperature) + voxel_contrast(similarity, ~either, temperature)


class C3S3Trainer(Trainer):
    uses_unlabeled = True
    network_name = "unet"
    method_defaults = DEFAULTS
    method_presets = PRESETS

    def on_train_start(self) -> None:
        s = self.settings
        if not 0 <= s["alpha"] <= 1:
            raise input_error("--method", f"alpha {s['alpha']} is not in [0, 1]",
                              f"give alpha between 0 and 1 (default {DEFAULTS['alpha']})")
        for key in ("temperature", "contrastive_temperature", "rampup_fraction"):
            if not s[key] > 0:
                raise input_error("--method", f"{key} {s[key]} is not positive",
                                  f"give {key} > 0 (default {DEFAULTS[key]})")
        for key in ("weight_pseudo", "weight_consistency", "weight_contrastive", "view_noise"):
            if s[key] < 0:
                raise input_error("--method", f"{key} {s[key]} is negative",
                                  f"give {key} >= 0 (default {DEFAULTS[key]})")
        if not (isinstance(s["projector_dim"], int) and s["projector_dim"] >= 1):
            raise input_error("--method", f"projector_dim {s['projector_dim']} is not a positive whole number",
                              f"give projector_dim as a count (default {DEFAULTS['projector_dim']})")
        if not (isinstance(s["contrast_voxels"], int) and s["contrast_voxels"] >= 0):
            raise input_error("--method", f"contrast_voxels {s['contrast_voxels']} is not a whole number >= 0",
                              f"give contrast_voxels as a count, or 0 for every voxel "
                              f"(default {DEFAULTS['contrast_voxels']})")
        self.second = self.add_second_network(s["second_architecture"], s["second_base_features"])
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)
        self.projectors = {}
        if s["weight_contrastive"] > 0:  # a head that gets no gradient would stall DDP
            for name, model in self.members().items():
                head = projection_head(model.backbone.decoder_channels[0], s["projector_dim"])
                self.projectors[name] = self.add_network(f"projector_{name}", module=head)

    def pseudo_weight(self) -> float:
        s = self.settings
        return s["weight_pseudo"] * sigmoid_rampup(self.method_epoch / max(1e-8, s["rampup_fraction"] * self.method_epochs))

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The step's images once, or twice with the second view noised."""
        if not self.settings["two_views"]:
            return x
        sigma = self.settings["view_noise"]
        noise = torch.clamp(torch.randn_like(x) * sigma, -2 * sigma, 2 * sigma)
        return torch.cat([x, x + noise])

    def contrasted_voxels(self, count: int, device: torch.device) -> torch.Tensor | slice:
        """The voxel positions (of a view's n * prod(S)) that this step contrasts."""
        wanted = self.settings["contrast_voxels"]
        if wanted == 0 or wanted >= count:
            return slice(None)
        return torch.randperm(count, device=device)[:wanted]

    def teacher_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The competition scores (2,) summed over the processes: every process picks the same teacher."""
        if dist.is_initialized() and self.world_size > 1:
            scores = scores.clone()
            dist.all_reduce(scores)
        return scores

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        n_labeled = labeled["data"].shape[0]
        x, prompts = labeled["data"], labeled["prompt"]
        if unlabeled is not None:
            x = torch.cat([x, unlabeled["data"]])
            prompts = torch.cat([prompts, self.dataset_prompts.draw(unlabeled["dataset"])])
        n = x.shape[0]
        batch = self.views(x)
        n_views = batch.shape[0] // n
        names = [self.network_name, self.second_name]
        outputs, decoders = {}, {}
        for name, network in zip(names, (self.network, self.second)):
            with BackboneTap(network) as tap:  # one forward per network and step (DDP)
                outputs[name] = network(batch, prompts.repeat(n_views))
            decoders[name] = tap.last.decoder

        def rows(logits, view: int, labeled_part: bool):
            """One view's labeled (or unlabeled) samples, at every output level."""
            start = view * n
            chosen = slice(start, start + n_labeled) if labeled_part else slice(start + n_labeled, start + n)
            return logits[chosen] if torch.is_tensor(logits) else [level[chosen] for level in logits]

        target = labeled["target"]
        terms: dict[str, torch.Tensor] = {}
        supervised, scores = [], []
        for name in names:
            dice = [multiscale(self.loss.dice, rows(outputs[name], v, True), target) for v in range(n_views)]
            ce = [multiscale(self.loss.cross_entropy, rows(outputs[name], v, True), target)
                  for v in range(n_views)]
            supervised.append(sum(d + c for d, c in zip(dice, ce)) / n_views)
            scores.append(sum(s["alpha"] * c + (1 - s["alpha"]) * d for d, c in zip(dice, ce)).detach())
        terms["supervised"] = supervised[0] + supervised[1]
        teacher = int(torch.argmin(self.teacher_scores(torch.stack(scores))))  # ties: the main network teaches
        terms["second_teaches"] = torch.tensor(float(teacher), device=x.device)  # logged: the share of steps
        if unlabeled is not None:
            student = 1 - teacher
            pseudo = 0.0
            for v in range(n_views):
                taught = foreground_probability(finest(rows(outputs[names[student]], v, False)))
                with torch.no_grad():
                    target_u = sharpened(foreground_probability(finest(rows(outputs[names[teacher]], v, False))),
                                         s["temperature"])
                pseudo = pseudo + F.mse_loss(taught, target_u)
            terms["pseudo"] = self.pseudo_weight() * pseudo
        if n_views == 2:
            terms["consistency"] = s["weight_consistency"] * sum(
                1 - F.cosine_similarity(finest(outputs[name])[:n].float(), finest(outputs[name])[n:].float(),
                                        dim=-1).mean()
                for name in names)
        if self.projectors:
            chosen = self.contrasted_voxels(n * batch[0, 0].numel(), x.device)
            features, foreground = {}, {}
            for name in names:  # unit length per voxel, once for every pair of views
                features[name] = project_rows(self.projectors[name], voxel_rows(decoders[name], n_views)[:, chosen])
                predicted = (finest(outputs[name]).argmax(1) == 1).unsqueeze(1)
                foreground[name] = voxel_rows(predicted, n_views)[:, chosen, 0]
            contrast = 0.0
            for va, vb in itertools.product(range(n_views), repeat=2):
                contrast = contrast + outcome_contrast(features[names[0]][va], features[names[1]][vb],
                                                       foreground[names[0]][va], foreground[names[1]][vb],
                                                       s["contrastive_temperature"])
            terms["contrastive"] = s["weight_contrastive"] * contrast
        terms["loss"] = sum(value for key, value in terms.items() if key != "second_teaches")
        return terms
