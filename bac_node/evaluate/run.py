"""Score one or two prediction sources on a labelled set: every number of the report.

:func:`evaluate` asks each source for its masks study by study (a progress bar while
it runs), measures every image against the truth, and summarises:

- **pixels** (per image, then pooled and per-image mean; see :mod:`.metrics`):
  Jaccard, accuracy, Dice, precision, recall. A true BAC pixel outside the node's breast
  mask counts as missed; true negatives are counted inside the breast (the node's
  breast mask, with the true one when the manifest has it);
- **grades** per study: the reference grade (``study_grade``, else the grade of the
  true area %) against the predicted one (the higher side's, as the node grades):
  confusion matrix, quadratic weighted kappa with a patient-bootstrap interval, exact
  agreement; Bland-Altman of the area % per breast side; Grade 3 detection: ROC and AUC
  of the continuous predicted study area % (bootstrap interval), sensitivity and
  specificity of the predicted Grade 3 (Wilson intervals);
- **strata**: all of the above for every true study grade and every vendor;
- **vessels** (:func:`vessel_agreement`): the calcified length, vessel count and
  longest vessel measured on each predicted mask (:mod:`bac_node.imaging.vessels`)
  against the phantom's true length and count when the manifest has them (Pearson,
  Spearman, bias and relative error), and against the predicted area % (Pearson,
  Spearman): length is reported beside the grade, which stays area %;
- with two sources, the **paired bootstrap** (by patient) of the Jaccard difference
  ``first - second``, pooled and per-image mean, overall and in every stratum.

A view the node leaves out (unreadable, or superseded by its selection rules) is listed
with its reason in ``not_analysed`` and is not scored; a study the node cannot read at
all stops the run with a one-line error naming it.

Every number goes to ``OUT/metrics.json`` and ``OUT/metrics.csv``; the rows behind them
to ``OUT/images.csv`` and ``OUT/studies.csv``; predicted masks to ``OUT/masks/`` (for
the report's overlays).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bac_node import __version__
from bac_node.evaluate import paper
from bac_node.evaluate.bootstrap import (
    PatientBootstrap,
    Statistic,
    difference_statistic,
    ratio_statistic,
)
from bac_node.evaluate.data import LabelledSet, load_labelled_set
from bac_node.evaluate.metrics import (
    GRADE_COUNT,
    PixelCounts,
    auc_pairwise,
    bland_altman,
    confusion_matrix,
    correlations,
    mean_image_metrics,
    pooled_metrics,
    quadratic_kappa,
    roc_curve,
    weighted_auc,
    wilson_interval,
)
from bac_node.evaluate.sources import ImagePrediction, PredictionSource
from bac_node.grading import BACGrade, Burden, grade_from_area_percent, study_grade
from bac_node.imaging.vessels import VesselMeasurement, measure_vessels

SEVERE = int(BACGrade.SEVERE)
DEFAULT_RESAMPLES = 10_000
DEFAULT_INTERVAL_RESAMPLES = paper.KAPPA_RESAMPLES


@dataclass
class ImageRecord:
    """One image scored: its counts and areas (no patient identifier but the key)."""

    study: str
    patient: str
    vendor: str
    true_grade: int
    laterality: str
    view: str
    sop_instance_uid: str
    file: str
    bac_mask: str
    predicted_mask: str
    """Relative to the output folder."""
    counts: PixelCounts
    true_burden: Burden
    predicted_burden: Burden
    predicted_vessels: VesselMeasurement = field(default_factory=VesselMeasurement.none)
    true_length_mm: float | None = None
    """The manifest's true calcified length (phantoms), else None."""
    true_vessel_count: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.study, self.file

    @property
    def example_score(self) -> float:
        """Jaccard, 1 when truth and prediction are both empty (a perfect grade-0 image)."""
        value = self.counts.metrics()["jaccard"]
        return 1.0 if math.isnan(value) else value


@dataclass
class StudyRecord:
    study: str
    patient: str
    vendor: str
    true_grade: int
    predicted_grade: int
    true_percent: float
    predicted_percent: float
    sides: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Laterality -> (true area %, predicted area %)."""
    seconds: float = 0.0


@dataclass
class SourceResult:
    label: str
    about: dict[str, Any]
    images: list[ImageRecord]
    studies: list[StudyRecord]
    not_analysed: list[tuple[str, str, str]]
    """(study, SOP Instance UID or file, reason)."""


def _save_mask(path: Path, mask: NDArray[np.bool_]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(path)


def score_source(
    data: LabelledSet,
    source: PredictionSource,
    out: Path,
    masks_dir: str,
    *,
    progress: bool = True,
) -> SourceResult:
    """Run ``source`` on every study of ``data`` and score each image and study."""
    from tqdm import tqdm

    images: list[ImageRecord] = []
    studies: list[StudyRecord] = []
    skipped: list[tuple[str, str, str]] = []
    for study in tqdm(
        data.studies, desc=source.label, unit="study", disable=None if progress else True
    ):
        prediction = source.predict(data, study)
        skipped += [(study.name, what, why) for what, why in prediction.not_analysed]
        scored = [_score_image(data, study.name, p, out, masks_dir) for p in prediction.images]
        true_sides: dict[str, list[Burden]] = {}
        predicted_sides: dict[str, list[Burden]] = {}
        for _, true_burden, predicted_burden, p in scored:
            true_sides.setdefault(p.labelled.laterality, []).append(true_burden)
            predicted_sides.setdefault(p.labelled.laterality, []).append(predicted_burden)
        sides: dict[str, tuple[float, float]] = {
            lat: (
                Burden.pooled(true_sides[lat]).area_percent,
                Burden.pooled(predicted_sides[lat]).area_percent,
            )
            for lat in ("R", "L")
            if lat in true_sides
        }
        true_percent = max((t for t, _ in sides.values()), default=0.0)
        true_grade = (
            study.reference_grade
            if study.reference_grade is not None
            else int(grade_from_area_percent(true_percent))
        )
        for record, *_ in scored:
            record.true_grade = true_grade
            record.study, record.patient, record.vendor = (
                study.name, study.patient_id, study.vendor,
            )  # fmt: skip
            images.append(record)
        predicted = [Burden.pooled(b) for b in predicted_sides.values()]
        studies.append(
            StudyRecord(
                study=study.name,
                patient=study.patient_id,
                vendor=study.vendor,
                true_grade=true_grade,
                predicted_grade=int(study_grade(predicted)),
                true_percent=true_percent,
                predicted_percent=max((b.area_percent for b in predicted), default=0.0),
                sides=sides,
                seconds=prediction.seconds,
            )
        )
    return SourceResult(source.label, source.describe(), images, studies, skipped)


def _score_image(
    data: LabelledSet, study: str, p: ImagePrediction, out: Path, masks_dir: str
) -> tuple[ImageRecord, Burden, Burden, ImagePrediction]:
    truth = data.load_mask(p.labelled.bac_mask)
    if truth.shape != p.bac.shape:
        raise ValueError(
            f"{p.sop_instance_uid}: true mask {truth.shape} and image {p.bac.shape} differ"
        )
    true_breast = data.load_mask(p.labelled.breast_mask) if p.labelled.breast_mask else None
    region = p.breast | truth | p.bac
    if true_breast is not None:
        region |= true_breast
    counts = PixelCounts.of(truth, p.bac, region)
    reference_breast = true_breast if true_breast is not None else p.breast
    true_burden = Burden.measured(
        int(np.count_nonzero(truth & reference_breast)),
        int(np.count_nonzero(reference_breast)),
        p.pixel_spacing_mm,
    )
    predicted_burden = Burden.measured(
        int(np.count_nonzero(p.bac)), int(np.count_nonzero(p.breast)), p.pixel_spacing_mm
    )
    relative = f"{masks_dir}/{study}/{p.labelled.key}_{p.sop_instance_uid}.png"
    _save_mask(out / relative, p.bac)
    record = ImageRecord(
        study, "", "", -1, p.labelled.laterality, p.labelled.view, p.sop_instance_uid,
        p.labelled.file, p.labelled.bac_mask, relative, counts, true_burden, predicted_burden,
        measure_vessels(p.bac, p.pixel_spacing_mm), p.labelled.true_length_mm,
        p.labelled.true_vessel_count,
    )  # fmt: skip
    return record, true_burden, predicted_burden, p


# --- summaries ----------------------------------------------------------------------


def strata(result: SourceResult) -> dict[str, tuple[list[ImageRecord], list[StudyRecord]]]:
    """``all``, ``grade G`` (true study grade) and ``vendor V`` subsets, in that order."""
    out = {"all": (result.images, result.studies)}
    for g in range(GRADE_COUNT):
        subset = [s for s in result.studies if s.true_grade == g]
        if subset:
            out[f"grade {g}"] = ([i for i in result.images if i.true_grade == g], subset)
    for vendor in sorted({s.vendor for s in result.studies}):
        out[f"vendor {vendor}"] = (
            [i for i in result.images if i.vendor == vendor],
            [s for s in result.studies if s.vendor == vendor],
        )
    return out


def _image_tables(
    boot: PatientBootstrap, images: Sequence[ImageRecord]
) -> tuple[Statistic, Statistic]:
    """Pooled and per-image-mean Jaccard as bootstrap statistics."""
    patients = [i.patient for i in images]
    counts = np.array([[i.counts.tp, i.counts.tp + i.counts.fp + i.counts.fn] for i in images])
    counts = counts.reshape(-1, 2)
    jaccard = [i.counts.metrics()["jaccard"] for i in images]
    defined = np.array([[j, 1.0] if not math.isnan(j) else [0.0, 0.0] for j in jaccard])
    pooled_table = boot.per_patient(patients, counts.astype(np.float64))
    mean_table = boot.per_patient(patients, defined.reshape(-1, 2))
    return (
        ratio_statistic(pooled_table[:, 0], pooled_table[:, 1]),
        ratio_statistic(mean_table[:, 0], mean_table[:, 1]),
    )


def summarize(
    images: Sequence[ImageRecord],
    studies: Sequence[StudyRecord],
    *,
    interval_resamples: int,
    seed: int,
    within_grade: bool = False,
) -> dict[str, Any]:
    """Every metric of one stratum. ``within_grade``: all studies share one true grade,
    where kappa has no meaning (it is 0 or undefined by construction) and is left out."""
    counts = [i.counts for i in images]
    patients = sorted({s.patient for s in studies})
    boot = PatientBootstrap(patients, interval_resamples, seed)
    out: dict[str, Any] = {
        "images": len(images),
        "studies": len(studies),
        "patients": len(patients),
        "pooled": pooled_metrics(counts),
        "per_image_mean": mean_image_metrics(counts),
    }
    if images:
        pooled_j, mean_j = _image_tables(boot, images)
        out["pooled_jaccard_interval"] = boot.interval(out["pooled"]["jaccard"], pooled_j).as_dict()
        out["per_image_mean_jaccard_interval"] = boot.interval(
            out["per_image_mean"]["jaccard"], mean_j
        ).as_dict()
    out["grades"] = _grade_summary(studies, boot, within_grade=within_grade)
    return out


def _grade_summary(
    studies: Sequence[StudyRecord], boot: PatientBootstrap, *, within_grade: bool
) -> dict[str, Any]:
    truth = [s.true_grade for s in studies]
    predicted = [s.predicted_grade for s in studies]
    confusion = confusion_matrix(truth, predicted)
    grades: dict[str, Any] = {
        "confusion_true_rows_predicted_columns": confusion.tolist(),
        "exact_agreement": float(np.mean(np.equal(truth, predicted))) if studies else math.nan,
    }
    patients = [s.patient for s in studies]
    if within_grade:
        grades["quadratic_weighted_kappa"] = {"value": math.nan, "note": "one true grade"}
    else:
        per_patient = boot.per_patient(
            patients, np.stack([confusion_matrix([t], [p]).ravel() for t, p in zip(
                truth, predicted, strict=True
            )]) if studies else np.zeros((0, GRADE_COUNT**2)),
        )  # fmt: skip

        def kappa_statistic(w: NDArray[np.float64]) -> NDArray[np.float64]:
            stack = (w @ per_patient).reshape(-1, GRADE_COUNT, GRADE_COUNT)
            return np.asarray(quadratic_kappa(stack), np.float64).reshape(-1)

        kappa = quadratic_kappa(confusion) if studies else math.nan
        grades["quadratic_weighted_kappa"] = boot.interval(float(kappa), kappa_statistic).as_dict()
    positive = [s.true_grade == SEVERE for s in studies]
    called = [s.predicted_grade == SEVERE for s in studies]
    tp = sum(p and c for p, c in zip(positive, called, strict=True))
    positives = sum(positive)
    tn = sum(not p and not c for p, c in zip(positive, called, strict=True))
    negatives = len(studies) - positives
    sens_ci, spec_ci = wilson_interval(tp, positives), wilson_interval(tn, negatives)
    scores = [s.predicted_percent for s in studies]
    auc = auc_pairwise(positive, scores) if positives and negatives else math.nan
    study_patient = np.array([boot.index[p] for p in patients], int)

    def auc_statistic(w: NDArray[np.float64]) -> NDArray[np.float64]:
        return weighted_auc(positive, scores, w[:, study_patient])

    fpr, tpr, thresholds = roc_curve(positive, scores)
    grades["grade3"] = {
        "positives": positives,
        "negatives": negatives,
        "sensitivity": tp / positives if positives else math.nan,
        "sensitivity_ci95_low": sens_ci[0],
        "sensitivity_ci95_high": sens_ci[1],
        "specificity": tn / negatives if negatives else math.nan,
        "specificity_ci95_low": spec_ci[0],
        "specificity_ci95_high": spec_ci[1],
        "interval_method": "Wilson score (sensitivity, specificity); patient bootstrap (AUC)",
        "auc": boot.interval(auc, auc_statistic).as_dict()
        if positives and negatives
        else {"value": math.nan},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "area_percent_threshold": [
            float(t) if math.isfinite(t) else None for t in thresholds
        ]},
    }  # fmt: skip
    true_sides = [t for s in studies for t, _ in s.sides.values()]
    predicted_sides = [p for s in studies for _, p in s.sides.values()]
    grades["area_percent_bland_altman_per_side"] = {
        "sides": len(true_sides),
        **bland_altman(true_sides, predicted_sides),
    }
    return grades


#: Images with less true calcified length than this (mm) are left out of the relative
#: length error (a few pixels of a nearly empty image would dominate it).
RELATIVE_ERROR_FROM_MM = 10.0


def vessel_agreement(images: Sequence[ImageRecord]) -> dict[str, Any]:
    """Measured length against the true length and count (images whose manifest has
    them), and measured length against predicted area %, per image."""
    measured = [i.predicted_vessels.length_mm for i in images]
    out: dict[str, Any] = {
        "images": len(images),
        "length_vs_area_percent": correlations(
            measured, [i.predicted_burden.area_percent for i in images]
        ),
    }
    truth = [i for i in images if i.true_length_mm is not None]
    out["images_with_true_length"] = len(truth)
    if truth:
        true = np.array([i.true_length_mm or 0.0 for i in truth])
        found = np.array([i.predicted_vessels.length_mm for i in truth])
        sized = true >= RELATIVE_ERROR_FROM_MM
        relative = (found[sized] - true[sized]) / true[sized]
        out["length_vs_true"] = {
            **correlations(true, found),
            "bias_mm": float(np.mean(found - true)),
            "median_relative_error": float(np.median(relative)) if relative.size else math.nan,
            "median_absolute_relative_error": float(np.median(np.abs(relative)))
            if relative.size
            else math.nan,
            "within_10_percent": float(np.mean(np.abs(relative) <= 0.10))
            if relative.size
            else math.nan,
            "images_from_10_mm": int(sized.sum()),
            "true_total_mm": float(true.sum()),
            "measured_total_mm": float(found.sum()),
        }
        out["true_length_vs_true_area_percent"] = correlations(
            true, [i.true_burden.area_percent for i in truth]
        )
    counted = [i for i in images if i.true_vessel_count is not None]
    if counted:
        difference = np.array(
            [i.predicted_vessels.vessel_count - (i.true_vessel_count or 0) for i in counted]
        )
        out["vessel_count_vs_true"] = {
            "images": len(counted),
            "exact": float(np.mean(difference == 0)),
            "mean_difference": float(difference.mean()),
            "mean_absolute_difference": float(np.abs(difference).mean()),
        }
    return out


def compare(
    a: SourceResult,
    b: SourceResult,
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Paired bootstrap of the Jaccard difference ``a - b`` by patient, in every stratum
    (on the images both sources scored)."""
    b_by_key = {i.key: i for i in b.images}
    paired = [(i, b_by_key[i.key]) for i in a.images if i.key in b_by_key]
    result: dict[str, Any] = {
        "first": a.label,
        "second": b.label,
        "difference": "first - second",
        "images_paired": len(paired),
        "images_unpaired": len(a.images) + len(b.images) - 2 * len(paired),
        "strata": {},
    }
    for name, (images, _) in strata(a).items():
        members = {id(i) for i in images}
        subset = [(i, j) for i, j in paired if id(i) in members]
        if not subset:
            continue
        boot = PatientBootstrap([i.patient for i, _ in subset], resamples, seed)
        pooled_a, mean_a = _image_tables(boot, [i for i, _ in subset])
        pooled_b, mean_b = _image_tables(boot, [j for _, j in subset])
        observed_pooled = _difference(
            pooled_metrics([i.counts for i, _ in subset])["jaccard"],
            pooled_metrics([j.counts for _, j in subset])["jaccard"],
        )
        observed_mean = _difference(
            mean_image_metrics([i.counts for i, _ in subset])["jaccard"],
            mean_image_metrics([j.counts for _, j in subset])["jaccard"],
        )
        result["strata"][name] = {
            "images": len(subset),
            "patients": len(boot.patients),
            "pooled_jaccard_difference": boot.interval(
                observed_pooled, difference_statistic(pooled_a, pooled_b)
            ).as_dict(),
            "per_image_mean_jaccard_difference": boot.interval(
                observed_mean, difference_statistic(mean_a, mean_b)
            ).as_dict(),
        }
    return result


def _difference(x: float, y: float) -> float:
    return x - y


# --- the whole run ------------------------------------------------------------------


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: the JSON document and the scored rows."""

    doc: dict[str, Any]
    results: list[SourceResult]
    data: LabelledSet
    out: Path


def evaluate(
    data_path: Path | LabelledSet,
    sources: Sequence[PredictionSource],
    out: Path,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    interval_resamples: int = DEFAULT_INTERVAL_RESAMPLES,
    seed: int = 0,
    command: str = "",
    progress: bool = True,
    on_source_done: Callable[[SourceResult], None] | None = None,
) -> Evaluation:
    """Score each source on the labelled set at ``data_path`` (or already read) and write
    ``metrics.json``, ``metrics.csv``, ``images.csv`` and ``studies.csv`` under ``out``.

    The first source is the one evaluated; a second is compared with it (paired
    bootstrap of ``first - second``). Deterministic for a seed (the predictions aside).
    """
    if not 1 <= len(sources) <= 2:
        raise ValueError("evaluate takes one source, or two to compare")
    data = data_path if isinstance(data_path, LabelledSet) else load_labelled_set(data_path)
    out.mkdir(parents=True, exist_ok=True)
    results: list[SourceResult] = []
    for number, source in enumerate(sources):
        result = score_source(data, source, out, f"masks/{number}", progress=progress)
        if results and result.label == results[0].label:
            result.label += " (compared)"  # two versions of one model: keep them apart
        results.append(result)
        if on_source_done:
            on_source_done(result)
    doc: dict[str, Any] = {
        "tool": f"bac-node evaluate {__version__}",
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "research_use_only": "Research use only. Not for clinical use.",
        "data": {
            "path": str(data_path if isinstance(data_path, Path) else data.folder),
            "studies": len(data.studies),
            "patients": len({s.patient_id for s in data.studies}),
        },
        "settings": {
            "resamples": resamples,
            "interval_resamples": interval_resamples,
            "seed": seed,
        },
        "aggregation": paper.AGGREGATION_NOTE,
        "models": [],
    }
    for result in results:
        summaries = {
            name: summarize(
                images,
                studies,
                interval_resamples=interval_resamples,
                seed=seed,
                within_grade=name.startswith("grade "),
            )
            for name, (images, studies) in strata(result).items()
        }
        seconds = [s.seconds for s in result.studies]
        doc["models"].append(
            {
                "label": result.label,
                "source": result.about,
                "seconds_per_study": float(np.mean(seconds)) if seconds else math.nan,
                "not_analysed": [
                    {"study": s, "input": what, "reason": why}
                    for s, what, why in result.not_analysed
                ],
                "strata": summaries,
                "vessels": vessel_agreement(result.images),
            }
        )
    if len(results) == 2:
        doc["comparison"] = compare(results[0], results[1], resamples=resamples, seed=seed)
    doc["paper"] = {
        "source": paper.SOURCE,
        "pixels": {m: {"baseline": b, "semi_supervised": s} for m, b, s in paper.PIXEL_TABLE},
        "jaccard_gain": paper.JACCARD_GAIN,
        "quadratic_weighted_kappa": paper.KAPPA,
        "grade3_auc_range": list(paper.GRADE3_AUC_RANGE),
        "grade3_sensitivity": paper.GRADE3_SENSITIVITY,
        "grade3_specificity": paper.GRADE3_SPECIFICITY,
        "grade1_jaccard": list(paper.GRADE1_JACCARD),
    }
    write_tables(doc, results, out)
    return Evaluation(doc, results, data, out)


# --- files --------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def metric_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every number of the document as ``(model, stratum, metric, value, ci95_low,
    ci95_high)`` rows: the CSV."""
    rows: list[dict[str, Any]] = []

    def add(
        model: str, stratum: str, metric: str, value: Any, low: Any = "", high: Any = ""
    ) -> None:
        rows.append(
            {
                "model": model,
                "stratum": stratum,
                "metric": metric,
                "value": value,
                "ci95_low": low,
                "ci95_high": high,
            }
        )

    for model in doc["models"]:
        label = model["label"]
        add(label, "all", "seconds_per_study", model["seconds_per_study"])
        for stratum, s in model["strata"].items():
            for key in ("images", "studies", "patients"):
                add(label, stratum, key, s[key])
            for aggregation in ("pooled", "per_image_mean"):
                for metric, value in s[aggregation].items():
                    add(label, stratum, f"{aggregation}_{metric}", value)
            for key in ("pooled_jaccard_interval", "per_image_mean_jaccard_interval"):
                if key in s:
                    i = s[key]
                    add(label, stratum, key.replace("_interval", "_bootstrap"), i["value"],
                        i["ci95_low"], i["ci95_high"])  # fmt: skip
            g = s["grades"]
            add(label, stratum, "exact_agreement", g["exact_agreement"])
            k = g["quadratic_weighted_kappa"]
            add(label, stratum, "quadratic_weighted_kappa", k["value"], k.get("ci95_low", ""),
                k.get("ci95_high", ""))  # fmt: skip
            for t, row in enumerate(g["confusion_true_rows_predicted_columns"]):
                for p, n in enumerate(row):
                    add(label, stratum, f"confusion_true{t}_predicted{p}", n)
            g3 = g["grade3"]
            for key in ("positives", "negatives"):
                add(label, stratum, f"grade3_{key}", g3[key])
            for key in ("sensitivity", "specificity"):
                add(label, stratum, f"grade3_{key}", g3[key], g3[f"{key}_ci95_low"],
                    g3[f"{key}_ci95_high"])  # fmt: skip
            auc = g3["auc"]
            add(label, stratum, "grade3_auc", auc["value"], auc.get("ci95_low", ""),
                auc.get("ci95_high", ""))  # fmt: skip
            for key, value in g["area_percent_bland_altman_per_side"].items():
                add(label, stratum, f"area_percent_bland_altman_{key}", value)
        for part, values in model.get("vessels", {}).items():
            if isinstance(values, dict):
                for key, value in values.items():
                    add(label, "all", f"vessels_{part}_{key}", value)
    if "comparison" in doc:
        c = doc["comparison"]
        label = f"{c['first']} - {c['second']}"
        for stratum, s in c["strata"].items():
            for key in ("pooled_jaccard_difference", "per_image_mean_jaccard_difference"):
                i = s[key]
                add(label, stratum, key, i["value"], i["ci95_low"], i["ci95_high"])
    return rows


def write_tables(doc: dict[str, Any], results: Sequence[SourceResult], out: Path) -> None:
    (out / "metrics.json").write_text(
        json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )
    _write_csv(out / "metrics.csv", [_csv_safe(r) for r in metric_rows(doc)])
    image_rows = []
    study_rows = []
    for result in results:
        for i in result.images:
            image_rows.append({
                "model": result.label, "study": i.study, "vendor": i.vendor,
                "true_grade": i.true_grade, "laterality": i.laterality, "view": i.view,
                "sop_instance_uid": i.sop_instance_uid, "tp": i.counts.tp, "fp": i.counts.fp,
                "fn": i.counts.fn, "tn": i.counts.tn,
                **{m: v for m, v in i.counts.metrics().items()},
                "true_area_percent": i.true_burden.area_percent,
                "predicted_area_percent": i.predicted_burden.area_percent,
                "true_length_mm": "" if i.true_length_mm is None else i.true_length_mm,
                "predicted_length_mm": i.predicted_vessels.length_mm,
                "true_vessel_count": "" if i.true_vessel_count is None else i.true_vessel_count,
                "predicted_vessel_count": i.predicted_vessels.vessel_count,
                "predicted_longest_mm": i.predicted_vessels.longest_mm,
                "predicted_mask": i.predicted_mask,
            })  # fmt: skip
        for s in result.studies:
            study_rows.append({
                "model": result.label, "study": s.study, "vendor": s.vendor,
                "true_grade": s.true_grade, "predicted_grade": s.predicted_grade,
                "true_area_percent": s.true_percent,
                "predicted_area_percent": s.predicted_percent,
                **{f"{lat}_true_area_percent": t for lat, (t, _) in s.sides.items()},
                **{f"{lat}_predicted_area_percent": p for lat, (_, p) in s.sides.items()},
                "seconds": s.seconds,
            })  # fmt: skip
    _write_csv(out / "images.csv", [_csv_safe(r) for r in image_rows])
    _write_csv(out / "studies.csv", [_csv_safe(r) for r in study_rows])


def _csv_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
