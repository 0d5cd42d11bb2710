"""Real Decathlon data: a few Task04_Hippocampus cases through the msd converter, the integrity
check and planning, exactly as they are shipped.

The data are read from ``../shared/data/Task04_Hippocampus`` beside the checkout, or from
``$VERSEMI_TEST_DATA/Task04_Hippocampus``; the tests skip where the folder is absent. The cases:
hippocampus_003 is the one label of the 200 stored as float32 (the others are uint8),
hippocampus_001 has a uint8 image and hippocampus_004 a float32 image, so every storage type
found in the task is converted.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from versemi.cli import convert_main, plan_and_preprocess_main
from versemi.datasets.io import read_image, read_label
from versemi.datasets.layout import load_dataset
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

DATA = Path(os.environ.get("VERSEMI_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
HIPPOCAMPUS = DATA / "Task04_Hippocampus"
CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")
FLOAT_LABEL = "hippocampus_003"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def case_id(entry: dict) -> str:
    return Path(entry["image"]).name[: -len(".nii.gz")]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The chosen cases, byte-identical, in an MSD task folder whose dataset.json lists only them."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"Task04_Hippocampus not found: {HIPPOCAMPUS}; put the Decathlon's Task04_Hippocampus there "
                    "to run these tests (or set VERSEMI_TEST_DATA to the folder that holds it)")
    folder = tmp_path_factory.mktemp("msd") / "Task04_Hippocampus"
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text(encoding="utf-8"))
    meta["training"] = [e for e in meta["training"] if case_id(e) in CASES]
    meta["numTraining"] = len(meta["training"])
    for entry in meta["training"]:
        for key in ("image", "label"):
            (folder / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HIPPOCAMPUS / entry[key], folder / entry[key])
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4))
    return folder


@pytest.fixture(scope="module")
def raw(source, tmp_path_factory) -> Path:
    """A raw root holding the converted cases as the dataset Hippocampus."""
    root = tmp_path_factory.mktemp("raw")
    assert convert_main(["msd", str(source), "-o", str(root / "Hippocampus"), "--quiet"]) == 0
    return root


def geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def verify(raw_root: Path, plans: Path) -> int:
    return plan_and_preprocess_main(["--raw", str(raw_root), "--plans-root", str(plans), "-d", "Hippocampus",
                                     "--verify-only", "--quiet", "-np", "1"])


def test_the_copies_are_the_shipped_files(source):
    meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    assert sorted(case_id(e) for e in meta["training"]) == list(CASES)
    for entry in meta["training"]:
        for key in ("image", "label"):
            assert filecmp.cmp(source / entry[key], HIPPOCAMPUS / entry[key], shallow=False)
    # the float-label case must stay what it was chosen for
    dtypes = {c: nib.load(source / "labelsTr" / f"{c}.nii.gz").get_data_dtype() for c in CASES}
    assert [c for c, dtype in dtypes.items() if dtype.kind == "f"] == [FLOAT_LABEL]


def test_conversion_keeps_cases_label_names_voxels_and_geometry(source, raw):
    folder = raw / "Hippocampus"
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == len(CASES) and meta["labels"] == LABELS and meta["channel_names"] == {"0": "MRI"}
    dataset = load_dataset(folder)
    assert [c.case_id for c in dataset.labeled_cases()] == list(CASES)
    for case in dataset.labeled_cases():
        src_image = source / "imagesTr" / f"{case.case_id}.nii.gz"
        src_label = source / "labelsTr" / f"{case.case_id}.nii.gz"
        image, image_geometry = read_image(case.images)
        label, label_geometry = read_label(case.label)
        assert image.shape[1:] == label.shape
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        assert np.array_equal(image[0], np.asanyarray(nib.load(src_image).dataobj).transpose(2, 1, 0))
        assert np.array_equal(label, np.asanyarray(nib.load(src_label).dataobj).transpose(2, 1, 0))
        assert geometry(case.images[0]) == geometry(src_image)
        assert geometry(case.label) == geometry(src_label)
        assert (image_geometry.spacing, image_geometry.origin, image_geometry.direction) == geometry(src_image)
        assert label_geometry.matches(image_geometry)


def test_a_float_label_with_integral_values_becomes_the_same_integer_label(source, raw):
    stored = nib.load(source / "labelsTr" / f"{FLOAT_LABEL}.nii.gz")
    values = np.asanyarray(stored.dataobj)
    assert values.dtype == np.float32 and set(np.unique(values).tolist()) == {0.0, 1.0, 2.0}
    converted = nib.load(raw / "Hippocampus" / "labelsTr" / f"{FLOAT_LABEL}.nii.gz")
    assert converted.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(converted.dataobj), values.astype(np.uint8))


def test_integrity_check_finds_no_problems_and_writes_nothing(raw, tmp_path, capsys):
    assert verify(raw, tmp_path / "plans") == 0
    assert "Hippocampus: no problems found" in capsys.readouterr().out
    assert not (tmp_path / "plans").exists()


def test_planning_the_real_cases(raw, tmp_path):
    request = ExperimentRequest(["Hippocampus"], raw, tmp_path, num_processes=1, show_progress=False)
    summary = plan_and_preprocess(request, preprocess=False)
    plans = json.loads(Path(summary["plans"]).read_text(encoding="utf-8"))
    fingerprint = json.loads((tmp_path / "Hippocampus" / "fingerprint.json").read_text(encoding="utf-8"))
    assert fingerprint["num_labeled"] == len(CASES)
    assert [(p["dataset"], p["label"], p["label_value"]) for p in plans["prompts"] if p["dataset"]] == [
        ("Hippocampus", "Anterior", 1), ("Hippocampus", "Posterior", 2)]
    hippocampus = plans["datasets"]["Hippocampus"]
    assert hippocampus["labeled_cases"] == list(CASES)
    assert hippocampus["target_spacing"] == [1.0, 1.0, 1.0]
    assert hippocampus["median_shape_after_resampling"] == [35, 52, 35]
    assert hippocampus["normalization"][0]["scheme"] == "zscore"
    config = plans["configurations"]["3d_fullres"]
    assert config["patch_size"] == [40, 56, 40]  # as planned from all 200 cases
    assert config["batch_size"] >= 2


def write_label_like(path: Path, reference: Path, value: float) -> None:
    """A float32 copy of ``reference``'s voxels and header with a few voxels set to ``value``."""
    original = nib.load(reference)
    voxels = np.asanyarray(original.dataobj).astype(np.float32)
    voxels[10:12, 20, 15] = value
    header = original.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(voxels, original.affine, header), path)


def assert_one_problem_naming(err: str, bad_label: Path, value: float) -> None:
    assert "1 problem found" in err and str(bad_label) in err
    assert f"non-integer values ({value:g}) in 2 voxel(s)" in err and "fix: store labels as integers" in err


@pytest.mark.parametrize("value", [0.5, float("nan")])
def test_a_non_integral_label_is_refused_with_the_file_named(source, raw, tmp_path, capsys, value):
    damaged_source = tmp_path / "Task04_Hippocampus"
    shutil.copytree(source, damaged_source)
    bad_label = damaged_source / "labelsTr" / "hippocampus_004.nii.gz"
    write_label_like(bad_label, source / "labelsTr" / "hippocampus_004.nii.gz", value)
    output = tmp_path / "raw" / "Hippocampus"
    assert convert_main(["msd", str(damaged_source), "-o", str(output), "--quiet"]) == 2
    assert_one_problem_naming(capsys.readouterr().err, bad_label, value)
    assert not list(output.parent.glob("*")), "nothing partial may be left"

    damaged_raw = tmp_path / "damaged_raw"
    shutil.copytree(raw, damaged_raw)
    bad_label = damaged_raw / "Hippocampus" / "labelsTr" / "hippocampus_004.nii.gz"
    write_label_like(bad_label, raw / "Hippocampus" / "labelsTr" / "hippocampus_004.nii.gz", value)
    assert verify(damaged_raw, tmp_path / "plans") == 2
    assert_one_problem_naming(capsys.readouterr().err, bad_label, value)
    assert not (tmp_path / "plans").exists()


def test_a_joint_plan_of_real_hippocampus_and_la_cases(raw, tmp_path):
    """Two real datasets planned together: each keeps its spacing and normalization, one patch and
    network serve both, and the declaration that neither shows the other's structures is stored."""
    from versemi.datasets.converters import convert_la_h5
    from versemi.datasets.converters.la_h5 import read_id_list

    la_source = DATA / "la2018_h5"
    if not (la_source / "train.list").is_file():
        pytest.skip(f"real LA h5 data not found at {la_source}")
    joint = tmp_path / "raw"
    shutil.copytree(raw / "Hippocampus", joint / "Hippocampus")
    convert_la_h5(la_source, joint / "LA", ids=read_id_list(la_source / "train.list")[:2], show_progress=False)
    assert plan_and_preprocess_main(["--raw", str(joint), "--plans-root", str(tmp_path / "plans"), "-d", "LA",
                                     "Hippocampus", "--labeled", "LA=1", "Hippocampus=2", "--spacing-scale", "LA=2",
                                     "--known-absent", "all", "--no-preprocess", "--quiet", "-np", "1"]) == 0
    plans = json.loads((tmp_path / "plans" / "LA-1labeled_Hippocampus-2labeled" / "plans.json").read_text("utf-8"))
    assert [(p["dataset"], p["label"]) for p in plans["prompts"]] == [
        ("LA", "left_atrium"), ("Hippocampus", "Anterior"), ("Hippocampus", "Posterior"), (None, "synthetic")]
    la, hippocampus = plans["datasets"]["LA"], plans["datasets"]["Hippocampus"]
    # LA planned at twice its spacing for a CPU, the hippocampus at its own 1 mm
    assert la["target_spacing"] == pytest.approx([1.25] * 3) and hippocampus["target_spacing"] == [1.0] * 3
    assert [n["scheme"] for n in la["normalization"] + hippocampus["normalization"]] == ["zscore", "zscore"]
    assert (la["labeled_cases"], len(la["unlabeled_cases"])) == (read_id_list(la_source / "train.list")[:1], 1)
    assert (len(hippocampus["labeled_cases"]), len(hippocampus["unlabeled_cases"])) == (2, 1)
    assert la["known_absent"] == ["Hippocampus/Anterior", "Hippocampus/Posterior"]
    assert hippocampus["known_absent"] == ["LA/left_atrium"]
    # one patch for both: the larger LA volumes' median shape, rounded up to what the network's
    # poolings divide (nnU-Net's rule); a hippocampus crop is smaller on every axis and is sampled
    # whole, zero-padded (training/data.py)
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert all(0 <= p - s < 16 for p, s in zip(patch, la["median_shape_after_resampling"]))
    assert all(s < p for p, s in zip(patch, hippocampus["median_shape_after_resampling"]))
