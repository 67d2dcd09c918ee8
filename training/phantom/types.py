"""Data types shared by the phantom's anatomy renderer, vendor styles and DICOM writer.

Geometry convention of every phantom image, the layout that mammography units store
and that reading stations hang back to back: the chest wall lies on the right image
edge for a right breast (PatientOrientation ``P\\L`` on CC) and on the left edge
(column 0) for a left breast (``A\\R``); the top of the image is lateral (CC) or
superior (MLO). Renderers draw every breast with the chest wall on the left and mirror
the right breast at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

Laterality = Literal["L", "R"]
ViewName = Literal["CC", "MLO"]
PresentationIntent = Literal["FOR PRESENTATION", "FOR PROCESSING"]

LATERALITIES: tuple[Laterality, ...] = ("R", "L")
VIEWS: tuple[ViewName, ...] = ("CC", "MLO")


@dataclass
class PhantomView:
    """One rendered breast projection with its exact ground truth.

    ``attenuation`` is the line integral of the linear attenuation coefficient along
    each ray (dimensionless, ``-ln(I/I0)`` of the primary beam): 0 in air, roughly
    0.5-3 through compressed breast tissue, a calcification adds up to about 1.5, a
    metal clip or lead marker about 6. Detector physics, noise and the vendor's
    processing are applied later by a vendor style; nothing here is vendor specific.
    """

    laterality: Laterality
    view: ViewName
    pixel_spacing_mm: float
    attenuation: NDArray[np.float32]
    """(rows, cols) float32, see class docstring."""
    thickness: NDArray[np.float32]
    """(rows, cols) float32 relative compressed thickness, 1 in the compressed body of the
    breast falling to 0 at the skin line; 0 outside the breast. Used for peripheral
    (thickness) equalisation by vendor processing."""
    breast_mask: NDArray[np.bool_]
    """Tissue of the body in the image (breast, and pectoral muscle on MLO); labels,
    markers and background excluded."""
    bac_mask: NDArray[np.bool_]
    """Calcified arterial wall pixels: the BAC ground truth."""
    pectoral_mask: NDArray[np.bool_]
    """Pectoral muscle (empty on CC)."""
    compressed_thickness_mm: float
    """Compressed breast thickness (for the DICOM header)."""
    true_bac_length_mm: float = 0.0
    """Calcified length (mm) the view shows: the calcified parts of every artery's
    centreline projected into this view, in its pixel spacing (the truth of
    ``bac_node.imaging.vessels``; see ``training.phantom.vessels.calcified_lengths_mm``),
    a stretch where two calcified arteries overlap in the projection counted once."""
    true_vessel_count: int = 0
    """Calcified vessels this view shows: arteries joined where they overlap in the
    projection (a branch at its trunk, a crossing), each with at least
    ``bac_node.imaging.vessels.MIN_VESSEL_MM`` of calcified length. The node can split
    one of them where an uncalcified gap is longer than its bridging gap."""

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.attenuation.shape
        return int(rows), int(cols)

    @property
    def bac_pixels(self) -> int:
        return int(np.count_nonzero(self.bac_mask))

    @property
    def breast_pixels(self) -> int:
        return int(np.count_nonzero(self.breast_mask))
