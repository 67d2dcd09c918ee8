"""The analysis pipeline with an oracle predictor that returns the phantom's truth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from bac_node.analysis import (
    CanvasModel,
    StudyResult,
    canvas_groups,
    measure_study,
    prepare_canvas,
)
from bac_node.dicom.selection import StudySelection, read_paths, select_studies
from training.phantom.study import load_mask, plan_studies, render_study, write_study
from training.phantom.vendors import VENDORS, vendor_by_name

Truth = dict[str, tuple[NDArray[np.bool_], dict[str, object]]]


class OraclePredictor:
    """Returns, for a canvas it was shown, the ground truth on the same canvas.

    The truth goes through the analysis's own canvas layout, so what comes back
    through the inverse mapping tests that mapping, not a shortcut around it.
    """

    def __init__(self) -> None:
        self.answers: dict[str, NDArray[np.float32]] = {}
        self.calls = 0

    @staticmethod
    def _key(canvas: NDArray[np.float32]) -> str:
        return hashlib.sha256(np.ascontiguousarray(canvas).tobytes()).hexdigest()

    def learn(self, selection: StudySelection, truth: Truth, model: CanvasModel) -> None:
        for right, left in canvas_groups(selection):
            layout, canvas, _, _ = prepare_canvas(right, left, model)
            masks = {
                p.source.key: truth[p.source.key][0].astype(np.float32) for p in layout.placements
            }
            self.answers[self._key(canvas)] = layout.render(masks)

    def __call__(self, canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        self.calls += 1
        return self.answers[self._key(canvas)]


def _study(
    tmp: Path, vendor: str, grade: int, scale: float, seed: int
) -> tuple[StudySelection, Truth]:
    plan = plan_studies(1, seed=seed, vendor=vendor, grades={grade: 1.0}, processing_fraction=0.0)[
        0
    ]
    rows = write_study(render_study(plan, scale=scale), tmp)
    images, rejected = read_paths([tmp])
    assert not rejected
    (selection,) = select_studies(images, rejected)
    truth: Truth = {
        str(r["sop_instance_uid"]): (load_mask(tmp / str(r["bac_mask"])), r) for r in rows
    }
    return selection, truth


def _run_oracle(selection: StudySelection, truth: Truth, spacing: float) -> StudyResult:
    model = CanvasModel(input_spacing_mm=spacing, threshold=0.5)
    oracle = OraclePredictor()
    oracle.learn(selection, truth, model)
    result = measure_study(selection, oracle, model)
    assert oracle.calls == 2  # one canvas per bilateral pair
    return result


@pytest.mark.parametrize("vendor", [v.name for v in VENDORS])
def test_oracle_recovers_the_truth_at_source_resolution(vendor: str, tmp_path: Path) -> None:
    """Source spacing as model spacing: the canvas round trip is exact to the pixel."""
    grade = 1 + VENDORS.index(vendor_by_name(vendor)) % 3
    selection, truth = _study(tmp_path, vendor, grade, 0.06, seed=70)
    spacing = selection.pairs[0].right.pixel_spacing_mm[0]
    result = _run_oracle(selection, truth, spacing)
    assert not result.not_analysed
    assert len(result.images) == 4
    for image in result.images:
        mask, row = truth[image.image.sop_instance_uid]
        assert np.array_equal(image.bac_mask, mask)
        assert abs(image.burden.area_percent - float(str(row["area_percent"]))) < 0.05
    study_grade = int(str(next(iter(truth.values()))[1]["study_grade"]))
    assert int(result.grade) == study_grade == grade
    for lat, burden in result.sides.items():
        row = next(r for _, r in truth.values() if r["laterality"] == lat)
        assert abs(burden.area_percent - float(str(row["side_area_percent"]))) < 0.05


def test_oracle_at_the_model_spacing_keeps_the_grade(tmp_path: Path) -> None:
    """Through a real resampling (0.28 mm source, 0.2 mm model) the grade survives."""
    selection, truth = _study(tmp_path, "Hologic", 2, 0.25, seed=71)
    result = _run_oracle(selection, truth, 0.2)
    for image in result.images:
        _, row = truth[image.image.sop_instance_uid]
        assert abs(image.burden.area_percent - float(str(row["area_percent"]))) < 0.15
    assert int(result.grade) == 2


def test_oracle_seg_frames_equal_the_truth(tmp_path: Path) -> None:
    """Through the SEG writer and back: each frame is the truth, pixel for pixel."""
    import datetime as dt

    import highdicom as hd

    from bac_node.model.weights import ModelCard
    from bac_node.results import build_results

    selection, truth = _study(tmp_path, "Fuji", 3, 0.06, seed=72)
    spacing = selection.pairs[0].right.pixel_spacing_mm[0]
    result = _run_oracle(selection, truth, spacing)
    card = ModelCard(name="oracle", version="test", input_spacing_mm=spacing)
    outputs = build_results(result, card, content_datetime=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert outputs.summary["study_grade"] == 3
    for image, seg in zip(result.images, outputs.segmentations, strict=True):
        path = tmp_path / f"{image.image.sop_instance_uid}.seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        back = hd.seg.segread(path)
        assert back.number_of_segments == 1
        frame = np.asarray(back.pixel_array).reshape(back.Rows, back.Columns) > 0
        assert np.array_equal(frame, truth[image.image.sop_instance_uid][0])


def test_mirrored_image_is_corrected_and_mapped_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An image stored mirrored (chest wall on the wrong edge for its laterality) is
    turned the right way for the model, logged, and mapped back to its own pixels."""
    import pydicom

    plan = plan_studies(1, seed=73, vendor="Siemens", grades={2: 1.0}, processing_fraction=0.0)[0]
    rows = write_study(render_study(plan, scale=0.06), tmp_path)
    row = next(r for r in rows if r["laterality"] == "L" and r["view"] == "CC")
    path = tmp_path / str(row["file"])
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    images, _ = read_paths([tmp_path])
    (selection,) = select_studies(images)
    truth: Truth = {
        str(r["sop_instance_uid"]): (load_mask(tmp_path / str(r["bac_mask"])), r) for r in rows
    }
    mirrored_uid = str(row["sop_instance_uid"])
    truth[mirrored_uid] = (truth[mirrored_uid][0][:, ::-1].copy(), row)
    spacing = selection.pairs[0].right.pixel_spacing_mm[0]
    with caplog.at_level("WARNING"):
        result = _run_oracle(selection, truth, spacing)
    assert any("orientation corrected" in m and mirrored_uid in m for m in caplog.messages)
    image = next(i for i in result.images if i.image.sop_instance_uid == mirrored_uid)
    assert image.orientation_corrected
    assert image.chest_wall == "right"
    assert np.array_equal(image.bac_mask, truth[mirrored_uid][0])
