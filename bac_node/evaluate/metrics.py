"""The evaluation's metrics, from counts: pixels, grades, Grade 3 detection, agreement.

Pure numpy, no I/O. Each function is tested against an independent implementation
(scikit-learn) on random inputs.

Pixel metrics come from a :class:`PixelCounts` (true/false positives and negatives
inside the evaluation region). They are aggregated two ways:

- **pooled**: the counts of all images are summed first, then the ratio is taken
  (every BAC pixel weighs the same; ``dice == 2 J / (1 + J)`` holds exactly);
- **per-image mean**: the metric of each image, then the mean over images. An image
  where a metric is undefined (0/0: e.g. Jaccard with no BAC in truth nor prediction)
  is left out of that mean and counted in ``undefined``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: The pixel metrics, in the order of the source study's table.
PIXEL_METRICS = ("jaccard", "accuracy", "dice", "precision", "recall")
#: Grades 0-3.
GRADE_COUNT = 4


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of one image (or of several, summed)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @staticmethod
    def of(
        truth: NDArray[np.bool_], predicted: NDArray[np.bool_], region: NDArray[np.bool_]
    ) -> PixelCounts:
        """Counts of ``predicted`` against ``truth`` over every pixel; true negatives only
        inside ``region`` (a positive outside the region still counts)."""
        if not truth.shape == predicted.shape == region.shape:
            raise ValueError(
                f"mask shapes differ: truth {truth.shape}, predicted {predicted.shape}, "
                f"region {region.shape}"
            )
        tp = int(np.count_nonzero(truth & predicted))
        fp = int(np.count_nonzero(~truth & predicted))
        fn = int(np.count_nonzero(truth & ~predicted))
        tn = int(np.count_nonzero(region & ~truth & ~predicted))
        return PixelCounts(tp, fp, fn, tn)

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @staticmethod
    def total(counts: Iterable[PixelCounts]) -> PixelCounts:
        out = PixelCounts(0, 0, 0, 0)
        for c in counts:
            out = out + c
        return out

    def metrics(self) -> dict[str, float]:
        """Jaccard, accuracy, Dice, precision, recall; NaN where 0/0."""
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        return {
            "jaccard": _ratio(tp, tp + fp + fn),
            "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
        }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def pooled_metrics(counts: Sequence[PixelCounts]) -> dict[str, float]:
    """Metrics of the summed counts."""
    return PixelCounts.total(counts).metrics()


def mean_image_metrics(counts: Sequence[PixelCounts]) -> dict[str, float]:
    """Mean over images of each metric, images where it is undefined left out."""
    per_image = [c.metrics() for c in counts]
    out: dict[str, float] = {}
    for name in PIXEL_METRICS:
        values = [m[name] for m in per_image if not math.isnan(m[name])]
        out[name] = float(np.mean(values)) if values else math.nan
        out[f"{name}_undefined"] = float(len(per_image) - len(values))
    return out


# --- grades -------------------------------------------------------------------------


def confusion_matrix(
    truth: ArrayLike, predicted: ArrayLike, k: int = GRADE_COUNT
) -> NDArray[np.int64]:
    """``k`` x ``k`` counts, true grade in rows, predicted grade in columns."""
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (np.asarray(truth, int), np.asarray(predicted, int)), 1)
    return matrix


def quadratic_kappa(confusion: ArrayLike) -> NDArray[np.float64] | float:
    """Cohen's kappa with quadratic weights of one confusion matrix ``(k, k)``, or of a
    stack ``(..., k, k)`` (vectorised for the bootstrap).

    When chance disagreement is 0 (every study in one category on both sides) kappa is
    0/0: NaN, as scikit-learn gives, not a perfect 1 (one category proves nothing).
    """
    observed = np.asarray(confusion, np.float64)
    k = observed.shape[-1]
    n = observed.sum(axis=(-2, -1))
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = (
            observed.sum(-1)[..., :, None] * observed.sum(-2)[..., None, :] / n[..., None, None]
        )
        disagreement = (weights * observed).sum(axis=(-2, -1))
        chance = (weights * expected).sum(axis=(-2, -1))
        kappa = 1.0 - disagreement / chance
    kappa = np.where((chance == 0) | (n == 0), np.nan, kappa)
    return float(kappa) if kappa.ndim == 0 else np.asarray(kappa, np.float64)


def roc_curve(
    positive: ArrayLike, score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(false positive rate, true positive rate, threshold) at every distinct score, from
    the highest threshold (nothing called positive) down; a study is called positive
    when its score is ``>=`` the threshold."""
    y = np.asarray(positive, bool)
    s = np.asarray(score, np.float64)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    called = s[None, :] >= thresholds[:, None]
    tpr = (called & y).sum(1) / max(int(y.sum()), 1)
    fpr = (called & ~y).sum(1) / max(int((~y).sum()), 1)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def auc_pairwise(positive: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve as the probability that a positive scores above a
    negative (ties count one half); NaN without both classes."""
    value = weighted_auc(positive, score, np.ones((1, np.asarray(positive).size)))[0]
    return float(value)


def weighted_auc(
    positive: ArrayLike, score: ArrayLike, weights: NDArray[np.float64]
) -> NDArray[np.float64]:
    """AUC under each row of study ``weights`` ``(resamples, studies)``: the bootstrap's
    multiplicities. NaN for a row without a positive or a negative."""
    y = np.asarray(positive, bool)
    s = np.asarray(score, np.float64)
    wins = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
    wp, wn = weights[:, y], weights[:, ~y]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.einsum("rp,pn,rn->r", wp, wins, wn) / (wp.sum(1) * wn.sum(1))
    return np.asarray(value, np.float64)


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (NaN, NaN without trials).

    Used for sensitivity and specificity: unlike a bootstrap it does not collapse to
    [1, 1] when every case is right.
    """
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def bland_altman(reference: ArrayLike, measured: ArrayLike) -> dict[str, float]:
    """Bias (mean of measured - reference) and the 95 % limits of agreement."""
    difference = np.asarray(measured, np.float64) - np.asarray(reference, np.float64)
    if difference.size == 0:
        return {"bias": math.nan, "sd": math.nan, "lower_loa": math.nan, "upper_loa": math.nan}
    bias = float(difference.mean())
    sd = float(difference.std(ddof=1)) if difference.size > 1 else math.nan
    return {
        "bias": bias,
        "sd": sd,
        "lower_loa": bias - 1.96 * sd,
        "upper_loa": bias + 1.96 * sd,
    }


# --- agreement of continuous measurements ----------------------------------------------


def correlations(x: ArrayLike, y: ArrayLike) -> dict[str, float]:
    """Pearson's r and Spearman's rho of paired values (NaN with fewer than 3 pairs or
    a constant side), and how many pairs."""
    from scipy import stats

    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    out = {"n": float(a.size), "pearson": math.nan, "spearman": math.nan}
    if a.size >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
        out["pearson"] = float(stats.pearsonr(a, b)[0])
        out["spearman"] = float(stats.spearmanr(a, b)[0])
    return out
