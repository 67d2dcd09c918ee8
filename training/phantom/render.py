"""Render both screening views (CC and MLO) of one breast with an exact BAC burden.

Smooth anatomy is rendered on a coarse grid (0.2 mm or the pixel spacing, whichever is
coarser) and resized; everything fine (arterial calcification, microcalcifications,
clips, labels) is drawn at full resolution. The BAC of a breast is placed in 3D and
seen on both views; arteries are calcified one by one, the last one only partly, until
the breast's BAC area (both views together) meets its target percentage.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from bac_node.imaging.vessels import MIN_VESSEL_MM
from training.phantom.anatomy import (
    PatientAnatomy,
    ViewGeometry,
    render_tissue,
    sample_view_geometry,
)
from training.phantom.distractors import (
    CalcificationDistractors,
    add_labels,
    add_lymph_nodes,
    add_paddle_edge,
    skin_calcifications,
)
from training.phantom.raster import FloatArray, gaussian_blur, resize, splat_disks
from training.phantom.types import VIEWS, Laterality, PhantomView, ViewName
from training.phantom.vessels import (
    Artery,
    Stamps,
    calcification_stamps,
    calcified_lengths_mm,
    grow_arteries,
    grow_veins,
    severity_from_percent,
    vessel_tube_stamps,
)

#: Anatomy is rendered at this grid (mm) or the pixel spacing, whichever is coarser.
ANATOMY_GRID_MM = 0.2
#: Most arteries a breast may get while its BAC target is being met.
MAX_ARTERIES = 80
#: Attenuation of the blood and wall of a non-calcified vessel relative to fat (1/mm).
_VESSEL_MU = 0.012


class _ViewCanvas:
    """Layers of one view while its side is being rendered.

    Smooth layers (tissue, vessel tubes) stay on the coarse anatomy grid until
    :meth:`finish`; the breast mask, the BAC coverage and the fine attenuation (BAC,
    calcifications, clips) live at full resolution.
    """

    def __init__(self, geometry: ViewGeometry, patient: PatientAnatomy, rng: np.random.Generator):
        self.geometry = geometry
        tissue = render_tissue(geometry, patient, max(ANATOMY_GRID_MM, geometry.spacing_mm), rng)
        self.grid_mm = tissue.grid_mm
        add_lymph_nodes(tissue.attenuation, geometry, tissue.breast_sdf_mm, self.grid_mm, rng)
        self.tissue = tissue
        shape = (geometry.rows, geometry.cols)
        self.coarse_vessels: FloatArray = np.zeros_like(tissue.attenuation)
        self.breast: NDArray[np.bool_] = resize(tissue.breast_sdf_mm, shape) > 0
        self.bac_cover: FloatArray = np.zeros(shape, dtype=np.float32)
        self.fine: FloatArray = np.zeros(shape, dtype=np.float32)
        """Attenuation of small things drawn at full resolution (max-composited)."""
        self.breast_pixels = int(np.count_nonzero(self.breast))
        self.calcified: list[tuple[Artery, float]] = []
        """Each artery whose calcification was drawn, and the arc (mm) it stops at."""

    def pectoral_mask(self) -> NDArray[np.bool_]:
        """The pectoral muscle at full resolution (evaluated only where it can be)."""
        g = self.geometry
        mask = np.zeros_like(self.breast)
        if g.pectoral_top_mm <= 0:
            return mask
        rows = min(g.rows, math.ceil(g.pectoral_side_mm / g.spacing_mm) + 2)
        width = min(g.cols, math.ceil(g.pectoral_top_mm / g.spacing_mm) + 2)
        cols = slice(g.cols - width, g.cols) if g.mirrored else slice(0, width)
        y = ((np.arange(rows) + 0.5) * g.spacing_mm)[:, None]
        x = ((np.arange(cols.start, cols.stop) + 0.5) * g.spacing_mm)[None, :]
        mask[:rows, cols] = g.inside_pectoral(y, x) & self.breast[:rows, cols]
        return mask

    def draw_tube(self, vessel: Artery, mu: float) -> None:
        """A non-calcified vessel: a faint tube on the coarse grid."""
        g = self.geometry
        stamps = vessel_tube_stamps(vessel.points, vessel.radius_mm, g)
        scale = g.spacing_mm / self.grid_mm
        radius = stamps.radius * scale
        # Chord through a round vessel: proportional to its diameter.
        amplitude = mu * 2.0 * stamps.radius * g.spacing_mm
        splat_disks(self.coarse_vessels, stamps.cy * scale, stamps.cx * scale, radius, amplitude)

    def _crop(self, stamps: Stamps) -> tuple[slice, slice] | None:
        if len(stamps) == 0:
            return None
        rows, cols = self.breast.shape
        pad = 2.0
        y0 = max(0, math.floor(float((stamps.cy - stamps.radius).min()) - pad))
        y1 = min(rows, math.ceil(float((stamps.cy + stamps.radius).max()) + pad))
        x0 = max(0, math.floor(float((stamps.cx - stamps.radius).min()) - pad))
        x1 = min(cols, math.ceil(float((stamps.cx + stamps.radius).max()) + pad))
        if y0 >= y1 or x0 >= x1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def bac_gain_by_arc(self, stamps: Stamps) -> NDArray[np.float32]:
        """Sorted arc positions (mm) at which ``stamps`` would first cover a new BAC pixel.

        ``len(result)`` is how many BAC pixels the whole artery adds to this view;
        ``searchsorted(result, L, "right")`` is how many its first ``L`` mm add.
        """
        box = self._crop(stamps)
        if box is None:
            return np.zeros(0, dtype=np.float32)
        ys, xs = box
        order = np.argsort(stamps.arc_mm, kind="stable")
        n = len(order)
        rank = np.empty(n, dtype=np.float32)
        rank[order] = np.arange(n, 0, -1, dtype=np.float32)  # exact integers in float32
        first = np.zeros((ys.stop - ys.start, xs.stop - xs.start), dtype=np.float32)
        # max of (n - rank) over covering disks picks the earliest disk covering a pixel.
        splat_disks(
            first, stamps.cy - ys.start, stamps.cx - xs.start, stamps.radius, rank, hard=True
        )
        new = (first > 0) & self.breast[ys, xs] & (self.bac_cover[ys, xs] < 0.5)
        earliest = n - first[new].astype(np.int64)
        return np.sort(stamps.arc_mm[order[earliest]])

    def commit_bac(
        self, stamps: Stamps, artery: Artery | None = None, cut_mm: float = math.inf
    ) -> None:
        """Draw ``stamps``; ``artery`` (calcified up to ``cut_mm``) joins the truth."""
        splat_disks(self.bac_cover, stamps.cy, stamps.cx, stamps.radius, 1.0)
        if artery is not None:
            self.calcified.append((artery, cut_mm))
        splat_disks(self.fine, stamps.cy, stamps.cx, stamps.radius, stamps.amplitude)

    def finish(
        self, laterality: Laterality, rng: np.random.Generator, distractor_rate: float = 1.0
    ) -> PhantomView:
        g = self.geometry
        # Round vessels: soften the flat-topped disks into a rounded profile.
        vessels = gaussian_blur(self.coarse_vessels, 0.35 / self.grid_mm)
        coarse = np.stack([self.tissue.attenuation + vessels, self.tissue.thickness])
        full = resize(coarse, (g.rows, g.cols))
        attenuation, thickness = full[0], full[1]
        np.clip(thickness, 0.0, 1.0, out=thickness)
        thickness *= self.breast
        attenuation += self.fine
        # Arteries that overlap in this projection are one vessel of the view; a vessel
        # is counted when it shows a length the node would count (imaging.vessels).
        lengths, vessel_of = calcified_lengths_mm(self.calcified, g, self.breast)
        shown: dict[int, float] = {}
        for vessel, length in zip(vessel_of, lengths, strict=True):
            shown[vessel] = shown.get(vessel, 0.0) + length
        attenuation *= self.breast
        add_labels(attenuation, self.breast, laterality, g.view, g.spacing_mm, rng)
        add_paddle_edge(attenuation, self.breast, g.spacing_mm, rng, rate=distractor_rate)
        return PhantomView(
            laterality=laterality,
            view=g.view,
            pixel_spacing_mm=g.spacing_mm,
            attenuation=attenuation,
            thickness=thickness,
            breast_mask=self.breast,
            bac_mask=(self.bac_cover >= 0.5) & self.breast,
            pectoral_mask=self.pectoral_mask(),
            compressed_thickness_mm=self.tissue.compressed_thickness_mm,
            true_bac_length_mm=float(sum(lengths)),
            true_vessel_count=sum(length >= MIN_VESSEL_MM for length in shown.values()),
        )


def render_side(
    patient: PatientAnatomy,
    laterality: Laterality,
    detector: tuple[int, int, float],
    bac_target_percent: float,
    rng: np.random.Generator,
    *,
    distractor_rate: float = 1.0,
) -> dict[ViewName, PhantomView]:
    """The CC and MLO views of one breast on a ``(rows, cols, spacing_mm)`` detector.

    The BAC area of the two views together, as a percentage of their breast area, is
    the largest value not above ``bac_target_percent`` that whole calcification
    pieces allow (it meets the target to within a few pixels).
    """
    rows, cols, spacing = detector
    canvases: dict[ViewName, _ViewCanvas] = {}
    for view in VIEWS:
        geometry = sample_view_geometry(
            view, patient, rows, cols, spacing, rng, mirrored=laterality == "R"
        )
        canvases[view] = _ViewCanvas(geometry, patient, rng)

    for vein in grow_veins(patient, rng, int(rng.integers(2, 6))):
        for c in canvases.values():
            c.draw_tube(vein, _VESSEL_MU * 2.2)

    need = bac_target_percent / 100.0 * sum(c.breast_pixels for c in canvases.values())
    severity = severity_from_percent(bac_target_percent)
    have = 0
    arteries: list[Artery] = []
    drawn = 0
    while drawn < MAX_ARTERIES:
        if drawn >= len(arteries):
            arteries += grow_arteries(patient, severity, rng, trunks=3)
            if drawn >= len(arteries):
                continue
        artery = arteries[drawn]
        drawn += 1
        for c in canvases.values():
            c.draw_tube(artery, _VESSEL_MU * 1.6)
        if have >= need or need <= 0:
            if drawn >= 6:
                break
            continue
        stamps = {v: calcification_stamps(artery, c.geometry) for v, c in canvases.items()}
        arcs = np.sort(np.concatenate([c.bac_gain_by_arc(stamps[v]) for v, c in canvases.items()]))
        room = int(need - have)
        cut = math.inf
        if len(arcs) > room:
            # Calcify only the longest prefix of this artery that stays within the target.
            cut_arc = arcs[max(room, 0)]
            stamps = {v: s.before(cut_arc) for v, s in stamps.items()}
            gain = int(np.searchsorted(arcs, cut_arc, side="left"))
            cut = float(cut_arc)
        else:
            gain = len(arcs)
        for v, c in canvases.items():
            # An artery that adds no BAC pixel (its prefix ends at once) is no vessel.
            c.commit_bac(stamps[v], artery if gain > 0 else None, cut)
        have += gain

    distractors = CalcificationDistractors(rng, rate=distractor_rate)
    views: dict[ViewName, PhantomView] = {}
    for view, canvas in canvases.items():
        others = distractors.stamps(canvas.geometry)
        splat_disks(canvas.fine, others.cy, others.cx, others.radius, others.amplitude)
        skin = skin_calcifications(canvas.tissue.breast_sdf_mm, canvas.grid_mm, spacing, rng)
        splat_disks(canvas.fine, skin.cy, skin.cx, skin.radius, skin.amplitude)
        views[view] = canvas.finish(laterality, rng, distractor_rate)
    return views
