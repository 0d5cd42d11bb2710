"""Planned with --patch-per-dataset, a joint plan gives a dataset whose images are smaller than the
shared patch a patch of its own: planned, trained with a sub-batch of every dataset per step
(``--dataset-batches each``) or one dataset per step (``one``; the same for the labeled and
unlabeled batch of a step), stored in the checkpoint and slid over that dataset's images at
prediction (OpenVINO's path: tests/test_cpu_runtime.py)."""
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
ONE = dict(SMALL, dataset_batches="one")  # one dataset per step


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
    trainer = make_trainer("VerSemiTrainer", own_planned, tmp_path, **ONE)
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
        trainer = make_trainer(name, own_planned, tmp_path, **ONE)
        trainer.epoch = trainer.config.epochs - 1  # the stage that pastes labeled into unlabeled patches
        assert trainer.stage == 2, name
        shapes = set()
        for iteration in range(6):
            labeled, unlabeled = trainer.labeled_source[iteration], trainer.unlabeled_source[iteration]
            shapes.add(tuple(labeled["data"].shape[2:]))
            terms = trainer.optimize(iteration, labeled, unlabeled)
            assert np.isfinite(terms["loss"]), name
        assert len(shapes) == 2, name


def test_each_step_holds_a_sub_batch_of_every_dataset_at_its_patch(own_planned, tmp_path, one_thread):
    trainer = make_trainer("VerSemiTrainer", own_planned, tmp_path, **SMALL)  # dataset_batches "each": the default
    names, shared = trainer.plans["dataset_names"], int(np.prod(trainer.patch_size))
    for iteration in range(3):
        labeled, unlabeled = trainer.labeled_source[iteration], trainer.unlabeled_source[iteration]
        assert len(labeled["sub_batches"]) == len(unlabeled["sub_batches"]) == len(names)
        for name, own, other in zip(names, labeled["sub_batches"], unlabeled["sub_batches"]):
            index = names.index(name)
            assert set(own["dataset"].tolist()) == set(other["dataset"].tolist()) == {index}
            patch = trainer.effective.patch_for(name)
            assert list(own["data"].shape[2:]) == patch == list(other["data"].shape[2:])
            assert len(own["data"]) == max(2, 2 * shared // int(np.prod(patch)))
    # the validation stream keeps one dataset per batch
    assert "sub_batches" not in trainer.val_source[0]


def test_a_step_of_sub_batches_accumulates_the_mean_gradient_of_each_dataset(own_planned, tmp_path, one_thread):
    """One optimizer step's gradient is the mean of the gradients each dataset's sub-batch gives
    alone, and the step reports each dataset's loss."""
    trainer = make_trainer("SupervisedTrainer", own_planned, tmp_path, precision="fp32", **SMALL)
    item = trainer.labeled_source[0]

    def gradient(labeled):
        trainer.model.zero_grad(set_to_none=True)
        terms = trainer._accumulate(labeled, None)
        return terms, [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    terms, together = gradient(item)
    parts = [gradient(part) for part in item["sub_batches"]]
    for joint, *alone in zip(together, *(grads for _, grads in parts)):
        torch.testing.assert_close(joint, sum(alone) / len(alone), rtol=1e-4, atol=1e-6)
    names = trainer.plans["dataset_names"]
    for name, (part_terms, _) in zip(names, parts):
        assert float(terms[f"loss_{name}"]) == pytest.approx(float(part_terms["loss"]), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(np.mean([float(t["loss"]) for t, _ in parts]), rel=1e-5)


def test_mixing_trainers_step_on_sub_batches_of_every_dataset(own_planned, tmp_path, one_thread):
    for name in ("VerSemiTrainer", "BCPTrainer", "SelfTrainingTrainer"):
        trainer = make_trainer(name, own_planned, tmp_path, **SMALL)
        trainer.epoch = trainer.config.epochs - 1  # the method's last stage
        for iteration in range(2):
            terms = trainer.optimize(iteration, trainer.labeled_source[iteration], trainer.unlabeled_source[iteration])
            assert np.isfinite(terms["loss"]), name
            assert {f"loss_{d}" for d in trainer.plans["dataset_names"]} <= set(terms), name


def test_runs_saved_before_sub_batches_continue_one_dataset_per_step():
    from versemi.model.config import TrainingConfig

    assert TrainingConfig().dataset_batches == "each"
    assert TrainingConfig.from_dict({"epochs": 3}).dataset_batches == "one"


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
    trainer = make_trainer("SelfTrainingTrainer", tmp_path / "plans", tmp_path, configuration="2d", **ONE)
    own = trainer.effective.dataset_patch_sizes
    assert own and all(patch[0] == 1 for patch in own.values())
    names = trainer.plans["dataset_names"]
    for iteration in range(6):
        labeled, unlabeled = trainer.labeled_source[iteration], trainer.unlabeled_source[iteration]
        name = names[int(labeled["dataset"][0])]
        assert list(labeled["data"].shape[2:]) == trainer.effective.patch_for(name) == list(unlabeled["data"].shape[2:])
        assert np.isfinite(trainer.optimize(iteration, labeled, unlabeled)["loss"])


def test_a_chosen_patch_replaces_the_median_capped_one(toy_raw_master, tmp_path, capsys):
    """--patch-size plans the user's patch (padded to the network's downsampling) with its own
    topology and batch, records the request, and a malformed or impossible one is refused."""
    root = tmp_path / "plans"
    assert plan_and_preprocess_main(["-d", "DemoLA", "--raw", str(toy_raw_master), "--plans-root", str(root), "-np",
                                     "1", "--no-preprocess", "--patch-size", "2d=40x100", "3d_fullres=32x48x64",
                                     "--quiet"]) == 0
    configurations = json.loads((root / "DemoLA" / "plans.json").read_text(encoding="utf-8"))["configurations"]
    default = plan_and_preprocess(ExperimentRequest(["DemoLA"], toy_raw_master, tmp_path / "default", num_processes=1,
                                                    show_progress=False), preprocess=False)
    default = json.loads(open(default["plans"], encoding="utf-8").read())["configurations"]
    planned_2d, planned_3d = configurations["2d"], configurations["3d_fullres"]
    assert planned_2d["patch_size_requested"] == [40, 100] and planned_3d["patch_size_requested"] == [32, 48, 64]
    assert planned_3d["patch_size"] == [32, 48, 64]
    divisor = np.array(pool_and_conv_props(planned_2d["topology_spacing"], [40, 100]).divisor)
    patch_2d = np.array(planned_2d["patch_size"][1:])
    assert planned_2d["patch_size"][0] == 1 and (patch_2d >= [40, 100]).all() and (patch_2d % divisor == 0).all()
    assert (patch_2d - [40, 100] < divisor).all()  # padded, never more
    assert "patch_size_requested" not in default["2d"] and default["2d"]["patch_size"] != planned_2d["patch_size"]
    for bad, words in ((["2d=40"], "2d patch has 2 axes"), (["2d=4x100"], "at least 8"),
                       (["3d=32x48x64"], "no configuration"), (["2d=40xa"], "CONFIGURATION=AxB")):
        assert plan_and_preprocess_main(["-d", "DemoLA", "--raw", str(toy_raw_master), "--plans-root",
                                         str(tmp_path / "bad"), "--no-preprocess", "--patch-size", *bad,
                                         "--quiet"]) != 0
        assert words in capsys.readouterr().err
    assert not (tmp_path / "bad" / "DemoLA" / "plans.json").exists()


def test_structures_wider_than_the_patch_are_counted_and_warned(toy_raw_master, tmp_path, capsys):
    """The fingerprint measures each labeled case's structures; the plan counts the cases whose
    structures span more than the patch, and planning warns about them with the fix."""
    def plan(root, *extra):
        assert plan_and_preprocess_main(["-d", "DemoLA", "--raw", str(toy_raw_master), "--plans-root", str(root),
                                         "-np", "1", "--no-preprocess", *extra]) == 0
        return json.loads((root / "DemoLA" / "plans.json").read_text(encoding="utf-8"))

    small = plan(tmp_path / "small", "--patch-size", "2d=16x16", "3d_fullres=16x16x16")
    fingerprint = json.loads(next((tmp_path / "small").rglob("fingerprint.json")).read_text(encoding="utf-8"))
    labeled = [c for c in fingerprint["cases"] if c["labeled"]]
    assert labeled and all(len(c["foreground_extent"]) == 3 and min(c["foreground_extent"]) > 0 for c in labeled)
    beyond = small["configurations"]["2d"]["structures_beyond_patch"]["DemoLA"]
    assert beyond["of"] == len(small["datasets"]["DemoLA"]["labeled_cases"]) and beyond["cases"] > 0
    assert len(beyond["patch_mm"]) == 2 and len(small["configurations"]["3d_fullres"]["structures_beyond_patch"]
                                               ["DemoLA"]["patch_mm"]) == 3
    warned = capsys.readouterr().err
    assert "DemoLA (2d patch)" in warned and "wider than the patch" in warned and "--patch-size 2d=YxX" in warned
    large = plan(tmp_path / "large", "--patch-size", "2d=512x512")
    assert large["configurations"]["2d"]["structures_beyond_patch"]["DemoLA"]["cases"] == 0
    assert "DemoLA (2d patch)" not in capsys.readouterr().err


def test_a_plan_with_patches_per_dataset_trains_with_adam_unless_told(own_planned, planned):
    from versemi.training.run import build_parser, choose_optimizer, make_config

    def chosen(plans_root, options, saved=None):
        args = build_parser().parse_args(["3d_fullres", "0", *options])
        config = make_config(args, saved)
        plans = json.loads((plans_root / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
        note = choose_optimizer(args, config, plans, "3d_fullres", saved)
        return config.optimizer, config.learning_rate, note

    optimizer, lr, note = chosen(own_planned, [])
    assert (optimizer, lr) == ("adam", 3e-3) and "--optimizer sgd" in note  # SGD stalled on one-dataset batches
    assert chosen(own_planned, ["--lr", "1e-3"])[:2] == ("adam", 1e-3)
    assert chosen(own_planned, ["--optimizer", "sgd"]) == ("sgd", 1e-2, None)  # told otherwise
    assert chosen(own_planned, ["--patch-size", "16", "32", "32"])[::2] == ("sgd", None)  # one patch for all
    assert chosen(planned, []) == ("sgd", 1e-2, None)  # one shared patch: nnU-Net's SGD
    saved = make_config(build_parser().parse_args(["3d_fullres", "0"]), None).to_dict()
    assert chosen(own_planned, [], saved)[0] == "sgd"  # a run continues with what it started with
