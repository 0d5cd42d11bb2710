"""The demo at toy size, through the console commands a user types."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # console scripts end to end

BIN = Path(sys.executable).parent


def _cli(name: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert exe, f"{name} is not installed: run `pip install -e .`"
    return subprocess.run([exe, *args], capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=300)


def test_synthetic_to_plans_and_cache(tmp_path):
    env = {**os.environ, "VERSEMI_ROOT": str(tmp_path / "work")}
    made = _cli("versemi_make_synthetic", "--num-labeled", "3", "--num-unlabeled", "2", "--num-test", "1",
                "--shape-la", "32", "32", "24", "--shape-pancreas", "40", "40", "12", env=env)
    assert made.returncode == 0, made.stderr
    planned = _cli("versemi_plan_and_preprocess", "-d", "DemoLA", "DemoPancreas", "-np", "2", env=env)
    assert planned.returncode == 0, planned.stderr
    assert "10 case(s) preprocessed" in planned.stdout
    plans_root = tmp_path / "work" / "versemi_plans"
    plans = json.loads((plans_root / "DemoLA_DemoPancreas" / "plans.json").read_text(encoding="utf-8"))
    assert plans["dataset_names"] == ["DemoLA", "DemoPancreas"]
    for name in ("DemoLA", "DemoPancreas"):
        assert (plans_root / name / "fingerprint.json").is_file()
        assert len(list((plans_root / "DemoLA_DemoPancreas" / "3d_fullres" / name).glob("*.json"))) == 5
    again = _cli("versemi_plan_and_preprocess", "-d", "DemoLA", "DemoPancreas", env=env)
    assert again.returncode == 0 and "0 case(s) preprocessed, 10 already up to date" in again.stdout
    refused = _cli("versemi_make_synthetic", env=env)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


def test_real_la_cases_plan(tmp_path):
    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018_h5"
    if not source.is_dir():
        pytest.skip(f"real LA data not found at {source} (only present beside the project checkout)")
    from versemi.datasets.converters.la_h5 import convert_la_h5
    env = {**os.environ, "VERSEMI_ROOT": str(tmp_path / "work")}
    ids = sorted(p.name for p in source.iterdir() if (p / "mri_norm2.h5").is_file())[:3]
    convert_la_h5(source, tmp_path / "work" / "raw" / "LA", ids=ids, show_progress=False)
    planned = _cli("versemi_plan_and_preprocess", "-d", "LA", env=env)
    assert planned.returncode == 0, planned.stderr
    plans = json.loads((tmp_path / "work" / "versemi_plans" / "LA" / "plans.json").read_text(encoding="utf-8"))
    assert plans["datasets"]["LA"]["target_spacing"] == pytest.approx([0.625] * 3)
