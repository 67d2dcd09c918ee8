"""The labelled set an evaluation reads: studies, their images and the true masks.

``--data`` is a *labelled folder* (``bac-node synth`` output, or your own data in the
same layout, documented in :mod:`training.datasets`: a ``manifest.csv`` or
``manifest.json`` with at least ``study``, ``file``, ``patient_id``, ``laterality``,
``view``, ``presentation_intent`` and ``bac_mask``), or that folder's
``manifest.csv``/``manifest.json`` itself. Optional columns used when present:
``vendor`` (the vendor strata; "unknown" otherwise), ``breast_mask`` (the true breast:
true BAC area % is measured over it; without it over the node's own breast mask) and
``study_grade`` (the reference grade, e.g. an expert consensus; without it the grade of
the true area %), ``true_bac_length_mm`` and ``true_vessel_count`` (the phantom's true
calcified length and vessel count of the image: the length agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bac_node.errors import BacNodeError

MANIFEST_NAMES = ("manifest.csv", "manifest.json")


@dataclass(frozen=True)
class LabelledImage:
    """One manifest row: an image and its true masks (paths relative to the folder)."""

    file: str
    laterality: str
    view: str
    presentation_intent: str
    bac_mask: str
    breast_mask: str | None
    true_length_mm: float | None = None
    """True calcified length (``true_bac_length_mm``, phantoms), when the manifest has it."""
    true_vessel_count: int | None = None

    @property
    def key(self) -> str:
        """``R_CC``-style name of the view."""
        return f"{self.laterality}_{self.view}"


@dataclass
class LabelledStudy:
    """One study of the labelled set (``study`` column) and its images."""

    name: str
    patient_id: str
    vendor: str
    reference_grade: int | None
    images: list[LabelledImage] = field(default_factory=list)

    def preferred(self) -> list[LabelledImage]:
        """One image per view, For Presentation where the view has one (as the node's
        selection prefers it)."""
        chosen: dict[str, LabelledImage] = {}
        for image in self.images:
            kept = chosen.get(image.key)
            if kept is None or (
                kept.presentation_intent != "FOR PRESENTATION"
                and image.presentation_intent == "FOR PRESENTATION"
            ):
                chosen[image.key] = image
        return list(chosen.values())


@dataclass
class LabelledSet:
    folder: Path
    studies: list[LabelledStudy]

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def load_mask(self, relative: str) -> NDArray[np.bool_]:
        """A mask PNG of the set (nonzero = inside) as a bool array."""
        from training.phantom.study import load_mask

        path = self.path(relative)
        try:
            return np.asarray(load_mask(path), bool)
        except (OSError, ValueError) as exc:
            raise BacNodeError(f"{path}: cannot read the mask ({exc})") from None


def _folder_of(data: Path) -> Path:
    if data.is_dir():
        return data
    if data.is_file() and data.name in MANIFEST_NAMES:
        return data.parent
    if data.is_file():
        raise BacNodeError(
            f"{data}: name a labelled folder or its manifest.csv / manifest.json "
            "(see training/datasets.py)"
        )
    raise BacNodeError(f"{data}: no such folder or manifest")


def _grade(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        grade = int(value)
    except ValueError:
        raise BacNodeError(f"{where}: study_grade {value!r} is not 0-3") from None
    if not 0 <= grade <= 3:
        raise BacNodeError(f"{where}: study_grade {value!r} is not 0-3")
    return grade


def _optional(value: Any, kind: type[float] | type[int], where: str) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise BacNodeError(f"{where}: {value!r} is not a number") from None


def load_labelled_set(data: Path) -> LabelledSet:
    """The studies of a labelled folder (or its manifest), in manifest order.

    Every row is checked for the required columns (one-line error naming the row); the
    image files and masks are read later, by study.
    """
    from training.datasets import read_labelled_rows

    folder = _folder_of(data)
    studies: dict[str, LabelledStudy] = {}
    for number, row in enumerate(read_labelled_rows(folder), start=1):
        name = str(row["study"])
        where = f"{folder}: manifest row {number} (study {name})"
        study = studies.get(name)
        if study is None:
            study = LabelledStudy(
                name=name,
                patient_id=str(row["patient_id"]),
                vendor=str(row.get("vendor") or "unknown"),
                reference_grade=_grade(row.get("study_grade"), where),
            )
            studies[name] = study
        elif study.patient_id != str(row["patient_id"]):
            raise BacNodeError(f"{where}: one study with two patient_id values")
        laterality, view = str(row["laterality"]).upper(), str(row["view"]).upper()
        if laterality not in ("R", "L"):
            raise BacNodeError(f"{where}: laterality {laterality!r} is not R or L")
        study.images.append(
            LabelledImage(
                file=str(row["file"]),
                laterality=laterality,
                view=view,
                presentation_intent=str(row["presentation_intent"]).upper(),
                bac_mask=str(row["bac_mask"]),
                breast_mask=str(row["breast_mask"]) if row.get("breast_mask") else None,
                true_length_mm=_optional(row.get("true_bac_length_mm"), float, where),
                true_vessel_count=_optional(row.get("true_vessel_count"), int, where),
            )
        )
    if not studies:
        raise BacNodeError(f"{folder}: the manifest lists no image")
    return LabelledSet(folder, list(studies.values()))
