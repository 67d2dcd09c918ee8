"""Vendor styles and the detector/processing renderer."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from phantom_fixtures import air_mask, calcification_ring, simple_view, vendor_view

from training.phantom.types import PresentationIntent
from training.phantom.vendors import (
    MIN_SIDE,
    VENDOR_NAMES,
    VENDORS,
    StoredImage,
    VendorStyle,
    render_pixels,
    vendor_by_name,
)

INTENTS: tuple[PresentationIntent, ...] = ("FOR PRESENTATION", "FOR PROCESSING")


def test_shares_sum_to_100() -> None:
    assert math.isclose(sum(v.share for v in VENDORS), 100.0, abs_tol=1e-9)


def test_the_seven_vendors_of_the_study() -> None:
    assert VENDOR_NAMES == ("Fuji", "Siemens", "Sectra", "Hologic", "Konica", "Agfa", "Philips")


def test_vendor_by_name_is_case_insensitive() -> None:
    assert vendor_by_name("hologic").manufacturer == "HOLOGIC, Inc."


def test_unknown_vendor_lists_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        vendor_by_name("GE")
    for name in VENDOR_NAMES:
        assert name in str(excinfo.value)


@pytest.mark.parametrize("style", VENDORS, ids=VENDOR_NAMES)
def test_style_is_plausible(style: VendorStyle) -> None:
    assert style.rows * style.columns <= 30_000_000
    assert style.rows > style.columns  # portrait detector, as mammograms are stored
    assert 10 <= style.bits_stored_presentation <= 16
    assert 10 <= style.bits_stored_processing <= 16
    assert style.photometric_processing == "MONOCHROME1"
    assert (style.voi_kind == "LUT") == (style.voi_lut_bits > 0)
    assert style.window_count >= 1


@pytest.mark.parametrize("style", VENDORS, ids=VENDOR_NAMES)
def test_geometry_keeps_the_field_of_view(style: VendorStyle) -> None:
    assert style.geometry() == (style.rows, style.columns, style.pixel_spacing_mm)
    rows, cols, spacing = style.geometry(0.05)
    assert rows == max(MIN_SIDE, round(style.rows * 0.05))
    assert math.isclose(rows * spacing, style.rows * style.pixel_spacing_mm)
    assert abs(cols * spacing - style.columns * style.pixel_spacing_mm) < spacing
    assert min(style.geometry(0.001)[:2]) == MIN_SIDE


@pytest.mark.parametrize("scale", [0.0, -1.0, 1.5])
def test_geometry_rejects_bad_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        VENDORS[0].geometry(scale)


@pytest.mark.parametrize("intent", INTENTS)
@pytest.mark.parametrize("style", VENDORS, ids=VENDOR_NAMES)
def test_render_pixels(style: VendorStyle, intent: PresentationIntent) -> None:
    view = vendor_view(style, "L", "MLO")
    stored = render_pixels(view, style, intent, np.random.default_rng(3))
    assert stored.pixels.shape == view.shape
    assert stored.pixels.dtype == np.uint16
    assert int(stored.pixels.max()) < 2**stored.bits_stored
    assert stored.bits_stored == style.bits_stored(intent)
    assert stored.photometric_interpretation == style.photometric(intent)
    assert stored.presentation_intent == intent
    monochrome1 = stored.photometric_interpretation == "MONOCHROME1"
    assert stored.pixel_intensity_relationship_sign == (1 if monochrome1 else -1)
    # Denser is brighter on screen: low stored values in MONOCHROME1, high otherwise.
    breast = float(stored.pixels[view.breast_mask].mean())
    air = float(stored.pixels[air_mask(view)].mean())
    calcification = float(stored.pixels[view.bac_mask].mean())
    ring = float(stored.pixels[calcification_ring(view)].mean())
    if monochrome1:
        breast, air, calcification, ring = -breast, -air, -calcification, -ring
    assert breast > air
    assert calcification > ring
    if intent == "FOR PROCESSING":
        assert stored.pixel_intensity_relationship == style.processing_relationship
        assert not stored.window_centers and stored.voi_lut is None
    else:
        assert stored.pixel_intensity_relationship == "LOG"
        if style.voi_kind == "LUT":
            assert stored.voi_lut is not None and not stored.window_centers
            assert stored.voi_lut.data.size == 2**stored.bits_stored
        else:
            assert stored.voi_lut is None
            assert len(stored.window_centers) == style.window_count
            assert stored.voi_lut_function == style.voi_lut_function


@pytest.mark.parametrize("intent", INTENTS)
def test_render_is_deterministic(intent: PresentationIntent) -> None:
    style = vendor_by_name("Siemens")
    view = vendor_view(style)
    first = render_pixels(view, style, intent, np.random.default_rng(7))
    again = render_pixels(view, style, intent, np.random.default_rng(7))
    other = render_pixels(view, style, intent, np.random.default_rng(8))
    assert np.array_equal(first.pixels, again.pixels)
    assert first.window_centers == again.window_centers
    assert not np.array_equal(first.pixels, other.pixels)


def test_render_rejects_unknown_intent() -> None:
    style = VENDORS[0]
    with pytest.raises(ValueError, match="Presentation Intent Type"):
        render_pixels(vendor_view(style), style, "FOR FUN", np.random.default_rng(0))  # type: ignore[arg-type]


def test_stored_image_validates_its_attributes() -> None:
    pixels = np.full((8, 8), 4095, dtype=np.uint16)
    common = {
        "photometric_interpretation": "MONOCHROME2",
        "presentation_intent": "FOR PRESENTATION",
        "pixel_intensity_relationship": "LOG",
        "pixel_intensity_relationship_sign": -1,
        "imager_pixel_spacing_mm": 0.1,
    }
    with pytest.raises(ValueError, match="Bits Stored"):
        StoredImage(pixels=pixels, bits_stored=10, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Window Width"):
        StoredImage(
            pixels=pixels,
            bits_stored=12,
            window_centers=(100.0,),
            window_widths=(),
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="uint16"):
        StoredImage(pixels=pixels.astype(np.int32), bits_stored=12, **common)  # type: ignore[arg-type]


@pytest.mark.slow
def test_full_resolution_render_is_fast() -> None:
    """The largest vendor's full matrix renders well within the study budget."""
    style = max(VENDORS, key=lambda v: v.rows * v.columns)
    rows, cols, spacing = style.geometry()
    view = simple_view("R", "MLO", (rows, cols), spacing)
    for intent in INTENTS:
        render_pixels(view, style, intent, np.random.default_rng(0))  # warm the allocator
        start = time.perf_counter()
        stored = render_pixels(view, style, intent, np.random.default_rng(1))
        elapsed = time.perf_counter() - start
        assert stored.pixels.shape == (rows, cols)
        # About 0.35 s on a 2-core machine; the bound leaves room for a busy CI runner.
        assert elapsed < 2.0, f"{intent} render took {elapsed:.2f} s"
