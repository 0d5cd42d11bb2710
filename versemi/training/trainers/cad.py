"""CAD: confidence-aware adaptive displacement (Xiao et al., 2025, arXiv 2502.00536).

BCP's self-training, after which each pasted image's largest low-confidence region is replaced by
a high-confidence patch. Largest Low-Confidence Region Replacement (LLCR): voxels whose target
is less certain than a threshold (the teacher's max(p, 1 - p) on pseudo-labeled voxels; 1 where
a label is known) form components; the bounding box of the largest, cut to a maximal size, is
overwritten by the box of the same size with the highest mean confidence in the partner image
(the other pasted image of the same pair), image and targets together. Dynamic Threshold
Escalation (DTE): the threshold rises and the maximal size shrinks linearly over self-training,
so the replaced regions get fewer as the teacher becomes reliable.

The paper's method section and code are not public (it reports 2D ACDC and PROMISE12), so the
following are this implementation's choices, each a setting:
- confidence: the EMA teacher's on the unlabeled images, carried through the pastes; threshold
  ``threshold_start`` 0.75 -> ``threshold_end`` 0.95, maximal box side ``size_start`` 0.5 ->
  ``size_end`` 0.25 of the patch per axis;
- the displaced images replace BCP's pasted ones (the same number of images per step);
- the moved box keeps its own targets and prompts (the regions' slots), so a moved labeled piece
  is still supervised by its label and a moved pseudo-labeled piece by its pseudo-label, each with
  the prompt of its dataset;
- the moved box's slots weigh as many voxels as they hold (``displaced_weight`` "size": their
  kind's weight times the share of the images' voxels moved), about as they would inside the
  region they land in: BCP's loss scores a mixed image in two regions (its box, 30 % of the patch,
  and the rest), each normalised over its voxels. Scored as slots of their own at their kind's full
  weight ("slot"), a box of 0.3 to 5 % of the patch weighed as much as the rest of the image: its
  Dice and cross-entropy, normalised over a few hundred voxels at the structure's uncertain border,
  tripled the loss of a converged model and cost 20 Dice on the hippocampus (benchmarks/RESULTS.md);
- otherwise as BCPTrainer (stages, pseudo-labels, losses, weights).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ...errors import input_error
from ..mixing import Regions
from ..schedules import linear
from .bcp import DEFAULTS as BCP_DEFAULTS
from .bcp import BCPTrainer

DEFAULTS = {**BCP_DEFAULTS, "threshold_start": 0.75, "threshold_end": 0.95, "size_start": 0.5, "size_end": 0.25,
            "displaced_weight": "size"}
DISPLACED_WEIGHTS = ("size", "slot")
PRESETS = {"paper": dict(DEFAULTS)}


def box_means(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Mean of ``volume`` (Z, Y, X) over every box of ``size`` (an integral volume: O(voxels))."""
    padded = torch.nn.functional.pad(volume.double(), (1, 0, 1, 0, 1, 0))
    s = padded.cumsum(0).cumsum(1).cumsum(2)
    dz, dy, dx = size
    total = (s[dz:, dy:, dx:] - s[:-dz, dy:, dx:] - s[dz:, :-dy, dx:] - s[dz:, dy:, :-dx]
             + s[:-dz, :-dy, dx:] + s[:-dz, dy:, :-dx] + s[dz:, :-dy, :-dx] - s[:-dz, :-dy, :-dx])
    return total / (dz * dy * dx)


def largest_low_confidence_box(confidence: np.ndarray, threshold: float, max_side: list[int]
                               ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(start, size) of the bounding box of the largest component of ``confidence < threshold``,
    cut around its centre to at most ``max_side``; None when every voxel is confident."""
    components, count = ndimage.label(confidence < threshold, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    region = ndimage.find_objects((components == sizes.argmax()).astype(np.int32))[0]
    start, size = [], []
    for axis, (bounds, limit, side) in enumerate(zip(region, max_side, confidence.shape)):
        length = min(bounds.stop - bounds.start, limit)
        centre = (bounds.start + bounds.stop) // 2
        first = min(max(0, centre - length // 2), side - length)
        start.append(first)
        size.append(length)
    return tuple(start), tuple(size)


class CADTrainer(BCPTrainer):
    method_defaults = DEFAULTS
    method_presets = PRESETS

    def on_train_start(self) -> None:
        super().on_train_start()
        s = self.settings
        for key in ("threshold_start", "threshold_end", "size_start", "size_end"):
            if not 0 < s[key] <= 1:
                raise input_error("--method", f"{key} {s[key]} is not in (0, 1]",
                                  f"give {key} as a share (default {DEFAULTS[key]})")
        if s["displaced_weight"] not in DISPLACED_WEIGHTS:
            raise input_error("--method", f"displaced_weight {s['displaced_weight']!r} is unknown",
                              f"give one of {', '.join(DISPLACED_WEIGHTS)}")

    def schedule(self) -> tuple[float, float]:
        """(confidence threshold, maximal box side as a share of the patch) now."""
        s, t = self.settings, self.self_training_progress()
        return linear(s["threshold_start"], s["threshold_end"], t), linear(s["size_start"], s["size_end"], t)

    def rearrange(self, groups: list[Regions]) -> list[Regions]:
        """Each group's rows take a confident box from the same rows of the other group."""
        first, second = groups
        return [self.displace(first, second), self.displace(second, first)]

    @torch.no_grad()
    def displacement(self, target: Regions, source: Regions) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """(mask of the boxes to replace in ``target``, per-row shift bringing ``source``'s most
        confident box of the same size onto it)."""
        threshold, size_share = self.schedule()
        max_side = [max(1, round(size_share * side)) for side in target.images.shape[2:]]
        inside = torch.zeros_like(target.confidence)
        offsets = []
        for row in range(target.images.shape[0]):
            box = largest_low_confidence_box(target.confidence[row, 0].float().cpu().numpy(), threshold, max_side)
            if box is None:
                offsets.append((0, 0, 0))
                continue
            start, size = box
            means = box_means(source.confidence[row, 0].float(), size)
            means = means + 1e-6 * torch.rand(means.shape, dtype=means.dtype)  # ties (labeled voxels): at random
            best = np.unravel_index(int(means.argmax()), tuple(means.shape))
            inside[(row, 0, *(slice(a, a + n) for a, n in zip(start, size)))] = 1
            offsets.append(tuple(int(a - b) for a, b in zip(start, best)))
        return inside, offsets

    def displace(self, target: Regions, source: Regions) -> Regions:
        inside, offsets = self.displacement(target, source)
        moved = source.shifted(offsets)
        if self.settings["displaced_weight"] == "size":
            moved = moved.weighted(float(inside.mean()))
        return target.paste(moved, inside)
