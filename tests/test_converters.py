"""Dataset converters: real LA h5 cases (when present) and tiny files written here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from versemi.datasets.converters import CONVERTERS, convert, convert_la_2018, convert_la_h5, convert_msd, \
    convert_pancreas_nih
from versemi.datasets.converters.la_h5 import read_id_list
from versemi.datasets.layout import load_dataset
from versemi.errors import InputError

LA_H5 = Path(__file__).resolve().parents[2] / "shared/data/la2018_h5"
ROTATION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_geometry(path: Path, spacing, origin, direction) -> None:
    got = geometry(path)
    for actual, expected in zip(got, (spacing, origin, direction)):
        np.testing.assert_allclose(actual, expected, atol=1e-4)


def write_sitk(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing), image.SetOrigin(origin), image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def write_h5(folder: Path, case_id: str, shape=(6, 5, 4), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    label = (image > 0.5).astype(np.uint8)
    (folder / case_id).mkdir(parents=True)
    with h5py.File(folder / case_id / "mri_norm2.h5", "w") as f:
        f["image"], f["label"] = image, label
    return image, label


# ---------------------------------------------------------------- la-h5


def test_la_h5_real_cases(tmp_path):
    if not (LA_H5 / "train.list").is_file():
        pytest.skip(f"real LA h5 data not found at {LA_H5} (expected <ID>/mri_norm2.h5 and train.list)")
    listed = read_id_list(LA_H5 / "train.list")
    chosen = [listed[4], listed[0], listed[2]]  # deliberately not in list order
    out = convert_la_h5(LA_H5, tmp_path / "LA", ids=chosen, show_progress=False)
    expected_order = [listed[0], listed[2], listed[4]]
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["case_order"] == expected_order and meta["numTraining"] == 3
    assert meta["channel_names"] == {"0": "MRI"} and meta["labels"] == {"background": 0, "left_atrium": 1}
    assert [c.case_id for c in load_dataset(out).labeled_cases()] == expected_order
    for case_id in chosen:
        with h5py.File(LA_H5 / case_id / "mri_norm2.h5", "r") as f:
            image, label = f["image"][()], f["label"][()]
        nii = nib.load(out / "imagesTr" / f"{case_id}_0000.nii.gz")
        seg = nib.load(out / "labelsTr" / f"{case_id}.nii.gz")
        assert nii.shape == image.shape == seg.shape
        np.testing.assert_allclose(nii.header.get_zooms(), (0.625,) * 3)
        assert np.array_equal(np.asanyarray(nii.dataobj), image)
        seg_data = np.asanyarray(seg.dataobj)
        assert seg_data.dtype == np.uint8 and set(np.unique(seg_data)) <= {0, 1}
        assert np.array_equal(seg_data, label)


def test_la_h5_lists_spacing_and_test_split(tmp_path):
    src = tmp_path / "src"
    a, _ = write_h5(src, "B7", seed=1)
    write_h5(src, "A1", seed=2)
    write_h5(src, "T9", seed=3)
    (src / "train.list").write_text("../data/2018LA_Seg_Training Set/B7/mri_norm2.h5\nA1\n\n")
    (src / "test.list").write_text("T9\n")
    before = snapshot(src)
    out = convert("la-h5", src, tmp_path / "out", spacing=(0.5, 0.6, 0.7), show_progress=False)
    assert snapshot(src) == before
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["case_order"] == ["B7", "A1"]
    assert (out / "imagesTs/T9_0000.nii.gz").is_file() and (out / "labelsTs/T9.nii.gz").is_file()
    nii = nib.load(out / "imagesTr/B7_0000.nii.gz")
    np.testing.assert_allclose(nii.header.get_zooms(), (0.5, 0.6, 0.7), rtol=1e-6)
    assert np.array_equal(np.asanyarray(nii.dataobj), a)
    assert not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- errors


def test_missing_source_folder(tmp_path):
    missing, out = tmp_path / "nope", tmp_path / "out"
    for kind in CONVERTERS:
        with pytest.raises(InputError, match=re.escape(str(missing))):
            convert(kind, missing, out, show_progress=False)
        assert not out.exists()


def test_unknown_kind(tmp_path):
    with pytest.raises(InputError, match="la-h5"):
        convert("la-h6", tmp_path, tmp_path / "out")


def test_listed_id_missing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_h5(src, "A1")
    (src / "train.list").write_text("A1\nGONE\n")
    with pytest.raises(InputError, match=re.escape(str(src / "GONE" / "mri_norm2.h5"))):
        convert_la_h5(src, out, show_progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_missing_h5_key(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "A1").mkdir(parents=True)
    with h5py.File(src / "A1/mri_norm2.h5", "w") as f:
        f["image"] = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(InputError, match="'label'"):
        convert_la_h5(src, out, show_progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_needs_overwrite(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_h5(src, "A1")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=re.escape(str(out))):
        convert_la_h5(src, out, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    convert_la_h5(src, out, overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_output_inside_source_refused(tmp_path):
    src = tmp_path / "src"
    write_h5(src, "A1")
    with pytest.raises(InputError, match="overlaps"):
        convert_la_h5(src, src / "converted", show_progress=False)
    with pytest.raises(InputError, match="overlaps"):
        convert_la_h5(src, src, overwrite=True, show_progress=False)
    assert sorted(p.name for p in src.iterdir()) == ["A1"]


# ---------------------------------------------------------------- la-2018


def test_la_2018(tmp_path):
    src = tmp_path / "src"
    spacing, origin = (0.6, 0.7, 1.25), (1.0, 2.0, 3.0)
    rng = np.random.default_rng(0)
    images = {}
    for case_id in ("c2", "c1", "t1"):
        images[case_id] = rng.integers(0, 200, (4, 5, 6), dtype=np.uint8)
        write_sitk(images[case_id], src / case_id / "lgemri.nrrd", spacing, origin, ROTATION)
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 1:5] = 255
    for case_id in ("c2", "c1"):
        write_sitk(mask, src / case_id / "laendo.nrrd", spacing, origin, ROTATION)
    (src / "test.list").write_text("t1\n")
    before = snapshot(src)
    out = convert_la_2018(src, tmp_path / "out", show_progress=False)
    assert snapshot(src) == before
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["case_order"] == ["c1", "c2"] and meta["numTraining"] == 2
    for case_id in ("c1", "c2"):
        image_path, label_path = out / f"imagesTr/{case_id}_0000.nii.gz", out / f"labelsTr/{case_id}.nii.gz"
        assert_geometry(image_path, spacing, origin, ROTATION)
        assert_geometry(label_path, spacing, origin, ROTATION)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))), images[case_id])
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        assert label.dtype == np.uint8 and np.array_equal(label, mask // 255)
    assert (out / "imagesTs/t1_0000.nii.gz").is_file() and not (out / "labelsTs").exists()


def test_la_2018_missing_label(tmp_path):
    src = tmp_path / "src"
    write_sitk(np.zeros((2, 3, 4), np.uint8), src / "c1" / "lgemri.nrrd")
    with pytest.raises(InputError, match=re.escape(str(src / "c1" / "laendo.nrrd"))):
        convert_la_2018(src, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- msd


def test_msd_splits_4d_channels(tmp_path):
    src = tmp_path / "Task01_BrainTumour"
    affine = np.array([[-1.5, 0, 0, 10.0], [0, -1.2, 0, 20.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    data = {}
    for case_id in ("b_002", "a_001", "c_003"):
        data[case_id] = rng.random((6, 5, 4, 2), dtype=np.float32)
        folder = "imagesTs" if case_id == "c_003" else "imagesTr"
        (src / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data[case_id], affine), src / folder / f"{case_id}.nii.gz")
    (src / "labelsTr").mkdir()
    label = np.zeros((6, 5, 4), np.uint8)
    label[1:3, 1:3, 1:3], label[4, 4, 3] = 1, 2
    for case_id in ("b_002", "a_001"):
        nib.save(nib.Nifti1Image(label, affine), src / "labelsTr" / f"{case_id}.nii.gz")
    (src / "imagesTr/._b_002.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (src / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("b_002", "a_001")],
        "test": ["./imagesTs/c_003.nii.gz"]}))
    before = snapshot(src)
    out = convert_msd(src, tmp_path / "out", show_progress=False)
    assert snapshot(src) == before
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    assert meta["numTraining"] == 2 and meta["case_order"] == ["b_002", "a_001"] and meta["file_ending"] == ".nii.gz"
    assert [c.case_id for c in load_dataset(out).labeled_cases()] == ["b_002", "a_001"]
    for case_id, folder in (("b_002", "imagesTr"), ("a_001", "imagesTr"), ("c_003", "imagesTs")):
        for channel in (0, 1):
            nii = nib.load(out / folder / f"{case_id}_{channel:04d}.nii.gz")
            assert nii.shape == (6, 5, 4)
            np.testing.assert_allclose(nii.affine, affine, atol=1e-5)
            assert np.array_equal(np.asanyarray(nii.dataobj), data[case_id][..., channel])
    seg = nib.load(out / "labelsTr/a_001.nii.gz")
    assert np.asanyarray(seg.dataobj).dtype == np.uint8 and np.array_equal(np.asanyarray(seg.dataobj), label)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "a_001_0000.nii.gz", "a_001_0001.nii.gz", "b_002_0000.nii.gz", "b_002_0001.nii.gz"]


def test_msd_listed_file_missing(tmp_path):
    src = tmp_path / "Task02_Heart"
    src.mkdir()
    (src / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}], "test": []}))
    with pytest.raises(InputError, match=re.escape(str(src / "imagesTr" / "la_003.nii.gz"))):
        convert_msd(src, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_msd_test_ids_are_held_out_with_labels(tmp_path):
    from versemi.benchmark_protocol import convert_split

    src = tmp_path / "Task04_Hippocampus"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    label = np.zeros((4, 5, 3), np.uint8)
    label[1:3, 1:3, 1], label[3, 4, 2] = 1, 2
    ids = ("h_001", "h_002", "h_003")
    for case_id in ids:
        nib.save(nib.Nifti1Image(np.ones((4, 5, 3), np.float32), np.eye(4)), src / "imagesTr" / f"{case_id}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), src / "labelsTr" / f"{case_id}.nii.gz")
    (src / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids]}))
    out = tmp_path / "raw" / "Hippocampus"
    assert convert_split(src, out, ["h_001", "h_002"], ["h_003"], show_progress=False, kind="msd")
    dataset = load_dataset(out)
    assert dataset.meta["case_order"] == ["h_001", "h_002"] and dataset.meta["numTraining"] == 2
    assert [c.case_id for c in dataset.labeled_cases()] == ["h_001", "h_002"]
    (test,) = dataset.test_cases()
    assert test.case_id == "h_003" and np.array_equal(np.asanyarray(nib.load(test.label).dataobj), label)
    assert not convert_split(src, out, ["h_001", "h_002"], ["h_003"], show_progress=False, kind="msd")
    with pytest.raises(InputError, match="another train/test split"):
        convert_split(src, out, ["h_001", "h_003"], ["h_002"], show_progress=False, kind="msd")
    with pytest.raises(InputError, match="lists no training case h_009"):
        convert_msd(src, tmp_path / "other", show_progress=False, test_ids=["h_009"])


# ---------------------------------------------------------------- pancreas-nih


def write_dicom_series(folder: Path, array: np.ndarray, spacing, origin) -> None:
    """A CT series, one file per slice (after SimpleITK's DicomSeriesFromArray example)."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing), image.SetOrigin(origin)
    uid = "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(folder))) % 10**12)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                           ("0008|0018", f"{uid}.3.{z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(z + 1)),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))))):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{z + 1:03d}.dcm"))
        writer.Execute(slice_)


def test_pancreas_nih(tmp_path):
    src = tmp_path / "nih"
    spacing, origin = (0.75, 0.75, 2.5), (-100.0, -120.0, 30.0)
    rng = np.random.default_rng(0)
    shapes = {1: (4, 16, 16), 2: (4, 12, 16), 3: (4, 16, 16)}  # (z, y, x); case 2 not square
    images = {}
    for n, shape in shapes.items():
        images[n] = rng.integers(-1024, 1500, shape).astype(np.int16)
        write_dicom_series(src / f"Pancreas-CT/PANCREAS_{n:04d}/study-{n}/series-{n}", images[n], spacing, origin)
    labels = src / "TCIA_pancreas_labels-02-05-2017"
    mask1 = (images[1] > 500).astype(np.uint8)
    mask2 = (images[2] > 500).astype(np.uint8)
    write_sitk(mask1, labels / "label0001.nii.gz")  # same shape, wrong header: image geometry wins
    write_sitk(np.ascontiguousarray(mask2.transpose(0, 2, 1)), labels / "label0002.nii.gz")  # stored transposed
    before = snapshot(src)
    out = convert_pancreas_nih(src, tmp_path / "out", show_progress=False)
    assert snapshot(src) == before
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["case_order"] == ["pancreas_0001", "pancreas_0002"] and meta["numTraining"] == 2
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "pancreas": 1}
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    for n, mask in ((1, mask1), (2, mask2)):
        image_path, label_path = out / f"imagesTr/pancreas_{n:04d}_0000.nii.gz", out / f"labelsTr/pancreas_{n:04d}.nii.gz"
        assert_geometry(image_path, spacing, origin, identity)
        assert_geometry(label_path, spacing, origin, identity)
        image = sitk.ReadImage(str(image_path))
        assert image.GetPixelID() == sitk.sitkInt16
        assert np.array_equal(sitk.GetArrayFromImage(image), images[n])
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), mask)
    assert (out / "imagesUnlabeled/pancreas_0003_0000.nii.gz").is_file()
    assert not (out / "labelsTr/pancreas_0003.nii.gz").exists()
    assert [c.case_id for c in load_dataset(out).unlabeled_cases()] == ["pancreas_0003"]


def test_pancreas_label_shape_mismatch(tmp_path):
    src = tmp_path / "nih"
    write_dicom_series(src / "PANCREAS_0001/s/r", np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    write_sitk(np.zeros((3, 8, 9), np.uint8), src / "labels" / "label0001.nii.gz")
    with pytest.raises(InputError, match=re.escape(str(src / "labels" / "label0001.nii.gz"))):
        convert_pancreas_nih(src, tmp_path / "out", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nih"]
