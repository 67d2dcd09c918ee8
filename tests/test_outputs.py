"""SEG and SR builders: read back with highdicom, dciodvfy-clean, loaded by dcmjs.

Inputs are real phantom MG files (three vendor styles, scale 0.05) with their ground
truth masks; every object is written to bytes and read back, as highdicom's own tests do.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from phantom_fixtures import require_tool
from pydicom.uid import ComprehensiveSRStorage

from bac_node import __version__
from bac_node.grading import BACGrade, Burden, cardiovascular_flag
from bac_node.outputs import concepts
from bac_node.outputs.seg import (
    MG_IMAGE_ORIENTATION,
    SEG_SERIES_DESCRIPTION,
    build_bac_segmentation,
    imager_pixel_spacing,
)
from bac_node.outputs.sr import (
    RESEARCH_USE_TEXT,
    SR_SERIES_DESCRIPTION,
    ImageMeasurement,
    SideMeasurement,
    StudySummary,
    breast_roi,
    build_measurement_report,
)
from training.phantom.study import load_mask, plan_studies, render_study, write_study

VENDORS = ("Hologic", "Fuji", "Siemens")
MODEL_NAME = "bac-unet-test"
MODEL_VERSION = "test-1"
WHEN = dt.datetime(2024, 5, 6, 7, 8, 9)
NOT_ANALYSED = [("2.25.1234", "not an MG image (Modality CT)"), ("bad.dcm", "truncated file")]
JS_DIR = Path(__file__).parent / "js"


@dataclass(frozen=True)
class PhantomImage:
    path: Path
    source: pydicom.Dataset
    laterality: str
    view: str
    bac_mask: NDArray[np.bool_]
    breast_mask: NDArray[np.bool_]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[PhantomImage]]:
    """The 4 screening views of one grade-2 phantom study per vendor."""
    out: dict[str, list[PhantomImage]] = {}
    for vendor in VENDORS:
        root = tmp_path_factory.mktemp(f"study-{vendor}")
        plan = plan_studies(1, 11, vendor=vendor, grades={2: 1.0}, processing_fraction=0.0)[0]
        rows = write_study(render_study(plan, scale=0.05), root)
        out[vendor] = [
            PhantomImage(
                path=root / row["file"],
                source=pydicom.dcmread(root / row["file"]),
                laterality=row["laterality"],
                view=row["view"],
                bac_mask=load_mask(root / row["bac_mask"]),
                breast_mask=load_mask(root / row["breast_mask"]),
            )
            for row in rows
        ]
    return out


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_seg(image: PhantomImage, mask: NDArray[np.bool_] | None = None) -> hd.seg.Segmentation:
    return build_bac_segmentation(
        image.source,
        image.bac_mask if mask is None else mask,
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
        content_datetime=WHEN,
    )


def image_measurement(image: PhantomImage, seg: pydicom.Dataset) -> ImageMeasurement:
    return ImageMeasurement(
        source=image.source,
        laterality=image.laterality,
        view=image.view,
        bac_pixels=int(image.bac_mask.sum()),
        breast_pixels=int(image.breast_mask.sum()),
        pixel_spacing_mm=imager_pixel_spacing(image.source),
        roi=breast_roi(image.breast_mask),
        segmentation=seg,
    )


def build_report(
    images: list[PhantomImage], when: dt.datetime = WHEN
) -> tuple[hd.sr.ComprehensiveSR, list[ImageMeasurement], list[SideMeasurement]]:
    measured = [image_measurement(image, build_seg(image)) for image in images]
    sides = []
    for laterality in ("R", "L"):
        views = [m for m in measured if m.laterality == laterality]
        sides.append(SideMeasurement(laterality, Burden.pooled(m.burden for m in views)))
    summary = StudySummary(max(side.burden.grade for side in sides))
    sr = build_measurement_report(
        measured,
        sides,
        summary,
        NOT_ANALYSED,
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
        content_datetime=when,
    )
    return sr, measured, sides


def dciodvfy_errors(tmp_path: Path, dataset: pydicom.Dataset, name: str) -> list[str]:
    """dciodvfy's Error lines for ``dataset`` (warnings are returned by dciodvfy_lines)."""
    return [line for line in dciodvfy_lines(tmp_path, dataset, name) if line.startswith("Error")]


def dciodvfy_lines(tmp_path: Path, dataset: pydicom.Dataset, name: str) -> list[str]:
    tool = require_tool("dciodvfy")
    path = tmp_path / name
    path.write_bytes(to_bytes(dataset))
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return (result.stdout + result.stderr).splitlines()


def run_dcmjs(*args: str | Path) -> dict[str, object]:
    """Run tests/js/load_dicom.mjs; skip without Node/dcmjs locally, fail in CI."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "dcmjs").is_dir():
        message = "dcmjs is not installed: run `npm ci --prefix tests/js` (needs Node 18+)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [node, str(JS_DIR / "load_dicom.mjs"), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


# --- SEG -----------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_seg_reads_back_pixel_for_pixel(
    studies: dict[str, list[PhantomImage]], vendor: str, tmp_path: Path
) -> None:
    for image in studies[vendor]:
        assert image.bac_mask.any()
        seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(image))))
        uid = image.source.SOPInstanceUID
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=[1]
        )
        assert pixels.shape == (1, *image.bac_mask.shape, 1)
        np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), image.bac_mask)
        assert (seg.Rows, seg.Columns) == (image.source.Rows, image.source.Columns)
        assert seg.SegmentationType == "BINARY"
        segment = seg.get_segment_description(1)
        assert segment.segment_label == "Breast arterial calcification"
        assert segment.segmented_property_category.value == "49755003"
        assert segment.segmented_property_type.value == concepts.VASCULAR_CALCIFICATION.value
        assert segment.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = segment.algorithm_identification
        assert algorithm is not None
        assert (algorithm[0].AlgorithmName, algorithm[0].AlgorithmVersion) == (
            MODEL_NAME,
            MODEL_VERSION,
        )
        # What OHIF needs (viewing.md): plane orientation, orientation, references.
        shared = seg.SharedFunctionalGroupsSequence[0]
        iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        assert [float(v) for v in iop] == MG_IMAGE_ORIENTATION
        assert seg.PatientOrientation == image.source.PatientOrientation
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.source.SeriesInstanceUID
        derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        assert "research use only, not for clinical use" in seg.SeriesDescription
        assert len(SEG_SERIES_DESCRIPTION) <= 64
        assert (seg.Manufacturer, seg.SoftwareVersions) == ("bac-node", __version__)
        assert dciodvfy_errors(tmp_path, seg, "seg.dcm") == []


def test_empty_mask_gives_a_valid_seg_with_one_empty_frame(
    studies: dict[str, list[PhantomImage]], tmp_path: Path
) -> None:
    image = studies["Hologic"][0]
    empty = np.zeros_like(image.bac_mask)
    built = build_seg(image, empty)
    assert built.NumberOfFrames == 1
    seg = hd.seg.segread(io.BytesIO(to_bytes(built)))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[image.source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, *empty.shape, 1)
    assert not pixels.any()
    assert dciodvfy_errors(tmp_path, built, "empty-seg.dcm") == []


def test_seg_refuses_a_mask_of_another_shape(studies: dict[str, list[PhantomImage]]) -> None:
    image = studies["Hologic"][0]
    with pytest.raises(ValueError, match="Rows x Columns"):
        build_seg(image, image.bac_mask[:-1])
    with pytest.raises(ValueError, match="boolean"):
        build_seg(image, image.bac_mask.astype(np.uint8))


# --- SR ------------------------------------------------------------------------------


def test_sr_reads_back_with_values_units_grades_and_references(
    studies: dict[str, list[PhantomImage]], tmp_path: Path
) -> None:
    images = studies["Hologic"]
    built, measured, sides = build_report(images)
    sr = hd.sr.srread(io.BytesIO(to_bytes(built)))
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert len(SR_SERIES_DESCRIPTION) <= 64
    assert sr.StudyInstanceUID == images[0].source.StudyInstanceUID

    report = cast(hd.sr.MeasurementReport, sr.content)
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == len(images)
    for group, expected in zip(groups, measured, strict=True):
        region = group.roi
        assert region is not None
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(region.value, expected.roi)
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == expected.source.SOPInstanceUID
        assert group.tracking_identifier == f"BAC {expected.laterality} {expected.view}"

        def value(code: concepts.Code, unit: concepts.Code, group: object = group) -> float:
            found = group.get_measurements(name=concepts.coded(code))  # type: ignore[attr-defined]
            assert len(found) == 1, code
            assert found[0].unit.value == unit.value
            return float(found[0].value)

        spacing = imager_pixel_spacing(expected.source)
        pixel_mm2 = spacing[0] * spacing[1]
        bac_area = value(concepts.BAC_AREA, concepts.UNIT_MM2)
        assert bac_area == pytest.approx(expected.bac_pixels * pixel_mm2)
        breast_area = value(concepts.AREA, concepts.UNIT_MM2)
        assert breast_area == pytest.approx(expected.breast_pixels * pixel_mm2)
        percent = value(concepts.BAC_AREA_PERCENT, concepts.UNIT_PERCENT)
        assert percent == pytest.approx(100 * expected.bac_pixels / expected.breast_pixels)
        grade = BACGrade(int(value(concepts.BAC_GRADE_NUMBER, concepts.UNIT_GRADE)))
        assert grade == Burden(expected.bac_pixels, expected.breast_pixels).grade
        flag = value(concepts.CARDIOVASCULAR_RISK_FLAG_NUMBER, concepts.UNIT_NONE)
        assert flag == int(cardiovascular_flag(grade))

        # highdicom types QualitativeEvaluation.value as a number; it is a coded concept.
        evaluations = {
            e.name.value: cast(hd.sr.CodedConcept, e.value).value
            for e in group.get_qualitative_evaluations()
        }
        assert evaluations == {
            concepts.BAC_GRADE_SEVERITY.value: concepts.GRADE_CODES[grade].value,
            concepts.CARDIOVASCULAR_RISK_FLAG.value: (
                concepts.YES if cardiovascular_flag(grade) else concepts.NO
            ).value,
        }
        # The BAC area names its SEG, segment 1, as its source.
        (bac,) = group.get_measurements(name=concepts.coded(concepts.BAC_AREA))
        (source_item,) = bac.referenced_images
        seg_reference = source_item.ReferencedSOPSequence[0]
        assert seg_reference.ReferencedSOPInstanceUID == expected.segmentation.SOPInstanceUID
        assert seg_reference.ReferencedSegmentNumber == 1
        # TID 4019 Algorithm Identification: Algorithm Name (111001), Version (111003).
        algorithm = {
            item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT"
        }
        assert algorithm["111001"] == MODEL_NAME
        assert algorithm["111003"] == MODEL_VERSION

    # Per side and study: TID 1501 groups without an image region.
    summaries = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in summaries] == [
        "BAC right breast",
        "BAC left breast",
        "BAC study",
    ]
    for summary_group, side in zip(summaries, sides, strict=False):
        (percent_item,) = summary_group.get_measurements(
            name=concepts.coded(concepts.BAC_AREA_PERCENT)
        )
        assert float(percent_item.value) == pytest.approx(side.burden.area_percent)
    study_grade = max(side.burden.grade for side in sides)
    (study_grade_item,) = summaries[2].get_measurements(
        name=concepts.coded(concepts.BAC_GRADE_NUMBER)
    )
    assert int(study_grade_item.value) == int(study_grade) == 2

    # Observer device, procedure, disclaimer, not-analysed texts, evidence.
    (device,) = report.get_observer_contexts(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device")
    )
    assert device.observer_identifying_attributes.name == "bac-node"
    texts = [
        item.TextValue
        for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT"
    ]
    assert texts[0] == RESEARCH_USE_TEXT
    assert texts[1:] == [f"{what}: {why}" for what, why in NOT_ANALYSED]
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {m.source.SOPInstanceUID for m in measured} | {
        m.segmentation.SOPInstanceUID for m in measured
    }
    library = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    assert len(library) == 1

    lines = dciodvfy_lines(tmp_path, built, "sr.dcm")
    assert [line for line in lines if line.startswith("Error")] == []
    # The only warnings left are dciodvfy not knowing our declared private scheme.
    warnings = {line for line in lines if line.startswith("Warning")}
    assert warnings <= {
        "Warning - Unrecognized defined term <99BACNODE> for value 1 of attribute "
        "<Coding Scheme Designator>"
    }


def test_sr_needs_an_analysed_image() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_measurement_report(
            [], [], StudySummary(BACGrade.ABSENT), [], model_name="m", model_version="v"
        )


# --- idempotence ---------------------------------------------------------------------


def test_same_inputs_give_same_uids_and_bytes(studies: dict[str, list[PhantomImage]]) -> None:
    images = studies["Siemens"]
    first, _, _ = build_report(images)
    second, _, _ = build_report(images)
    assert to_bytes(first) == to_bytes(second)
    assert to_bytes(build_seg(images[0])) == to_bytes(build_seg(images[0]))
    # Another day: same UIDs, only the date/time stamps differ.
    later, _, _ = build_report(images, when=WHEN + dt.timedelta(days=3))
    assert later.SOPInstanceUID == first.SOPInstanceUID
    assert later.SeriesInstanceUID == first.SeriesInstanceUID
    assert later.ContentDate != first.ContentDate
    # Another model version: new UIDs.
    other = build_bac_segmentation(
        images[0].source, images[0].bac_mask, model_name=MODEL_NAME, model_version="test-2"
    )
    assert other.SOPInstanceUID != build_seg(images[0]).SOPInstanceUID


# --- dcmjs (the parser OHIF bundles) -------------------------------------------------


def test_dcmjs_loads_the_seg_as_a_labelmap(
    studies: dict[str, list[PhantomImage]], tmp_path: Path
) -> None:
    image = studies["Fuji"][1]
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(to_bytes(build_seg(image)))
    loaded = run_dcmjs("seg", seg_path, image.path)
    assert loaded["labelmapFrames"] == 1
    assert loaded["labelmapPixelsPerFrame"] == image.bac_mask.size
    assert loaded["images"] == [
        {"sopInstanceUID": image.source.SOPInstanceUID, "nonZeroPixels": int(image.bac_mask.sum())}
    ]
    (segment,) = cast(list[dict[str, Any]], loaded["segments"])
    assert segment["label"] == "Breast arterial calcification"
    assert segment["algorithmType"] == "AUTOMATIC"


def test_dcmjs_reads_the_sr_measurement_groups(
    studies: dict[str, list[PhantomImage]], tmp_path: Path
) -> None:
    images = studies["Fuji"]
    built, measured, _ = build_report(images)
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(to_bytes(built))
    loaded = run_dcmjs("sr", sr_path)
    groups = loaded["groups"]
    assert isinstance(groups, list)
    with_region = [g for g in groups if g["scoords"]]
    assert len(with_region) == len(images)
    assert len(groups) == len(images) + 3  # two sides and the study
    for group, expected in zip(with_region, measured, strict=True):
        (scoord,) = group["scoords"]
        assert scoord == {
            "graphicType": "POLYLINE",
            "points": 5,
            "referencedSOPInstanceUID": expected.source.SOPInstanceUID,
        }
        numbers = {n["name"]: (n["value"], n["unit"]) for n in group["numbers"]}
        assert numbers[concepts.BAC_AREA_PERCENT.meaning] == (
            pytest.approx(expected.burden.area_percent),
            "%",
        )
        assert numbers[concepts.BAC_GRADE_NUMBER.meaning] == (int(expected.burden.grade), "{grade}")
    assert RESEARCH_USE_TEXT in loaded["texts"]  # type: ignore[operator]
    assert loaded["seriesDescription"] == SR_SERIES_DESCRIPTION
