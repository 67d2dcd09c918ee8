"""The patient bootstrap: resample patients with replacement, recompute, take percentiles.

Images and studies of one woman are not independent (two breasts, two views, prior
screening rounds), so every interval here resamples *patients*: each resample draws
as many patients as there are, with replacement, and a patient drawn twice counts
twice with all her images and studies. A resample is a row of patient multiplicities
``W`` (``resamples x patients``), so a statistic that is a ratio of sums is one matrix
product (``W @ per_patient_sums``); resamples are made in chunks to bound memory.

Deterministic for a seed: the same seed, resample count and patient list give the
same draws, whatever the statistic (so two models compared on one draw are paired).
The interval is the 2.5th and 97.5th percentile of the resampled statistic, resamples
where it is undefined (e.g. a Grade 3 AUC with no Grade 3 study drawn) left out and
counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Resamples per chunk: a 2,000-patient test set at 1,000 x 2,000 doubles is 16 MB.
CHUNK = 1_000

Statistic = Callable[[NDArray[np.float64]], NDArray[np.float64]]
"""Maps multiplicities ``(n, patients)`` to the statistic of each resample ``(n,)``."""


@dataclass(frozen=True)
class Interval:
    """A statistic on the observed data and its 95 % bootstrap percentile interval."""

    value: float
    low: float
    high: float
    resamples: int
    undefined: int
    """Resamples where the statistic had no value (left out of the percentiles)."""

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}value" if prefix else "value": self.value,
            f"{prefix}ci95_low": self.low,
            f"{prefix}ci95_high": self.high,
            f"{prefix}resamples": float(self.resamples),
            f"{prefix}resamples_undefined": float(self.undefined),
        }


class PatientBootstrap:
    """Resamples of ``patients`` (one entry per distinct patient, any order)."""

    def __init__(self, patients: Sequence[str], resamples: int, seed: int) -> None:
        if resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {resamples}")
        self.patients = sorted(set(patients))
        self.index = {p: i for i, p in enumerate(self.patients)}
        self.resamples = resamples
        self.seed = seed

    def weights(self) -> Iterator[NDArray[np.float64]]:
        """Patient multiplicities, ``(chunk, patients)`` at a time, the same every call."""
        rng = np.random.default_rng(self.seed)
        n = len(self.patients)
        done = 0
        while done < self.resamples:
            size = min(CHUNK, self.resamples - done)
            draws = rng.integers(0, n, size=(size, n))
            rows = np.repeat(np.arange(size), n)
            w = np.bincount(rows * n + draws.ravel(), minlength=size * n).reshape(size, n)
            yield w.astype(np.float64)
            done += size

    def per_patient(
        self, patient_of_item: Sequence[str], values: NDArray[Any]
    ) -> NDArray[np.float64]:
        """Sum the rows of ``values`` (one per item) by patient: ``(patients, ...)``."""
        values = np.asarray(values, np.float64)
        out = np.zeros((len(self.patients), *values.shape[1:]), np.float64)
        np.add.at(out, [self.index[p] for p in patient_of_item], values)
        return out

    def interval(self, observed: float, statistic: Statistic) -> Interval:
        """``observed`` with the 95 % interval of ``statistic`` over the resamples."""
        values = np.concatenate([statistic(w) for w in self.weights()])
        finite = values[np.isfinite(values)]
        if finite.size == 0 or not math.isfinite(observed):
            low = high = math.nan
        else:
            low, high = (float(v) for v in np.percentile(finite, [2.5, 97.5]))
        return Interval(float(observed), low, high, self.resamples, int(values.size - finite.size))


def ratio_statistic(numerator: NDArray[np.float64], denominator: NDArray[np.float64]) -> Statistic:
    """``sum(numerator) / sum(denominator)`` of each resample (per-patient sums given);
    NaN where the denominator is 0."""

    def statistic(w: NDArray[np.float64]) -> NDArray[np.float64]:
        top, bottom = w @ numerator, w @ denominator
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(np.where(bottom > 0, top / bottom, np.nan), np.float64)

    return statistic


def difference_statistic(a: Statistic, b: Statistic) -> Statistic:
    """``a - b`` on the same resample (the paired bootstrap)."""

    def statistic(w: NDArray[np.float64]) -> NDArray[np.float64]:
        return a(w) - b(w)

    return statistic
