"""Structures declared absent from a dataset's images (``known_absent``): the declaration (dataset.json
or ``--known-absent``), its place in the plan, the exclusion loss it adds to training, and prediction
that leaves those structures out (``--from-dataset``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import (TINY_TRAINING, TOY_EXPERIMENT, claims_of_absent_structures, fit_fixed_batch, make_trainer,
                      toy_experiment)
from versemi.cli import plan_and_preprocess_main, predict_main
from versemi.errors import InputError
from versemi.plans import known_absent
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.training.losses import exclusion_loss

LABELS = {"LA": {"background": 0, "left_atrium": 1},
          "Hippocampus": {"background": 0, "Anterior": 1, "Posterior": 2}}


# ---------------------------------------------------------------- the declaration


def test_a_dataset_name_declares_all_its_structures_and_a_label_one():
    resolved = known_absent.resolve(LABELS, {"LA": ["Hippocampus"], "Hippocampus": ["LA/left_atrium"]})
    assert resolved == {"LA": ["Hippocampus/Anterior", "Hippocampus/Posterior"], "Hippocampus": ["LA/left_atrium"]}
    assert known_absent.resolve(LABELS, {"LA": ["Hippocampus/Posterior"], "Hippocampus": None}) == {
        "LA": ["Hippocampus/Posterior"]}


def test_without_a_declaration_nothing_is_absent():
    assert known_absent.resolve(LABELS, {"LA": None, "Hippocampus": None}) == {}


def test_the_command_line_replaces_dataset_json_and_all_declares_every_other_dataset():
    from_json = {"LA": ["Hippocampus/Anterior"], "Hippocampus": None}
    assert known_absent.resolve(LABELS, from_json, known_absent.parse_cli(["LA=Hippocampus"])) == {
        "LA": ["Hippocampus/Anterior", "Hippocampus/Posterior"]}
    assert known_absent.resolve(LABELS, from_json, known_absent.parse_cli(["LA="])) == {}
    assert known_absent.resolve(LABELS, from_json, known_absent.parse_cli(["all"])) == {
        "LA": ["Hippocampus/Anterior", "Hippocampus/Posterior"], "Hippocampus": ["LA/left_atrium"]}


@pytest.mark.parametrize("entry, message", [
    (["Hipocampus"], "names dataset 'Hipocampus', which is not planned here"),
    (["Hippocampus/Middle"], "Hippocampus has no label 'Middle'"),
    (["LA"], "names the dataset's own structures"),
    ("Hippocampus", "must be a list"),
])
def test_a_wrong_dataset_json_entry_is_refused_with_the_file_named(entry, message):
    with pytest.raises(InputError) as caught:
        known_absent.resolve(LABELS, {"LA": entry, "Hippocampus": None})
    text = str(caught.value)
    assert message in text and "LA/dataset.json" in text


def test_the_command_line_naming_an_unplanned_dataset_is_refused():
    with pytest.raises(InputError, match="dataset 'Pancreas' is not planned here"):
        known_absent.resolve(LABELS, {"LA": None, "Hippocampus": None}, known_absent.parse_cli(["Pancreas=LA"]))
    with pytest.raises(InputError, match="expected NAME=OTHER"):
        known_absent.parse_cli(["LA"])


def _declare(raw: Path, dataset: str, entry) -> None:
    path = raw / dataset / "dataset.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["known_absent"] = entry
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def test_the_declaration_is_stored_in_the_plan(toy_raw, tmp_path):
    _declare(toy_raw, "DemoLA", ["DemoPancreas"])
    summary = plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw, tmp_path / "plans",
                                                    num_processes=1, show_progress=False), preprocess=False)
    plans = json.loads(Path(summary["plans"]).read_text(encoding="utf-8"))
    assert plans["datasets"]["DemoLA"]["known_absent"] == ["DemoPancreas/pancreas"]
    assert "known_absent" not in plans["datasets"]["DemoPancreas"]  # nothing declared: unknown, as before
    # the command line replaces it, and "all" declares both ways
    assert plan_and_preprocess_main(["--raw", str(toy_raw), "--plans-root", str(tmp_path / "plans2"), "-d", "DemoLA",
                                     "DemoPancreas", "--known-absent", "all", "--no-preprocess", "--quiet",
                                     "-np", "1"]) == 0
    plans = json.loads((tmp_path / "plans2" / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    assert plans["datasets"]["DemoPancreas"]["known_absent"] == ["DemoLA/left_atrium"]
    assert plans["datasets"]["DemoLA"]["known_absent"] == ["DemoPancreas/pancreas"]


def test_an_unknown_dataset_in_dataset_json_is_refused_before_anything_is_written(toy_raw, tmp_path, capsys):
    _declare(toy_raw, "DemoLA", ["Pancreas"])
    code = plan_and_preprocess_main(["--raw", str(toy_raw), "--plans-root", str(tmp_path / "plans"), "-d", "DemoLA",
                                     "DemoPancreas", "--quiet", "-np", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert "DemoLA/dataset.json" in err and "'Pancreas', which is not planned here" in err
    assert not (tmp_path / "plans").exists()


# ---------------------------------------------------------------- the loss


def test_the_exclusion_loss_is_zero_for_nothing_claimed_and_grows_with_the_claim():
    logits = torch.zeros(2, 3, 2, 4, 4, 4)
    logits[:, :, 1] = -12.0  # nothing claimed anywhere
    absent = torch.tensor([[0, 1, 0], [1, 0, 0]])
    assert float(exclusion_loss(logits, absent)) < 1e-4
    claimed = logits.clone()
    claimed[0, 1, 1, :2] = 12.0  # half of sample 0's image claimed by a structure absent there
    half = float(exclusion_loss(claimed, absent))
    claimed[0, 1, 1] = 12.0
    assert float(exclusion_loss(claimed, absent)) > half > 1.0
    # a claim by a prompt that is not absent there costs nothing; nor one outside the region
    present = logits.clone()
    present[0, 0, 1] = 12.0
    assert float(exclusion_loss(present, absent)) < 1e-4
    region = torch.zeros(2, 1, 4, 4, 4)
    region[:, :, 2:] = 1  # only the half the claim leaves
    assert float(exclusion_loss(torch.where(torch.arange(4).view(1, 1, 1, 4, 1, 1) < 2, claimed, logits),
                                absent, region)) < 1e-4


def _plans_with(planned: Path, declared: dict) -> dict:
    plans = json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    for name, absent in declared.items():
        plans["datasets"][name]["known_absent"] = absent
    return plans


BOTH_WAYS = {"DemoLA": ["DemoPancreas/pancreas"], "DemoPancreas": ["DemoLA/left_atrium"]}


@pytest.mark.parametrize("name", ["SupervisedTrainer", "VerSemiTrainer", "MutualLearningTrainer"])
def test_a_declaration_adds_the_loss_and_teaches_the_absence(name, planned, tmp_path, one_thread):
    torch.manual_seed(0)
    plain = make_trainer(name, planned, tmp_path / "plain")
    torch.manual_seed(0)
    # the declaration added to a plan whose cache holds no other views: the own view only
    declared = make_trainer(name, planned, tmp_path / "declared", plans=_plans_with(planned, BOTH_WAYS),
                            absent_views=False)
    assert not plain.declares_absence and declared.declares_absence
    batch = declared.labeled_source[0]
    before = claims_of_absent_structures(declared, batch, declared)
    assert before == pytest.approx(claims_of_absent_structures(plain, batch, declared))  # same start
    _, plain_terms = fit_fixed_batch(plain, 12)
    _, terms = fit_fixed_batch(declared, 12)
    assert "known_absent" not in plain_terms and float(terms["known_absent"].detach()) > 0
    # the declared run learns "nothing here" for the absent prompts; the plain one leaves them unknown
    # (MutualLearning's own exclusion only where the image's labels hold)
    after = claims_of_absent_structures(declared, batch, declared)
    assert after < 0.5 * before
    assert after < claims_of_absent_structures(plain, batch, declared)


def test_the_absences_ramp_up_over_the_first_iterations_of_a_run_from_scratch(planned, tmp_path):
    from versemi.training.trainer import KNOWN_ABSENT_RAMP_ITERATIONS

    trainer = make_trainer("SupervisedTrainer", planned, tmp_path, plans=_plans_with(planned, BOTH_WAYS),
                           absent_views=False)
    batch = trainer.labeled_source[0]

    def absent_term(iteration):
        trainer.current_iteration = iteration
        torch.manual_seed(0)
        return float(trainer.train_step(batch, None)["known_absent"].detach())

    full = absent_term(None)  # outside the loop: full weight
    assert full > 0
    assert absent_term(0) == pytest.approx(0.0067 * full, rel=0.05)
    assert absent_term(KNOWN_ABSENT_RAMP_ITERATIONS // 2) == pytest.approx(math.exp(-1.25) * full, rel=1e-3)
    assert absent_term(KNOWN_ABSENT_RAMP_ITERATIONS) == pytest.approx(full, rel=1e-6)
    trainer.warm_start = {"path": "a trained model"}  # a warm start has learnt its prompts already
    assert absent_term(0) == pytest.approx(full, rel=1e-6)


def test_one_sided_declaration_leaves_the_other_dataset_unknown(planned, tmp_path):
    trainer = make_trainer("SupervisedTrainer", planned, tmp_path,
                           plans=_plans_with(planned, {"DemoLA": ["DemoPancreas/pancreas"]}), absent_views=False)
    prompts = {p["dataset"]: p["index"] for p in trainer.plans["prompts"] if p["dataset"]}
    datasets = trainer.plans["dataset_names"]
    absent = trainer.absent_prompts(torch.tensor([datasets.index("DemoLA"), datasets.index("DemoPancreas")]))
    assert absent[0].tolist() == [float(i == prompts["DemoPancreas"]) for i in range(trainer.num_prompts)]
    assert not absent[1].any()


# ---------------------------------------------------------------- prediction


def test_prediction_from_a_dataset_leaves_its_absent_structures_out(toy_raw, tmp_path, capsys, one_thread):
    for name, absent in (("DemoLA", ["DemoPancreas"]), ("DemoPancreas", ["DemoLA"])):
        _declare(toy_raw, name, absent)
    with toy_experiment(toy_raw, tmp_path, {"0": ["-tr", "SupervisedTrainer"]}) as experiment:
        log = (experiment / "SupervisedTrainer__3d_fullres" / "fold_0" / "training_log.txt").read_text("utf-8")
        assert ("learnt absent in every step, ramped up over the first 200 iterations in the supervised step: "
                "DemoLA: DemoPancreas/pancreas; DemoPancreas: DemoLA/left_atrium" in log)
        images = toy_raw / "DemoLA" / "imagesTs"
        out = tmp_path / "pred"
        assert predict_main(["-i", str(images), "-o", str(out), "-p", "all", "--from-dataset", "DemoLA", "-f", "0",
                             "-tr", "SupervisedTrainer", "--no-mirroring", "--quiet"]) == 0
        assert "not predicted: DemoPancreas/pancreas: DemoLA declares it absent" in capsys.readouterr().out
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.name[:-len('_0000.nii.gz')]}.nii.gz"
                                                              for p in images.iterdir())  # one 0/1 mask each
        # an explicit request for the absent structure is refused, naming both
        code = predict_main(["-i", str(images), "-o", str(tmp_path / "pred2"), "-p", "DemoLA", "DemoPancreas",
                             "--from-dataset", "DemoLA", "-f", "0", "-tr", "SupervisedTrainer", "--quiet"])
        assert code != 0 and "DemoLA declares DemoPancreas/pancreas absent" in capsys.readouterr().err
        assert not (tmp_path / "pred2").exists()
        code = predict_main(["-i", str(images), "-o", str(tmp_path / "pred3"), "--from-dataset", "Pancreas",
                             "-f", "0", "-tr", "SupervisedTrainer", "--quiet"])
        assert code != 0 and "--from-dataset Pancreas" in capsys.readouterr().err


def test_the_label_table_says_what_was_left_out():
    from versemi.inference.label_map import label_table

    la = {"index": 0, "dataset": "LA", "label": "left_atrium", "label_value": 1}
    hippocampus = [{"index": 1, "dataset": "Hippocampus", "label": "Anterior", "label_value": 1},
                   {"index": 2, "dataset": "Hippocampus", "label": "Posterior", "label_value": 2}]
    table = label_table(hippocampus, [(la, "Hippocampus declares it absent from its images (known_absent)")])
    written = table.to_json()
    assert [entry["value"] for entry in written["labels"]] == [1, 2]
    assert written["not_predicted"] == [{"dataset": "LA", "label": "left_atrium", "prompt": 0,
                                         "why": "Hippocampus declares it absent from its images (known_absent)"}]
    assert "not_predicted" not in label_table(hippocampus).to_json()


def test_a_bundle_card_names_the_declared_absences_and_says_it_still_predicts_them():
    from versemi.bundles.export import known_absent_section

    plans = {"dataset_names": ["LA", "Hippocampus"],
             "datasets": {"LA": {"known_absent": ["Hippocampus/Anterior", "Hippocampus/Posterior"]},
                          "Hippocampus": {"known_absent": ["LA/left_atrium"]}}}
    text = known_absent_section(plans)
    assert "| LA | Hippocampus/Anterior, Hippocampus/Posterior |" in text
    assert "| Hippocampus | LA/left_atrium |" in text
    assert "does not leave these structures out" in text and "--from-dataset" in text
    plans["datasets"] = {"LA": {}, "Hippocampus": {}}
    assert known_absent_section(plans) == ""
