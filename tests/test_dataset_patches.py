"""Planned with --patch-per-dataset, a joint plan gives a dataset whose images are smaller than the
shared patch a patch of its own: planned, trained one dataset per batch (the same for the labeled and unlabeled batch of a step),
stored in the checkpoint and slid over that dataset's images at prediction (OpenVINO's path:
tests/test_cpu_runtime.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TOY_EXPERIMENT, make_trainer
from versemi.cli import plan_and_preprocess_main
from versemi.inference import load_models, sliding_window
from versemi.inference.predictor import predict_case_prompts
from versemi.model.plans_view import PlansView
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.plans.planner import PlanSettings, dataset_patch_sizes
from versemi.plans.topology import pool_and_conv_props

# the plan's own patches, with a small network: the toy plan gives both toy datasets their own
SMALL = dict(patch_size=None, features=[4, 8, 16], batch_size=2)


@pytest.fixture(scope="module")
def own_planned(toy_raw_master, tmp_path_factory):
    """The toy pair planned and preprocessed with --patch-per-dataset; returns the plans root."""
    root = tmp_path_factory.mktemp("own_patches")
    assert plan_and_preprocess_main(["-d", "DemoLA", "DemoPancreas", "--raw", str(toy_raw_master), "--plans-root",
                                     str(root), "-np", "1", "--patch-per-dataset", "--quiet"]) == 0
    return root


def toy_plans(planned) -> dict:
    return json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))


def test_dataset_patch_is_the_shared_patch_capped_by_its_median_shape():
    topology = pool_and_conv_props([1.0, 1.0, 1.0], [48, 80, 96])
    datasets = {"Large": {"median_shape_after_resampling": [70, 150, 150]},
                "Small": {"median_shape_after_resampling": [35, 51, 35]}}
    sizes = dataset_patch_sizes(datasets, topology)
    divisor = np.array(topology.divisor)
    assert list(sizes) == ["Small"]  # the large dataset fills the shared patch
    assert (np.array(sizes["Small"]) % divisor == 0).all()
    assert sizes["Small"] == [int(np.ceil(m / d) * d) for m, d in zip([35, 51, 35], divisor)]
    assert dataset_patch_sizes({"Small": datasets["Small"]}, topology) == {}  # one dataset: its own plan caps it


def test_toy_pair_plans_a_patch_per_dataset_only_when_asked(planned, own_planned):
    assert all("dataset_patch_sizes" not in c for c in toy_plans(planned)["configurations"].values())
    plan = toy_plans(own_planned)["configurations"]["3d_fullres"]
    shared, own = plan["patch_size"], plan["dataset_patch_sizes"]
    assert set(own) == {"DemoLA", "DemoPancreas"}
    for patch in own.values():
        assert all(p <= s for p, s in zip(patch, shared)) and patch != shared


def test_a_batch_holds_one_dataset_at_its_patch_in_both_streams(own_planned, tmp_path, one_thread):
    trainer = make_trainer("VerSemiTrainer", own_planned, tmp_path, **SMALL)
    own = trainer.effective.dataset_patch_sizes
    index = {name: i for i, name in enumerate(trainer.plans["dataset_names"])}
    seen = set()
    for iteration in range(12):
        labeled, unlabeled = trainer.labeled_source[iteration], trainer.unlabeled_source[iteration]
        datasets = set(labeled["dataset"].tolist())
        assert len(datasets) == 1 and set(unlabeled["dataset"].tolist()) == datasets
        name = trainer.plans["dataset_names"][datasets.pop()]
        assert list(labeled["data"].shape[2:]) == own[name] == list(unlabeled["data"].shape[2:])
        assert labeled["target"].shape[2:] == labeled["data"].shape[2:]
        # a smaller patch, more of them: a batch holds at most the voxels of a shared-patch batch
        shared = int(np.prod(trainer.patch_size))
        assert len(labeled["data"]) == max(2, 2 * shared // int(np.prod(own[name]))) > 2
        assert len(unlabeled["data"]) == len(labeled["data"])
        seen.add(index[name])
    assert seen == set(index.values())  # balanced draws reach both datasets


def test_mixing_trainers_step_on_either_dataset(own_planned, tmp_path, one_thread):
    for name in ("VerSemiTrainer", "BCPTrainer", "M3HLTrainer"):
        trainer = make_trainer(name, own_planned, tmp_path, **SMALL)
        trainer.epoch = trainer.config.epochs - 1  # the stage that pastes labeled into unlabeled patches
        assert trainer.stage == 2, name
        shapes = set()
        for iteration in range(6):
            labeled, unlabeled = trainer.labeled_source[iteration], trainer.unlabeled_source[iteration]
            shapes.add(tuple(labeled["data"].shape[2:]))
            terms = trainer.optimize(iteration, labeled, unlabeled)
            assert np.isfinite(terms["loss"]), name
        assert len(shapes) == 2, name


def test_a_patch_override_trains_one_patch(own_planned, tmp_path, one_thread):
    trainer = make_trainer("SupervisedTrainer", own_planned, tmp_path)  # --patch-size 16 32 32
    assert trainer.effective.dataset_patch_sizes is None
    assert {tuple(trainer.labeled_source[i]["data"].shape[2:]) for i in range(6)} == {(16, 32, 32)}


def test_prediction_slides_each_dataset_patch(own_planned, toy_raw_master, tmp_path, monkeypatch, one_thread):
    trainer = make_trainer("SupervisedTrainer", own_planned, tmp_path, **SMALL)
    trainer.save("final")
    state = torch.load(trainer.checkpoint_path("final"), map_location="cpu", weights_only=False)
    assert state["dataset_patch_sizes"] == trainer.effective.dataset_patch_sizes
    ensemble = load_models([trainer.checkpoint_path("final")])
    own = ensemble.models[0].dataset_patch_sizes
    windows = []
    original = sliding_window.sliding_window_probabilities

    def recording(network, data, prompt_index, patch_size, *args, **kwargs):
        windows.append((tuple(prompt_index), list(patch_size)))
        return original(network, data, prompt_index, patch_size, *args, **kwargs)

    monkeypatch.setattr(sliding_window, "sliding_window_probabilities", recording)
    case = sorted((toy_raw_master / "DemoPancreas" / "imagesTs").glob("*_0000.nii.gz"))[0]
    prompts = PlansView(ensemble.plans).real_prompts
    predict_case_prompts(ensemble, [case], prompts, mirroring=False)
    by_dataset = {p["dataset"]: p["index"] for p in prompts}
    for dataset, index in by_dataset.items():
        assert [patch for indices, patch in windows if index in indices] == [own[dataset]]


def test_one_dataset_plan_keeps_one_patch(toy_raw_master, tmp_path):
    plan_and_preprocess(ExperimentRequest(["DemoLA"], toy_raw_master, tmp_path / "plans", num_processes=1,
                                          show_progress=False))
    plans = json.loads((tmp_path / "plans" / "DemoLA" / "plans.json").read_text(encoding="utf-8"))
    assert all("dataset_patch_sizes" not in c for c in plans["configurations"].values())


def test_2d_batches_take_their_dataset_patch(toy_raw_master, tmp_path, one_thread):
    plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw_master, tmp_path / "plans",
                                          num_processes=1, show_progress=False, configurations=["2d"],
                                          settings=PlanSettings(patch_per_dataset=True)))
    trainer = make_trainer("SelfTrainingTrainer", tmp_path / "plans", tmp_path, configuration="2d", **SMALL)
    own = trainer.effective.dataset_patch_sizes
    assert own and all(patch[0] == 1 for patch in own.values())
    names = trainer.plans["dataset_names"]
    for iteration in range(6):
        labeled, unlabeled = trainer.labeled_source[iteration], trainer.unlabeled_source[iteration]
        name = names[int(labeled["dataset"][0])]
        assert list(labeled["data"].shape[2:]) == trainer.effective.patch_for(name) == list(unlabeled["data"].shape[2:])
        assert np.isfinite(trainer.optimize(iteration, labeled, unlabeled)["loss"])
