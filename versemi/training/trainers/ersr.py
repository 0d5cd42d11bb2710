"""ERSR (Zhou et al., "ERSR: an ellipse-constrained pseudo-label refinement and symmetric
regularization framework for semi-supervised fetal head segmentation in ultrasound images",
arXiv 2508.19815, 2025; public code BioMedIA-repo/ERSR). A 2d method: it trains with the 2d
configuration only.

A mean teacher, both networks starting from a supervised model (here the shared supervised
warm-up, or ``--init-from``). Per step, beside the supervised loss:

1. **Dual-scoring adaptive filtering.** The EMA teacher predicts each unlabeled image; a score
   ``alpha`` x edge roughness (mean Sobel gradient of the probability) + (1 - ``alpha``) x contour
   irregularity (mean |Laplacian| of the distance transform of p > 0.5) ranks them, lower is more
   regular, and only the most regular share of the batch is kept: ``keep_start`` (0.5) at first,
   rising to all of it with a sigmoid ramp over ``keep_rampup_fraction`` of the method's epochs.
2. **Ellipse-constrained pseudo-label refinement** (``ellipse_prior.refine_with_ellipse``): a
   least-squares ellipse fitted to the largest region above ``threshold`` (0.6) raises the
   probability inside it, most near its centre, and damps it outside; the refined map above
   ``threshold`` is the pseudo-label.
3. **Symmetry-based consistency**, with the ellipse's major axis as the symmetry axis:
   - ``pseudo_label``: the student's probability on the unlabeled image against the pseudo-label;
   - ``symmetric_regions``: two new images per unlabeled one, each half of the pseudo-labelled
     head completed by its own mirror image (randomly perturbed); the student's prediction on
     them against its own prediction on the original image, halved and mirrored alike;
   - ``mirrored_halves``: on those symmetric images, one half of the student's prediction
     against the mirror of the other half.
   The three are mean squared errors of probabilities (as the public code), summed, weighted
   ``weight_consistency`` with a sigmoid ramp-up over ``rampup_fraction`` of the method's epochs.

Ablation: ``keep_start=1`` keeps every teacher output (no filtering), ``ellipse_refinement=false``
takes the teacher map above ``threshold`` as the pseudo-label (the ellipse is still fitted for
the symmetry axis), ``symmetry=false`` drops the symmetric images and their two terms (the
student then sees n labeled + n unlabeled images a step instead of n + 3n, so more steps fit the
same time).

Choices the text leaves open, decided here:
- the supervised loss is the shared Dice + CE of the labeled batch (the public code: DiceFocal +
  BCE, halved), on the same network as every trainer here (the public code: a 2D U-Net);
- filtering ranks the samples of each batch (the public code keeps a score per image over the
  epoch and fills the batch back up from the rest: in effect the same within a batch);
- the symmetry axis is the fitted ellipse's major axis (the head's midline); the public code's
  ``cv2.fitEllipse`` angle names either axis depending on the fit. Where no ellipse fits, the
  pseudo-label is the unrefined teacher map above ``threshold`` (the public code then leaves an
  all-zero pseudo-label) and the image's vertical centre line is the axis;
- a symmetric image keeps the background, takes the mirrored half where it lands, and is 0 in
  the head's other half where no mirror lands (the public code adds the mirror onto the
  background there); its perturbation is Gaussian noise, a contrast and a brightness change and a
  Gaussian blur of each half, each with probability ``perturbation_probability`` (0.2), in the
  units of the z-scored image (the public code works on [0, 1] images and rescales each result
  to [0, 1]; here intensities stay z-scored, as the network sees them);
- several prompts: each unlabeled image is asked one prompt of its own dataset, drawn at random
  (HC18 has one);
- the final weights are used (the public code selects the best checkpoint on validation Dice).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import input_error
from ..ellipse_prior import first_side, most_regular, refine_with_ellipse, reflect, regularity_score, symmetric_halves
from ..losses import foreground_probability, multiscale
from ..prompts import DatasetPrompts
from ..schedules import sigmoid_rampup
from .mean_teacher import MeanTeacherTrainer

DEFAULTS = {
    "ema_decay": 0.99,
    "weight_consistency": 1.0,
    "rampup_fraction": 1.0,           # the public code ramps over its whole schedule (10,000 of 10,000)
    "alpha": 0.5,                     # edge roughness vs contour irregularity in the filtering score
    "keep_start": 0.5,                # share of the unlabeled batch kept at first ...
    "keep_rampup_fraction": 1.0,      # ... rising to all of it over this share of the method's epochs
    "threshold": 0.6,                 # region fitted, and pseudo-label, above this probability
    "fill": 0.6,                      # inside the ellipse: at least fill + (1 - d) ** fill_power
    "fill_power": 2.0,
    "decay": 0.5,                     # outside: p x exp(-decay (d - 1))
    "perturbation_probability": 0.2,  # each perturbation of a mirrored half
    "noise": 0.05,                    # std of its Gaussian noise (z-scored units)
    "contrast": 0.2,                  # its intensities scaled by 1 +- this ...
    "brightness": 0.1,                # ... and shifted by +- this
    # the ablation's switches: each part of ERSR on its own (``keep_start`` 1 turns the filter off)
    "ellipse_refinement": True,       # False: the pseudo-label is the teacher map above threshold
    "symmetry": True,                 # False: no symmetric images, only the pseudo-label term
}
PRESETS = {"paper": dict(DEFAULTS)}


class ERSRTrainer(MeanTeacherTrainer):
    """Mean teacher with regularity-filtered, ellipse-refined pseudo-labels and symmetry
    consistency on unlabeled 2d images (module docstring)."""

    method_defaults = DEFAULTS
    method_presets = PRESETS

    def on_train_start(self) -> None:
        s = self.settings
        if self.spatial_dims != 2:
            raise input_error(f"versemi_train {self.configuration} -tr ERSRTrainer",
                              "ERSR fits an ellipse to each 2d image and mirrors it across the ellipse's axis: it "
                              "is a 2d method", "train it with the 2d configuration: versemi_train 2d FOLD -tr "
                                                "ERSRTrainer (after versemi_plan_and_preprocess -c 2d)")
        for key in ("ema_decay", "alpha", "keep_start", "threshold", "perturbation_probability"):
            if not 0 <= s[key] <= 1:
                raise input_error("--method", f"{key} {s[key]} is not in [0, 1]",
                                  f"give {key} between 0 and 1 (default {DEFAULTS[key]})")
        self.teacher = self.add_teacher(s["ema_decay"])
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)

    def kept_share(self) -> float:
        s = self.settings
        ramp = sigmoid_rampup(self.method_epoch / max(1.0, s["keep_rampup_fraction"] * self.method_epochs))
        return s["keep_start"] + (1 - s["keep_start"]) * ramp

    def budget_phases(self) -> list[tuple[int, float]]:
        """The step grows as the filter keeps more of the unlabeled batch (``keep_start`` -> all), so
        a time budget times it in the middle of each third of the method's epochs, not only at its
        start (where it costs about a third less than at the end)."""
        if self.settings["keep_start"] >= 1:
            return super().budget_phases()
        epochs = max(1, self.method_epochs)
        return [(int(epochs * middle), 1 / 3) for middle in (1 / 6, 1 / 2, 5 / 6)]

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        if unlabeled is None:
            return super().train_step(labeled, None)
        x = unlabeled["data"]
        prompts = self.dataset_prompts.draw(unlabeled["dataset"])
        with torch.no_grad():
            teacher = foreground_probability(self.teacher(x, prompts))[:, 0]  # (B_u, H, W)
        keep = most_regular(regularity_score(teacher, s["alpha"]), self.kept_share())
        x, prompts, teacher = x[keep], prompts[keep], teacher[keep]
        refined = [refine_with_ellipse(p, s["threshold"], s["fill"], s["fill_power"], s["decay"],
                                       refine=bool(s["ellipse_refinement"])) for p in teacher.float().cpu().numpy()]
        pseudo = torch.from_numpy(np.stack([label for label, _ in refined])).to(x.device)  # (n, H, W)
        axes = [axis for _, axis in refined]
        side = first_side(tuple(pseudo.shape), axes, x.device)
        n = x.shape[0]
        images, asked = torch.cat([labeled["data"], x]), torch.cat([labeled["prompt"], prompts])
        if s["symmetry"]:
            symmetric = self.symmetric_images(x[:, :, 0], pseudo, side, axes)  # (2n, C, H, W)
            images, asked = torch.cat([images, symmetric[:, :, None]]), torch.cat([asked, prompts, prompts])
        logits = self.network(images, asked)
        own = [level[:len(labeled["prompt"])] for level in logits] if isinstance(logits, list) \
            else logits[:len(labeled["prompt"])]
        supervised = multiscale(self.loss, own, labeled["target"])
        student = foreground_probability(logits if torch.is_tensor(logits) else logits[0])
        student = student[len(labeled["prompt"]):, 0]  # (n or 3n, H, W): original, then the two symmetric images
        original, on_symmetric = student[:n], student[n:]
        weight = s["weight_consistency"] * self.rampup()
        terms = {"supervised": supervised, "pseudo_label": weight * F.mse_loss(original, pseudo)}
        if not s["symmetry"]:
            return self._with_total(terms)
        first, second = symmetric_halves(original[:, None], side, axes)
        doubled_axes, doubled_side = axes + axes, torch.cat([side, side])
        half = on_symmetric[:, None] * doubled_side[:, None]
        mirrored_other = reflect(on_symmetric[:, None] * (1 - doubled_side[:, None]), doubled_axes)
        terms["symmetric_regions"] = weight * F.mse_loss(on_symmetric[:, None], torch.cat([first, second]))
        terms["mirrored_halves"] = weight * F.mse_loss(half, mirrored_other)
        return self._with_total(terms)

    def symmetric_images(self, images: torch.Tensor, pseudo: torch.Tensor, side: torch.Tensor, axes) -> torch.Tensor:
        """(2n, C, H, W): per image, each half of its pseudo-labelled region completed by the
        mirror of itself (perturbed), on the image's own background."""
        outputs = []
        for half in (pseudo * side, pseudo * (1 - side)):
            half = half[:, None]
            content = self.perturbed(images * half, half)
            mirror_support = reflect(half, axes)
            background = images * (1 - pseudo[:, None]) * (1 - mirror_support)
            outputs.append(background + content + self.perturbed(reflect(images * half, axes), mirror_support))
        return torch.cat(outputs)

    def perturbed(self, planes: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """``planes`` with, inside ``region``, Gaussian noise, a contrast and a brightness change and
        a Gaussian blur, each applied to a row with probability ``perturbation_probability``."""
        s = self.settings
        shape = (planes.shape[0], 1, 1, 1)

        def chosen() -> torch.Tensor:
            return (torch.rand(shape, device=planes.device) < s["perturbation_probability"]).float()

        out = planes + chosen() * s["noise"] * torch.randn_like(planes)
        out = out * (1 + chosen() * s["contrast"] * (2 * torch.rand(shape, device=planes.device) - 1))
        out = out + chosen() * s["brightness"] * (2 * torch.rand(shape, device=planes.device) - 1)
        blurred = _gaussian_blur(out, float(torch.empty(1).uniform_(0.5, 1.5)))
        blur = chosen()
        out = blur * blurred + (1 - blur) * out
        return out * region


def _gaussian_blur(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=planes.dtype, device=planes.device)
    kernel = torch.exp(-grid ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = planes.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    columns = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    out = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), rows, groups=channels)
    return F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), columns, groups=channels)
