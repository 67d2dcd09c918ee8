"""The study's TID 1500 Measurement Report: how much BAC, which grade, and the flag.

Shaped for OHIF v3 (``viewing.md``): one TID 1410 planar ROI group per analysed image
whose region is a closed 5-point POLYLINE around the breast on that image (OHIF draws
it as a rectangle and lists the group's numbers), with every value a NUM item, the
grade and the Grade 3 flag too, besides their coded evaluations (OHIF drops coded
values). Per-side and study summaries are TID 1501 groups without an image region
(OHIF ignores them; other SR readers show them). The root's "Qualitative Evaluations"
container holds the "research use only" text and one text per input not analysed.

The BAC area NUM of each image names its SEG as "Source of Measurement" (segment 1),
so a reader can go from the number to the pixels it counts. For OHIF 3.13's measurement
panel, that NUM also carries the region (INFERRED FROM) and each view group a "Comment"
with its one-line summary (:func:`_for_ohif_measurement_panel`; checked in a browser by
tests/test_viewing.py).
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from bac_node.dicom.uids import derived_uid
from bac_node.grading import BACGrade, Burden, cardiovascular_flag
from bac_node.imaging.vessels import VesselMeasurement
from bac_node.outputs import concepts
from bac_node.outputs.seg import MANUFACTURER, set_content_datetime

SR_SERIES_DESCRIPTION = "BAC report - research use only, not for clinical use"
RESEARCH_USE_TEXT = "Research use only. Not for clinical use."


def breast_roi(breast_mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Closed 5-point polyline (column, row) around the breast's bounding box.

    Points are pixel edges (PS3.3 C.18.6.1.1: (0, 0) is the top-left corner of the
    top-left pixel), so the box encloses every breast pixel. An empty mask gives the
    whole image.
    """
    mask = np.asarray(breast_mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        top, left, bottom, right = 0.0, 0.0, float(mask.shape[0]), float(mask.shape[1])
    else:
        top, left = float(rows.min()), float(cols.min())
        bottom, right = float(rows.max() + 1), float(cols.max() + 1)
    return np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class ImageMeasurement:
    """The BAC burden of one analysed MG image, with its SEG and region of interest.

    ``roi`` is a closed 5-point polyline (column, row) in the image's pixel coordinates
    (see :func:`breast_roi`); ``pixel_spacing_mm`` is (row, column) spacing.
    """

    source: pydicom.Dataset
    laterality: str
    view: str
    bac_pixels: int
    breast_pixels: int
    pixel_spacing_mm: tuple[float, float]
    roi: NDArray[np.float64]
    segmentation: pydicom.Dataset
    vessels: VesselMeasurement | None = None
    """Calcified length, vessel count, longest vessel (NUMs beside area %) when given."""

    def __post_init__(self) -> None:
        concepts.breast_of(self.laterality)  # raises for anything but R/L
        roi = np.asarray(self.roi, dtype=np.float64)
        if roi.shape != (5, 2) or not np.array_equal(roi[0], roi[-1]):
            raise ValueError(
                f"roi must be a closed polyline of 5 (column, row) points, got {roi.tolist()}"
            )

    @property
    def burden(self) -> Burden:
        return Burden.measured(self.bac_pixels, self.breast_pixels, self.pixel_spacing_mm)


@dataclass(frozen=True)
class SideMeasurement:
    """The pooled BAC burden of one breast (its CC and MLO views), e.g.
    ``SideMeasurement("R", Burden.pooled(image.burden for image in right_views))``."""

    laterality: str
    burden: Burden
    vessels: VesselMeasurement | None = None
    """The side's vessels (:meth:`VesselMeasurement.side` of its views) when given."""

    def __post_init__(self) -> None:
        concepts.breast_of(self.laterality)


@dataclass(frozen=True)
class StudySummary:
    """The study's grade: the grade of the higher-burden side."""

    grade: BACGrade
    vessels: VesselMeasurement | None = None
    """The study's vessels (:meth:`VesselMeasurement.study` of its sides) when given."""

    @property
    def cardiovascular_flag(self) -> bool:
        return cardiovascular_flag(self.grade)


def private_coding_scheme() -> pydicom.Dataset:
    """Coding Scheme Identification item (PS3.3 C.12.1.1.2) declaring ``99BACNODE``."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = concepts.PRIVATE
    item.CodingSchemeName = concepts.PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = concepts.PRIVATE_SCHEME_ORGANIZATION
    return item


def sr_uids(source_sop_instance_uids: Sequence[str], model_version: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the report on these source images."""
    parts = sorted(source_sop_instance_uids)
    return (
        derived_uid(*parts, model_version, "sr", "series"),
        derived_uid(*parts, model_version, "sr", "instance"),
    )


def _num(
    name: concepts.Code,
    value: float,
    unit: concepts.Code,
    *,
    finding_sites: Sequence[hd.sr.FindingSite] | None = None,
    referenced_images: Sequence[hd.sr.SourceImageForMeasurement] | None = None,
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=concepts.coded(name),
        value=float(value),
        unit=concepts.coded(unit),
        finding_sites=finding_sites,
        referenced_images=referenced_images,
    )


def _grade_items(
    grade: BACGrade, flag: bool
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    numbers = [
        _num(concepts.BAC_GRADE_NUMBER, int(grade), concepts.UNIT_GRADE),
        _num(concepts.CARDIOVASCULAR_RISK_FLAG_NUMBER, int(flag), concepts.UNIT_NONE),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            concepts.coded(concepts.BAC_GRADE_SEVERITY), concepts.coded(concepts.GRADE_CODES[grade])
        ),
        hd.sr.QualitativeEvaluation(
            concepts.coded(concepts.CARDIOVASCULAR_RISK_FLAG),
            concepts.coded(concepts.YES if flag else concepts.NO),
        ),
    ]
    return numbers, evaluations


def _source_of_measurement(segmentation: pydicom.Dataset) -> hd.sr.SourceImageForMeasurement:
    """'Source of Measurement' naming segment 1 of ``segmentation``."""
    item = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=segmentation.SOPClassUID,
        referenced_sop_instance_uid=segmentation.SOPInstanceUID,
    )
    # PS3.3 C.17.3 (Image Reference): a reference to a SEG names the segments it means.
    item.ReferencedSOPSequence[0].ReferencedSegmentNumber = 1
    return item


def _vessel_items(vessels: VesselMeasurement | None) -> list[hd.sr.Measurement]:
    """Calcified length (mm), vessel count ({vessels}) and longest vessel (mm) NUMs."""
    if vessels is None:
        return []
    return [
        _num(concepts.BAC_LENGTH, vessels.length_mm, concepts.UNIT_MM),
        _num(concepts.BAC_VESSEL_COUNT, vessels.vessel_count, concepts.UNIT_VESSELS),
        _num(concepts.BAC_LONGEST_VESSEL, vessels.longest_mm, concepts.UNIT_MM),
    ]


def _burden_items(
    burden: Burden,
    site: hd.sr.FindingSite,
    bac_references: Sequence[hd.sr.SourceImageForMeasurement] | None = None,
    vessels: VesselMeasurement | None = None,
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """BAC mm², breast mm², BAC %, the vessels when given, grade and flag (NUM, and the
    coded evaluations)."""
    numbers, evaluations = _grade_items(burden.grade, burden.cardiovascular_flag)
    measurements = [
        _num(
            concepts.BAC_AREA, burden.bac_mm2, concepts.UNIT_MM2, referenced_images=bac_references
        ),
        _num(concepts.AREA, burden.breast_mm2, concepts.UNIT_MM2, finding_sites=[site]),
        _num(concepts.BAC_AREA_PERCENT, burden.area_percent, concepts.UNIT_PERCENT),
        *_vessel_items(vessels),
        *numbers,
    ]
    return measurements, evaluations


def _image_group(
    image: ImageMeasurement, algorithm: hd.sr.AlgorithmIdentification, model_version: str
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    source = image.source
    site = hd.sr.FindingSite(concepts.coded(concepts.breast_of(image.laterality)))
    measurements, evaluations = _burden_items(
        image.burden, site, [_source_of_measurement(image.segmentation)], image.vessels
    )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(image.roi, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, model_version, "sr", "roi"),
            identifier=f"BAC {image.laterality} {image.view}",
        ),
        referenced_region=region,
        finding_type=concepts.coded(concepts.VASCULAR_CALCIFICATION),
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    _for_ohif_measurement_panel(group, region, image)
    return group


def _for_ohif_measurement_panel(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
    region: hd.sr.ImageRegion,
    image: ImageMeasurement,
) -> None:
    """What OHIF 3.13's SR adapter needs to put the group in its measurement panel.

    It takes the region from the group's *first* NUM item (TID 300 style, INFERRED FROM
    SCOORD), not from the group's Image Region, and the label from a "Comment" text
    item: without them the report draws in OHIF's SR viewport but its measurement panel
    stays empty (tests/test_viewing.py). Both are additions; the TID 1410 content stays.
    """
    burden = image.burden
    flag = ", Grade 3 flag" if burden.cardiovascular_flag else ""
    comment = hd.sr.TextContentItem(
        name=concepts.coded(concepts.COMMENT),
        value=f"BAC {burden.area_percent:.2f} % of breast, grade {int(burden.grade)}{flag} "
        f"({image.laterality} {image.view})",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    content = group[0].ContentSequence
    first_num = next(item for item in content if item.ValueType == "NUM")
    inferred = copy.deepcopy(region)
    inferred.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    if "ContentSequence" not in first_num:
        first_num.ContentSequence = hd.sr.ContentSequence([], is_root=False)
    first_num.ContentSequence.append(inferred)
    content.append(comment)


def _side_group(
    side: SideMeasurement,
    algorithm: hd.sr.AlgorithmIdentification,
    uid_parts: Sequence[str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    site = hd.sr.FindingSite(concepts.coded(concepts.breast_of(side.laterality)))
    measurements, evaluations = _burden_items(side.burden, site, vessels=side.vessels)
    name = "right" if side.laterality == "R" else "left"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(*uid_parts, "sr", "side", side.laterality),
            identifier=f"BAC {name} breast",
        ),
        finding_type=concepts.coded(concepts.VASCULAR_CALCIFICATION),
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _study_group(
    summary: StudySummary,
    algorithm: hd.sr.AlgorithmIdentification,
    uid_parts: Sequence[str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    numbers, evaluations = _grade_items(summary.grade, summary.cardiovascular_flag)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(*uid_parts, "sr", "study"), identifier="BAC study"
        ),
        finding_type=concepts.coded(concepts.VASCULAR_CALCIFICATION),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(concepts.coded(concepts.BREAST))],
        measurements=[*_vessel_items(summary.vessels), *numbers],
        qualitative_evaluations=evaluations,
    )


def _qualitative_evaluations(not_analysed: Sequence[tuple[str, str]]) -> hd.sr.ContainerContentItem:
    """TID 1500's root "Qualitative Evaluations" container: the disclaimer and omissions."""
    container = hd.sr.ContainerContentItem(
        name=concepts.coded(concepts.QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    texts = [(concepts.RESEARCH_USE_ONLY, RESEARCH_USE_TEXT)]
    texts += [(concepts.NOT_ANALYSED, f"{what}: {why}") for what, why in not_analysed]
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=concepts.coded(name),
                value=value,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for name, value in texts
        ]
    )
    return container


def build_measurement_report(
    images: Sequence[ImageMeasurement],
    sides: Sequence[SideMeasurement],
    summary: StudySummary,
    not_analysed: Sequence[tuple[str, str]],
    *,
    model_name: str,
    model_version: str,
    series_number: int = 9002,
    content_datetime: dt.datetime | None = None,
    comparison: PriorComparison | None = None,
) -> hd.sr.ComprehensiveSR:
    """The study's TID 1500 Measurement Report (Comprehensive SR).

    ``images`` are the analysed images (at least one), each with its SEG;
    ``not_analysed`` lists (SOP Instance UID or file, reason) for inputs left out.
    ``content_datetime`` stamps the content, series and instance-creation date/time
    (default: now); pass a fixed value for byte-identical re-runs. UIDs depend only on
    the source SOP Instance UIDs and ``model_version``. ``comparison`` (priors on) adds
    the root's "Previous Findings" container (:func:`_comparison_container`).
    """
    if not images:
        raise ValueError("a measurement report needs at least one analysed image")
    sources = [image.source for image in images]
    source_uids = [str(source.SOPInstanceUID) for source in sources]
    if len({str(s.StudyInstanceUID) for s in sources}) != 1:
        raise ValueError("all analysed images must belong to one study")
    uid_parts = [*sorted(source_uids), model_version]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name, version=model_version, manufacturer=MANUFACTURER
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("bac-node device", model_name, model_version),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=model_name,
        ),
    )
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [_image_group(image, algorithm, model_version) for image in images]
    groups += [_side_group(side, algorithm, uid_parts) for side in sides]
    groups.append(_study_group(summary, algorithm, uid_parts))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=concepts.coded(concepts.SCREENING_MAMMOGRAPHY),
        imaging_measurements=groups,
        referenced_images=sources,
    )
    report[0].ContentSequence.append(_qualitative_evaluations(not_analysed))
    if comparison is not None:
        report[0].ContentSequence.append(_comparison_container(comparison))
    series_uid, sop_uid = sr_uids(source_uids, model_version)
    sr = hd.sr.ComprehensiveSR(
        evidence=[*sources, *(image.segmentation for image in images)],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sr.CodingSchemeIdentificationSequence = [private_coding_scheme()]
    set_content_datetime(sr, content_datetime or dt.datetime.now())
    return sr


# --- comparison with the prior study (filled by bac_node/node/priors.py) -------------

#: Days in a UCUM month ``mo`` (the mean Julian month).
DAYS_PER_MONTH = 30.4375


@dataclass(frozen=True)
class PriorStudy:
    """The BAC of the most recent prior study of the same patient.

    ``source`` says where the values come from: bac-node's SR of the prior (read back),
    or the prior's images analysed by this node (no result exported for them).
    ``length_mm`` is the prior's total calcified length (the study's, both sides added
    up); None when the prior's SR is of a bac-node version that did not report length.
    """

    study_instance_uid: str
    study_date: dt.date
    area_percent: float
    grade: BACGrade
    source: str
    length_mm: float | None = None


@dataclass(frozen=True)
class PriorLookup:
    """What the prior lookup found: a prior, or the one-line reason there is none."""

    prior: PriorStudy | None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.prior is None and not self.reason:
            raise ValueError("a lookup without a prior must say why")


@dataclass(frozen=True)
class PriorComparison:
    """The current study against its prior: values then and now, interval, progression."""

    lookup: PriorLookup
    current_date: dt.date | None
    current_area_percent: float
    current_grade: BACGrade
    current_length_mm: float | None = None

    @property
    def prior(self) -> PriorStudy | None:
        return self.lookup.prior

    @property
    def interval_months(self) -> float | None:
        """Months (UCUM ``mo``) from the prior's Study Date to the current one, 0.1 mo."""
        if self.prior is None or self.current_date is None:
            return None
        return round((self.current_date - self.prior.study_date).days / DAYS_PER_MONTH, 1)

    @property
    def progressed(self) -> bool | None:
        """The study grade rose since the prior (None without a prior)."""
        return None if self.prior is None else int(self.current_grade) > int(self.prior.grade)

    def summary_line(self) -> str:
        """One line for the SR's comment and logs (UIDs and values only)."""
        prior = self.prior
        if prior is None:
            return f"No prior study compared: {self.lookup.reason}"
        verdict = "progressed" if self.progressed else "not progressed"
        then_length = "" if prior.length_mm is None else f", {prior.length_mm:.0f} mm"
        now_length = "" if self.current_length_mm is None else f", {self.current_length_mm:.0f} mm"
        return (
            f"BAC {prior.area_percent:.2f} % (grade {int(prior.grade)}{then_length}) on "
            f"{prior.study_date.isoformat()}, {self.current_area_percent:.2f} % (grade "
            f"{int(self.current_grade)}{now_length}) now, {self.interval_months} months "
            f"later: {verdict}"
        )


def _num_item(name: concepts.Code, value: float, unit: concepts.Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=concepts.coded(name),
        value=float(value),
        unit=concepts.coded(unit),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _comparison_container(comparison: PriorComparison) -> hd.sr.ContainerContentItem:
    """The root's "Previous Findings" container: the comparison with the prior study.

    With a prior: "Comparison with Prior Study Done" = Yes; a container of the prior's
    values whose observation context (HAS OBS CONTEXT, TID 1005) is the prior's Study
    Instance UID and Study Date; the interval in months; the "progressed" CODE (Yes when
    the study grade rose); a one-line comment. Without: Done = No and the reason.
    The current values are the study and side groups of Imaging Measurements.
    """
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = hd.sr.ContainerContentItem(
        name=concepts.coded(concepts.PREVIOUS_FINDINGS), relationship_type=contains
    )
    prior = comparison.prior
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=concepts.coded(concepts.COMPARISON_WITH_PRIOR_STUDY_DONE),
            value=concepts.coded(concepts.YES if prior is not None else concepts.NO),
            relationship_type=contains,
        )
    ]
    if prior is None:
        items.append(
            hd.sr.TextContentItem(
                name=concepts.coded(concepts.NO_PRIOR_REASON),
                value=comparison.lookup.reason[:1024],
                relationship_type=contains,
            )
        )
    else:
        items.append(_prior_values(prior))
        interval = comparison.interval_months
        if interval is not None:
            items.append(_num_item(concepts.INTERVAL_SINCE_PRIOR, interval, concepts.UNIT_MONTH))
        items.append(
            hd.sr.CodeContentItem(
                name=concepts.coded(concepts.BAC_PROGRESSED),
                value=concepts.coded(concepts.YES if comparison.progressed else concepts.NO),
                relationship_type=contains,
            )
        )
        items.append(
            hd.sr.TextContentItem(
                name=concepts.coded(concepts.COMMENT),
                value=comparison.summary_line(),
                relationship_type=contains,
            )
        )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _prior_values(prior: PriorStudy) -> hd.sr.ContainerContentItem:
    """The prior study's area %, grade (NUM and CODE), length, under its own context."""
    context = hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT
    container = hd.sr.ContainerContentItem(
        name=concepts.coded(concepts.PRIOR_STUDY_VALUES),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.UIDRefContentItem(
            name=concepts.coded(concepts.PROCEDURE_STUDY_INSTANCE_UID),
            value=prior.study_instance_uid,
            relationship_type=context,
        ),
        hd.sr.DateContentItem(
            name=concepts.coded(concepts.STUDY_DATE),
            value=prior.study_date,
            relationship_type=context,
        ),
        _num_item(concepts.BAC_AREA_PERCENT, prior.area_percent, concepts.UNIT_PERCENT),
        _num_item(concepts.BAC_GRADE_NUMBER, int(prior.grade), concepts.UNIT_GRADE),
        hd.sr.CodeContentItem(
            name=concepts.coded(concepts.BAC_GRADE_SEVERITY),
            value=concepts.coded(concepts.GRADE_CODES[prior.grade]),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    items += _prior_length_items(prior)
    items.append(
        hd.sr.TextContentItem(
            name=concepts.coded(concepts.PRIOR_VALUES_SOURCE),
            value=prior.source[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _prior_length_items(prior: PriorStudy) -> list[hd.sr.ContentItem]:
    """The prior's total calcified length (NUM, mm), when its SR or analysis had one."""
    if prior.length_mm is None:
        return []
    return [_num_item(concepts.BAC_LENGTH, prior.length_mm, concepts.UNIT_MM)]


#: DCM codes of the TID 1500 structure :func:`read_study_values` walks.
_MEASUREMENT_GROUP = "125007"
_TRACKING_IDENTIFIER = "112039"


def is_bac_node_report(series: pydicom.Dataset) -> bool:
    """Whether a series (a C-FIND answer or an instance) is a bac-node BAC report."""
    return (
        str(series.get("Modality", "")) == "SR"
        and str(series.get("Manufacturer", "")) == MANUFACTURER
        and str(series.get("SeriesDescription", "")) == SR_SERIES_DESCRIPTION
    )


def _code_value(item: pydicom.Dataset) -> str:
    names = item.get("ConceptNameCodeSequence") or []
    return str(names[0].CodeValue) if names else ""


def read_study_values(report: pydicom.Dataset) -> tuple[float, BACGrade, float | None]:
    """(study area %, study grade, study length mm or None) of a bac-node BAC report.

    The study's area % is the higher side's (as the study grade is the higher-burden
    side's); read from the TID 1501 groups "BAC right/left breast" and "BAC study"
    that :func:`build_measurement_report` writes. A ValueError names what is missing.
    """
    if not is_bac_node_report(report):
        raise ValueError(f"SR {report.get('SOPInstanceUID', '?')} is not a bac-node BAC report")
    numbers: dict[str, dict[str, float]] = {}
    for item in report.get("ContentSequence", []):
        for group in item.get("ContentSequence", []) if item.ValueType == "CONTAINER" else []:
            if group.ValueType != "CONTAINER" or _code_value(group) != _MEASUREMENT_GROUP:
                continue
            children = list(group.get("ContentSequence", []))
            label = next(
                (str(c.TextValue) for c in children if _code_value(c) == _TRACKING_IDENTIFIER),
                "",
            )
            numbers[label] = {
                _code_value(c): float(c.MeasuredValueSequence[0].NumericValue)
                for c in children
                if c.ValueType == "NUM" and c.get("MeasuredValueSequence")
            }
    sides = [
        numbers[label][concepts.BAC_AREA_PERCENT.value]
        for label in ("BAC right breast", "BAC left breast")
        if concepts.BAC_AREA_PERCENT.value in numbers.get(label, {})
    ]
    study = numbers.get("BAC study", {})
    if not sides or concepts.BAC_GRADE_NUMBER.value not in study:
        raise ValueError(f"SR {report.get('SOPInstanceUID', '?')} has no side BAC % or study grade")
    length = study.get(concepts.BAC_LENGTH.value)  # absent in reports before length
    return max(sides), BACGrade(int(study[concepts.BAC_GRADE_NUMBER.value])), length
