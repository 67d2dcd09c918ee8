"""Install a trained model as the package's default, with its held-out figures in the card.

``python -m training.ship --model RUN/final.safetensors --heldout EVAL/metrics.json
--data-note TEXT [--out bac_node/model/weights/default.safetensors]``

The held-out figures come from ``bac-node evaluate --model RUN/final.safetensors
[--compare RUN/baseline.safetensors] --data HELDOUT --out EVAL`` (``--heldout`` takes
its ``metrics.json`` or the folder). The card keeps what training wrote (architecture,
spacing, threshold, validation and test-split metrics, timings) and gains the
evaluation's ``heldout_*`` figures of the evaluated (first) model: pooled and
per-image-mean Jaccard/Dice at source resolution, per vendor and per grade, grade kappa,
Grade 3 sensitivity/specificity/AUC, and the paired-bootstrap Jaccard gain over the
compared model when there was one; and a training-data line that says plainly what
the model has and has not seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bac_node.model.weights import load_model, save_model

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "bac_node/model/weights/default.safetensors"


def heldout_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """The card's ``heldout_*`` metrics from a ``bac-node evaluate`` ``metrics.json``."""
    model = doc["models"][0]
    everything = model["strata"]["all"]
    grades = everything["grades"]
    metrics: dict[str, Any] = {
        "heldout_jaccard": everything["pooled"]["jaccard"],
        "heldout_dice": everything["pooled"]["dice"],
        "heldout_mean_image_jaccard": everything["per_image_mean"]["jaccard"],
        "heldout_mean_image_dice": everything["per_image_mean"]["dice"],
        "heldout_studies": everything["studies"],
        "heldout_grade_kappa": grades["quadratic_weighted_kappa"]["value"],
        "heldout_grade3_sensitivity": grades["grade3"]["sensitivity"],
        "heldout_grade3_specificity": grades["grade3"]["specificity"],
        "heldout_grade3_auc": grades["grade3"]["auc"]["value"],
        "heldout_seconds_per_study_cpu": model["seconds_per_study"],
    }
    for name, values in model["strata"].items():
        kind, _, value = name.partition(" ")
        if kind in ("vendor", "grade"):
            metrics[f"heldout_jaccard_{kind}_{value}"] = values["pooled"]["jaccard"]
    if "comparison" in doc:
        gain = doc["comparison"]["strata"]["all"]["pooled_jaccard_difference"]
        metrics["heldout_jaccard_gain_vs_baseline"] = gain["value"]
        metrics["heldout_jaccard_gain_ci95_low"] = gain["ci95_low"]
        metrics["heldout_jaccard_gain_ci95_high"] = gain["ci95_high"]
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def read_heldout(path: Path) -> dict[str, Any]:
    """An evaluation's ``metrics.json`` (or the ``metrics.json`` in folder ``path``)."""
    if path.is_dir():
        path = path / "metrics.json"
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if "models" not in doc:
        raise SystemExit(f"{path}: not a bac-node evaluate metrics.json")
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--heldout", type=Path, required=True, help="bac-node evaluate's metrics.json (or folder)."
    )
    parser.add_argument("--data-note", required=True, help="What the model was trained on.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    model, card = load_model(args.model)
    doc = read_heldout(args.heldout)
    card = dataclasses.replace(
        card,
        training_data=f"{card.training_data}. {args.data_note}",
        metrics={**card.metrics, **heldout_metrics(doc)},
    )
    saved = save_model(args.out, model, card)
    size = args.out.stat().st_size / 2**20
    print(f"{args.out}: {saved.name} {saved.version}, {size:.1f} MiB, sha256 {saved.sha256}")


if __name__ == "__main__":
    main()
