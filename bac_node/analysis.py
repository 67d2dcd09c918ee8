"""The one pure analysis function: a study's MG images in, BAC measurements out.

``measure_study`` touches no database and no network: the ``analyze`` command, the
node's worker, the evaluation and the tests all call it. For each bilateral pair (or
lone screening view) it displays the images, finds each breast, puts both breasts on
the model's bilateral canvas, runs the predictor once, maps the probabilities back to
each image's own rows and columns and measures areas there; the side and study grades
follow from :mod:`bac_node.grading`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from bac_node.dicom.reader import MGImage
from bac_node.dicom.selection import StudySelection
from bac_node.errors import BacNodeError, InvalidInstanceError
from bac_node.grading import BACGrade, Burden, study_grade
from bac_node.imaging.breast import breast_mask, chest_wall_side, expected_chest_wall_side
from bac_node.imaging.canvas import CanvasLayout, SourceGeometry, bilateral_layout
from bac_node.imaging.display import presentation_pixels
from bac_node.imaging.vessels import VesselMeasurement, measure_vessels

log = logging.getLogger(__name__)

#: A predictor maps a bilateral canvas in [0, 1] to BAC probabilities of the same shape.
Predictor = Callable[[NDArray[np.float32]], NDArray[np.float32]]


@dataclass(frozen=True)
class CanvasModel:
    """The model settings the analysis needs (from the model card)."""

    input_spacing_mm: float
    threshold: float


@dataclass
class ImageResult:
    """One analysed MG image: its masks in source geometry and its burden."""

    image: MGImage
    bac_mask: NDArray[np.bool_]
    breast_mask: NDArray[np.bool_]
    burden: Burden
    chest_wall: str
    orientation_corrected: bool
    paired: bool
    vessels: VesselMeasurement = field(default_factory=VesselMeasurement.none)
    """Calcified length, vessel count and longest vessel of ``bac_mask``."""

    @property
    def breast_box(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1) of the breast, end exclusive; the whole image if none."""
        rows = np.nonzero(self.breast_mask.any(axis=1))[0]
        cols = np.nonzero(self.breast_mask.any(axis=0))[0]
        if rows.size == 0:
            return 0, 0, self.breast_mask.shape[0], self.breast_mask.shape[1]
        return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


@dataclass
class StudyResult:
    study_instance_uid: str
    images: list[ImageResult] = field(default_factory=list)
    not_analysed: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Instance UID or file, one-line reason) of every input left out."""
    seconds: float = 0.0

    def side(self, laterality: str) -> Burden:
        return Burden.pooled(r.burden for r in self.images if r.image.laterality == laterality)

    @property
    def sides(self) -> dict[str, Burden]:
        present = {r.image.laterality for r in self.images}
        return {lat: self.side(lat) for lat in ("R", "L") if lat in present}

    @property
    def side_vessels(self) -> dict[str, VesselMeasurement]:
        """Each side's vessels from its views (mean length, max count: see
        :mod:`bac_node.imaging.vessels`)."""
        return {
            lat: VesselMeasurement.side(r.vessels for r in self.images if r.image.laterality == lat)
            for lat in self.sides
        }

    @property
    def vessels(self) -> VesselMeasurement:
        """The study's vessels: both sides added up."""
        return VesselMeasurement.study(self.side_vessels.values())

    @property
    def grade(self) -> BACGrade:
        return study_grade(self.sides.values())

    @property
    def views_used(self) -> list[str]:
        return [f"{r.image.laterality}-{r.image.view}" for r in self.images]


def _geometry(image: MGImage, breast: NDArray[np.bool_]) -> tuple[SourceGeometry, bool]:
    expected = expected_chest_wall_side(image.laterality)
    side = chest_wall_side(breast) or expected
    corrected = side != expected
    if corrected:
        log.warning(
            "%s: %s breast with its chest wall on the %s edge (expected %s); orientation corrected",
            image.sop_instance_uid, image.laterality, side, expected,
        )  # fmt: skip
    geometry = SourceGeometry(
        key=image.sop_instance_uid,
        laterality=image.laterality,
        shape=(image.rows, image.columns),
        spacing_mm=image.pixel_spacing_mm,
        chest_wall=side,
    )
    return geometry, corrected


def display(image: MGImage, *, voi: bool = True) -> NDArray[np.float32]:
    """The displayed pixels of an image, with decoding failures as InvalidInstanceError."""
    try:
        return presentation_pixels(image.dataset, voi=voi)
    except BacNodeError:
        raise
    except Exception as exc:  # pydicom/decoder errors vary by plugin
        raise InvalidInstanceError(
            image.sop_instance_uid, f"pixel data cannot be decoded ({exc})"
        ) from None


def prepare_canvas(
    right: MGImage | None, left: MGImage | None, model: CanvasModel
) -> tuple[CanvasLayout, NDArray[np.float32], dict[str, NDArray[np.bool_]], dict[str, bool]]:
    """The canvas of a pair: its layout, pixels, each image's breast mask and whether
    its orientation was corrected."""
    shown: dict[str, NDArray[np.float32]] = {}
    breasts: dict[str, NDArray[np.bool_]] = {}
    corrected: dict[str, bool] = {}
    geometries: dict[str, SourceGeometry] = {}
    for image in (right, left):
        if image is None:
            continue
        pixels = display(image)
        # The mask is found on the whole value range: a VOI may clip the faint skin edge.
        breast = breast_mask(display(image, voi=False), image.pixel_spacing_mm[0])
        geometry, was_corrected = _geometry(image, breast)
        key = image.sop_instance_uid
        shown[key], breasts[key], corrected[key], geometries[key] = (
            pixels, breast, was_corrected, geometry,
        )  # fmt: skip
    layout = bilateral_layout(
        geometries.get(right.sop_instance_uid) if right else None,
        geometries.get(left.sop_instance_uid) if left else None,
        model.input_spacing_mm,
    )
    return layout, layout.render(shown), breasts, corrected


def _analyse_group(
    right: MGImage | None, left: MGImage | None, predictor: Predictor, model: CanvasModel
) -> list[ImageResult]:
    layout, canvas, breasts, corrected = prepare_canvas(right, left, model)
    probabilities = predictor(canvas)
    if probabilities.shape != canvas.shape:
        raise BacNodeError(
            f"the predictor returned shape {probabilities.shape} for a canvas of {canvas.shape}"
        )
    back = layout.to_source(probabilities)
    results = []
    paired = right is not None and left is not None
    for image in (right, left):
        if image is None:
            continue
        key = image.sop_instance_uid
        breast = breasts[key]
        bac = (back[key] >= model.threshold) & breast
        burden = Burden.measured(
            int(np.count_nonzero(bac)), int(np.count_nonzero(breast)), image.pixel_spacing_mm
        )
        side = next(p.source.chest_wall for p in layout.placements if p.source.key == key)
        # Measured on the final mask at the image's own spacing (only its bounding box).
        vessels = measure_vessels(bac, image.pixel_spacing_mm)
        results.append(
            ImageResult(image, bac, breast, burden, side, corrected[key], paired, vessels)
        )
        log.info(
            "%s %s-%s: BAC %.3f %% of breast (%d px), %.1f mm in %d vessels",
            key, image.laterality, image.view, burden.area_percent, burden.bac_pixels,
            vessels.length_mm, vessels.vessel_count,
        )  # fmt: skip
    return results


def _alone(image: MGImage) -> tuple[MGImage | None, MGImage | None]:
    return (image, None) if image.laterality == "R" else (None, image)


def canvas_groups(selection: StudySelection) -> list[tuple[MGImage | None, MGImage | None]]:
    """(right, left) of each canvas the study needs: its pairs, then its lone images."""
    groups: list[tuple[MGImage | None, MGImage | None]] = [
        (pair.right, pair.left) for pair in selection.pairs
    ]
    return groups + [_alone(image) for image, _ in selection.single]


def measure_study(
    selection: StudySelection, predictor: Predictor, model: CanvasModel
) -> StudyResult:
    """Measure BAC on every selected image of one study.

    A pair or lone image whose pixels cannot be decoded is reported in
    ``not_analysed`` and the rest of the study goes on.
    """
    start = time.perf_counter()
    result = StudyResult(selection.study_instance_uid, not_analysed=list(selection.skipped))
    for image, reason in selection.single:
        log.info("%s: analysed without its pair (%s)", image.sop_instance_uid, reason)
        # The report says what is missing: the partner view, named by side and view.
        missing = f"{'L' if image.laterality == 'R' else 'R'}-{image.view}"
        result.not_analysed.append((missing, f"{reason}; {image.label} analysed alone"))
    for right, left in canvas_groups(selection):
        try:
            result.images += _analyse_group(right, left, predictor, model)
        except InvalidInstanceError as exc:
            # One broken image must not cost its partner: analyse the other alone.
            bad = exc.source
            others = [i for i in (right, left) if i is not None and i.sop_instance_uid != bad]
            result.not_analysed.append((bad, exc.reason))
            for other in others:
                try:
                    result.images += _analyse_group(*_alone(other), predictor, model)
                except InvalidInstanceError as again:
                    result.not_analysed.append((again.source, again.reason))
    order = {("R", "CC"): 0, ("L", "CC"): 1, ("R", "MLO"): 2, ("L", "MLO"): 3}
    result.images.sort(key=lambda r: order.get((r.image.laterality, r.image.view), 9))
    result.seconds = time.perf_counter() - start
    return result


def describe(results: Sequence[StudyResult]) -> str:
    """A plain-text table of analysed studies (UIDs only, no patient identifiers)."""
    lines = [f"{'study':<64} {'views':<26} {'R %':>6} {'L %':>6} grade flag {'s':>6}"]
    for r in results:
        sides = r.sides
        right = f"{sides['R'].area_percent:6.3f}" if "R" in sides else f"{'-':>6}"
        left = f"{sides['L'].area_percent:6.3f}" if "L" in sides else f"{'-':>6}"
        flag = "YES" if r.grade == BACGrade.SEVERE else "no"
        lines.append(
            f"{r.study_instance_uid:<64} {','.join(r.views_used):<26} {right} {left} "
            f"{int(r.grade):>5} {flag:>4} {r.seconds:6.1f}"
        )
    return "\n".join(lines)
