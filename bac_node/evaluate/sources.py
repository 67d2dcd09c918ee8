"""Where predicted masks come from: the evaluation scores masks, and a model is one
source of them.

:class:`ModelSource` runs the analysis exactly as the node does
(:func:`bac_node.analysis.measure_study`: the node's selection, display transform,
breast mask, bilateral canvas, tiled model, masks mapped back to each image's own rows
and columns), so the figures are the node's. :class:`MaskSource` takes masks from any
function of the labelled image, e.g. another tool's output on disk, or, in the tests,
the ground truth itself (an oracle) and the ground truth less one vessel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from bac_node.analysis import Predictor
from bac_node.errors import BacNodeError
from bac_node.evaluate.data import LabelledImage, LabelledSet, LabelledStudy
from bac_node.model.weights import ModelCard


@dataclass
class ImagePrediction:
    """A predicted BAC mask of one labelled image, in the image's own rows and columns,
    and the breast mask the prediction was measured in."""

    labelled: LabelledImage
    sop_instance_uid: str
    bac: NDArray[np.bool_]
    breast: NDArray[np.bool_]
    pixel_spacing_mm: tuple[float, float]


@dataclass
class StudyPrediction:
    images: list[ImagePrediction] = field(default_factory=list)
    not_analysed: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Instance UID or file, one-line reason) of inputs the source left out."""
    seconds: float = 0.0


class PredictionSource(Protocol):
    """Anything that predicts BAC masks for the studies of a labelled set."""

    @property
    def label(self) -> str:
        """A short name for tables and plots."""
        ...

    def describe(self) -> dict[str, Any]:
        """What it is (model name, version, weights hash, ...), for the JSON and report."""
        ...

    def predict(self, data: LabelledSet, study: LabelledStudy) -> StudyPrediction: ...


class ModelSource:
    """A bac-node model, run through the node's own analysis."""

    def __init__(
        self, predictor: Predictor, card: ModelCard, *, untrained: bool, model_path: Path | None
    ) -> None:
        from bac_node.analysis import CanvasModel

        self.predictor, self.card, self.untrained = predictor, card, untrained
        self.model_path = model_path
        self.canvas_model = CanvasModel(card.input_spacing_mm, card.threshold)

    @classmethod
    def load(
        cls, model_path: Path | None, device: str = "cpu", backend: str = "torch"
    ) -> ModelSource:
        """The model at ``model_path`` (the shipped one when None) on ``device``, run by
        ``backend`` (``bac-node evaluate`` passes the ``backend`` setting, so the figures
        are those of the node's own inference path)."""
        from bac_node.model.inference import load_predictor

        predictor, card, untrained = load_predictor(
            str(model_path) if model_path else None, device=device, backend=backend
        )
        return cls(predictor, card, untrained=untrained, model_path=model_path)

    @property
    def label(self) -> str:
        return f"{self.card.name} {self.card.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "model",
            "path": str(self.model_path) if self.model_path else "(shipped default)",
            "name": self.card.name,
            "version": self.card.version,
            "sha256": self.card.sha256,
            "input_spacing_mm": self.card.input_spacing_mm,
            "threshold": self.card.threshold,
            "untrained": self.untrained,
        }

    def predict(self, data: LabelledSet, study: LabelledStudy) -> StudyPrediction:
        from bac_node.analysis import measure_study
        from bac_node.dicom.selection import read_paths, select_studies

        by_path = {data.path(i.file).resolve(): i for i in study.images}
        found, rejected = read_paths(list(by_path))
        selections = select_studies(found, rejected)
        if len(selections) != 1:
            reasons = "; ".join(f"{f}: {r}" for f, r in rejected[:3])
            raise BacNodeError(
                f"{data.folder}: study {study.name} has {len(selections)} DICOM studies "
                f"among its files, expected 1{f' ({reasons})' if reasons else ''}"
            )
        result = measure_study(selections[0], self.predictor, self.canvas_model)
        out = StudyPrediction(not_analysed=list(result.not_analysed), seconds=result.seconds)
        for image in result.images:
            path = image.image.path.resolve() if image.image.path else None
            labelled = by_path.get(path) if path else None
            if labelled is None:  # read_paths only saw this study's files: cannot happen
                raise BacNodeError(f"{image.image.sop_instance_uid}: not in the manifest")
            out.images.append(
                ImagePrediction(
                    labelled,
                    image.image.sop_instance_uid,
                    image.bac_mask,
                    image.breast_mask,
                    image.image.pixel_spacing_mm,
                )
            )
        return out


MaskFunction = Callable[
    [LabelledSet, LabelledStudy, LabelledImage], tuple[NDArray[np.bool_], NDArray[np.bool_]]
]
"""``(set, study, image) -> (bac mask, breast mask)`` in the image's rows and columns."""


class MaskSource:
    """Masks from a function of the labelled image, one per view (For Presentation
    preferred, as the node's selection does)."""

    def __init__(self, label: str, masks: MaskFunction, about: str = "") -> None:
        self._label = label
        self.masks = masks
        self.about = about

    @property
    def label(self) -> str:
        return self._label

    def describe(self) -> dict[str, Any]:
        return {"kind": "masks", "name": self._label, "about": self.about}

    def predict(self, data: LabelledSet, study: LabelledStudy) -> StudyPrediction:
        from bac_node.dicom.reader import read_instance

        started = time.perf_counter()
        out = StudyPrediction()
        for labelled in study.preferred():
            image = read_instance(data.path(labelled.file), decode=False)
            bac, breast = self.masks(data, study, labelled)
            if bac.shape != (image.rows, image.columns) or breast.shape != bac.shape:
                raise BacNodeError(
                    f"{image.sop_instance_uid}: predicted masks {bac.shape}/{breast.shape} "
                    f"do not match the image's {image.rows}x{image.columns}"
                )
            out.images.append(
                ImagePrediction(
                    labelled, image.sop_instance_uid, bac & breast, breast, image.pixel_spacing_mm
                )
            )
        out.seconds = time.perf_counter() - started
        return out


def truth_masks(
    data: LabelledSet, study: LabelledStudy, image: LabelledImage
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """The oracle's masks: the true BAC, inside the true breast (the whole image when
    the manifest has no breast mask)."""
    bac = data.load_mask(image.bac_mask)
    breast = data.load_mask(image.breast_mask) if image.breast_mask else np.ones_like(bac)
    return bac, breast
