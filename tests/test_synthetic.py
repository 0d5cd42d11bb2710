"""The synthetic demo datasets: layout, reproducibility, geometry, and that they are not trivial."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from versemi.datasets import synthetic
from versemi.datasets.io import read_image, read_label
from versemi.datasets.layout import load_dataset
from versemi.datasets.synthetic import DEMO_DATASETS, SyntheticConfig, make_synthetic
from versemi.errors import InputError

TOY = SyntheticConfig(num_labeled=2, num_unlabeled=2, num_test=1, shape_la=(32, 32, 24),
                      shape_pancreas=(40, 40, 12), seed=0)


def _toy(seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(**{**TOY.__dict__, "seed": seed})


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, TOY, show_progress=False)
    return root


def _all_arrays(root: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in sorted(root.rglob("*.nii.gz")):
        arrays[str(path.relative_to(root))] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return arrays


def _labeled_pairs(root: Path, name: str):
    dataset = load_dataset(root / name)
    for case in dataset.labeled_cases() + dataset.test_cases():
        image, geometry = read_image(case.images)
        label, _ = read_label(case.label)
        yield case.case_id, image[0], label, geometry


def best_band_dice(image: np.ndarray, label: np.ndarray, bins: int = 64) -> float:
    """The best Dice any global intensity window [lo, hi) reaches (on a quantile grid)."""
    values, fg = image.ravel().astype(np.float64), label.ravel().astype(bool)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    edges[-1] = np.inf
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    all_cum = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=len(edges) - 1))])
    fg_cum = np.concatenate([[0], np.cumsum(np.bincount(index[fg], minlength=len(edges) - 1))])
    lo, hi = np.triu_indices(len(all_cum), 1)
    dice = 2 * (fg_cum[hi] - fg_cum[lo]) / (fg.sum() + all_cum[hi] - all_cum[lo])
    return float(dice.max())


def test_layout_and_counts(toy_root):
    assert sorted(p.name for p in toy_root.iterdir()) == sorted(DEMO_DATASETS)  # no leftover temp folders
    for name, prefix, channel, label_name in [("DemoLA", "demola", "MRI", "left_atrium"),
                                              ("DemoPancreas", "demopancreas", "CT", "pancreas")]:
        dataset = load_dataset(toy_root / name)
        assert dataset.channel_names == [channel]
        assert dataset.labels == {"background": 0, label_name: 1}
        assert dataset.meta["numTraining"] == 2
        labeled, unlabeled, test = dataset.labeled_cases(), dataset.unlabeled_cases(), dataset.test_cases()
        assert [c.case_id for c in labeled] == [f"{prefix}_000", f"{prefix}_001"] == dataset.meta["case_order"]
        assert [c.case_id for c in unlabeled] == [f"{prefix}_u000", f"{prefix}_u001"]
        assert [c.case_id for c in test] == [f"{prefix}_t000"]
        assert all(c.label.is_file() for c in labeled + test)
        assert not (toy_root / name / "labelsUnlabeled").exists()
        assert len(dataset.training_cases()) == 4


def test_same_seed_identical_any_worker_count_other_seed_differs(toy_root, tmp_path):
    make_synthetic(tmp_path / "again", _toy(0), show_progress=False, num_processes=2)
    make_synthetic(tmp_path / "other", _toy(1), show_progress=False)
    first, again, other = _all_arrays(toy_root), _all_arrays(tmp_path / "again"), _all_arrays(tmp_path / "other")
    assert first.keys() == again.keys() == other.keys() and len(first) == 2 * (2 * 2 + 2 + 2 * 1)
    for key in first:
        assert first[key].dtype == again[key].dtype and first[key].tobytes() == again[key].tobytes(), key
        assert not np.array_equal(first[key], other[key]), key
    # Splits draw from different streams: a test case is not a copy of the labeled case with its index.
    assert not np.array_equal(first["DemoLA/imagesTr/demola_000_0000.nii.gz"],
                              first["DemoLA/imagesTs/demola_t000_0000.nii.gz"])


def test_geometry_and_intensity_units(toy_root):
    for _, image, label, geometry in _labeled_pairs(toy_root, "DemoLA"):
        assert geometry.spacing == (1.0, 1.0, 1.0)
        assert image.shape == (24, 32, 32) and label.shape == image.shape
        assert image.min() == 0 and image.max() > 100  # positive MRI units, zero outside the body
    for case_id, image, label, geometry in _labeled_pairs(toy_root, "DemoPancreas"):
        assert np.allclose(geometry.spacing, (0.8, 0.8, 2.5))
        assert np.allclose(geometry.direction, np.eye(3).ravel())
        assert image.shape == (12, 40, 40)
        assert -1024 <= image.min() <= -950, case_id  # air
        assert 300 < image.max() < 3072  # bone
        file = toy_root / "DemoPancreas" / "imagesTr" / f"{case_id}_0000.nii.gz"
        if file.exists():
            assert sitk.ReadImage(str(file)).GetPixelID() == sitk.sitkInt16
            assert 0 < np.median(image[label > 0]) < 150  # organ HU


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_labels_are_sane_and_not_thresholdable(toy_root, name):
    for case_id, image, label, _ in _labeled_pairs(toy_root, name):
        assert set(np.unique(label)) == {0, 1}, case_id
        assert 0.01 <= label.mean() <= 0.40, (case_id, label.mean())
        border = np.ones(label.shape, bool)
        border[1:-1, 1:-1, 1:-1] = False
        assert not label[border].any(), case_id
        inside, outside = image[label > 0], image[label == 0]
        # The target is brighter than its surroundings on average...
        assert inside.mean() > outside.mean() + 0.5 * outside.std(), case_id
        # ...but its intensities also occur outside it, so no global window segments it.
        lo, hi = np.percentile(inside, [5, 95])
        assert ((outside >= lo) & (outside <= hi)).sum() > 0.5 * inside.size, case_id
        dice = best_band_dice(image, label)
        assert 0.2 < dice < 0.95, (case_id, dice)


def test_refuses_to_overwrite_and_leaves_folder_untouched(tmp_path):
    existing = tmp_path / "DemoPancreas"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="overwrite"):
        make_synthetic(tmp_path, TOY, show_progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["DemoPancreas"]  # DemoLA not written either
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text(encoding="utf-8") == "mine"

    written = make_synthetic(tmp_path, TOY, show_progress=False, overwrite=True)
    assert written == [tmp_path / name for name in DEMO_DATASETS]
    assert not (existing / "keep.txt").exists()
    assert len(load_dataset(existing).labeled_cases()) == 2


def test_empty_target_folder_is_fine(tmp_path):
    (tmp_path / "DemoLA").mkdir()
    make_synthetic(tmp_path, TOY, show_progress=False)
    assert len(load_dataset(tmp_path / "DemoLA").unlabeled_cases()) == 2


def test_failure_leaves_no_half_written_dataset(tmp_path, monkeypatch):
    calls = []

    def failing_builder(rng, grid):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return synthetic._la_case(rng, grid)

    spec = synthetic._SPECS["DemoLA"]
    monkeypatch.setitem(synthetic._SPECS, "DemoLA", synthetic._DatasetSpec(
        spec.name, spec.id_prefix, spec.channel, spec.labels, failing_builder, spec.key))
    with pytest.raises(RuntimeError, match="boom"):
        make_synthetic(tmp_path, TOY, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="shape_la"):
        make_synthetic(tmp_path, SyntheticConfig(shape_la=(8, 32, 32)), show_progress=False)
    with pytest.raises(InputError, match="labeled"):
        make_synthetic(tmp_path, SyntheticConfig(num_labeled=0), show_progress=False)
    assert list(tmp_path.iterdir()) == []
