"""Things on a mammogram that are *not* BAC, so a model must learn the difference.

Microcalcifications (clustered and diffuse punctate), round and popcorn benign
calcifications, dermal (skin) calcifications, biopsy clips, lymph nodes, and the
lead markers and labels in the background. None of them is ever in the BAC mask, and
none is correlated between the two breasts of a patient.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from training.phantom.anatomy import MU_CALCIUM, MU_FAT, MU_GLAND, ViewGeometry
from training.phantom.raster import FloatArray
from training.phantom.types import Laterality, ViewName
from training.phantom.vessels import Stamps

#: Attenuation of a lead marker or a metal clip: far beyond any tissue.
METAL_ATTENUATION = 6.0


def _ball_point(rng: np.random.Generator, r_max: float = 0.8) -> NDArray[np.float64]:
    while True:
        p = np.array([rng.uniform(0.1, 0.9), rng.uniform(-1, 1), rng.uniform(-1, 1)])
        if float(np.linalg.norm(p)) < r_max:
            return p


def _ring(
    centre: NDArray[np.float64], radius_mm: float, wall_mm: float, amp: float
) -> list[tuple[NDArray[np.float64], float, float]]:
    """Eggshell calcification: a ring of small wall pieces around ``centre`` (mm offsets)."""
    n = max(8, int(2 * math.pi * radius_mm / max(wall_mm, 0.05)))
    out = []
    for k in range(n):
        a = 2 * math.pi * k / n
        out.append((centre + radius_mm * np.array([math.cos(a), math.sin(a)]), wall_mm / 2, amp))
    return out


class CalcificationDistractors:
    """Benign calcifications and clips placed in 3D, seen on both views of a breast."""

    def __init__(self, rng: np.random.Generator, *, rate: float = 1.0) -> None:
        # Each item: (3D centre, list of (in-plane mm offset, radius mm, attenuation)).
        self.items: list[tuple[NDArray[np.float64], list[tuple[NDArray[np.float64], float, float]]]]
        self.items = []
        if rng.random() < 0.30 * rate:  # a cluster of punctate/pleomorphic microcalcifications
            for _ in range(int(rng.integers(1, 3))):
                centre = _ball_point(rng)
                pieces = []
                for _ in range(int(rng.integers(5, 26))):
                    r = float(rng.uniform(0.05, 0.22))
                    pieces.append(
                        (rng.normal(0, rng.uniform(1.0, 3.5), 2), r, MU_CALCIUM * 2 * r * 0.8)
                    )
                self.items.append((centre, pieces))
        if rng.random() < 0.25 * rate:  # diffuse scattered punctate calcifications
            for _ in range(int(rng.integers(8, 40))):
                r = float(rng.uniform(0.05, 0.18))
                self.items.append((_ball_point(rng, 0.9), [(np.zeros(2), r, MU_CALCIUM * 2 * r)]))
        if rng.random() < 0.40 * rate:  # round benign calcifications, some eggshell
            for _ in range(int(rng.integers(1, 5))):
                r = float(rng.uniform(0.5, 2.0))
                if rng.random() < 0.5:
                    pieces = [(np.zeros(2), r, MU_CALCIUM * 1.2 * r * rng.uniform(0.5, 1.0))]
                else:
                    pieces = _ring(np.zeros(2), r, rng.uniform(0.15, 0.35), MU_CALCIUM * 0.9)
                self.items.append((_ball_point(rng), pieces))
        if rng.random() < 0.10 * rate:  # popcorn calcification of a degenerating fibroadenoma
            pieces = []
            for _ in range(int(rng.integers(4, 9))):
                r = float(rng.uniform(0.5, 1.5))
                pieces.append((rng.normal(0, 1.2, 2), r, MU_CALCIUM * 1.3 * r))
            self.items.append((_ball_point(rng), pieces))
        if rng.random() < 0.08 * rate:  # a biopsy marker clip: a small metal zig-zag
            angle = rng.uniform(0, math.pi)
            along = np.array([math.cos(angle), math.sin(angle)])
            across = np.array([-along[1], along[0]])
            pieces = []
            for k in range(24):
                t = (k / 23 - 0.5) * rng.uniform(3.0, 5.0)
                zig = 0.5 * math.sin(k / 23 * 4 * math.pi)
                pieces.append((t * along + zig * across, 0.18, METAL_ATTENUATION))
            self.items.append((_ball_point(rng), pieces))

    def stamps(self, geometry: ViewGeometry) -> Stamps:
        cy: list[float] = []
        cx: list[float] = []
        rad: list[float] = []
        amp: list[float] = []
        sp = geometry.spacing_mm
        for centre, pieces in self.items:
            y, x = geometry.project(centre[:1], centre[1:2], centre[2:3])
            for offset, r, a in pieces:
                cy.append((float(y[0]) + float(offset[0])) / sp)
                cx.append((float(x[0]) + float(offset[1])) / sp)
                rad.append(max(0.6, r / sp))
                amp.append(a)
        f = np.float32
        n = len(cy)
        return Stamps(
            np.array(cy, f), np.array(cx, f), np.array(rad, f), np.array(amp, f), np.zeros(n, f)
        )


def skin_calcifications(
    sdf_mm: FloatArray, grid_mm: float, spacing_mm: float, rng: np.random.Generator
) -> Stamps:
    """Dermal calcifications: small lucent-centred rings within a few mm of the skin."""
    f = np.float32
    if rng.random() > 0.35:
        return Stamps(*(np.zeros(0, f) for _ in range(5)))
    ys, xs = np.nonzero((sdf_mm > 0.5) & (sdf_mm < 5.0))
    if len(ys) == 0:
        return Stamps(*(np.zeros(0, f) for _ in range(5)))
    pieces: list[tuple[NDArray[np.float64], float, float]] = []
    for _ in range(int(rng.integers(2, 12))):
        i = int(rng.integers(len(ys)))
        centre = np.array([(ys[i] + 0.5) * grid_mm, (xs[i] + 0.5) * grid_mm])
        pieces += _ring(centre, rng.uniform(0.3, 0.9), rng.uniform(0.12, 0.25), MU_CALCIUM * 0.7)
    cy = np.array([p[0][0] / spacing_mm for p in pieces], f)
    cx = np.array([p[0][1] / spacing_mm for p in pieces], f)
    rad = np.array([max(0.6, p[1] / spacing_mm) for p in pieces], f)
    amp = np.array([p[2] for p in pieces], f)
    return Stamps(cy, cx, rad, amp, np.zeros(len(pieces), f))


def add_lymph_nodes(
    attenuation: FloatArray,
    geometry: ViewGeometry,
    sdf_mm: FloatArray,
    grid_mm: float,
    rng: np.random.Generator,
) -> None:
    """Axillary nodes (MLO) and the odd intramammary node: ovoid with a fatty hilum."""
    count = int(rng.integers(0, 4)) if geometry.view == "MLO" else int(rng.random() < 0.15)
    rows, cols = attenuation.shape
    for _ in range(count):
        if geometry.view == "MLO":
            u, s = rng.uniform(0.08, 0.35), rng.uniform(0.45, 0.85)
        else:
            u, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        cy, cx = geometry.plane_to_image(np.array([u]), np.array([s]))
        a_mm, b_mm = rng.uniform(4.0, 9.0), rng.uniform(2.5, 5.0)
        ang = rng.uniform(0, math.pi)
        half = math.ceil(a_mm / grid_mm) + 2
        y0, x0 = int(cy[0] / grid_mm), int(cx[0] / grid_mm)
        ys = slice(max(0, y0 - half), min(rows, y0 + half))
        xs = slice(max(0, x0 - half), min(cols, x0 + half))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        yy = (np.arange(ys.start, ys.stop) + 0.5)[:, None] * grid_mm - cy[0]
        xx = (np.arange(xs.start, xs.stop) + 0.5)[None, :] * grid_mm - cx[0]
        p = yy * math.cos(ang) + xx * math.sin(ang)
        q = -yy * math.sin(ang) + xx * math.cos(ang)
        node = np.sqrt(np.clip(1 - (p / a_mm) ** 2 - (q / b_mm) ** 2, 0, None))
        hilum_level = 1 - ((p - 0.7 * a_mm) / (0.45 * a_mm)) ** 2 - (q / (0.4 * b_mm)) ** 2
        hilum = np.sqrt(np.clip(hilum_level, 0, None))
        chord = 2 * b_mm * (node - 0.8 * hilum)
        add = ((MU_GLAND - MU_FAT) * 1.3 * np.clip(chord, 0, None)).astype(np.float32)
        attenuation[ys, xs] += add * (sdf_mm[ys, xs] > 2.0)


def add_labels(
    attenuation: FloatArray,
    breast_mask: NDArray[np.bool_],
    laterality: Laterality,
    view: ViewName,
    spacing_mm: float,
    rng: np.random.Generator,
) -> NDArray[np.bool_]:
    """Lead laterality/view marker and a small text label in the background, as imaged.

    Drawn in the final orientation (so text reads correctly) in a top or bottom corner
    away from the chest wall, never over the breast. Returns the label mask.
    """
    rows, cols = attenuation.shape
    size_px = max(6, round(rng.uniform(7.0, 11.0) / spacing_mm))
    small_px = max(5, int(size_px * rng.uniform(0.4, 0.6)))
    text = f"{laterality}{view}" if rng.random() < 0.7 else f"{laterality} {view}"
    detail = rng.choice(["ROUTINE", "SCREEN", f"{int(rng.integers(60, 160))} N", "AEC"])
    font = ImageFont.load_default(size=size_px)
    small = ImageFont.load_default(size=small_px)
    canvas = Image.new("L", (int(size_px * 6), int(size_px * 2.4)), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((size_px // 4, 0), text, fill=255, font=font)
    draw.text((size_px // 4, int(size_px * 1.3)), str(detail), fill=255, font=small)
    label = np.asarray(canvas) > 127
    ys, xs = np.nonzero(label)
    if len(ys) == 0:
        return np.zeros_like(breast_mask)
    label = label[: ys.max() + 1, : xs.max() + 1]
    lh, lw = label.shape
    margin = max(2, round(4.0 / spacing_mm))
    if lh + 2 * margin >= rows or lw + 2 * margin >= cols:
        return np.zeros_like(breast_mask)
    x0 = margin if laterality == "R" else cols - lw - margin
    clearance = max(2, round(5.0 / spacing_mm))
    out = np.zeros_like(breast_mask)
    for y0 in (margin, rows - lh - margin):
        ys_ = slice(max(0, y0 - clearance), min(rows, y0 + lh + clearance))
        xs_ = slice(max(0, x0 - clearance), min(cols, x0 + lw + clearance))
        if not breast_mask[ys_, xs_].any():
            out[y0 : y0 + lh, x0 : x0 + lw] = label
            attenuation[out] = METAL_ATTENUATION
            break
    return out


def add_paddle_edge(
    attenuation: FloatArray,
    breast_mask: NDArray[np.bool_],
    spacing_mm: float,
    rng: np.random.Generator,
    *,
    rate: float = 1.0,
) -> NDArray[np.bool_]:
    """The edge of the compression paddle or collimator: a thin line across the image.

    Drawn (with probability ``0.2 * rate``) in the background near the top or bottom
    border, where it crosses no breast; never part of the breast mask. Returns its mask.
    """
    rows = attenuation.shape[0]
    out = np.zeros_like(breast_mask)
    if rng.random() >= 0.2 * rate:
        return out
    thickness = max(1, round(rng.uniform(0.5, 1.5) / spacing_mm))
    clearance = max(1, round(3.0 / spacing_mm))
    has_breast: NDArray[np.bool_] = np.asarray(breast_mask.any(axis=1))
    band = max(thickness + 1, int(0.15 * rows))
    top = bool(rng.random() < 0.5)
    for start in range(band) if top else range(rows - band, rows - thickness):
        lo, hi = max(0, start - clearance), min(rows, start + thickness + clearance)
        if not has_breast[lo:hi].any() and rng.random() < 0.2:
            out[start : start + thickness, :] = True
            attenuation[out] = np.float32(rng.uniform(0.3, 0.8))
            break
    return out
