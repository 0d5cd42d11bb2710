"""Raw layout and image I/O: geometry is carried through every supported format."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from versemi.datasets.io import Geometry, read_image, read_label, write_image
from versemi.datasets.layout import find_dataset, load_dataset, write_dataset_json
from versemi.errors import InputError

from conftest import write_tiny_dataset


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_geometry_round_trip(tmp_path, ending):
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((0.7, 0.8, 2.5), (-10.5, 3.25, 40.0), direction)
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / f"img_0000{ending}"
    write_image(array, geometry, path)
    image, read_geometry = read_image([path])
    assert image.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(image[0], array)
    assert read_geometry.matches(geometry)
    itk = sitk.ReadImage(str(path))
    assert np.allclose(itk.GetSpacing(), geometry.spacing) and np.allclose(itk.GetDirection(), direction)
    assert read_geometry.spacing_zyx == tuple(reversed(read_geometry.spacing))
    assert not list(tmp_path.glob("*.partial*")), "temporary files must be gone after an atomic write"


def test_read_label_rejects_fractions(tmp_path):
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(np.full((2, 2, 2), 0.5, np.float32), geometry, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        read_label(tmp_path / "lab.nii.gz")


@pytest.mark.parametrize("value,dtype", [(65537.0, np.float32), (40000, np.int32), (-40000, np.int32)])
def test_read_label_rejects_values_that_would_wrap_into_other_labels(tmp_path, value, dtype):
    """65537 cast to int16 would become 1, a valid label: refused, the file named."""
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(np.array([[[0, value]]], dtype), geometry, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="outside the label range") as error:
        read_label(tmp_path / "lab.nii.gz")
    assert "lab.nii.gz" in str(error.value)


def test_cases_listing_and_labeled_limit(tmp_path):
    folder = write_tiny_dataset(tmp_path / "Dataset007_Toy", num_cases=4, unlabeled=1)
    write_dataset_json(folder, ["MRI"], {"background": 0, "target": 1}, 4,
                       case_order=["case2", "case0", "case3", "case1"])
    dataset = load_dataset(folder)
    assert [c.case_id for c in dataset.labeled_cases()] == ["case2", "case0", "case3", "case1"]
    training = dataset.training_cases(labeled_limit=2)
    assert [(c.case_id, c.labeled) for c in training] == [
        ("case2", True), ("case0", True), ("case3", False), ("case1", False), ("unl0", False)]
    # nnU-Net style names resolve by full name, short name and number
    for name in ("Dataset007_Toy", "Toy", "7"):
        assert find_dataset(tmp_path, name) == folder
    with pytest.raises(InputError, match="unknown dataset 'Nope'.*Dataset007_Toy"):
        find_dataset(tmp_path, "Nope")


def test_dataset_json_errors(tmp_path):
    folder = write_tiny_dataset(tmp_path / "Toy")
    (folder / "dataset.json").write_text('{"channel_names": {"0": "MRI"}, "labels": {"background": 0}}')
    with pytest.raises(InputError, match="numTraining, file_ending"):
        load_dataset(folder)
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset(folder)
