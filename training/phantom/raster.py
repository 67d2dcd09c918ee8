"""Fast rasterisation primitives for the phantom: soft disks, polylines, noise, resizing.

Everything works on float32 images and is vectorised over primitives, because a
full-resolution mammogram has up to ~30 M pixels and a study must render in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import fft as sp_fft

FloatArray = NDArray[np.float32]

# Splatting more than this many window pixels at once is done in chunks (memory bound).
_SPLAT_CHUNK_VALUES = 4_000_000


def splat_disks(
    image: FloatArray,
    cy: NDArray[np.floating],
    cx: NDArray[np.floating],
    radius: NDArray[np.floating] | float,
    amplitude: NDArray[np.floating] | float = 1.0,
    *,
    hard: bool = False,
) -> None:
    """Composite anti-aliased disks into ``image`` in place with ``max``.

    Disk ``i`` is centred at sub-pixel ``(cy[i], cx[i])`` with radius ``radius[i]``
    pixels. Its value is ``amplitude[i]`` times the pixel's approximate coverage (1
    inside ``r - 0.5``, falling linearly to 0 at ``r + 0.5``), so a coverage of 0.5
    marks the disk's true edge and thresholding at half the amplitude recovers it.
    With ``hard``, a pixel gets the full amplitude where its coverage is at least 0.5
    and nothing elsewhere (the disk's mask, carrying a value).
    """
    cy = np.asarray(cy, dtype=np.float32).ravel()
    cx = np.asarray(cx, dtype=np.float32).ravel()
    n = cy.size
    if n == 0:
        return
    r = np.broadcast_to(np.asarray(radius, dtype=np.float32), (n,))
    a = np.broadcast_to(np.asarray(amplitude, dtype=np.float32), (n,))
    rows, cols = image.shape
    flat = image.reshape(-1)
    # Group by window size so that small stamps do not pay for the largest one.
    half = np.ceil(r + 1.0).astype(np.int32)
    for h in np.unique(half):
        sel = np.nonzero(half == h)[0]
        k = 2 * int(h) + 1
        chunk = max(1, _SPLAT_CHUNK_VALUES // (k * k))
        offs = np.arange(-int(h), int(h) + 1, dtype=np.int32)
        for start in range(0, sel.size, chunk):
            idx = sel[start : start + chunk]
            iy = np.floor(cy[idx]).astype(np.int32)
            ix = np.floor(cx[idx]).astype(np.int32)
            py = iy[:, None, None] + offs[None, :, None]
            px = ix[:, None, None] + offs[None, None, :]
            dy = py.astype(np.float32) + 0.5 - cy[idx][:, None, None]
            dx = px.astype(np.float32) + 0.5 - cx[idx][:, None, None]
            dist = np.sqrt(dy * dy + dx * dx)
            cov = np.clip(r[idx][:, None, None] + 0.5 - dist, 0.0, 1.0)
            if hard:
                val = np.where(cov >= 0.5, a[idx][:, None, None], np.float32(0.0))
            else:
                val = cov * a[idx][:, None, None]
            ok = (py >= 0) & (py < rows) & (px >= 0) & (px < cols) & (val > 0)
            lin = (py * cols + px)[ok]
            np.maximum.at(flat, lin, val[ok])


def resample_polyline(
    points: NDArray[np.floating], step: float
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Points every ``step`` units along a polyline, and their arc length.

    ``points`` is (n, 2). Returns ``(samples (m, 2), arc_length (m,))``.
    """
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        return pts.astype(np.float32), np.zeros(len(pts), dtype=np.float32)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = float(s[-1])
    m = max(2, math.ceil(total / step) + 1)
    t = np.linspace(0.0, total, m)
    y = np.interp(t, s, pts[:, 0])
    x = np.interp(t, s, pts[:, 1])
    return np.stack([y, x], axis=1).astype(np.float32), t.astype(np.float32)


def polyline_normals(samples: NDArray[np.floating]) -> NDArray[np.float32]:
    """Unit normals (n, 2) of a sampled polyline (central differences)."""
    d = np.gradient(np.asarray(samples, dtype=np.float64), axis=0)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    d /= norm
    return np.stack([-d[:, 1], d[:, 0]], axis=1).astype(np.float32)


def power_law_noise(
    shape: tuple[int, int], beta: float, rng: np.random.Generator, *, min_period: float = 2.0
) -> FloatArray:
    """Zero-mean, unit-variance noise whose power spectrum falls as ``1/f**beta``.

    Mammographic parenchyma measures beta ≈ 2.5-3.5; ``min_period`` (pixels) cuts the
    highest frequencies so that the texture is smooth at the grid's own scale.
    """
    rows, cols = shape
    white = rng.standard_normal((rows, cols), dtype=np.float32)
    spec = sp_fft.rfft2(white, workers=-1)
    fy = sp_fft.fftfreq(rows).astype(np.float32)[:, None]
    fx = sp_fft.rfftfreq(cols).astype(np.float32)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    filt = f ** (-beta / 2.0)
    filt[0, 0] = 0.0
    filt *= np.exp(-((f * min_period) ** 2))
    field = sp_fft.irfft2(spec * filt, s=(rows, cols), workers=-1).astype(np.float32)
    field -= field.mean()
    std = float(field.std())
    if std > 0:
        field /= std
    return np.asarray(field, dtype=np.float32)


def resize(image: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Bilinear resize of one or more float32 images, (rows, cols) or (c, rows, cols)."""
    if image.shape[-2:] == shape:
        return image
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    out = torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)
    res = out[0, 0] if squeeze else out[0]
    return res.numpy()


def gaussian_blur(image: FloatArray, sigma: float) -> FloatArray:
    """Separable Gaussian blur (reflect edges), via torch for speed on large images."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    k /= k.sum()
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    t = torch.nn.functional.pad(t, (radius, radius, radius, radius), mode="replicate")
    t = torch.nn.functional.conv2d(t, k.view(1, 1, 1, -1))
    t = torch.nn.functional.conv2d(t, k.view(1, 1, -1, 1))
    return t[0, 0].numpy()
