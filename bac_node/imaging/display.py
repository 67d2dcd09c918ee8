"""The standard grayscale display pipeline of a mammogram (PS3.4 N.2.1).

Stored values go through the Modality LUT (rescale), the VOI LUT (window with its VOI
LUT Function, or a VOI LUT Sequence) and the Presentation LUT (MONOCHROME1 is shown
inverted). :func:`presentation_pixels` returns the result as float32 in [0, 1], where
1 is the brightest on screen, whatever the vendor's photometric interpretation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _require(ds: pydicom.Dataset, keyword: str, tag: str) -> Any:
    if keyword not in ds or ds[keyword].value in (None, ""):
        raise ValueError(f"{keyword} {tag} is missing; cannot display the image")
    return ds[keyword].value


def _has_voi_lut_sequence(ds: pydicom.Dataset) -> bool:
    items = ds.get("VOILUTSequence")
    if not items:
        return False
    first = items[0]
    return "LUTDescriptor" in first and "LUTData" in first


def _has_window(ds: pydicom.Dataset) -> bool:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None and width is None:
        return False
    if center is None or width is None:
        missing = "WindowWidth (0028,1051)" if width is None else "WindowCenter (0028,1050)"
        raise ValueError(f"{missing} is missing while the other window value is present")
    return True


def _window_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range pydicom's windowing maps to: the Modality LUT output range."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _display_table(
    ds: pydicom.Dataset, stored: NDArray[np.int64], voi: bool = True
) -> NDArray[np.float32]:
    """Displayed value in [0, 1] of each stored value in ``stored`` (1-D)."""
    values = np.asarray(apply_modality_lut(stored, ds))
    if voi and _has_voi_lut_sequence(ds):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        if not np.issubdtype(values.dtype, np.integer):
            # The VOI LUT indexes integers; a rescale's output is integral in practice.
            values = np.rint(values).astype(np.int64)
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        lo, hi = 0.0, float(2**bits - 1)
    elif voi and _has_window(ds):
        out = apply_voi_lut(values.astype(np.float64), ds, index=0, prefer_lut=False)
        lo, hi = _window_output_range(ds)
    else:
        # No VOI: the image's own value range fills the display.
        out = values.astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
    scaled = np.clip((out - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def presentation_pixels(ds: pydicom.Dataset, *, voi: bool = True) -> NDArray[np.float32]:
    """The image as shown on screen: float32 in [0, 1], 1 = brightest.

    ``voi=False`` skips the VOI and spreads the image's whole value range instead: no
    value is clipped, which is what finding the faint skin edge needs.

    Applies the Modality LUT or rescale, then the first VOI (VOI LUT Sequence item, else
    Window Center/Width with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID), then
    inverts MONOCHROME1. Without a VOI, the image's min-max range is used. For
    Processing images are treated the same way. Raises ValueError naming the attribute
    when one the transform needs is missing or unsupported.
    """
    photometric = _require(ds, "PhotometricInterpretation", "(0028,0004)")
    if photometric not in _MONOCHROME:
        raise ValueError(
            f"PhotometricInterpretation (0028,0004) is {photometric!r}; "
            "a mammogram must be MONOCHROME1 or MONOCHROME2"
        )
    _require(ds, "BitsStored", "(0028,0101)")
    _require(ds, "PixelRepresentation", "(0028,0103)")
    if "PixelData" not in ds:
        raise ValueError("PixelData (7FE0,0010) is missing; cannot display the image")
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or "TransferSyntaxUID" not in file_meta:
        raise ValueError("TransferSyntaxUID (0002,0010) is missing; cannot decode PixelData")
    stored = ds.pixel_array
    if not np.issubdtype(stored.dtype, np.integer):
        return _display_table(ds, stored.ravel(), voi).reshape(stored.shape)
    # Every transform acts value by value: tabulate it over the stored values once and
    # index, far faster than transforming millions of pixels in float64.
    first, last = int(stored.min()), int(stored.max())
    table = _display_table(ds, np.arange(first, last + 1, dtype=np.int64), voi)
    index = stored if first == 0 else stored.astype(np.int64) - first
    shown: NDArray[np.float32] = table[index]
    return shown
