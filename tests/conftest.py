"""Shared fixtures: toy synthetic datasets and small hand-made raw datasets."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from versemi.datasets.io import Geometry, write_image
from versemi.datasets.layout import write_dataset_json
from versemi.datasets.synthetic import SyntheticConfig, make_synthetic

SHARED_LA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018_h5"
TOY = SyntheticConfig(num_labeled=5, num_unlabeled=2, num_test=1, shape_la=(32, 32, 24),
                      shape_pancreas=(40, 40, 12), seed=3)


@pytest.fixture(scope="session")
def toy_raw_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw_master")
    make_synthetic(root, TOY, show_progress=False)
    return root


@pytest.fixture
def toy_raw(toy_raw_master, tmp_path) -> Path:
    """A private copy of the toy synthetic raw root (DemoLA, DemoPancreas) that a test may damage."""
    root = tmp_path / "raw"
    shutil.copytree(toy_raw_master, root)
    return root


def write_tiny_dataset(folder: Path, num_cases: int = 3, shape=(6, 8, 10), spacing=(1.0, 1.0, 2.0),
                       ending: str = ".nii.gz", channels=("MRI",), unlabeled: int = 0) -> Path:
    """A small valid raw dataset: blocks of foreground in noise, labels 0/1."""
    rng = np.random.default_rng(0)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for split, count, prefix in (("imagesTr", num_cases, "case"), ("imagesUnlabeled", unlabeled, "unl")):
        for i in range(count):
            label = np.zeros(shape, np.uint8)
            label[1:4, 2:6, 3:8] = 1
            for c in range(len(channels)):
                image = (rng.normal(1.0, 0.2, shape) + 2 * label).astype(np.float32)
                write_image(image, geometry, folder / split / f"{prefix}{i}_{c:04d}{ending}")
            if split == "imagesTr":
                write_image(label, geometry, folder / "labelsTr" / f"{prefix}{i}{ending}")
    write_dataset_json(folder, channels, {"background": 0, "target": 1}, num_cases, ending)
    return folder
