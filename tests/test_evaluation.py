"""Evaluation: metrics against MedPy, empty-mask conventions, folder summaries and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from versemi.cli import evaluate_main
from versemi.datasets.io import Geometry, write_image
from versemi.errors import InputError
from versemi.evaluation import binary_metrics, evaluate_folders, format_table_row

medpy_binary = pytest.importorskip("medpy.metric.binary")

SHAPE = (14, 30, 32)
SPACING_ZYX = (2.5, 0.8, 0.8)  # anisotropic: thick slices along z
IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def _blob(center, radii, shape=SHAPE, noise=0.0, seed=0) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mask = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), center, radii)) <= 1
    if noise:
        rng = np.random.default_rng(seed)
        mask ^= rng.random(shape) < noise  # scattered specks: outliers for HD95 and ASD
    return mask


PAIRS = [  # (prediction, reference): overlapping blobs of different sizes and offsets
    (_blob((7, 15, 16), (4, 9, 10)), _blob((7, 15, 16), (4, 8, 9))),
    (_blob((6, 13, 18), (3, 6, 7), noise=0.004, seed=1), _blob((8, 16, 15), (4, 9, 9))),
    (_blob((7, 10, 10), (2, 4, 4)) | _blob((7, 22, 24), (3, 5, 5)), _blob((7, 12, 12), (3, 6, 6))),
    (_blob((0, 15, 16), (5, 10, 14)), _blob((2, 15, 17), (6, 12, 12))),  # touches the image border
]


@pytest.mark.parametrize("index", range(len(PAIRS)))
@pytest.mark.parametrize("voxel_units", [False, True])
def test_metrics_match_medpy(index, voxel_units):
    prediction, reference = PAIRS[index]
    assert prediction.any() and reference.any()
    result = binary_metrics(prediction, reference, SPACING_ZYX, voxel_units=voxel_units)
    spacing = None if voxel_units else SPACING_ZYX
    expected = {
        "dice": medpy_binary.dc(prediction, reference),
        "jaccard": medpy_binary.jc(prediction, reference),
        "hd95": medpy_binary.hd95(prediction, reference, voxelspacing=spacing),
        "asd": medpy_binary.asd(prediction, reference, voxelspacing=spacing),
    }
    assert result.status == "ok"
    for name, value in expected.items():
        assert getattr(result, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert result.hd95 > 0  # the pairs are not identical: a trivially passing 0 would hide a bug


def test_mm_and_voxel_units_differ_on_anisotropic_spacing():
    prediction, reference = PAIRS[1]
    mm = binary_metrics(prediction, reference, SPACING_ZYX)
    voxels = binary_metrics(prediction, reference, SPACING_ZYX, voxel_units=True)
    assert mm.dice == voxels.dice and mm.hd95 != pytest.approx(voxels.hd95)


def test_empty_masks_default_convention():
    empty, full = np.zeros(SHAPE, bool), PAIRS[0][1]
    both = binary_metrics(empty, empty, SPACING_ZYX)
    assert (both.dice, both.jaccard, both.hd95, both.asd, both.status) == (1.0, 1.0, 0.0, 0.0, "both_empty")
    missed = binary_metrics(empty, full, SPACING_ZYX)
    assert (missed.dice, missed.jaccard, missed.status) == (0.0, 0.0, "missed")
    assert math.isnan(missed.hd95) and math.isnan(missed.asd)
    assert missed.reference_voxels == int(full.sum()) and missed.prediction_voxels == 0
    false_positive = binary_metrics(full, empty, SPACING_ZYX)
    assert (false_positive.dice, false_positive.jaccard, false_positive.status) == (0.0, 0.0, "false_positive_only")
    assert math.isnan(false_positive.hd95) and math.isnan(false_positive.asd)


def test_empty_masks_literature_convention():
    empty, full = np.zeros(SHAPE, bool), PAIRS[0][1]
    for prediction, reference, status in ((empty, full, "missed"), (full, empty, "false_positive_only")):
        result = binary_metrics(prediction, reference, SPACING_ZYX, empty_convention="literature")
        assert (result.dice, result.jaccard, result.hd95, result.asd, result.status) == (0, 0, 0, 0, status)
    both = binary_metrics(empty, empty, empty_convention="literature")
    assert (both.dice, both.hd95) == (1.0, 0.0)
    with pytest.raises(ValueError):
        binary_metrics(empty, full, empty_convention="zeros")


# --- folders ---------------------------------------------------------------------------------------

GEOMETRY = Geometry(tuple(reversed(SPACING_ZYX)), (0.0, 0.0, 0.0), IDENTITY)


def _write_folders(tmp_path, missed_case=True, extra=True):
    """Three cases: two ordinary pairs and (optionally) one whose prediction is empty."""
    ref_dir, pred_dir = tmp_path / "labels", tmp_path / "predictions"
    for i, (prediction, reference) in enumerate(PAIRS[:2]):
        write_image(reference.astype(np.uint8), GEOMETRY, ref_dir / f"case{i}.nii.gz")
        write_image(prediction.astype(np.uint8), GEOMETRY, pred_dir / f"case{i}.nii.gz")
    if missed_case:
        write_image(PAIRS[2][1].astype(np.uint8), GEOMETRY, ref_dir / "case2.nii.gz")
        write_image(np.zeros(SHAPE, np.uint8), GEOMETRY, pred_dir / "case2.nrrd")  # other ending pairs too
    if extra:
        write_image(PAIRS[3][0].astype(np.uint8), GEOMETRY, pred_dir / "unlabelled_extra.nii.gz")
    return ref_dir, pred_dir


def test_evaluate_folders_end_to_end(tmp_path):
    ref_dir, pred_dir = _write_folders(tmp_path)
    summary = evaluate_folders(ref_dir, pred_dir)
    out = pred_dir / "summary"
    for name in ("summary.json", "summary.csv", "summary.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "summary.json").read_text(encoding="utf-8"))  # strict JSON: no NaN literals
    assert written == json.loads(json.dumps(summary))
    assert summary["labels"] == [1] and summary["units"] == "mm" and summary["empty_convention"] == "nan"
    assert summary["ignored_predictions"] == ["unlabelled_extra"]

    table = pd.read_csv(out / "summary.csv")
    assert len(table) == 3 and list(table["case"]) == ["case0", "case1", "case2"]
    expected = [binary_metrics(p, r, SPACING_ZYX) for p, r in PAIRS[:2]]
    counts = summary["counts"]["1"]
    assert (counts["cases"], counts["ok"], counts["missed"], counts["hd95_undefined"]) == (3, 2, 1, 1)
    mean = summary["mean"]["1"]
    # the missed case counts with Dice 0; its undefined distances are left out of the distance means
    assert mean["dice"] == pytest.approx(sum(m.dice for m in expected) / 3)
    assert mean["hd95"] == pytest.approx(sum(m.hd95 for m in expected) / 2)
    assert mean["asd"] == pytest.approx(sum(m.asd for m in expected) / 2)
    assert table["hd95"].isna().sum() == 1
    row = format_table_row(summary, 1)
    assert row.startswith(f"Dice {100 * mean['dice']:.2f} | Jaccard ") and " | 95HD " in row and " | ASD " in row

    literature = evaluate_folders(ref_dir, pred_dir, voxel_units=True, empty_convention="literature",
                                  output_dir=tmp_path / "lit")
    assert literature["units"] == "voxels" and literature["empty_convention"] == "literature"
    assert literature["counts"]["1"]["missed"] == 1 and literature["counts"]["1"]["hd95_undefined"] == 0
    voxel_metrics = [binary_metrics(p, r, voxel_units=True) for p, r in PAIRS[:2]]
    assert literature["mean"]["1"]["hd95"] == pytest.approx(sum(m.hd95 for m in voxel_metrics) / 3)
    assert (tmp_path / "lit" / "summary.csv").is_file()


def test_labels_option_and_absent_label(tmp_path):
    ref_dir, pred_dir = _write_folders(tmp_path, missed_case=False, extra=False)
    summary = evaluate_folders(ref_dir, pred_dir, labels=[1, 2], write=False)
    assert summary["labels"] == [1, 2] and summary["files"] == {}
    assert summary["counts"]["2"]["both_empty"] == 2 and summary["mean"]["2"]["dice"] == 1.0
    assert not (pred_dir / "summary").exists()
    with pytest.raises(InputError, match="positive integers"):
        evaluate_folders(ref_dir, pred_dir, labels=[0], write=False)


def test_geometry_mismatch_names_the_file(tmp_path):
    ref_dir, pred_dir = _write_folders(tmp_path, missed_case=False, extra=False)
    moved = Geometry(GEOMETRY.spacing, (5.0, 0.0, 0.0), IDENTITY)
    write_image(PAIRS[0][0].astype(np.uint8), moved, pred_dir / "case0.nii.gz")
    write_image(np.zeros((4, 4, 4), np.uint8), GEOMETRY, pred_dir / "case1.nii.gz")
    with pytest.raises(InputError) as info:
        evaluate_folders(ref_dir, pred_dir)
    message = str(info.value)
    assert "2 problems" in message and "case0.nii.gz" in message and "geometry differs" in message
    assert "case1.nii.gz" in message and "shape" in message and "fix:" in message


def test_missing_predictions_listed_together(tmp_path):
    ref_dir, pred_dir = _write_folders(tmp_path, missed_case=False, extra=False)
    for i in (0, 1):
        (pred_dir / f"case{i}.nii.gz").unlink()
    with pytest.raises(InputError) as info:
        evaluate_folders(ref_dir, pred_dir)
    message = str(info.value)
    assert "2 problems" in message and "case0" in message and "case1" in message and "no prediction" in message


def test_cli_exit_codes(tmp_path, capsys):
    ref_dir, pred_dir = _write_folders(tmp_path, extra=False)
    out = tmp_path / "out"
    assert evaluate_main(["-r", str(ref_dir), "-p", str(pred_dir), "-o", str(out), "--voxel-units"]) == 0
    printed = capsys.readouterr().out
    assert "label 1: Dice " in printed and "1 missed" in printed and str(out / "summary.json") in printed
    assert (out / "summary.png").is_file()
    assert evaluate_main(["-r", str(tmp_path / "nowhere"), "-p", str(pred_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (pred_dir / "case0.nii.gz").unlink()
    assert evaluate_main(["-r", str(ref_dir), "-p", str(pred_dir), "--empty", "literature"]) == 2
    assert "case0" in capsys.readouterr().err
