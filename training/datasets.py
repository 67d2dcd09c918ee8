"""Training data: bilateral canvases built by the analysis's own code, cached, and the
two input regimes of the source study (whole canvas, and 512 px patches overlapping by
386 px), with intensity-only augmentation.

Input is a *labelled folder*: the output of ``bac-node synth``, or your own data in the
same layout — a ``manifest.csv`` (or ``manifest.json`` with an ``images`` list) with at
least the columns ``study``, ``file``, ``patient_id``, ``laterality``, ``view``,
``presentation_intent`` and ``bac_mask`` (a PNG mask in the image's own rows and
columns, nonzero = BAC); ``split`` (train/validation/test) and ``vendor`` are used when
present. Paths are relative to the folder. A study without ``split`` is assigned one by
a hash of its patient, so no patient is in two splits.

Canvases are made exactly as ``bac-node analyze`` makes them
(:func:`bac_node.analysis.prepare_canvas`), so the model trains on what it will see.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from bac_node.analysis import CanvasModel, prepare_canvas
from bac_node.dicom.reader import read_instance
from bac_node.errors import BacNodeError
from training.phantom.study import load_mask

REQUIRED_COLUMNS = (
    "study", "file", "patient_id", "laterality", "view", "presentation_intent", "bac_mask",
)  # fmt: skip
SPLIT_SHARES = (("train", 0.7), ("validation", 0.2), ("test", 0.1))


@dataclass(frozen=True)
class CanvasRecord:
    """One cached bilateral canvas (one study, one view)."""

    key: str
    path: str
    """The cached ``.npz`` (image float16, bac uint8, breast uint8), relative to the cache."""
    study: str
    view: str
    patient_id: str
    split: str
    vendor: str
    shape: tuple[int, int]
    bac_fraction: float
    grade: int = -1
    """The study's grade from the manifest (``study_grade``), -1 when absent."""


def read_labelled_rows(folder: Path) -> list[dict[str, Any]]:
    """Manifest rows of a labelled folder, checked for the required columns."""
    if (folder / "manifest.json").is_file():
        rows = list(json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["images"])
    elif (folder / "manifest.csv").is_file():
        with (folder / "manifest.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise BacNodeError(f"{folder}: no manifest.json or manifest.csv (see training/datasets.py)")
    for number, row in enumerate(rows, start=1):
        missing = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if missing:
            raise BacNodeError(f"{folder}: manifest row {number} lacks {', '.join(missing)}")
    return rows


def split_of_patient(patient_id: str) -> str:
    """A stable 70/20/10 split for a patient without one in the manifest."""
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, share in SPLIT_SHARES:
        edge += share
        if u < edge:
            return split
    return SPLIT_SHARES[-1][0]


def _grade(value: Any) -> int:
    return -1 if value is None or value == "" else int(value)


def _pick_intent(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # As the analysis does: For Presentation when a view has it, else For Processing.
    presentation = [r for r in rows if r["presentation_intent"] == "FOR PRESENTATION"]
    return presentation or rows


def build_canvas_cache(
    folder: Path, cache: Path, spacing_mm: float, *, progress: bool = False
) -> list[CanvasRecord]:
    """Canvases of every (study, view) of a labelled folder, cached under ``cache``.

    A canvas already cached (same study, view and spacing) is not made again. Returns
    the records in manifest order; writes ``cache/index.json``.
    """
    from tqdm import tqdm

    rows = read_labelled_rows(folder)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["study"]), str(row["view"])), []).append(row)
    cache.mkdir(parents=True, exist_ok=True)
    model = CanvasModel(input_spacing_mm=spacing_mm, threshold=0.5)
    records = []
    for (study, view), members in tqdm(
        groups.items(), desc="canvases", unit="canvas", disable=not progress or None
    ):
        members = _pick_intent(members)
        by_side = {str(r["laterality"]): r for r in members}
        key = f"{study}-{view}-{spacing_mm:.4f}"
        path = cache / f"{key}.npz"
        if not path.is_file():
            images = {s: read_instance(folder / str(r["file"])) for s, r in by_side.items()}
            layout, canvas, breasts, _ = prepare_canvas(images.get("R"), images.get("L"), model)
            truth = {
                images[s].sop_instance_uid: load_mask(folder / str(r["bac_mask"])).astype(
                    np.float32
                )
                for s, r in by_side.items()
            }
            breast = {
                images[s].sop_instance_uid: breasts[images[s].sop_instance_uid] for s in images
            }
            bac = layout.render(truth) >= 0.5
            breast_canvas = (
                layout.render({k: v.astype(np.float32) for k, v in breast.items()}) >= 0.5
            )
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(
                tmp, image=canvas.astype(np.float16), bac=bac.astype(np.uint8),
                breast=breast_canvas.astype(np.uint8),
            )  # fmt: skip
            tmp.replace(path)
        with np.load(path) as data:
            bac_canvas = data["bac"]
            shape = (int(bac_canvas.shape[0]), int(bac_canvas.shape[1]))
            fraction = float(bac_canvas.mean())
        first = members[0]
        patient = str(first["patient_id"])
        records.append(
            CanvasRecord(
                key=key,
                path=path.name,
                study=study,
                view=view,
                patient_id=patient,
                split=str(first.get("split") or split_of_patient(patient)),
                vendor=str(first.get("vendor") or "unknown"),
                shape=shape,
                bac_fraction=fraction,
                grade=_grade(first.get("study_grade")),
            )
        )
    index = {"spacing_mm": spacing_mm, "records": [asdict(r) for r in records]}
    (cache / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return records


def load_canvas(
    cache: Path, record: CanvasRecord
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(image, bac mask) of a cached canvas as float32 arrays."""
    with np.load(cache / record.path) as data:
        return data["image"].astype(np.float32), data["bac"].astype(np.float32)


def intensity_augment(
    image: NDArray[np.float32],
    rng: np.random.Generator,
    *,
    brightness: float = 0.2,
    contrast: float = 0.3,
) -> NDArray[np.float32]:
    """The source study's intensity-only augmentation, for grayscale images.

    Brightness ±``brightness`` (added) and contrast ×(1 ± ``contrast``) about the mean;
    the paper's saturation and hue jitter have no meaning on one channel and are left
    out. No geometric augmentation (the canvas layout is part of the input).
    """
    out = image + np.float32(rng.uniform(-brightness, brightness))
    mean = np.float32(out.mean())
    out = (out - mean) * np.float32(rng.uniform(1 - contrast, 1 + contrast)) + mean
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def patch_origins(shape: tuple[int, int], size: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners of ``size`` patches overlapping by ``overlap`` that cover ``shape``
    (the last patch of a row or column ends flush with the edge)."""
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), got {overlap}")
    stride = size - overlap

    def starts(extent: int) -> list[int]:
        if extent <= size:
            return [0]
        values = list(range(0, extent - size + 1, stride))
        if values[-1] != extent - size:
            values.append(extent - size)
        return values

    return [(y, x) for y in starts(shape[0]) for x in starts(shape[1])]


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """512 px patches (overlap 386 by default) of cached canvases: the patch regime.

    A canvas smaller than a patch is zero-padded. ``augment`` applies
    :func:`intensity_augment` with a generator seeded per item and epoch.
    """

    def __init__(
        self,
        cache: Path,
        records: Sequence[CanvasRecord],
        *,
        size: int = 512,
        overlap: int = 386,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.cache, self.records, self.size = cache, list(records), size
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.items = [
            (i, y, x)
            for i, r in enumerate(self.records)
            for y, x in patch_origins(r.shape, size, overlap)
        ]
        # Canvases stay in memory once read (float16 image, uint8 mask): shuffled patches
        # would otherwise decompress a whole canvas per patch.
        self._canvases: dict[int, tuple[NDArray[np.float16], NDArray[np.uint8]]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def forget(self) -> None:
        """Drop the canvases read so far (after a pass over a large set)."""
        self._canvases.clear()

    def _canvas(self, index: int) -> tuple[NDArray[np.float16], NDArray[np.uint8]]:
        if index not in self._canvases:
            with np.load(self.cache / self.records[index].path) as data:
                self._canvases[index] = (data["image"], data["bac"])
        return self._canvases[index]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, y, x = self.items[item]
        image, bac = self._canvas(index)
        patch = np.zeros((self.size, self.size), np.float32)
        target = np.zeros((self.size, self.size), np.float32)
        crop = image[y : y + self.size, x : x + self.size]
        patch[: crop.shape[0], : crop.shape[1]] = crop
        target[: crop.shape[0], : crop.shape[1]] = bac[y : y + self.size, x : x + self.size]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, item])
            patch = intensity_augment(patch, rng)
        return torch.from_numpy(patch)[None], torch.from_numpy(target)[None]


class WholeCanvasDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Whole canvases resized to one fixed shape: the whole-image regime (the paper's
    1024 x 1024 becomes 1024 x 2048 for a bilateral canvas, keeping its 1:2 layout)."""

    def __init__(
        self,
        cache: Path,
        records: Sequence[CanvasRecord],
        *,
        shape: tuple[int, int] = (1024, 2048),
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.cache, self.records, self.shape = cache, list(records), shape
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, bac = load_canvas(self.cache, self.records[item])
        if self.augment:
            image = intensity_augment(image, np.random.default_rng([self.seed, self.epoch, item]))
        both = torch.from_numpy(np.stack([image, bac]))[None]
        resized = torch.nn.functional.interpolate(
            both, size=self.shape, mode="bilinear", align_corners=False
        )[0]
        return resized[:1], (resized[1:] >= 0.5).float()


def records_in(records: Iterable[CanvasRecord], split: str) -> list[CanvasRecord]:
    return [r for r in records if r.split == split]
