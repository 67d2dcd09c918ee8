"""A study's results as DICOM (one SEG per analysed image, one TID 1500 SR) and JSON.

``build_results`` turns a :class:`bac_node.analysis.StudyResult` into datasets (pure);
``write_results`` stores them under ``OUT/<StudyInstanceUID>/``. SEG and SR UIDs
depend only on the source SOP Instance UIDs and the model version, so analysing a
study again gives the same instances (their content date/time says when they were
made).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from bac_node import __version__
from bac_node.analysis import StudyResult
from bac_node.grading import cardiovascular_flag
from bac_node.model.weights import INTENDED_USE, ModelCard
from bac_node.outputs.seg import build_bac_segmentation
from bac_node.outputs.sr import (
    ImageMeasurement,
    PriorComparison,
    PriorLookup,
    SideMeasurement,
    StudySummary,
    breast_roi,
    build_measurement_report,
)


@dataclass
class StudyOutputs:
    result: StudyResult
    segmentations: Sequence[pydicom.Dataset]
    report: pydicom.Dataset
    summary: dict[str, Any]


def build_results(
    result: StudyResult,
    card: ModelCard,
    *,
    content_datetime: dt.datetime | None = None,
    prior: PriorLookup | None = None,
) -> StudyOutputs:
    """SEG per analysed image, the study's SR and its JSON summary.

    ``prior`` (the node's prior lookup, priors on) adds the comparison with the prior
    study to the SR and ``"prior"`` to the summary; None (priors off) adds neither.
    """
    comparison = prior_comparison(result, prior) if prior is not None else None
    when = content_datetime or dt.datetime.now().replace(microsecond=0)
    segmentations = []
    measurements = []
    for image in result.images:
        seg = build_bac_segmentation(
            image.image.dataset, image.bac_mask,
            model_name=card.name, model_version=card.version, content_datetime=when,
            laterality=image.image.laterality,
        )  # fmt: skip
        segmentations.append(seg)
        measurements.append(
            ImageMeasurement(
                source=image.image.dataset,
                laterality=image.image.laterality,
                view=image.image.view,
                bac_pixels=image.burden.bac_pixels,
                breast_pixels=image.burden.breast_pixels,
                pixel_spacing_mm=image.image.pixel_spacing_mm,
                roi=breast_roi(image.breast_mask),
                segmentation=seg,
                vessels=image.vessels,
            )
        )
    side_vessels = result.side_vessels
    sides = [
        SideMeasurement(lat, burden, side_vessels[lat]) for lat, burden in result.sides.items()
    ]
    report = build_measurement_report(
        measurements, sides, StudySummary(result.grade, result.vessels), result.not_analysed,
        model_name=card.name, model_version=card.version, content_datetime=when,
        comparison=comparison,
    )  # fmt: skip
    summary = summarize(result, card, segmentations, report)
    if comparison is not None:
        summary["prior"] = prior_summary(comparison)
    return StudyOutputs(result, segmentations, report, summary)


def study_date(result: StudyResult) -> dt.date | None:
    """The analysed study's Study Date (None when absent or not a valid DA)."""
    for image in result.images:
        text = str(image.image.dataset.get("StudyDate", "") or "").strip()
        try:
            return dt.datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            continue
    return None


def prior_comparison(result: StudyResult, lookup: PriorLookup) -> PriorComparison:
    """The current study (area % of the higher side, grade) against ``lookup``'s prior."""
    sides = [burden.area_percent for burden in result.sides.values()]
    return PriorComparison(
        lookup=lookup,
        current_date=study_date(result),
        current_area_percent=max(sides) if sides else 0.0,
        current_grade=result.grade,
        current_length_mm=result.vessels.length_mm,
    )


def _mm(length: float | None) -> float | None:
    return None if length is None else round(length, 2)


def prior_summary(comparison: PriorComparison) -> dict[str, Any]:
    """``summary.json``'s ``"prior"``: the comparison, or why there is none (UIDs only)."""
    prior = comparison.prior
    if prior is None:
        return {"compared": False, "reason": comparison.lookup.reason}
    return {
        "compared": True,
        "study_instance_uid": prior.study_instance_uid,
        "study_date": prior.study_date.isoformat(),
        "source": prior.source,
        "interval_months": comparison.interval_months,
        "area_percent": {
            "prior": round(prior.area_percent, 5),
            "current": round(comparison.current_area_percent, 5),
        },
        "grade": {"prior": int(prior.grade), "current": int(comparison.current_grade)},
        "length_mm": {"prior": _mm(prior.length_mm), "current": _mm(comparison.current_length_mm)},
        "progressed": comparison.progressed,
    }


def summarize(
    result: StudyResult,
    card: ModelCard,
    segmentations: Sequence[pydicom.Dataset],
    report: pydicom.Dataset,
) -> dict[str, Any]:
    """The JSON summary of a study (UIDs only: no patient identifiers).

    Beside each area %: ``bac_length_mm``, ``bac_vessel_count``, ``bac_longest_mm``
    per image, per side and (``study_``-prefixed) per study; see
    :mod:`bac_node.imaging.vessels` for the method and how views and sides pool.
    """
    side_vessels = result.side_vessels
    return {
        "study_instance_uid": result.study_instance_uid,
        "intended_use": INTENDED_USE,
        "bac_node_version": __version__,
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "images": [
            {
                "sop_instance_uid": r.image.sop_instance_uid,
                "laterality": r.image.laterality,
                "view": r.image.view,
                "presentation_intent": r.image.presentation_intent,
                "paired": r.paired,
                "orientation_corrected": r.orientation_corrected,
                "bac_pixels": r.burden.bac_pixels,
                "breast_pixels": r.burden.breast_pixels,
                "bac_area_mm2": round(r.burden.bac_mm2, 3),
                "breast_area_mm2": round(r.burden.breast_mm2, 3),
                "bac_area_percent": round(r.burden.area_percent, 5),
                "grade": int(r.burden.grade),
                **r.vessels.as_dict(),
                "seg_sop_instance_uid": str(seg.SOPInstanceUID),
            }
            for r, seg in zip(result.images, segmentations, strict=True)
        ],
        "sides": {
            lat: {
                "bac_area_mm2": round(b.bac_mm2, 3),
                "breast_area_mm2": round(b.breast_mm2, 3),
                "bac_area_percent": round(b.area_percent, 5),
                "grade": int(b.grade),
                **side_vessels[lat].as_dict(),
            }
            for lat, b in result.sides.items()
        },
        "study_grade": int(result.grade),
        **{f"study_{k}": v for k, v in result.vessels.as_dict().items()},
        "cardiovascular_flag": cardiovascular_flag(result.grade),
        "not_analysed": [{"source": s, "reason": r} for s, r in result.not_analysed],
        "sr_sop_instance_uid": str(report.SOPInstanceUID),
        "seconds": round(result.seconds, 2),
    }


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_results(outputs: StudyOutputs, out_dir: Path) -> Path:
    """``OUT/<StudyInstanceUID>/`` with ``seg-<LAT>-<VIEW>.dcm``, ``sr.dcm``, ``summary.json``."""
    study_dir = out_dir / outputs.result.study_instance_uid
    study_dir.mkdir(parents=True, exist_ok=True)
    for image, seg in zip(outputs.result.images, outputs.segmentations, strict=True):
        label = f"{image.image.laterality}-{image.image.view or 'image'}"
        name = f"seg-{label}-{image.image.sop_instance_uid}.dcm"
        _write_atomic(study_dir / name, lambda p, s=seg: s.save_as(p, enforce_file_format=True))
    _write_atomic(
        study_dir / "sr.dcm", lambda p: outputs.report.save_as(p, enforce_file_format=True)
    )
    text = json.dumps(outputs.summary, indent=1) + "\n"
    _write_atomic(study_dir / "summary.json", lambda p: p.write_text(text, encoding="utf-8"))
    return study_dir
