"""OpenVINO prediction (``versemi_predict --backend``): every case of the demo pair agrees with
fp32 torch, the converted model is cached by checkpoint digest and rebuilt when stale, a model that
disagrees is refused (or auto falls back to torch), nothing half-converted is left behind, and a
joint model whose datasets have patches of their own gets one converted model per window shape, and
a 2d model (windows one slice deep) converts and agrees."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from versemi.cli import predict_main
from versemi.datasets.io import read_image
from versemi.errors import InputError
from versemi.inference import load_models
from versemi.inference import cpu_runtime
from versemi.inference.cpu_runtime import ConvertedByPatch, ConvertedNetwork, cache_entry, use_backend
from versemi.inference.predictor import predict_case_prompts
from versemi.model.plans_view import PlansView
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.plans.planner import PlanSettings

from conftest import TOY_EXPERIMENT, fit_fixed_batch, make_trainer, supervised_toy_model

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'versemi[openvino]')")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.openvino]


@pytest.fixture(scope="module")
def trained(one_thread, toy_raw_master, tmp_path_factory):
    with supervised_toy_model(toy_raw_master, tmp_path_factory.mktemp("cpu_runtime")) as model:
        yield model


def _predict(folder: Path, out: Path, backend: str, prompt: str, *extra: str) -> list[Path]:
    assert predict_main(["-e", TOY_EXPERIMENT, "-tr", "SupervisedTrainer", "-f", "0", "-i", str(folder), "-o", str(out),
                         "-p", prompt, "--device", "cpu", "--precision", "fp32", "--backend", backend, "--quiet",
                         *extra]) == 0
    return sorted(out.glob("*.nii.gz"))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_every_demo_case_agrees_with_fp32_torch(trained, tmp_path):
    """Dice >= 0.999 per case and structure, for each dataset's prompt and for the label map of all
    (a structure of under 100 voxels, where one voxel is more than 0.1 %, may differ by one voxel)."""
    largest = 0
    for dataset in ("DemoLA", "DemoPancreas"):
        folder = trained.raw / dataset / "imagesTs"
        for prompt in (dataset, "all"):
            torch_files = _predict(folder, tmp_path / f"torch_{dataset}_{prompt}", "torch", prompt)
            openvino_files = _predict(folder, tmp_path / f"openvino_{dataset}_{prompt}", "openvino", prompt)
            assert torch_files and [p.name for p in torch_files] == [p.name for p in openvino_files]
            for reference, candidate in zip(torch_files, openvino_files):
                expected, got = read_image([reference])[0][0], read_image([candidate])[0][0]
                values = [v for v in np.unique(expected) if v != 0]
                assert values, f"{reference.name}: torch finds no structure, agreement would mean nothing"
                for value in values:
                    size = int((expected == value).sum())
                    largest = max(largest, size)
                    if size >= 100:
                        assert _dice(expected == value, got == value) >= 0.999, (dataset, prompt, reference.name, value)
                    else:
                        assert int(((expected == value) != (got == value)).sum()) <= 1, (dataset, prompt, reference.name)
    assert largest > 1000, "no structure large enough for the Dice to test agreement"


def test_the_converted_model_is_cached_by_digest_and_rebuilt_when_stale(trained, tmp_path, monkeypatch):
    ensemble = load_models(trained.checkpoint)
    ensemble.precision = "fp32"
    line = use_backend(ensemble, "openvino")
    assert line.startswith("backend openvino") and isinstance(ensemble.models[0].network, ConvertedNetwork)
    entry = cache_entry(load_models(trained.checkpoint).models[0], "f32")
    assert entry.model_file.is_file() and entry.record_file.is_file()
    assert entry.digest in entry.folder.name and str(ensemble.models[0].network.folder) == str(entry.folder)

    # a second use reads the cache: converting again would fail here
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = load_models(trained.checkpoint)
    again.precision = "fp32"
    use_backend(again, "openvino")
    monkeypatch.undo()

    # the same checkpoint changed (trained further): a new digest, the old entry removed, never used
    changed = tmp_path / "fold_0" / "checkpoint_final.pth"
    changed.parent.mkdir()
    state = torch.load(trained.checkpoint, map_location="cpu", weights_only=False)
    torch.save(state, changed)
    stale = cache_entry(load_models(changed).models[0], "f32", digest="0" * 16)
    stale.folder.mkdir(parents=True)
    (stale.folder / "model.xml").write_text("not a model")
    (stale.folder / "agreement.json").write_text("{}")
    for key, value in state["network"].items():
        if value.is_floating_point():
            value.add_(0.01)
            break
    torch.save(state, changed)
    fresh = load_models(changed)
    fresh.precision = "fp32"
    use_backend(fresh, "openvino")
    assert not stale.folder.exists()
    assert [p.name for p in (changed.parent / "checkpoint_final.pth.openvino").iterdir()] == \
        [fresh.models[0].network.folder.name]


def test_a_model_that_disagrees_is_refused_and_auto_falls_back_to_torch(trained, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "MAX_DISAGREEMENT", -1.0)  # no model can pass
    monkeypatch.setattr(cpu_runtime, "cache_entry", _private_cache(cpu_runtime.cache_entry))
    ensemble = load_models(trained.checkpoint)
    ensemble.precision = "fp32"
    with pytest.raises(InputError) as caught:
        use_backend(ensemble, "openvino")
    assert "disagrees with the torch network" in str(caught.value) and "--backend torch" in str(caught.value)
    line = use_backend(ensemble, "auto")
    assert line.startswith("backend torch (auto: the OpenVINO model") and isinstance(ensemble.models[0].network,
                                                                                   torch.nn.Module)


def _private_cache(original):
    """cache_entry under a precision name of its own, so this test's failed record stays apart."""
    return lambda model, precision, digest=None, patch_size=None: original(model, precision + "-test", digest,
                                                                           patch_size)


def test_auto_uses_openvino_on_a_cpu_and_torch_without_it(trained, monkeypatch):
    ensemble = load_models(trained.checkpoint)
    ensemble.precision = "fp32"
    assert use_backend(ensemble, "auto").startswith("backend openvino")
    monkeypatch.setattr(cpu_runtime, "openvino_version", lambda: None)
    plain = load_models(trained.checkpoint)
    assert "OpenVINO is not installed" in use_backend(plain, "auto")
    with pytest.raises(InputError, match="pip install"):
        use_backend(plain, "openvino")


def test_an_interrupted_conversion_leaves_nothing(trained, monkeypatch, tmp_path):
    copy = tmp_path / "checkpoint_final.pth"
    copy.write_bytes(trained.checkpoint.read_bytes())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(openvino, "save_model", full_disk)
    ensemble = load_models(copy)
    ensemble.precision = "fp32"
    with pytest.raises(OSError):
        use_backend(ensemble, "openvino")
    cache = tmp_path / "checkpoint_final.pth.openvino"
    assert not cache.exists() or not any(cache.iterdir())


def test_the_backend_default_comes_from_the_environment(monkeypatch, trained, tmp_path, capsys):
    monkeypatch.setenv("VERSEMI_PREDICT_BACKEND", "tensorrt")
    code = predict_main(["-e", TOY_EXPERIMENT, "-tr", "SupervisedTrainer", "-f", "0", "-i",
                         str(trained.raw / "DemoLA" / "imagesTs"), "-o", str(tmp_path / "out"), "-p", "DemoLA"])
    assert code != 0 and "VERSEMI_PREDICT_BACKEND" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_with_patches_per_dataset_converts_each_window_shape(toy_raw_master, tmp_path):
    plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw_master, tmp_path / "plans",
                                          num_processes=1, show_progress=False,
                                          settings=PlanSettings(patch_per_dataset=True)))
    trainer = make_trainer("SupervisedTrainer", tmp_path / "plans", tmp_path, patch_size=None, features=[4, 8, 16])
    fit_fixed_batch(trainer, 20)  # boundaries to agree on
    trainer.save("final")
    own = trainer.effective.dataset_patch_sizes
    assert own and len({tuple(p) for p in own.values()}) == 2
    reference, ensemble = (load_models([trainer.checkpoint_path("final")]) for _ in range(2))
    for models in (reference, ensemble):
        models.precision = "fp32"
    assert "3 window shapes" in use_backend(ensemble, "openvino")
    converted = ensemble.models[0].network
    assert isinstance(converted, ConvertedByPatch)
    assert set(converted.by_patch) == {tuple(trainer.patch_size), *(tuple(p) for p in own.values())}
    prompts = PlansView(ensemble.plans).real_prompts
    for dataset in ("DemoLA", "DemoPancreas"):
        case = sorted((toy_raw_master / dataset / "imagesTs").glob("*_0000.nii.gz"))[0]
        expected = predict_case_prompts(reference, [case], prompts, mirroring=False, keep_probabilities=True)
        got = predict_case_prompts(ensemble, [case], prompts, mirroring=False, keep_probabilities=True)
        assert np.abs(expected.probabilities - got.probabilities).max() < 1e-3, dataset


def test_a_2d_model_converts_and_agrees_with_torch(tmp_path, monkeypatch):
    """A 2d model's windows are one slice deep: the conversion and its agreement check take them,
    and ``--backend openvino`` writes the masks torch writes."""
    from test_2d import trained_native_2d_model

    folder = trained_native_2d_model(tmp_path, monkeypatch)
    masks = {}
    for backend in ("torch", "openvino"):
        assert predict_main(["-i", str(folder / "imagesTr"), "-o", str(tmp_path / backend), "-e", "Heads", "-c", "2d",
                             "-tr", "SupervisedTrainer", "-f", "all", "--precision", "fp32", "--backend", backend,
                             "--quiet"]) == 0
        masks[backend] = [read_image([p])[0][0] == 1 for p in sorted((tmp_path / backend).glob("*.nii.gz"))]
    assert len(masks["torch"]) == 8
    for expected, got in zip(masks["torch"], masks["openvino"]):
        assert expected.sum() > 100, "torch finds no head: agreement would mean nothing"
        assert _dice(expected, got) >= 0.999
    records = list((tmp_path / "results").rglob("agreement.json"))
    assert records and all(json.loads(r.read_text(encoding="utf-8"))["patch_size"][0] == 1 for r in records)
