"""Postprocessing chosen by cross-validation (versemi_find_postprocessing, versemi_predict
--postprocessing auto), the literature's LA benchmark protocol end to end (versemi_benchmark) and
its sliding window (per-axis stride, constant blending)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers.utils import _get_scan_interval
from monai.data.utils import dense_patch_slices

from versemi.benchmark_protocol import LITERATURE_PATCH, LITERATURE_STRIDE, PaddedNetwork, literature_overlap
from versemi.cli import benchmark_main, find_postprocessing_main, predict_main
from versemi.datasets.io import Geometry, write_image
from versemi.inference import Ensemble, FoldModel, predict_case
from versemi.inference import find_postprocessing as fp
from versemi.inference.predictor import CasePrediction

from conftest import SHARED_LA, toy_experiment

EXPERIMENT = "DemoLA_DemoPancreas"
PROMPTS = ("DemoLA/left_atrium", "DemoPancreas/pancreas")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # trains folds and runs the benchmark protocol end to end


@pytest.fixture(scope="module")
def trained(one_thread, toy_raw_master, tmp_path_factory):
    """The toy experiment planned and folds 0 and 1 of a tiny VerSemiTrainer trained briefly."""
    root = tmp_path_factory.mktemp("protocol")
    with toy_experiment(toy_raw_master, root, {"0": [], "1": []}, VERSEMI_RAW=str(toy_raw_master)) as experiment:
        yield SimpleNamespace(raw=toy_raw_master, root=root, experiment=experiment)

# ----- versemi_find_postprocessing -----
def test_find_postprocessing_decides_per_prompt_from_the_validation_cases(trained, capsys):
    assert find_postprocessing_main(["--no-mirroring", "--quiet"]) == 0
    out = capsys.readouterr().out
    path = trained.experiment / "VerSemiTrainer__3d_fullres" / "postprocessing.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["folds"] == ["0", "1"] and sorted(result["prompts"]) == sorted(PROMPTS)
    plans = json.loads((trained.root / "plans" / EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    for key, decision in result["prompts"].items():
        dataset = key.split("/")[0]
        val = [k for f in (0, 1) for k in plans["splits"]["folds"][f]["val"] if k.startswith(dataset + "/")]
        assert decision["cases"] == len(val) >= 2
        assert 0 <= decision["dice_without"] <= 1 and 0 <= decision["dice_with"] <= 1
        assert decision["apply_lcc"] == (decision["dice_with"] >= decision["dice_without"])
        assert key in out
    assert sorted(c["case"] for c in result["cases"]) == sorted(k for f in (0, 1)
                                                                 for k in plans["splits"]["folds"][f]["val"])
    assert not list(path.parent.glob(".postprocessing.json.*"))  # written atomically, no leftovers


def test_lcc_is_kept_only_where_it_does_not_lower_the_mean_dice(trained, monkeypatch):
    """Stand-ins: each reference is one component (plus, for DemoPancreas, a separate true voxel in
    a corner); DemoLA is predicted as its reference plus a false-positive voxel in the opposite
    corner (LCC helps), DemoPancreas exactly (LCC removes the true corner voxel: it hurts)."""
    real_read_label = fp.read_label

    def stand_in_label(path):
        label, geometry = real_read_label(path)
        label = fp.largest_connected_component(label > 0).astype(label.dtype)
        assert not label[:2, :2, :2].any() and not label[-2:, -2:, -2:].any()
        if "DemoPancreas" in str(path):
            label[-1, -1, -1] = 1
        return label, geometry

    def stand_in_prediction(ensemble, files, prompt, *args, **kwargs):
        case = Path(files[0]).name[:-len("_0000.nii.gz")]
        label, geometry = stand_in_label(Path(files[0]).parents[1] / "labelsTr" / f"{case}.nii.gz")
        if prompt["dataset"] == "DemoLA":
            label[0, 0, 0] = 1
        return CasePrediction(label.astype(np.uint8), geometry, None)

    monkeypatch.setattr(fp, "read_label", stand_in_label)
    monkeypatch.setattr(fp, "predict_case", stand_in_prediction)
    result = fp.find_postprocessing(trained.experiment, raw_root=trained.raw, write=False)
    la, pancreas = result["prompts"]["DemoLA/left_atrium"], result["prompts"]["DemoPancreas/pancreas"]
    assert la["dice_with"] == 1.0 > la["dice_without"] and la["apply_lcc"]
    assert pancreas["dice_without"] == 1.0 > pancreas["dice_with"] and not pancreas["apply_lcc"]
    assert la["cases"] == pancreas["cases"] == 2


# ----- versemi_predict --postprocessing auto -----
def _components(folder: Path) -> int:
    (output,) = folder.iterdir()
    return int(cc3d.connected_components(sitk.GetArrayFromImage(sitk.ReadImage(str(output)))).max())


def test_predict_follows_the_postprocessing_decision(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained.experiment, tmp_path / "results" / EXPERIMENT)
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    decision_file = tmp_path / "results" / EXPERIMENT / "VerSemiTrainer__3d_fullres" / "postprocessing.json"
    images = trained.raw / "DemoLA" / "imagesTs"

    def predict(name: str, *extra: str) -> int:
        return predict_main(["-i", str(images), "-o", str(tmp_path / name), "-p", "DemoLA", "-f", "0",
                             "--no-mirroring", "--quiet", *extra])

    decision_file.unlink(missing_ok=True)
    assert predict("missing", "--postprocessing", "auto") == 2
    assert "run versemi_find_postprocessing" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    assert predict("both", "--postprocessing", "auto", "--lcc") == 2

    from versemi.inference import predictor
    received, original = [], predictor.predict_cases

    def spy(*args, **kwargs):
        received.append(kwargs["lcc"])
        return original(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict_cases", spy)
    assert predict("plain") == 0 and predict("lcc", "--lcc") == 0  # unchanged without the option
    for apply in (True, False):
        decisions = {"folds": ["0"], "prompts": {p: {"apply_lcc": apply, "dice_without": 0.5, "dice_with": 0.6,
                                                     "cases": 2} for p in PROMPTS}}
        decision_file.write_text(json.dumps(decisions))
        name = f"auto_{apply}"
        assert predict(name, "--postprocessing", "auto") == 0
        assert f"largest connected component {'on' if apply else 'off'}" in capsys.readouterr().out
        same_as = tmp_path / ("lcc" if apply else "plain")
        (a,), (b,) = (tmp_path / name).iterdir(), same_as.iterdir()
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(b))))
    assert received == [False, True, True, False]
    assert _components(tmp_path / "auto_True") <= 1


# ----- the literature's sliding window -----
def _ua_mt_starts(size: int, patch: int, stride: int) -> list[int]:
    """UA-MT's test_single_case window starts along one axis (after padding to the patch)."""
    size = max(size, patch)
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


@pytest.mark.parametrize("shape", [(88, 140, 192), (88, 130, 150), (80, 112, 112), (60, 100, 245), (96, 160, 239)])
def test_literature_overlap_gives_the_ua_mt_windows(shape):
    padded = [max(s, p) for s, p in zip(shape, LITERATURE_PATCH)]
    interval = _get_scan_interval(padded, LITERATURE_PATCH, 3, literature_overlap())
    assert all(i == s or p == n for i, s, p, n in zip(interval, LITERATURE_STRIDE, LITERATURE_PATCH, padded))
    slices = dense_patch_slices(padded, LITERATURE_PATCH, interval)
    for axis in range(3):
        starts = sorted({s[axis].start for s in slices})
        assert starts == _ua_mt_starts(shape[axis], LITERATURE_PATCH[axis], LITERATURE_STRIDE[axis])


class ConstantNet(torch.nn.Module):
    """The same logits everywhere."""

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], prompts.shape[1], 1, *x.shape[2:])
        return torch.cat([torch.zeros(shape), torch.full(shape, 0.7)], dim=2)


class PointwiseNet(torch.nn.Module):
    """Foreground logit = 8 x intensity; needs inputs divisible by ``divisor`` (like a U-Net)."""

    divisor = (1, 1, 1)

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        assert all(s % d == 0 for s, d in zip(x.shape[2:], self.divisor)), x.shape
        foreground = 8 * x[:, :1, None].expand(-1, prompts.shape[1], -1, -1, -1, -1)
        return torch.cat([torch.zeros_like(foreground), foreground], dim=2)


class CoarsePointwiseNet(PointwiseNet):
    divisor = (16, 32, 32)


PLANS = {"experiment": "X", "in_channels": 1,
         "prompts": [{"index": 0, "dataset": "LA", "label": "left_atrium", "label_value": 1},
                     {"index": 1, "dataset": None, "label": "synthetic", "label_value": None}],
         "datasets": {"LA": {"target_spacing": [1.0, 1.0, 1.0],
                             "normalization": [{"channel": "MRI", "scheme": "zscore", "use_nonzero_mask": False}]}}}


@pytest.mark.parametrize("network", [ConstantNet(), PointwiseNet(), CoarsePointwiseNet()])
def test_literature_window_matches_the_gaussian_window_on_position_independent_networks(tmp_path, network):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (84, 116, 120)).astype(np.float32)  # 2 x 2 x 2 literature windows
    source = tmp_path / "case_0000.nii.gz"
    write_image(image, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), source)
    divisor = getattr(network, "divisor", (1, 1, 1))
    literature_net = PaddedNetwork(network, divisor) if any(p % d for p, d in zip(LITERATURE_PATCH, divisor)) \
        else network
    gaussian = Ensemble(PLANS, "3d_fullres", [FoldModel("all", Path("-"), "-", network, [32, 64, 64])],
                        torch.device("cpu"))
    literature = Ensemble(PLANS, "3d_fullres", [FoldModel("all", Path("-"), "-", literature_net, [32, 64, 64])],
                          torch.device("cpu"))
    expected = predict_case(gaussian, [source], "LA", mirroring=False, keep_probabilities=True)
    found = predict_case(literature, [source], "LA", mirroring=False, keep_probabilities=True,
                         patch_size=list(LITERATURE_PATCH), overlap=literature_overlap(), blend="constant")
    np.testing.assert_allclose(found.probabilities, expected.probabilities, atol=1e-5)
    assert np.array_equal(found.mask, expected.mask)
    if isinstance(network, ConstantNet):
        np.testing.assert_allclose(found.probabilities, 1 / (1 + np.exp(-0.7)), atol=1e-5)


# ----- versemi_benchmark on real LA cases -----
def test_benchmark_protocol_end_to_end_on_real_la_cases(tmp_path, capsys):
    if not SHARED_LA.is_dir():
        pytest.skip(f"real LA data not found at {SHARED_LA} (../shared/data/la2018_h5 beside the checkout)")
    ids = [line.strip() for line in (SHARED_LA / "train.list").read_text(encoding="utf-8").splitlines() if line.strip()][:4]
    source = tmp_path / "la_h5"
    source.mkdir()
    for case_id in ids:
        (source / case_id).symlink_to(SHARED_LA / case_id)
    (source / "train.list").write_text("\n".join(ids) + "\n")
    (tmp_path / "test_ids.txt").write_text(ids[1] + "\n")
    work = tmp_path / "work"
    argv = ["la-h5", str(source), "--labeled", "2", "--test-ids", str(tmp_path / "test_ids.txt"), "--work", str(work),
            "--epochs", "1", "--iterations-per-epoch", "2", "--patch-size", "16", "32", "32", "--batch-size", "2",
            "--features", "4", "8", "16", "--num-workers", "0", "--spacing-scale", "2", "-np", "1", "--device", "cpu",
            "--quiet"]
    assert benchmark_main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "| Jaccard" in line]
    assert [row.split()[0] for row in rows] == ["pipeline", "pipeline+lcc", "literature", "literature+lcc"]
    assert "applied in the plan's grid" in out
    summary = json.loads((work / "benchmark_summary.json").read_text(encoding="utf-8"))
    assert summary["test_cases"] == [ids[1]] and summary["labeled_cases"] == [ids[0], ids[2]]
    assert summary["unlabeled_cases"] == [ids[3]] and summary["distance_units"] == "voxels"
    assert summary["windows"]["literature"]["grid"] == "plan" and summary["plan"]["spacing_scale"] == 2
    for name, variant in summary["variants"].items():
        assert variant["counts"]["cases"] == 1 and 0 <= variant["mean"]["dice"] <= 1
        (prediction,) = Path(variant["predictions"]).iterdir()
        reference = work / "raw" / "LA" / "labelsTs" / f"{ids[1]}.nii.gz"
        assert sitk.ReadImage(str(prediction)).GetSize() == sitk.ReadImage(str(reference)).GetSize()
    # the test case never entered training: neither labeled nor unlabeled in the plan
    plans = json.loads(Path(summary["plan"]["file"]).read_text(encoding="utf-8"))
    assert ids[1] not in plans["datasets"]["LA"]["labeled_cases"] + plans["datasets"]["LA"]["unlabeled_cases"]
    # a rerun reuses everything; another test split in the same work folder is refused
    assert benchmark_main(argv) == 0
    assert "(reused; fold all" in capsys.readouterr().out
    (tmp_path / "test_ids.txt").write_text(ids[2] + "\n")
    assert benchmark_main(argv) == 2
    assert "holds another train/test split" in capsys.readouterr().err
