"""Label maps of several datasets' structures: scored on the cases' own structures (at their own
label values), and the voxels given to another dataset's structure measured per case."""
from __future__ import annotations

import json

import numpy as np
import pytest

from versemi.cli import evaluate_main
from versemi.datasets.io import Geometry, write_image
from versemi.errors import InputError
from versemi.evaluation import binary_metrics, evaluate_folders

pytest.importorskip("medpy.metric.binary")

SHAPE = (10, 20, 20)
GEOMETRY = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
# two datasets whose structure is label 1 in both: versemi_predict numbers them 1..K (prompt order)
TABLE = {"background": 0, "labels": [
    {"value": 1, "dataset": "Atrium", "label": "left_atrium", "label_value": 1, "prompt": 0},
    {"value": 2, "dataset": "Pancreas", "label": "pancreas", "label_value": 1, "prompt": 1}]}


def _cases(tmp_path):
    """Two atrium cases: references, and label maps where value 1 is the atrium and 2 the pancreas."""
    reference_dir = tmp_path / "raw" / "Atrium" / "labelsTs"
    prediction_dir = tmp_path / "predictions"
    references, maps = [], []
    for i, pancreas_voxels in enumerate((0, 300)):
        reference = np.zeros(SHAPE, np.uint8)
        reference[2:8, 4:14, 4:14] = 1
        label_map = np.zeros(SHAPE, np.uint8)
        label_map[2:8, 5:14, 4:14] = 1                       # the atrium, one row short
        label_map.reshape(-1)[label_map.size - pancreas_voxels:] = 2  # a pancreas claimed in the last slice
        write_image(reference, GEOMETRY, reference_dir / f"case{i}.nii.gz")
        write_image(label_map, GEOMETRY, prediction_dir / f"case{i}.nii.gz")
        references.append(reference)
        maps.append(label_map)
    (prediction_dir / "labels.json").write_text(json.dumps(TABLE), encoding="utf-8")
    return reference_dir, prediction_dir, references, maps


def test_the_own_structure_is_scored_and_the_foreign_one_measured(tmp_path):
    reference_dir, prediction_dir, references, maps = _cases(tmp_path)
    summary = evaluate_folders(reference_dir, prediction_dir)
    assert summary["labels"] == [1]
    expected = [binary_metrics(m == 1, r == 1, (1.0, 1.0, 1.0)).dice for m, r in zip(maps, references)]
    assert summary["mean"]["1"]["dice"] == pytest.approx(np.mean(expected))
    claims = summary["foreign_claims"]
    assert claims["dataset"] == "Atrium"
    pancreas = claims["structures"]["Pancreas/pancreas"]
    assert pancreas["cases_claimed"] == 1
    assert pancreas["max"] == pytest.approx(300 / np.prod(SHAPE))
    assert pancreas["mean"] == pytest.approx(150 / np.prod(SHAPE))
    assert claims["cases"]["case0"]["total"] == 0 and claims["cases"]["case1"]["total"] == pytest.approx(0.075)
    written = json.loads((prediction_dir / "summary" / "summary.json").read_text(encoding="utf-8"))
    assert written["foreign_claims"]["structures"] == claims["structures"]


def test_the_pancreas_scans_score_value_2_as_their_label_1(tmp_path):
    """The same maps read as pancreas scans: value 2 is their own structure, the atrium is foreign."""
    _, prediction_dir, references, maps = _cases(tmp_path)
    pancreas_dir = tmp_path / "raw" / "Pancreas" / "labelsTs"
    for i, label_map in enumerate(maps):
        write_image((label_map == 2).astype(np.uint8), GEOMETRY, pancreas_dir / f"case{i}.nii.gz")
    summary = evaluate_folders(pancreas_dir, prediction_dir, output_dir=tmp_path / "pancreas_summary")
    assert summary["counts"]["1"]["ok"] == 1 and summary["counts"]["1"]["both_empty"] == 1
    assert summary["mean"]["1"]["dice"] == pytest.approx(1.0)  # value 2 compared with label 1, not value 1
    assert set(summary["foreign_claims"]["structures"]) == {"Atrium/left_atrium"}


def test_an_unknown_dataset_is_refused_and_dataset_names_it(tmp_path, capsys):
    reference_dir, prediction_dir, _, _ = _cases(tmp_path)
    elsewhere = tmp_path / "labels_elsewhere"
    elsewhere.mkdir()
    for path in reference_dir.iterdir():
        (elsewhere / path.name).write_bytes(path.read_bytes())
    with pytest.raises(InputError, match="--dataset"):
        evaluate_folders(elsewhere, prediction_dir, write=False)
    assert evaluate_main(["-r", str(elsewhere), "-p", str(prediction_dir), "--dataset", "Atrium", "--no-overlays",
                          "-o", str(tmp_path / "out")]) == 0
    assert "Pancreas/pancreas claimed in Atrium scans" in capsys.readouterr().out


def test_a_single_dataset_label_map_has_no_foreign_claims(tmp_path):
    reference_dir, prediction_dir, _, _ = _cases(tmp_path)
    table = {**TABLE, "labels": TABLE["labels"][:1]}
    (prediction_dir / "labels.json").write_text(json.dumps(table), encoding="utf-8")
    assert evaluate_folders(reference_dir, prediction_dir, write=False)["foreign_claims"] is None


def test_the_overlays_draw_the_foreign_structure_and_the_case_that_claims_most(tmp_path):
    from versemi.evaluation.overlays import write_evaluation_overlays

    reference_dir, prediction_dir, references, _ = _cases(tmp_path)
    images = tmp_path / "raw" / "Atrium" / "imagesTs"
    for i, reference in enumerate(references):
        write_image(reference.astype(np.float32) + 0.1, GEOMETRY, images / f"case{i}_0000.nii.gz")
    summary = evaluate_folders(reference_dir, prediction_dir, write=False)
    folder = write_evaluation_overlays(summary, images, tmp_path / "overlays")
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert "Pancreas/pancreas claims 7.50 % of the voxels" in page
    assert len(list(folder.glob("*.png"))) == 2
