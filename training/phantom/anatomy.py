"""Patient anatomy and the breast geometry of each screening view.

A breast is modelled in normalised 3D coordinates ``(u, v, w)``: ``u`` from the chest
wall (0) to the nipple (1), ``v`` medial (-1) to lateral (+1), ``w`` inferior (-1) to
superior (+1), inside the half ball ``u >= 0, u² + v² + w² <= 1``. Each view maps this
body to image millimetres (chest wall on the left, or on the right when
``mirrored``, as a right breast is stored): the cranio-caudal (CC) view looks
down ``w`` (lateral at the top of the image), the medio-lateral oblique (MLO) view
looks along an axis tilted by ``obliquity`` (superolateral at the top). Structures
placed in 3D (arteries and their calcification, calcifications, clips) therefore
appear consistently on both views of a breast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from training.phantom.raster import (
    FloatArray,
    power_law_noise,
    resample_polyline,
    resize,
    splat_disks,
)
from training.phantom.types import ViewName

# Effective linear attenuation (1/mm) at a mammographic spectrum (~20 keV effective).
MU_FAT = 0.035
MU_GLAND = 0.060
MU_MUSCLE = 0.062
#: Hydroxyapatite in arterial walls and calcifications.
MU_CALCIUM = 1.1

#: BI-RADS breast density categories with their share of a screening population.
DENSITY_CATEGORIES: dict[str, float] = {"a": 0.10, "b": 0.40, "c": 0.40, "d": 0.10}
_DENSITY_RANGES: dict[str, tuple[float, float]] = {
    "a": (0.00, 0.25),
    "b": (0.25, 0.50),
    "c": (0.50, 0.75),
    "d": (0.75, 1.00),
}


def density_category(density: float) -> str:
    """BI-RADS letter (a fatty .. d extremely dense) of a density in [0, 1]."""
    for letter, (lo, hi) in _DENSITY_RANGES.items():
        if lo <= density < hi:
            return letter
    return "d"


@dataclass(frozen=True)
class PatientAnatomy:
    """What two breasts of one woman share: age, density, size, compression."""

    age: int
    density: float
    """Fibroglandular density, 0 (fatty) to 1 (extremely dense)."""
    breast_depth_mm: float
    """Chest wall to nipple on the CC view."""
    breast_width_mm: float
    """Medio-lateral extent at the chest wall on the CC view."""
    compressed_thickness_mm: float

    @property
    def density_category(self) -> str:
        return density_category(self.density)

    @property
    def tortuosity(self) -> float:
        """Arterial tortuosity, 0 (straight) to 1, rising with age."""
        return float(np.clip((self.age - 38) / 40.0, 0.05, 1.0))


def sample_patient(rng: np.random.Generator, *, age: int | None = None) -> PatientAnatomy:
    """A random woman of screening age with a BI-RADS-distributed density."""
    if age is None:
        age = int(np.clip(rng.normal(58, 9), 40, 79))
    letters = list(DENSITY_CATEGORIES)
    letter = letters[int(rng.choice(len(letters), p=list(DENSITY_CATEGORIES.values())))]
    lo, hi = _DENSITY_RANGES[letter]
    density = float(rng.uniform(lo, hi))
    # Dense breasts tend to be smaller; size varies a lot between women.
    depth = float(np.clip(rng.normal(120 - 25 * density, 20), 70, 175))
    width = float(np.clip(depth * rng.uniform(1.45, 1.85), 120, 260))
    thickness = float(np.clip(rng.normal(52 - 10 * density, 10), 28, 85))
    return PatientAnatomy(age, density, depth, width, thickness)


@dataclass(frozen=True)
class ViewGeometry:
    """Where the breast lies on one image, in millimetres from the top left corner."""

    view: ViewName
    rows: int
    cols: int
    spacing_mm: float
    depth_mm: float
    """``a``: chest wall to nipple along the image rows."""
    half_height_mm: float
    """``b``: half extent across the image at the chest wall."""
    centre_y_mm: float
    """Image row (mm) of the nipple axis at the chest wall."""
    sag: float
    """Downward droop of the nipple (MLO), in units of ``b`` at ``u = 1``."""
    obliquity_rad: float
    """Tilt of the MLO projection axis from vertical (0 on CC)."""
    harmonics: tuple[tuple[float, float], ...]
    """Outline perturbation: (amplitude, phase) of angular harmonics 2, 3, ..."""
    nipple_angle: float
    nipple_size: float
    pectoral_top_mm: float
    """MLO: width of the pectoral muscle along the top edge (0 on CC)."""
    pectoral_side_mm: float
    """MLO: height of the pectoral muscle along the chest wall."""
    pectoral_shape: float
    """Exponent of the pectoral edge: < 1 concave, > 1 convex."""
    mirrored: bool = False
    """Chest wall on the right image edge (a right breast) instead of the left."""

    @property
    def height_mm(self) -> float:
        return self.rows * self.spacing_mm

    @property
    def width_mm(self) -> float:
        return self.cols * self.spacing_mm

    def project(
        self, u: NDArray[np.floating], v: NDArray[np.floating], w: NDArray[np.floating]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Image (y, x) in millimetres of normalised 3D breast points."""
        if self.view == "CC":
            s = np.asarray(v, dtype=np.float64)
        else:
            c, si = math.cos(self.obliquity_rad), math.sin(self.obliquity_rad)
            s = np.asarray(w, dtype=np.float64) * c + np.asarray(v, dtype=np.float64) * si
        return self.plane_to_image(u, s)

    def plane_to_image(
        self, u: NDArray[np.floating], s: NDArray[np.floating]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Image (y, x) in millimetres of in-plane normalised coordinates ``(u, s)``."""
        uu = np.asarray(u, dtype=np.float64)
        ss = np.asarray(s, dtype=np.float64)
        x = self._from_chest_wall(uu * self.depth_mm)
        y = self.centre_y_mm - self.half_height_mm * (ss - self.sag * uu * uu)
        return np.asarray(y, dtype=np.float64), x

    def _from_chest_wall(self, x_mm: NDArray[np.float64]) -> NDArray[np.float64]:
        """Image x and distance from the chest wall map to each other (an involution)."""
        return self.width_mm - x_mm if self.mirrored else x_mm

    def normalised(
        self, y_mm: NDArray[np.floating], x_mm: NDArray[np.floating]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Inverse of :meth:`project` in the image plane: ``(u, s)`` of image points."""
        u = self._from_chest_wall(np.asarray(x_mm, dtype=np.float64)) / self.depth_mm
        s = (self.centre_y_mm - np.asarray(y_mm, dtype=np.float64)) / self.half_height_mm
        return u, s + self.sag * u * u

    def inside(self, y_mm: FloatArray, x_mm: FloatArray) -> NDArray[np.bool_]:
        """Whether image points (mm) lie inside the breast outline."""
        u, s = self.normalised(y_mm, x_mm)
        rho = np.sqrt(u * u + s * s)
        return np.asarray((rho < self.outline_radius(np.arctan2(s, u))) & (u >= 0))

    def pectoral_depth_mm(self, y_mm: FloatArray, x_mm: FloatArray) -> NDArray[np.float64]:
        """Approximate signed depth (mm) into the pectoral muscle; < 0 outside it.

        A smooth function of position (unlike a distance transform on a grid), so the
        muscle edge is drawn without staircase steps.
        """
        if self.pectoral_top_mm <= 0:
            return np.full(np.broadcast_shapes(np.shape(y_mm), np.shape(x_mm)), -1e3)
        e = self.pectoral_shape
        depth = self._from_chest_wall(np.asarray(x_mm, dtype=np.float64))
        level = (
            np.abs(np.asarray(y_mm) / self.pectoral_side_mm) ** e
            + np.abs(depth / self.pectoral_top_mm) ** e
        )
        scale = min(self.pectoral_side_mm, self.pectoral_top_mm) / max(e, 1.0)
        return np.asarray((1.0 - level) * scale)

    def inside_pectoral(self, y_mm: FloatArray, x_mm: FloatArray) -> NDArray[np.bool_]:
        """Whether image points (mm) lie in the pectoral muscle (never on CC)."""
        return np.asarray((self.pectoral_depth_mm(y_mm, x_mm) > 0) & self.inside(y_mm, x_mm))

    def outline_radius(self, theta: NDArray[np.floating]) -> NDArray[np.float64]:
        """Normalised outline radius at polar angle ``theta`` (0 = nipple direction)."""
        theta = np.asarray(theta, dtype=np.float64)
        r = np.ones_like(theta)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            r += amp * np.cos(k * theta + phase)
        dt = (theta - self.nipple_angle) / 0.05
        r += self.nipple_size * np.exp(-dt * dt)
        return r


def sample_view_geometry(
    view: ViewName,
    patient: PatientAnatomy,
    rows: int,
    cols: int,
    spacing_mm: float,
    rng: np.random.Generator,
    *,
    mirrored: bool = False,
) -> ViewGeometry:
    """Place one breast on a detector of ``rows`` x ``cols`` pixels of ``spacing_mm``."""
    height, width = rows * spacing_mm, cols * spacing_mm
    harmonics = tuple(
        (float(rng.uniform(0.0, 0.035 / (k - 1))), float(rng.uniform(0, 2 * math.pi)))
        for k in range(2, 6)
    )
    nipple_angle = float(rng.normal(0.0, 0.08))
    nipple_size = float(rng.uniform(0.03, 0.06))
    if view == "CC":
        depth = min(patient.breast_depth_mm * rng.uniform(0.95, 1.05), 0.82 * width)
        half = min(patient.breast_width_mm / 2.0 * rng.uniform(0.95, 1.05), 0.46 * height)
        centre = height / 2.0 + rng.uniform(-0.04, 0.04) * height
        centre = float(np.clip(centre, half + 0.02 * height, height - half - 0.02 * height))
        return ViewGeometry(
            "CC", rows, cols, spacing_mm, float(depth), float(half), centre,
            0.0, 0.0, harmonics, nipple_angle, nipple_size, 0.0, 0.0, 1.0, mirrored,
        )  # fmt: skip
    # MLO: the axillary tail reaches the top edge; the nipple sits below mid-height.
    depth = min(patient.breast_depth_mm * rng.uniform(1.0, 1.12), 0.85 * width)
    half = min(patient.breast_width_mm / 2.0 * rng.uniform(1.2, 1.45), 0.62 * height)
    centre = float(min(half * rng.uniform(0.8, 0.95), 0.6 * height))
    # The pectoral muscle: a long triangle down the chest wall, to about nipple level.
    pect_side = float(np.clip(rng.uniform(0.8, 1.25) * centre, 40.0, 0.95 * height))
    pect_top = float(np.clip(rng.uniform(0.25, 0.5) * depth, 15.0, 0.6 * depth))
    return ViewGeometry(
        "MLO", rows, cols, spacing_mm, float(depth), float(half), centre,
        float(rng.uniform(0.1, 0.3)), float(math.radians(rng.uniform(40, 55))),
        harmonics, nipple_angle, nipple_size, pect_top, pect_side,
        float(rng.uniform(0.8, 1.4)), mirrored,
    )  # fmt: skip


@dataclass
class TissueMaps:
    """Anatomy on a coarse grid (``grid_mm`` per pixel): smooth structures only."""

    grid_mm: float
    attenuation: FloatArray
    thickness: FloatArray
    breast_sdf_mm: FloatArray
    """Signed distance to the skin line, positive inside the breast."""
    pectoral_sdf_mm: FloatArray
    """Signed distance to the pectoral edge, positive inside the muscle."""
    glandular: FloatArray
    compressed_thickness_mm: float


def anatomy_grid_shape(geometry: ViewGeometry, grid_mm: float) -> tuple[int, int]:
    """Coarse grid covering exactly the detector (its pixels are ``grid_mm`` or a hair less)."""
    return (
        max(8, math.ceil(geometry.height_mm / grid_mm - 1e-6)),
        max(8, math.ceil(geometry.width_mm / grid_mm - 1e-6)),
    )


def _pixel_centres(geometry: ViewGeometry, shape: tuple[int, int]) -> tuple[FloatArray, FloatArray]:
    """Millimetre (y, x) of the pixel centres of a grid spanning the detector."""
    rows, cols = shape
    y = ((np.arange(rows, dtype=np.float32) + 0.5) * (geometry.height_mm / rows))[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) * (geometry.width_mm / cols))[None, :]
    return y, x


#: Grid (mm) of the distance transforms: distances are smooth, so a coarse grid is enough.
_DISTANCE_GRID_MM = 1.0


def _signed_distance(
    level: Callable[[FloatArray, FloatArray], NDArray[np.bool_]],
    geometry: ViewGeometry,
    shape: tuple[int, int],
    pad_mm: float,
) -> FloatArray:
    """Signed distance (mm, positive inside) to the edge of the region ``level(y, x)``.

    Computed on a 1 mm grid and resized to ``shape``. A breast cut by the image border
    (chest wall, top of an MLO) continues beyond it, so its border is not skin: the
    region is padded by edge replication before the distance transform.
    """
    coarse_shape = anatomy_grid_shape(
        geometry, max(_DISTANCE_GRID_MM, geometry.height_mm / shape[0])
    )
    cy, cx = _pixel_centres(geometry, coarse_shape)
    mask = np.broadcast_to(level(cy, cx), coarse_shape)
    step = geometry.height_mm / coarse_shape[0]
    pad = max(2, math.ceil(pad_mm / step))
    padded = np.pad(mask, pad, mode="edge")
    inside = ndimage.distance_transform_edt(padded)
    outside = ndimage.distance_transform_edt(~padded)
    d = (inside - outside)[pad:-pad, pad:-pad]
    # EDT measures to pixel centres; half a pixel less puts zero on the edge itself.
    sdf = (d - 0.5 * np.sign(d)) * step
    return resize(np.asarray(sdf, dtype=np.float32), shape)


def render_tissue(
    geometry: ViewGeometry,
    patient: PatientAnatomy,
    grid_mm: float,
    rng: np.random.Generator,
) -> TissueMaps:
    """Breast outline, thickness, parenchyma, pectoral muscle, skin and nipple."""
    shape = anatomy_grid_shape(geometry, grid_mm)
    grid_mm = geometry.height_mm / shape[0]
    y, x = _pixel_centres(geometry, shape)
    u, s = geometry.normalised(y, x)
    inside = geometry.inside(y, x)
    sdf = _signed_distance(geometry.inside, geometry, shape, patient.compressed_thickness_mm)
    # The mask is exact (analytic outline); the distance only shapes the profiles.
    sdf = np.where(inside, np.maximum(sdf, 0.05), np.minimum(sdf, -0.05)).astype(np.float32)

    # Compressed breast edge: a half-round profile of radius ~ thickness / 2.
    edge_r = patient.compressed_thickness_mm * 0.5
    d = np.clip(sdf / edge_r, 0.0, 1.0)
    thickness = np.sqrt(np.clip(1.0 - (1.0 - d) ** 2, 0.0, 1.0)).astype(np.float32)
    thickness[sdf <= 0] = 0.0

    glandular = _parenchyma(geometry, patient, u, s, sdf, shape, grid_mm, rng)

    if geometry.view == "MLO":
        pect_sdf = geometry.pectoral_depth_mm(y, x).astype(np.float32)
        # Muscle fibres run along the muscle: a streaked, dense band.
        streak = power_law_noise(shape, 2.5, rng, min_period=3.0)
        muscle = np.clip(0.82 + 0.06 * streak, 0.6, 1.0)
        fade = np.clip(pect_sdf / 2.0, 0.0, 1.0)
        glandular = glandular * (1 - fade) + muscle * fade
    else:
        pect_sdf = np.full(shape, -1e3, dtype=np.float32)

    mu = MU_FAT + (MU_GLAND - MU_FAT) * glandular
    attenuation = (patient.compressed_thickness_mm * thickness * mu).astype(np.float32)
    # Skin: a ~1.5 mm layer seen tangentially at the edge gives a bright rim.
    skin = np.exp(-np.clip(sdf, 0, None) / 1.2) * (sdf > 0)
    attenuation += (0.18 * skin).astype(np.float32)
    # Nipple and areola: denser, thicker skin around the nipple tip.
    ny, nx = geometry.plane_to_image(
        np.array([math.cos(geometry.nipple_angle)]), np.array([math.sin(geometry.nipple_angle)])
    )
    r2 = ((y - ny[0]) ** 2 + (x - nx[0]) ** 2) / (9.0**2)
    attenuation += (0.25 * np.exp(-r2) * (sdf > 0)).astype(np.float32)
    attenuation[sdf <= 0] = 0.0
    return TissueMaps(
        grid_mm, attenuation, thickness, sdf, pect_sdf, glandular, patient.compressed_thickness_mm
    )


def _parenchyma(
    geometry: ViewGeometry,
    patient: PatientAnatomy,
    u: NDArray[np.float64],
    s: NDArray[np.float64],
    sdf: FloatArray,
    shape: tuple[int, int],
    grid_mm: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Glandular fraction (0-1): power-law texture inside a cone behind the nipple."""
    density = patient.density
    # Envelope: subcutaneous and retroglandular fat spared, densest behind the nipple.
    fat_layer = rng.uniform(4.0, 12.0) * (1.2 - density)
    env = np.clip((sdf - fat_layer) / 10.0, 0.0, 1.0)
    env *= np.clip((u - rng.uniform(0.05, 0.2)) / 0.2, 0.0, 1.0)
    spread = 0.55 + 0.35 * density
    upper_outer = 0.15 if geometry.view == "MLO" else rng.uniform(-0.1, 0.15)
    env *= np.exp(-(((s - upper_outer) / spread) ** 2))
    # Texture, streaked along ducts that converge on the nipple (a radial warp).
    coarse = power_law_noise(shape, 3.0, rng, min_period=2.0)
    fine = power_law_noise(shape, 2.2, rng, min_period=1.5)
    angle = np.arctan2(s, 1.0 - u)
    radial = np.cos(angle * rng.uniform(18, 34) + 6.0 * coarse) * 0.25
    texture = 0.85 * coarse + 0.35 * fine + radial
    # Threshold so that the dense fraction of the envelope follows the density.
    frac = 0.12 + 0.75 * density
    tau = float(np.quantile(texture[env > 0.5], 1.0 - frac)) if np.any(env > 0.5) else 0.0
    dense = 1.0 / (1.0 + np.exp(-(texture - tau) / 0.25))
    glandular = env * (0.25 + 0.55 * dense) * (0.6 + 0.4 * density)
    glandular += _cooper_ligaments(geometry, sdf, shape, grid_mm, rng) * (1.0 - env)
    return np.asarray(np.clip(glandular, 0.0, 1.0), dtype=np.float32)


def _cooper_ligaments(
    geometry: ViewGeometry,
    sdf: FloatArray,
    shape: tuple[int, int],
    grid_mm: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Thin scalloped septa in the subcutaneous fat, roughly parallel to the skin."""
    out = np.zeros(shape, dtype=np.float32)
    n = int(rng.integers(6, 22))
    for _ in range(n):
        t0 = rng.uniform(-1.3, 1.3)
        depth = rng.uniform(0.7, 0.95)
        span = rng.uniform(0.08, 0.25)
        t = np.linspace(t0 - span, t0 + span, 24)
        bulge = depth + rng.uniform(0.03, 0.08) * np.sin(np.linspace(0, math.pi, 24))
        uu = bulge * np.cos(t)
        ss = bulge * np.sin(t)
        yy, xx = geometry.plane_to_image(uu, ss)
        pts = np.stack([yy / grid_mm, xx / grid_mm], axis=1)
        samples, _ = resample_polyline(pts, 0.7)
        radius = max(0.6, rng.uniform(0.12, 0.3) / grid_mm)
        splat_disks(out, samples[:, 0], samples[:, 1], radius, rng.uniform(0.08, 0.22))
    out *= sdf > 0
    return out
