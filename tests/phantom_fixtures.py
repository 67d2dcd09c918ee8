"""Small hand-built phantom views for the vendor, writer and display tests.

:func:`vendor_view` renders real phantom views (cached) at a small scale;
:func:`simple_view` is a hand-built stand-in (a half-ellipse breast against the chest
wall, a short run of calcified vessel wall, a pectoral triangle on MLO and a dense
label rectangle in the background) for tests that need an exactly known layout, in
the geometry convention of :mod:`training.phantom.types`.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from bac_node.dicom.uids import derived_uid
from training.phantom.anatomy import sample_patient
from training.phantom.dicom_writer import InstanceMeta
from training.phantom.distractors import METAL_ATTENUATION
from training.phantom.render import render_side
from training.phantom.types import Laterality, PhantomView, PresentationIntent, ViewName
from training.phantom.vendors import VendorStyle, vendor_by_name

LABEL_ATTENUATION = METAL_ATTENUATION


def simple_view(
    laterality: Laterality = "R",
    view: ViewName = "CC",
    shape: tuple[int, int] = (240, 190),
    pixel_spacing_mm: float = 1.0,
    seed: int = 0,
) -> PhantomView:
    """A deterministic phantom view of ``shape`` pixels."""
    rows, cols = shape
    rng = np.random.default_rng(seed)
    r = np.arange(rows, dtype=np.float32)[:, None]
    c = np.arange(cols, dtype=np.float32)[None, :]
    # Distance from the chest wall, in columns: built for L and mirrored for R at the end.
    semi_rows, semi_cols = 0.42 * rows, 0.62 * cols
    rho = np.sqrt(((r - rows / 2) / semi_rows) ** 2 + (c / semi_cols) ** 2)
    breast = rho < 1.0
    thickness = np.clip(np.sqrt(np.clip(1.0 - rho**2, 0.0, 1.0)) * 2.5, 0.0, 1.0)
    thickness[~breast] = 0.0

    texture = rng.standard_normal((rows // 8 + 1, cols // 8 + 1)).astype(np.float32)
    texture = np.kron(texture, np.ones((8, 8), np.float32))[:rows, :cols]
    attenuation = thickness * (1.8 + 0.15 * texture)

    pectoral = np.zeros(shape, dtype=bool)
    if view == "MLO":
        pectoral = (c < 0.35 * cols * (1 - r / (0.7 * rows))) & breast
        attenuation[pectoral] += 0.8

    bac = np.zeros(shape, dtype=bool)
    vessel_rows = (rows / 2 + 0.12 * rows * np.sin(np.linspace(0, 3, cols // 3))).astype(int)
    vessel_cols = np.linspace(0.1 * cols, 0.45 * cols, cols // 3).astype(int)
    bac[vessel_rows, vessel_cols] = True
    bac &= breast & ~pectoral
    attenuation[bac] += 1.0

    label = np.zeros(shape, dtype=bool)
    label[int(0.03 * rows) : int(0.09 * rows), int(0.75 * cols) : int(0.95 * cols)] = True
    attenuation[label] = LABEL_ATTENUATION

    arrays = [attenuation.astype(np.float32), thickness.astype(np.float32), breast, bac, pectoral]
    if laterality == "R":
        arrays = [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
    att, thick, breast_mask, bac_mask, pectoral_mask = arrays
    return PhantomView(
        laterality=laterality,
        view=view,
        pixel_spacing_mm=pixel_spacing_mm,
        attenuation=att,
        thickness=thick,
        breast_mask=breast_mask,
        bac_mask=bac_mask,
        pectoral_mask=pectoral_mask,
        compressed_thickness_mm=52.0,
    )


@functools.lru_cache(maxsize=64)
def _rendered_side(
    vendor: str, laterality: Laterality, scale: float, seed: int
) -> dict[ViewName, PhantomView]:
    rng = np.random.default_rng(seed)
    patient = sample_patient(rng)
    detector = vendor_by_name(vendor).geometry(scale)
    return render_side(patient, laterality, detector, 1.5, rng)


def vendor_view(
    style: VendorStyle,
    laterality: Laterality = "R",
    view: ViewName = "CC",
    scale: float = 0.06,
    seed: int = 0,
) -> PhantomView:
    """A small phantom view from the real renderer in ``style``'s geometry at ``scale``.

    Grade 2 burden (1.5 % of the breast) so that every view carries BAC. Cached:
    callers must not modify the arrays.
    """
    return _rendered_side(style.name, laterality, scale, seed)[view]


def label_mask(view: PhantomView) -> NDArray[np.bool_]:
    """Pixels of the lead labels in the background."""
    return np.asarray((view.attenuation >= LABEL_ATTENUATION - 1e-3) & ~view.breast_mask)


def air_mask(view: PhantomView) -> NDArray[np.bool_]:
    """Background air: not breast, not label, and a few pixels away from both."""
    occupied = view.breast_mask | label_mask(view)
    return np.asarray(~ndimage.binary_dilation(occupied, iterations=4))


def calcification_ring(view: PhantomView) -> NDArray[np.bool_]:
    """Breast pixels within 3 pixels of a calcification, the calcifications excluded."""
    near = ndimage.binary_dilation(view.bac_mask, iterations=3)
    return np.asarray(near & ~view.bac_mask & view.breast_mask & ~view.pectoral_mask)


def phantom_meta(
    style: VendorStyle,
    phantom: PhantomView,
    intent: PresentationIntent,
    number: int = 42,
) -> InstanceMeta:
    """Obviously synthetic, deterministic instance metadata for one phantom view."""
    key = f"{number}-{style.name}-{intent}-{phantom.laterality}-{phantom.view}"
    return InstanceMeta(
        patient_name=f"PHANTOM^BAC{number:04d}",
        patient_id=f"PHANTOM-{number:04d}",
        patient_birth_date="19660101",
        patient_age="058Y",
        study_instance_uid=derived_uid("test-study", number),
        series_instance_uid=derived_uid("test-series", key),
        sop_instance_uid=derived_uid("test-instance", key),
        study_date="20240102",
        study_time="101500",
        accession_number=f"PHA{number:05d}",
        study_id=str(number),
        series_number=1,
        series_description=f"{phantom.laterality}{phantom.view} {intent}",
        instance_number=1,
        laterality=phantom.laterality,
        view=phantom.view,
        vendor=style,
        compressed_thickness_mm=phantom.compressed_thickness_mm,
    )


def require_tool(name: str) -> str:
    """Path of command-line tool ``name``; skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian packages dicom3tools, dcmtk)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
