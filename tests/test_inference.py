"""Prediction: the input's geometry and format kept (SimpleITK and nibabel agree), the pipeline
aligned voxel for voxel, mirroring, fold ensembles, largest component, and clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import cc3d
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from versemi.cli import predict_main
from versemi.datasets.io import Geometry, write_image
from versemi.errors import InputError
from versemi.inference import (Ensemble, FoldModel, largest_connected_component, load_models, predict_case,
                               predict_cases, resolve_prompt)

from conftest import toy_experiment
from versemi.preprocessing.cropping import crop, nonzero_bbox
from versemi.preprocessing.normalization import normalize

EXPERIMENT = "DemoLA_DemoPancreas"
# rotated 30 degrees about z, then 20 degrees about x: an oblique, right-handed direction
_cz, _sz, _cx, _sx = np.cos(np.pi / 6), np.sin(np.pi / 6), np.cos(np.pi / 9), np.sin(np.pi / 9)
OBLIQUE = tuple((np.array([[1, 0, 0], [0, _cx, -_sx], [0, _sx, _cx]])
                 @ np.array([[_cz, -_sz, 0], [_sz, _cz, 0], [0, 0, 1]])).ravel().tolist())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread, toy_raw_master, tmp_path_factory):
    """The toy experiment planned, and folds 0 and 1 of a tiny VerSemiTrainer trained briefly."""
    with toy_experiment(toy_raw_master, tmp_path_factory.mktemp("inference"), {"0": [], "1": []}) as experiment:
        yield SimpleNamespace(raw=toy_raw_master, experiment=experiment)

def _test_image(raw: Path, dataset: str) -> Path:
    return sorted((raw / dataset / "imagesTs").glob("*_0000.nii.gz"))[0]


def _assert_same_grid(prediction: Path, reference: Path) -> np.ndarray:
    """Same size, spacing, origin and direction as SimpleITK reads them (and, for NIfTI, the same
    shape, affine and zooms as nibabel reads them); the voxels as a (z, y, x) array."""
    out, ref = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(reference))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert out.GetPixelID() == sitk.sitkUInt8
    if prediction.name.endswith((".nii", ".nii.gz")):
        n_out, n_ref = nib.load(str(prediction)), nib.load(str(reference))
        assert n_out.shape == n_ref.shape
        np.testing.assert_allclose(n_out.affine, n_ref.affine, atol=1e-5)
        np.testing.assert_allclose(n_out.header.get_zooms(), n_ref.header.get_zooms(), rtol=1e-6)
        assert np.array_equal(np.asarray(n_out.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(out))
    array = sitk.GetArrayFromImage(out)
    assert set(np.unique(array)) <= {0, 1}
    return array


def _oblique_copy(source: Path, target: Path) -> Path:
    """The voxels of ``source`` with anisotropic spacing, an offset origin and an oblique direction."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    write_image(array, Geometry((0.6, 0.9, 2.2), (-12.5, 30.25, 7.0), OBLIQUE), target)
    return target


def _predict(*args: str) -> int:
    return predict_main(["-e", EXPERIMENT, "--quiet", *args])


def test_prediction_keeps_the_nifti_geometry_and_writes_probabilities(trained, tmp_path):
    folder = trained.raw / "DemoLA" / "imagesTs"
    assert _predict("-i", str(folder), "-o", str(tmp_path / "out"), "-p", "DemoLA", "-f", "0",
                    "--save-probabilities") == 0
    image = _test_image(trained.raw, "DemoLA")
    case = image.name[:-len("_0000.nii.gz")]
    mask = _assert_same_grid(tmp_path / "out" / f"{case}.nii.gz", image)
    probabilities = np.load(tmp_path / "out" / f"{case}_prob.npz")["probabilities"]
    assert probabilities.dtype == np.float32 and probabilities.shape == mask.shape
    assert 0 <= probabilities.min() and probabilities.max() <= 1
    assert np.array_equal(probabilities > 0.5, mask.astype(bool))


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_prediction_keeps_format_and_geometry_of_nrrd_and_mha(trained, tmp_path, ending):
    source = tmp_path / f"pan_0000{ending}"
    sitk.WriteImage(sitk.ReadImage(str(_test_image(trained.raw, "DemoPancreas"))), str(source))
    assert _predict("-i", str(source), "-o", str(tmp_path / "out"), "-p", "DemoPancreas:pancreas", "-f", "1",
                    "--no-mirroring") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"pan{ending}"]
    _assert_same_grid(tmp_path / "out" / f"pan{ending}", source)


def test_prediction_keeps_an_oblique_anisotropic_geometry(trained, tmp_path):
    source = _oblique_copy(_test_image(trained.raw, "DemoLA"), tmp_path / "in" / "oblique.nii.gz")
    assert _predict("-i", str(source), "-o", str(tmp_path / "out"), "-p", "DemoLA/left_atrium", "-f", "0",
                    "--no-mirroring") == 0
    _assert_same_grid(tmp_path / "out" / "oblique.nii.gz", source)


def test_two_fold_ensemble_with_and_without_mirroring_and_lcc(trained, tmp_path):
    ensemble = load_models(trained.experiment)  # default: every fold folder present
    assert ensemble.folds == ["0", "1"] and all(not m.network.training for m in ensemble.models)
    for name, dataset, extra in (("mirrored", "DemoLA", ["--lcc"]),
                                 ("plain", "DemoPancreas", ["-f", "0", "1", "--no-mirroring", "--step", "0.75"])):
        folder = trained.raw / dataset / "imagesTs"
        assert _predict("-i", str(folder), "-o", str(tmp_path / name), "-p", dataset, *extra) == 0
        (output,) = (tmp_path / name).iterdir()
        _assert_same_grid(output, next(folder.glob("*_0000.nii.gz")))
    (output,) = (tmp_path / "mirrored").iterdir()
    assert cc3d.connected_components(sitk.GetArrayFromImage(sitk.ReadImage(str(output)))).max() <= 1


class PointwiseNet(torch.nn.Module):
    """Foreground where the normalized intensity is above 0: makes the expected output computable."""

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        foreground = 8 * x[:, :1, None].expand(-1, prompts.shape[1], -1, -1, -1, -1)
        return torch.cat([torch.zeros_like(foreground), foreground], dim=2)  # (B, K, 2, Z, Y, X)


def _phantom(path: Path) -> Path:
    """A smooth off-centre ellipsoidal blob inside a zero border (so cropping removes something)."""
    z, y, x = np.meshgrid(np.arange(14), np.arange(30), np.arange(26), indexing="ij")
    blob = np.exp(-(((z - 6) * 2.2) ** 2 + ((y - 17) * 0.9) ** 2 + ((x - 10) * 0.6) ** 2) / 60)
    image = (10 + 100 * blob).astype(np.float32)
    image[:, :3], image[:2] = 0, 0
    write_image(image, Geometry((0.6, 0.9, 2.2), (-12.5, 30.25, 7.0), OBLIQUE), path)
    return path


def test_pipeline_is_aligned_voxel_for_voxel_and_mirroring_flips_back(trained, tmp_path):
    plans = load_models(trained.experiment, folds=["0"]).plans
    ensemble = Ensemble(plans, "3d_fullres", [FoldModel("0", Path("-"), "-", PointwiseNet(), [16, 32, 32])],
                        torch.device("cpu"))
    source = _phantom(tmp_path / "phantom_0000.nii.gz")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source))).astype(np.float32)[None]
    bbox = nonzero_bbox(image)
    expected = np.zeros(image.shape[1:], bool)
    expected[tuple(slice(lo, hi) for lo, hi in bbox)] = normalize(np.array(crop(image, bbox)),
                                                                  plans["datasets"]["DemoLA"]["normalization"])[0] > 0
    plain = predict_case(ensemble, [source], "DemoLA", mirroring=False, keep_probabilities=True)
    mirrored = predict_case(ensemble, [source], "DemoLA", mirroring=True, keep_probabilities=True)
    np.testing.assert_allclose(plain.probabilities, mirrored.probabilities, atol=1e-5)
    found = plain.mask.astype(bool)
    assert 2 * (found & expected).sum() / (found.sum() + expected.sum()) > 0.95
    assert plain.geometry == Geometry.of(sitk.ReadImage(str(source)))
    single = predict_case(ensemble, [source], "DemoLA", mirroring=False, lcc=True)
    assert cc3d.connected_components(single.mask).max() == 1


def test_largest_connected_component():
    mask = np.zeros((10, 10, 10), bool)
    mask[0:2, 0:2, 0:2] = True          # 8 voxels
    mask[5:9, 5:9, 5:9] = True          # 64 voxels: kept
    mask[2, 2, 2] = True                # touches the first only through a corner
    kept = largest_connected_component(mask)
    assert kept.sum() == 64 and kept[5:9, 5:9, 5:9].all()
    assert largest_connected_component(mask[:4, :4, :4]).sum() == 9
    assert largest_connected_component(mask[:4, :4, :4], connectivity=6).sum() == 8
    assert not largest_connected_component(np.zeros((3, 3, 3), bool)).any()


def test_prompts_by_dataset_label_name_value_and_nnunet_name():
    plans = {"experiment": "X", "prompts": [
        {"index": 0, "dataset": "LA", "label": "left_atrium", "label_value": 1},
        {"index": 1, "dataset": "Dataset002_Abdomen", "label": "liver", "label_value": 1},
        {"index": 2, "dataset": "Dataset002_Abdomen", "label": "spleen", "label_value": 2},
        {"index": 3, "dataset": None, "label": "synthetic", "label_value": None}]}
    assert resolve_prompt(plans, "LA")["index"] == 0
    assert resolve_prompt(plans, "la:left_atrium")["index"] == 0
    assert resolve_prompt(plans, "Abdomen/spleen")["index"] == 2
    assert resolve_prompt(plans, "2:1")["index"] == 1
    assert resolve_prompt(plans, "Dataset002_Abdomen:Spleen")["index"] == 2
    for bad, message in (("Abdomen", "has 2 labels"), ("Heart", "unknown prompt"), ("LA:liver", "unknown prompt"),
                         ("synthetic", "unknown prompt")):
        with pytest.raises(InputError, match=message) as caught:
            resolve_prompt(plans, bad)
        assert "Dataset002_Abdomen:spleen" in str(caught.value)


def _two_channel_folder(raw: Path, folder: Path) -> Path:
    image = _test_image(raw, "DemoLA")
    folder.mkdir()
    for c in range(2):
        shutil.copy(image, folder / f"two_{c:04d}.nii.gz")
    return folder


@pytest.mark.parametrize("case", ["unknown prompt", "missing fold", "damaged checkpoint", "wrong channel count",
                                  "output is the input folder", "existing output", "plans of another experiment"])
def test_bad_requests_fail_clearly_and_write_nothing(trained, tmp_path, monkeypatch, capsys, case):
    folder = trained.raw / "DemoLA" / "imagesTs"
    out = tmp_path / "out"
    args = ["-i", str(folder), "-o", str(out), "-p", "DemoLA", "-f", "0", "--no-mirroring"]
    if case == "unknown prompt":
        args[5], expected = "Heart", "unknown prompt"
    elif case == "missing fold":
        args[7], expected = "3", "fold 3 was never trained"
    elif case == "damaged checkpoint":
        copy = tmp_path / "results" / EXPERIMENT
        shutil.copytree(trained.experiment, copy)
        checkpoint = copy / "VerSemiTrainer__3d_fullres" / "fold_0" / "checkpoint_final.pth"
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
        monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
        expected = "cannot be read"
    elif case == "wrong channel count":
        args[1], expected = str(_two_channel_folder(trained.raw, tmp_path / "two")), "two_0000.nii.gz: case 'two' has 2"
    elif case == "output is the input folder":
        args[1], args[3], expected = str(tmp_path), str(tmp_path), "is the input folder"
        _oblique_copy(_test_image(trained.raw, "DemoLA"), tmp_path / "a_0000.nii.gz")
    elif case == "existing output":
        assert _predict(*args) == 0
        capsys.readouterr()
        expected = "1 output file(s) exist already"
    else:
        checkpoint = trained.experiment / "VerSemiTrainer__3d_fullres" / "fold_0" / "checkpoint_final.pth"
        state = torch.load(checkpoint, weights_only=False)
        state["plans"] = {**state["plans"], "experiment": "Other"}
        torch.save(state, tmp_path / "other.pth")
        with pytest.raises(InputError, match="holds other plans"):
            load_models([checkpoint, tmp_path / "other.pth"])
        return
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _predict(*args) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if case == "existing output":
        assert _predict(*args, "--overwrite") == 0


def test_api_reports_every_input_problem_at_once(trained, tmp_path):
    ensemble = load_models(trained.experiment, folds=["0"])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError) as caught:
        inputs = [tmp_path / "missing.nii.gz", tmp_path / "notes.txt", _two_channel_folder(trained.raw, tmp_path / "two")]
        predict_cases(inputs, tmp_path / "out", "DemoLA", ensemble, show_progress=False)
    assert len(caught.value.problems) == 3
    assert not (tmp_path / "out").exists()


def test_networks_are_rebuilt_from_the_checkpoint_without_a_trainer(trained, tmp_path, monkeypatch):
    from versemi.training.trainer import Trainer

    checkpoint = trained.experiment / "VerSemiTrainer__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, weights_only=False)
    assert state["network_plan"]["features"] == [4, 8, 16, 16]  # the run's override, as trained
    source = _test_image(trained.raw, "DemoLA")
    expected = predict_case(load_models([checkpoint]), [source], "DemoLA", mirroring=False, keep_probabilities=True)

    def no_trainer(*args, **kwargs):
        raise AssertionError("a Trainer was built")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "__init__", no_trainer)
        rebuilt = load_models([checkpoint])
    found = predict_case(rebuilt, [source], "DemoLA", mirroring=False, keep_probabilities=True)
    assert np.array_equal(found.probabilities, expected.probabilities)
    # a checkpoint of an earlier version (no network plan) is rebuilt by its trainer
    del state["network_plan"]
    torch.save(state, tmp_path / "older.pth")
    older = predict_case(load_models([tmp_path / "older.pth"]), [source], "DemoLA", mirroring=False,
                         keep_probabilities=True)
    assert np.array_equal(older.probabilities, expected.probabilities)
