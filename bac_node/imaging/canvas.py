"""The bilateral canvas the model sees, and its exact way back to each source image.

Layout: the right breast's image in the left half, the left breast's in the right
half, both resampled to the model's pixel spacing and oriented the same way (chest
wall on the left of each half), top-aligned, zero-padded. A breast without its pair
keeps its half and the other half stays empty, so the model always sees one layout.

Mapping back: a half is cropped to its image's resampled size, resized bilinearly to
the source's own rows and columns and un-flipped. When the model spacing equals the
source spacing the resize is the identity, and the round trip is exact to the pixel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from bac_node.imaging.breast import ChestWallSide

#: Resampled sizes are rounded up to a multiple of this (the U-Net's stride).
CANVAS_MULTIPLE = 32


@dataclass(frozen=True)
class SourceGeometry:
    """What the canvas needs to know of one source image."""

    key: str
    """The image's identity in the canvas (its SOP Instance UID)."""
    laterality: str
    shape: tuple[int, int]
    spacing_mm: tuple[float, float]
    chest_wall: ChestWallSide


@dataclass(frozen=True)
class Placement:
    """Where a source image lies on the canvas."""

    source: SourceGeometry
    col0: int
    rows: int
    cols: int
    flipped: bool
    """Mirrored left-right so that its chest wall is on the left."""


@dataclass(frozen=True)
class CanvasLayout:
    spacing_mm: float
    shape: tuple[int, int]
    placements: tuple[Placement, ...]

    def render(self, images: Mapping[str, NDArray[np.floating]]) -> NDArray[np.float32]:
        """Put each source-geometry image (by key) on the canvas; the rest is zero."""
        canvas = np.zeros(self.shape, dtype=np.float32)
        for p in self.placements:
            image = np.asarray(images[p.source.key], dtype=np.float32)
            if image.shape != p.source.shape:
                raise ValueError(
                    f"{p.source.key}: image shape {image.shape} is not the source's "
                    f"{p.source.shape}"
                )
            if p.flipped:
                image = image[:, ::-1]
            canvas[: p.rows, p.col0 : p.col0 + p.cols] = _resize(image, (p.rows, p.cols))
        return canvas

    def to_source(self, canvas: NDArray[np.floating]) -> dict[str, NDArray[np.float32]]:
        """Each image's part of a canvas-shaped map, in the source's rows and columns."""
        if canvas.shape != self.shape:
            raise ValueError(f"canvas shape {canvas.shape} is not the layout's {self.shape}")
        out: dict[str, NDArray[np.float32]] = {}
        for p in self.placements:
            part = np.asarray(canvas[: p.rows, p.col0 : p.col0 + p.cols], dtype=np.float32)
            back = _resize(part, p.source.shape)
            out[p.source.key] = np.ascontiguousarray(back[:, ::-1] if p.flipped else back)
        return out


def _resampled_shape(source: SourceGeometry, spacing_mm: float) -> tuple[int, int]:
    rows = max(1, round(source.shape[0] * source.spacing_mm[0] / spacing_mm))
    cols = max(1, round(source.shape[1] * source.spacing_mm[1] / spacing_mm))
    return rows, cols


def _round_up(n: int) -> int:
    return -(-n // CANVAS_MULTIPLE) * CANVAS_MULTIPLE


def bilateral_layout(
    right: SourceGeometry | None, left: SourceGeometry | None, spacing_mm: float
) -> CanvasLayout:
    """The canvas for a pair (either side may be missing, not both)."""
    if right is None and left is None:
        raise ValueError("a bilateral canvas needs at least one image")
    sizes = {
        side: _resampled_shape(src, spacing_mm)
        for side, src in (("R", right), ("L", left))
        if src is not None
    }
    half_rows = _round_up(max(r for r, _ in sizes.values()))
    half_cols = _round_up(max(c for _, c in sizes.values()))
    placements = []
    for index, (side, src) in enumerate((("R", right), ("L", left))):
        if src is None:
            continue
        rows, cols = sizes[side]
        placements.append(
            Placement(src, index * half_cols, rows, cols, flipped=src.chest_wall == "right")
        )
    return CanvasLayout(spacing_mm, (half_rows, 2 * half_cols), tuple(placements))


def single_layouts(sources: Sequence[SourceGeometry], spacing_mm: float) -> list[CanvasLayout]:
    """One canvas per unpaired image, in its own side's half."""
    return [
        bilateral_layout(
            s if s.laterality == "R" else None, s if s.laterality == "L" else None, spacing_mm
        )
        for s in sources
    ]


def _resize(image: NDArray[np.floating], shape: tuple[int, int]) -> NDArray[np.float32]:
    """Bilinear resize (area-aware when shrinking) that is the identity on equal shapes."""
    if tuple(image.shape) == shape:
        return np.array(image, dtype=np.float32, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    out = torch.nn.functional.interpolate(
        t, size=shape, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return out[0, 0].numpy()
