"""MONAI bundle export: the spec's metadata, the network's I/O, a bundle that runs without versemi
and agrees with versemi_predict voxel for voxel, model-file integrity, reproducible configs and
clear errors; several prompts in one bundle and one label map, as versemi_predict -p A B."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from versemi.bundles import export as bundle_export
from versemi.cli import export_bundle_main, train_main
from versemi.datasets.io import Geometry, write_image
from versemi.errors import InputError
from versemi.inference import load_models, predict_cases, resolve_prompts
from versemi.inference.label_map import compose, label_table
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.model.plans_view import PlansView
from versemi.preprocessing.pipeline import to_network_input
from versemi.preprocessing.resampling import resample_image

from conftest import TINY_TRAINING, toy_experiment, write_tiny_dataset

EXPERIMENT = "DemoLA_DemoPancreas"
TRAINER = "SupervisedTrainer"
# tiny, but trained long enough (Adam) to draw a real boundary: agreement is then a real test
TRAINING = ["-tr", TRAINER, "--optimizer", "adam", "--lr", "0.01"]  # added to conftest's TINY_TRAINING
ITERATIONS = {"0": "60", "1": "60"}
# two datasets preprocessed alike (MRI z-score, the same spacing): Tiny2 with labels target=1 and
# second=2, TinyB with target=1 on the same images, so prompts overlap and values collide
LABEL_MAP_EXPERIMENT = "Tiny2_TinyB"
# patch 16^3 on 16 x 24 x 24 images: several overlapping windows, so the stitching of every channel counts
LABEL_MAP_TRAINING = [*TRAINING, "--iterations-per-epoch", "80", "--patch-size", "16", "16", "16"]
# the MONAI bundle spec's mandatory metadata keys and their JSON types (meta_schema_20240725.json)
MANDATORY = {"schema": str, "version": str, "monai_version": str, "pytorch_version": str, "numpy_version": str,
             "required_packages_version": dict, "task": str, "description": str, "authors": str, "copyright": str,
             "network_data_format": dict}
# ... and of each tensor in network_data_format (required by the schema, plus the optional ones we fill)
TENSOR = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str, "value_range": list,
          "is_patch_data": bool, "channel_def": dict}
OFFICIAL_SCHEMA = os.environ.get("VERSEMI_MONAI_META_SCHEMA", "")  # a local copy of meta_schema_20240725.json
_cz, _sz, _cx, _sx = np.cos(np.pi / 6), np.sin(np.pi / 6), np.cos(np.pi / 9), np.sin(np.pi / 9)
OBLIQUE = tuple((np.array([[1, 0, 0], [0, _cx, -_sx], [0, _sx, _cx]])
                 @ np.array([[_cz, -_sz, 0], [_sz, _cz, 0], [0, 0, 1]])).ravel().tolist())
# runs `python -m monai.bundle ...` in a process where `import versemi` raises ImportError
WITHOUT_VERSEMI = textwrap.dedent("""
    import runpy, sys
    sys.modules["versemi"] = None  # import versemi (and versemi.*) now raises ImportError
    try:
        import versemi
    except ImportError:
        pass
    else:
        raise SystemExit("versemi is still importable")
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    finally:
        loaded = sorted(m for m, v in sys.modules.items() if m.startswith("versemi") and v is not None)
        assert not loaded, loaded
""")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # trains two experiments and runs bundles in subprocesses


@pytest.fixture(scope="module")
def trained(one_thread, toy_raw_master, tmp_path_factory):
    """The toy experiment planned, folds 0 and 1 of a tiny SupervisedTrainer, and the DemoLA bundle."""
    root = tmp_path_factory.mktemp("bundle")
    folds = {fold: [*TRAINING, "--iterations-per-epoch", iterations] for fold, iterations in ITERATIONS.items()}
    with toy_experiment(toy_raw_master, root, folds, VERSEMI_BUNDLES=str(root / "bundles")) as experiment:
        assert _export("-p", "DemoLA", "-f", "0", "1", "-o", str(root / "bundles" / "la")) == 0
        yield SimpleNamespace(root=root, raw=toy_raw_master, bundle=root / "bundles" / "la", experiment=experiment)


def _export(*args: str) -> int:
    return export_bundle_main(["-e", EXPERIMENT, "-tr", TRAINER, *args])


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` without versemi, one thread, from ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", WITHOUT_VERSEMI, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _run_in_process(bundle: Path, dataset_dir: Path, output_dir: Path) -> None:
    """The bundle's workflow in this process (faster than a subprocess), bundle_root given explicitly."""
    from monai.bundle import run

    search_path = list(sys.path)  # the workflow puts the bundle folder on sys.path
    try:
        run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False, bundle_root=str(bundle),
            dataset_dir=str(dataset_dir), output_dir=str(output_dir))
    finally:
        sys.path[:] = search_path


def _test_image(raw: Path, dataset: str) -> Path:
    return sorted((raw / dataset / "imagesTs").glob("*_0000.nii.gz"))[0]


def _bundle_precision(bundle: Path) -> str:
    """The precision the bundle was exported for, as its metadata records it."""
    return json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["versemi"]["precision"]


def _versemi_predictions(trained, inputs: Path, output: Path, prompt: str, precision: str = "fp32") -> Path:
    """versemi_predict's masks at ``precision`` (a bundle agrees with it at the bundle's own precision;
    ``auto`` would be bf16 on CPUs with bf16 units)."""
    ensemble = load_models(trained.experiment, ["0", "1"], TRAINER)
    ensemble.precision = precision
    predict_cases([inputs], output, prompt, ensemble, show_progress=False)
    return output


def _assert_same_grid(bundle_output: Path, reference: Path) -> tuple[sitk.Image, sitk.Image]:
    """Same grid (size, spacing, origin, direction; NIfTI affine), uint8; returns both images."""
    out, ref = sitk.ReadImage(str(bundle_output)), sitk.ReadImage(str(reference))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert out.GetPixelID() == ref.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(nib.load(str(bundle_output)).affine, nib.load(str(reference)).affine, atol=1e-5)
    return out, ref


def _assert_same_segmentation(bundle_output: Path, reference: Path) -> float:
    """Same grid, uint8 0/1; returns the Dice."""
    out, ref = _assert_same_grid(bundle_output, reference)
    a, b = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref)
    assert set(np.unique(a)) <= {0, 1}
    a, b = a.astype(bool), b.astype(bool)
    assert b.any() and not b.all(), "the reference should have a real boundary to compare"
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# ----- layout and metadata -----
def test_bundle_has_the_standard_layout(trained):
    files = sorted(str(p.relative_to(trained.bundle)) for p in trained.bundle.rglob("*") if p.is_file())
    assert files == ["LICENSE", "configs/inference.json", "configs/logging.conf", "configs/metadata.json",
                     "docs/README.md", "models/checksums.json", "models/model.pt", "models/model.ts",
                     "scripts/__init__.py", "scripts/inference.py"]
    assert (trained.bundle / "LICENSE").read_text(encoding="utf-8").split()[:3] == ["Apache", "License", "Version"]
    card = (trained.bundle / "docs" / "README.md").read_text(encoding="utf-8")
    for words in ("not a medical device", "DemoLA", "DemoPancreas", "Cross-validation", "Input requirements",
                  "Version history", "left_atrium"):
        assert words in card
    assert not list(trained.root.glob("bundles/.*")), "no partial export left behind"


def test_metadata_has_the_mandatory_keys_of_the_bundle_spec(trained):
    meta = json.loads((trained.bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    for key, kind in MANDATORY.items():
        assert isinstance(meta.get(key), kind), f"{key}: {meta.get(key)!r} is not a {kind.__name__}"
    assert meta["schema"].endswith("meta_schema_20240725.json")
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    for tensor in (image, pred):
        for key, kind in TENSOR.items():
            assert isinstance(tensor.get(key), kind), f"{key}: {tensor.get(key)!r} is not a {kind.__name__}"
        assert all(isinstance(s, (int, str)) for s in tensor["spatial_shape"])
        assert all(isinstance(v, (int, float)) for v in tensor["value_range"])
    assert image == {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                     "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [], "is_patch_data": True,
                     "channel_def": {"0": "MRI"}}  # the trained patch (z, y, x) = (16, 32, 32) in MONAI's order
    assert pred == {"type": "image", "format": "segmentation", "num_channels": 2, "spatial_shape": [32, 32, 16],
                    "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "left_atrium"}}
    assert meta["versemi"]["folds"] == ["0", "1"] and meta["versemi"]["prompt"]["dataset"] == "DemoLA"
    fold_dice = json.loads((trained.experiment / f"{TRAINER}__3d_fullres" / "fold_0" / "validation" /
                            "summary.json").read_text(encoding="utf-8"))["mean_dice"]["DemoLA/left_atrium"]
    assert meta["eval_metrics"]["fold_0_dice"] == pytest.approx(fold_dice)


def test_metadata_verifies_with_monai_offline(trained, tmp_path):
    """``verify_metadata`` against a schema of the spec's mandatory keys written here (the official
    one cannot be downloaded offline: see the next test)."""
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    tensor = {"type": "object", "required": list(TENSOR),
              "properties": {k: {"type": {str: "string", int: "integer", list: "array", bool: "boolean",
                                          dict: "object"}[v]} for k, v in TENSOR.items()}}
    network_io = {"type": "object", "required": ["inputs", "outputs"],
                  "properties": {"inputs": {"type": "object", "additionalProperties": tensor},
                                 "outputs": {"type": "object", "additionalProperties": tensor}}}
    schema = {"type": "object", "required": list(MANDATORY), "properties": {"network_data_format": network_io}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    meta_file = str(trained.bundle / "configs" / "metadata.json")
    verify_metadata(meta_file=meta_file, filepath=str(tmp_path / "schema.json"))
    bad = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    del bad["copyright"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match="copyright"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(tmp_path / "schema.json"))


def test_metadata_verifies_against_the_official_schema(trained, tmp_path):
    """``python -m monai.bundle verify_metadata`` with a local copy of meta_schema_20240725.json."""
    pytest.importorskip("jsonschema")
    meta_file = str(trained.bundle / "configs" / "metadata.json")
    if not Path(OFFICIAL_SCHEMA).is_file():
        pytest.skip("official metadata schema not checked: it cannot be downloaded offline; set "
                    "VERSEMI_MONAI_META_SCHEMA to a local copy of meta_schema_20240725.json to check it")
    result = _monai_bundle("verify_metadata", "--meta_file", meta_file, "--filepath", OFFICIAL_SCHEMA,
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


# ----- the network -----
def test_network_verifies_in_and_out_and_weights_load_safely(trained, tmp_path):
    bundle = trained.bundle
    result = _monai_bundle("verify_net_in_out", "--net_id", "network_def", "--meta_file",
                           str(bundle / "configs" / "metadata.json"), "--config_file",
                           str(bundle / "configs" / "inference.json"), "--n", "1", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified with no error" in result.stdout + result.stderr
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)  # plain tensors only
    assert sorted({k.split(".")[1] for k in weights}) == ["0", "1"]  # networks.<fold index>.*
    traced = torch.jit.load(str(bundle / "models" / "model.ts"))
    traced.load_state_dict(weights)  # model.pt is exactly the state of model.ts's module
    code = "\n".join(getattr(module, "code", "") for _, module in traced.named_modules())
    assert "forward" in code and "cpu" not in code, "no device baked into the trace: it must run on a GPU too"
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        p = traced(x)
    assert p.shape == (2, 2, 32, 32, 16) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(dim=1), torch.ones(2, 32, 32, 16))


def test_bundle_resampling_is_versemis():
    """scripts/inference.py repeats versemi's resampling (the bundle must not import versemi): keep them equal."""
    from monai.data import MetaTensor

    code = runpy.run_path(str(bundle_export.TEMPLATES / "scripts" / "inference.py"))
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 9, 14, 11)).astype(np.float32)  # (c, z, y, x)
    cases = [((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), ((1.1, 0.8, 1.3), (1.0, 1.0, 1.0)),
             ((2.2, 0.9, 0.6), (1.0, 1.0, 1.0)), ((1.0, 0.7, 0.7), (2.5, 0.8, 0.8)), ((2.5, 2.5, 0.7), (1, 1, 1))]
    for spacing_zyx, target_zyx in cases:
        expected = resample_image(image.copy(), spacing_zyx, target_zyx)
        affine = np.diag([*reversed(spacing_zyx), 1.0])
        data = {"image": MetaTensor(torch.from_numpy(image.transpose(0, 3, 2, 1).copy()), affine=affine)}
        transform = code["ResampleToSpacingd"](keys="image", pixdim=list(reversed(target_zyx)))
        out = transform(data)
        np.testing.assert_allclose(out["image"].numpy().transpose(0, 3, 2, 1), expected, atol=1e-5)
        back = transform.inverse(out)["image"]
        assert back.shape == data["image"].shape
        np.testing.assert_allclose(back.affine.numpy(), affine)


def test_bundle_preprocessing_gives_the_network_versemis_input(trained, tmp_path):
    """The bundle's preprocessing (MONAI transforms and ResampleToSpacingd) hands the network what
    versemi's one preprocessing path (``pipeline.to_network_input``: crop, normalize, resample)
    hands it, on a case with a zero border and another spacing than the plan's."""
    from monai.bundle import ConfigParser

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(_test_image(trained.raw, "DemoLA")))).astype(np.float32)
    array[:2], array[:, :3] = 0, 0  # a border for the crop to remove
    geometry = Geometry((1.3, 0.8, 1.1), (3.0, -2.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(array, geometry, tmp_path / "case_0000.nii.gz")
    parser = ConfigParser()
    parser.read_config(str(trained.bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(trained.bundle)
    bundle_input = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "case_0000.nii.gz")})["image"]
    plan = PlansView(load_models(trained.experiment, ["0"], TRAINER).plans).dataset_plan("DemoLA")
    expected, cropped = to_network_input(array[None], geometry.spacing_zyx, plan)
    assert cropped.shape != tuple(array.shape) and expected.shape[1:] != cropped.shape  # cropped and resampled
    got = bundle_input.numpy().transpose(0, 3, 2, 1)  # MONAI's (c, x, y, z) -> (c, z, y, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_bundle_finds_cases_like_versemi_predict(tmp_path):
    code = runpy.run_path(str(bundle_export.TEMPLATES / "scripts" / "inference.py"))
    for name in ("b_0000.nii.gz", "a_0000.nii.gz", "c.nii", ".partial_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert code["find_images"](str(tmp_path), 1) == [{"image": str(tmp_path / n)} for n in
                                                     ("a_0000.nii.gz", "b_0000.nii.gz", "c.nii")]
    with pytest.raises(ValueError, match=r"case a: .* 2 channel"):
        code["find_images"](str(tmp_path), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no NIfTI images"):
        code["find_images"](str(tmp_path / "empty"), 1)
    with pytest.raises(ValueError, match="is not a folder"):
        code["find_images"](str(tmp_path / "missing"), 1)


# ----- running the bundle -----
def test_bundle_runs_without_versemi_and_matches_versemi_predict(trained, tmp_path):
    """`python -m monai.bundle run` where versemi cannot be imported, on the DemoLA test image and on
    a resampled copy with an oblique, anisotropic geometry: the same masks as versemi_predict."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = _test_image(trained.raw, "DemoLA")
    shutil.copy(image, inputs / image.name)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    write_image(array, Geometry((0.6, 0.9, 2.2), (-12.5, 30.25, 7.0), OBLIQUE), inputs / "oblique_0000.nii.gz")
    write_image(array, Geometry((1.3, 0.8, 1.1), (3.0, -2.0, 1.0), OBLIQUE), inputs / "mild_0000.nii.gz")
    config = trained.bundle / "configs" / "inference.json"
    result = _monai_bundle("run", "--config_file", str(config), "--dataset_dir", str(inputs), "--output_dir",
                           str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = _versemi_predictions(trained, inputs, tmp_path / "versemi", "DemoLA", _bundle_precision(trained.bundle))
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # CASE_0000.nii.gz -> CASE.nii.gz
    for name in names:
        assert _assert_same_segmentation(tmp_path / "out" / name, reference / name) >= 0.99, name


def test_ct_bundle_matches_versemi_predict(trained, tmp_path):
    """The CT prompt (clipping + global z-score, anisotropic spacing), run in this process."""
    bundle = trained.root / "bundles" / "pancreas"
    assert _export("-p", "DemoPancreas:pancreas", "-f", "0", "1", "-o", str(bundle)) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = _test_image(trained.raw, "DemoPancreas")
    shutil.copy(image, inputs / image.name)
    _run_in_process(bundle, inputs, tmp_path / "out")
    reference = _versemi_predictions(trained, inputs, tmp_path / "versemi", "DemoPancreas", _bundle_precision(bundle))
    name = image.name.replace("_0000", "")
    assert _assert_same_segmentation(tmp_path / "out" / name, reference / name) >= 0.99
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    image_format = meta["network_data_format"]["inputs"]["image"]
    assert image_format["modality"] == "CT" and len(image_format["value_range"]) == 2


def test_tampered_model_is_refused(trained, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained.bundle, bundle)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(_test_image(trained.raw, "DemoLA"), inputs)
    model = bundle / "models" / "model.ts"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(Exception) as caught:
        _run_in_process(bundle, inputs, tmp_path / "out")
    chain, error = [], caught.value
    while error is not None:  # MONAI's config parser wraps the bundle's own error
        chain.append(error)
        error = error.__cause__
    assert any(type(e).__name__ == "BundleIntegrityError" and "models/model.ts: SHA-256" in str(e)
               for e in chain), chain
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----- export: reproducible, and clear errors -----
def test_reexport_gives_identical_configs(trained, tmp_path):
    again = tmp_path / "again"
    assert _export("-p", "DemoLA", "-f", "0", "1", "-o", str(again)) == 0
    for relative in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "docs/README.md",
                     "LICENSE", "scripts/inference.py", "models/model.pt"):
        assert (again / relative).read_bytes() == (trained.bundle / relative).read_bytes(), relative
    assert _export("-p", "DemoLA", "-f", "0", "1", "-o", str(again), "--overwrite") == 0  # replaced in place
    assert (again / "configs/inference.json").read_bytes() == (trained.bundle / "configs/inference.json").read_bytes()


def test_bad_input_is_refused_with_nothing_written(trained, tmp_path, capsys, monkeypatch):
    target = tmp_path / "bundle"
    assert _export("-p", "DemoLA", "-f", "3", "-o", str(target)) == 2
    assert "fold 3 was never trained" in capsys.readouterr().err
    assert _export("-p", "Nope", "-f", "0", "-o", str(target)) == 2
    assert "unknown prompt" in capsys.readouterr().err
    assert not target.exists()
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert _export("-p", "DemoLA", "-f", "0", "-o", str(target)) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "--overwrite" in err
    assert _export("-p", "DemoLA", "-f", "0", "-o", str(target), "--overwrite") == 2  # not a bundle: kept
    assert "is not a bundle" in capsys.readouterr().err
    assert (target / "notes.txt").read_text(encoding="utf-8") == "keep me"

    def fail_after_some_files(folder, relative, data):
        if relative == "docs/README.md":
            raise OSError("disk full")
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)

    with pytest.raises(InputError, match="single-channel"):
        bundle_export.normalization_transforms([{"scheme": "zscore"}, {"scheme": "zscore"}])

    monkeypatch.setattr(bundle_export, "_write", fail_after_some_files)
    with pytest.raises(OSError, match="disk full"):
        bundle_export.export_bundle(tmp_path / "half", "DemoLA", EXPERIMENT, ["0"], TRAINER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "nothing half-written"


# ----- several prompts: one bundle, one label map -----
def test_prompts_of_datasets_preprocessed_differently_are_refused(trained, tmp_path, capsys):
    """DemoLA (MRI z-score, 1 mm) and DemoPancreas (CT, 0.8 x 0.8 x 2.5 mm) cannot share the bundle's
    one preprocessing pipeline: named together, as all, or by default, nothing is written."""
    bundles = sorted((trained.root / "bundles").iterdir())
    target = tmp_path / "bundle"
    for prompts, option in ((["DemoLA", "DemoPancreas:pancreas"], "-p DemoLA DemoPancreas:pancreas"),
                            (["all"], "-p all"), ([], "-p all (the default)")):
        assert _export("-f", "0", "-o", str(target), *(["-p", *prompts] if prompts else [])) == 2
        err = capsys.readouterr().err
        assert f"{option}: a bundle has one preprocessing pipeline" in err
        assert "DemoLA: zscore normalization, spacing 1 x 1 x 1 mm" in err and "DemoPancreas: CT normalization" in err
        assert "versemi_export_bundle -p DemoLA:left_atrium, then versemi_export_bundle -p DemoPancreas:pancreas" in err
    assert _export("-f", "0", "-p", "all") == 2  # the default folder is not created either
    assert not target.exists() and sorted((trained.root / "bundles").iterdir()) == bundles


def test_label_mapd_applies_composes_rule_and_equals_the_argmax():
    """scripts/inference.py's LabelMapd against versemi's compose, threshold and ties included, and
    the argmax over (0.5, p_1 .. p_K) gives the same labels."""
    code = runpy.run_path(str(bundle_export.TEMPLATES / "scripts" / "inference.py"))
    rng = np.random.default_rng(0)
    probabilities = rng.choice(np.float32([0.0, 0.3, 0.5, 0.5000001, 0.7, 0.9]), size=(3, 4, 5, 6))
    probabilities[:, 0, 0, :3] = [[0.5, 0.7, 0.7], [0.5, 0.7, 0.2], [0.2, 0.1, 0.7]]  # p = 0.5, a tie, another
    prompts = [{"index": i, "dataset": "A", "label": str(i), "label_value": v} for i, v in enumerate((300, 2, 7))]
    table = label_table(prompts)
    expected = compose(probabilities, table)
    assert expected.dtype == np.uint16 and {0, 300, 2, 7} <= set(np.unique(expected))
    channels = torch.from_numpy(np.concatenate([np.full((1, 4, 5, 6), 0.5, np.float32), probabilities]))
    labels = code["LabelMapd"](keys="pred", values=table.values)({"pred": channels})["pred"]
    assert labels.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(labels[0].numpy(), expected)
    np.testing.assert_array_equal(np.array([0, *table.values])[channels.argmax(0).numpy()], expected)


@pytest.fixture(scope="module")
def label_map_trained(one_thread, tmp_path_factory):
    """Tiny2 (two labels) and TinyB planned together, folds 0 and 1 of a tiny SupervisedTrainer."""
    root = tmp_path_factory.mktemp("label_map")
    raw = root / "raw"
    write_tiny_dataset(raw / "Tiny2", num_cases=4, shape=(16, 24, 24), two_labels=True)
    write_tiny_dataset(raw / "TinyB", num_cases=4, shape=(16, 24, 24))
    with pytest.MonkeyPatch.context() as env:  # only while training: `trained` may hold these variables
        env.setenv("VERSEMI_PLANS", str(root / "plans"))
        env.setenv("VERSEMI_RESULTS", str(root / "results"))
        plan_and_preprocess(ExperimentRequest(["Tiny2", "TinyB"], raw, root / "plans", num_processes=1,
                                              show_progress=False))
        for fold in ITERATIONS:
            assert train_main(["3d_fullres", fold, *TINY_TRAINING, *LABEL_MAP_TRAINING]) == 0
    return SimpleNamespace(root=root, raw=raw, experiment=root / "results" / LABEL_MAP_EXPERIMENT)


@pytest.fixture
def label_map(label_map_trained, monkeypatch):
    for name, folder in (("VERSEMI_PLANS", "plans"), ("VERSEMI_RESULTS", "results"), ("VERSEMI_BUNDLES", "bundles")):
        monkeypatch.setenv(name, str(label_map_trained.root / folder))
    return label_map_trained


def _label_map_inputs(label_map, folder: Path, oblique: bool = False) -> Path:
    """A Tiny2 image, and a TinyB image or (``oblique``) the Tiny2 image on an oblique, anisotropic grid."""
    folder.mkdir()
    shutil.copy(label_map.raw / "Tiny2" / "imagesTr" / "case0_0000.nii.gz", folder / "tiny2_0000.nii.gz")
    if not oblique:
        shutil.copy(label_map.raw / "TinyB" / "imagesTr" / "case1_0000.nii.gz", folder / "tinyb_0000.nii.gz")
    else:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "tiny2_0000.nii.gz")))
        write_image(array, Geometry((0.8, 1.3, 1.7), (4.0, -3.0, 2.5), OBLIQUE), folder / "oblique_0000.nii.gz")
    return folder


def _label_map_predictions(label_map, inputs: Path, output: Path, prompts: list[str], precision: str = "fp32") -> Path:
    ensemble = load_models(label_map.experiment, ["0", "1"], TRAINER)
    ensemble.precision = precision
    predict_cases([inputs], output, resolve_prompts(ensemble.plans, prompts), ensemble, save_probabilities=True,
                  show_progress=False)
    return output


def _assert_same_label_maps(bundle_output: Path, reference: Path, tolerance: float = 1e-5) -> set[int]:
    """The bundle's label maps equal versemi_predict's voxel for voxel, but where float rounding may
    decide (the model card's tolerance: the largest probability within ``tolerance`` of 0.5 or of
    the second largest); returns the values found. Overlaps must occur, so the rule is exercised."""
    names = sorted(p.name for p in reference.glob("*.nii.gz"))
    assert names and sorted(p.name for p in bundle_output.glob("*.nii.gz")) == names
    found, overlaps = set(), 0
    for name in names:
        out, ref = _assert_same_grid(bundle_output / name, reference / name)
        a, b = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref)
        p = np.sort(np.load(reference / name.replace(".nii.gz", "_prob.npz"))["probabilities"], axis=0)
        undecided = (np.abs(p[-1] - 0.5) < tolerance) | (np.abs(p[-1] - p[-2]) < tolerance)
        assert np.array_equal(a[~undecided], b[~undecided]), name
        found |= set(np.unique(b).tolist())
        overlaps += int(((p > 0.5).sum(0) > 1).sum())
    assert overlaps > 0, "prompts should overlap somewhere, so the overlap rule is compared"
    return found


def test_label_map_bundle_runs_without_versemi_and_matches_versemi_predict(label_map, tmp_path):
    """`-p all` of two datasets preprocessed alike: one bundle (default folder <experiment>_all) whose
    `python -m monai.bundle run`, without versemi, writes versemi_predict's label maps and labels.json."""
    assert export_bundle_main(["-tr", TRAINER, "-f", "0", "1", "-p", "all"]) == 0
    bundle = label_map.root / "bundles" / f"{LABEL_MAP_EXPERIMENT}_all"
    inputs = _label_map_inputs(label_map, tmp_path / "in", oblique=True)
    result = _monai_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"), "--dataset_dir",
                           str(inputs), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _bundle_precision(bundle) == "fp32"  # the default: the same label maps on every machine
    reference = _label_map_predictions(label_map, inputs, tmp_path / "versemi", ["all"], "fp32")
    table = json.loads((reference / "labels.json").read_text(encoding="utf-8"))
    # both datasets call their target 1: numbered 1..3 in prompt order
    assert [(e["dataset"], e["label"], e["value"]) for e in table["labels"]] == [
        ("Tiny2", "target", 1), ("Tiny2", "second", 2), ("TinyB", "target", 3)]
    for written in (bundle / "configs" / "labels.json", tmp_path / "out" / "labels.json"):
        assert written.read_bytes() == (reference / "labels.json").read_bytes()
    # which of two overlapping prompts wins is up to a tiny model (the helper asserts that overlaps
    # occur, so the compose rule is compared); the maps must hold some structure, not only background
    assert _assert_same_label_maps(tmp_path / "out", reference) - {0}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 4 and pred["channel_def"] == {"0": "background", "1": "Tiny2/target",
                                                                 "2": "Tiny2/second", "3": "TinyB/target"}
    assert meta["label_classes"] == "0: background, 1: Tiny2/target, 2: Tiny2/second, 3: TinyB/target"
    assert meta["versemi"]["label_table"] == table and "prompt" not in meta["versemi"]
    assert "Tiny2/second_fold_1_dice" in meta["eval_metrics"]
    card = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "## Labels" in card and "| 3 | TinyB | target | 1 | 2 |" in card
    assert "versemi_predict -p Tiny2:target Tiny2:second TinyB:target" in card


def test_one_datasets_labels_keep_their_values(label_map, tmp_path):
    """`-p Tiny2:target Tiny2/second`: default folder <experiment>_Tiny2, the dataset's own values,
    versemi_predict's label maps (run in this process); the network gives K + 1 channels, channel 0
    the constant 0.5, and passes MONAI's verify_net_in_out."""
    from monai.bundle import verify_net_in_out

    assert export_bundle_main(["-tr", TRAINER, "-f", "0", "1", "-p", "Tiny2:target", "Tiny2/second"]) == 0
    bundle = label_map.root / "bundles" / f"{LABEL_MAP_EXPERIMENT}_Tiny2"
    inputs = _label_map_inputs(label_map, tmp_path / "in")
    _run_in_process(bundle, inputs, tmp_path / "out")
    reference = _label_map_predictions(label_map, inputs, tmp_path / "versemi", ["Tiny2:target", "Tiny2/second"],
                                       _bundle_precision(bundle))
    table = json.loads((bundle / "configs" / "labels.json").read_text(encoding="utf-8"))
    assert [e["value"] for e in table["labels"]] == [1, 2] and table["values"] == "each dataset's own label values"
    assert (tmp_path / "out" / "labels.json").read_bytes() == (reference / "labels.json").read_bytes()
    assert _assert_same_label_maps(tmp_path / "out", reference) == {0, 1, 2}
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), n=1, device="cpu",
                      bundle_root=str(bundle))
    traced = torch.jit.load(str(bundle / "models" / "model.ts"))
    with torch.no_grad():
        p = traced(torch.rand(2, 1, 16, 16, 16))
    assert p.shape == (2, 3, 16, 16, 16) and bool((p[:, 0] == 0.5).all())


# bf16 rounds each layer's output to 8 bits of mantissa; the bundle sums folds and flips in another
# order, so a voxel within this distance of a decision may go either way (the model card says so)
BF16_TOLERANCE = 2e-2


def test_bf16_bundle_records_its_precision_and_agrees_with_versemi_predict_in_bf16(label_map, tmp_path):
    """--precision bf16: the metadata and the card say bf16, the traced model computes in bf16 on any
    machine (it differs from fp32), and its label maps are versemi_predict --precision bf16's."""
    bundle = tmp_path / "bf16"
    assert export_bundle_main(["-tr", TRAINER, "-f", "0", "1", "-p", "Tiny2:target", "Tiny2/second", "-o",
                               str(bundle), "--precision", "bf16"]) == 0
    assert _bundle_precision(bundle) == "bf16"
    card = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "exported for bf16" in card and "--precision bf16" in card
    traced = torch.jit.load(str(bundle / "models" / "model.ts"))
    # a real image, z-scored, (x, y, z): random noise would give saturated probabilities, equal in any precision
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(label_map.raw / "Tiny2" / "imagesTr" / "case0_0000.nii.gz")))
    probe = torch.from_numpy((image - image.mean()) / image.std()).float().permute(2, 1, 0)[None, None]
    ensemble = load_models(label_map.experiment, ["0", "1"], TRAINER)
    indices = [p["index"] for p in bundle_export.select_prompts(ensemble.plans, ["Tiny2:target", "Tiny2/second"])]
    fp32 = bundle_export.LabelMapNetwork([m.network for m in ensemble.models], indices)
    with torch.no_grad():
        assert (traced(probe) - fp32(probe)).abs().max() > 1e-4, "the bundle did not compute in bf16"
    inputs = _label_map_inputs(label_map, tmp_path / "in")
    _run_in_process(bundle, inputs, tmp_path / "out")
    reference = _label_map_predictions(label_map, inputs, tmp_path / "versemi", ["Tiny2:target", "Tiny2/second"],
                                       "bf16")
    assert _assert_same_label_maps(tmp_path / "out", reference, BF16_TOLERANCE) == {0, 1, 2}


def test_unknown_bundle_precision_is_refused_with_nothing_written(label_map, tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        export_bundle_main(["-tr", TRAINER, "-p", "all", "-o", str(tmp_path / "b"), "--precision", "fp16"])
    with pytest.raises(InputError, match="--precision fp16"):
        bundle_export.export_bundle(tmp_path / "b", "all", trainer=TRAINER, precision="fp16")
    assert not (tmp_path / "b").exists()
