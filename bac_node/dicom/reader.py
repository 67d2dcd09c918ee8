"""Reading and validating one mammography instance: :func:`read_instance` -> :class:`MGImage`.

What is accepted (and why):

- SOP classes: Digital Mammography X-Ray Image Storage For Presentation and For
  Processing. Digital X-Ray (For Presentation / For Processing) and Computed Radiography
  Image Storage are accepted too when Modality is MG: CR-based mammography units and
  older DR gateways still send mammograms in those classes, and their pixels mean the
  same thing. Anything else (breast tomosynthesis, secondary captures, SEG, SR) is
  rejected with its SOP class named.
- Pixel data: one frame, SamplesPerPixel 1, MONOCHROME1/2, BitsAllocated 8 or 16. Native
  pixel data must be exactly Rows x Columns x BitsAllocated/8 bytes (plus one padding
  byte): a longer or shorter value means a header that does not describe the pixels.
  Encapsulated pixel data is decoded when the instance is read (``decode=True``, the
  default) and must decode to Rows x Columns; pydicom keeps the decoded array on the
  dataset, so :func:`pixel_array` does not decode twice.
- Transfer syntaxes: every syntax for which pydicom has a pixel data decoder whose
  plugin is installed (uncompressed little and big endian, deflated, RLE, JPEG, JPEG-LS,
  JPEG 2000, HTJ2K with pylibjpeg, pylibjpeg-openjpeg, pyjpegls or Pillow). A syntax
  whose plugin is missing (JPEG Lossless without pylibjpeg-libjpeg or python-gdcm)
  raises :class:`~bac_node.errors.UnsupportedTransferSyntaxError` naming the plugins
  that would decode it; video and streaming syntaxes (MPEG, HEVC, JPIP) have no
  decoder and are not mammograms.

Laterality, in DESIGN.md's order: Image Laterality (0020,0062); else Laterality
(0020,0060); else Frame Laterality (0020,9072) in the shared (then first per-frame)
functional groups; else a laterality code (Right/Left, Right/Left breast) in View Code
Sequence, its modifiers, or Anatomic Region Sequence and its modifiers; else the image
content (the edge the breast mask touches, :mod:`bac_node.imaging.breast`).
``laterality_source`` names which one decided.

Every error is an :class:`~bac_node.errors.InvalidInstanceError` whose one-line message
names the file (or the SOP Instance UID when there is no file) and never the patient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from bac_node.dicom.codes import (
    LATERALITY_BY_CODE_VALUE,
    MODIFIER_IMPLANT_DISPLACED,
    MODIFIER_MAGNIFICATION,
    MODIFIER_SPOT_COMPRESSION,
    SCREENING_VIEW_CODES,
    VIEW_CODES_BY_POSITION,
    VIEW_POSITION_BY_CODE_VALUE,
)
from bac_node.errors import InvalidInstanceError, UnsupportedTransferSyntaxError
from bac_node.imaging.breast import breast_mask, chest_wall_side
from bac_node.imaging.display import presentation_pixels

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"

#: SOP classes read as mammograms, with the presentation intent the class implies
#: ("" where the class allows both and Presentation Intent Type decides).
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    MG_FOR_PRESENTATION: "FOR PRESENTATION",
    MG_FOR_PROCESSING: "FOR PROCESSING",
    DX_FOR_PRESENTATION: "FOR PRESENTATION",
    DX_FOR_PROCESSING: "FOR PROCESSING",
    COMPUTED_RADIOGRAPHY: "FOR PRESENTATION",
}

_MODIFIER_BY_VALUE = {
    c.value: c.meaning
    for c in (MODIFIER_SPOT_COMPRESSION, MODIFIER_MAGNIFICATION, MODIFIER_IMPLANT_DISPLACED)
}

_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class MGImage:
    """One validated mammography instance and what bac-node needs to know about it."""

    path: Path | None
    dataset: Dataset
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    laterality: str
    """"R" or "L"."""
    laterality_source: str
    """What gave the laterality: "ImageLaterality", "Laterality", "FrameLaterality",
    "ViewCodeSequence", "AnatomicRegionSequence", "image content and
    PatientOrientation" or "image content"."""
    view: str
    """ViewPosition-style abbreviation ("CC", "MLO", "ML", "XCCL", ...), "" if unknown."""
    view_modifiers: tuple[str, ...]
    """Meanings of the View Modifier Code Sequence items, e.g. "spot compression"."""
    presentation_intent: str
    """"FOR PRESENTATION" or "FOR PROCESSING"."""
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    """(row, column) spacing in mm: Imager Pixel Spacing, else Pixel Spacing."""
    patient_orientation: tuple[str, str] | None
    implant_present: bool

    @property
    def is_screening_view(self) -> bool:
        """CC or MLO without any view modifier.

        Every CID 4015 modifier (spot compression, magnification, implant displaced,
        rolled, tangential, cleavage, axillary tail...) marks a supplementary work-up
        view, not one of the four screening views.
        """
        return self.view in SCREENING_VIEW_CODES and not self.view_modifiers

    @property
    def label(self) -> str:
        """Laterality and view as a radiologist writes them: "R-CC", "L-MLO"."""
        return f"{self.laterality}-{self.view or 'unknown view'}"

    @property
    def source(self) -> str:
        """How errors and reports name this instance: its file, else its UID."""
        return str(self.path) if self.path is not None else self.sop_instance_uid


def read_instance(source: Path | str | Dataset, *, decode: bool = True) -> MGImage:
    """Read and validate one MG instance from a file or an already read dataset.

    With ``decode`` (the default), compressed pixel data is decoded now and checked
    against Rows x Columns, so an image that is returned can be analysed; without it
    only the header and the presence of the encapsulated frame are checked and
    :func:`pixel_array` reports a decoding failure later. Raises
    :class:`InvalidInstanceError` (or its :class:`UnsupportedTransferSyntaxError`) with
    a one-line reason naming the file or SOP Instance UID.
    """
    path, ds = _load(source)
    name = _name(path, ds)
    try:
        return _validate(path, ds, name, decode=decode)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # a malformed value pydicom could not convert
        raise InvalidInstanceError(name, _scrub(_one_line(exc), ds)) from exc


def pixel_array(image: MGImage) -> NDArray[Any]:
    """The stored pixel values (decoded), Rows x Columns.

    A decoding failure raises :class:`InvalidInstanceError` naming the instance.
    """
    ds = image.dataset
    try:
        array = ds.pixel_array
    except Exception as exc:
        raise InvalidInstanceError(
            image.source, _scrub(f"pixel data cannot be decoded: {_one_line(exc)}", ds)
        ) from exc
    if array.shape != (image.rows, image.columns):
        raise InvalidInstanceError(
            image.source,
            f"pixel data decodes to {_shape(array.shape)}, "
            f"but Rows x Columns is {image.rows}x{image.columns}",
        )
    return array


# --- loading -------------------------------------------------------------------------


def _load(source: Path | str | Dataset) -> tuple[Path | None, Dataset]:
    if isinstance(source, Dataset):
        filename = getattr(source, "filename", None)
        return (Path(filename) if isinstance(filename, str) and filename else None), source
    path = Path(source)
    if not path.is_file():
        raise InvalidInstanceError(path, "no such file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds: Dataset = pydicom.dcmread(path)
        except InvalidDicomError:
            ds = _read_raw_dataset(path)
        except Exception as exc:
            raise InvalidInstanceError(
                path, f"not a readable DICOM file: {_one_line(exc)} (truncated or corrupt?)"
            ) from exc
    for warning in caught:
        text = str(warning.message)
        if "End of file" in text or "truncated" in text.lower():
            raise InvalidInstanceError(path, "the file is truncated (it ends inside a value)")
    _check_complete(path, ds)
    return path, ds


def _check_complete(path: Path, ds: Dataset) -> None:
    """pydicom keeps a last value cut short by the end of the file: that is truncation."""
    if not ds:
        return
    tag = list(ds.keys())[-1]
    raw = ds.get_item(tag)
    declared = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if (
        isinstance(declared, int)
        and declared != _UNDEFINED_LENGTH
        and isinstance(value, bytes)
        and len(value) < declared
    ):
        raise InvalidInstanceError(
            path,
            f"the file is truncated: it ends inside {tag} "
            f"({len(value)} of its {declared} bytes are there)",
        )


def _read_raw_dataset(path: Path) -> Dataset:
    """A file without the Part 10 header: accept it only if it is plainly an image."""
    try:
        ds = pydicom.dcmread(path, force=True)
        looks_like_image = "SOPClassUID" in ds and "PixelData" in ds
    except Exception:
        looks_like_image = False
    if not looks_like_image:
        raise InvalidInstanceError(path, "not a DICOM file (no DICM prefix, no image dataset)")
    return ds


# --- validation ----------------------------------------------------------------------


def _validate(path: Path | None, ds: Dataset, name: str, *, decode: bool) -> MGImage:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class:
        raise InvalidInstanceError(name, "SOPClassUID (0008,0016) is missing")
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise InvalidInstanceError(
            name,
            f"SOP class {_uid_name(sop_class)} is not a mammogram "
            "(Digital Mammography X-Ray Image Storage expected)",
        )
    modality = str(ds.get("Modality", "") or "")
    if modality != "MG":
        raise InvalidInstanceError(name, f"Modality (0008,0060) is {modality!r}, not 'MG'")
    sop_uid = _required_text(ds, "SOPInstanceUID", "(0008,0018)", name)
    study_uid = _required_text(ds, "StudyInstanceUID", "(0020,000D)", name)
    series_uid = _required_text(ds, "SeriesInstanceUID", "(0020,000E)", name)
    rows, columns = _check_pixel_data(ds, name, decode=decode)
    intent = _presentation_intent(ds, sop_class)
    view, modifiers = _view(ds)
    orientation = _patient_orientation(ds)
    laterality, laterality_source = _laterality(ds, name, orientation)
    return MGImage(
        path=path,
        dataset=ds,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        laterality=laterality,
        laterality_source=laterality_source,
        view=view,
        view_modifiers=modifiers,
        presentation_intent=intent,
        rows=rows,
        columns=columns,
        pixel_spacing_mm=_pixel_spacing(ds, name),
        patient_orientation=orientation,
        implant_present=str(ds.get("BreastImplantPresent", "") or "").upper() == "YES",
    )


def _check_pixel_data(ds: Dataset, name: str, *, decode: bool) -> tuple[int, int]:
    if "PixelData" not in ds:
        raise InvalidInstanceError(name, "PixelData (7FE0,0010) is missing")
    rows = _required_int(ds, "Rows", "(0028,0010)", name)
    columns = _required_int(ds, "Columns", "(0028,0011)", name)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InvalidInstanceError(name, f"SamplesPerPixel (0028,0002) is {samples}, not 1")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InvalidInstanceError(name, f"NumberOfFrames (0028,0008) is {frames}, not 1")
    bits = _required_int(ds, "BitsAllocated", "(0028,0100)", name)
    if bits not in (8, 16):
        raise InvalidInstanceError(name, f"BitsAllocated (0028,0100) is {bits}, not 8 or 16")
    stored = _required_int(ds, "BitsStored", "(0028,0101)", name)
    if stored > bits:
        raise InvalidInstanceError(
            name, f"BitsStored (0028,0101) {stored} exceeds BitsAllocated {bits}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidInstanceError(
            name, f"PhotometricInterpretation (0028,0004) is {photometric!r}, not MONOCHROME1/2"
        )

    syntax = _transfer_syntax(ds, name)
    if not syntax.is_encapsulated:
        expected = int(get_expected_length(ds, unit="bytes"))
        actual = len(ds.PixelData)
        if actual not in (expected, expected + expected % 2):
            raise InvalidInstanceError(
                name,
                f"PixelData (7FE0,0010) holds {actual} bytes, but Rows x Columns x "
                f"BitsAllocated/8 = {rows}x{columns}x{bits // 8} needs {expected}",
            )
        return rows, columns
    if not ds.PixelData:
        raise InvalidInstanceError(name, "PixelData (7FE0,0010) is empty")
    if decode:
        try:
            array = ds.pixel_array
        except Exception as exc:
            raise InvalidInstanceError(
                name, _scrub(f"pixel data cannot be decoded: {_one_line(exc)}", ds)
            ) from exc
        if array.shape != (rows, columns):
            raise InvalidInstanceError(
                name,
                f"pixel data decodes to {_shape(array.shape)}, "
                f"but Rows x Columns is {rows}x{columns}",
            )
    return rows, columns


def _transfer_syntax(ds: Dataset, name: str) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise InvalidInstanceError(name, "TransferSyntaxUID (0002,0010) is missing")
    syntax = UID(str(uid))
    label = f"{syntax.name} ({syntax})" if syntax.is_transfer_syntax else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            name,
            f"transfer syntax {label} has no image decoder; send the mammogram uncompressed "
            "or as JPEG, JPEG-LS, JPEG 2000 or RLE",
        ) from None
    if not decoder.is_available:
        plugins = [_pip_name(text) for text in decoder.missing_dependencies]
        raise UnsupportedTransferSyntaxError(
            name,
            f"transfer syntax {label} needs a decoder plugin that is not installed; "
            f"install one of: {'; '.join(plugins)}",
        )
    return syntax


def _pip_name(missing: str) -> str:
    """pydicom's "gdcm - requires gdcm>=3.0.10" as the packages pip installs."""
    needs = missing.split(" - requires ", 1)[-1]
    return needs.replace("gdcm>=", "python-gdcm>=") if needs.startswith("gdcm") else needs


def _presentation_intent(ds: Dataset, sop_class: str) -> str:
    implied = ACCEPTED_SOP_CLASSES[sop_class]
    if sop_class in (MG_FOR_PRESENTATION, MG_FOR_PROCESSING, COMPUTED_RADIOGRAPHY):
        return implied  # the class decides; a contradicting attribute is the header's error
    stated = str(ds.get("PresentationIntentType", "") or "").upper()
    return stated if stated in ("FOR PRESENTATION", "FOR PROCESSING") else implied


def _pixel_spacing(ds: Dataset, name: str) -> tuple[float, float]:
    for keyword, tag in (("ImagerPixelSpacing", "(0018,1164)"), ("PixelSpacing", "(0028,0030)")):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            raise InvalidInstanceError(
                name, f"{keyword} {tag} is not two numbers: {value!r}"
            ) from None
        if row <= 0 or col <= 0:
            raise InvalidInstanceError(name, f"{keyword} {tag} must be > 0, got {row}\\{col}")
        return row, col
    raise InvalidInstanceError(
        name,
        "neither ImagerPixelSpacing (0018,1164) nor PixelSpacing (0028,0030) is present: "
        "areas in mm² cannot be measured",
    )


def _patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None or isinstance(value, str):
        return None
    parts = [str(v).strip().upper() for v in value]
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


# --- view ----------------------------------------------------------------------------


def _view(ds: Dataset) -> tuple[str, tuple[str, ...]]:
    view = ""
    modifiers: list[str] = []
    items = ds.get("ViewCodeSequence") or []
    if items:
        item = items[0]
        value = str(item.get("CodeValue", "") or "")
        view = VIEW_POSITION_BY_CODE_VALUE.get(value, "")
        if not view:
            meaning = str(item.get("CodeMeaning", "") or "").strip().lower()
            view = next(
                (pos for pos, code in VIEW_CODES_BY_POSITION.items() if code.meaning == meaning),
                "",
            )
        for modifier in item.get("ViewModifierCodeSequence") or []:
            known = _MODIFIER_BY_VALUE.get(str(modifier.get("CodeValue", "") or ""))
            text = known or str(modifier.get("CodeMeaning", "") or "").strip().lower()
            if text:
                modifiers.append(text)
    if not view:
        position = str(ds.get("ViewPosition", "") or "").strip().upper()
        view = position if position.isalpha() else ""
    return view, tuple(modifiers)


# --- laterality ----------------------------------------------------------------------


def _laterality(ds: Dataset, name: str, orientation: tuple[str, str] | None) -> tuple[str, str]:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value, keyword
    frame = _frame_laterality(ds)
    if frame:
        return frame, "FrameLaterality"
    for keyword in ("ViewCodeSequence", "AnatomicRegionSequence"):
        coded = _coded_laterality(ds.get(keyword) or [])
        if coded:
            return coded, keyword
    return _laterality_from_content(ds, name, orientation)


def _frame_laterality(ds: Dataset) -> str:
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(keyword) or []
        if not groups:
            continue
        for anatomy in groups[0].get("FrameAnatomySequence") or []:
            value = str(anatomy.get("FrameLaterality", "") or "").strip().upper()
            if value in ("R", "L"):
                return value
    return ""


def _coded_laterality(items: Any) -> str:
    found: set[str] = set()
    for item in items:
        for code in (
            item,
            *(item.get("ViewModifierCodeSequence") or []),
            *(item.get("AnatomicRegionModifierSequence") or []),
        ):
            side = LATERALITY_BY_CODE_VALUE.get(str(code.get("CodeValue", "") or ""))
            if side:
                found.add(side)
    return found.pop() if len(found) == 1 else ""


def _laterality_from_content(
    ds: Dataset, name: str, orientation: tuple[str, str] | None
) -> tuple[str, str]:
    """Laterality from the chest wall side, as mammography units store images.

    A right breast is stored with its chest wall on the right edge and a left breast
    on the left ("P\\L", "A\\R" on CC). Patient Orientation, when it names the medial
    direction (the L/R letter of its column value: down is medial on CC and
    inferomedial on MLO), decides for images stored mirrored; its row value must then
    agree with the chest wall the pixels show.
    """
    try:
        spacing = _pixel_spacing(ds, name)[0]
        edge = chest_wall_side(breast_mask(presentation_pixels(ds, voi=False), spacing))
    except InvalidInstanceError:
        raise
    except Exception as exc:
        raise InvalidInstanceError(
            name, _scrub(f"laterality is not in the header and {_one_line(exc)}", ds)
        ) from exc
    if edge is None:
        raise InvalidInstanceError(
            name,
            "laterality is missing (ImageLaterality (0020,0062), Laterality (0020,0060), "
            "view codes) and the image does not show which side the chest wall is on",
        )
    from_edge = "R" if edge == "right" else "L"
    if orientation is not None:
        row, column = orientation
        posterior = "right" if "P" in row else "left" if "A" in row else None
        medial = {c for c in column if c in "LR"}
        if posterior == edge and len(medial) == 1:
            side = "R" if medial == {"L"} else "L"
            return side, "image content and PatientOrientation"
    return from_edge, "image content"


# --- messages ------------------------------------------------------------------------


def _name(path: Path | None, ds: Dataset) -> str:
    if path is not None:
        return str(path)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return f"SOP Instance UID {uid}" if uid else "a dataset without SOP Instance UID"


def _required_text(ds: Dataset, keyword: str, tag: str, name: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise InvalidInstanceError(name, f"{keyword} {tag} is missing")
    return value


def _required_int(ds: Dataset, keyword: str, tag: str, name: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InvalidInstanceError(name, f"{keyword} {tag} is missing")
    number = int(value)
    if number <= 0:
        raise InvalidInstanceError(name, f"{keyword} {tag} is {number}, not > 0")
    return number


def _uid_name(uid: str) -> str:
    known = UID(uid).name
    return f"{known} ({uid})" if known != uid else uid


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _scrub(text: str, ds: Dataset) -> str:
    """``text`` without the patient's name or ID (a decoder might echo a value)."""
    for keyword in ("PatientName", "PatientID"):
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 3:
            text = text.replace(value, "<patient>")
    return text
