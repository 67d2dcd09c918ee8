"""Breast arteries in 3D and the calcification patterns along them (the BAC).

Arteries enter from the chest wall (internal mammary perforators) or the lateral side
(lateral thoracic artery), run toward the nipple, branch and taper, and wind more with
age. Calcification sits on runs along an artery with the patterns seen on screening
mammograms: tram-track (both walls), beaded plaques, solid "pipe" segments, one wall
only (partial) and punctate dots in a line (discontinuous).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray

from training.phantom.anatomy import MU_CALCIUM, PatientAnatomy, ViewGeometry
from training.phantom.raster import polyline_normals, resample_polyline


class CalcificationPattern(IntEnum):
    TRAM_TRACK = 0
    BEADED = 1
    PIPE = 2
    PARTIAL = 3
    PUNCTATE = 4


@dataclass
class Artery:
    """An artery in normalised breast coordinates with its calcification runs."""

    points: NDArray[np.float64]
    """(n, 3) samples of (u, v, w) along the centreline, chest wall first."""
    arc_mm: NDArray[np.float64]
    radius_mm: NDArray[np.float64]
    calcified: NDArray[np.bool_]
    pattern: NDArray[np.int8]
    density: NDArray[np.float32]
    """Calcification density factor of each sample (0.4-1)."""
    wall_mm: float
    side: NDArray[np.int8]
    """Which wall a PARTIAL run keeps (+1 or -1)."""

    @property
    def length_mm(self) -> float:
        return float(self.arc_mm[-1]) if len(self.arc_mm) else 0.0


def severity_from_percent(area_percent: float) -> float:
    """0-1 severity of calcification that drives pattern, run length and wall thickness."""
    if area_percent <= 0:
        return 0.0
    return float(np.clip(math.log10(area_percent / 0.05) / math.log10(6.0 / 0.05), 0.0, 1.0))


def _physical(points: NDArray[np.float64], patient: PatientAnatomy) -> NDArray[np.float64]:
    scale = np.array(
        [patient.breast_depth_mm, patient.breast_width_mm / 2, patient.breast_width_mm / 2]
    )
    return np.asarray(points * scale, dtype=np.float64)


def _inside_both_views(u: float, v: float, w: float, margin: float = 0.93) -> bool:
    """Inside the breast as both the CC and a 45° MLO projection see it.

    A compressed breast is no ball: a point only has to project inside the outline of
    each view (two elliptic cylinders), which lets arteries run the whole breast length.
    """
    s = (w + v) * math.sqrt(0.5)
    return u * u + v * v < margin * margin and u * u + s * s < margin * margin and abs(w) < 1.0


def _walk(
    start: NDArray[np.float64],
    direction: NDArray[np.float64],
    target: NDArray[np.float64],
    patient: PatientAnatomy,
    rng: np.random.Generator,
    *,
    max_steps: int,
    u_end: float,
) -> NDArray[np.float64]:
    """A smooth random walk with momentum toward ``target`` inside the breast.

    Plain floats, not numpy 3-vectors: a study walks thousands of short steps.
    """
    step = 0.008
    tort = patient.tortuosity
    # Smooth (AR(1)) curvature: older arteries wander and coil more.
    kicks = rng.normal(0.0, (0.35 + 1.2 * tort) * 0.15, (max_steps, 3)).tolist()
    px, py, pz = (float(c) for c in start)
    tx, ty, tz = (float(c) for c in target)
    dx, dy, dz = (float(c) for c in direction)
    n = math.sqrt(dx * dx + dy * dy + dz * dz) or 1.0
    dx, dy, dz = dx / n, dy / n, dz / n
    cx = cy = cz = 0.0
    pts = [(px, py, pz)]
    for kx, ky, kz in kicks:
        ax, ay, az = tx - px, ty - py, tz - pz
        n = math.sqrt(ax * ax + ay * ay + az * az) or 1e-9
        cx, cy, cz = 0.85 * cx + kx, 0.85 * cy + ky, 0.85 * cz + kz
        dx += 0.06 * (ax / n - dx) + 0.12 * cx
        dy += 0.06 * (ay / n - dy) + 0.12 * cy
        dz += 0.06 * (az / n - dz) + 0.12 * cz
        n = math.sqrt(dx * dx + dy * dy + dz * dz) or 1.0
        dx, dy, dz = dx / n, dy / n, dz / n
        px, py, pz = px + step * dx, py + step * dy, pz + step * dz
        if px < 0.0 or px > u_end or not _inside_both_views(px, py, pz):
            break
        pts.append((px, py, pz))
    return np.array(pts, dtype=np.float64)


def _calcify(
    arc: NDArray[np.float64], severity: float, rng: np.random.Generator
) -> tuple[NDArray[np.bool_], NDArray[np.int8], NDArray[np.float32], NDArray[np.int8]]:
    """On/off calcification runs along an artery, each with a pattern and density."""
    n = len(arc)
    calcified = np.zeros(n, dtype=bool)
    pattern = np.zeros(n, dtype=np.int8)
    density = np.zeros(n, dtype=np.float32)
    side = np.ones(n, dtype=np.int8)
    low = np.array([0.20, 0.20, 0.05, 0.25, 0.30])
    high = np.array([0.35, 0.20, 0.25, 0.10, 0.10])
    probs = (1 - severity) * low + severity * high
    probs /= probs.sum()
    mean_on = 3.0 + 25.0 * severity
    mean_off = 2.0 + 14.0 * (1.0 - severity)
    on = bool(rng.random() < 0.5 + 0.4 * severity)
    pos = float(rng.uniform(0, mean_off))
    end = float(arc[-1]) if n else 0.0
    while pos < end:
        length = float(rng.exponential(mean_on if on else mean_off)) + 0.5
        sel = (arc >= pos) & (arc < pos + length)
        if on:
            calcified[sel] = True
            pattern[sel] = int(rng.choice(len(probs), p=probs))
            density[sel] = rng.uniform(0.45, 1.0)
            side[sel] = 1 if rng.random() < 0.5 else -1
        pos += length
        on = not on
    return calcified, pattern, density, side


def grow_arteries(
    patient: PatientAnatomy,
    severity: float,
    rng: np.random.Generator,
    *,
    trunks: int,
) -> list[Artery]:
    """``trunks`` arteries with their branches, each already carrying calcification runs.

    Runs are drawn for every artery; the side renderer decides how many arteries (and
    how much of the last one) are actually calcified to meet a burden target.
    """
    arteries: list[Artery] = []
    for _ in range(trunks):
        if rng.random() < 0.35:
            # Lateral thoracic artery: enters from the lateral side.
            start = np.array([rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.75), rng.normal(0, 0.2)])
        else:
            start = np.array(
                [rng.uniform(0.0, 0.06), rng.uniform(-0.75, 0.75), rng.uniform(-0.8, 0.8)]
            )
        target = np.array([1.0, rng.normal(0, 0.2), rng.normal(0, 0.2)])
        direction = target - start + rng.normal(0, 0.3, 3)
        direction[0] = abs(direction[0]) + 0.2
        trunk = _walk(
            start, direction, target, patient, rng, max_steps=220, u_end=rng.uniform(0.8, 0.97)
        )
        if len(trunk) < 6:
            continue
        r0 = rng.uniform(0.35, 0.6) + 0.25 * severity
        arteries.append(_artery(trunk, r0, patient, severity, rng))
        for _ in range(int(rng.poisson(0.8 + 1.5 * severity))):
            i = int(rng.integers(len(trunk) // 5, max(len(trunk) // 5 + 1, 4 * len(trunk) // 5)))
            base = trunk[i]
            d = trunk[min(i + 1, len(trunk) - 1)] - trunk[max(i - 1, 0)]
            d = d / max(1e-9, float(np.linalg.norm(d))) + rng.normal(0, 0.7, 3)
            d[0] = abs(d[0])
            btarget = np.array([1.0, base[1] + rng.normal(0, 0.4), base[2] + rng.normal(0, 0.4)])
            branch = _walk(base, d, btarget, patient, rng, max_steps=120, u_end=0.95)
            if len(branch) >= 6:
                frac = 1.0 - 0.45 * i / len(trunk)
                arteries.append(_artery(branch, r0 * frac * 0.75, patient, severity, rng))
    return arteries


def _artery(
    points: NDArray[np.float64],
    r0: float,
    patient: PatientAnatomy,
    severity: float,
    rng: np.random.Generator,
) -> Artery:
    phys = _physical(points, patient)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(phys, axis=0), axis=1))])
    radius = r0 * (1.0 - 0.45 * arc / max(arc[-1], 1e-6))
    calcified, pattern, density, side = _calcify(arc, severity, rng)
    wall = float(min(rng.uniform(0.08, 0.16) + 0.12 * severity, 0.6 * r0))
    return Artery(points, arc, radius, calcified, pattern, density, wall, side)


@dataclass
class Stamps:
    """Disks to splat, in full-resolution pixel coordinates."""

    cy: NDArray[np.float32]
    cx: NDArray[np.float32]
    radius: NDArray[np.float32]
    amplitude: NDArray[np.float32]
    arc_mm: NDArray[np.float32]
    """Position of each disk along its artery (to calcify only a prefix)."""

    @staticmethod
    def empty() -> Stamps:
        z = np.zeros(0, dtype=np.float32)
        return Stamps(z, z, z, z, z)

    def before(self, arc_mm: np.float32) -> Stamps:
        """The disks placed before ``arc_mm`` along the artery."""
        sel = self.arc_mm < arc_mm
        return Stamps(
            self.cy[sel], self.cx[sel], self.radius[sel], self.amplitude[sel], self.arc_mm[sel]
        )

    def __len__(self) -> int:
        return int(self.cy.size)


def _centreline_px(
    artery: Artery, geometry: ViewGeometry
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Artery centreline in view pixels resampled every 0.6 px, with source indices."""
    y_mm, x_mm = geometry.project(artery.points[:, 0], artery.points[:, 1], artery.points[:, 2])
    px = np.stack([y_mm, x_mm], axis=1) / geometry.spacing_mm
    samples, t = resample_polyline(px, 0.6)
    seg = np.linalg.norm(np.diff(px, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    idx = np.clip(np.searchsorted(s, t), 0, len(s) - 1)
    return samples, idx.astype(np.int64), t


def calcification_stamps(artery: Artery, geometry: ViewGeometry) -> Stamps:
    """The calcified wall pieces of ``artery`` as seen on one view."""
    if not artery.calcified.any():
        return Stamps.empty()
    samples, idx, t = _centreline_px(artery, geometry)
    normals = polyline_normals(samples)
    sp = geometry.spacing_mm
    on = artery.calcified[idx]
    pat = artery.pattern[idx]
    r_px = (artery.radius_mm[idx] / sp).astype(np.float32)
    dens = artery.density[idx]
    side = artery.side[idx].astype(np.float32)
    arc = artery.arc_mm[idx].astype(np.float32)
    wall_px = max(0.6, artery.wall_mm / sp)
    half_wall = wall_px / 2.0
    r_mm = artery.radius_mm[idx].astype(np.float32)
    # Attenuation of a calcified wall seen tangentially: chord 2*sqrt(2 r t).
    wall_amp = MU_CALCIUM * 2.0 * np.sqrt(2.0 * r_mm * artery.wall_mm) * dens
    parts: list[tuple[NDArray[np.floating], ...]] = []

    def add(
        sel: NDArray[np.bool_],
        offset: NDArray[np.floating] | float,
        radius: NDArray[np.floating] | float,
        amp: NDArray[np.floating],
    ) -> None:
        if not sel.any():
            return
        off = np.broadcast_to(np.asarray(offset, dtype=np.float32), sel.shape)[sel]
        rad = np.broadcast_to(np.asarray(radius, dtype=np.float32), sel.shape)[sel]
        cy = samples[sel, 0] + normals[sel, 0] * off
        cx = samples[sel, 1] + normals[sel, 1] * off
        parts.append((cy, cx, np.maximum(rad, 0.6), amp[sel], arc[sel]))

    wall_off = np.maximum(r_px - half_wall, 0.0)
    tram = on & (pat == CalcificationPattern.TRAM_TRACK)
    add(tram, wall_off, half_wall, wall_amp)
    add(tram, -wall_off, half_wall, wall_amp)
    partial = on & (pat == CalcificationPattern.PARTIAL)
    add(partial, wall_off * side, half_wall, wall_amp)
    pipe = on & (pat == CalcificationPattern.PIPE)
    add(pipe, 0.0, r_px, MU_CALCIUM * 1.2 * r_mm * dens)
    # Beads and dots sit at intervals along the vessel, not at every sample.
    spacing_px = np.maximum(1.6 * r_px, 2.0)
    phase = np.floor(t / spacing_px)
    first = np.concatenate([[True], phase[1:] != phase[:-1]])
    beaded = on & (pat == CalcificationPattern.BEADED) & first
    jitter = ((np.sin(t * 12.9898) * 43758.5453) % 1.0).astype(np.float32)
    add(beaded, (jitter - 0.5) * r_px * 0.6, r_px * (0.75 + 0.5 * jitter),
        MU_CALCIUM * 1.4 * r_mm * dens)  # fmt: skip
    punct_phase = np.floor(t / np.maximum(3.0 * r_px, 3.0))
    pfirst = np.concatenate([[True], punct_phase[1:] != punct_phase[:-1]])
    punct = on & (pat == CalcificationPattern.PUNCTATE) & pfirst
    add(punct, 0.0, np.maximum(0.45 * r_px, 0.6), MU_CALCIUM * 0.9 * r_mm * dens)
    if not parts:
        return Stamps.empty()
    cat = [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(5)]
    return Stamps(cat[0], cat[1], cat[2], cat[3], cat[4])


def calcified_lengths_mm(
    arteries: Sequence[tuple[Artery, float]],
    geometry: ViewGeometry,
    breast: NDArray[np.bool_],
) -> tuple[list[float], list[int]]:
    """True calcified length (mm) of each ``(artery, cut_mm)`` as one view sees it, and
    the vessel each belongs to in that view.

    The length of the artery's centreline projected into the view, over its calcified
    samples placed before arc ``cut_mm`` (the prefix the renderer committed) that lie
    inside the breast: the same samples as :func:`calcification_stamps` (0.6 px steps),
    so a punctate run counts its whole length, not its dots. Where two calcified
    vessels overlap in this projection (centrelines closer than the sum of their
    radii, e.g. a branch leaving its trunk, or a crossing), the overlap is counted once,
    for the artery drawn first: the image cannot show it twice. Arteries that overlap
    so are one vessel of the view (its second list: a vessel number per artery), as a
    branching or crossing vessel is one connected calcification on the image.
    """
    from scipy.spatial import cKDTree

    lengths: list[float] = []
    placed: list[NDArray[np.float32]] = []
    placed_radius: list[NDArray[np.float32]] = []
    placed_owner: list[NDArray[np.int64]] = []
    parent = list(range(len(arteries)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for number, (artery, cut_mm) in enumerate(arteries):
        if not artery.calcified.any():
            lengths.append(0.0)
            continue
        samples, idx, _ = _centreline_px(artery, geometry)
        on = artery.calcified[idx] & (artery.arc_mm[idx].astype(np.float32) < np.float32(cut_mm))
        inside = (
            (samples[:, 0] >= 0) & (samples[:, 0] < breast.shape[0])
            & (samples[:, 1] >= 0) & (samples[:, 1] < breast.shape[1])
        )  # fmt: skip
        rows = np.clip(samples[:, 0].astype(np.int64), 0, breast.shape[0] - 1)
        cols = np.clip(samples[:, 1].astype(np.int64), 0, breast.shape[1] - 1)
        on &= inside & breast[rows, cols]
        radius = np.maximum(artery.radius_mm[idx] / geometry.spacing_mm, 0.6).astype(np.float32)
        if placed and on.any():
            others = np.concatenate(placed)
            others_radius = np.concatenate(placed_radius)
            owner = np.concatenate(placed_owner)
            tree = cKDTree(others)
            reach = float(others_radius.max())
            for i in np.nonzero(on)[0]:
                near = np.asarray(
                    tree.query_ball_point(samples[i], float(radius[i]) + reach), np.int64
                )
                if near.size == 0:
                    continue
                touching = near[
                    np.linalg.norm(others[near] - samples[i], axis=1)
                    < radius[i] + others_radius[near]
                ]
                if touching.size:
                    on[i] = False
                    for other in np.unique(owner[touching]):
                        parent[find(int(other))] = find(number)
        both = on[1:] & on[:-1]
        steps = np.linalg.norm(np.diff(samples, axis=0), axis=1)
        lengths.append(float(steps[both].sum() * geometry.spacing_mm))
        placed.append(samples[on])
        placed_radius.append(radius[on])
        placed_owner.append(np.full(int(on.sum()), number, np.int64))
    return lengths, [find(k) for k in range(len(arteries))]


def vessel_tube_stamps(
    points: NDArray[np.float64], radius_mm: NDArray[np.float64], geometry: ViewGeometry
) -> Stamps:
    """Disks (amplitude 1) along a vessel in full-resolution pixels: its tube."""
    y_mm, x_mm = geometry.project(points[:, 0], points[:, 1], points[:, 2])
    px = np.stack([y_mm, x_mm], axis=1) / geometry.spacing_mm
    r_px_mean = max(0.6, float(np.mean(radius_mm)) / geometry.spacing_mm)
    samples, t = resample_polyline(px, max(0.6, r_px_mean / 2.0))
    seg = np.linalg.norm(np.diff(px, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    idx = np.clip(np.searchsorted(s, t), 0, len(s) - 1)
    r_px = np.maximum(radius_mm[idx] / geometry.spacing_mm, 0.6).astype(np.float32)
    return Stamps(samples[:, 0], samples[:, 1], r_px, np.ones_like(r_px), t.astype(np.float32))


def grow_veins(patient: PatientAnatomy, rng: np.random.Generator, count: int) -> list[Artery]:
    """Larger, straighter, never calcified veins (they share the Artery container)."""
    veins: list[Artery] = []
    for _ in range(count):
        r, a = 0.7 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        start = np.array([rng.uniform(0.0, 0.1), r * math.cos(a), r * math.sin(a)])
        target = np.array([1.0, rng.normal(0, 0.35), rng.normal(0, 0.35)])
        pts = _walk(start, target - start, target, patient, rng, max_steps=160, u_end=0.85)
        if len(pts) < 6:
            continue
        phys = _physical(pts, patient)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(phys, axis=0), axis=1))])
        radius = rng.uniform(0.9, 1.8) * (1.0 - 0.4 * arc / max(arc[-1], 1e-6))
        n = len(pts)
        veins.append(
            Artery(
                pts,
                arc,
                radius,
                np.zeros(n, bool),
                np.zeros(n, np.int8),
                np.zeros(n, np.float32),
                0.0,
                np.ones(n, np.int8),
            )
        )
    return veins
