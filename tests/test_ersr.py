"""ERSR's parts on hand-made masks (regularity filtering, ellipse refinement, reflection across
the ellipse's axis) and the trainer: 2d only, its terms, an exact resume after a kill."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from versemi.training.ellipse_prior import (SymmetryAxis, first_side, most_regular, refine_with_ellipse, reflect,
                                            regularity_score, symmetric_halves)

from conftest import assert_same_weights, train_killed_and_resumed
from test_2d import TINY_2D, planned_2d, resume_args_2d  # noqa: F401  (the fixture)


def ellipse_mask(shape=(64, 80), center=(30.0, 42.0), axes=(22.0, 12.0), angle=0.5) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(float)
    along = (xx - center[1]) * math.cos(angle) + (yy - center[0]) * math.sin(angle)
    across = -(xx - center[1]) * math.sin(angle) + (yy - center[0]) * math.cos(angle)
    return (along / axes[0]) ** 2 + (across / axes[1]) ** 2 <= 1


def test_the_regular_region_scores_lower_and_is_kept():
    rng = np.random.default_rng(0)
    clean = ellipse_mask().astype(np.float32) * 0.95
    speckled = np.clip(clean + (rng.random(clean.shape) < 0.08) * 0.9 - (rng.random(clean.shape) < 0.15) * 0.9, 0, 1)
    fragments = clean.copy()
    fragments[::5] = 0  # the same head cut into strips: more border, more ridges in the distance field
    scores = regularity_score(torch.tensor(np.stack([speckled, clean, fragments])), alpha=0.5)
    assert scores[1] < scores[0] and scores[1] < scores[2]
    assert most_regular(scores, 0.3).tolist() == [1]
    assert most_regular(scores, 1.0).tolist() == [0, 1, 2] and most_regular(scores, 0.0).numel() == 1


def test_the_ellipse_fills_holes_and_removes_speckle():
    truth = ellipse_mask()
    rng = np.random.default_rng(1)
    probability = np.where(truth, 0.8, 0.1).astype(np.float32)
    probability[28:33, 38:46] = 0.3                  # a hole in the head
    probability[(rng.random(truth.shape) < 0.01) & ~truth] = 0.9   # speckle outside
    label, axis = refine_with_ellipse(probability, threshold=0.6, fill=0.6, power=2.0, decay=0.5)
    raw = probability > 0.6
    assert axis.fitted
    assert np.allclose(axis.center, (30.0, 42.0), atol=0.6)
    # the symmetry axis is the major axis: 0.5 rad from x, as (y, x) = (sin, cos)
    assert abs(abs(np.dot(axis.direction, (math.sin(0.5), math.cos(0.5)))) - 1) < 1e-3
    errors = lambda mask: int((mask != truth).sum())  # noqa: E731
    assert errors(label.astype(bool)) < errors(raw) / 4
    assert label[30, 42] == 1 and label[30, 40] == 1       # the hole is filled
    # the ablation without refinement: the teacher map above threshold, the same fitted axis
    unrefined, same_axis = refine_with_ellipse(probability, 0.6, 0.6, 2.0, 0.5, refine=False)
    assert np.array_equal(unrefined.astype(bool), raw) and same_axis == axis
    nothing, fallback = refine_with_ellipse(np.full((20, 30), 0.2, np.float32), 0.6, 0.6, 2.0, 0.5)
    assert not nothing.any() and not fallback.fitted and fallback.center == (9.5, 14.5)


def test_reflection_across_the_axis():
    planes = torch.arange(2 * 7 * 9, dtype=torch.float32).view(2, 1, 7, 9)
    vertical = [SymmetryAxis((3.0, 4.0), (1.0, 0.0), True)] * 2    # the line x = 4
    assert torch.equal(reflect(planes, vertical), torch.flip(planes, dims=(3,)))
    horizontal = [SymmetryAxis((3.0, 4.0), (0.0, 1.0), True)] * 2  # the line y = 3
    assert torch.equal(reflect(planes, horizontal), torch.flip(planes, dims=(2,)))
    diagonal = [SymmetryAxis((20.0, 20.0), (math.sqrt(0.5), math.sqrt(0.5)), True)]
    image = torch.rand(1, 1, 41, 41)
    twice = reflect(reflect(image, diagonal), diagonal)
    assert torch.equal(twice, image)  # a reflection is its own inverse (the diagonal maps pixels to pixels)
    side = first_side((1, 41, 41), diagonal, "cpu")
    first, second = symmetric_halves(image, side, diagonal)
    for half in (first, second):
        assert torch.equal(reflect(half, diagonal), half)  # each completed half is symmetric
    assert torch.equal(first * side[:, None], image * side[:, None])


def test_ersr_is_a_2d_method(planned, results, monkeypatch, capsys):
    from versemi.cli import train_main

    monkeypatch.setenv("VERSEMI_PLANS", str(planned))
    assert train_main(["3d_fullres", "0", "-tr", "ERSRTrainer", "--patch-size", "16", "32", "32",
                       *TINY_2D]) != 0
    err = capsys.readouterr().err
    assert "2d method" in err and "versemi_train 2d FOLD -tr ERSRTrainer" in err


def test_ersr_terms_and_pseudo_labels(planned_2d, tmp_path):  # noqa: F811
    import json

    from conftest import fit_fixed_batch, make_trainer

    plans = json.loads((planned_2d / "DemoLA_DemoPancreas" / "plans.json").read_text(encoding="utf-8"))
    trainer = make_trainer("ERSRTrainer", planned_2d, tmp_path, plans=plans, configuration="2d", patch_size=None,
                           batch_size=4, features=[4, 8, 16])
    losses, terms = fit_fixed_batch(trainer, 3)
    assert set(terms) == {"supervised", "pseudo_label", "symmetric_regions", "mirrored_halves", "loss"}
    assert all(torch.isfinite(v) for v in terms.values()) and losses[-1] < losses[0]
    images = trainer.symmetric_images(torch.randn(2, 1, 20, 20), torch.ones(2, 20, 20),
                                      torch.zeros(2, 20, 20), [SymmetryAxis((9.5, 9.5), (1.0, 0.0), False)] * 2)
    assert images.shape == (4, 1, 20, 20)
    # the ablation without symmetry: no symmetric images, so the student sees two thirds fewer
    # unlabeled images per step
    plain = make_trainer("ERSRTrainer", planned_2d, tmp_path / "plain", plans=plans, configuration="2d",
                         patch_size=None, batch_size=4, features=[4, 8, 16], method={"symmetry": False})
    seen = {"full": [], "plain": []}
    for name, model in (("full", trainer), ("plain", plain)):
        model.network.register_forward_pre_hook(lambda module, inputs, name=name: seen[name].append(inputs[0].shape[0]))
    losses, terms = fit_fixed_batch(plain, 3)
    assert set(terms) == {"supervised", "pseudo_label", "loss"} and losses[-1] < losses[0]
    fit_fixed_batch(trainer, 1)
    labeled = len(trainer.labeled_source[0]["prompt"])
    assert seen["full"][-1] - labeled == 3 * (seen["plain"][-1] - labeled) > 0
    # a time budget times the step where the filter keeps more and more of the unlabeled batch
    phases = trainer.budget_phases()
    assert len(phases) == 3 and math.isclose(sum(share for _, share in phases), 1.0)
    kept = []
    for epoch, _ in phases:
        trainer.epoch = epoch
        kept.append(trainer.kept_share())
    assert 0.5 <= kept[0] < kept[1] < kept[2] <= 1


@pytest.mark.slow
def test_ersr_resumes_exactly_after_a_kill(planned_2d, results, tmp_path, one_thread):  # noqa: F811
    args = resume_args_2d(planned_2d, "ERSRTrainer", "--supervised-warm-up", "0")
    uninterrupted, resumed = train_killed_and_resumed(args, "ERSRTrainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "teacher"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"pseudo_label", "symmetric_regions", "mirrored_halves"}
