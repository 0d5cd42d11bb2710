"""Overlay pictures: the best, median and worst case of an evaluation with both contours drawn,
an index page, and the images found beside the reference labels."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.text import Text

from versemi.cli import evaluate_main
from versemi.datasets.io import read_image, read_label, write_image
from versemi.datasets.layout import write_dataset_json
from versemi.evaluation.overlays import PREDICTION_COLOR, REFERENCE_COLOR, overlay_figure, pick_best_median_worst
from versemi.evaluation.structure_names import structure_names, structure_title
from versemi.inference.label_map import label_table, write_label_table

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
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert all(name in page for name in names) and "Dice target 100.0" in page
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


HIPPOCAMPUS_LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def _named_two_structure_dataset(folder):
    """Two structures, named in dataset.json as the hippocampus dataset names them; isotropic cubes,
    where a title under a row of square pictures used to run into it."""
    raw = write_tiny_dataset(folder, num_cases=2, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), two_labels=True)
    write_dataset_json(raw, ["MRI"], HIPPOCAMPUS_LABELS, 2)
    return raw


def _texts_over_pictures(figure) -> list[str]:
    """Every text of the drawn figure (titles, legend) whose box meets a picture's box."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    pictures = [image.get_window_extent(renderer) for ax in figure.axes for image in ax.images]
    texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text()]
    return [t.get_text() for t in texts if any(t.get_window_extent(renderer).overlaps(p) for p in pictures)]


def test_label_map_overlay_names_the_structures_and_no_title_covers_a_picture(tmp_path):
    raw = _named_two_structure_dataset(tmp_path / "Hippocampus")
    names = structure_names(raw / "labelsTr", tmp_path)
    assert names == {1: "Anterior", 2: "Posterior"}
    image, geometry = read_image([raw / "imagesTr" / "case0_0000.nii.gz"])
    label, _ = read_label(raw / "labelsTr" / "case0.nii.gz")
    figure = overlay_figure(image[0], geometry, names, label, label, "case0: a two-structure label map")
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 6 and sorted(t.split(":")[0] for t in titles) == ["Anterior"] * 3 + ["Posterior"] * 3
    assert _texts_over_pictures(figure) == []


def test_evaluation_names_the_structures_as_dataset_json_does(tmp_path):
    raw = _named_two_structure_dataset(tmp_path / "Hippocampus")
    assert evaluate_main(["-r", str(raw / "labelsTr"), "-p", str(raw / "labelsTr"), "-o", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text(encoding="utf-8"))["label_names"] == {"1": "Anterior",
                                                                                         "2": "Posterior"}
    page = (tmp_path / "s" / "overlays" / "index.html").read_text(encoding="utf-8")
    assert "Dice Anterior 100.0, Posterior 100.0" in page and "label 1" not in page


def test_a_label_map_is_named_by_its_labels_json_where_no_dataset_json_names_it(tmp_path):
    prompts = [{"dataset": "DemoLA", "label": "left_atrium", "label_value": 1, "index": 0},
               {"dataset": "DemoPancreas", "label": "pancreas", "label_value": 1, "index": 1}]
    write_label_table(label_table(prompts), tmp_path)
    assert structure_names(tmp_path / "references", tmp_path) == {1: "DemoLA/left_atrium", 2: "DemoPancreas/pancreas"}
    assert structure_title({"1": "Anterior"}, 2) == "label 2"
