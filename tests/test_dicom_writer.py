"""The MG writer: every vendor x intent (x JPEG 2000) is valid DICOM and round-trips."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from phantom_fixtures import phantom_meta, require_tool, vendor_view
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from bac_node.dicom.codes import BREAST, SCREENING_VIEW_CODES
from training.phantom.dicom_writer import (
    build_mg_dataset,
    mg_sop_class_uid,
    patient_orientation,
    write_mg_instance,
)
from training.phantom.types import PhantomView, PresentationIntent
from training.phantom.vendors import VENDORS, StoredImage, VendorStyle, render_pixels


@dataclass(frozen=True)
class Case:
    style: VendorStyle
    intent: PresentationIntent
    jpeg2000: bool

    @property
    def id(self) -> str:
        intent = "pres" if self.intent == "FOR PRESENTATION" else "proc"
        return f"{self.style.name}-{intent}{'-j2k' if self.jpeg2000 else ''}"


CASES = tuple(
    Case(style, intent, jpeg2000)
    for style in VENDORS
    for intent in ("FOR PRESENTATION", "FOR PROCESSING")
    for jpeg2000 in ((False, True) if style.offers_jpeg2000_lossless else (False,))
)


@dataclass(frozen=True)
class Written:
    path: Path
    phantom: PhantomView
    stored: StoredImage


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[Case, Written]:
    """One file per case, shared by the checks below (alternating views and sides)."""
    folder = tmp_path_factory.mktemp("mg")
    out: dict[Case, Written] = {}
    for number, case in enumerate(CASES):
        laterality, view = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")][number % 4]
        phantom = vendor_view(case.style, laterality, view)  # type: ignore[arg-type]
        stored = render_pixels(phantom, case.style, case.intent, np.random.default_rng(number))
        path = folder / f"{case.id}.dcm"
        meta = phantom_meta(case.style, phantom, case.intent, number)
        write_mg_instance(path, stored, meta, jpeg2000_lossless=case.jpeg2000)
        out[case] = Written(path, phantom, stored)
    return out


@pytest.mark.dcmtk
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dciodvfy_reports_no_errors(case: Case, written: dict[Case, Written]) -> None:
    dciodvfy = require_tool("dciodvfy")
    result = subprocess.run(
        [dciodvfy, str(written[case].path)], capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, output


@pytest.mark.dcmtk
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dcmdump_reads_the_file(case: Case, written: dict[Case, Written]) -> None:
    dcmdump = require_tool("dcmdump")
    result = subprocess.run(
        [dcmdump, "-q", str(written[case].path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "MG" in result.stdout


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip(case: Case, written: dict[Case, Written]) -> None:
    item = written[case]
    ds = pydicom.dcmread(item.path)
    meta = phantom_meta(case.style, item.phantom, case.intent, CASES.index(case))
    expected_syntax = JPEG2000Lossless if case.jpeg2000 else ExplicitVRLittleEndian
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    # Lossless compression keeps the caller's SOP Instance UID.
    assert ds.SOPInstanceUID == meta.sop_instance_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == meta.sop_instance_uid
    assert ds.SOPClassUID == mg_sop_class_uid(case.intent)
    assert np.array_equal(ds.pixel_array, item.stored.pixels)

    assert ds.Modality == "MG"
    assert ds.PresentationIntentType == case.intent
    assert ds.Manufacturer == case.style.manufacturer
    assert ds.ManufacturerModelName == case.style.manufacturer_model_name
    assert ds.ImageLaterality == item.phantom.laterality
    assert ds.ViewPosition == item.phantom.view
    view_code = ds.ViewCodeSequence[0]
    assert view_code.CodeValue == SCREENING_VIEW_CODES[item.phantom.view].value
    assert len(view_code.ViewModifierCodeSequence) == 0
    assert ds.AnatomicRegionSequence[0].CodeValue == BREAST.value
    assert list(ds.PatientOrientation) == list(
        patient_orientation(item.phantom.laterality, item.phantom.view)
    )
    assert ds.BitsAllocated == 16
    assert ds.BitsStored == item.stored.bits_stored
    assert ds.HighBit == item.stored.bits_stored - 1
    assert ds.PhotometricInterpretation == item.stored.photometric_interpretation
    monochrome1 = ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.PresentationLUTShape == ("INVERSE" if monochrome1 else "IDENTITY")
    assert ds.LossyImageCompression == "00"
    assert ds.BurnedInAnnotation == "NO"
    assert ds.BreastImplantPresent == "NO"
    assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(item.phantom.pixel_spacing_mm)
    assert ds.PatientName == meta.patient_name
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    assert has_voi == (case.intent == "FOR PRESENTATION")


@pytest.mark.parametrize(
    ("laterality", "view", "expected"),
    [
        ("R", "CC", ("P", "L")),
        ("L", "CC", ("A", "R")),
        ("R", "MLO", ("P", "FL")),
        ("L", "MLO", ("A", "FR")),
    ],
)
def test_patient_orientation(laterality: str, view: str, expected: tuple[str, str]) -> None:
    assert patient_orientation(laterality, view) == expected  # type: ignore[arg-type]


def test_sop_class_uids() -> None:
    assert mg_sop_class_uid("FOR PRESENTATION") == "1.2.840.10008.5.1.4.1.1.1.2"
    assert mg_sop_class_uid("FOR PROCESSING") == "1.2.840.10008.5.1.4.1.1.1.2.1"
    with pytest.raises(ValueError, match="Presentation Intent Type"):
        mg_sop_class_uid("FOR FUN")  # type: ignore[arg-type]


def _small_case() -> tuple[PhantomView, StoredImage, VendorStyle]:
    style = VENDORS[1]
    phantom = vendor_view(style)
    stored = render_pixels(phantom, style, "FOR PRESENTATION", np.random.default_rng(0))
    return phantom, stored, style


@pytest.mark.parametrize(
    ("field", "value", "attribute"),
    [
        ("sop_instance_uid", "not-a-uid", "sop_instance_uid"),
        ("study_date", "2024-01-02", "Study Date"),
        ("patient_age", "58", "Patient's Age"),
        ("laterality", "B", "Image Laterality"),
        ("view", "XCCL", "View Position"),
    ],
)
def test_instance_meta_validates(field: str, value: str, attribute: str) -> None:
    phantom, _, style = _small_case()
    meta = phantom_meta(style, phantom, "FOR PRESENTATION")
    with pytest.raises(ValueError, match=attribute):
        changes: dict[str, Any] = {field: value}
        replace(meta, **changes)


def test_voi_is_refused_for_processing() -> None:
    phantom, stored, style = _small_case()
    processing = replace(stored, presentation_intent="FOR PROCESSING")
    with pytest.raises(ValueError, match="FOR PRESENTATION"):
        build_mg_dataset(processing, phantom_meta(style, phantom, "FOR PROCESSING"))


def test_dataset_is_decodable_in_memory() -> None:
    phantom, stored, style = _small_case()
    ds = build_mg_dataset(stored, phantom_meta(style, phantom, "FOR PRESENTATION"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, stored.pixels)


def test_presentation_references_its_processing_image(tmp_path: Path) -> None:
    phantom, stored, style = _small_case()
    processing_uid = phantom_meta(style, phantom, "FOR PROCESSING").sop_instance_uid
    meta = replace(
        phantom_meta(style, phantom, "FOR PRESENTATION"), source_for_processing_uid=processing_uid
    )
    write_mg_instance(tmp_path / "p.dcm", stored, meta)
    source = pydicom.dcmread(tmp_path / "p.dcm").SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == processing_uid
    assert source.ReferencedSOPClassUID == mg_sop_class_uid("FOR PROCESSING")
