"""Digital Mammography X-Ray Image objects (PS3.3 A.26.2) for the synthetic phantom.

:func:`build_mg_dataset` puts a :class:`~training.phantom.vendors.StoredImage` and an
:class:`InstanceMeta` into a dataset with the modules of the MG IOD (SOP Common,
Patient, General Study, General Series, DX Series, Mammography Series, General
Equipment, General Acquisition, General Image, Image Pixel, DX Anatomy Imaged, DX
Image, DX Detector, DX Positioning, X-Ray Acquisition Dose, X-Ray Generation, X-Ray
Filtration, X-Ray Grid, Mammography Image, VOI LUT, Acquisition Context);
:func:`write_mg_instance` writes it as a Part 10 file, uncompressed (Explicit VR
Little Endian) or JPEG 2000 lossless. Every UID is the caller's: nothing here invents
one, so a study can be regenerated bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from bac_node.dicom.codes import BREAST, SCREENING_VIEW_CODES, Code
from training.phantom.types import Laterality, PresentationIntent, ViewName
from training.phantom.vendors import StoredImage, VendorStyle

IMPLEMENTATION_VERSION_NAME = "BAC_NODE_PHANTOM"

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{6}(\.\d{1,6})?$")
_AGE = re.compile(r"^\d{3}[DWMY]$")
_UID = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))+$")


def mg_sop_class_uid(intent: PresentationIntent) -> str:
    """SOP Class UID of Digital Mammography X-Ray Image Storage for ``intent``."""
    if intent == "FOR PRESENTATION":
        return str(DigitalMammographyXRayImageStorageForPresentation)
    if intent == "FOR PROCESSING":
        return str(DigitalMammographyXRayImageStorageForProcessing)
    raise ValueError(f"Presentation Intent Type (0008,0068) {intent!r} is not an MG intent")


def patient_orientation(laterality: Laterality, view: ViewName) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of an image in the phantom's layout.

    The phantom stores a right breast with its chest wall on the right edge and a left
    breast with its chest wall on the left, as mammography units do: rows run from the
    nipple to the chest wall (P) for a right breast and from the chest wall to the
    nipple (A) for a left one. Columns run lateral→medial on CC (the medial side of
    the right breast is the patient's left); on MLO the image plane is parallel to the
    pectoral muscle, so columns run from the axilla (superolateral) to inferomedial:
    F plus the medial side (R MLO "P\\FL", L MLO "A\\FR").
    """
    row = "P" if laterality == "R" else "A"
    medial = "L" if laterality == "R" else "R"
    column = medial if view == "CC" else "F" + medial
    return row, column


@dataclass
class InstanceMeta:
    """Everything about one MG instance that is not its pixels.

    Patient attributes must be synthetic and look it (``PHANTOM^BAC0042``).
    """

    patient_name: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    series_number: int
    instance_number: int
    laterality: Laterality
    view: ViewName
    vendor: VendorStyle
    compressed_thickness_mm: float
    series_description: str = ""
    study_description: str = "MG SCREENING BILATERAL (SYNTHETIC PHANTOM)"
    patient_birth_date: str = ""
    patient_sex: str = "F"
    patient_age: str = ""
    referring_physician_name: str = ""
    institution_name: str = "BAC-NODE PHANTOM SITE"
    station_name: str = "PHANTOM01"
    device_serial_number: str = "PHANTOM-0001"
    acquisition_number: int = 1
    kvp: float | None = None
    """Peak kilovoltage; None takes the vendor's usual value."""
    exposure_mas: float = 90.0
    exposure_time_ms: int = 1200
    compression_force_n: float = 110.0
    breast_implant_present: str = "NO"
    entrance_dose_mgy: float = 4.5
    organ_dose_dgy: float = 0.012
    """Average glandular dose (Organ Dose (0040,0316) is in dGy)."""
    source_for_processing_uid: str = ""
    """For Presentation only: SOP Instance UID of the For Processing image it was made
    from, referenced in Source Image Sequence (as IHE Mammography Image asks)."""

    def __post_init__(self) -> None:
        uids = ["study_instance_uid", "series_instance_uid", "sop_instance_uid"]
        if self.source_for_processing_uid:
            uids.append("source_for_processing_uid")
        for keyword in uids:
            value = getattr(self, keyword)
            if len(value) > 64 or not _UID.match(value):
                raise ValueError(f"{keyword} {value!r} is not a valid UID")
        if not _DATE.match(self.study_date):
            raise ValueError(f"Study Date (0008,0020) must be YYYYMMDD, got {self.study_date!r}")
        if not _TIME.match(self.study_time):
            raise ValueError(f"Study Time (0008,0030) must be HHMMSS, got {self.study_time!r}")
        if self.patient_birth_date and not _DATE.match(self.patient_birth_date):
            raise ValueError("Patient's Birth Date (0010,0030) must be YYYYMMDD")
        if self.patient_age and not _AGE.match(self.patient_age):
            raise ValueError("Patient's Age (0010,1010) must look like 058Y")
        if self.laterality not in ("L", "R"):
            raise ValueError(
                f"Image Laterality (0020,0062) must be L or R, got {self.laterality!r}"
            )
        if self.view not in SCREENING_VIEW_CODES:
            raise ValueError(f"View Position (0018,5101) must be CC or MLO, got {self.view!r}")
        if self.breast_implant_present not in ("YES", "NO"):
            raise ValueError("Breast Implant Present (0028,1300) must be YES or NO")
        if self.compressed_thickness_mm <= 0:
            raise ValueError("Body Part Thickness (0018,11A0) must be > 0")


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) with as many digits as fit."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a Decimal String")


def build_mg_dataset(stored: StoredImage, meta: InstanceMeta) -> Dataset:
    """The MG instance for ``stored`` pixels and ``meta``, uncompressed.

    Its file meta information says Explicit VR Little Endian, so the dataset can be
    decoded, sent or written as it is.
    """
    style = meta.vendor
    intent = stored.presentation_intent
    ds = Dataset()

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = mg_sop_class_uid(intent)
    ds.SOPInstanceUID = meta.sop_instance_uid
    ds.InstanceCreationDate = meta.study_date
    ds.InstanceCreationTime = meta.study_time

    # General Study, Patient
    ds.StudyDate = meta.study_date
    ds.SeriesDate = meta.study_date
    ds.AcquisitionDate = meta.study_date
    ds.ContentDate = meta.study_date
    ds.StudyTime = meta.study_time
    ds.SeriesTime = meta.study_time
    ds.AcquisitionTime = meta.study_time
    ds.ContentTime = meta.study_time
    ds.AccessionNumber = meta.accession_number
    ds.Modality = "MG"
    ds.PresentationIntentType = intent
    ds.Manufacturer = style.manufacturer
    ds.InstitutionName = meta.institution_name
    ds.InstitutionAddress = "Synthetic phantom, no real site"
    ds.ReferringPhysicianName = meta.referring_physician_name
    ds.StationName = meta.station_name
    ds.OperatorsName = "PHANTOM^OPERATOR"
    ds.StudyDescription = meta.study_description
    if meta.series_description:
        ds.SeriesDescription = meta.series_description
    ds.ManufacturerModelName = style.manufacturer_model_name
    ds.PatientName = meta.patient_name
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = meta.patient_birth_date
    ds.PatientSex = meta.patient_sex
    if meta.patient_age:
        ds.PatientAge = meta.patient_age

    # General Image, DX Image, Mammography Image
    # Value 3 of Image Type is present and empty for an ordinary mammogram (C.8.11.7.1.4).
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]

    # DX Anatomy Imaged
    ds.BodyPartExamined = "BREAST"
    ds.AnatomicRegionSequence = Sequence([_code_item(BREAST)])

    # DX Detector, X-Ray Acquisition Dose/Generation/Filtration/Grid, DX Positioning
    ds.KVP = _ds(meta.kvp if meta.kvp is not None else style.kvp)
    ds.DeviceSerialNumber = meta.device_serial_number
    ds.SoftwareVersions = style.software_versions
    source_to_detector = style.distance_source_to_detector_mm
    # Breast support 20 mm above the detector; the patient side of the support is SOD.
    source_to_patient = source_to_detector - 20.0
    ds.DistanceSourceToDetector = _ds(source_to_detector)
    ds.DistanceSourceToPatient = _ds(source_to_patient)
    ds.EstimatedRadiographicMagnificationFactor = _ds(source_to_detector / source_to_patient)
    ds.ExposureTime = meta.exposure_time_ms
    ds.XRayTubeCurrent = max(1, round(meta.exposure_mas * 1000 / meta.exposure_time_ms))
    ds.Exposure = max(1, round(meta.exposure_mas))
    ds.ExposureInuAs = round(meta.exposure_mas * 1000)
    ds.RelativeXRayExposure = round(meta.exposure_mas * 10)
    ds.Grid = style.grid
    ds.FilterMaterial = style.filter_material
    ds.BodyPartThickness = _ds(meta.compressed_thickness_mm)
    ds.CompressionForce = _ds(meta.compression_force_n)
    ds.ViewPosition = meta.view
    ds.PositionerType = "MAMMOGRAPHIC"
    # Positioner Primary Angle as Hologic-style headers write it: +45 R MLO, -45 L MLO.
    ds.PositionerPrimaryAngle = _ds(
        0.0 if meta.view == "CC" else (45.0 if meta.laterality == "R" else -45.0)
    )
    ds.DetectorType = style.detector_type
    ds.DetectorConfiguration = style.detector_configuration
    ds.DetectorID = f"{style.name.upper()}-DET-01"
    ds.DateOfLastDetectorCalibration = meta.study_date
    ds.TimeOfLastDetectorCalibration = "070000"
    spacing = _ds(stored.imager_pixel_spacing_mm)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.AnodeTargetMaterial = style.anode_target_material
    ds.EntranceDoseInmGy = _ds(meta.entrance_dose_mgy)
    ds.OrganExposed = "BREAST"
    ds.OrganDose = _ds(meta.organ_dose_dgy)
    if stored.acquisition_device_processing_description:
        ds.AcquisitionDeviceProcessingDescription = stored.acquisition_device_processing_description

    # Relationship
    ds.StudyInstanceUID = meta.study_instance_uid
    ds.SeriesInstanceUID = meta.series_instance_uid
    ds.StudyID = meta.study_id
    ds.SeriesNumber = meta.series_number
    ds.AcquisitionNumber = meta.acquisition_number
    ds.InstanceNumber = meta.instance_number
    ds.PatientOrientation = list(patient_orientation(meta.laterality, meta.view))
    ds.ImageLaterality = meta.laterality

    # Image Pixel, DX Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = stored.photometric_interpretation
    ds.Rows = stored.rows
    ds.Columns = stored.columns
    ds.BitsAllocated = 16
    ds.BitsStored = stored.bits_stored
    ds.HighBit = stored.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = stored.pixel_intensity_relationship
    ds.PixelIntensityRelationshipSign = stored.pixel_intensity_relationship_sign
    has_voi = bool(stored.window_centers) or stored.voi_lut is not None
    if has_voi and intent != "FOR PRESENTATION":
        raise ValueError("a VOI (0028,1050)/(0028,3010) is only allowed FOR PRESENTATION")
    if stored.window_centers:
        ds.WindowCenter = [_ds(c) for c in stored.window_centers]
        ds.WindowWidth = [_ds(w) for w in stored.window_widths]
        if stored.window_explanations:
            ds.WindowCenterWidthExplanation = list(stored.window_explanations)
        if stored.voi_lut_function:
            ds.VOILUTFunction = stored.voi_lut_function
    ds.RescaleIntercept = _ds(stored.rescale_intercept)
    ds.RescaleSlope = _ds(stored.rescale_slope)
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.BreastImplantPresent = meta.breast_implant_present
    ds.PartialView = "NO"
    if stored.voi_lut is not None:
        lut = stored.voi_lut
        item = Dataset()
        item.LUTDescriptor = list(lut.descriptor)
        item.LUTExplanation = lut.explanation
        item.LUTData = [int(v) for v in lut.data]
        item["LUTData"].VR = "US"
        # LUT Descriptor's VR is US or SS by first-mapped sign; ours is never negative.
        item["LUTDescriptor"].VR = "US"
        ds.VOILUTSequence = Sequence([item])
    # PS3.3 C.8.11.3.1.2: IDENTITY for MONOCHROME2, INVERSE for MONOCHROME1.
    ds.PresentationLUTShape = (
        "INVERSE" if stored.photometric_interpretation == "MONOCHROME1" else "IDENTITY"
    )

    # DX Positioning / Mammography Image: view and its (empty) modifiers
    view_item = _code_item(SCREENING_VIEW_CODES[meta.view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])

    if meta.source_for_processing_uid:
        if intent != "FOR PRESENTATION":
            raise ValueError("Source Image Sequence (0008,2112) is for For Presentation images")
        source = Dataset()
        source.ReferencedSOPClassUID = mg_sop_class_uid("FOR PROCESSING")
        source.ReferencedSOPInstanceUID = meta.source_for_processing_uid
        ds.SourceImageSequence = Sequence([source])

    # Acquisition Context: Type 2, no context items are known for a phantom.
    ds.AcquisitionContextSequence = Sequence()

    ds.PixelData = np.ascontiguousarray(stored.pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = file_meta
    return ds


def write_mg_instance(
    path: str | Path,
    stored: StoredImage,
    meta: InstanceMeta,
    *,
    jpeg2000_lossless: bool = False,
) -> None:
    """Write one MG instance as a DICOM Part 10 file at ``path``."""
    ds = build_mg_dataset(stored, meta)
    if jpeg2000_lossless:
        # Keep the caller's SOP Instance UID: lossless compression makes no new image.
        ds.compress(
            JPEG2000Lossless,
            stored.pixels,
            encoding_plugin="pylibjpeg",
            generate_instance_uid=False,
        )
    pydicom.dcmwrite(Path(path), ds, enforce_file_format=True)
