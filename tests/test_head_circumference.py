"""The ellipse fit and the head circumference (HC18's measure) on hand-made masks and points."""
from __future__ import annotations

import math

import numpy as np
import pytest

from versemi.cli import evaluate_main
from versemi.datasets.io import Geometry, write_image
from versemi.ellipse import ellipse_circumference, fit_ellipse, head_circumference, outline_points
from versemi.evaluation import evaluate_folders


def ellipse_points(center, a, b, angle, count=40):
    t = np.linspace(0, 2 * math.pi, count, endpoint=False)
    x = center[1] + a * np.cos(t) * math.cos(angle) - b * np.sin(t) * math.sin(angle)
    y = center[0] + a * np.cos(t) * math.sin(angle) + b * np.sin(t) * math.cos(angle)
    return np.stack([y, x], 1)


def filled_ellipse(shape, center, a, b, angle) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dx, dy = xx - center[1], yy - center[0]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def test_points_on_an_ellipse_give_it_back_exactly():
    fitted = fit_ellipse(ellipse_points((7.0, -3.0), 30.0, 12.0, 0.5))
    assert fitted.center == pytest.approx((7.0, -3.0))
    assert fitted.semi_axes == pytest.approx((30.0, 12.0))
    assert fitted.angle == pytest.approx(0.5)


def test_no_ellipse_through_too_few_points_or_a_line():
    assert fit_ellipse(ellipse_points((0, 0), 3, 2, 0, count=5)) is None
    assert fit_ellipse(np.stack([np.arange(10.0), 2 * np.arange(10.0)], 1)) is None


def test_ramanujan_circumference_of_a_circle_and_a_flat_ellipse():
    assert ellipse_circumference(5, 5) == pytest.approx(2 * math.pi * 5)
    assert ellipse_circumference(1, 0) == pytest.approx(4.0, rel=5e-4)  # a segment walked there and back


def test_the_outline_lies_on_the_pixel_edges():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True  # a 2 x 3 block
    points = outline_points(mask, (2.0, 1.0))
    assert len(points) == 2 * (2 + 3)
    assert points[:, 0].min() == pytest.approx(2 * 0.5) and points[:, 0].max() == pytest.approx(2 * 2.5)
    assert points[:, 1].min() == pytest.approx(0.5) and points[:, 1].max() == pytest.approx(3.5)


@pytest.mark.parametrize("a, b, angle", [(100, 70, 0.3), (50, 50, 0.0), (120, 60, 2.0)])
def test_a_filled_head_mask_gives_its_circumference_in_mm(a, b, angle):
    mask = filled_ellipse((300, 400), (150, 200), a, b, angle)
    pixel = 0.2  # mm
    assert head_circumference(mask, (pixel, pixel)) == pytest.approx(ellipse_circumference(a * pixel, b * pixel),
                                                                      rel=2e-3)
    assert head_circumference(np.zeros((5, 5), bool)) is None
    with pytest.raises(ValueError, match="2D mask"):
        head_circumference(np.zeros((2, 5, 5), bool))


def test_evaluate_reports_the_circumference_difference(tmp_path, capsys):
    spacing = 0.25
    geometry = Geometry((spacing, spacing, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    reference = filled_ellipse((200, 300), (100, 150), 80, 50, 0.4)
    predicted = filled_ellipse((200, 300), (100, 150), 84, 50, 0.4)  # the major axis 4 pixels too long
    for folder, masks in (("labels", (reference, reference)), ("predictions", (predicted, np.zeros_like(reference)))):
        for i, mask in enumerate(masks):
            write_image(mask[None].astype(np.uint8), geometry, tmp_path / folder / f"hc{i}.nii.gz")
    summary = evaluate_folders(tmp_path / "labels", tmp_path / "predictions", head_circumference=True)
    first = summary["cases"][0]["head_circumference"]["1"]
    expected = ellipse_circumference(84 * spacing, 50 * spacing) - ellipse_circumference(80 * spacing, 50 * spacing)
    assert first["abs_difference"] == pytest.approx(expected, rel=0.05)
    assert first["reference"] == pytest.approx(ellipse_circumference(80 * spacing, 50 * spacing), rel=2e-3)
    # no head found: a circumference of 0, off by the whole reference, never left out of the mean
    assert summary["cases"][1]["head_circumference"]["1"] == {"predicted": None, "reference": first["reference"],
                                                              "abs_difference": first["reference"]}
    figures = summary["head_circumference"]["1"]
    assert figures["missed"] == 1 and figures["undefined"] == 0
    assert figures["mean_abs_difference"] == pytest.approx((first["abs_difference"] + first["reference"]) / 2)
    assert evaluate_main(["-r", str(tmp_path / "labels"), "-p", str(tmp_path / "predictions"), "--no-overlays",
                          "--head-circumference", "-o", str(tmp_path / "summary")]) == 0
    out = capsys.readouterr().out
    assert "head circumference |predicted - reference|" in out and "1 with no head found" in out
    assert "head_circumference" not in evaluate_folders(tmp_path / "labels", tmp_path / "predictions", write=False)


def test_a_volume_is_refused_with_the_file_named(tmp_path, capsys):
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = np.zeros((3, 20, 20), np.uint8)
    volume[:, 5:15, 5:15] = 1
    for folder in ("labels", "predictions"):
        write_image(volume, geometry, tmp_path / folder / "vol.nii.gz")
    code = evaluate_main(["-r", str(tmp_path / "labels"), "-p", str(tmp_path / "predictions"), "--no-overlays",
                          "--head-circumference"])
    err = capsys.readouterr().err
    assert code != 0 and "vol.nii.gz" in err and "holds 3 slices" in err
    assert not (tmp_path / "predictions" / "summary").exists()
