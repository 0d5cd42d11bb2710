"""Real HC18 fetal head ultrasound images through the hc18 converter, the integrity check and the
subject-grouped cross-validation folds.

The images are read from ``../shared/data/hc18`` beside the checkout, or from
``$VERSEMI_TEST_DATA/hc18``; the tests skip where the folder is absent. The images: subject 017
has two (``017_HC``, ``017_2HC``), 071 has the smallest head of the 300, 327 the largest, and
188 is one of the few images that are not 540 x 800 pixels.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from versemi.cli import convert_main, plan_and_preprocess_main
from versemi.datasets.converters import convert_hc18
from versemi.datasets.converters.hc18 import CSV_NAME, IMAGE_FOLDER
from versemi.errors import InputError
from versemi.plans.planner import NUM_FOLDS, SPLIT_SEED, cross_validation_splits

DATA = Path(os.environ.get("VERSEMI_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
HC18 = DATA / "hc18"
IMAGES = ("017_HC.png", "017_2HC.png", "071_HC.png", "188_HC.png", "327_HC.png")
CASE_IDS = ["hc18_017", "hc18_017_2", "hc18_071", "hc18_188", "hc18_327"]


def annotation_name(image: str) -> str:
    return image[: -len(".png")] + "_Annotation.png"


def csv_rows(folder: Path) -> dict[str, tuple[float, float]]:
    """Image name -> (pixel size, head circumference), in mm."""
    with open(folder / CSV_NAME, newline="", encoding="utf-8") as f:
        return {row[0]: (float(row[1]), float(row[2])) for row in list(csv.reader(f))[1:]}


def png(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def require_hc18() -> None:
    if not (HC18 / CSV_NAME).is_file():
        pytest.skip(f"HC18 data not found: {HC18}; put the HC18 training set (training_set/ and {CSV_NAME}) "
                    "there to run these tests (or set VERSEMI_TEST_DATA to the folder that holds hc18/)")


def make_source(folder: Path, images=IMAGES) -> Path:
    """A copy of the chosen images, their annotations and their csv rows, in the challenge's layout."""
    require_hc18()
    (folder / IMAGE_FOLDER).mkdir(parents=True)
    for name in images:
        for file in (name, annotation_name(name)):
            shutil.copyfile(HC18 / IMAGE_FOLDER / file, folder / IMAGE_FOLDER / file)
    lines = (HC18 / CSV_NAME).read_text(encoding="utf-8").splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",")[0] in images]
    (folder / CSV_NAME).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("hc18") / "hc18")


@pytest.fixture(scope="module")
def raw(source, tmp_path_factory) -> Path:
    """A raw root holding the chosen images converted as the dataset HC18."""
    root = tmp_path_factory.mktemp("raw")
    assert convert_main(["hc18", str(source), "-o", str(root / "HC18"), "--quiet"]) == 0
    return root


def equivalent_ellipse_circumference(mask: np.ndarray, pixel_mm: float) -> float:
    """Circumference (mm) of the ellipse with the mask's second moments (a filled ellipse's variance
    along a semi-axis of length a is a^2 / 4), by Ramanujan's approximation."""
    ys, xs = np.nonzero(mask)
    variances = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
    b, a = 2 * np.sqrt(variances) * pixel_mm
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def test_images_are_the_pngs_in_one_slice_at_the_csv_pixel_size(source, raw):
    rows = csv_rows(source)
    for name, case_id in zip(IMAGES, CASE_IDS):
        converted = sitk.ReadImage(str(raw / "HC18" / "imagesTr" / f"{case_id}_0000.nii.gz"))
        pixels = png(source / IMAGE_FOLDER / name)
        array = sitk.GetArrayFromImage(converted)
        assert array.dtype == np.uint8 and array.shape == (1, *pixels.shape)
        assert np.array_equal(array[0], pixels)
        pixel_mm = rows[name][0]
        np.testing.assert_allclose(converted.GetSpacing(), (pixel_mm, pixel_mm, 1.0), rtol=1e-6)
        assert converted.GetOrigin() == (0.0, 0.0, 0.0)
        assert converted.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert png(source / IMAGE_FOLDER / "188_HC.png").shape != (540, 800)  # the image keeps its own size


def test_labels_reach_the_centre_of_the_outline_and_match_the_csv_head_circumference(source, raw):
    rows = csv_rows(source)
    for name, case_id in zip(IMAGES, CASE_IDS):
        label = sitk.ReadImage(str(raw / "HC18" / "labelsTr" / f"{case_id}.nii.gz"))
        mask = sitk.GetArrayFromImage(label)
        outline = png(source / IMAGE_FOLDER / annotation_name(name)) > 0
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
        mask = mask[0].astype(bool)
        filled = ndimage.binary_fill_holes(outline)
        assert mask[filled & ~outline].all() and not mask[~filled].any(), "the inside is the head, the outside is not"
        inner_half = mask[outline].mean()
        assert 0.2 < inner_half < 0.8, f"{name}: {inner_half:.0%} of the drawn line is head, not its inner half"
        assert mask.sum() > 10 * outline.sum(), "the interior is filled"
        assert ndimage.label(mask)[1] == 1 and np.array_equal(ndimage.binary_fill_holes(mask), mask)
        pixel_mm, circumference = rows[name]
        assert equivalent_ellipse_circumference(mask, pixel_mm) == pytest.approx(circumference, rel=0.03)
        np.testing.assert_allclose(label.GetSpacing(), (pixel_mm, pixel_mm, 1.0), rtol=1e-6)


def test_case_ids_order_and_subject_groups(raw):
    meta = json.loads((raw / "HC18" / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "US"} and meta["labels"] == {"background": 0, "head": 1}
    assert meta["numTraining"] == len(CASE_IDS) and meta["case_order"] == CASE_IDS
    assert meta["case_groups"] == {"hc18_017": "017", "hc18_017_2": "017", "hc18_071": "071", "hc18_188": "188",
                                   "hc18_327": "327"}


def test_the_integrity_check_passes(raw, tmp_path, capsys):
    assert plan_and_preprocess_main(["--raw", str(raw), "--plans-root", str(tmp_path / "plans"), "-d", "HC18",
                                     "--verify-only", "--quiet", "-np", "1"]) == 0
    assert "HC18: no problems found" in capsys.readouterr().out
    assert not (tmp_path / "plans").exists()


@pytest.mark.parametrize("case_groups, problem", [
    ({"hc18_017": "017", "hc18_17_2": "017"}, "case_groups names cases without images: ['hc18_17_2']"),
    ({"hc18_017": 17}, "case_groups is not an object mapping case ids to group names"),
    (["017", "017"], "case_groups is not an object mapping case ids to group names"),
])
def test_the_integrity_check_refuses_bad_case_groups(raw, tmp_path, capsys, case_groups, problem):
    damaged = tmp_path / "raw"
    shutil.copytree(raw, damaged)
    meta_path = damaged / "HC18" / "dataset.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["case_groups"] = case_groups
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    assert plan_and_preprocess_main(["--raw", str(damaged), "--plans-root", str(tmp_path / "plans"), "-d", "HC18",
                                     "--verify-only", "--quiet", "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{meta_path}: {problem}" in err and "fix: " in err


def test_the_plan_keeps_a_subjects_images_in_one_fold(raw, tmp_path):
    def plan(raw_root: Path, plans_root: Path) -> dict:
        assert plan_and_preprocess_main(["--raw", str(raw_root), "--plans-root", str(plans_root), "-d", "HC18",
                                         "--no-preprocess", "--quiet", "-np", "1"]) == 0
        return json.loads((plans_root / "HC18" / "plans.json").read_text(encoding="utf-8"))

    plans = plan(raw, tmp_path / "plans")
    groups = json.loads((raw / "HC18" / "dataset.json").read_text(encoding="utf-8"))["case_groups"]
    assert plans["datasets"]["HC18"]["case_groups"] == groups
    folds = plans["splits"]["folds"]
    assert sorted(k for fold in folds for k in fold["val"]) == [f"HC18/{c}" for c in CASE_IDS]
    subject_017 = [("HC18/hc18_017" in fold["val"], "HC18/hc18_017_2" in fold["val"]) for fold in folds]
    assert sorted(subject_017) == [(False, False)] * (NUM_FOLDS - 1) + [(True, True)]

    ungrouped = tmp_path / "ungrouped"
    shutil.copytree(raw, ungrouped)
    meta_path = ungrouped / "HC18" / "dataset.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["case_groups"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    assert "case_groups" not in plan(ungrouped, tmp_path / "ungrouped_plans")["datasets"]["HC18"]


def test_a_coarse_spacing_scale_keeps_each_image_one_slice(raw, tmp_path):
    """--spacing-scale scales the slice spacing of single images too; their resampled median shape
    keeps one slice (as the preprocessing does), so the 2d batch is not capped by an empty dataset."""
    assert plan_and_preprocess_main(["--raw", str(raw), "--plans-root", str(tmp_path / "plans"), "-d", "HC18",
                                     "-c", "2d", "--spacing-scale", "4", "--no-preprocess", "--quiet",
                                     "-np", "1"]) == 0
    plans = json.loads((tmp_path / "plans" / "HC18" / "plans.json").read_text(encoding="utf-8"))
    shape = plans["datasets"]["HC18"]["median_shape_after_resampling"]
    assert shape[0] == 1 and 100 < shape[1] < 200 and 150 < shape[2] < 300


def test_selected_ids_from_the_full_training_set(tmp_path):
    require_hc18()
    out = convert_hc18(HC18, tmp_path / "HC18", ids=["hc18_017_2", "hc18_017"], show_progress=False)
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["case_order"] == ["hc18_017", "hc18_017_2"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["hc18_017_0000.nii.gz", "hc18_017_2_0000.nii.gz"]
    with pytest.raises(InputError, match=re.escape(str(HC18 / CSV_NAME)) + ".*hc18_999"):
        convert_hc18(HC18, tmp_path / "other", ids=["hc18_999"], show_progress=False)
    assert not (tmp_path / "other").exists()


def test_test_ids_hold_whole_subjects_out_with_their_labels(source, tmp_path, capsys):
    from versemi.datasets.layout import load_dataset

    out = convert_hc18(source, tmp_path / "raw" / "HC18", test_ids=["hc18_017_2", "hc18_017"], show_progress=False)
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 3 and meta["case_order"] == ["hc18_071", "hc18_188", "hc18_327"]
    assert meta["case_groups"] == {"hc18_071": "071", "hc18_188": "188", "hc18_327": "327"}
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["hc18_017_0000.nii.gz", "hc18_017_2_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["hc18_017.nii.gz", "hc18_017_2.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["hc18_071.nii.gz", "hc18_188.nii.gz",
                                                                     "hc18_327.nii.gz"]
    dataset = load_dataset(out)
    assert sorted(c.case_id for c in dataset.test_cases()) == ["hc18_017", "hc18_017_2"]
    held_out = sitk.ReadImage(str(out / "labelsTs" / "hc18_017_2.nii.gz"))
    pixel_mm = csv_rows(source)["017_2HC.png"][0]
    np.testing.assert_allclose(held_out.GetSpacing(), (pixel_mm, pixel_mm, 1.0), rtol=1e-6)
    assert sitk.GetArrayFromImage(held_out).max() == 1
    assert plan_and_preprocess_main(["--raw", str(out.parent), "--plans-root", str(tmp_path / "plans"), "-d", "HC18",
                                     "--verify-only", "--quiet", "-np", "1"]) == 0
    assert "HC18: no problems found" in capsys.readouterr().out


@pytest.mark.parametrize("test_ids, problem", [
    (["hc18_017"], "subject(s) ['017'] would have images in both the training and the test cases"),
    (["hc18_999"], "gives no converted case for the test id(s) ['hc18_999']"),
])
def test_test_ids_that_split_a_subject_or_name_no_case_are_refused(source, tmp_path, test_ids, problem):
    output = tmp_path / "raw" / "HC18"
    with pytest.raises(InputError, match=re.escape(problem)):
        convert_hc18(source, output, test_ids=test_ids, show_progress=False)
    assert not output.exists()


# ---------------------------------------------------------------- damaged copies


def open_the_outline(folder: Path) -> Path:
    """Erase the top of 071's drawn ellipse over 40 columns around its centre: the outline has a gap."""
    path = folder / IMAGE_FOLDER / annotation_name("071_HC.png")
    outline = png(path)
    ys, xs = np.nonzero(outline)
    centre_y, centre_x = int(ys.mean()), int(xs.mean())
    outline[: centre_y, centre_x - 20: centre_x + 20] = 0
    sitk.WriteImage(sitk.GetImageFromArray(outline), str(path))
    return path


def remove_annotation(folder: Path) -> Path:
    path = folder / IMAGE_FOLDER / annotation_name("188_HC.png")
    path.unlink()
    return path


def remove_image(folder: Path) -> Path:
    path = folder / IMAGE_FOLDER / "327_HC.png"
    path.unlink()
    return path


def remove_csv_row(folder: Path) -> Path:
    lines = (folder / CSV_NAME).read_text(encoding="utf-8").splitlines()
    (folder / CSV_NAME).write_text("\n".join(l for l in lines if not l.startswith("017_2HC.png")) + "\n",
                                   encoding="utf-8")
    return folder / IMAGE_FOLDER / "017_2HC.png"


def crop_annotation(folder: Path) -> Path:
    path = folder / IMAGE_FOLDER / annotation_name("017_HC.png")
    sitk.WriteImage(sitk.GetImageFromArray(png(path)[:, :-10]), str(path))
    return path


def zero_pixel_size(folder: Path) -> Path:
    text = (folder / CSV_NAME).read_text(encoding="utf-8")
    (folder / CSV_NAME).write_text(re.sub(r"^(071_HC\.png),[^,]+,", r"\1,0,", text, flags=re.M), encoding="utf-8")
    return folder / CSV_NAME


@pytest.mark.parametrize("damage, problem", [
    (open_the_outline, "outline is open"),
    (remove_annotation, "is missing (the head outline of 188_HC.png)"),
    (remove_image, f"is missing, but line 6 of {CSV_NAME} lists it"),
    (remove_csv_row, f"has no row in {CSV_NAME}"),
    (crop_annotation, "its image 017_HC.png"),
    (zero_pixel_size, "pixel size '0', not a positive number"),
])
def test_a_damaged_source_is_refused_with_the_file_named_and_nothing_written(tmp_path, capsys, damage, problem):
    folder = make_source(tmp_path / "hc18")
    named = damage(folder)
    output = tmp_path / "raw" / "HC18"
    assert convert_main(["hc18", str(folder), "-o", str(output), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 problem found" in err and f"{named}: " in err and problem in err and "fix: " in err
    assert not output.parent.exists() or not list(output.parent.iterdir()), "nothing partial may be left"


# ---------------------------------------------------------------- subject-grouped folds


def test_grouped_cases_share_a_fold_and_folds_stay_balanced():
    # 30 subjects: every third has two images, every fifth three
    cases, groups = [], {}
    for subject in range(30):
        count = 3 if subject % 5 == 0 else 2 if subject % 3 == 0 else 1
        for image in range(count):
            case = f"s{subject:02d}_{image}"
            cases.append(case)
            groups[case] = f"{subject:02d}"
    plan = {"labeled_cases": cases, "unlabeled_cases": ["u1"], "case_groups": groups}
    folds = cross_validation_splits({"D": plan})
    val_fold = {key: f for f, fold in enumerate(folds) for key in fold["val"]}
    assert sorted(val_fold) == sorted(f"D/{c}" for c in cases), "every labeled case validates once"
    for subject in set(groups.values()):
        members = [f"D/{c}" for c, g in groups.items() if g == subject]
        assert len({val_fold[m] for m in members}) == 1
        for f, fold in enumerate(folds):
            assert all(m in fold["train_labeled"] for m in members) or f == val_fold[members[0]]
    subjects_per_fold = [len({groups[k[2:]] for k in fold["val"]}) for fold in folds]
    assert subjects_per_fold == [30 // NUM_FOLDS] * NUM_FOLDS
    assert all(fold["train_unlabeled"] == ["D/u1"] for fold in folds)
    assert folds == cross_validation_splits({"D": plan}), "seeded: the same folds every time"


def test_without_groups_the_folds_deal_cases_round_robin():
    cases = [f"c{i:02d}" for i in range(23)]
    folds = cross_validation_splits({"D": {"labeled_cases": cases, "unlabeled_cases": []}})
    order = np.random.default_rng(SPLIT_SEED).permutation(len(cases))
    for f, fold in enumerate(folds):
        assert fold["val"] == sorted(f"D/{cases[i]}" for p, i in enumerate(order) if p % NUM_FOLDS == f)
    singletons = {"labeled_cases": cases, "unlabeled_cases": [], "case_groups": {c: c for c in cases}}
    assert cross_validation_splits({"D": singletons}) == folds


def test_the_fitted_ellipse_of_a_converted_mask_gives_the_challenge_head_circumference(source, raw):
    """versemi_evaluate's head circumference (an ellipse fitted to the mask's outline) on the real
    masks, against the circumference the challenge lists for each image: the challenge's ellipse
    runs along the centre of the drawn line (the line's outer edge gives 1 to 3 mm more)."""
    from versemi.ellipse import head_circumference

    rows = csv_rows(source)
    for name, case_id in zip(IMAGES, CASE_IDS):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "HC18" / "labelsTr" / f"{case_id}.nii.gz")))[0]
        pixel_mm, circumference = rows[name]
        assert head_circumference(mask > 0, (pixel_mm, pixel_mm)) == pytest.approx(circumference, abs=0.1)
