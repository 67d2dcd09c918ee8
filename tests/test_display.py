"""The display transform: Modality LUT, VOI (window or LUT), MONOCHROME1 inversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from phantom_fixtures import air_mask, calcification_ring, phantom_meta, vendor_view
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from bac_node.imaging.display import presentation_pixels
from training.phantom.dicom_writer import write_mg_instance
from training.phantom.types import PresentationIntent
from training.phantom.vendors import VENDOR_NAMES, VENDORS, VendorStyle, render_pixels


def _image(values: list[int], photometric: str = "MONOCHROME2", bits: int = 12) -> Dataset:
    """A 1-row dataset holding ``values`` as unsigned 16-bit stored pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = 1
    ds.Columns = len(values)
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.asarray(values, dtype="<u2").tobytes()
    return ds


@pytest.mark.parametrize("intent", ["FOR PRESENTATION", "FOR PROCESSING"])
@pytest.mark.parametrize("style", VENDORS, ids=VENDOR_NAMES)
def test_breast_bright_air_dark_calcification_brighter(
    style: VendorStyle, intent: PresentationIntent, tmp_path: Path
) -> None:
    for laterality, view in (("R", "CC"), ("L", "MLO")):
        phantom = vendor_view(style, laterality, view)  # type: ignore[arg-type]
        stored = render_pixels(phantom, style, intent, np.random.default_rng(11))
        path = tmp_path / f"{laterality}{view}.dcm"
        write_mg_instance(
            path,
            stored,
            phantom_meta(style, phantom, intent),
            jpeg2000_lossless=style.offers_jpeg2000_lossless,
        )
        shown = presentation_pixels(pydicom.dcmread(path))
        assert shown.dtype == np.float32
        assert shown.shape == phantom.shape
        assert float(shown.min()) >= 0.0 and float(shown.max()) <= 1.0
        breast = float(shown[phantom.breast_mask].mean())
        air = float(shown[air_mask(phantom)].mean())
        assert breast > air + 0.2, (laterality, view, breast, air)
        calcification = float(shown[phantom.bac_mask].mean())
        ring = float(shown[calcification_ring(phantom)].mean())
        assert calcification > ring + 0.03, (laterality, view, calcification, ring)


def test_linear_window() -> None:
    ds = _image([0, 1000, 1500, 2000, 4095])
    ds.WindowCenter = 1500
    ds.WindowWidth = 1001
    shown = presentation_pixels(ds)
    assert shown[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-3)


def test_monochrome1_is_inverted() -> None:
    ds = _image([0, 1000, 1500, 2000, 4095], photometric="MONOCHROME1")
    ds.WindowCenter = 1500
    ds.WindowWidth = 1001
    shown = presentation_pixels(ds)
    assert shown[0].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0], abs=1e-3)


def test_sigmoid_window() -> None:
    ds = _image([0, 1500, 4095])
    ds.WindowCenter = 1500
    ds.WindowWidth = 1000
    ds.VOILUTFunction = "SIGMOID"
    shown = presentation_pixels(ds)[0]
    assert shown[1] == pytest.approx(0.5, abs=1e-3)
    assert shown[0] == pytest.approx(1 / (1 + np.exp(4 * 1.5)), abs=1e-3)
    assert 0.99 < shown[2] < 1.0


def test_first_of_several_windows() -> None:
    ds = _image([1000, 1500, 2000])
    ds.WindowCenter = [1500, 500]
    ds.WindowWidth = [1001, 100]
    assert presentation_pixels(ds)[0].tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)


def test_voi_lut_sequence() -> None:
    ds = _image([0, 10, 11, 12, 13, 100], bits=10)
    item = Dataset()
    item.LUTDescriptor = [4, 10, 12]
    item.LUTData = [0, 1000, 3000, 4095]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    shown = presentation_pixels(ds)[0]
    assert shown.tolist() == pytest.approx([0, 0, 1000 / 4095, 3000 / 4095, 1, 1], abs=1e-4)


def test_rescale_before_window() -> None:
    ds = _image([0, 100, 200])
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.WindowCenter = 100  # rescaled values are -100, 100, 300
    ds.WindowWidth = 201
    # LINEAR (C.11.2.1.2.1): ((x - (c - 0.5)) / (w - 1) + 0.5) = 0.5025 at x = c.
    assert presentation_pixels(ds)[0].tolist() == pytest.approx([0.0, 0.5025, 1.0], abs=1e-4)


def test_no_voi_uses_the_stored_range() -> None:
    ds = _image([100, 200, 300])
    assert presentation_pixels(ds)[0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert presentation_pixels(ds)[0].tolist() == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        (lambda ds: delattr(ds, "PhotometricInterpretation"), "PhotometricInterpretation"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "PhotometricInterpretation"),
        (lambda ds: delattr(ds, "PixelData"), "PixelData"),
        (lambda ds: delattr(ds, "BitsStored"), "BitsStored"),
        (lambda ds: setattr(ds, "WindowCenter", 100), "WindowWidth"),
        (lambda ds: delattr(ds.file_meta, "TransferSyntaxUID"), "TransferSyntaxUID"),
    ],
)
def test_missing_attributes_are_named(change: object, attribute: str) -> None:
    ds = _image([0, 1, 2])
    change(ds)  # type: ignore[operator]
    with pytest.raises(ValueError, match=attribute):
        presentation_pixels(ds)
