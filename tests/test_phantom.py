"""The synthetic phantom: distributions, ground truth, anatomy and valid DICOM."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from phantom_fixtures import require_tool
from scipy import ndimage

from bac_node.cli import SAMPLE_RECIPE
from bac_node.grading import Burden
from bac_node.imaging.display import presentation_pixels
from training.phantom.anatomy import sample_patient
from training.phantom.render import render_side
from training.phantom.study import (
    DEFAULT_GRADE_DISTRIBUTION,
    SPLITS,
    ground_truth_summaries,
    load_mask,
    parse_grade_distribution,
    plan_studies,
    read_manifest,
    render_study,
    synthesize,
    write_study,
)
from training.phantom.vendors import VENDORS

REPO = Path(__file__).resolve().parents[1]
SOURCE_SHARES = {v.name: v.share for v in VENDORS}


def _shares(labels: list[object]) -> dict[object, float]:
    counts = Counter(labels)
    return {k: 100.0 * c / len(labels) for k, c in counts.items()}


def _check_distributions(rows: list[dict[str, object]], grade_key: str) -> None:
    vendor = _shares([r["vendor"] for r in rows])
    for name, share in SOURCE_SHARES.items():
        assert abs(vendor.get(name, 0.0) - share) <= 3.0, (name, vendor.get(name), share)
    grades = _shares([r[grade_key] for r in rows])
    for grade, share in DEFAULT_GRADE_DISTRIBUTION.items():
        assert abs(grades.get(grade, 0.0) - 100 * share) <= 5.0, (grade, grades)
    split_of: dict[object, set[object]] = {}
    for r in rows:
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values()), "a patient is in two splits"
    by_patient = _shares([next(iter(s)) for s in split_of.values()])
    for split, share in SPLITS.items():
        assert abs(by_patient[split] - 100 * share) <= 2.0, (split, by_patient)


def test_1000_plans_follow_vendor_grade_and_split_shares() -> None:
    plans = plan_studies(1000, seed=11)
    rows = [
        {"vendor": p.vendor, "grade": p.planned_grade, "patient_id": p.patient_id, "split": p.split}
        for p in plans
    ]
    _check_distributions(rows, "grade")
    # Some women have more than one screening round, and their burden never falls.
    rounds: dict[str, list[tuple[int, int]]] = {}
    for p in plans:
        rounds.setdefault(p.patient_id, []).append((p.screening_round, p.planned_grade))
    multi = [sorted(r) for r in rounds.values() if len(r) > 1]
    assert len(multi) > 50
    assert all(g == sorted(g, key=lambda x: x[1]) for g in multi)


@pytest.mark.slow
def test_1000_rendered_studies_realise_their_grades() -> None:
    """Every study's grade, measured on its masks, is the planned grade."""
    plans = plan_studies(1000, seed=12)
    rows = ground_truth_summaries(plans, 0.04)
    mismatched = [r for r in rows if r["study_grade"] != r["planned_grade"]]
    assert not mismatched, mismatched[:5]
    _check_distributions(rows, "study_grade")


def test_plans_are_deterministic_and_seed_dependent() -> None:
    a, b, c = plan_studies(50, seed=3), plan_studies(50, seed=3), plan_studies(50, seed=4)
    assert a == b
    assert a != c


def test_bilateral_burden_is_correlated() -> None:
    plans = plan_studies(400, seed=5)
    right = np.array([p.side_targets["R"] for p in plans])
    left = np.array([p.side_targets["L"] for p in plans])
    assert np.corrcoef(right, left)[0, 1] > 0.6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,1,2,3", {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}),
        ("3", {3: 1.0}),
        ("0:1,3:3", {0: 0.25, 3: 0.75}),
    ],
)
def test_parse_grade_distribution(text: str, expected: dict[int, float]) -> None:
    assert parse_grade_distribution(text) == expected


@pytest.mark.parametrize("text", ["4", "a", "0:-1", "0:0", ""])
def test_parse_grade_distribution_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_grade_distribution(text)


@pytest.mark.parametrize("grade", [0, 1, 2, 3])
def test_side_burden_meets_plan(grade: int) -> None:
    for plan in plan_studies(4, seed=20 + grade, grades={grade: 1.0}):
        study = render_study(plan, scale=0.06)
        assert study.grade == grade
        for lat in ("R", "L"):
            burden = study.side_burden(lat)
            target = plan.side_targets[lat]
            pixel = 100.0 / burden.breast_pixels
            # The target is met from below to within a few pixels.
            assert target - 3 * pixel <= burden.area_percent <= target + 1e-9


def test_view_ground_truth_is_consistent() -> None:
    rng = np.random.default_rng(8)
    patient = sample_patient(rng)
    for lat in ("R", "L"):
        views = render_side(patient, lat, (600, 480, 0.5), 1.5, rng)
        for name, view in views.items():
            assert view.bac_mask.any()
            assert not (view.bac_mask & ~view.breast_mask).any()
            assert not (view.pectoral_mask & ~view.breast_mask).any()
            assert view.pectoral_mask.any() == (name == "MLO")
            assert (view.attenuation[~view.breast_mask] < 1e-6).mean() > 0.97  # air, bar labels
            # The chest wall is on the right edge for a right breast, the left for a left one.
            wall = view.breast_mask[:, -1] if lat == "R" else view.breast_mask[:, 0]
            other = view.breast_mask[:, 0] if lat == "R" else view.breast_mask[:, -1]
            assert wall.mean() > 0.3
            assert not other.any()
            # Calcified arteries are bright: more attenuating than the tissue beside them.
            ring = ndimage.binary_dilation(view.bac_mask, iterations=3) & ~view.bac_mask
            ring &= view.breast_mask
            assert view.attenuation[view.bac_mask].mean() > view.attenuation[ring].mean() + 0.2


def test_distractors_are_never_bac() -> None:
    rng = np.random.default_rng(9)
    patient = sample_patient(rng)
    views = render_side(patient, "L", (600, 480, 0.5), 0.0, rng, distractor_rate=10.0)
    for view in views.values():
        assert not view.bac_mask.any()
        # Bright small things (calcifications, clips) are there all the same.
        local = view.attenuation - ndimage.median_filter(view.attenuation, size=9)
        assert (local[view.breast_mask] > 0.3).sum() > 10


def test_same_plan_renders_identically() -> None:
    plan = plan_studies(1, seed=30)[0]
    a, b = render_study(plan, scale=0.05), render_study(plan, scale=0.05)
    for key, view in a.views.items():
        assert np.array_equal(view.attenuation, b.views[key].attenuation)
        assert np.array_equal(view.bac_mask, b.views[key].bac_mask)


@pytest.mark.dcmtk
@pytest.mark.parametrize("vendor", [v.name for v in VENDORS])
def test_every_vendor_writes_valid_studies(vendor: str, tmp_path: Path) -> None:
    """dciodvfy finds no error, dcmdump and pydicom read, the breast shows bright."""
    dciodvfy, dcmdump = require_tool("dciodvfy"), require_tool("dcmdump")
    plan = plan_studies(
        1, seed=40, vendor=vendor, grades={2: 1.0}, processing_fraction=1.0, jpeg2000="always"
    )[0]
    rows = write_study(render_study(plan, scale=0.05), tmp_path)
    assert {r["view"] for r in rows} == {"CC", "MLO"}
    assert {r["laterality"] for r in rows} == {"R", "L"}
    for row in rows:
        path = tmp_path / row["file"]
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, (path, errors)
        assert subprocess.run([dcmdump, str(path)], capture_output=True).returncode == 0
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.PresentationIntentType == row["presentation_intent"]
        shown = presentation_pixels(ds)
        breast = load_mask(tmp_path / row["breast_mask"])
        assert shown.shape == breast.shape
        air = ~ndimage.binary_dilation(breast, iterations=4) & (shown < 0.99)
        assert shown[breast].mean() > shown[air].mean() + 0.2, (vendor, row["presentation_intent"])
        bac = load_mask(tmp_path / row["bac_mask"])
        assert Burden(int(bac.sum()), int(breast.sum())).area_percent == pytest.approx(
            row["area_percent"], abs=1e-5
        )


def test_manifest_lists_every_image(tmp_path: Path) -> None:
    plans = plan_studies(3, seed=50, processing_fraction=0.0)
    rows = synthesize(plans, tmp_path, scale=0.04, progress=False)
    assert rows == read_manifest(tmp_path)
    assert len(rows) == 12
    csv_lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert len(csv_lines) == 13
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert "Not for clinical use" in doc["note"]
    for row in rows:
        assert (tmp_path / row["file"]).is_file()
        assert (tmp_path / row["bac_mask"]).is_file()
        assert row["patient_id"].startswith("PHANTOM-")


def test_sample_dicom_is_small_and_graded() -> None:
    sample = REPO / "sample_dicom"
    rows = read_manifest(sample)
    assert len(rows) == 4
    assert {(r["laterality"], r["view"]) for r in rows} == {
        ("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"),
    }  # fmt: skip
    assert rows[0]["study_grade"] in (2, 3)
    total = sum(p.stat().st_size for p in sample.rglob("*") if p.is_file())
    assert total < 10 * 1024 * 1024


@pytest.mark.slow
def test_sample_dicom_is_what_the_recipe_makes(tmp_path: Path) -> None:
    """The committed sample is reproducible: the generator has not drifted from it."""
    plans = plan_studies(
        int(SAMPLE_RECIPE["studies"]), int(SAMPLE_RECIPE["seed"]),
        vendor=str(SAMPLE_RECIPE["vendor"]), grades=dict(SAMPLE_RECIPE["grades"]),
        prior_fraction=0.0, processing_fraction=0.0,
    )  # fmt: skip
    fresh = synthesize(plans, tmp_path, scale=float(SAMPLE_RECIPE["scale"]), progress=False)
    committed = read_manifest(REPO / "sample_dicom")
    keys = ("sop_instance_uid", "bac_pixels", "breast_pixels", "study_grade")
    assert [{k: r[k] for k in keys} for r in fresh] == [{k: r[k] for k in keys} for r in committed]
    for row in fresh:
        a = (tmp_path / row["file"]).read_bytes()
        b = (REPO / "sample_dicom" / row["file"]).read_bytes()
        assert a == b, row["file"]
