"""Tiled inference: BAC probabilities for a canvas of any size, without seams.

A bilateral canvas at 0.2 mm is about 1500 × 2400 px, too large to run whole on a CPU
within the memory budget, so :class:`UNetPredictor` cuts it into overlapping tiles, runs
them in batches and blends their probabilities with a weighted average. Nothing is ever
overwritten (the published code overwrote overlaps, which leaves seams).

How the tiles are laid out:

* The canvas is padded with zeros at its bottom and right to a multiple of the
  network's output stride (32 for depth 5), exactly as :meth:`UNetPredictor.predict_whole`
  pads it. Zero is the canvas background (air after the display transform), so the
  padding only extends what surrounds every breast; it is cropped off the output.
* Tiles start every ``tile_size - tile_overlap`` pixels; the last tile in each
  direction ends flush with the padded edge. A side shorter than a tile is one tile of
  that side's padded length, so a small canvas is run whole.
* Each tile's weight is separable: a raised-cosine ramp over ``tile_overlap`` pixels on
  each side that faces another tile, flat 1 elsewhere and on sides at the canvas edge,
  so edge pixels get full weight. The ramp starts just above zero, so every pixel has a
  positive total weight and the blend is a true weighted average (a constant output
  stays exactly constant; see the tests).

The forward pass is torch's here; :class:`bac_node.model.onnx_backend.OnnxPredictor`
runs the same tiles in ONNX Runtime (1.5× faster on 2 idle cores, and far steadier on
busy ones: README "Performance"). :func:`make_predictor` picks one by the ``backend``
setting; ``auto`` (the default) is ONNX Runtime on the CPU, torch on CUDA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from bac_node.model.factory import resolve_device
from bac_node.model.weights import ModelCard


class Predictor(Protocol):
    """Anything that turns a canvas into BAC probabilities.

    ``canvas`` is a 2D float32 image in [0, 1] (rows, columns) laid out and resampled as
    the model card says; the result is float32 probabilities of the same shape.
    """

    def __call__(self, canvas: NDArray[np.float32]) -> NDArray[np.float32]: ...


def tile_starts(extent: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``extent`` pixels.

    Offsets step by ``stride``; the last tile ends flush with ``extent``. One tile at 0
    when ``extent <= tile``.
    """
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be positive")
    if extent <= tile:
        return [0]
    return [*range(0, extent - tile, stride), extent - tile]


def blend_window(
    length: int, overlap: int, *, taper_start: bool, taper_end: bool
) -> NDArray[np.float64]:
    """The 1D blending weights of a tile of ``length`` pixels.

    A raised-cosine ramp ``0.5 - 0.5 cos(pi (k + 0.5) / overlap)`` over the first and
    last ``overlap`` pixels on each tapered side (strictly positive, reaching ~1), 1
    elsewhere. Where both ramps overlap (``overlap > length / 2``) the smaller applies.
    """
    window = np.ones(length, dtype=np.float64)
    ramp_len = min(overlap, length)
    if ramp_len > 0:
        k = np.arange(ramp_len, dtype=np.float64)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (k + 0.5) / overlap)
        if taper_start:
            window[:ramp_len] = np.minimum(window[:ramp_len], ramp)
        if taper_end:
            window[length - ramp_len :] = np.minimum(window[length - ramp_len :], ramp[::-1])
    return window


class UNetPredictor:
    """Tiled, batched, blended inference of a segmentation network.

    ``model`` is any module mapping ``(N, 1, H, W)`` float tensors to ``(N, 1, H, W)``
    logits for ``H``, ``W`` multiples of ``card.architecture.output_stride``; it is moved
    to ``device`` and put in eval mode. ``device`` is ``"auto"`` (CUDA when available),
    ``"cpu"`` or ``"cuda"``; on CUDA the forward pass runs under fp16 autocast. ``threads``
    sets torch's CPU threads for the whole process (``torch.set_num_threads``); ``None``
    leaves them. ``tile_size`` and ``tile_overlap`` override the card's.

    Tiled output matches :meth:`predict_whole` only approximately, because a network sees
    zero padding at a tile's edge where the whole image has neighbours; the ramp makes
    those pixels count little. Measured max |tiled - whole| in probability (tests): a
    3×3 conv, 64 px tiles / 32 overlap: 9.4e-4; untrained U-Nets with logits scaled so
    probabilities span 0.12-0.99: 0.034 (depth 3, 64/32) and 0.011 (default
    architecture, 128/64), mean 0.0035 and 0.0005. A larger overlap lowers it.

    On CPU a 1500 × 2400 canvas (a bilateral pair at 0.2 mm) with the default card takes
    about 20 s on 2 shared cores, peak RSS about 1.4 GiB.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        device: str | torch.device = "auto",
        batch_size: int = 4,
        threads: int | None = None,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> None:
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads must be a positive integer or None, not {threads!r}")
        self.card = card
        self.tile_size = card.tile_size if tile_size is None else tile_size
        self.tile_overlap = card.tile_overlap if tile_overlap is None else tile_overlap
        self.multiple = card.architecture.output_stride
        if self.tile_size <= 0 or self.tile_size % self.multiple:
            raise ValueError(
                f"tile_size must be a positive multiple of {self.multiple}, not {self.tile_size}"
            )
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(
                f"tile_overlap must be from 0 to {self.tile_size - 1}, not {self.tile_overlap}"
            )
        self.batch_size = batch_size
        self.device = resolve_device(device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.to(self.device).eval()

    @property
    def threshold(self) -> float:
        """The card's probability threshold for the BAC mask."""
        return self.card.threshold

    def __call__(self, canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        """BAC probabilities of ``canvas`` by blended tiles (float32, same shape)."""
        image = _check_canvas(canvas)
        rows, cols = image.shape
        padded = self._pad(image)
        prows, pcols = padded.shape
        tile_h, tile_w = min(self.tile_size, prows), min(self.tile_size, pcols)
        stride = self.tile_size - self.tile_overlap
        row_starts = tile_starts(prows, tile_h, stride)
        col_starts = tile_starts(pcols, tile_w, stride)
        row_windows = {
            r: blend_window(
                tile_h, self.tile_overlap, taper_start=r > 0, taper_end=r + tile_h < prows
            )
            for r in row_starts
        }
        col_windows = {
            c: blend_window(
                tile_w, self.tile_overlap, taper_start=c > 0, taper_end=c + tile_w < pcols
            )
            for c in col_starts
        }
        # float64 sums: a weighted average of equal values then rounds back to exactly
        # that value, so a constant output stays bit-for-bit constant across tiles.
        total = np.zeros(padded.shape, dtype=np.float64)
        weight = np.zeros(padded.shape, dtype=np.float64)
        tiles = [(r, c) for r in row_starts for c in col_starts]
        for batch in _batches(tiles, self.batch_size):
            stack = np.stack([padded[r : r + tile_h, c : c + tile_w] for r, c in batch])
            probs = self._forward(stack)
            for (r, c), prob in zip(batch, probs, strict=True):
                w = np.outer(row_windows[r], col_windows[c])
                total[r : r + tile_h, c : c + tile_w] += w * prob
                weight[r : r + tile_h, c : c + tile_w] += w
        out: NDArray[np.float32] = (total[:rows, :cols] / weight[:rows, :cols]).astype(np.float32)
        return out

    def predict_whole(self, canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        """BAC probabilities of ``canvas`` in one pass over the whole padded image.

        For comparison with tiling; a full-resolution canvas needs several GiB on CPU.
        """
        image = _check_canvas(canvas)
        probs = self._forward(self._pad(image)[np.newaxis])
        out: NDArray[np.float32] = probs[0, : image.shape[0], : image.shape[1]].copy()
        return out

    def _pad(self, image: NDArray[np.float32]) -> NDArray[np.float32]:
        rows, cols = image.shape
        m = self.multiple
        padded = np.zeros((math.ceil(rows / m) * m, math.ceil(cols / m) * m), dtype=np.float32)
        padded[:rows, :cols] = image
        return padded

    def _forward(self, stack: NDArray[np.float32]) -> NDArray[np.float32]:
        """Probabilities of a ``(N, H, W)`` stack of tiles."""
        x = torch.from_numpy(np.ascontiguousarray(stack)).unsqueeze(1).to(self.device)
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = self.model(x)
        if logits.shape != x.shape:
            raise ValueError(
                f"the model must map (N, 1, H, W) to (N, 1, H, W) logits; "
                f"it mapped {tuple(x.shape)} to {tuple(logits.shape)}"
            )
        probs: NDArray[np.float32] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        return probs


def _check_canvas(canvas: NDArray[np.float32]) -> NDArray[np.float32]:
    image = np.asarray(canvas, dtype=np.float32)
    if image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"canvas must be a non-empty 2D image, not of shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("canvas holds NaN or infinite values")
    return image


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: The inference backends the ``backend`` setting names (see :func:`make_predictor`).
BACKENDS = ("torch", "onnx", "auto")


def make_predictor(
    model: torch.nn.Module, card: ModelCard, device: str = "auto", backend: str = "torch"
) -> UNetPredictor:
    """The predictor of ``model`` on ``device`` with ``backend``.

    ``torch`` runs the network in torch; ``onnx`` in ONNX Runtime on the CPU
    (:mod:`bac_node.model.onnx_backend`); ``auto`` is ONNX Runtime when ``device``
    resolves to the CPU and onnxruntime is installed, else torch.
    """
    from bac_node.errors import ModelError

    if backend not in BACKENDS:
        raise ModelError(f"backend must be {', '.join(BACKENDS)}, not {backend!r}")
    on_cpu = resolve_device(device).type == "cpu"
    if backend == "onnx" and not on_cpu:
        raise ModelError(
            f"backend onnx runs on the CPU only, not on device {device!r}; "
            "set device = cpu, or backend = torch or auto"
        )
    if backend in ("onnx", "auto") and on_cpu:
        from bac_node.model.onnx_backend import OnnxPredictor, onnx_available

        if backend == "onnx" or onnx_available():
            return OnnxPredictor(model, card)
    return UNetPredictor(model, card, device=device)


def load_predictor(
    path: str | None = None, device: str = "auto", backend: str = "torch"
) -> tuple[UNetPredictor, ModelCard, bool]:
    """The model to analyse with: ``path``, else the weights shipped in the package, else
    (while none ship) the fixed-seed untrained stand-in. The flag says it is untrained:
    its results mean nothing, and callers must say so. ``backend`` as in
    :func:`make_predictor`.
    """
    from bac_node.errors import ModelError
    from bac_node.model.weights import default_model_path, load_model, untrained_model

    if path is not None:
        model, card = load_model(path, device="cpu")
        return make_predictor(model, card, device, backend), card, False
    try:
        model, card = load_model(default_model_path(), device="cpu")
        return make_predictor(model, card, device, backend), card, False
    except ModelError:
        model, card = untrained_model()
        return make_predictor(model, card, device, backend), card, True
