"""Grade thresholds, Burden pooling and the study grade (bac_node.grading)."""

from __future__ import annotations

import itertools
import math

import pytest

from bac_node.grading import (
    GRADE_BANDS,
    MILD_FROM_PERCENT,
    MODERATE_FROM_PERCENT,
    SEVERE_ABOVE_PERCENT,
    BACGrade,
    Burden,
    bac_area_percent,
    cardiovascular_flag,
    grade_from_area_percent,
    study_grade,
)

# The paper's definition (Ibrahim et al. 2025) written out: < 0.2 absent, 0.2-1 mild,
# 1-2.5 moderate (2.5 included), > 2.5 severe.
EDGES = [
    (0.0, BACGrade.ABSENT),
    (0.1999, BACGrade.ABSENT),
    (0.2, BACGrade.MILD),
    (0.5, BACGrade.MILD),
    (0.999, BACGrade.MILD),
    (1.0, BACGrade.MODERATE),
    (2.5, BACGrade.MODERATE),
    (2.5001, BACGrade.SEVERE),
    (100.0, BACGrade.SEVERE),
]


@pytest.mark.parametrize(("area_percent", "grade"), EDGES)
def test_grade_at_each_threshold_edge(area_percent: float, grade: BACGrade) -> None:
    assert grade_from_area_percent(area_percent) is grade


def test_constants_match_the_paper_and_are_ordered() -> None:
    assert (MILD_FROM_PERCENT, MODERATE_FROM_PERCENT, SEVERE_ABOVE_PERCENT) == (0.2, 1.0, 2.5)
    assert 0 < MILD_FROM_PERCENT < MODERATE_FROM_PERCENT < SEVERE_ABOVE_PERCENT < 100


def test_grade_changes_exactly_at_the_constants() -> None:
    def just_below(x: float) -> float:
        return math.nextafter(x, -math.inf)

    def just_above(x: float) -> float:
        return math.nextafter(x, math.inf)

    assert grade_from_area_percent(just_below(MILD_FROM_PERCENT)) is BACGrade.ABSENT
    assert grade_from_area_percent(MILD_FROM_PERCENT) is BACGrade.MILD
    assert grade_from_area_percent(just_below(MODERATE_FROM_PERCENT)) is BACGrade.MILD
    assert grade_from_area_percent(MODERATE_FROM_PERCENT) is BACGrade.MODERATE
    assert grade_from_area_percent(SEVERE_ABOVE_PERCENT) is BACGrade.MODERATE
    assert grade_from_area_percent(just_above(SEVERE_ABOVE_PERCENT)) is BACGrade.SEVERE


def test_grade_bands_cover_0_to_100_contiguously_in_grade_order() -> None:
    grades = sorted(GRADE_BANDS)
    assert grades == list(BACGrade)
    assert GRADE_BANDS[grades[0]][0] == 0.0
    assert GRADE_BANDS[grades[-1]][1] == 100.0
    for lower, upper in itertools.pairwise(grades):
        assert GRADE_BANDS[lower][1] == GRADE_BANDS[upper][0]
    for grade, (lo, hi) in GRADE_BANDS.items():
        assert lo < hi
        # Every point strictly inside a band has that band's grade.
        assert grade_from_area_percent((lo + hi) / 2) is grade
        assert grade_from_area_percent(math.nextafter(lo, hi)) is grade
        assert grade_from_area_percent(math.nextafter(hi, lo)) is grade


@pytest.mark.parametrize("bad", [-0.0001, -1.0, -math.inf, math.nan])
def test_negative_or_nan_area_percent_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="area_percent"):
        grade_from_area_percent(bad)


def test_area_percent_is_bac_over_breast() -> None:
    assert bac_area_percent(1, 400) == pytest.approx(0.25)
    assert bac_area_percent(0, 400) == 0.0
    assert bac_area_percent(400, 400) == 100.0


def test_zero_breast_pixels_is_zero_percent_and_absent() -> None:
    assert bac_area_percent(0, 0) == 0.0
    assert bac_area_percent(5, 0) == 0.0
    assert Burden(0, 0).area_percent == 0.0
    assert Burden(0, 0).grade is BACGrade.ABSENT


@pytest.mark.parametrize(("bac", "breast"), [(-1, 10), (1, -10), (-1, -1)])
def test_negative_pixel_counts_raise(bac: int, breast: int) -> None:
    with pytest.raises(ValueError, match="pixel counts"):
        bac_area_percent(bac, breast)


def test_burden_grade_uses_the_area_percent() -> None:
    assert Burden(3, 1000).area_percent == pytest.approx(0.3)
    assert Burden(3, 1000).grade is BACGrade.MILD
    assert Burden(25, 1000).grade is BACGrade.MODERATE  # exactly 2.5 %
    assert Burden(26, 1000).grade is BACGrade.SEVERE


def test_pooling_sums_pixels_across_views_not_percentages() -> None:
    cc = Burden(bac_pixels=30, breast_pixels=1000)  # 3.0 %: severe on its own
    mlo = Burden(bac_pixels=10, breast_pixels=3000)  # 0.33 %: mild on its own
    side = Burden.pooled([cc, mlo])
    assert side == Burden(40, 4000)
    assert side.area_percent == pytest.approx(1.0)  # the mean of percentages would be 1.67
    assert side.grade is BACGrade.MODERATE


def test_pooling_accepts_a_generator_and_nothing() -> None:
    assert Burden.pooled(Burden(i, 100) for i in range(3)) == Burden(3, 300)
    assert Burden.pooled([]) == Burden(0, 0)


def test_study_grade_is_the_higher_side() -> None:
    right = Burden.pooled([Burden(1, 1000), Burden(1, 1000)])  # 0.1 %: absent
    left = Burden.pooled([Burden(20, 1000), Burden(40, 1000)])  # 3.0 %: severe
    assert right.grade is BACGrade.ABSENT
    assert left.grade is BACGrade.SEVERE
    assert study_grade([right, left]) is BACGrade.SEVERE
    assert study_grade([left, right]) is BACGrade.SEVERE
    assert study_grade([right]) is BACGrade.ABSENT
    assert study_grade(iter([Burden(5, 1000), Burden(15, 1000)])) is BACGrade.MODERATE


def test_study_without_sides_is_absent() -> None:
    assert study_grade([]) is BACGrade.ABSENT


@pytest.mark.parametrize("grade", list(BACGrade))
def test_cardiovascular_flag_only_for_severe(grade: BACGrade) -> None:
    assert cardiovascular_flag(grade) is (grade is BACGrade.SEVERE)
