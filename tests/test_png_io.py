"""Native 2D datasets stored as PNG: read as one-slice volumes, predictions written back as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from versemi.cli import plan_and_preprocess_main
from versemi.datasets.integrity import check_case, check_dataset_listing
from versemi.datasets.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image, read_label, write_image
from versemi.datasets.layout import load_dataset, write_dataset_json
from versemi.errors import InputError

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
UNIT = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)


def png(path: Path, array: np.ndarray, spacing=None, vector: bool = False) -> Path:
    """Write ``array`` (y, x) or (y, x, colours) as a PNG with SimpleITK."""
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def test_png_is_a_supported_ending():
    assert ".png" in SUPPORTED_ENDINGS
    assert file_ending("case_0000.PNG") == ".png"


def test_grayscale_pngs_read_as_one_slice_channels(tmp_path):
    eight = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    sixteen = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000)  # up to 57000: needs 16 bits
    paths = [png(tmp_path / "c_0000.png", eight), png(tmp_path / "c_0001.png", sixteen)]
    image, geometry = read_image(paths)
    assert image.shape == (2, 1, 4, 5) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0, 0], eight)
    np.testing.assert_array_equal(image[1, 0], sixteen)
    assert geometry.spacing_zyx == (1.0, 1.0, 1.0)
    assert geometry.origin == (0.0, 0.0, 0.0) and geometry.direction == IDENTITY


def test_pixel_size_recorded_in_the_png_is_kept(tmp_path):
    path = png(tmp_path / "c_0000.png", np.zeros((3, 4), np.uint8), spacing=(0.25, 0.5))
    _, geometry = read_image([path])
    assert geometry.spacing_zyx == pytest.approx((1.0, 0.5, 0.25))


def test_png_label_reads_as_integer_slice(tmp_path):
    label = np.zeros((6, 7), np.uint8)
    label[1:3, 2:5], label[4, 6] = 1, 2
    array, geometry = read_label(png(tmp_path / "c.png", label))
    assert array.shape == (1, 6, 7) and np.issubdtype(array.dtype, np.integer)
    np.testing.assert_array_equal(array[0], label)
    assert geometry.matches(UNIT)


@pytest.mark.parametrize("shape", [(1, 5, 6), (5, 6)])
def test_label_map_round_trips_through_png(tmp_path, shape):
    labels = (np.arange(30).reshape(shape) % 4).astype(np.int16)
    geometry = Geometry((0.2, 0.3, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    target = tmp_path / "pred" / "case.png"
    write_image(labels, geometry, target)
    written = sitk.ReadImage(str(target))
    assert written.GetDimension() == 2 and written.GetPixelID() == sitk.sitkUInt8  # 8-bit grayscale
    array, read_geometry = read_label(target)
    np.testing.assert_array_equal(array, labels.reshape(1, 5, 6))
    assert read_geometry.matches(geometry)
    assert [p.name for p in target.parent.iterdir()] == ["case.png"]  # no temporary file left behind


@pytest.mark.parametrize("array, problem", [
    (np.full((1, 4, 4), 0.5, np.float32), "float32 values"),
    (np.full((1, 4, 4), 300, np.int16), "do not fit an 8-bit PNG"),
    (np.full((1, 4, 4), -1, np.int16), "do not fit an 8-bit PNG"),
    (np.zeros((2, 4, 4), np.uint8), "is not a single 2D slice"),
])
def test_what_png_cannot_hold_is_refused(tmp_path, array, problem):
    target = tmp_path / "case.png"
    with pytest.raises(InputError) as info:
        write_image(array, UNIT, target)
    assert str(target) in str(info.value) and problem in str(info.value)
    assert ".nii.gz" in info.value.problems[0].fix
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("colours", [2, 3, 4])  # gray+alpha, RGB, RGBA
def test_colour_png_is_refused_naming_the_file_and_the_fix(tmp_path, colours):
    path = png(tmp_path / "c_0000.png", np.zeros((3, 4, colours), np.uint8), vector=True)
    for read in (lambda: read_image([path]), lambda: read_label(path)):
        with pytest.raises(InputError) as info:
            read()
        (problem,) = info.value.problems
        assert problem.file == str(path)
        assert f"colour PNG ({colours} components per pixel)" in problem.problem
        assert "grayscale" in problem.fix and "CASE_0001.png" in problem.fix


def write_png_dataset(folder: Path, num_cases: int = 2, shape=(12, 16)) -> list[tuple[np.ndarray, np.ndarray]]:
    """A tiny raw dataset with ``"file_ending": ".png"``; returns each case's (image, label)."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(num_cases):
        label = np.zeros(shape, np.uint8)
        label[3:8, 4:11] = 1
        image = (rng.integers(0, 60, shape) + 120 * label).astype(np.uint8)
        png(folder / "imagesTr" / f"case{i}_0000.png", image)
        png(folder / "labelsTr" / f"case{i}.png", label)
        cases.append((image, label))
    write_dataset_json(folder, ["US"], {"background": 0, "head": 1}, num_cases, ".png")
    return cases


def test_png_dataset_passes_layout_and_integrity_like_a_one_slice_nifti(tmp_path):
    cases = write_png_dataset(tmp_path / "raw" / "Toy2D")
    dataset = load_dataset(tmp_path / "raw" / "Toy2D")
    assert dataset.file_ending == ".png"
    assert [c.case_id for c in dataset.labeled_cases()] == ["case0", "case1"]
    assert check_dataset_listing(dataset) == []
    for case, (pixels, mask) in zip(dataset.labeled_cases(), cases):
        problems, image, label, geometry = check_case(case, dataset)
        assert problems == []
        # the same case stored as a one-slice NIfTI reads identically
        nifti_image_path = tmp_path / "nifti" / f"{case.case_id}_0000.nii.gz"
        nifti_label_path = tmp_path / "nifti" / f"{case.case_id}.nii.gz"
        write_image(pixels[None].astype(np.float32), UNIT, nifti_image_path)
        write_image(mask[None], UNIT, nifti_label_path)
        nifti_image, nifti_geometry = read_image([nifti_image_path])
        nifti_label, _ = read_label(nifti_label_path)
        np.testing.assert_array_equal(image, nifti_image)
        np.testing.assert_array_equal(label, nifti_label)
        assert geometry.matches(nifti_geometry) and image.shape == (1, 1, 12, 16)


def test_verify_only_accepts_a_png_dataset_and_reports_a_colour_label(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_png_dataset(raw / "Toy2D")
    args = ["--raw", str(raw), "--plans-root", str(tmp_path / "plans"), "--quiet", "-np", "1",
            "-d", "Toy2D", "--verify-only"]
    assert plan_and_preprocess_main(args) == 0
    assert "no problems found" in capsys.readouterr().out
    bad = png(raw / "Toy2D" / "labelsTr" / "case1.png", np.zeros((12, 16, 3), np.uint8), vector=True)
    assert plan_and_preprocess_main(args) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and "colour PNG" in err
