"""``bac-node demo``: the sample study through the path that exists today.

Until the node and the model land, the demo reads the sample study's DICOM, applies
the display transform, and grades it from the phantom's ground-truth masks with the
project's grading rules. It says so in its output; nothing in it is a model result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bac_node.dicom.reader import read_instance
from bac_node.errors import InvalidInstanceError, StudyError
from bac_node.grading import Burden, cardiovascular_flag, study_grade
from bac_node.imaging.display import presentation_pixels

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    sop_instance_uid: str
    laterality: str
    view: str
    intent: str
    rows: int
    columns: int
    breast_pixels: int
    bac_pixels: int
    breast_brighter_than_background: bool

    @property
    def area_percent(self) -> float:
        return Burden(self.bac_pixels, self.breast_pixels).area_percent


@dataclass
class DemoSummary:
    study_instance_uid: str
    source: str
    images: list[ImageResult] = field(default_factory=list)
    seconds: float = 0.0

    def side(self, laterality: str) -> Burden:
        return Burden.pooled(
            Burden(i.bac_pixels, i.breast_pixels)
            for i in self.images
            if i.laterality == laterality and i.intent == "FOR PRESENTATION"
        )

    def to_json(self) -> dict[str, Any]:
        grade = study_grade(self.side(s) for s in ("R", "L"))
        return {
            "study_instance_uid": self.study_instance_uid,
            "source": self.source,
            "method": "phantom ground truth (no model yet); not for clinical use",
            "images": [
                {**i.__dict__, "area_percent": round(i.area_percent, 4)} for i in self.images
            ],
            "sides": {
                s: {
                    "area_percent": round(self.side(s).area_percent, 4),
                    "grade": int(self.side(s).grade),
                }
                for s in ("R", "L")
            },
            "study_grade": int(grade),
            "cardiovascular_flag": cardiovascular_flag(grade),
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        doc = self.to_json()
        lines = [
            f"Study {self.study_instance_uid} ({self.source})",
            "Grades from the phantom's ground truth: bac-node ships no model yet. "
            "Not for clinical use.",
            f"{'image (SOP Instance UID)':<66} {'side':>4} {'view':>4} {'area %':>7}",
        ]
        for i in self.images:
            if i.intent == "FOR PRESENTATION":
                lines.append(
                    f"{i.sop_instance_uid:<66} {i.laterality:>4} {i.view:>4} {i.area_percent:>7.3f}"
                )
        for s, v in doc["sides"].items():
            lines.append(f"side {s}: BAC {v['area_percent']:.3f} % of breast, grade {v['grade']}")
        flag = "raised cardiovascular risk flag" if doc["cardiovascular_flag"] else "no flag"
        lines.append(f"study grade {doc['study_grade']} ({flag}); {doc['seconds']} s")
        return "\n".join(lines)


def _ensure_sample(
    input_dir: Path | None, out: Path, recipe: Mapping[str, Any]
) -> tuple[Path, str]:
    if input_dir is not None:
        if not (input_dir / "manifest.json").is_file():
            raise StudyError(f"{input_dir}: no manifest.json (make one with `bac-node synth`)")
        return input_dir, str(input_dir)
    default = Path("sample_dicom")
    if (default / "manifest.json").is_file():
        return default, str(default)
    from training.phantom.study import plan_studies, synthesize

    log.info("sample_dicom/ not found here; generating the sample study in %s", out / "sample")
    plans = plan_studies(
        int(recipe["studies"]), int(recipe["seed"]), vendor=str(recipe["vendor"]),
        grades=dict(recipe["grades"]), prior_fraction=0.0, processing_fraction=0.0,
    )  # fmt: skip
    synthesize(plans, out / "sample", scale=float(recipe["scale"]), progress=False)
    return out / "sample", "generated from the built-in sample recipe"


def run_demo(input_dir: Path | None, out: Path, recipe: Mapping[str, Any]) -> DemoSummary:
    """Read, display-transform and grade the first study of a synth directory."""
    from training.phantom.contact_sheet import study_contact_sheet
    from training.phantom.study import load_mask, read_manifest

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    source_dir, source = _ensure_sample(input_dir, out, recipe)
    rows = read_manifest(source_dir)
    if not rows:
        raise StudyError(f"{source_dir}: the manifest lists no image")
    first = rows[0]["study"]
    rows = [r for r in rows if r["study"] == first]
    summary = DemoSummary(study_instance_uid=str(rows[0]["study_instance_uid"]), source=source)
    for row in rows:
        path = source_dir / row["file"]
        image = read_instance(path)  # the analysis's own validation
        shown = presentation_pixels(image.dataset)
        breast = load_mask(source_dir / row["breast_mask"])
        bac = load_mask(source_dir / row["bac_mask"])
        if breast.shape != shown.shape:
            raise InvalidInstanceError(
                path, f"mask shape {breast.shape} differs from image {shown.shape}"
            )
        background = ~breast & (shown < 0.99)
        brighter = (
            bool(np.mean(shown[breast]) > np.mean(shown[background])) if background.any() else True
        )
        summary.images.append(
            ImageResult(
                sop_instance_uid=image.sop_instance_uid,
                laterality=image.laterality,
                view=image.view,
                intent=image.presentation_intent,
                rows=image.rows,
                columns=image.columns,
                breast_pixels=int(np.count_nonzero(breast)),
                bac_pixels=int(np.count_nonzero(bac & breast)),
                breast_brighter_than_background=brighter,
            )
        )
        log.info("read %s (%s)", image.sop_instance_uid, image.label)
    summary.seconds = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=1), encoding="utf-8")
    study_contact_sheet(source_dir, rows, out / "contact_sheet.png", panel_height=500)
    return summary
