"""Breast mask, chest-wall side and the bilateral canvas with its way back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from bac_node.imaging.breast import breast_mask, chest_wall_side, expected_chest_wall_side
from bac_node.imaging.canvas import SourceGeometry, bilateral_layout
from bac_node.imaging.display import presentation_pixels
from training.phantom.study import load_mask, plan_studies, render_study, write_study
from training.phantom.vendors import VENDORS


@pytest.fixture(scope="module")
def vendor_rows(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[Path, dict[str, object]]]:
    rows: list[tuple[Path, dict[str, object]]] = []
    for i, v in enumerate(VENDORS):
        out = tmp_path_factory.mktemp(v.name)
        plan = plan_studies(
            1, seed=60 + i, vendor=v.name, grades={2: 1.0}, processing_fraction=1.0
        )[0]
        rows += [(out, row) for row in write_study(render_study(plan, scale=0.08), out)]
    return rows


def test_breast_mask_matches_truth_for_every_style(
    vendor_rows: list[tuple[Path, dict[str, object]]],
) -> None:
    for out, row in vendor_rows:
        ds = pydicom.dcmread(out / str(row["file"]))
        # The whole value range (no VOI clipping) is what the mask is found on.
        shown = presentation_pixels(ds, voi=False)
        mask = breast_mask(shown, float(ds.ImagerPixelSpacing[0]))
        truth = load_mask(out / str(row["breast_mask"]))
        dice = 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum())
        # Labels and markers stay out; the skin edge stays in.
        assert dice > 0.99, (row["vendor"], row["presentation_intent"], row["view"], dice)
        assert chest_wall_side(mask) == expected_chest_wall_side(str(row["laterality"]))


def test_breast_mask_of_an_empty_image_is_empty() -> None:
    assert not breast_mask(np.zeros((64, 64), np.float32), 0.5).any()


def _geometry(key: str, lat: str, shape: tuple[int, int], spacing: float) -> SourceGeometry:
    side = "right" if lat == "R" else "left"
    return SourceGeometry(key, lat, shape, (spacing, spacing), side)  # type: ignore[arg-type]


def test_canvas_round_trip_is_exact_at_the_source_spacing() -> None:
    rng = np.random.default_rng(0)
    right = _geometry("r", "R", (101, 77), 0.1)
    left = _geometry("l", "L", (97, 80), 0.1)
    layout = bilateral_layout(right, left, 0.1)
    images = {
        "r": rng.random((101, 77)).astype(np.float32),
        "l": rng.random((97, 80)).astype(np.float32),
    }
    canvas = layout.render(images)
    assert canvas.shape[0] % 32 == 0 and canvas.shape[1] % 64 == 0
    back = layout.to_source(canvas)
    for key, image in images.items():
        assert np.array_equal(back[key], image)
    # Both breasts face the same way: the right one is mirrored, the left one is not.
    flips = {p.source.key: p.flipped for p in layout.placements}
    assert flips == {"r": True, "l": False}
    assert np.array_equal(canvas[:101, :77], images["r"][:, ::-1])


def test_canvas_resampling_preserves_area() -> None:
    """A mask resampled to the model spacing and back keeps its area within 2 %."""
    yy, xx = np.mgrid[:600, :480]
    mask = ((yy - 300) ** 2 / 200**2 + (xx - 100) ** 2 / 150**2) < 1
    source = _geometry("k", "L", (600, 480), 0.07)
    layout = bilateral_layout(None, source, 0.2)
    canvas = layout.render({"k": mask.astype(np.float32)})
    assert canvas.shape[0] == 224  # 600 * 0.07 / 0.2 = 210, rounded up to 32
    back = layout.to_source(canvas)["k"] >= 0.5
    assert abs(int(back.sum()) - int(mask.sum())) / mask.sum() < 0.02


def test_lone_image_keeps_its_half() -> None:
    left = _geometry("l", "L", (64, 64), 0.5)
    layout = bilateral_layout(None, left, 0.5)
    (placement,) = layout.placements
    assert placement.col0 == layout.shape[1] // 2


def test_breast_mask_leaves_out_paddle_edges_and_labels(tmp_path: Path) -> None:
    from training.phantom.anatomy import sample_patient
    from training.phantom.render import render_side
    from training.phantom.vendors import render_pixels, vendor_by_name

    rng = np.random.default_rng(21)
    patient = sample_patient(rng)
    style = vendor_by_name("Siemens")
    views = render_side(patient, "R", style.geometry(0.1), 1.0, rng, distractor_rate=5.0)
    lines = 0
    for view in views.values():
        outside = ~view.breast_mask & (view.attenuation > 0.2)
        lines += int(np.any(outside.all(axis=1)))  # a paddle edge spans the width
        stored = render_pixels(view, style, "FOR PRESENTATION", rng)
        shown = stored.pixels.astype(np.float32) / float(2**stored.bits_stored - 1)
        mask = breast_mask(shown, view.pixel_spacing_mm)
        truth = view.breast_mask
        dice = 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum())
        assert dice > 0.99, dice
        assert not (mask & outside).any()
    assert lines >= 1  # the rate made sure at least one view has a paddle edge
