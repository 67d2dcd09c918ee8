"""BAC burden grading: the one place the grade thresholds live.

BAC area % = BAC pixels / breast pixels x 100 (Ibrahim et al. 2025). Grades:
``< 0.2`` → 0 absent, ``0.2 ≤ x < 1`` → 1 mild, ``1 ≤ x ≤ 2.5`` → 2 moderate,
``> 2.5`` → 3 severe. The paper gives the bands as "0.2-1 %" and "1-2.5 %"; we put
each shared edge in the higher band except 2.5 %, which stays moderate, because
"severe" is defined as *more than* 2.5 %. Grade 3 raises the cardiovascular flag.

A side's burden pools its views (BAC pixels of CC + MLO over breast pixels of CC + MLO,
all views of one study having one pixel spacing); the study's grade is the grade of
the higher-burden side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum


class BACGrade(IntEnum):
    ABSENT = 0
    MILD = 1
    MODERATE = 2
    SEVERE = 3


#: Lower bound (area %) of grades 1 and 2, and the bound above which grade 3 starts.
MILD_FROM_PERCENT = 0.2
MODERATE_FROM_PERCENT = 1.0
SEVERE_ABOVE_PERCENT = 2.5

#: Area % band ``[low, high)`` of each grade, as used to plan phantoms (2.5 % itself is
#: moderate, see :func:`grade_from_area_percent`; planning keeps away from the edges).
GRADE_BANDS: dict[BACGrade, tuple[float, float]] = {
    BACGrade.ABSENT: (0.0, MILD_FROM_PERCENT),
    BACGrade.MILD: (MILD_FROM_PERCENT, MODERATE_FROM_PERCENT),
    BACGrade.MODERATE: (MODERATE_FROM_PERCENT, SEVERE_ABOVE_PERCENT),
    BACGrade.SEVERE: (SEVERE_ABOVE_PERCENT, 100.0),
}


def grade_from_area_percent(area_percent: float) -> BACGrade:
    """The BAC grade of an area percentage (see the module docstring for the edges)."""
    # Written as "not >= 0" so that NaN is refused too (every comparison with NaN is false).
    if not area_percent >= 0:
        raise ValueError(f"area_percent must be >= 0, got {area_percent}")
    if area_percent < MILD_FROM_PERCENT:
        return BACGrade.ABSENT
    if area_percent < MODERATE_FROM_PERCENT:
        return BACGrade.MILD
    if area_percent <= SEVERE_ABOVE_PERCENT:
        return BACGrade.MODERATE
    return BACGrade.SEVERE


def cardiovascular_flag(grade: BACGrade) -> bool:
    """Grade 3 (severe) flags raised cardiovascular risk."""
    return grade == BACGrade.SEVERE


def bac_area_percent(bac_pixels: int, breast_pixels: int) -> float:
    """BAC area as a percentage of breast area; 0 when there is no breast."""
    if bac_pixels < 0 or breast_pixels < 0:
        raise ValueError("pixel counts must be >= 0")
    if breast_pixels == 0:
        return 0.0
    return 100.0 * bac_pixels / breast_pixels


@dataclass(frozen=True)
class Burden:
    """BAC burden of some images (one image, one side): pixel counts and, when the
    pixel spacing is known, physical areas.

    The area % is computed from the physical areas when every part has them (so views
    of different spacing pool correctly) and from the pixel counts otherwise.
    """

    bac_pixels: int
    breast_pixels: int
    bac_mm2: float = 0.0
    """BAC area in mm² (0 with ``breast_mm2`` 0 when the spacing is unknown)."""
    breast_mm2: float = 0.0

    @staticmethod
    def measured(
        bac_pixels: int, breast_pixels: int, pixel_spacing_mm: tuple[float, float]
    ) -> Burden:
        """The burden of one image whose pixels are ``(row, column)`` mm apart."""
        pixel_area = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
        if not pixel_area > 0:
            raise ValueError(f"pixel spacing must be > 0, got {pixel_spacing_mm}")
        return Burden(
            bac_pixels, breast_pixels, bac_pixels * pixel_area, breast_pixels * pixel_area
        )

    @property
    def has_physical_area(self) -> bool:
        return self.breast_mm2 > 0 or self.breast_pixels == 0

    @property
    def area_percent(self) -> float:
        if self.breast_mm2 > 0:
            return 100.0 * self.bac_mm2 / self.breast_mm2
        return bac_area_percent(self.bac_pixels, self.breast_pixels)

    @property
    def grade(self) -> BACGrade:
        return grade_from_area_percent(self.area_percent)

    @property
    def cardiovascular_flag(self) -> bool:
        return cardiovascular_flag(self.grade)

    @staticmethod
    def pooled(parts: Iterable[Burden]) -> Burden:
        """The burden of several images together (sums, never an average of %)."""
        parts = list(parts)
        physical = all(p.has_physical_area for p in parts)
        return Burden(
            sum(p.bac_pixels for p in parts),
            sum(p.breast_pixels for p in parts),
            sum(p.bac_mm2 for p in parts) if physical else 0.0,
            sum(p.breast_mm2 for p in parts) if physical else 0.0,
        )


def study_grade(sides: Iterable[Burden]) -> BACGrade:
    """Grade of the higher-burden side (ABSENT when there is no side)."""
    grades = [s.grade for s in sides]
    return max(grades, default=BACGrade.ABSENT)
