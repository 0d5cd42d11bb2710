"""Fingerprint values, their reuse, and the joint plan (spacing rule, topology, prompts, splits)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from versemi.datasets.io import read_image, read_label
from versemi.datasets.layout import load_dataset
from versemi.errors import InputError
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.plans.fingerprint import compute_fingerprint, load_or_compute_fingerprint
from versemi.plans.planner import cross_validation_splits, target_spacing
from versemi.plans.topology import pool_and_conv_props


def test_fingerprint_matches_direct_measurement(toy_raw, tmp_path):
    dataset = load_dataset(toy_raw / "DemoPancreas")
    fingerprint, stored = compute_fingerprint(dataset, num_processes=1, show_progress=False)
    assert fingerprint["num_labeled"] == 5 and fingerprint["num_unlabeled"] == 2
    first = dataset.labeled_cases()[0]
    image, geometry = read_image(first.images)
    label, _ = read_label(first.label)
    record = fingerprint["cases"][0]
    assert record["spacing"] == pytest.approx([2.5, 0.8, 0.8], rel=1e-5)
    assert record["shape"] == list(image.shape[1:])
    assert record["label_voxels"]["1"] == int((label == 1).sum())
    # as in nnU-Net, every labeled case contributes the same number of sampled foreground voxels:
    # compare with the exact statistics of that equal-weight mixture of all foreground voxels
    per_case = [read_image(c.images)[0][0][read_label(c.label)[0] > 0] for c in dataset.labeled_cases()]
    values = np.concatenate(per_case)
    weights = np.concatenate([np.full(len(v), 1.0 / len(v)) for v in per_case])
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order]) / weights.sum()
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert stats["mean"] == pytest.approx(np.mean([v.mean() for v in per_case]), rel=0.01)
    assert stats["percentile_99_5"] == pytest.approx(values[order][np.searchsorted(cumulative, 0.995)], rel=0.01)
    assert stats["min"] >= values.min() and stats["max"] <= values.max()
    assert set(stored) == {c.case_id for c in dataset.labeled_cases()}


def test_fingerprint_is_reused_until_raw_data_changes(toy_raw, tmp_path):
    dataset = load_dataset(toy_raw / "DemoLA")
    first, _ = load_or_compute_fingerprint(dataset, tmp_path, 1, False)
    path = tmp_path / "DemoLA" / "fingerprint.json"
    stamp = path.stat().st_mtime_ns
    again, _ = load_or_compute_fingerprint(dataset, tmp_path, 1, False)
    assert again == json.loads(path.read_text(encoding="utf-8")) and path.stat().st_mtime_ns == stamp
    label = dataset.labeled_cases()[0].label
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    changed, _ = load_or_compute_fingerprint(dataset, tmp_path, 1, False)
    assert changed["raw_digest"] != first["raw_digest"]


def test_target_spacing_follows_nnunet_anisotropy_rule():
    iso = np.array([[1.0, 0.7, 0.7], [1.2, 0.8, 0.8], [1.1, 0.75, 0.75]])
    shapes = np.array([[100, 200, 200]] * 3)
    assert target_spacing(iso, shapes) == (pytest.approx([1.1, 0.75, 0.75]), None)
    thick = np.array([[5.0, 0.7, 0.7], [2.5, 0.8, 0.8], [5.0, 0.75, 0.75], [4.0, 0.7, 0.7]])
    spacing, axis = target_spacing(thick, np.array([[40, 512, 512]] * 4))
    assert axis == 0 and spacing[0] == pytest.approx(np.percentile(thick[:, 0], 10))
    assert spacing[1:] == pytest.approx([0.725, 0.725])


def test_topology_pools_anisotropic_axis_later():
    topology = pool_and_conv_props([3.0, 0.8, 0.8], [20, 160, 160])
    assert topology.strides[1] == [1, 2, 2] and topology.kernel_sizes[0] == [1, 3, 3]
    assert all(p % d == 0 for p, d in zip(topology.patch_size, topology.divisor))
    assert topology.features[0] == 32 and max(topology.features) <= 320


def test_splits_are_stratified_seeded_and_keep_unlabeled_in_training():
    plans = {"A": {"labeled_cases": [f"a{i}" for i in range(10)], "unlabeled_cases": ["au"]},
             "B": {"labeled_cases": [f"b{i}" for i in range(5)], "unlabeled_cases": []}}
    folds = cross_validation_splits(plans)
    assert folds == cross_validation_splits(plans)
    all_val = sorted(k for f in folds for k in f["val"])
    assert all_val == sorted([f"A/a{i}" for i in range(10)] + [f"B/b{i}" for i in range(5)])
    for fold in folds:
        assert sum(k.startswith("A/") for k in fold["val"]) == 2 and sum(k.startswith("B/") for k in fold["val"]) == 1
        assert fold["train_unlabeled"] == ["A/au"] and not set(fold["val"]) & set(fold["train_labeled"])


def test_joint_plan_of_two_datasets(toy_raw, tmp_path):
    request = ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw, tmp_path, labeled_limits={"DemoPancreas": 3},
                                num_processes=1, show_progress=False)
    summary = plan_and_preprocess(request, preprocess=False)
    assert summary["experiment"] == "DemoLA_DemoPancreas-3labeled"
    plans = json.loads((tmp_path / summary["experiment"] / "plans.json").read_text(encoding="utf-8"))
    assert [p["label"] for p in plans["prompts"]] == ["left_atrium", "pancreas", "synthetic"]
    assert plans["num_prompts"] == 3 and plans["synthetic_prompt"] == 2
    la, ct = plans["datasets"]["DemoLA"], plans["datasets"]["DemoPancreas"]
    assert la["normalization"][0]["scheme"] == "zscore" and ct["normalization"][0]["scheme"] == "ct"
    assert ct["normalization"][0]["statistics_from"] == "the 3 labeled cases of this experiment"
    assert ct["labeled_cases"] == [c.case_id for c in load_dataset(toy_raw / "DemoPancreas").labeled_cases()][:3]
    assert len(ct["unlabeled_cases"]) == 4  # 2 demoted labeled + 2 unlabeled
    config = plans["configurations"]["3d_fullres"]
    network = config["network"]
    assert len(network["strides"]) == len(network["kernel_sizes"]) == len(network["features"])
    assert all(p % int(np.prod([s[a] for s in network["strides"]])) == 0 for a, p in enumerate(config["patch_size"]))
    assert config["batch_size"] >= 2


def test_existing_plan_is_never_overwritten_silently(toy_raw, tmp_path):
    request = ExperimentRequest(["DemoLA"], toy_raw, tmp_path, num_processes=1, show_progress=False)
    plan_and_preprocess(request, preprocess=False)
    path = tmp_path / "DemoLA" / "plans.json"
    edited = json.loads(path.read_text(encoding="utf-8"))
    edited["configurations"]["3d_fullres"]["batch_size"] = 7
    path.write_text(json.dumps(edited))
    with pytest.raises(InputError, match="--overwrite-plans"):
        plan_and_preprocess(request, preprocess=False)
    assert json.loads(path.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["batch_size"] == 7
    request.overwrite_plans = True
    plan_and_preprocess(request, preprocess=False)
    assert json.loads(path.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["batch_size"] != 7


def test_the_typed_plans_view_answers_from_the_plans(planned):
    import json

    from versemi.model.plans_view import PlansView

    plans = json.loads((planned / "DemoLA_DemoPancreas" / "plans.json").read_text(encoding="utf-8"))
    view = PlansView(plans)
    assert view.dataset_names == ["DemoLA", "DemoPancreas"] and view.experiment == "DemoLA_DemoPancreas"
    assert [p["dataset"] for p in view.real_prompts] == ["DemoLA", "DemoPancreas"]
    assert view.real_prompt_indices == [0, 1] and plans["synthetic_prompt"] == 2
    assert [p["index"] for p in view.prompts_of("DemoPancreas")] == [1]
    assert view.prompt_names()[0] == "DemoLA/left_atrium"
    assert view.has_configuration("3d_fullres") and view.has_configuration("2d")
    assert not view.has_configuration("3d_lowres")
    assert view.configuration("3d_fullres") is plans["configurations"]["3d_fullres"]
    assert view.spatial_dims("3d_fullres") == 3 and view.spatial_dims("2d") == 2
    assert view.dataset_plan("DemoLA") is plans["datasets"]["DemoLA"]
    assert view.dataset_plan("DemoLA", "3d_fullres") is plans["datasets"]["DemoLA"]
    # the 2d configuration sees the dataset at its in-plane spacing, each case keeping its slice spacing
    in_2d = view.dataset_plan("DemoLA", "2d")
    assert in_2d["target_spacing"] == [None, *plans["datasets"]["DemoLA"]["target_spacing"][1:]]
    assert in_2d["normalization"] == plans["datasets"]["DemoLA"]["normalization"]


def test_a_spacing_scale_per_dataset(toy_raw, tmp_path, capsys):
    from versemi.cli import plan_and_preprocess_main

    def plan(root, *scale):
        assert plan_and_preprocess_main(["--raw", str(toy_raw), "--plans-root", str(tmp_path / root), "-d", "DemoLA",
                                         "DemoPancreas", "--no-preprocess", "--quiet", "-np", "1",
                                         *(["--spacing-scale", *scale] if scale else [])]) == 0
        plans = json.loads((tmp_path / root / "DemoLA_DemoPancreas" / "plans.json").read_text(encoding="utf-8"))
        return {name: d["target_spacing"] for name, d in plans["datasets"].items()}

    plain, per_dataset, everyone = plan("plain"), plan("one", "DemoLA=2"), plan("all", "2")
    assert per_dataset["DemoLA"] == pytest.approx([2 * s for s in plain["DemoLA"]])
    assert per_dataset["DemoPancreas"] == plain["DemoPancreas"]  # not named: its own spacing
    assert everyone["DemoPancreas"] == pytest.approx([2 * s for s in plain["DemoPancreas"]])
    for bad, message in ((["LA=2"], "dataset 'LA' is not among"), (["DemoLA=0"], "needs a positive factor"),
                         (["2", "DemoLA=2"], "mixes one factor")):
        code = plan_and_preprocess_main(["--raw", str(toy_raw), "--plans-root", str(tmp_path / "bad"), "-d", "DemoLA",
                                         "DemoPancreas", "--no-preprocess", "--quiet", "-np", "1",
                                         "--spacing-scale", *bad])
        assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
