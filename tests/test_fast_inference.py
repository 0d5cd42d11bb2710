"""Faster prediction without other results: bf16 agrees with fp32, reading and writing overlap the
network and change nothing, and prediction feeds the network exactly what training's cache holds."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from versemi.cli import predict_main
from versemi.datasets.io import read_image
from versemi.inference import load_models, predict_case, predict_cases, resolve_prompt
from versemi.inference.predictor import _run_cases, prepare_case
from versemi.inference.sliding_window import autocast_dtype
from versemi.preprocessing.cache import read_array

from conftest import TOY_EXPERIMENT, supervised_toy_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread, toy_raw_master, tmp_path_factory):
    with supervised_toy_model(toy_raw_master, tmp_path_factory.mktemp("fast_inference")) as model:
        yield model


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_bf16_prediction_agrees_with_fp32_on_every_case(trained):
    ensemble = load_models(trained.experiment, folds=["0"], trainer="SupervisedTrainer")
    for dataset in ("DemoLA", "DemoPancreas"):
        for image in sorted((trained.raw / dataset / "imagesTs").glob("*_0000.nii.gz")):
            ensemble.precision = "fp32"
            fp32 = predict_case(ensemble, [image], dataset, mirroring=False, keep_probabilities=True)
            ensemble.precision = "bf16"
            bf16 = predict_case(ensemble, [image], dataset, mirroring=False, keep_probabilities=True)
            assert fp32.mask.sum() > 100, f"{image.name}: the model finds no structure, agreement would mean nothing"
            assert np.abs(fp32.probabilities - bf16.probabilities).max() > 1e-4, "bf16 was not used"
            assert _dice(fp32.mask.astype(bool), bf16.mask.astype(bool)) >= 0.995, image.name


@pytest.mark.parametrize("bf16_units,same_as", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_predicts_as_the_cpus_bf16_units_decide(trained, tmp_path, monkeypatch, bf16_units, same_as):
    """``--precision auto`` on a CPU with bf16 units (or without, whatever this machine has) writes
    exactly what the explicit precision writes."""
    monkeypatch.setattr(sys.modules[autocast_dtype.__module__], "cpu_has_bf16", lambda: bf16_units)
    folder = trained.raw / "DemoLA" / "imagesTs"
    masks = {}
    for precision in ("auto", same_as):
        out = tmp_path / precision
        assert predict_main(["-e", TOY_EXPERIMENT, "-tr", "SupervisedTrainer", "-i", str(folder), "-o", str(out),
                             "-p", "DemoLA", "--device", "cpu", "--precision", precision, "--no-mirroring",
                             "--save-probabilities", "--quiet"]) == 0
        masks[precision] = {p.name: np.load(p)["probabilities"] for p in sorted(out.glob("*.npz"))}
    assert masks["auto"] and masks["auto"].keys() == masks[same_as].keys()
    for name, probabilities in masks["auto"].items():
        assert np.array_equal(probabilities, masks[same_as][name]), name


def test_fp16_on_a_cpu_is_refused_before_any_work(trained, tmp_path, capsys):
    folder = trained.raw / "DemoLA" / "imagesTs"
    code = predict_main(["-e", TOY_EXPERIMENT, "-tr", "SupervisedTrainer", "-i", str(folder), "-o",
                         str(tmp_path / "out"), "-p", "DemoLA", "--device", "cpu", "--precision", "fp16", "--quiet"])
    assert code != 0 and not (tmp_path / "out").exists()
    assert "--precision fp16" in capsys.readouterr().err


def test_prediction_feeds_the_network_what_the_training_cache_holds(trained):
    """Cropping, normalization and resampling are one function: the predictor's network input of
    every training case equals its cached array bit for bit (z-score MRI and CT)."""
    ensemble = load_models(trained.experiment, folds=["0"], trainer="SupervisedTrainer")
    compared = 0
    for dataset in ("DemoLA", "DemoPancreas"):
        prompt = resolve_prompt(ensemble.plans, dataset)
        for path in sorted((trained.cache / dataset).glob("*.json")):
            properties = json.loads(path.read_text(encoding="utf-8"))
            folder = "imagesTr" if properties["labeled"] else "imagesUnlabeled"
            files = sorted((trained.raw / dataset / folder).glob(f"{properties['case_id']}_*"))
            prepared = prepare_case(ensemble, files, [prompt])
            (rows, network_input), = prepared.inputs
            cached = read_array(trained.cache / dataset / properties["files"]["data"]["name"])
            assert network_input.dtype == cached.dtype and np.array_equal(network_input, cached), path.name
            assert prepared.cropped.bbox == properties["crop_bbox"]
            assert list(prepared.cropped.full_shape) == properties["original_shape"]
            compared += 1
    assert compared >= 4


def test_background_reading_and_writing_change_no_output(trained, tmp_path):
    ensemble = load_models(trained.experiment, folds=["0"], trainer="SupervisedTrainer")
    folders = [trained.raw / "DemoPancreas" / "imagesTs", trained.raw / "DemoPancreas" / "imagesTr"]
    outputs = {}
    for background in (True, False):
        out = tmp_path / str(background)
        written = predict_cases(folders, out, "DemoPancreas", ensemble, mirroring=False, save_probabilities=True,
                                show_progress=False, background_io=background)
        assert len(written) >= 3
        outputs[background] = {p.name: read_image([p])[0] for p in written}
    assert outputs[True].keys() == outputs[False].keys()
    for name in outputs[True]:
        assert np.array_equal(outputs[True][name], outputs[False][name]), name


def test_next_case_is_read_and_previous_written_while_the_network_runs():
    """Case 1 must be read while the network runs on case 0, and case 0 written while it runs on
    case 1: each side waits for the other, which only overlapping stages can satisfy."""
    case1_read, network_on_case1 = threading.Event(), threading.Event()

    def prepare(case):
        if case == 1:
            case1_read.set()
        return SimpleNamespace(inputs=[case])

    def network(prepared):
        case = prepared.inputs[0]
        if case == 0:
            assert case1_read.wait(10), "case 1 was not read while the network ran on case 0"
        if case == 1:
            network_on_case1.set()
        return case

    def finish(case, prepared, stitched):
        if case == 0:
            assert network_on_case1.wait(10), "case 0 was not written while the network ran on case 1"
        return Path(f"case{stitched}")

    assert _run_cases([0, 1, 2], prepare, network, finish, True, False) == [Path("case0"), Path("case1"),
                                                                            Path("case2")]


def test_a_failing_case_stops_the_run_with_its_error():
    def prepare(case):
        if case == 2:
            raise ValueError("case 2 cannot be read")
        return SimpleNamespace(inputs=[case])

    with pytest.raises(ValueError, match="case 2 cannot be read"):
        _run_cases([0, 1, 2, 3], prepare, lambda p: p.inputs[0], lambda c, p, s: Path(str(c)), True, False)
