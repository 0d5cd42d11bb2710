"""Preprocessing: resampling, normalization, the cache's contents, and resuming after a kill."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from versemi.cli import plan_and_preprocess_main
from versemi.datasets.io import read_image, read_label
from versemi.datasets.layout import load_dataset
from versemi.preprocessing.cache import read_array
from versemi.preprocessing.normalization import normalize
from versemi.preprocessing.resampling import resample_image, resample_segmentation


def test_resampling_shapes_and_anisotropic_axis_nearest():
    image = np.random.default_rng(0).normal(size=(1, 10, 40, 40)).astype(np.float32)
    # 4 mm slices -> 2 mm: the thick axis is resampled on its own with nearest neighbour
    out = resample_image(image, [4.0, 1.0, 1.0], [2.0, 1.0, 1.0])
    assert out.shape == (1, 20, 40, 40)
    np.testing.assert_allclose(out[0, 0], image[0, 0], atol=1e-5)
    np.testing.assert_allclose(out[0, 1], image[0, 0], atol=1e-5)
    iso = resample_image(image[:, :, :20, :20], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert iso.shape == (1, 20, 40, 40) and iso.dtype == np.float32


def test_segmentation_resampling_keeps_labels_and_volume():
    seg = np.zeros((20, 30, 30), np.int16)
    seg[5:15, 5:20, 5:20] = 1
    seg[8:12, 22:28, 22:28] = 2
    out = resample_segmentation(seg, [1.0, 1.0, 1.0], [2.0, 1.5, 1.5])
    assert out.shape == (10, 20, 20) and set(np.unique(out)) == {0, 1, 2}
    volume_before = (seg == 1).sum() * 1.0
    volume_after = (out == 1).sum() * 2.0 * 1.5 * 1.5
    assert volume_after == pytest.approx(volume_before, rel=0.15)


def test_normalization_schemes():
    image = np.random.default_rng(1).normal(100, 30, size=(2, 4, 5, 6)).astype(np.float32)
    image[1, 0] = 0
    plans = [{"scheme": "ct", "clip": [60.0, 140.0], "mean": 100.0, "std": 20.0},
             {"scheme": "zscore", "use_nonzero_mask": False}]
    out = normalize(image.copy(), plans)
    assert out[0].min() == pytest.approx(-2.0) and out[0].max() == pytest.approx(2.0)
    assert out[1].mean() == pytest.approx(0, abs=1e-5) and out[1].std() == pytest.approx(1, abs=1e-4)


def _run(raw, plans, *extra):
    return plan_and_preprocess_main(["--raw", str(raw), "--plans-root", str(plans), "--quiet", "-np", "1",
                                     "-d", "DemoLA", "DemoPancreas", *extra])


def test_cache_contents(toy_raw, tmp_path):
    assert _run(toy_raw, tmp_path, "--labeled", "DemoLA=3") == 0
    plans = json.loads((tmp_path / "DemoLA-3labeled_DemoPancreas" / "plans.json").read_text(encoding="utf-8"))
    cache = tmp_path / "DemoLA-3labeled_DemoPancreas" / "3d_fullres"
    raw = load_dataset(toy_raw / "DemoLA")
    case = raw.labeled_cases()[0]
    props = json.loads((cache / "DemoLA" / f"{case.case_id}.json").read_text(encoding="utf-8"))
    image, geometry = read_image(case.images)
    label, _ = read_label(case.label)
    data = read_array(cache / "DemoLA" / props["files"]["data"]["name"])
    seg = read_array(cache / "DemoLA" / props["files"]["seg"]["name"])
    assert props["original_geometry"] == geometry.to_dict() and props["original_shape"] == list(image.shape[1:])
    assert data.shape[1:] == seg.shape[1:] == tuple(props["shape"]) and data.dtype == np.float32
    assert abs(float(data.mean())) < 0.1 and abs(float(data.std()) - 1) < 0.1  # per-image z-score (MRI)
    (z0, z1), (y0, y1), (x0, x1) = props["crop_bbox"]
    np.testing.assert_array_equal(seg[0], label[z0:z1, y0:y1, x0:x1])  # spacing unchanged: no resampling
    locations = np.array(props["class_locations"]["1"])
    assert len(locations) > 0 and (seg[0][tuple(locations.T)] == 1).all()
    # cases beyond the labeled limit are cached without their labels
    demoted = plans["datasets"]["DemoLA"]["unlabeled_cases"][0]
    demoted_props = json.loads((cache / "DemoLA" / f"{demoted}.json").read_text(encoding="utf-8"))
    assert not demoted_props["labeled"] and "seg" not in demoted_props["files"]
    assert not list(cache.rglob(f"{demoted}_seg.b2nd"))


KILL_ON_THIRD_CASE = textwrap.dedent("""
    import os, signal, sys
    import versemi.preprocessing.cache as cache
    from versemi.cli import plan_and_preprocess_main
    calls = []
    real_write_json = cache.write_json
    def write_json_then_die(obj, target):
        calls.append(target)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # as if the machine went down mid-case
        real_write_json(obj, target)
    cache.write_json = write_json_then_die
    plan_and_preprocess_main(sys.argv[1:])
""")


def _cache_arrays(cache):
    return {p.relative_to(cache).as_posix(): read_array(p) for p in sorted(cache.rglob("*.b2nd"))}


@pytest.mark.slow
def test_kill_and_rerun_redoes_only_missing_or_damaged_cases(toy_raw, tmp_path, capsys):
    reference_root, killed_root = tmp_path / "reference", tmp_path / "killed"
    assert _run(toy_raw, reference_root) == 0
    args = ["--raw", str(toy_raw), "--plans-root", str(killed_root), "--quiet", "-np", "1", "-d", "DemoLA", "DemoPancreas"]
    child = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_CASE, *args], capture_output=True, encoding="utf-8", errors="replace")
    assert child.returncode == -9, child.stderr
    cache = killed_root / "DemoLA_DemoPancreas" / "3d_fullres"
    assert len(list(cache.rglob("*.json"))) == 2
    capsys.readouterr()
    assert _run(toy_raw, killed_root) == 0
    total = 14
    assert f"{total - 2} case(s) preprocessed, 2 already up to date" in capsys.readouterr().out
    assert not list(cache.rglob("*.partial*"))
    reference = _cache_arrays(reference_root / "DemoLA_DemoPancreas" / "3d_fullres")
    resumed = _cache_arrays(cache)
    assert reference.keys() == resumed.keys()
    assert all(np.array_equal(reference[k], resumed[k]) for k in reference)
    # a damaged file is detected by its checksum and only that case is redone
    damaged = sorted(cache.rglob("*_data.b2nd"))[4]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert _run(toy_raw, killed_root) == 0
    assert f"1 case(s) preprocessed, {total - 1} already up to date" in capsys.readouterr().out
    assert np.array_equal(read_array(damaged), reference[damaged.relative_to(cache).as_posix()])


def test_changed_raw_file_redoes_only_its_case_and_keeps_the_plan(toy_raw, tmp_path, capsys):
    assert _run(toy_raw, tmp_path) == 0
    plans_file = tmp_path / "DemoLA_DemoPancreas" / "plans.json"
    before = plans_file.read_text(encoding="utf-8")
    image = load_dataset(toy_raw / "DemoLA").labeled_cases()[1].images[0]
    image.write_bytes(image.read_bytes())  # same content, new modification time
    capsys.readouterr()
    assert _run(toy_raw, tmp_path) == 0
    assert "1 case(s) preprocessed, 13 already up to date" in capsys.readouterr().out
    assert plans_file.read_text(encoding="utf-8") == before
