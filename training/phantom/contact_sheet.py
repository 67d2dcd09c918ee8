"""A contact sheet of a study: the four views as a radiologist hangs them, with the
ground truth outlined (BAC in red, breast in cyan).

Hanging: right breast on the left of the screen, left on the right, chest walls back
to back; CC on the top row, MLO below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from bac_node.imaging.display import presentation_pixels
from training.phantom.study import load_mask

_HANGING = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))


def _outline(mask: NDArray[np.bool_], width: int) -> NDArray[np.bool_]:
    grown = ndimage.binary_dilation(mask, iterations=width)
    return np.asarray(grown & ~mask)


def _panel(
    image: NDArray[np.float32],
    bac: NDArray[np.bool_] | None,
    breast: NDArray[np.bool_] | None,
    height: int,
) -> Image.Image:
    rows, cols = image.shape
    width = max(1, round(cols * height / rows))
    gray = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.LANCZOS
    )
    rgb = np.stack([np.asarray(gray)] * 3, axis=-1).copy()
    for mask, colour, w in ((breast, (0, 200, 255), 1), (bac, (255, 40, 40), 1)):
        if mask is None:
            continue
        small = (
            np.asarray(
                Image.fromarray(mask.astype(np.uint8) * 255).resize(
                    (width, height), Image.Resampling.BOX
                )
            )
            > 60
        )
        rgb[_outline(small, w)] = colour
    return Image.fromarray(rgb)


def _crop_to_breasts(
    images: Mapping[tuple[str, str], NDArray[np.float32]],
    masks: Mapping[tuple[str, str], tuple[NDArray[np.bool_] | None, NDArray[np.bool_] | None]],
) -> tuple[
    dict[tuple[str, str], NDArray[np.float32]],
    dict[tuple[str, str], tuple[NDArray[np.bool_] | None, NDArray[np.bool_] | None]],
]:
    rows_of: dict[str, tuple[int, int]] = {}
    depth = 0
    for key, (_, breast) in masks.items():
        if breast is None or not breast.any():
            return dict(images), dict(masks)
        rows = np.nonzero(breast.any(axis=1))[0]
        cols = np.nonzero(breast.any(axis=0))[0]
        depth = max(depth, breast.shape[1] - cols[0] if key[0] == "R" else cols[-1] + 1)
        top, bottom = rows_of.get(key[1], (rows[0], rows[-1] + 1))
        rows_of[key[1]] = (min(top, rows[0]), max(bottom, rows[-1] + 1))
    out_images, out_masks = {}, {}
    for key, image in images.items():
        h, w = image.shape
        margin = int(0.06 * h)
        top, bottom = rows_of.get(key[1], (0, h))
        r0, r1 = max(0, top - margin), min(h, bottom + margin)
        d = min(w, depth + margin)
        keep = slice(w - d, w) if key[0] == "R" else slice(0, d)
        out_images[key] = image[r0:r1, keep]
        bac, breast = masks.get(key, (None, None))
        out_masks[key] = (
            None if bac is None else bac[r0:r1, keep],
            None if breast is None else breast[r0:r1, keep],
        )
    return out_images, out_masks


def contact_sheet(
    images: Mapping[tuple[str, str], NDArray[np.float32]],
    masks: Mapping[tuple[str, str], tuple[NDArray[np.bool_] | None, NDArray[np.bool_] | None]],
    title: str,
    *,
    panel_height: int = 700,
) -> Image.Image:
    """Hang four displayed views (``[0, 1]`` floats) with (bac, breast) outlines.

    The views are cropped alike (one scale for all) to the rows and the depth from
    the chest wall that hold any breast, plus a margin, as a reader zooms to fit.
    """
    images, masks = _crop_to_breasts(images, masks)
    panels = {}
    for key in _HANGING:
        if key in images:
            bac, breast = masks.get(key, (None, None))
            panels[key] = _panel(images[key], bac, breast, panel_height)
    widths = [p.width for p in panels.values()] or [panel_height]
    w = max(widths)
    header = 40
    font = ImageFont.load_default(size=20)
    w = max(w, int(font.getlength(title)) // 2 + 12)
    sheet = Image.new("RGB", (2 * w + 6, 2 * panel_height + 6 + header), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), title, fill=(230, 230, 230), font=font)
    for i, key in enumerate(_HANGING):
        if key not in panels:
            continue
        p = panels[key]
        row, col = divmod(i, 2)
        # Right breast panels are right-aligned so the chest walls meet in the middle.
        x = w - p.width if col == 0 else w + 6
        y = header + row * (panel_height + 6)
        sheet.paste(p, (x, y))
        draw.text((x + 8 if col == 1 else x + p.width - 80, y + panel_height - 30),
                  f"{key[0]}{key[1]}", fill=(255, 230, 0), font=font)  # fmt: skip
    return sheet


def study_contact_sheet(
    dataset_dir: Path, rows: Sequence[Mapping[str, Any]], out: Path, *, panel_height: int = 700
) -> Path:
    """Contact sheet of the For Presentation images in manifest ``rows`` of one study."""
    images: dict[tuple[str, str], NDArray[np.float32]] = {}
    masks: dict[tuple[str, str], tuple[NDArray[np.bool_] | None, NDArray[np.bool_] | None]] = {}
    study_grade = None
    vendor = ""
    for row in rows:
        key = (str(row["laterality"]), str(row["view"]))
        if key in images and row["presentation_intent"] != "FOR PRESENTATION":
            continue
        images[key] = presentation_pixels(pydicom.dcmread(dataset_dir / row["file"]))
        masks[key] = (
            load_mask(dataset_dir / row["bac_mask"]),
            load_mask(dataset_dir / row["breast_mask"]),
        )
        study_grade = row["study_grade"]
        vendor = str(row["vendor"])
    title = (
        f"Synthetic phantom ({vendor} style), BAC grade {study_grade}: "
        "ground truth BAC in red, breast in cyan. Not patient data."
    )
    sheet = contact_sheet(images, masks, title, panel_height=panel_height)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out
