"""Reading and validating MG instances: real phantom files of every vendor, and broken ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
)

from bac_node.dicom.codes import (
    LEFT,
    MODIFIER_SPOT_COMPRESSION,
    RIGHT_BREAST,
    VIEW_CODES_BY_POSITION,
    Code,
)
from bac_node.dicom.reader import (
    DX_FOR_PRESENTATION,
    MGImage,
    pixel_array,
    read_instance,
)
from bac_node.errors import InvalidInstanceError, UnsupportedTransferSyntaxError
from bac_node.imaging.breast import breast_mask, chest_wall_side
from bac_node.imaging.display import presentation_pixels
from training.phantom.study import plan_studies, render_study, write_study
from training.phantom.vendors import VENDORS

#: Vendors whose phantom studies are written JPEG 2000 lossless (the rest uncompressed).
J2K_VENDORS = ("Hologic", "Siemens")


def write_phantom(vendor: str, out: Path, *, seed: int = 0) -> list[dict[str, Any]]:
    """A small study with For Presentation and For Processing images; its manifest rows."""
    jpeg2000 = "always" if vendor in J2K_VENDORS else "never"
    for attempt in range(seed, seed + 50):
        plan = plan_studies(
            1, seed=attempt, vendor=vendor, processing_fraction=1.0, jpeg2000=jpeg2000
        )[0]
        if len(plan.intents) == 2:
            return write_study(render_study(plan, scale=0.05), out)
    raise AssertionError("no plan with both intents")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Any]]]:
    """Per vendor: the output folder and the manifest rows of one written study."""
    studies: dict[str, tuple[Path, list[Any]]] = {}
    for index, style in enumerate(VENDORS):
        out = tmp_path_factory.mktemp(style.name)
        studies[style.name] = (out, write_phantom(style.name, out, seed=100 * index))
    return studies


def first_file(phantoms: dict[str, tuple[Path, list[Any]]], vendor: str = "Agfa") -> Path:
    out, rows = phantoms[vendor]
    return out / str(rows[0]["file"])


def assert_clean_reason(exc: InvalidInstanceError, name: str, ds: Dataset | None) -> None:
    """One line, names the file or UID, never the patient."""
    text = str(exc)
    assert exc.source == name
    assert "\n" not in text
    assert name in text
    if ds is not None:
        assert str(ds.PatientName) not in text
        assert str(ds.PatientID) not in text


def save(ds: Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# --- valid phantom images ------------------------------------------------------------


@pytest.mark.parametrize("vendor", [v.name for v in VENDORS])
def test_every_vendor_reads_with_header_facts(
    vendor: str, phantoms: dict[str, tuple[Path, list[Any]]]
) -> None:
    out, rows = phantoms[vendor]
    assert {r["presentation_intent"] for r in rows} == {"FOR PRESENTATION", "FOR PROCESSING"}
    for row in rows:
        image = read_instance(out / row["file"])
        assert image.path == out / row["file"]
        assert image.sop_instance_uid == row["sop_instance_uid"]
        assert image.study_instance_uid == row["study_instance_uid"]
        assert image.series_instance_uid == row["series_instance_uid"]
        assert (image.laterality, image.laterality_source) == (row["laterality"], "ImageLaterality")
        assert image.view == row["view"]
        assert image.view_modifiers == ()
        assert image.is_screening_view
        assert image.presentation_intent == row["presentation_intent"]
        assert (image.rows, image.columns) == (row["rows"], row["columns"])
        assert image.pixel_spacing_mm == pytest.approx((row["pixel_spacing_mm"],) * 2, rel=1e-6)
        expected = {
            ("R", "CC"): ("P", "L"), ("L", "CC"): ("A", "R"),
            ("R", "MLO"): ("P", "FL"), ("L", "MLO"): ("A", "FR"),
        }  # fmt: skip
        assert image.patient_orientation == expected[(row["laterality"], row["view"])]
        assert not image.implant_present
        stored = pixel_array(image)
        assert stored.shape == (image.rows, image.columns)
        assert np.array_equal(stored, pydicom.dcmread(out / row["file"]).pixel_array)


def test_a_dataset_in_memory_reads_too(phantoms: dict[str, tuple[Path, list[Any]]]) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    image = read_instance(ds)
    assert image.dataset is ds
    assert image.source in (str(first_file(phantoms)), image.sop_instance_uid)


# --- laterality and view fallbacks ---------------------------------------------------


def _without_laterality(ds: Dataset) -> Dataset:
    for keyword in ("ImageLaterality", "Laterality"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


@pytest.mark.parametrize("vendor", [v.name for v in VENDORS])
def test_laterality_from_image_content(
    vendor: str, phantoms: dict[str, tuple[Path, list[Any]]]
) -> None:
    """Both sides, both views, both intents: the chest wall side gives the laterality."""
    out, rows = phantoms[vendor]
    for row in rows:
        ds = _without_laterality(pydicom.dcmread(out / row["file"]))
        image = read_instance(ds)
        assert image.laterality == row["laterality"], row["file"]
        assert image.laterality_source == "image content and PatientOrientation"
        del ds.PatientOrientation
        image = read_instance(ds)
        assert (image.laterality, image.laterality_source) == (row["laterality"], "image content")


def test_mirrored_image_laterality_follows_patient_orientation(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    """A right CC stored mirrored (chest wall on the left, "A\\L") is still a right breast."""
    out, rows = phantoms["Agfa"]
    row = next(
        r for r in rows
        if (r["laterality"], r["view"], r["presentation_intent"]) == ("R", "CC", "FOR PRESENTATION")
    )  # fmt: skip
    ds = _without_laterality(pydicom.dcmread(out / row["file"]))
    mirrored = np.ascontiguousarray(ds.pixel_array[:, ::-1])
    ds.PixelData = mirrored.astype("<u2").tobytes()
    shown = presentation_pixels(ds, voi=False)
    assert chest_wall_side(breast_mask(shown, float(ds.ImagerPixelSpacing[0]))) == "left"
    ds.PatientOrientation = ["A", "L"]
    assert read_instance(ds).laterality == "R"
    del ds.PatientOrientation  # without it, the storage convention is all there is
    assert read_instance(ds).laterality == "L"


def test_blank_image_without_laterality_is_rejected(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    ds = _without_laterality(pydicom.dcmread(first_file(phantoms)))
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), "<u2").tobytes()
    with pytest.raises(InvalidInstanceError, match="chest wall") as info:
        read_instance(ds)
    assert_clean_reason(info.value, str(ds.filename), ds)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        code.value, code.scheme, code.meaning,
    )  # fmt: skip
    return item


def test_laterality_fallbacks_in_design_order(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    # The first file is a right CC; every fallback below says left, so content can't win.
    ds = _without_laterality(pydicom.dcmread(first_file(phantoms)))
    assert read_instance(ds).laterality == "R"
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence([_code_item(LEFT)])
    assert (read_instance(ds).laterality, read_instance(ds).laterality_source) == (
        "L", "ViewCodeSequence",
    )  # fmt: skip
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence()
    ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = Sequence([_code_item(LEFT)])
    assert read_instance(ds).laterality_source == "AnatomicRegionSequence"
    shared = Dataset()
    anatomy = Dataset()
    anatomy.FrameLaterality = "L"
    shared.FrameAnatomySequence = Sequence([anatomy])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    assert read_instance(ds).laterality_source == "FrameLaterality"
    ds.Laterality = "L"
    assert read_instance(ds).laterality_source == "Laterality"
    ds.ImageLaterality = "R"
    assert (read_instance(ds).laterality, read_instance(ds).laterality_source) == (
        "R", "ImageLaterality",
    )  # fmt: skip


def test_right_breast_anatomic_region_code(phantoms: dict[str, tuple[Path, list[Any]]]) -> None:
    ds = _without_laterality(pydicom.dcmread(first_file(phantoms)))
    ds.AnatomicRegionSequence = Sequence([_code_item(RIGHT_BREAST)])
    assert read_instance(ds).laterality_source == "AnatomicRegionSequence"


def test_view_from_codes_legacy_codes_or_view_position(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    item = ds.ViewCodeSequence[0]
    item.CodeValue, item.CodingSchemeDesignator = "R-10226", "SRT"  # SNOMED RT MLO
    assert read_instance(ds).view == "MLO"
    item.CodeValue, item.CodingSchemeDesignator = VIEW_CODES_BY_POSITION["XCCL"].value, "SCT"
    image = read_instance(ds)
    assert (image.view, image.is_screening_view) == ("XCCL", False)
    del ds.ViewCodeSequence
    ds.ViewPosition = "ML"
    assert read_instance(ds).view == "ML"
    ds.ViewPosition = ""
    assert read_instance(ds).view == ""


def test_spot_compression_is_not_a_screening_view(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence(
        [_code_item(MODIFIER_SPOT_COMPRESSION)]
    )
    ds.BreastImplantPresent = "YES"
    image = read_instance(ds)
    assert image.view == "CC"
    assert image.view_modifiers == ("spot compression",)
    assert not image.is_screening_view
    assert image.implant_present


def test_pixel_spacing_falls_back_and_is_required(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    del ds.ImagerPixelSpacing
    ds.PixelSpacing = ["0.5", "0.25"]
    assert read_instance(ds).pixel_spacing_mm == (0.5, 0.25)
    del ds.PixelSpacing
    with pytest.raises(InvalidInstanceError, match="ImagerPixelSpacing") as info:
        read_instance(ds)
    assert_clean_reason(info.value, str(ds.filename), ds)


# --- broken and foreign files --------------------------------------------------------


@pytest.mark.parametrize("vendor", ["Agfa", "Hologic"])  # uncompressed, JPEG 2000
@pytest.mark.parametrize("keep", [0.5, 0.02, 0.999])
def test_truncated_file(
    vendor: str, keep: float, phantoms: dict[str, tuple[Path, list[Any]]], tmp_path: Path
) -> None:
    source = first_file(phantoms, vendor)
    data = source.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InvalidInstanceError, match="truncated") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), pydicom.dcmread(source))


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.dcm"
    garbage.write_bytes(b"this is not a mammogram\n" * 40)
    with pytest.raises(InvalidInstanceError, match="not a DICOM file") as info:
        read_instance(garbage)
    assert_clean_reason(info.value, str(garbage), None)
    with pytest.raises(InvalidInstanceError, match="no such file"):
        read_instance(tmp_path / "absent.dcm")


def test_non_mg_instances(phantoms: dict[str, tuple[Path, list[Any]]], tmp_path: Path) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    ds.Modality = "CT"
    path = save(ds, tmp_path / "modality.dcm")
    with pytest.raises(InvalidInstanceError, match="Modality") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), ds)

    ds.Modality = "MG"
    ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    path = save(ds, tmp_path / "ct.dcm")
    with pytest.raises(InvalidInstanceError, match="CT Image Storage") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), ds)

    capture = _tiny_secondary_capture()
    path = save(capture, tmp_path / "sc.dcm")
    with pytest.raises(InvalidInstanceError, match="not a mammogram") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), capture)


def _tiny_secondary_capture() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.1"
    ds.PatientName, ds.PatientID = "SECRET^PATIENT", "ID-12345"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_dx_class_is_a_mammogram_only_with_modality_mg(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    ds.SOPClassUID = DX_FOR_PRESENTATION
    assert read_instance(ds).presentation_intent == "FOR PRESENTATION"
    ds.Modality = "DX"
    with pytest.raises(InvalidInstanceError, match="Modality"):
        read_instance(ds)


@pytest.mark.parametrize("change", ["rows", "short", "bits", "frames", "samples", "missing"])
def test_native_pixel_data_must_match_the_header(
    change: str, phantoms: dict[str, tuple[Path, list[Any]]], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(first_file(phantoms, "Agfa"))
    if change == "rows":
        ds.Rows += 1
    elif change == "short":
        ds.PixelData = ds.PixelData[:-100]
    elif change == "bits":
        ds.BitsAllocated = 8
        ds.BitsStored, ds.HighBit = 8, 7
    elif change == "frames":
        ds.NumberOfFrames = 2
    elif change == "samples":
        ds.SamplesPerPixel = 3
    else:
        del ds.PixelData
    path = save(ds, tmp_path / f"{change}.dcm")
    with pytest.raises(InvalidInstanceError) as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), ds)
    assert type(info.value) is InvalidInstanceError


def test_encapsulated_pixel_data_must_decode_to_the_header_shape(
    phantoms: dict[str, tuple[Path, list[Any]]], tmp_path: Path
) -> None:
    source = pydicom.dcmread(first_file(phantoms, "Hologic"))
    assert source.file_meta.TransferSyntaxUID.is_compressed
    ds = copy.deepcopy(source)
    ds.Columns += 2
    path = save(ds, tmp_path / "shape.dcm")
    with pytest.raises(InvalidInstanceError, match=r"decodes to|cannot be decoded") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), ds)

    # A corrupt codestream: found at read time, or by pixel_array without decoding.
    ds = copy.deepcopy(source)
    frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    frame[200:] = bytes(len(frame) - 200)
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame[: len(frame) // 3])])
    path = save(ds, tmp_path / "corrupt.dcm")
    with pytest.raises(InvalidInstanceError, match="cannot be decoded") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), ds)
    lazy = read_instance(path, decode=False)
    with pytest.raises(InvalidInstanceError, match="cannot be decoded"):
        pixel_array(lazy)


def test_unsupported_transfer_syntaxes(
    phantoms: dict[str, tuple[Path, list[Any]]], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(first_file(phantoms, "Agfa"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    path = save(ds, tmp_path / "mpeg2.dcm")
    with pytest.raises(UnsupportedTransferSyntaxError, match="MPEG2") as info:
        read_instance(path)
    assert_clean_reason(info.value, str(path), ds)


def test_jpeg_lossless_decodes(phantoms: dict[str, tuple[Path, list[Any]]], tmp_path: Path) -> None:
    """JPEG Lossless SV1, what many mammography units send, decodes (python-gdcm)."""
    import gdcm  # a dependency of bac-node

    source = first_file(phantoms, "Hologic")
    target = tmp_path / "jpeg-lossless.dcm"
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    image = read_instance(target)
    assert image.dataset.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert np.array_equal(pixel_array(image), pydicom.dcmread(source).pixel_array)


def test_malformed_values_become_invalid_instance(
    phantoms: dict[str, tuple[Path, list[Any]]],
) -> None:
    ds = pydicom.dcmread(first_file(phantoms))
    ds.ImagerPixelSpacing = ["0.1"]
    with pytest.raises(InvalidInstanceError, match="two numbers") as info:
        read_instance(ds)
    assert_clean_reason(info.value, str(ds.filename), ds)


def test_image_is_frozen(phantoms: dict[str, tuple[Path, list[Any]]]) -> None:
    image: MGImage = read_instance(first_file(phantoms))
    with pytest.raises(AttributeError):
        image.view = "MLO"  # type: ignore[misc]
