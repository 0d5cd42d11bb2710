"""Declared absences learnt on the view prediction shows a structure's prompt (``model.absent_views``):
which views a plan needs, their place in the preprocessing cache, their patches in the labeled
batches, and the loss that teaches them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TOY_EXPERIMENT, claims_of_absent_structures, make_trainer
from versemi.datasets.io import read_image
from versemi.datasets.layout import load_dataset
from versemi.errors import InputError
from versemi.model.config import TrainingConfig
from versemi.model.absent_views import cached_view_pairs, trained_views, view_pairs
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.preprocessing.cache import read_array
from versemi.preprocessing.pipeline import to_network_input


def _plans(la_absent=(), hippo_absent=(), hippo_spacing=(1.0, 1.0, 1.0)) -> dict:
    """A two-dataset plan (LA: one label, Hippocampus: two), declarations as given."""
    datasets = {"LA": {"normalization": {"scheme": "zscore"}, "target_spacing": [1.25, 1.25, 1.25]},
                "Hippocampus": {"normalization": {"scheme": "zscore"}, "target_spacing": list(hippo_spacing)}}
    if la_absent:
        datasets["LA"]["known_absent"] = list(la_absent)
    if hippo_absent:
        datasets["Hippocampus"]["known_absent"] = list(hippo_absent)
    prompts = [{"index": 0, "dataset": "LA", "label": "left_atrium"},
               {"index": 1, "dataset": "Hippocampus", "label": "Anterior"},
               {"index": 2, "dataset": "Hippocampus", "label": "Posterior"},
               {"index": 3, "dataset": None, "label": None}]
    return {"dataset_names": ["LA", "Hippocampus"], "datasets": datasets, "prompts": prompts, "configurations": {}}


def test_a_view_for_each_declaration_prepared_or_cut_differently():
    # nothing declared: no views
    assert view_pairs(_plans()) == []
    plans = _plans(la_absent=["Hippocampus/Posterior"], hippo_absent=["LA/left_atrium"])
    assert view_pairs(plans) == [("LA", "Hippocampus"), ("Hippocampus", "LA")]  # one label is enough
    # other spacings: both views cached, cut with the other dataset's patch
    assert cached_view_pairs(plans, "3d_fullres") == [("LA", "Hippocampus"), ("Hippocampus", "LA")]
    patches = {"LA": [48, 80, 96], "Hippocampus": [40, 64, 48]}
    views = trained_views(plans, "3d_fullres", patches.__getitem__)
    assert [(v.name, v.patch, v.cached, v.folder) for v in views] == [
        ("LA@Hippocampus", (40, 64, 48), True, "LA@Hippocampus"), ("Hippocampus@LA", (48, 80, 96), True, "Hippocampus@LA")]
    # the same preparation: nothing to cache; a view only where the patch differs, from the own cache
    same = _plans(hippo_absent=["LA/left_atrium"], hippo_spacing=(1.25, 1.25, 1.25))
    assert cached_view_pairs(same, "3d_fullres") == []
    views = trained_views(same, "3d_fullres", patches.__getitem__)
    assert [(v.name, v.patch, v.cached, v.folder) for v in views] == [("Hippocampus@LA", (48, 80, 96), False, "Hippocampus")]
    assert trained_views(same, "3d_fullres", lambda dataset: [48, 80, 96]) == []  # own batches already show it


@pytest.fixture(scope="module")
def declared(toy_raw_master, tmp_path_factory) -> Path:
    """The toy pair (MRI z-score, CT) planned with --known-absent all and preprocessed; the plans root."""
    root = tmp_path_factory.mktemp("declared")
    plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw_master, root, num_processes=1,
                                          show_progress=False, known_absent="all"))
    return root


def _plans_of(root: Path) -> dict:
    return json.loads((root / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))


def test_the_cache_holds_each_dataset_prepared_as_the_other_plan_prepares_it(declared, toy_raw_master):
    plans = _plans_of(declared)
    cache = declared / TOY_EXPERIMENT / "3d_fullres"
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [
        "DemoLA", "DemoLA@DemoPancreas", "DemoPancreas", "DemoPancreas@DemoLA"]
    case_id = plans["datasets"]["DemoLA"]["labeled_cases"][0]
    case = next(c for c in load_dataset(toy_raw_master / "DemoLA").labeled_cases() if c.case_id == case_id)
    image, geometry = read_image(case.images)
    expected, _ = to_network_input(image, geometry.spacing_zyx, plans["datasets"]["DemoPancreas"])  # CT-normalized
    view = cache / "DemoLA@DemoPancreas"
    np.testing.assert_allclose(read_array(view / f"{case_id}_data.b2nd"), expected, rtol=1e-6, atol=1e-6)
    props = json.loads((view / f"{case_id}.json").read_text(encoding="utf-8"))
    assert (props["dataset"], props["shown_as"]) == ("DemoLA", "DemoPancreas")
    assert not (view / f"{case_id}_seg.b2nd").exists()  # the image only
    own = read_array(cache / "DemoLA" / f"{case_id}_data.b2nd")
    assert own.shape != expected.shape or not np.allclose(own, expected)  # another view indeed
    # a second run finds everything cached, views included
    again = plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw_master, declared,
                                                  num_processes=1, show_progress=False, known_absent="all"))
    assert [cache["preprocessed"] for cache in again["caches"]] == [0] * len(again["caches"])


def test_labeled_batches_carry_the_views_and_the_step_learns_the_absence_there(declared, tmp_path, one_thread):
    torch.manual_seed(0)
    trainer = make_trainer("SupervisedTrainer", declared, tmp_path, plans=_plans_of(declared))
    names = trainer.plans["dataset_names"]
    assert [view.name for view, _ in trainer.absent_views] == ["DemoLA@DemoPancreas", "DemoPancreas@DemoLA"]
    batch = trainer.labeled_source[0]
    views = batch["absent_views"]
    assert [tuple(v["data"].shape) for v in views] == [(1, 1, 16, 32, 32)] * 2
    assert [names[int(v["dataset"][0])] for v in views] == ["DemoLA", "DemoPancreas"]
    again = trainer.labeled_source[0]["absent_views"]  # a pure function of the batch number
    assert all(torch.equal(a["data"], b["data"]) for a, b in zip(views, again))
    assert "DemoLA's images as DemoPancreas's plan" in trainer.known_absent_note()
    before = [claims_of_absent_structures(trainer, v) for v in views]
    for iteration in range(15):
        terms = trainer.optimize(iteration, batch, None)
    assert terms["known_absent_views"] > 0
    assert terms["loss"] == pytest.approx(terms["supervised"] + terms["known_absent"] + terms["known_absent_views"],
                                          rel=1e-5)
    after = [claims_of_absent_structures(trainer, v) for v in views]
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)


def test_the_views_weigh_as_the_method_weighs_the_absences(declared, tmp_path, one_thread):
    """Once a method runs, its weight of the declared absences (VerSemi's ``weight_known_absent``)
    applies to the views too; 0 switches them off without computing them."""
    views = {}
    for weight in (1.0, 0.0):
        torch.manual_seed(0)
        trainer = make_trainer("VerSemiTrainer", declared, tmp_path / str(weight), plans=_plans_of(declared),
                               method={"weight_known_absent": weight})
        assert not trainer.in_warm_up
        views[weight] = trainer.optimize(0, trainer.labeled_source[0], None)["known_absent_views"]
    assert views[1.0] > 0 and views[0.0] == 0


def test_without_views_or_without_a_declaration_batches_carry_none(declared, planned, tmp_path):
    off = make_trainer("SupervisedTrainer", declared, tmp_path / "off", plans=_plans_of(declared), absent_views=False)
    assert off.absent_views == [] and "absent_views" not in off.labeled_source[0]
    undeclared = make_trainer("SupervisedTrainer", planned, tmp_path / "plain")
    assert undeclared.absent_views == [] and "absent_views" not in undeclared.labeled_source[0]


def test_a_cache_without_the_views_is_refused_once_per_folder_with_the_fix(planned, tmp_path):
    plans = _plans_of(planned)
    for name, other in (("DemoLA", "DemoPancreas"), ("DemoPancreas", "DemoLA")):
        plans["datasets"][name]["known_absent"] = [f"{other}/{'pancreas' if other == 'DemoPancreas' else 'left_atrium'}"]
    with pytest.raises(InputError) as error:
        make_trainer("SupervisedTrainer", planned, tmp_path, plans=copy.deepcopy(plans))
    message = str(error.value)
    assert "DemoLA@DemoPancreas" in message and "DemoPancreas@DemoLA" in message
    assert message.count("cached case missing") == 2 and "versemi_plan_and_preprocess" in message


def test_the_option_is_on_by_default_kept_on_continue_and_runs_saved_before_it_have_none():
    from versemi.training.run import build_parser, make_config

    def config(options, saved=None):
        return make_config(build_parser().parse_args(["3d_fullres", "0", *options]), saved)

    assert config([]).absent_views is True and config(["--absent-views", "off"]).absent_views is False
    saved = config(["--absent-views", "off"]).to_dict()
    assert config([], saved).absent_views is False  # --continue keeps it
    with pytest.raises(InputError) as error:
        config(["--absent-views", "on"], saved)
    assert "this run was started with --absent-views off" in str(error.value)
    assert TrainingConfig.from_dict({"epochs": 3}).absent_views is False  # saved before the option existed
