"""Vendor styles: how each mammography system of the source study turns X-rays into pixels.

A :class:`VendorStyle` holds what differs between the seven vendors of the study the
method comes from: detector geometry, bit depth, photometric interpretation, the VOI
(window or VOI LUT Sequence), noise, and the look of the vendor's image processing.
:func:`render_pixels` applies detector physics and that processing to a
:class:`~training.phantom.types.PhantomView` and returns a :class:`StoredImage` that the
DICOM writer stores as it is.

Physics, in one line each: the detector signal is ``S = exp(-attenuation)`` plus a
smooth scatter field; quantum noise is Gaussian with variance proportional to ``S``;
For Processing images store ``S`` (or its logarithm, for the CR-derived vendors)
linearly; For Presentation images are log-transformed, thickness-equalised, contrast
enhanced, passed through the vendor's contrast curve and quantised.

Speed: everything at full resolution is a handful of float32 passes; every filter runs
on a low-resolution copy (about 0.8 mm pixels) and is added back with one bilinear
upsampling, so a 28 M pixel image renders in about half a second on two cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (the usual torch alias)
from numpy.typing import NDArray
from scipy import ndimage
from scipy.special import ndtri

from training.phantom.raster import resize
from training.phantom.types import PhantomView, PresentationIntent

VendorName = Literal["Fuji", "Siemens", "Sectra", "Hologic", "Konica", "Agfa", "Philips"]
PhotometricInterpretation = Literal["MONOCHROME1", "MONOCHROME2"]
PixelIntensityRelationship = Literal["LIN", "LOG"]
VOIKind = Literal["WINDOW", "LUT"]
VOILUTFunction = Literal["LINEAR", "SIGMOID"]
ContrastCurve = Literal["GAMMA", "SIGMOID"]
DetectorType = Literal["DIRECT", "SCINTILLATOR", "STORAGE"]
DetectorConfiguration = Literal["AREA", "SLOT"]

#: Pixel spacing (mm) of the low-resolution copy on which all filtering is done.
_FILTER_SPACING_MM = 0.8
#: Breast value percentiles that the VOI spans (robust to noise and a few calcifications).
_VOI_PERCENTILES = (0.5, 99.5)
#: Where the breast's value range lands in a presentation image's stored range, as
#: fractions of it: headroom below for air, above for dense labels and metal.
_PRESENTATION_BAND = (0.22, 0.80)
#: Smallest image side that :meth:`VendorStyle.geometry` returns at any scale.
MIN_SIDE = 64


@dataclass(frozen=True)
class VendorStyle:
    """One vendor's detector, DICOM habits and image processing."""

    name: VendorName
    share: float
    """Percent of the images of the source study made by this vendor."""
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    detector_type: DetectorType
    detector_configuration: DetectorConfiguration
    pixel_spacing_mm: float
    """Detector (imager) pixel spacing at full resolution."""
    rows: int
    columns: int
    bits_stored_presentation: int
    bits_stored_processing: int
    photometric_presentation: PhotometricInterpretation
    photometric_processing: PhotometricInterpretation
    processing_relationship: PixelIntensityRelationship
    """How For Processing values depend on exposure: LIN (DR) or LOG (CR heritage)."""
    voi_kind: VOIKind
    """How For Presentation images carry their VOI: window values or a VOI LUT Sequence."""
    voi_lut_function: VOILUTFunction
    window_count: int
    """How many alternative windows a vendor writes (the first is the default)."""
    voi_lut_bits: int
    """Bits per entry of the VOI LUT Sequence's LUT Data (LUT vendors only)."""
    noise_level: float
    """Relative quantum noise (standard deviation / signal) of an unattenuated pixel at
    the vendor's own pixel spacing."""
    scatter_fraction: float
    """Scatter-to-primary ratio behind the breast (slot scanners have almost none)."""
    contrast_curve: ContrastCurve
    contrast_strength: float
    """Gamma exponent, or the slope of the sigmoid over the stored range."""
    enhancement_strength: float
    """Gain of the large-scale unsharp mask (multiscale contrast enhancement)."""
    enhancement_sigma_mm: float
    equalisation_strength: float
    """Peripheral (thickness) equalisation: 0 none, 1 the skin region raised to the
    attenuation of the compressed body."""
    series_per_view: bool
    """True: one series per image; False: one series for the four screening views."""
    offers_jpeg2000_lossless: bool
    anode_target_material: str
    filter_material: str
    kvp: float
    distance_source_to_detector_mm: float
    grid: str
    processing_description: str
    """Acquisition Device Processing Description of For Presentation images."""

    def geometry(self, scale: float = 1.0) -> tuple[int, int, float]:
        """Rows, columns and pixel spacing (mm) of an image rendered at ``scale``.

        ``scale`` < 1 makes small test images of the same physical field of view: the
        matrix shrinks (at least :data:`MIN_SIDE` pixels a side) and the pixel spacing
        grows by the same factor.
        """
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        rows = max(MIN_SIDE, round(self.rows * scale))
        columns = max(MIN_SIDE, round(self.columns * scale))
        # Spacing follows the rounded matrix so rows * spacing stays the field of view.
        spacing = self.pixel_spacing_mm * self.rows / rows
        return rows, columns, spacing

    def bits_stored(self, intent: PresentationIntent) -> int:
        if intent == "FOR PRESENTATION":
            return self.bits_stored_presentation
        return self.bits_stored_processing

    def photometric(self, intent: PresentationIntent) -> PhotometricInterpretation:
        if intent == "FOR PRESENTATION":
            return self.photometric_presentation
        return self.photometric_processing


VENDORS: tuple[VendorStyle, ...] = (
    VendorStyle(
        name="Fuji",
        share=38.4,
        manufacturer="FUJIFILM Corporation",
        manufacturer_model_name="AMULET Innovality",
        software_versions="A08.0.12",
        detector_type="DIRECT",
        detector_configuration="AREA",
        pixel_spacing_mm=0.05,
        rows=5928,
        columns=4728,
        bits_stored_presentation=10,
        bits_stored_processing=14,
        photometric_presentation="MONOCHROME1",
        photometric_processing="MONOCHROME1",
        processing_relationship="LOG",
        voi_kind="LUT",
        voi_lut_function="LINEAR",
        window_count=1,
        voi_lut_bits=12,
        noise_level=0.018,
        scatter_fraction=0.10,
        contrast_curve="SIGMOID",
        contrast_strength=5.0,
        enhancement_strength=0.6,
        enhancement_sigma_mm=3.0,
        equalisation_strength=0.6,
        series_per_view=False,
        offers_jpeg2000_lossless=True,
        anode_target_material="TUNGSTEN",
        filter_material="RHODIUM",
        kvp=29.0,
        distance_source_to_detector_mm=650.0,
        grid="RECIPROCATING",
        processing_description="MAMMO STD",
    ),
    VendorStyle(
        name="Siemens",
        share=28.2,
        manufacturer="SIEMENS",
        manufacturer_model_name="Mammomat Inspiration",
        software_versions="VB30A",
        detector_type="DIRECT",
        detector_configuration="AREA",
        pixel_spacing_mm=0.085,
        rows=3584,
        columns=2816,
        bits_stored_presentation=12,
        bits_stored_processing=14,
        photometric_presentation="MONOCHROME2",
        photometric_processing="MONOCHROME1",
        processing_relationship="LIN",
        voi_kind="WINDOW",
        voi_lut_function="LINEAR",
        window_count=2,
        voi_lut_bits=0,
        noise_level=0.014,
        scatter_fraction=0.12,
        contrast_curve="GAMMA",
        contrast_strength=0.9,
        enhancement_strength=0.4,
        enhancement_sigma_mm=4.0,
        equalisation_strength=0.5,
        series_per_view=True,
        offers_jpeg2000_lossless=True,
        anode_target_material="TUNGSTEN",
        filter_material="RHODIUM",
        kvp=28.0,
        distance_source_to_detector_mm=655.0,
        grid="RECIPROCATING",
        processing_description="OPVIEW 2",
    ),
    VendorStyle(
        name="Sectra",
        share=11.7,
        manufacturer="Sectra Imtec AB",
        manufacturer_model_name="MicroDose L30",
        software_versions="8.2.1",
        detector_type="DIRECT",
        detector_configuration="SLOT",
        pixel_spacing_mm=0.05,
        rows=5200,
        columns=4800,
        bits_stored_presentation=12,
        bits_stored_processing=14,
        photometric_presentation="MONOCHROME2",
        photometric_processing="MONOCHROME1",
        processing_relationship="LIN",
        voi_kind="WINDOW",
        voi_lut_function="LINEAR",
        window_count=1,
        voi_lut_bits=0,
        noise_level=0.022,
        scatter_fraction=0.03,
        contrast_curve="SIGMOID",
        contrast_strength=4.0,
        enhancement_strength=0.5,
        enhancement_sigma_mm=2.0,
        equalisation_strength=0.4,
        series_per_view=False,
        offers_jpeg2000_lossless=False,
        anode_target_material="TUNGSTEN",
        filter_material="ALUMINUM",
        kvp=32.0,
        distance_source_to_detector_mm=660.0,
        grid="NONE",
        processing_description="MICRODOSE STANDARD",
    ),
    VendorStyle(
        name="Hologic",
        share=10.6,
        manufacturer="HOLOGIC, Inc.",
        manufacturer_model_name="Selenia Dimensions",
        software_versions="1.10.3.2",
        detector_type="DIRECT",
        detector_configuration="AREA",
        pixel_spacing_mm=0.07,
        rows=4096,
        columns=3328,
        bits_stored_presentation=12,
        bits_stored_processing=14,
        photometric_presentation="MONOCHROME2",
        photometric_processing="MONOCHROME1",
        processing_relationship="LIN",
        voi_kind="WINDOW",
        voi_lut_function="SIGMOID",
        window_count=3,
        voi_lut_bits=0,
        noise_level=0.016,
        scatter_fraction=0.10,
        contrast_curve="SIGMOID",
        contrast_strength=6.0,
        enhancement_strength=0.5,
        enhancement_sigma_mm=5.0,
        equalisation_strength=0.7,
        series_per_view=True,
        offers_jpeg2000_lossless=True,
        anode_target_material="TUNGSTEN",
        filter_material="RHODIUM",
        kvp=31.0,
        distance_source_to_detector_mm=700.0,
        grid="RECIPROCATING",
        processing_description="Hologic Clarity",
    ),
    VendorStyle(
        name="Konica",
        share=7.7,
        manufacturer="KONICA MINOLTA",
        manufacturer_model_name="REGIUS PureView",
        software_versions="REGIUS 190 V2.10",
        detector_type="STORAGE",
        detector_configuration="AREA",
        pixel_spacing_mm=0.04375,
        rows=5486,
        columns=4114,
        bits_stored_presentation=12,
        bits_stored_processing=12,
        photometric_presentation="MONOCHROME1",
        photometric_processing="MONOCHROME1",
        processing_relationship="LOG",
        voi_kind="WINDOW",
        voi_lut_function="LINEAR",
        window_count=1,
        voi_lut_bits=0,
        noise_level=0.028,
        scatter_fraction=0.12,
        contrast_curve="GAMMA",
        contrast_strength=1.15,
        enhancement_strength=0.7,
        enhancement_sigma_mm=1.5,
        equalisation_strength=0.3,
        series_per_view=False,
        offers_jpeg2000_lossless=False,
        anode_target_material="MOLYBDENUM",
        filter_material="MOLYBDENUM",
        kvp=27.0,
        distance_source_to_detector_mm=650.0,
        grid="RECIPROCATING",
        processing_description="MAMMO PCM",
    ),
    VendorStyle(
        name="Agfa",
        share=2.1,
        manufacturer="Agfa",
        manufacturer_model_name="CR 85-X",
        software_versions="NX 3.0.9000",
        detector_type="STORAGE",
        detector_configuration="AREA",
        pixel_spacing_mm=0.05,
        rows=4800,
        columns=3600,
        bits_stored_presentation=12,
        bits_stored_processing=12,
        photometric_presentation="MONOCHROME1",
        photometric_processing="MONOCHROME1",
        processing_relationship="LOG",
        voi_kind="LUT",
        voi_lut_function="LINEAR",
        window_count=1,
        voi_lut_bits=12,
        noise_level=0.030,
        scatter_fraction=0.12,
        contrast_curve="SIGMOID",
        contrast_strength=3.5,
        enhancement_strength=0.8,
        enhancement_sigma_mm=2.5,
        equalisation_strength=0.5,
        series_per_view=True,
        offers_jpeg2000_lossless=False,
        anode_target_material="MOLYBDENUM",
        filter_material="MOLYBDENUM",
        kvp=28.0,
        distance_source_to_detector_mm=650.0,
        grid="RECIPROCATING",
        processing_description="MUSICA2 MAMMO",
    ),
    VendorStyle(
        name="Philips",
        share=1.3,
        manufacturer="Philips Medical Systems",
        manufacturer_model_name="MicroDose SI",
        software_versions="9.1.2",
        detector_type="DIRECT",
        detector_configuration="SLOT",
        pixel_spacing_mm=0.05,
        rows=5200,
        columns=4800,
        bits_stored_presentation=14,
        bits_stored_processing=16,
        photometric_presentation="MONOCHROME2",
        photometric_processing="MONOCHROME1",
        processing_relationship="LIN",
        voi_kind="WINDOW",
        voi_lut_function="SIGMOID",
        window_count=1,
        voi_lut_bits=0,
        noise_level=0.020,
        scatter_fraction=0.03,
        contrast_curve="GAMMA",
        contrast_strength=0.85,
        enhancement_strength=0.45,
        enhancement_sigma_mm=3.0,
        equalisation_strength=0.45,
        series_per_view=False,
        offers_jpeg2000_lossless=True,
        anode_target_material="TUNGSTEN",
        filter_material="ALUMINUM",
        kvp=32.0,
        distance_source_to_detector_mm=660.0,
        grid="NONE",
        processing_description="MICRODOSE STANDARD",
    ),
)

VENDOR_NAMES: tuple[str, ...] = tuple(v.name for v in VENDORS)


def vendor_by_name(name: str) -> VendorStyle:
    """The vendor style called ``name`` (case-insensitive)."""
    for style in VENDORS:
        if style.name.lower() == name.lower():
            return style
    raise ValueError(f"unknown vendor {name!r}; valid names: {', '.join(VENDOR_NAMES)}")


@dataclass(frozen=True)
class VOILUTTable:
    """One item of a VOI LUT Sequence (0028,3010)."""

    first_mapped: int
    bits_per_entry: int
    data: NDArray[np.uint16]
    explanation: str

    def __post_init__(self) -> None:
        if not 1 <= self.data.size <= 65536 or self.data.ndim != 1:
            raise ValueError("LUT Data (0028,3006) must have 1 to 65536 entries")
        if not 8 <= self.bits_per_entry <= 16:
            raise ValueError("LUT Descriptor (0028,3002) bits per entry must be 8 to 16")
        if int(self.data.max()) >= 2**self.bits_per_entry:
            raise ValueError("LUT Data (0028,3006) exceeds the LUT Descriptor's bits")

    @property
    def descriptor(self) -> tuple[int, int, int]:
        """LUT Descriptor (0028,3002): entries (0 means 65536), first mapped, bits."""
        return self.data.size % 65536, self.first_mapped, self.bits_per_entry


@dataclass
class StoredImage:
    """Pixels and pixel-describing attributes of one MG image, as the writer stores them."""

    pixels: NDArray[np.uint16]
    bits_stored: int
    photometric_interpretation: PhotometricInterpretation
    presentation_intent: PresentationIntent
    pixel_intensity_relationship: PixelIntensityRelationship
    pixel_intensity_relationship_sign: Literal[1, -1]
    """+1: lower values mean less X-ray intensity; -1: higher values mean less."""
    imager_pixel_spacing_mm: float
    window_centers: tuple[float, ...] = ()
    window_widths: tuple[float, ...] = ()
    window_explanations: tuple[str, ...] = ()
    voi_lut_function: VOILUTFunction | None = None
    voi_lut: VOILUTTable | None = None
    # DX Image Module: Rescale Intercept/Slope are Type 1 with the enumerated values 0/1.
    rescale_intercept: float = 0.0
    rescale_slope: float = 1.0
    acquisition_device_processing_description: str = ""

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.uint16 or self.pixels.ndim != 2:
            raise ValueError("pixels must be a 2-D uint16 array (Bits Allocated 16)")
        if not 1 <= self.bits_stored <= 16:
            raise ValueError(f"Bits Stored (0028,0101) must be 1-16, got {self.bits_stored}")
        if self.pixels.size and int(self.pixels.max()) >= 2**self.bits_stored:
            raise ValueError("pixel values exceed Bits Stored (0028,0101)")
        counts = {len(self.window_centers), len(self.window_widths)}
        if len(counts) != 1:
            raise ValueError("Window Center (0028,1050) and Window Width (0028,1051) differ")
        if self.window_explanations and len(self.window_explanations) != len(self.window_centers):
            raise ValueError("Window Center & Width Explanation (0028,1055) count differs")
        if any(w <= 0 for w in self.window_widths):
            raise ValueError("Window Width (0028,1051) must be > 0")

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])


# Inverse normal CDF at 65536 quantiles: a uint16 random draw through this table is a
# Gaussian sample, several times faster than Generator.standard_normal for images.
_GAUSS_TABLE: NDArray[np.float32] = ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)


def _standard_normal(rng: np.random.Generator, shape: tuple[int, int]) -> NDArray[np.float32]:
    draws = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    return _GAUSS_TABLE[draws]


def _low_resolution_factor(spacing_mm: float) -> int:
    return max(1, round(_FILTER_SPACING_MM / spacing_mm))


def _nearest_sample(image: NDArray[np.generic], shape: tuple[int, int]) -> NDArray[np.float32]:
    """``image`` sampled at the centres of a coarser ``shape`` grid (cheap: no pooling)."""
    rows, cols = image.shape
    r = np.minimum(((np.arange(shape[0]) + 0.5) * rows / shape[0]).astype(np.intp), rows - 1)
    c = np.minimum(((np.arange(shape[1]) + 0.5) * cols / shape[1]).astype(np.intp), cols - 1)
    return np.asarray(image[np.ix_(r, c)], dtype=np.float32)


class _LowResolution:
    """A view's attenuation, thickness and breast mask on the filtering grid."""

    def __init__(self, view: PhantomView) -> None:
        rows, cols = view.shape
        self.factor = _low_resolution_factor(view.pixel_spacing_mm)
        self.shape = (math.ceil(rows / self.factor), math.ceil(cols / self.factor))
        self.spacing_mm = view.pixel_spacing_mm * rows / self.shape[0]
        att = torch.from_numpy(np.ascontiguousarray(view.attenuation, dtype=np.float32))
        if self.shape == (rows, cols):
            self.attenuation = att.numpy().copy()
        else:
            # Area averaging keeps calcifications and noise from aliasing into the filters.
            self.attenuation = F.adaptive_avg_pool2d(att[None, None], self.shape)[0, 0].numpy()
        self.thickness = _nearest_sample(view.thickness, self.shape)
        self.breast = _nearest_sample(view.breast_mask, self.shape)
        self.inside = self.breast > 0.5

    def blur(self, image: NDArray[np.float32], sigma_mm: float) -> NDArray[np.float32]:
        sigma = max(sigma_mm / self.spacing_mm, 0.5)
        return np.asarray(ndimage.gaussian_filter(image, sigma, mode="nearest"), np.float32)


def _noise_sigma(view: PhantomView, style: VendorStyle) -> float:
    # Quantum noise per pixel falls with pixel area: std ∝ 1 / pixel side.
    return style.noise_level * style.pixel_spacing_mm / view.pixel_spacing_mm


def _breast_percentiles(pixels: NDArray[np.uint16], mask: NDArray[np.bool_]) -> tuple[float, float]:
    """Robust low/high stored values of the breast, from a subsample of its pixels."""
    step = max(1, int(math.sqrt(pixels.size / 250_000)))
    sub_mask = mask[::step, ::step]
    values = pixels[::step, ::step][sub_mask]
    if values.size < 16:
        values = pixels.ravel()
    lo, hi = np.percentile(values, _VOI_PERCENTILES)
    return float(lo), float(hi)


def _contrast_lut(style: VendorStyle, entries: int, max_value: int) -> NDArray[np.uint16]:
    """The vendor's contrast curve from the presentation index range to stored values."""
    u = np.linspace(0.0, 1.0, entries)
    if style.contrast_curve == "GAMMA":
        v = u**style.contrast_strength
    else:
        s = style.contrast_strength
        mid = sum(_PRESENTATION_BAND) / 2
        lo, hi = 1 / (1 + np.exp(s * mid)), 1 / (1 + np.exp(-s * (1 - mid)))
        v = (1 / (1 + np.exp(-s * (u - mid))) - lo) / (hi - lo)
    stored = np.rint(np.clip(v, 0.0, 1.0) * max_value)
    if style.photometric_presentation == "MONOCHROME1":
        # MONOCHROME1 shows its minimum white: dense (bright) tissue gets low values.
        stored = max_value - stored
    return stored.astype(np.uint16)


def _presentation_pixels(
    view: PhantomView, style: VendorStyle, rng: np.random.Generator, low: _LowResolution
) -> NDArray[np.uint16]:
    shape = view.shape
    bits = style.bits_stored_presentation
    entries = 2**bits

    # Low-frequency part of the processed log image, from the noise-free low-res copy.
    att_low = low.attenuation
    scatter = style.scatter_fraction * low.blur(np.exp(-att_low), 20.0)
    # -ln(primary + scatter) = attenuation - ln(1 + scatter * e^attenuation)
    scatter_loss = np.log1p(scatter * np.exp(att_low))
    log_low = att_low - scatter_loss
    k = style.enhancement_strength
    blurred = low.blur(log_low, style.enhancement_sigma_mm)
    compressed = low.inside & (low.thickness > 0.9)
    if not compressed.any():
        compressed = low.inside
    body = float(np.median(att_low[compressed])) if compressed.any() else 0.0
    # Thin periphery has attenuation ≈ body * thickness: raise it towards the body level.
    equalise = style.equalisation_strength * body * np.clip(low.breast - low.thickness, 0, 1)
    processed_low = (1 + k) * log_low - k * blurred + equalise
    if low.inside.any():
        p_lo, p_hi = np.percentile(processed_low[low.inside], (1.0, 99.5))
    else:
        p_lo, p_hi = 0.0, 1.0
    p_hi = max(float(p_hi), float(p_lo) + 1e-3)
    # Affine map so that the breast range lands on the presentation band of the index.
    band_lo, band_hi = _PRESENTATION_BAND
    a = (band_hi - band_lo) * (entries - 1) / (p_hi - float(p_lo))
    b = band_lo * (entries - 1) - a * float(p_lo)
    # Full-res processed = (1+k)·(attenuation + noise) + [low-frequency terms]; the +0.5
    # makes the final float→int cast round to nearest.
    offset_low = a * ((-(1 + k)) * scatter_loss - k * blurred + equalise) + b + 0.5
    index = resize(offset_low.astype(np.float32), shape)
    index_t = torch.from_numpy(index)
    att_t = torch.from_numpy(np.ascontiguousarray(view.attenuation, dtype=np.float32))
    gain = a * (1 + k)
    index_t.add_(att_t, alpha=gain)

    # Quantum noise in the log domain: std(ln S) = σ / sqrt(S) = σ · e^(attenuation/2).
    noise = _standard_normal(rng, shape)
    amplitude = np.multiply(view.attenuation, np.float32(0.5), dtype=np.float32)
    np.exp(amplitude, out=amplitude)
    np.multiply(noise, amplitude, out=noise)
    del amplitude
    index_t.add_(torch.from_numpy(noise), alpha=gain * _noise_sigma(view, style))
    del noise

    index_t.clamp_(0, entries - 1)
    curve = _contrast_lut(style, entries, entries - 1)
    return curve[index.astype(np.uint16)]


def _processing_pixels(
    view: PhantomView, style: VendorStyle, rng: np.random.Generator, low: _LowResolution
) -> NDArray[np.uint16]:
    shape = view.shape
    max_value = 2**style.bits_stored_processing - 1
    sigma = _noise_sigma(view, style)
    scatter_low = style.scatter_fraction * low.blur(np.exp(-low.attenuation), 20.0)

    signal = np.negative(view.attenuation, dtype=np.float32)
    np.exp(signal, out=signal)  # primary signal, 1 in air
    detected = resize(scatter_low.astype(np.float32), shape)
    detected_t = torch.from_numpy(detected)
    detected_t.add_(torch.from_numpy(signal))
    # Quantum noise: variance proportional to the signal.
    np.sqrt(signal, out=signal)
    np.multiply(signal, _standard_normal(rng, shape), out=signal)
    detected_t.add_(torch.from_numpy(signal), alpha=sigma)
    del signal

    if style.processing_relationship == "LIN":
        # Air (primary + scatter) sits at 85 % of the range: headroom for noise.
        gain = 0.85 * max_value / (1 + style.scatter_fraction)
        detected_t.mul_(gain).add_(0.5)
    else:
        # Log amplifier (CR heritage): 7.5 decades of e below air fill the range.
        detected_t.clamp_(min=math.exp(-7.5))
        np.log(detected, out=detected)
        gain = 0.9 * max_value / 7.5
        detected_t.mul_(gain).add_(0.9 * max_value + 0.5)
    detected_t.clamp_(0, max_value)
    return detected.astype(np.uint16)


def _voi_lut_table(style: VendorStyle, bits: int, lo: float, hi: float) -> VOILUTTable:
    """A VOI LUT over the whole stored range with a gentle S-shape across the breast."""
    values = np.arange(2**bits, dtype=np.float64)
    x = np.clip((values - lo) / max(hi - lo, 1.0), 0.0, 1.0)
    s_curve = x * x * (3 - 2 * x)  # smoothstep: soft shoulder and toe
    y = 0.5 * x + 0.5 * s_curve
    out_max = 2**style.voi_lut_bits - 1
    data = np.rint(y * out_max).astype(np.uint16)
    return VOILUTTable(
        first_mapped=0,
        bits_per_entry=style.voi_lut_bits,
        data=data,
        explanation=f"{style.processing_description} NORMAL",
    )


_WINDOW_VARIANTS = (("NORMAL", 1.0, 0.0), ("HARDER", 0.8, 0.03), ("SOFTER", 1.3, -0.03))


def render_pixels(
    view: PhantomView,
    style: VendorStyle,
    intent: PresentationIntent,
    rng: np.random.Generator,
) -> StoredImage:
    """Detector physics and the vendor's processing applied to ``view``.

    The VOI (window or VOI LUT) spans the breast's own stored values, so breast tissue
    fills the display range, air displays dark and calcifications bright. The result is
    deterministic for a given ``rng`` state.
    """
    low = _LowResolution(view)
    if intent == "FOR PRESENTATION":
        pixels = _presentation_pixels(view, style, rng, low)
        photometric = style.photometric_presentation
        relationship: PixelIntensityRelationship = "LOG"
        processing = style.processing_description
    elif intent == "FOR PROCESSING":
        pixels = _processing_pixels(view, style, rng, low)
        photometric = style.photometric_processing
        relationship = style.processing_relationship
        processing = ""
    else:
        raise ValueError(
            f"Presentation Intent Type must be FOR PRESENTATION or FOR PROCESSING, got {intent!r}"
        )
    bits = style.bits_stored(intent)
    # Stored values rise with exposure exactly when dense tissue has low values, i.e. in
    # MONOCHROME1 (shown inverted); then a higher value means more X-ray intensity.
    sign: Literal[1, -1] = 1 if photometric == "MONOCHROME1" else -1

    stored = StoredImage(
        pixels=pixels,
        bits_stored=bits,
        photometric_interpretation=photometric,
        presentation_intent=intent,
        pixel_intensity_relationship=relationship,
        pixel_intensity_relationship_sign=sign,
        imager_pixel_spacing_mm=view.pixel_spacing_mm,
        acquisition_device_processing_description=processing,
    )
    if intent == "FOR PROCESSING":
        # The MG IOD allows the VOI LUT Module only in For Presentation images.
        return stored
    lo, hi = _breast_percentiles(pixels, view.breast_mask)
    if style.voi_kind == "LUT":
        stored.voi_lut = _voi_lut_table(style, bits, lo, hi)
        return stored
    width = max(hi - lo, 1.0) * 1.1
    center = (lo + hi) / 2
    variants = _WINDOW_VARIANTS[: style.window_count]
    stored.window_centers = tuple(round(center + d * width, 1) for _, _, d in variants)
    stored.window_widths = tuple(round(width * f, 1) for _, f, _ in variants)
    stored.window_explanations = tuple(name for name, _, _ in variants)
    stored.voi_lut_function = style.voi_lut_function
    return stored
