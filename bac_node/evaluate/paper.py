"""The source study's reported numbers (shared/method.md: Ibrahim et al., Canadian
Association of Radiologists Journal, 2025), in one place, to print beside ours.

Which aggregation the paper's pixel metrics use: its F1 (0.756) is neither
``2 J / (1 + J)`` of its Jaccard (0.614 gives 0.761) nor ``2 P R / (P + R)`` of its
precision and recall (0.763 and 0.764 give 0.763). Both identities hold exactly for
pooled counts, and fail for averages of per-image (or per-batch) values, which are
what the published Keras notebooks report (``model.evaluate`` averages a metric over
batches). So the paper's figures are means over images, and our **per-image mean** is
the comparable aggregation; the pooled figures are shown too (they weigh every BAC
pixel the same and are what the model card quotes). The paper's accuracy counts every
pixel of its patches (mostly background); ours counts the breast only, so it is lower
for the same segmentation.
"""

from __future__ import annotations

#: (metric, baseline, semi-supervised) as in method.md's results table; None: not reported.
PIXEL_TABLE: tuple[tuple[str, float | None, float | None], ...] = (
    ("jaccard", 0.602, 0.614),
    ("accuracy", None, 0.991),
    ("dice", None, 0.756),
    ("precision", None, 0.763),
    ("recall", None, 0.764),
)

#: What the table rows are called in the paper.
PIXEL_NAMES = {
    "jaccard": "Jaccard (JSC)",
    "accuracy": "accuracy",
    "dice": "F1 / Dice",
    "precision": "precision",
    "recall": "recall",
}

JACCARD_GAIN = {"value": 0.0114, "ci95_low": 0.0072, "ci95_high": 0.0156, "resamples": 100_000}
KAPPA = 0.90
KAPPA_RESAMPLES = 5_000
GRADE3_AUC_RANGE = (0.87, 0.93)
GRADE3_SENSITIVITY = 0.80
GRADE3_SPECIFICITY = 0.93
GRADE1_JACCARD = (0.450, 0.471)
"""Grade 1 stratum Jaccard, baseline then semi-supervised."""

AGGREGATION_NOTE = (
    "The paper's pixel figures are means over images (its F1 0.756 is neither 2J/(1+J) "
    "= 0.761 of its Jaccard 0.614 nor 2PR/(P+R) = 0.763 of its precision and recall, as "
    "pooled counts would give): compare them with our per-image means. Pooled figures "
    "(counts summed over all images first) are shown too. Our accuracy counts breast "
    "pixels only; the paper's counts whole patches, mostly background."
)

SOURCE = "Ibrahim et al., Can Assoc Radiol J 2025 (shared/method.md)"
