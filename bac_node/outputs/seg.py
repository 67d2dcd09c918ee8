"""The DICOM Segmentation of breast arterial calcification on one MG image.

One SEG per analysed MG image, BINARY, one segment, at the image's own rows and
columns, shaped so that OHIF v3 (3.9+) shows it over the mammogram (see
``viewing.md``): highdicom writes no plane orientation for an MG source without
ImagePositionPatient, and OHIF's loader needs one, so the shared functional groups
get ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``, the orientation OHIF assumes for
an MG image that has none; PatientOrientation is copied from the source (the SEG IOD
needs it when there is no plane orientation in patient coordinates).
"""

from __future__ import annotations

import datetime as dt

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from bac_node import __version__
from bac_node.dicom.uids import derived_uid
from bac_node.outputs import concepts

MANUFACTURER = "bac-node"
SEGMENT_LABEL = "Breast arterial calcification"
SEG_SERIES_DESCRIPTION = "BAC SEG - research use only, not for clinical use"
#: OHIF's display colour of the segment (CIE Lab of a clear red).
SEGMENT_COLOR = hd.color.CIELabColor(53.2, 80.1, 67.2)
#: Orientation OHIF gives an MG image without ImageOrientationPatient.
MG_IMAGE_ORIENTATION = [1, 0, 0, 0, 1, 0]


def seg_uids(source_sop_instance_uid: str, model_version: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SEG of one source image."""
    return (
        derived_uid(source_sop_instance_uid, model_version, "seg", "series"),
        derived_uid(source_sop_instance_uid, model_version, "seg", "instance"),
    )


def imager_pixel_spacing(source: pydicom.Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm of an MG image: Pixel Spacing, else Imager Pixel Spacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    raise ValueError(
        f"image {source.SOPInstanceUID} has neither Pixel Spacing nor Imager Pixel Spacing"
    )


def set_content_datetime(dataset: pydicom.Dataset, when: dt.datetime) -> None:
    """Stamp Content, Series, Instance Creation and Contribution date/time with ``when``.

    highdicom stamps "now"; a fixed ``when`` makes a re-run byte-identical.
    """
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for prefix in ("Content", "Series", "InstanceCreation"):
        setattr(dataset, f"{prefix}Date", date)
        setattr(dataset, f"{prefix}Time", time)
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def build_bac_segmentation(
    source: pydicom.Dataset,
    mask: NDArray[np.bool_],
    *,
    model_name: str,
    model_version: str,
    series_number: int = 9001,
    content_datetime: dt.datetime | None = None,
    laterality: str | None = None,
) -> hd.seg.Segmentation:
    """The BINARY SEG of ``mask`` (rows x columns of ``source``) on MG image ``source``.

    ``laterality`` ("R"/"L") is the breast as the reader determined it (its fallbacks
    included); without it, the header's ImageLaterality or Laterality is used.

    An all-zero mask gives a SEG with one empty frame, so that "no BAC found" is a
    valid object that still references its image. ``content_datetime`` stamps the
    content, series and instance-creation date/time (default: now); pass a fixed value
    for byte-identical re-runs. UIDs depend only on the source SOP Instance UID and
    ``model_version``.
    """
    mask = np.asarray(mask)
    shape = (int(source.Rows), int(source.Columns))
    if mask.shape != shape:
        raise ValueError(
            f"mask shape {mask.shape} differs from the image's Rows x Columns {shape} "
            f"(image {source.SOPInstanceUID})"
        )
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    laterality = laterality or str(source.get("ImageLaterality") or source.get("Laterality") or "")
    anatomic_regions: list[hd.sr.CodedConcept] = [concepts.coded(concepts.BREAST)]
    if laterality in ("R", "L"):
        anatomic_regions = [concepts.coded(concepts.breast_of(laterality))]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        family=concepts.coded(concepts.ALGORITHM_FAMILY),
        version=model_version,
        source=MANUFACTURER,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=concepts.coded(concepts.MORPHOLOGICALLY_ABNORMAL_STRUCTURE),
        segmented_property_type=concepts.coded(concepts.VASCULAR_CALCIFICATION),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=derived_uid(source.SOPInstanceUID, model_version, "seg", "segment", 1),
        tracking_id=f"BAC {laterality or '?'} {source.get('ViewPosition', '') or ''}".strip(),
        anatomic_regions=anatomic_regions,
        display_color=SEGMENT_COLOR,
    )
    row_mm, col_mm = imager_pixel_spacing(source)
    series_uid, sop_uid = seg_uids(str(source.SOPInstanceUID), model_version)
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[np.newaxis, :, :],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=__version__,
        device_serial_number=model_version,
        content_description="BAC segmentation, research use only",
        content_label="BAC",
        series_description=SEG_SERIES_DESCRIPTION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        # highdicom's reader refuses an MG SEG without a slice thickness (viewing.md).
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(row_mm, col_mm), slice_thickness=1.0
        ),
        # An all-zero mask keeps its one (empty) frame.
        omit_empty_frames=False,
    )
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared:
        orientation = pydicom.Dataset()
        orientation.ImageOrientationPatient = MG_IMAGE_ORIENTATION
        shared.PlaneOrientationSequence = DicomSequence([orientation])
    if "PatientOrientation" in source and "PatientOrientation" not in seg:
        seg.PatientOrientation = source.PatientOrientation
    # highdicom draws a random Dimension Organization UID; derive it like the others.
    organization_uid = derived_uid(source.SOPInstanceUID, model_version, "seg", "dimensions")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = organization_uid
    set_content_datetime(seg, content_datetime or dt.datetime.now())
    return seg
