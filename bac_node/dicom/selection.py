"""Which images of a study are analysed, paired, analysed alone or skipped, and why.

The rules, applied per study (StudyInstanceUID) in this order:

1. A SOP Instance UID seen twice is one instance: the first copy is kept.
2. Only screening views are analysed: CC and MLO without a view modifier. Spot
   compression, magnification, implant-displaced and other supplementary views, and
   views other than CC/MLO (ML, LM, XCCL, ...), are skipped with the reason: the model
   and the grade thresholds were made on the four screening views, and a work-up view
   of a part of the breast would distort the per-side area percentages.
3. For each (laterality, view), For Presentation beats For Processing; among images
   of the same intent the latest (AcquisitionDateTime, else AcquisitionDate/Time, then
   ContentDate/Time, then InstanceNumber) is kept: it is the retake.
4. R-CC/L-CC and R-MLO/L-MLO make :class:`BilateralPair` s; a screening view without
   its other side is analysed alone (``single``), with the reason.

Files that could not be read at all (``rejected``) are reported in the ``skipped`` list
of the study whose images are nearest to them in the directory tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from bac_node.dicom.codes import SCREENING_VIEW_CODES
from bac_node.dicom.reader import MGImage, read_instance
from bac_node.errors import InvalidInstanceError

_SIDE_NAME = {"R": "right", "L": "left"}
_OTHER_SIDE = {"R": "L", "L": "R"}


@dataclass(frozen=True)
class BilateralPair:
    """The right and left image of one screening view, analysed together."""

    view: str
    right: MGImage
    left: MGImage

    def __post_init__(self) -> None:
        if self.view not in SCREENING_VIEW_CODES:
            raise ValueError(f"a bilateral pair is CC or MLO, got {self.view!r}")
        for side, image in (("R", self.right), ("L", self.left)):
            if image.laterality != side or image.view != self.view:
                raise ValueError(
                    f"{image.sop_instance_uid} is {image.label}, not {side}-{self.view}"
                )
        if self.right.study_instance_uid != self.left.study_instance_uid:
            raise ValueError("the two images of a bilateral pair come from different studies")


@dataclass
class StudySelection:
    """What will be analysed in one study, and what will not (with reasons)."""

    study_instance_uid: str
    pairs: list[BilateralPair] = field(default_factory=list)
    single: list[tuple[MGImage, str]] = field(default_factory=list)
    """Screening images analysed alone, each with why it has no pair."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Instance UID, or file name when it could not be read; one-line reason)."""

    def all_images(self) -> list[MGImage]:
        """Every image that will be analysed: pairs (right, left), then the singles."""
        images = [image for pair in self.pairs for image in (pair.right, pair.left)]
        return images + [image for image, _ in self.single]


def select_studies(
    images: Iterable[MGImage], rejected: Iterable[tuple[str, str]] = ()
) -> list[StudySelection]:
    """Apply the selection rules of this module to each study, in first-seen order.

    ``rejected`` are (file, reason) of files that could not be read (from
    :func:`read_paths`); each is reported by the study with an image in the nearest
    directory (every such study on a tie). With no image at all the result is empty
    and the caller reports ``rejected`` itself.
    """
    by_study: dict[str, list[MGImage]] = {}
    for image in images:
        by_study.setdefault(image.study_instance_uid, []).append(image)
    selections = [_select_study(uid, members) for uid, members in by_study.items()]
    for file, reason in rejected:
        for index in _nearest_studies(file, list(by_study.values())):
            selections[index].skipped.append((file, reason))
    return selections


def read_paths(paths: Iterable[Path]) -> tuple[list[MGImage], list[tuple[str, str]]]:
    """Read every file under ``paths``: the valid MG images and (file, reason) for the rest.

    Directories are walked recursively in name order. Inside a directory, files that
    are not DICOM Part 10 files (no "DICM" prefix: manifests, masks, notes), hidden
    files and DICOMDIR are passed over silently; a file named explicitly is always
    read and reported. One bad file never stops the others.
    """
    images: list[MGImage] = []
    rejected: list[tuple[str, str]] = []
    for path in _expand(paths):
        try:
            images.append(read_instance(path))
        except InvalidInstanceError as exc:
            rejected.append((str(path), exc.reason))
    return images, rejected


# --- one study -----------------------------------------------------------------------


def _select_study(study_uid: str, images: list[MGImage]) -> StudySelection:
    selection = StudySelection(study_uid)
    seen: dict[str, MGImage] = {}
    candidates: dict[tuple[str, str], list[MGImage]] = {}
    for image in images:
        uid = image.sop_instance_uid
        if uid in seen:
            selection.skipped.append((uid, _duplicate_reason(image, seen[uid])))
            continue
        seen[uid] = image
        if not image.is_screening_view:
            selection.skipped.append((uid, _not_screening_reason(image)))
            continue
        candidates.setdefault((image.laterality, image.view), []).append(image)

    chosen: dict[tuple[str, str], MGImage] = {}
    for key, group in candidates.items():
        keep = _preferred(group)
        chosen[key] = keep
        for other in group:
            if other is not keep:
                selection.skipped.append((other.sop_instance_uid, _superseded_reason(other, keep)))

    for view in SCREENING_VIEW_CODES:
        right, left = chosen.get(("R", view)), chosen.get(("L", view))
        if right is not None and left is not None:
            selection.pairs.append(BilateralPair(view, right, left))
            continue
        for alone in (right, left):
            if alone is not None:
                missing = _SIDE_NAME[_OTHER_SIDE[alone.laterality]]
                selection.single.append((alone, f"no {missing} {view} to pair with"))
    return selection


def _preferred(group: list[MGImage]) -> MGImage:
    """For Presentation over For Processing, then the latest; the first read on a tie."""
    order = sorted(
        range(len(group)),
        key=lambda i: (group[i].presentation_intent == "FOR PRESENTATION", _recency(group[i]), -i),
    )
    return group[order[-1]]


def _recency(image: MGImage) -> tuple[str, str, int]:
    ds: Dataset = image.dataset
    acquired = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if not acquired:
        acquired = _date_time(ds, "AcquisitionDate", "AcquisitionTime")
    content = _date_time(ds, "ContentDate", "ContentTime")
    try:
        number = int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return acquired, content, number


def _date_time(ds: Dataset, date_keyword: str, time_keyword: str) -> str:
    date = str(ds.get(date_keyword, "") or "").strip()
    time = str(ds.get(time_keyword, "") or "").strip()
    # Time alone still orders images of one study (they share the date).
    return f"{date or '00000000'}{time}" if (date or time) else ""


def _duplicate_reason(image: MGImage, kept: MGImage) -> str:
    if image.path is not None and kept.path is not None:
        return f"duplicate SOP instance: {image.path} is another copy of {kept.path}"
    return "duplicate SOP instance: a second copy was received"


def _not_screening_reason(image: MGImage) -> str:
    if image.view in SCREENING_VIEW_CODES and image.view_modifiers:
        modifiers = ", ".join(image.view_modifiers)
        return f"{image.label} with {modifiers}: not a screening view"
    if not image.view:
        return f"{_SIDE_NAME[image.laterality]} breast, view unknown: not a screening view"
    return f"{image.label}: not a screening view (CC or MLO)"


def _superseded_reason(image: MGImage, kept: MGImage) -> str:
    if image.presentation_intent != kept.presentation_intent:
        return (
            f"For Processing image superseded by For Presentation {kept.label} "
            f"({kept.sop_instance_uid})"
        )
    intent = (
        "For Presentation"
        if image.presentation_intent == "FOR PRESENTATION"
        else ("For Processing")
    )
    return f"{intent} {image.label} superseded by a later one ({kept.sop_instance_uid})"


def _nearest_studies(file: str, studies: list[list[MGImage]]) -> list[int]:
    """Indexes of the studies whose image files share the deepest directory with ``file``."""
    if len(studies) <= 1:
        return list(range(len(studies)))
    target = Path(file).resolve().parent
    depths = []
    for images in studies:
        depth = -1
        for image in images:
            if image.path is not None:
                common = os.path.commonpath([target, image.path.resolve().parent])
                depth = max(depth, len(Path(common).parts))
        depths.append(depth)
    best = max(depths)
    return [i for i, d in enumerate(depths) if d == best]


# --- files ---------------------------------------------------------------------------


def _expand(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                candidate = Path(root) / name
                if not name.startswith(".") and name != "DICOMDIR" and _is_part10(candidate):
                    yield candidate


def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return True  # unreadable: let read_instance report it
