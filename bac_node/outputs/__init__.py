"""DICOM outputs: one BAC SEG per analysed MG image and one TID 1500 SR per study.

Research use only, not for clinical use; both objects say so in their Series
Description and the SR in a text item. Coded concepts live in :mod:`.concepts`.
"""

from bac_node.outputs.seg import build_bac_segmentation
from bac_node.outputs.sr import (
    ImageMeasurement,
    SideMeasurement,
    StudySummary,
    breast_roi,
    build_measurement_report,
)

__all__ = [
    "ImageMeasurement",
    "SideMeasurement",
    "StudySummary",
    "breast_roi",
    "build_bac_segmentation",
    "build_measurement_report",
]
