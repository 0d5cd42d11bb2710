"""The 2d configuration: plans, slices of volumes and native 2d images, every trainer, slice-wise
prediction in the input's geometry, and 2d metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from versemi.datasets.io import Geometry, write_image
from versemi.datasets.layout import write_dataset_json

from conftest import TOY_EXPERIMENT

OBLIQUE = (0.96, -0.28, 0.0, 0.28, 0.96, 0.0, 0.0, 0.0, 1.0)
TINY_2D = ["--batch-size", "4", "--features", "4", "8", "16", "--num-workers", "0", "--val-iterations", "1",
           "--epochs", "1", "--iterations-per-epoch", "2", "--supervised-warm-up", "0", "--quiet"]


def resume_args_2d(plans_root: Path, trainer: str, *extra: str) -> list[str]:
    """versemi_train arguments of a 3-epoch, 3-iteration 2d run of the toy pair with a loader
    worker: a kill at iteration 5 lands in its second epoch (``train_killed_and_resumed``)."""
    return ["2d", "0", "--plans-root", str(plans_root), "-tr", trainer, "--epochs", "3", "--iterations-per-epoch",
            "3", "--batch-size", "4", "--features", "4", "8", "16", "--num-workers", "1", "--val-iterations", "1",
            "--quiet", *extra]


def _plans(plans_root: Path, experiment: str) -> dict:
    return json.loads((plans_root / experiment / "plans.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def planned_2d(toy_raw_master, tmp_path_factory) -> Path:
    """The toy pair planned, with the caches of both configurations; returns the plans root."""
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    plans_root = tmp_path_factory.mktemp("plans2d")
    summary = plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw_master, plans_root,
                                                    num_processes=1, show_progress=False,
                                                    configurations=["3d_fullres", "2d"]))
    assert [Path(c["folder"]).name for c in summary["caches"]] == ["3d_fullres", "2d"]
    return plans_root


def test_the_2d_configuration_follows_nnunet(planned_2d):
    plans = _plans(planned_2d, TOY_EXPERIMENT)
    three, two = plans["configurations"]["3d_fullres"], plans["configurations"]["2d"]
    assert two["spatial_dims"] == 2 and two["data_identifier"] == "2d" and "spatial_dims" not in three
    # a patch is one slice; the network convolves and pools in-plane only
    assert two["patch_size"][0] == 1 and min(two["patch_size"][1:]) >= 8
    net = two["network"]
    assert net["spatial_dims"] == 2 and net["architecture"] == "unet"
    assert all(k[0] == 1 for k in net["kernel_sizes"]) and all(s[0] == 1 for s in net["strides"])
    assert all(p % int(np.prod([s[a] for s in net["strides"]])) == 0 for a, p in enumerate(two["patch_size"]))
    # in-plane target spacing of 3d_fullres, never resampled across slices
    for name, dataset in plans["datasets"].items():
        assert two["target_spacing"][name] == [None, *dataset["target_spacing"][1:]]
    # a 2d sample costs far less than a 3d one: more of them per batch, also in the CPU preset
    assert two["batch_size"] > three["batch_size"]
    assert two["cpu_preset"]["batch_size"] > three["cpu_preset"]["batch_size"]


def test_the_2d_cache_keeps_each_case_s_slices(planned_2d):
    from versemi.atomic import read_json

    for props_path in sorted((planned_2d / TOY_EXPERIMENT / "2d" / "DemoPancreas").glob("*.json")):
        props = read_json(props_path)
        three = read_json(planned_2d / TOY_EXPERIMENT / "3d_fullres" / "DemoPancreas" / props_path.name)
        # DemoPancreas is anisotropic (2.5 mm slices): 3d_fullres resamples z, 2d keeps every slice
        assert props["shape"][0] == props["shape_after_crop"][0]
        assert props["spacing"][0] == pytest.approx(props["original_spacing_zyx"][0])
        assert props["shape"][1:] == three["shape"][1:]


def test_an_existing_plan_gains_the_2d_configuration_and_an_edited_one_is_kept(toy_raw, tmp_path):
    from versemi.errors import InputError
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    request = ExperimentRequest(["DemoLA"], toy_raw, tmp_path / "plans", num_processes=1, show_progress=False)
    plan_and_preprocess(request, preprocess=False)
    path = tmp_path / "plans" / "DemoLA" / "plans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    del plans["configurations"]["2d"]  # as an earlier version wrote it
    path.write_text(json.dumps(plans), encoding="utf-8")
    plan_and_preprocess(request, preprocess=False)
    assert "2d" in json.loads(path.read_text(encoding="utf-8"))["configurations"]
    plans["configurations"]["3d_fullres"]["batch_size"] = 1  # edited by hand: never replaced silently
    path.write_text(json.dumps(plans), encoding="utf-8")
    with pytest.raises(InputError, match="planned differently"):
        plan_and_preprocess(request, preprocess=False)
    assert json.loads(path.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["batch_size"] == 1
    with pytest.raises(InputError, match="plans no configuration '2.5d'"):
        plan_and_preprocess(ExperimentRequest(["DemoLA"], toy_raw, tmp_path / "plans", num_processes=1,
                                              show_progress=False, overwrite_plans=True, configurations=["2.5d"]))


def test_the_2d_unet_convolves_each_slice_on_its_own():
    from versemi.nets import build_network
    from versemi.plans.topology import pool_and_conv_props

    plan = pool_and_conv_props([1.0, 1.0], [32, 48]).lifted().network_plan()
    torch.manual_seed(0)
    network = build_network({**plan, "features": [4, 8, 16, 16]}, 1, 3).eval()
    assert network.divisor == (1, 8, 8) or network.divisor[0] == 1
    image = torch.randn(2, 1, 1, 32, 48)
    with torch.no_grad():
        logits = network(image, torch.tensor([0, 1]))
        assert logits.shape == (2, 2, 1, 32, 48)
        # two slices stacked as two samples give the same result as each alone (no mixing across slices)
        alone = network(image[:1], torch.tensor([0]))
    assert torch.allclose(logits[:1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="one slice at a time"):
        network(torch.randn(1, 1, 2, 32, 48), torch.tensor([0]))
    with pytest.raises(ValueError, match="kernel and stride 1 along z"):
        build_network({**plan, "kernel_sizes": [[3, 3, 3]] * len(plan["strides"])}, 1, 3)
    with pytest.raises(ValueError, match="V-Net is 3d only"):
        build_network({**plan, "architecture": "vnet"}, 1, 3)


def test_2d_augmentation_stays_in_plane():
    from versemi.model.augmentation_settings import AugmentationSettings
    from versemi.training.augmentation import augment, build_transforms, source_patch_size

    settings = AugmentationSettings(p_rotation=1.0, p_scale=1.0)
    assert source_patch_size([1, 40, 48], settings, spatial_dims=2) == [1, 50, 60]
    transforms = build_transforms([1, 40, 48], settings, spatial_dims=2)
    rng = np.random.default_rng(0)
    batch = {"data": rng.normal(size=(3, 1, 1, 50, 60)).astype(np.float32),
             "seg": (rng.random((3, 1, 1, 50, 60)) > 0.5).astype(np.float32)}
    np.random.seed(0)
    out = augment(transforms, batch, 2)
    assert out["data"].shape == (3, 1, 1, 40, 48) and out["seg"].shape == (3, 1, 1, 40, 48)
    assert set(np.unique(np.rint(out["seg"]))) <= {0, 1}
    mirror = [t for t in transforms.transforms if type(t).__name__ == "MirrorTransform"][0]
    assert tuple(mirror.axes) == (0, 1)  # y and x of the slice


def test_block_masks_boxes_and_mirroring_in_2d():
    from versemi.inference.sliding_window import mirror_axes
    from versemi.training.mixing import block_mask, box_mask

    torch.manual_seed(0)
    blocks = block_mask(2, [1, 16, 16], blocks_per_axis=4, ratio=0.5)
    # 4 x 4 blocks of 4 x 4 pixels, half of them masked: exactly half of every slice
    assert blocks.shape == (2, 1, 1, 16, 16) and blocks.sum(dim=(1, 2, 3, 4)).tolist() == [128.0, 128.0]
    three = block_mask(1, [16, 16, 16], blocks_per_axis=4, ratio=0.5)
    assert float(three.sum()) == 16 ** 3 / 2
    box = box_mask(3, [1, 20, 20], ratio=0.5)
    assert box.sum(dim=(1, 2, 3, 4)).tolist() == [100.0] * 3  # every box spans its slice's z
    assert len(mirror_axes(True, [1, 32, 32])) == 4 and all(2 not in axes for axes in mirror_axes(True, [1, 32, 32]))
    assert len(mirror_axes(True, [16, 32, 32])) == 8 and mirror_axes(False, [1, 8, 8]) == [()]


def test_metrics_score_a_single_slice_as_a_2d_image():
    from versemi.evaluation.metrics import binary_metrics

    reference = np.zeros((40, 40), bool)
    reference[10:30, 10:30] = True
    prediction = np.zeros((40, 40), bool)
    prediction[14:30, 10:30] = True
    flat = binary_metrics(prediction, reference, (0.5, 0.5))
    sliced = binary_metrics(prediction[None], reference[None], (3.0, 0.5, 0.5))
    assert sliced == flat
    # a 4-pixel (2 mm) shift of one edge: distances in mm, in-plane
    assert flat.hd95 == pytest.approx(2.0) and 0 < flat.asd < 2.0


def _train_2d(plans_root: Path, results: Path, trainer: str, *extra: str) -> Path:
    import os

    from versemi.cli import train_main

    os.environ["VERSEMI_PLANS"] = str(plans_root)
    assert train_main(["2d", "0", "-tr", trainer, *TINY_2D]) == 0
    return results / TOY_EXPERIMENT / f"{trainer}__2d" / "fold_0" / "checkpoint_final.pth"


def _trainer_names() -> list[str]:
    from versemi.training.trainers import discover_trainers

    return sorted(name for name in discover_trainers()[0] if name != "Trainer")


@pytest.mark.parametrize("trainer", _trainer_names())
def test_every_trainer_trains_in_2d_or_says_why_not(trainer, planned_2d, results, monkeypatch, one_thread):
    from versemi.cli import train_main
    from versemi.model.checkpoint import load_checkpoint

    monkeypatch.setenv("VERSEMI_PLANS", str(planned_2d))
    if trainer == "MNTrainer":  # a 2d network beside the plan's 3d one: trains the 3d configuration
        assert train_main(["2d", "0", "-tr", trainer, *TINY_2D]) != 0
        return
    if trainer in ("C3S3Trainer", "MEDLTrainer"):
        # their V-Net is 3d only: asked for, it is refused with the way out; by default a second 2d U-Net trains
        assert train_main(["2d", "0", "-tr", trainer, *TINY_2D, "--method", '{"second_architecture": "vnet"}']) != 0
    assert train_main(["2d", "0", "-tr", trainer, *TINY_2D]) == 0
    state = load_checkpoint(results / TOY_EXPERIMENT / f"{trainer}__2d" / "fold_0" / "checkpoint_final.pth")
    assert state["configuration"] == "2d" and state["patch_size"][0] == 1
    if state.get("network_plan"):
        assert state["network_plan"]["spatial_dims"] == 2


def test_c3s3_in_2d_names_the_way_out(planned_2d, results, monkeypatch, capsys):
    from versemi.cli import train_main

    monkeypatch.setenv("VERSEMI_PLANS", str(planned_2d))
    assert train_main(["2d", "0", "-tr", "C3S3Trainer", *TINY_2D, "--method", '{"second_architecture": "vnet"}']) != 0
    err = capsys.readouterr().err
    assert "3d only" in err and "second_architecture" in err


def _anisotropic_dataset(root: Path) -> Path:
    """Volumes of 5 mm slices, 0.8 mm pixels: a disc per slice whose radius changes along z."""
    folder = root / "Aniso"
    geometry = Geometry((0.8, 0.8, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:6, :32, :32]
    for i in range(6):
        label = (((yy - 16 - i % 3) ** 2 + (xx - 15) ** 2) < (6 + zz) ** 2).astype(np.uint8)
        image = (rng.normal(0, 0.3, label.shape) + 2 * label).astype(np.float32)
        write_image(image, geometry, folder / "imagesTr" / f"an{i}_0000.nii.gz")
        write_image(label, geometry, folder / "labelsTr" / f"an{i}.nii.gz")
    write_dataset_json(folder, ("MRI",), {"background": 0, "disc": 1}, 6, ".nii.gz")
    return folder


def test_slice_wise_prediction_keeps_an_oblique_anisotropic_geometry(tmp_path, monkeypatch, one_thread):
    from versemi.cli import predict_main, train_main
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    raw = tmp_path / "raw"
    _anisotropic_dataset(raw)
    monkeypatch.setenv("VERSEMI_PLANS", str(tmp_path / "plans"))
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    plan_and_preprocess(ExperimentRequest(["Aniso"], raw, tmp_path / "plans", num_processes=1, show_progress=False,
                                          configurations=["2d"]))
    assert train_main(["2d", "all", "-tr", "SupervisedTrainer", *TINY_2D]) == 0
    # another case's grid: other slice thickness, pixel size, origin and an oblique direction
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Aniso" / "imagesTr" / "an0_0000.nii.gz")))
    source = tmp_path / "in" / "case_0000.nii.gz"
    write_image(array[:5, 3:, 1:], Geometry((0.7, 0.9, 3.3), (-12.5, 30.25, 7.0), OBLIQUE), source)
    assert predict_main(["-i", str(source.parent), "-o", str(tmp_path / "out"), "-e", "Aniso", "-c", "2d", "-tr", "SupervisedTrainer",
                         "-f", "all", "--quiet"]) == 0
    written, given = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz")), sitk.ReadImage(str(source))
    assert written.GetSize() == given.GetSize() == (31, 29, 5)
    assert np.allclose(written.GetSpacing(), given.GetSpacing()) and np.allclose(written.GetOrigin(), given.GetOrigin())
    assert np.allclose(written.GetDirection(), given.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}


def _native_2d_dataset(root: Path, ending: str) -> Path:
    """Single images (one-slice NIfTI or PNG) of a bright ellipse, 0.25 mm pixels for NIfTI."""
    folder = root / "Heads"
    spacing = (0.25, 0.25, 1.0) if ending == ".nii.gz" else (1.0, 1.0, 1.0)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:48, :64]
    for i in range(8):
        label = ((((yy - 24) / (12 + i)) ** 2 + ((xx - 30 - i) / 20) ** 2) < 1).astype(np.uint8)[None]
        image = np.clip(rng.normal(60, 15, label.shape) + 120 * label, 0, 255)
        image = image.astype(np.uint8) if ending == ".png" else image.astype(np.float32)
        write_image(image, geometry, folder / "imagesTr" / f"head{i}_0000{ending}")
        write_image(label, geometry, folder / "labelsTr" / f"head{i}{ending}")
    write_dataset_json(folder, ("US",), {"background": 0, "head": 1}, 8, ending)
    return folder


def trained_native_2d_model(tmp_path: Path, monkeypatch) -> Path:
    """The NIfTI ``Heads`` dataset planned and trained (SupervisedTrainer, 2d, fold all) long enough
    with Adam to draw real boundaries, so that agreement between two paths is a real test; returns
    the raw dataset folder."""
    from versemi.cli import train_main
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    raw = tmp_path / "raw"
    folder = _native_2d_dataset(raw, ".nii.gz")
    monkeypatch.setenv("VERSEMI_PLANS", str(tmp_path / "plans"))
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    plan_and_preprocess(ExperimentRequest(["Heads"], raw, tmp_path / "plans", num_processes=1, show_progress=False))
    assert train_main(["2d", "all", "-tr", "SupervisedTrainer", *TINY_2D, "--optimizer", "adam", "--lr", "0.01",
                       "--iterations-per-epoch", "40"]) == 0
    return folder


@pytest.mark.parametrize("ending", [".nii.gz", ".png"])
def test_a_native_2d_dataset_end_to_end(ending, tmp_path, monkeypatch, one_thread):
    from versemi.cli import evaluate_main, predict_main, train_main
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    raw = tmp_path / "raw"
    folder = _native_2d_dataset(raw, ending)
    monkeypatch.setenv("VERSEMI_PLANS", str(tmp_path / "plans"))
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    summary = plan_and_preprocess(ExperimentRequest(["Heads"], raw, tmp_path / "plans", num_processes=1,
                                                    show_progress=False))
    plans = _plans(tmp_path / "plans", "Heads")
    # single images get no 3d network, and the default cache is the 2d one
    assert list(plans["configurations"]) == ["2d"] and [Path(c["folder"]).name for c in summary["caches"]] == ["2d"]
    assert plans["configurations"]["2d"]["patch_size"][0] == 1
    expected = [None, 0.25, 0.25] if ending == ".nii.gz" else [None, 1.0, 1.0]
    assert plans["configurations"]["2d"]["target_spacing"]["Heads"] == expected
    assert train_main(["3d_fullres", "all", "-tr", "SupervisedTrainer", *TINY_2D]) != 0  # not planned: refused
    assert train_main(["2d", "all", "-tr", "SupervisedTrainer", *TINY_2D]) == 0
    assert predict_main(["-i", str(folder / "imagesTr"), "-o", str(tmp_path / "out"), "-e", "Heads", "-c", "2d", "-tr", "SupervisedTrainer",
                         "-f", "all", "--quiet"]) == 0
    for case in range(8):
        written = sitk.ReadImage(str(tmp_path / "out" / f"head{case}{ending}"))
        given = sitk.ReadImage(str(folder / "labelsTr" / f"head{case}{ending}"))
        assert written.GetSize() == given.GetSize()
        assert np.allclose(written.GetSpacing(), given.GetSpacing())
    assert evaluate_main(["-r", str(folder / "labelsTr"), "-p", str(tmp_path / "out")]) == 0
    scores = json.loads((tmp_path / "out" / "summary" / "summary.json").read_text(encoding="utf-8"))
    assert len(scores["cases"]) == 8
    # overlays of single images: the image itself, not coronal and sagittal lines through it
    pictures = sorted((tmp_path / "out" / "summary" / "overlays").glob("*.png"))
    assert pictures
    height, width = sitk.ReadImage(str(pictures[0])).GetSize()[::-1][:2]
    assert width < 1.5 * height


def test_a_2d_bundle_matches_versemi_predict(tmp_path, monkeypatch, one_thread):
    import nibabel as nib

    from versemi.cli import export_bundle_main, predict_main

    folder = trained_native_2d_model(tmp_path, monkeypatch)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in (0, 5):
        (inputs / f"head{case}_0000.nii.gz").write_bytes((folder / "imagesTr" / f"head{case}_0000.nii.gz").read_bytes())
    assert predict_main(["-i", str(inputs), "-o", str(tmp_path / "versemi"), "-e", "Heads", "-c", "2d", "-tr",
                         "SupervisedTrainer", "-f", "all", "--precision", "fp32", "--quiet"]) == 0
    bundle = tmp_path / "bundle"
    assert export_bundle_main(["-e", "Heads", "-c", "2d", "-tr", "SupervisedTrainer", "-f", "all", "-o",
                               str(bundle)]) == 0
    card = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "mirroring over 2 axes (slice by slice: a 2d model)" in card
    from test_bundle import _run_in_process

    _run_in_process(bundle, inputs, tmp_path / "bundle_out")
    for case in (0, 5):
        ours = nib.load(str(tmp_path / "versemi" / f"head{case}.nii.gz"))
        theirs = nib.load(str(tmp_path / "bundle_out" / f"head{case}.nii.gz"))
        a, b = np.asarray(ours.dataobj).astype(bool), np.asarray(theirs.dataobj).astype(bool)
        assert a.reshape(b.shape).any() and not a.all()
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-5)
        assert 2 * (a.reshape(b.shape) & b).sum() / (a.sum() + b.sum()) >= 0.999
