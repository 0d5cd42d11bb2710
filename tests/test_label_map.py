"""Several prompts into one label map: the label table, the overlap rule, one backbone pass per
window for a dataset's prompts, and agreement with single-prompt runs (the demo pair, and a
dataset with two labels)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from versemi.cli import predict_main, train_main
from versemi.inference import load_models, sliding_window_probabilities
from versemi.inference.label_map import compose, label_table
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

from conftest import TINY_TRAINING, toy_experiment, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(index, dataset, label, value):
    return {"index": index, "dataset": dataset, "label": label, "label_value": value}


def test_label_values_are_the_datasets_own_unless_they_collide():
    two_labels = [_prompt(0, "Heart", "atrium", 1), _prompt(1, "Heart", "ventricle", 2)]
    assert label_table(two_labels).values == (1, 2) and label_table(two_labels).own_values
    pair = [_prompt(0, "LA", "LA", 1), _prompt(1, "Spleen", "spleen", 1)]
    table = label_table(pair)
    assert table.values == (1, 2) and not table.own_values
    written = table.to_json()
    assert [(e["dataset"], e["value"], e["label_value"]) for e in written["labels"]] == [("LA", 1, 1), ("Spleen", 2, 1)]
    assert "highest probability" in written["overlaps"]


def test_overlaps_go_to_the_most_probable_prompt_and_lcc_is_per_prompt():
    probabilities = np.zeros((2, 1, 1, 8), np.float32)
    probabilities[0, 0, 0] = [0.9, 0.9, 0.6, 0.2, 0.0, 0.0, 0.7, 0.0]
    probabilities[1, 0, 0] = [0.1, 0.0, 0.8, 0.9, 0.0, 0.0, 0.0, 0.3]
    table = label_table([_prompt(0, "A", "a", 1), _prompt(1, "A", "b", 2)])
    assert compose(probabilities, table)[0, 0].tolist() == [1, 1, 2, 2, 0, 0, 1, 0]
    assert compose(probabilities, table, lcc={0})[0, 0].tolist() == [1, 1, 2, 2, 0, 0, 0, 0]  # the lone 1 dropped


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _single_and_together(folder: Path, tmp_path: Path, experiment: str, prompts: list[str], *extra: str):
    """Masks of one run per prompt, and the label map of one run with all of them (the default)."""
    common = ["-e", experiment, "--quiet", "-i", str(folder), "--no-mirroring", "--save-probabilities", *extra]
    single = []
    for i, prompt in enumerate(prompts):
        assert predict_main([*common, "-o", str(tmp_path / f"single{i}"), "-p", prompt]) == 0
        single.append(tmp_path / f"single{i}")
    assert predict_main([*common, "-o", str(tmp_path / "together"), "--overlays"]) == 0
    cases = sorted(p.name.replace(".nii.gz", "") for p in (tmp_path / "together").glob("*.nii.gz"))
    assert sorted(p.stem for p in (tmp_path / "together" / "overlays").glob("*.png")) == cases
    assert (tmp_path / "together" / "overlays" / "index.html").is_file()
    return single, tmp_path / "together"


def _assert_agrees_where_no_overlap(single: list[Path], together: Path, values: list[int]) -> None:
    cases = sorted(p.name for p in together.glob("*.nii.gz"))
    assert cases and cases == sorted(p.name for p in single[0].glob("*.nii.gz"))
    for name in cases:
        masks = np.stack([_read(folder / name) for folder in single]).astype(bool)
        labels = _read(together / name)
        alone = masks.sum(0) == 1
        expected = np.zeros(labels.shape, labels.dtype)
        for mask, value in zip(masks, values):
            expected[mask & alone] = value
        assert np.array_equal(labels[alone | ~masks.any(0)], expected[alone | ~masks.any(0)]), name
        assert set(np.unique(labels)) <= {0, *values}
        stem = name.replace(".nii.gz", "")
        probabilities = np.load(together / f"{stem}_prob.npz")
        assert probabilities["probabilities"].shape == (len(values), *labels.shape)
        for k, folder in enumerate(single):  # one channel per prompt, as the single runs
            np.testing.assert_allclose(probabilities["probabilities"][k],
                                       np.load(folder / f"{stem}_prob.npz")["probabilities"], atol=1e-5)


def test_the_demo_pair_in_one_label_map(toy_raw_master, tmp_path):
    with toy_experiment(toy_raw_master, tmp_path / "exp", {"0": []}):
        folder = toy_raw_master / "DemoLA" / "imagesTs"
        single, together = _single_and_together(folder, tmp_path, "DemoLA_DemoPancreas", ["DemoLA", "DemoPancreas"])
        table = json.loads((together / "labels.json").read_text(encoding="utf-8"))
        # both datasets call their structure 1: numbered 1, 2 in prompt order
        assert [(e["dataset"], e["value"]) for e in table["labels"]] == [("DemoLA", 1), ("DemoPancreas", 2)]
        _assert_agrees_where_no_overlap(single, together, [1, 2])
        assert not (single[0] / "labels.json").exists()  # a single prompt stays a 0/1 mask


def test_a_two_label_dataset_keeps_its_own_values_with_one_backbone_pass_per_window(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_tiny_dataset(raw / "Tiny2", num_cases=4, shape=(16, 24, 24), two_labels=True)
    for case in (raw / "Tiny2" / "imagesTr").glob("case0_*"):
        (raw / "Tiny2" / "imagesTs").mkdir(exist_ok=True)
        (raw / "Tiny2" / "imagesTs" / case.name).write_bytes(case.read_bytes())
    monkeypatch.setenv("VERSEMI_PLANS", str(tmp_path / "plans"))
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    plan_and_preprocess(ExperimentRequest(["Tiny2"], raw, tmp_path / "plans", num_processes=1, show_progress=False))
    assert train_main(["3d_fullres", "0", "-tr", "SupervisedTrainer", *TINY_TRAINING]) == 0
    single, together = _single_and_together(raw / "Tiny2" / "imagesTs", tmp_path, "Tiny2",
                                            ["Tiny2:target", "Tiny2:second"], "-tr", "SupervisedTrainer")
    assert json.loads((together / "labels.json").read_text(encoding="utf-8"))["values"] == "each dataset's own label values"
    _assert_agrees_where_no_overlap(single, together, [1, 2])

    ensemble = load_models(tmp_path / "results" / "Tiny2", ["0"], "SupervisedTrainer")
    backbone_calls = []
    ensemble.models[0].network.backbone.register_forward_hook(lambda *a: backbone_calls.append(1))
    data = np.random.default_rng(0).normal(size=(1, 16, 24, 24)).astype(np.float32)
    both = sliding_window_probabilities(ensemble.models[0].network, data, [0, 1], [16, 32, 32], torch.device("cpu"),
                                        mirroring=False)
    assert both.shape == (2, 16, 24, 24) and len(backbone_calls) == 1


def test_prompt_selection_all_several_and_repeats():
    from versemi.inference import resolve_prompts

    plans = {"experiment": "X", "prompts": [_prompt(0, "LA", "LA", 1), _prompt(1, "Heart", "atrium", 1),
                                            _prompt(2, "Heart", "ventricle", 2), _prompt(3, None, None, None)]}
    names = lambda prompts: [p["index"] for p in prompts]  # noqa: E731
    assert names(resolve_prompts(plans, None)) == names(resolve_prompts(plans, ["all"])) == [0, 1, 2]
    assert names(resolve_prompts(plans, ["Heart:ventricle", "LA", "LA"])) == [0, 2]  # prompt order, no repeats
