"""Every bad input of the integrity check is reported (file, problem, fix), all in one pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

from versemi.cli import plan_and_preprocess_main
from versemi.datasets.io import Geometry, read_image, write_image

from conftest import write_tiny_dataset

GEOMETRY = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def run(raw, plans, *args):
    return plan_and_preprocess_main(["--raw", str(raw), "--plans-root", str(plans), "--quiet", "-np", "1", *args])


def corrupt(folder, kind):
    """Damage a valid tiny dataset in one way; return (file named in the message, message text)."""
    images, labels = folder / "imagesTr", folder / "labelsTr"
    if kind == "unreadable":
        (images / "case1_0000.nii.gz").write_bytes(b"this is not an image")
        return "case1_0000.nii.gz", "cannot be read as an image"
    if kind == "shape":
        write_image(np.zeros((5, 8, 10), np.uint8), GEOMETRY, labels / "case1.nii.gz")
        return "case1.nii.gz", "differs from the image's"
    if kind == "geometry":
        label = np.zeros((6, 8, 10), np.uint8)
        write_image(label, Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), GEOMETRY.direction), labels / "case1.nii.gz")
        return "case1.nii.gz", "geometry differs"
    if kind == "label_values":
        label = np.zeros((6, 8, 10), np.uint8)
        label[0, 0, 0] = 7
        write_image(label, GEOMETRY, labels / "case1.nii.gz")
        return "case1.nii.gz", "label values [7] are not declared"
    if kind == "nan":
        image, _ = read_image([images / "case1_0000.nii.gz"])
        image[0, 0, 0, :3] = np.nan
        write_image(image[0], GEOMETRY, images / "case1_0000.nii.gz")
        return "case1_0000.nii.gz", "3 voxel(s) are NaN or infinite"
    if kind == "channels":
        write_image(np.zeros((6, 8, 10), np.float32), GEOMETRY, images / "case1_0001.nii.gz")
        return "case1_XXXX.nii.gz", "channel files [0, 1]"
    if kind == "missing_label":
        (labels / "case1.nii.gz").unlink()
        return "case1.nii.gz", "label missing"
    if kind == "duplicate_id":
        write_image(np.ones((6, 8, 10), np.float32), GEOMETRY, folder / "imagesUnlabeled" / "case1_0000.nii.gz")
        return "case1_0000.nii.gz", "used in both imagesTr and imagesUnlabeled"
    if kind == "orphan_label":
        write_image(np.zeros((6, 8, 10), np.uint8), GEOMETRY, labels / "ghost.nii.gz")
        return "ghost.nii.gz", "has no image"
    raise ValueError(kind)


KINDS = ["unreadable", "shape", "geometry", "label_values", "nan", "channels", "missing_label", "duplicate_id",
         "orphan_label"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_reported_and_nothing_written(tmp_path, capsys, kind):
    raw, plans = tmp_path / "raw", tmp_path / "plans"
    folder = write_tiny_dataset(raw / "Toy")
    file_name, message = corrupt(folder, kind)
    assert run(raw, plans, "-d", "Toy") == 2
    err = capsys.readouterr().err
    assert file_name in err and message in err and "fix:" in err
    assert not plans.exists(), "nothing may be written when the input is bad"
    assert run(raw, plans, "-d", "Toy", "--verify-only") == 2
    assert message in capsys.readouterr().err


def test_unknown_dataset_name(tmp_path, capsys):
    write_tiny_dataset(tmp_path / "raw" / "Toy")
    assert run(tmp_path / "raw", tmp_path / "plans", "-d", "Toy", "Pancreas") == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'Pancreas'" in err and "Toy" in err
    assert not (tmp_path / "plans").exists()


def test_all_problems_of_all_datasets_in_one_pass(tmp_path, capsys):
    raw, plans = tmp_path / "raw", tmp_path / "plans"
    first = write_tiny_dataset(raw / "First")
    second = write_tiny_dataset(raw / "Second")
    corrupt(first, "nan")
    corrupt(first, "label_values")
    corrupt(second, "missing_label")
    meta = json.loads((second / "dataset.json").read_text(encoding="utf-8"))
    meta["numTraining"] = 9
    (second / "dataset.json").write_text(json.dumps(meta))
    assert run(raw, plans, "-d", "First", "Second", "Missing") == 2
    err = capsys.readouterr().err
    for expected in ("NaN or infinite", "not declared", "label missing", "numTraining is 9", "unknown dataset 'Missing'"):
        assert expected in err
    assert "5 problems found" in err


def test_verify_only_passes_clean_data_and_writes_nothing(tmp_path, capsys):
    write_tiny_dataset(tmp_path / "raw" / "Toy", unlabeled=1)
    assert run(tmp_path / "raw", tmp_path / "plans", "-d", "Toy", "--verify-only") == 0
    assert "no problems found" in capsys.readouterr().out
    assert not (tmp_path / "plans").exists()


def test_labeled_limit_out_of_range(tmp_path, capsys):
    write_tiny_dataset(tmp_path / "raw" / "Toy")
    assert run(tmp_path / "raw", tmp_path / "plans", "-d", "Toy", "--labeled", "Toy=9") == 2
    assert "give a number from 1 to 3" in capsys.readouterr().err
