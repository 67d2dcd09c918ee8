"""Held-out test of trained models on phantom studies no training run has seen.

``python -m training.heldout --data DIR --model final.safetensors [--compare baseline.safetensors]
--out results.json`` runs the analysis exactly as the node does (``measure_study``: the
canvas, the model, masks mapped back to each image's own rows and columns) on every
study of a labelled folder (``bac-node synth`` output; every split is used, the seeds
must differ from the training run's) and compares with the phantom's ground truth:

- pixels, at source resolution inside the breast: Jaccard and Dice pooled over all
  images (the aggregation the model card reports) and the mean of per-image values;
  pooled per vendor and per true study grade;
- grades: study grade agreement (quadratic weighted kappa), the confusion matrix, and
  Grade 3 detection (sensitivity, specificity) at the paper's threshold;
- with ``--compare``: a paired bootstrap (resampling patients, 10,000 times) of the
  pooled Jaccard difference ``model - compare``, with a 95 % interval.

The evaluation issue turns this into ``bac-node evaluate`` with its report; this module
is what the model card's held-out numbers come from.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bac_node.analysis import CanvasModel, measure_study
from bac_node.dicom.selection import read_paths, select_studies
from bac_node.grading import BACGrade
from bac_node.model.inference import load_predictor
from training.datasets import read_labelled_rows
from training.phantom.study import load_mask


@dataclass
class ImageCounts:
    study: str
    patient: str
    vendor: str
    true_grade: int
    tp: int
    fp: int
    fn: int


@dataclass
class StudyGrades:
    study: str
    patient: str
    vendor: str
    true_grade: int
    predicted_grade: int
    true_percent: float
    predicted_percent: float


def quadratic_kappa(a: Sequence[int], b: Sequence[int], k: int = 4) -> float:
    """Cohen's kappa with quadratic weights over categories 0..k-1."""
    observed = np.zeros((k, k))
    for x, y in zip(a, b, strict=True):
        observed[x, y] += 1
    n = observed.sum()
    if n == 0:
        return float("nan")
    expected = np.outer(observed.sum(1), observed.sum(0)) / n
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    denominator = (weights * expected).sum()
    return 1.0 if denominator == 0 else float(1 - (weights * observed).sum() / denominator)


def pooled(counts: Sequence[ImageCounts]) -> dict[str, float]:
    tp = sum(c.tp for c in counts)
    fp = sum(c.fp for c in counts)
    fn = sum(c.fn for c in counts)
    per_image = [c.tp / (c.tp + c.fp + c.fn) for c in counts if c.tp + c.fp + c.fn]
    return {
        "jaccard": tp / max(tp + fp + fn, 1),
        "dice": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "mean_image_jaccard": float(np.mean(per_image)) if per_image else float("nan"),
        "images": len(counts),
    }


def evaluate_model(
    folder: Path, model_path: Path, device: str = "cpu"
) -> tuple[list[ImageCounts], list[StudyGrades], dict[str, Any]]:
    from tqdm import tqdm

    predictor, card, untrained = load_predictor(str(model_path), device=device)
    canvas_model = CanvasModel(card.input_spacing_mm, card.threshold)
    rows = [r for r in read_labelled_rows(folder) if r["presentation_intent"] == "FOR PRESENTATION"]
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_study[str(row["study"])].append(row)
    images: list[ImageCounts] = []
    studies: list[StudyGrades] = []
    started = time.perf_counter()
    for study, members in tqdm(by_study.items(), desc=model_path.name, disable=None):
        by_uid = {str(r["sop_instance_uid"]): r for r in members}
        found, rejected = read_paths([folder / str(r["file"]) for r in members])
        selections = select_studies(found, rejected)
        if len(selections) != 1:
            raise RuntimeError(f"{study}: expected one study, got {len(selections)}")
        result = measure_study(selections[0], predictor, canvas_model)
        first = members[0]
        true_grade = int(first["study_grade"])
        for image in result.images:
            row = by_uid[image.image.sop_instance_uid]
            truth = load_mask(folder / str(row["bac_mask"])) & image.breast_mask
            predicted = image.bac_mask
            images.append(
                ImageCounts(
                    study,
                    str(first["patient_id"]),
                    str(first["vendor"]),
                    true_grade,
                    int(np.count_nonzero(predicted & truth)),
                    int(np.count_nonzero(predicted & ~truth)),
                    int(np.count_nonzero(~predicted & truth)),
                )
            )
        true_percent = max(float(r["side_area_percent"]) for r in members)
        predicted_percent = max((b.area_percent for b in result.sides.values()), default=0.0)
        studies.append(
            StudyGrades(
                study,
                str(first["patient_id"]),
                str(first["vendor"]),
                true_grade,
                int(result.grade),
                true_percent,
                predicted_percent,
            )
        )
    info = {
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "untrained": untrained,
        "seconds_per_study": (time.perf_counter() - started) / max(len(by_study), 1),
    }
    return images, studies, info


def summarize(images: list[ImageCounts], studies: list[StudyGrades]) -> dict[str, Any]:
    out: dict[str, Any] = {"pixels": pooled(images)}
    out["per_vendor"] = {
        v: pooled([c for c in images if c.vendor == v]) for v in sorted({c.vendor for c in images})
    }
    out["per_grade"] = {
        str(g): pooled([c for c in images if c.true_grade == g])
        for g in sorted({c.true_grade for c in images})
    }
    truth = [s.true_grade for s in studies]
    predicted = [s.predicted_grade for s in studies]
    confusion = np.zeros((4, 4), int)
    for t, p in zip(truth, predicted, strict=True):
        confusion[t, p] += 1
    severe = int(BACGrade.SEVERE)
    positives = [s for s in studies if s.true_grade == severe]
    negatives = [s for s in studies if s.true_grade != severe]
    out["grades"] = {
        "studies": len(studies),
        "quadratic_weighted_kappa": quadratic_kappa(truth, predicted),
        "exact_agreement": float(np.mean(np.equal(truth, predicted))) if studies else 0.0,
        "confusion_true_rows_predicted_columns": confusion.tolist(),
        "grade3_sensitivity": (
            float(np.mean([s.predicted_grade == severe for s in positives]))
            if positives else float("nan")
        ),
        "grade3_specificity": (
            float(np.mean([s.predicted_grade != severe for s in negatives]))
            if negatives else float("nan")
        ),
        "area_percent_mean_difference": float(
            np.mean([s.predicted_percent - s.true_percent for s in studies])
        ),
    }  # fmt: skip
    return out


def paired_bootstrap(
    a: list[ImageCounts], b: list[ImageCounts], resamples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Pooled Jaccard of ``a`` minus ``b`` (same images), resampling patients."""
    patients = sorted({c.patient for c in a})
    index = {p: i for i, p in enumerate(patients)}

    def per_patient(counts: list[ImageCounts]) -> NDArray[np.float64]:
        table = np.zeros((len(patients), 3))
        for c in counts:
            table[index[c.patient]] += (c.tp, c.fp, c.fn)
        return table

    ta, tb = per_patient(a), per_patient(b)

    def jaccard(t: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(t[..., 0] / np.maximum(t.sum(-1), 1))

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(resamples, len(patients)))
    diff = jaccard(ta[draws].sum(1)) - jaccard(tb[draws].sum(1))
    observed = float(jaccard(ta.sum(0)) - jaccard(tb.sum(0)))
    low, high = np.percentile(diff, [2.5, 97.5])
    return {
        "jaccard_difference": observed,
        "ci95_low": float(low),
        "ci95_high": float(high),
        "resamples": resamples,
        "patients": len(patients),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    images, studies, info = evaluate_model(args.data, args.model, args.device)
    doc: dict[str, Any] = {"data": str(args.data), **info, **summarize(images, studies)}
    if args.compare:
        other_images, other_studies, other_info = evaluate_model(
            args.data, args.compare, args.device
        )
        doc["compare"] = {**other_info, **summarize(other_images, other_studies)}
        doc["paired_bootstrap"] = paired_bootstrap(images, other_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: doc[k] for k in ("pixels", "grades")}, indent=1))
    if "paired_bootstrap" in doc:
        print(json.dumps(doc["paired_bootstrap"], indent=1))


if __name__ == "__main__":
    main()
