"""Overlay pictures: the best, median and worst case of an evaluation with both contours drawn,
an index page, and the images found beside the reference labels."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from versemi.cli import evaluate_main
from versemi.datasets.io import read_label, write_image
from versemi.evaluation.overlays import PREDICTION_COLOR, REFERENCE_COLOR, pick_best_median_worst

from conftest import write_tiny_dataset


def _has_color(png, color: str) -> bool:
    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(png[..., :3] - rgb).max(-1) < 0.08).any())


def test_best_median_worst_by_score():
    assert pick_best_median_worst({"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.1}) == [("best", "a"), ("median", "b"),
                                                                                ("worst", "d")]
    assert pick_best_median_worst({"only": 0.3}) == [("best", "only")]


def test_evaluation_draws_the_best_median_and_worst_case_with_both_contours(tmp_path, capsys):
    raw = write_tiny_dataset(tmp_path / "Tiny", num_cases=4, shape=(12, 16, 16))
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for i, shift in enumerate([0, 1, 2, 3]):  # case0 perfect ... case3 shifted most
        label, geometry = read_label(raw / "labelsTr" / f"case{i}.nii.gz")
        write_image(np.roll(label, shift, axis=2), geometry, predictions / f"case{i}.nii.gz")
    assert evaluate_main(["-r", str(raw / "labelsTr"), "-p", str(predictions)]) == 0  # images found beside
    folder = predictions / "summary" / "overlays"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["best_case0.png", "median_case2.png", "worst_case3.png"]
    page = (folder / "index.html").read_text()
    assert all(name in page for name in names) and "Dice label 1 100.0" in page
    worst = imread(folder / "worst_case3.png")
    assert _has_color(worst, REFERENCE_COLOR) and _has_color(worst, PREDICTION_COLOR)
    assert "overlays of the best, median and worst case" in capsys.readouterr().out


def test_without_images_the_evaluation_says_how_to_get_overlays(tmp_path, capsys):
    raw = write_tiny_dataset(tmp_path / "Tiny", num_cases=2)
    labels = tmp_path / "refs"
    shutil.copytree(raw / "labelsTr", labels)
    assert evaluate_main(["-r", str(labels), "-p", str(raw / "labelsTr"), "-o", str(tmp_path / "summary")]) == 0
    assert "pass --images" in capsys.readouterr().out
    assert evaluate_main(["-r", str(labels), "-p", str(raw / "labelsTr"), "-o", str(tmp_path / "summary"),
                          "--images", str(tmp_path / "nowhere")]) == 2
    assert evaluate_main(["-r", str(labels), "-p", str(raw / "labelsTr"), "-o", str(tmp_path / "with"),
                          "--images", str(raw / "imagesTr")]) == 0
    assert (tmp_path / "with" / "overlays" / "index.html").is_file()


@pytest.mark.parametrize("flag", ["--no-overlays"])
def test_overlays_can_be_switched_off(tmp_path, flag):
    raw = write_tiny_dataset(tmp_path / "Tiny", num_cases=2)
    assert evaluate_main(["-r", str(raw / "labelsTr"), "-p", str(raw / "labelsTr"), "-o", str(tmp_path / "s"),
                          flag]) == 0
    assert not (tmp_path / "s" / "overlays").exists()
