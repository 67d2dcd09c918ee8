"""Install a trained model as the package's default, with its held-out figures in the card.

``python -m training.ship --model RUN/final.safetensors --heldout heldout.json
[--out bac_node/model/weights/default.safetensors]``

The card keeps what training wrote (architecture, spacing, threshold, validation and
test-split metrics, timings) and gains the held-out figures of
:mod:`training.heldout` (``heldout_*``: pooled Jaccard/Dice at source resolution, per
vendor, grade kappa, Grade 3 sensitivity/specificity, and the paired-bootstrap Jaccard
gain over the baseline when the held-out run compared them) and a training-data line
that says plainly what the model has and has not seen.
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
    metrics = {
        "heldout_jaccard": doc["pixels"]["jaccard"],
        "heldout_dice": doc["pixels"]["dice"],
        "heldout_mean_image_jaccard": doc["pixels"]["mean_image_jaccard"],
        "heldout_studies": doc["grades"]["studies"],
        "heldout_grade_kappa": doc["grades"]["quadratic_weighted_kappa"],
        "heldout_grade3_sensitivity": doc["grades"]["grade3_sensitivity"],
        "heldout_grade3_specificity": doc["grades"]["grade3_specificity"],
        "heldout_seconds_per_study_cpu": doc["seconds_per_study"],
    }
    for vendor, values in doc["per_vendor"].items():
        metrics[f"heldout_jaccard_vendor_{vendor}"] = values["jaccard"]
    for grade, values in doc["per_grade"].items():
        metrics[f"heldout_jaccard_grade_{grade}"] = values["jaccard"]
    if "paired_bootstrap" in doc:
        boot = doc["paired_bootstrap"]
        metrics["heldout_jaccard_gain_vs_baseline"] = boot["jaccard_difference"]
        metrics["heldout_jaccard_gain_ci95_low"] = boot["ci95_low"]
        metrics["heldout_jaccard_gain_ci95_high"] = boot["ci95_high"]
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--data-note", required=True, help="What the model was trained on.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    model, card = load_model(args.model)
    doc = json.loads(args.heldout.read_text(encoding="utf-8"))
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
