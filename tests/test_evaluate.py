"""`bac-node evaluate`: metrics against scikit-learn, the patient bootstrap, a tiny set
whose answer is known (an oracle and the oracle less one vessel), the report in
Chromium, the CLI with the tiny model, and the model card's reading of the JSON."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage
from sklearn.metrics import (  # type: ignore[import-untyped]  # no stubs or py.typed
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import roc_curve as sk_roc_curve

from bac_node.cli import main
from bac_node.evaluate import MaskSource, evaluate
from bac_node.evaluate.bootstrap import PatientBootstrap, ratio_statistic
from bac_node.evaluate.data import LabelledImage, LabelledSet, LabelledStudy
from bac_node.evaluate.metrics import (
    PixelCounts,
    bland_altman,
    confusion_matrix,
    mean_image_metrics,
    pooled_metrics,
    quadratic_kappa,
    roc_curve,
    weighted_auc,
    wilson_interval,
)
from bac_node.evaluate.report import render_report
from bac_node.evaluate.sources import truth_masks
from bac_node.grading import Burden, grade_from_area_percent, study_grade
from training.ship import heldout_metrics

SKLEARN = {
    "jaccard": jaccard_score,
    "accuracy": accuracy_score,
    "dice": f1_score,
    "precision": precision_score,
    "recall": recall_score,
}


def _random_images(
    rng: np.random.Generator, n: int
) -> list[tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]]]:
    images = []
    for k in range(n):
        shape = (int(rng.integers(5, 30)), int(rng.integers(5, 30)))
        density = [0.0, 0.05, 0.3][k % 3]  # some images without any truth
        truth = rng.random(shape) < density
        predicted = rng.random(shape) < rng.uniform(0, 0.3)
        region = (rng.random(shape) < 0.8) | truth | predicted
        images.append((truth, predicted, region))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_scikit_learn(seed: int) -> None:
    images = _random_images(np.random.default_rng(seed), 12)
    counts = [PixelCounts.of(t, p, r) for t, p, r in images]
    truth = np.concatenate([t[r] for t, _, r in images])
    predicted = np.concatenate([p[r] for _, p, r in images])
    pooled = pooled_metrics(counts)
    mean = mean_image_metrics(counts)
    for name, score in SKLEARN.items():
        assert pooled[name] == pytest.approx(score(truth, predicted))
        defined = [
            bool({"precision": p[r], "recall": t[r]}.get(name, (t | p)[r]).any())
            or name == "accuracy"
            for t, p, r in images
        ]
        per_image = [score(t[r], p[r]) for (t, p, r), ok in zip(images, defined, strict=True) if ok]
        assert mean[name] == pytest.approx(np.mean(per_image))
        assert mean[f"{name}_undefined"] == defined.count(False)


def test_a_positive_outside_the_region_still_counts() -> None:
    truth = np.array([[True, False], [False, False]])
    predicted = np.array([[False, False], [False, True]])
    region = np.array([[False, True], [True, False]])
    assert PixelCounts.of(truth, predicted, region) == PixelCounts(tp=0, fp=1, fn=1, tn=2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_quadratic_kappa_matches_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, 60)
    predicted = np.clip(truth + rng.integers(-1, 2, 60) * (rng.random(60) < 0.4), 0, 3)
    expected = cohen_kappa_score(truth, predicted, weights="quadratic")
    assert quadratic_kappa(confusion_matrix(truth, predicted)) == pytest.approx(expected)
    # The stacked (bootstrap) form gives each matrix's own kappa.
    other = rng.integers(0, 4, 60)
    stack = np.stack([confusion_matrix(truth, predicted), confusion_matrix(truth, other)])
    assert np.allclose(
        quadratic_kappa(stack),
        [expected, cohen_kappa_score(truth, other, weights="quadratic")],
    )


def test_kappa_when_every_study_has_one_grade() -> None:
    # 0/0, as scikit-learn has it (it warns and returns NaN): one category proves nothing.
    with pytest.warns(UserWarning):
        assert math.isnan(cohen_kappa_score([2, 2], [2, 2], weights="quadratic"))
    assert math.isnan(float(quadratic_kappa(confusion_matrix([2, 2], [2, 2]))))
    assert math.isnan(float(quadratic_kappa(np.zeros((4, 4)))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_auc_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.random(40) < 0.3
    # Rounded scores make ties, which both implementations must count one half.
    score = np.round(rng.normal(positive * 1.0, 1.0), 1)
    fpr, tpr, thresholds = roc_curve(positive, score)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(positive, score, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    assert np.allclose(thresholds[1:], sk_thresholds[1:])
    weights = rng.integers(0, 3, size=(5, 40)).astype(np.float64)
    for row, value in zip(weights, weighted_auc(positive, score, weights), strict=True):
        assert value == pytest.approx(roc_auc_score(positive, score, sample_weight=row))
    assert weighted_auc(positive, score, np.ones((1, 40)))[0] == pytest.approx(
        roc_auc_score(positive, score)
    )


def test_wilson_interval_and_bland_altman() -> None:
    # Newcombe (1998), Stat Med 17:857, example 81/263: 0.2553 to 0.3662.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(8, 8)
    assert high == 1.0 and 0.6 < low < 0.7  # never [1, 1] for 8 of 8
    ba = bland_altman([1.0, 2.0, 3.0], [1.5, 2.0, 3.5])
    assert ba["bias"] == pytest.approx(1 / 3)
    assert ba["upper_loa"] - ba["bias"] == pytest.approx(1.96 * np.std([0.5, 0, 0.5], ddof=1))


def test_bootstrap_is_deterministic_for_a_seed_and_resamples_patients() -> None:
    patients = [f"p{i}" for i in range(9)]
    rng = np.random.default_rng(5)
    hits = rng.integers(0, 50, 9).astype(np.float64)
    totals = hits + rng.integers(1, 50, 9)
    statistic = ratio_statistic(hits, totals)
    observed = float(hits.sum() / totals.sum())

    def run(seed: int) -> tuple[float, float]:
        interval = PatientBootstrap(patients, 2_500, seed).interval(observed, statistic)
        return interval.low, interval.high

    assert run(11) == run(11)
    assert run(11) != run(12)
    low, high = run(11)
    assert low < observed < high
    boot = PatientBootstrap(patients, 2_500, 11)
    chunks = list(boot.weights())
    assert sum(len(c) for c in chunks) == 2_500  # across chunk edges
    assert all((c.sum(axis=1) == 9).all() for c in chunks)  # 9 patients drawn each time


# --- a tiny labelled set whose answer is known --------------------------------------


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny phantom studies, one of each grade (scale 0.04)."""
    from training.phantom.study import plan_studies, synthesize

    out = tmp_path_factory.mktemp("tiny-set")
    plans = plan_studies(
        4, seed=3, grades={0: 1, 1: 1, 2: 1, 3: 1}, prior_fraction=0.0, processing_fraction=0.0
    )
    synthesize(plans, out, scale=0.04, progress=False)
    return out


def _manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _missed_vessel(folder: Path) -> tuple[str, NDArray[np.bool_]]:
    """The image with the most BAC, and its largest calcified segment (one vessel)."""
    rows = _manifest(folder)
    row = max(rows, key=lambda r: int(r["bac_pixels"]))
    labelled = LabelledSet(folder, [])
    labels, _ = ndimage.label(labelled.load_mask(row["bac_mask"]), np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    return row["bac_mask"], np.asarray(labels == 1 + int(np.argmax(sizes)))


@pytest.fixture(scope="module")
def known(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missed_mask, vessel = _missed_vessel(tiny_set)

    def misses_one_vessel(
        data: LabelledSet, study: LabelledStudy, image: LabelledImage
    ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        bac, breast = truth_masks(data, study, image)
        return (bac & ~vessel, breast) if image.bac_mask == missed_mask else (bac, breast)

    out = tmp_path_factory.mktemp("evaluation")
    evaluation = evaluate(
        tiny_set,
        [MaskSource("oracle", truth_masks), MaskSource("misses one vessel", misses_one_vessel)],
        out,
        resamples=2_000,
        interval_resamples=500,
        seed=7,
        progress=False,
    )
    report = render_report(evaluation)
    return {"doc": evaluation.doc, "out": out, "report": report, "vessel": vessel,
            "missed_mask": missed_mask}  # fmt: skip


def test_the_oracle_scores_perfectly(known: dict[str, Any], tiny_set: Path) -> None:
    oracle = known["doc"]["models"][0]
    assert oracle["label"] == "oracle"
    everything = oracle["strata"]["all"]
    assert everything["images"] == 16 and everything["studies"] == 4
    for aggregation in ("pooled", "per_image_mean"):
        for name in ("jaccard", "dice", "precision", "recall", "accuracy"):
            assert everything[aggregation][name] == 1.0, (aggregation, name)
    grades = everything["grades"]
    assert grades["quadratic_weighted_kappa"]["value"] == 1.0
    assert grades["confusion_true_rows_predicted_columns"] == np.eye(4, dtype=int).tolist()
    assert grades["grade3"]["sensitivity"] == 1.0 and grades["grade3"]["specificity"] == 1.0
    assert grades["grade3"]["auc"]["value"] == 1.0
    assert grades["area_percent_bland_altman_per_side"]["bias"] == pytest.approx(0, abs=1e-12)
    # The true area % is the manifest's (measured here from the masks).
    by_study = {s["study"]: s for s in _manifest(tiny_set)}
    for row in _read_csv(known["out"] / "studies.csv"):
        if row["model"] == "oracle":
            assert row["true_grade"] == by_study[row["study"]]["study_grade"]
    assert {f"vendor {v}" for v in {r["vendor"] for r in by_study.values()}} <= set(
        oracle["strata"]
    )
    assert {"grade 0", "grade 1", "grade 2", "grade 3"} <= set(oracle["strata"])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_missing_one_vessel_gives_the_known_numbers(known: dict[str, Any], tiny_set: Path) -> None:
    rows = _manifest(tiny_set)
    total = sum(int(r["bac_pixels"]) for r in rows)
    removed = int(known["vessel"].sum())
    missed_row = next(r for r in rows if r["bac_mask"] == known["missed_mask"])
    image_total = int(missed_row["bac_pixels"])
    assert 0 < removed < image_total <= total

    missing = known["doc"]["models"][1]["strata"]["all"]
    assert missing["pooled"]["jaccard"] == pytest.approx((total - removed) / total)
    assert missing["pooled"]["recall"] == pytest.approx((total - removed) / total)
    assert missing["pooled"]["precision"] == 1.0
    assert missing["pooled"]["dice"] == pytest.approx(2 * (total - removed) / (2 * total - removed))
    with_bac = sum(int(r["bac_pixels"]) > 0 for r in rows)
    expected_mean = (with_bac - 1 + (image_total - removed) / image_total) / with_bac
    assert missing["per_image_mean"]["jaccard"] == pytest.approx(expected_mean)
    assert missing["per_image_mean"]["jaccard_undefined"] == len(rows) - with_bac

    # The grade of the study that lost the vessel, from the manifest's pixel counts.
    study_rows = [r for r in rows if r["study"] == missed_row["study"]]
    sides = []
    for side in ("R", "L"):
        members = [r for r in study_rows if r["laterality"] == side]
        bac = sum(int(r["bac_pixels"]) for r in members)
        bac -= removed if missed_row["laterality"] == side else 0
        sides.append(Burden(bac, sum(int(r["breast_pixels"]) for r in members)))
    expected_grade = int(study_grade(sides))
    true_grade = int(missed_row["study_grade"])
    confusion = missing["grades"]["confusion_true_rows_predicted_columns"]
    assert confusion[true_grade][expected_grade] >= 1
    assert sum(map(sum, confusion)) == 4
    assert int(grade_from_area_percent(max(s.area_percent for s in sides))) == expected_grade
    kappa = missing["grades"]["quadratic_weighted_kappa"]["value"]
    assert (kappa == 1.0) == (expected_grade == true_grade)

    gain = known["doc"]["comparison"]["strata"]["all"]["pooled_jaccard_difference"]
    assert gain["value"] == pytest.approx(removed / total)
    # Only one patient's images differ: every resample's difference is >= 0.
    assert 0 <= gain["ci95_low"] <= gain["value"] <= gain["ci95_high"]
    stratum = f"grade {true_grade}"
    assert known["doc"]["comparison"]["strata"][stratum]["pooled_jaccard_difference"]["value"] > 0
    for name, values in known["doc"]["comparison"]["strata"].items():
        if name.startswith("grade ") and name != stratum:
            # Unchanged: 0, or undefined (0/0) in a stratum without any BAC.
            difference = values["pooled_jaccard_difference"]["value"]
            grade_bac = sum(
                int(r["bac_pixels"]) for r in rows if f"grade {r['study_grade']}" == name
            )
            if grade_bac == 0:
                assert math.isnan(difference)
            else:
                assert difference == pytest.approx(0, abs=1e-12)


def test_every_number_is_in_the_json_and_csv(known: dict[str, Any]) -> None:
    out = known["out"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["models"][1]["strata"]["all"]["pooled"]["jaccard"] == pytest.approx(
        known["doc"]["models"][1]["strata"]["all"]["pooled"]["jaccard"]
    )
    rows = _read_csv(out / "metrics.csv")
    pooled = next(
        r for r in rows if r["model"] == "misses one vessel" and r["stratum"] == "all"
        and r["metric"] == "pooled_jaccard"
    )  # fmt: skip
    assert float(pooled["value"]) == pytest.approx(
        doc["models"][1]["strata"]["all"]["pooled"]["jaccard"]
    )
    assert any(r["metric"] == "pooled_jaccard_difference" for r in rows)
    assert len(_read_csv(out / "images.csv")) == 32 and len(_read_csv(out / "studies.csv")) == 8
    # The report shows the known numbers beside the paper's.
    page = known["report"].read_text()
    expected = doc["models"][1]["strata"]["all"]["pooled"]["jaccard"]
    assert f"{expected:.3f}" in page and "0.614" in page and "Research use only" in page


@pytest.mark.browser
def test_the_report_opens_in_chromium_with_every_image(known: dict[str, Any]) -> None:
    from browser import broken_images, image_count, open_page

    with open_page(known["report"].as_uri()) as view:
        assert broken_images(view.page) == [] and view.errors == []
        # 5 plots, and best/median/worst of each of the 4 grades.
        assert image_count(view.page) == 5 + 4 * 3
        assert "bac-node evaluation" in view.page.title()


def test_ship_reads_the_evaluation_json(known: dict[str, Any]) -> None:
    from training.ship import read_heldout

    metrics = heldout_metrics(read_heldout(known["out"]))
    assert metrics["heldout_jaccard"] == 1.0 and metrics["heldout_grade_kappa"] == 1.0
    assert metrics["heldout_studies"] == 4
    assert metrics["heldout_jaccard_gain_vs_baseline"] > 0  # oracle - misses: the oracle wins
    assert {"heldout_jaccard_grade_3", "heldout_grade3_auc"} <= set(metrics)


def test_your_own_data_with_only_the_required_columns(tiny_set: Path, tmp_path: Path) -> None:
    """The bring-your-own-data layout: no vendor, breast mask or grade in the manifest."""
    from training.datasets import REQUIRED_COLUMNS

    folder = tmp_path / "mine"
    folder.mkdir()
    rows = [
        {k: (f"../{tiny_set.name}/{v}" if k in ("file", "bac_mask") else v)
         for k, v in r.items() if k in REQUIRED_COLUMNS}
        for r in _manifest(tiny_set)
    ]  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps({"images": rows}))
    (tmp_path / tiny_set.name).symlink_to(tiny_set)
    evaluation = evaluate(
        folder / "manifest.json", [MaskSource("oracle", truth_masks)], tmp_path / "out",
        resamples=200, interval_resamples=200, progress=False,
    )  # fmt: skip
    model = evaluation.doc["models"][0]
    assert set(model["strata"]) >= {"all", "vendor unknown"}
    assert model["strata"]["all"]["pooled"]["jaccard"] == 1.0
    # Without a reference grade, the true grade is the true area %'s, which the oracle matches.
    assert model["strata"]["all"]["grades"]["exact_agreement"] == 1.0


def test_cli_evaluates_the_tiny_model(
    tiny_set: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from _processing_helpers import save_tiny_model

    monkeypatch.setenv("BAC_NODE_ALLOCATOR_TUNED", "1")
    model = save_tiny_model(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval"
    code = main([
        "--log-level", "WARNING", "evaluate", "--model", str(model), "--data",
        str(tiny_set / "manifest.csv"), "--out", str(out), "--resamples", "200",
        "--interval-resamples", "200", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "bac-node-test-tiny 0.0.0+test: Jaccard per-image mean" in printed
    doc = json.loads((out / "metrics.json").read_text())
    assert (
        doc["models"][0]["source"]["sha256"] and doc["models"][0]["strata"]["all"]["images"] == 16
    )
    assert "bac-node evaluate --model" in doc["command"]
    assert (out / "report.html").is_file()


def test_cli_names_a_bad_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BAC_NODE_ALLOCATOR_TUNED", "1")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    assert main(["evaluate", "--data", str(other), "--out", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("Error: ") and str(other) in error and "\n" not in error


def test_length_agreement_is_in_the_json_csv_and_report(
    known: dict[str, Any], tiny_set: Path
) -> None:
    """The vessels figures: the oracle's measured length is that of the true masks, the
    set's truth is the manifest's, and the source that misses a vessel measures less."""
    from bac_node.imaging.vessels import measure_vessels

    rows = _manifest(tiny_set)
    oracle, missing = (m["vessels"] for m in known["doc"]["models"])
    true_total = sum(float(r["true_bac_length_mm"]) for r in rows)
    assert oracle["images_with_true_length"] == 16
    assert oracle["length_vs_true"]["true_total_mm"] == pytest.approx(true_total)
    assert oracle["vessel_count_vs_true"]["images"] == 16
    labelled = LabelledSet(tiny_set, [])
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    images = [r for r in _read_csv(known["out"] / "images.csv") if r["model"] == "oracle"]
    for image in images:
        row = by_uid[image["sop_instance_uid"]]
        spacing = float(row["pixel_spacing_mm"])
        expected = measure_vessels(labelled.load_mask(row["bac_mask"]), (spacing, spacing))
        assert float(image["predicted_length_mm"]) == pytest.approx(expected.length_mm)
        assert float(image["true_length_mm"]) == pytest.approx(float(row["true_bac_length_mm"]))
    measured_totals = [m["length_vs_true"]["measured_total_mm"] for m in (missing, oracle)]
    assert measured_totals[0] < measured_totals[1]
    for model in (oracle, missing):
        for key in ("length_vs_true", "length_vs_area_percent"):
            for name in ("pearson", "spearman"):
                assert -1.0 <= model[key][name] <= 1.0, (key, name)
    metrics = {
        r["metric"] for r in _read_csv(known["out"] / "metrics.csv") if r["model"] == "oracle"
    }
    assert {"vessels_length_vs_true_spearman", "vessels_length_vs_area_percent_pearson"} <= metrics
    page = known["report"].read_text()
    assert "alt='calcified length'" in page and "Length is reported beside the grade" in page
