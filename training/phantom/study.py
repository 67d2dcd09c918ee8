"""Plan, render and write synthetic 4-view screening studies with their ground truth.

Planning is cheap and separate from rendering, so the distribution of vendors, grades
and splits can be checked on thousands of plans. Vendors and grades are allocated by
quota (largest remainder), not drawn independently, so even a few hundred studies
follow the configured proportions closely; splits are allocated per patient.

Output layout of ``bac-node synth --out DIR``::

    DIR/manifest.csv, DIR/manifest.json      one row per image (see MANIFEST_FIELDS)
    DIR/<study>/dicom/<series>/IMG<n>.dcm    the MG instances
    DIR/<study>/truth/<R|L>_<CC|MLO>_{bac,breast,pectoral}.png   1-bit masks
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from bac_node import __version__
from bac_node.dicom.uids import derived_uid
from bac_node.grading import GRADE_BANDS, BACGrade, Burden, study_grade
from training.phantom.anatomy import PatientAnatomy, sample_patient
from training.phantom.dicom_writer import InstanceMeta, write_mg_instance
from training.phantom.render import render_side
from training.phantom.types import LATERALITIES, VIEWS, Laterality, PhantomView, PresentationIntent
from training.phantom.vendors import VENDORS, render_pixels, vendor_by_name

#: Default share of each study grade. Chosen for training coverage (every grade well
#: represented), not screening prevalence (where most women have no BAC).
DEFAULT_GRADE_DISTRIBUTION: dict[int, float] = {0: 0.30, 1: 0.30, 2: 0.20, 3: 0.20}
#: Patient-level splits of method.md.
SPLITS: dict[str, float] = {"train": 0.70, "validation": 0.20, "test": 0.10}
#: Highest side burden (area %) planned for grade 3.
MAX_PLANNED_PERCENT = 6.0
#: Planned burdens stay this factor inside a grade's band, away from its edges.
_BAND_MARGIN = 1.12

MANIFEST_FIELDS = (
    "study", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "file",
    "patient_id", "split", "screening_round", "study_date", "age", "density_category",
    "vendor", "manufacturer", "presentation_intent", "transfer_syntax", "laterality", "view",
    "rows", "columns", "pixel_spacing_mm", "bac_mask", "breast_mask", "pectoral_mask",
    "bac_pixels", "breast_pixels", "area_percent", "side_area_percent", "side_grade",
    "study_grade", "planned_grade", "true_bac_length_mm", "true_vessel_count",
)  # fmt: skip


def parse_grade_distribution(text: str) -> dict[int, float]:
    """``"0,1,2,3"`` (equal shares) or ``"0:0.4,1:0.3,2:0.2,3:0.1"`` to a distribution."""
    weights: dict[int, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        grade_text, _, weight_text = part.partition(":")
        try:
            grade = int(grade_text)
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"grade {part!r} is not GRADE or GRADE:WEIGHT") from None
        if grade not in range(4) or weight < 0:
            raise ValueError(f"grade {part!r}: grades are 0-3 with weights >= 0")
        weights[grade] = weights.get(grade, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the grade distribution needs at least one positive weight")
    return {g: w / total for g, w in sorted(weights.items())}


def quota(n: int, weights: Mapping[Any, float], rng: np.random.Generator) -> list[Any]:
    """``n`` labels in proportion to ``weights`` (largest remainder), shuffled."""
    keys = list(weights)
    total = sum(weights.values())
    exact = [n * weights[k] / total for k in keys]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(keys)), key=lambda i: exact[i] - counts[i], reverse=True)[
        : n - sum(counts)
    ]:
        counts[i] += 1
    labels = [k for k, c in zip(keys, counts, strict=True) for _ in range(c)]
    order = rng.permutation(len(labels))
    return [labels[i] for i in order]


@dataclass(frozen=True)
class StudyPlan:
    """Everything that decides one synthetic study, before any pixel is drawn."""

    index: int
    seed: int
    patient_index: int
    screening_round: int
    vendor: str
    planned_grade: int
    side_targets: dict[str, float]
    """Planned BAC area % of each side ("R", "L")."""
    split: str
    age: int
    study_date: str
    intents: tuple[PresentationIntent, ...]
    jpeg2000: bool
    master_seed: int = field(default=0)

    @property
    def key(self) -> str:
        return f"study-{self.index:05d}"

    @property
    def patient_id(self) -> str:
        return f"PHANTOM-{self.master_seed:x}-{self.patient_index:05d}"

    @property
    def patient_name(self) -> str:
        return f"PHANTOM^BAC{self.patient_index:05d}"

    def uid(self, *parts: object) -> str:
        """A deterministic ``2.25.`` UID for this study and ``parts``."""
        return derived_uid("bac-node-phantom", self.master_seed, self.index, *parts)


def _side_targets(grade: int, rng: np.random.Generator) -> dict[str, float]:
    if grade == 0:
        high = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.02, 0.15))
    else:
        lo, hi = GRADE_BANDS[BACGrade(grade)]
        lo, hi = lo * _BAND_MARGIN, min(hi, MAX_PLANNED_PERCENT) / _BAND_MARGIN
        high = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    # Vessels are bilateral: the other side carries a correlated, lower burden.
    low = high * float(rng.uniform(0.35, 1.0))
    return {"R": high, "L": low} if rng.random() < 0.5 else {"R": low, "L": high}


def plan_studies(
    n: int,
    seed: int,
    *,
    vendor: str | None = None,
    grades: Mapping[int, float] | None = None,
    prior_fraction: float = 0.2,
    processing_fraction: float = 0.15,
    jpeg2000: str = "never",
) -> list[StudyPlan]:
    """Plans for ``n`` studies; deterministic for a given seed and arguments.

    ``prior_fraction`` of studies are earlier or later screening rounds of a woman who
    already has a study (a year apart, burden never decreasing), so splits must be made
    by patient. ``processing_fraction`` of studies also carry For Processing images
    (a third of those carry only For Processing). ``jpeg2000``: never, some (a third
    of the studies of vendors that offer it) or always (where offered).
    """
    if n < 0:
        raise ValueError("the number of studies must be >= 0")
    if jpeg2000 not in ("never", "some", "always"):
        raise ValueError("jpeg2000 must be never, some or always")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    dist = dict(grades) if grades is not None else DEFAULT_GRADE_DISTRIBUTION
    if vendor is not None:
        vendors = [vendor_by_name(vendor).name] * n
    else:
        vendors = quota(n, {v.name: v.share for v in VENDORS}, rng)
    grade_list = quota(n, dist, rng)

    # Group studies into women: a study joins the previous woman (up to 3 rounds).
    patient_of: list[int] = []
    rounds: list[int] = []
    for i in range(n):
        if i > 0 and rounds[-1] < 2 and rng.random() < prior_fraction:
            patient_of.append(patient_of[-1])
            rounds.append(rounds[-1] + 1)
        else:
            patient_of.append(patient_of[-1] + 1 if patient_of else 0)
            rounds.append(0)
    # Burden only grows between rounds: sort each woman's grades by round.
    members: dict[int, list[int]] = {}
    for i, p in enumerate(patient_of):
        members.setdefault(p, []).append(i)
    for idx in members.values():
        ordered = sorted(grade_list[i] for i in idx)
        for i, g in zip(idx, ordered, strict=True):
            grade_list[i] = g
    patients = sorted(members)
    split_of = dict(zip(patients, quota(len(patients), SPLITS, rng), strict=True))
    base_age = {p: int(np.clip(rng.normal(56, 9), 40, 76)) for p in patients}

    plans = []
    for i in range(n):
        p = patient_of[i]
        grade = int(grade_list[i])
        # Older women carry more BAC: nudge age with the planned grade.
        age = int(np.clip(base_age[p] + 3 * grade + rounds[i], 40, 82))
        date = dt.date(2024, 1, 8) + dt.timedelta(days=int(rng.integers(0, 300)) + 365 * rounds[i])
        style = vendor_by_name(vendors[i])
        if rng.random() < processing_fraction:
            intents: tuple[PresentationIntent, ...] = (
                ("FOR PROCESSING",)
                if rng.random() < 1 / 3
                else ("FOR PRESENTATION", "FOR PROCESSING")
            )
        else:
            intents = ("FOR PRESENTATION",)
        j2k = style.offers_jpeg2000_lossless and (
            jpeg2000 == "always" or (jpeg2000 == "some" and rng.random() < 1 / 3)
        )
        plans.append(
            StudyPlan(
                index=i,
                seed=int(rng.integers(0, 2**31 - 1)),
                patient_index=p,
                screening_round=rounds[i],
                vendor=vendors[i],
                planned_grade=grade,
                side_targets=_side_targets(grade, rng),
                split=split_of[p],
                age=age,
                study_date=date.strftime("%Y%m%d"),
                intents=intents,
                jpeg2000=j2k,
                master_seed=seed,
            )
        )
    return plans


def plan_prior_pair(
    seed: int,
    *,
    prior_grade: int = 1,
    current_grade: int = 3,
    interval_days: int = 365,
    vendor: str | None = None,
) -> tuple[StudyPlan, StudyPlan]:
    """A prior and a current screening study of one synthetic woman (for priors).

    Same PatientID and anatomy (size, density), the prior ``interval_days`` earlier
    (screening round 0, then 1, a year older when the interval is a year or more) and
    planned at ``prior_grade``, the current one at ``current_grade``: more calcification
    in the later study when ``current_grade > prior_grade`` (the node's "progressed"
    case). Study UIDs differ (study index 0 and 1 of ``seed``). Deterministic; the
    realised grade of each is the planned one up to whole calcification pieces.
    """
    if not (0 <= prior_grade <= 3 and 0 <= current_grade <= 3):
        raise ValueError("grades are 0-3")
    if current_grade < prior_grade:
        raise ValueError("burden never decreases between rounds: current_grade >= prior_grade")
    if interval_days < 1:
        raise ValueError("the prior must be at least one day earlier")
    prior = plan_studies(
        1, seed, vendor=vendor, grades={prior_grade: 1.0},
        prior_fraction=0.0, processing_fraction=0.0,
    )[0]  # fmt: skip
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A12]))
    current_date = dt.datetime.strptime(prior.study_date, "%Y%m%d").date() + dt.timedelta(
        days=interval_days
    )
    targets = _side_targets(current_grade, rng)
    if current_grade == prior_grade:  # still never less than the prior
        targets = {lat: max(v, prior.side_targets[lat]) for lat, v in targets.items()}
    current = dataclasses.replace(
        prior,
        index=1,
        seed=int(rng.integers(0, 2**31 - 1)),
        screening_round=1,
        planned_grade=current_grade,
        side_targets=targets,
        age=prior.age + interval_days // 365,
        study_date=current_date.strftime("%Y%m%d"),
    )
    return prior, current


@dataclass
class RenderedStudy:
    plan: StudyPlan
    patient: PatientAnatomy
    views: dict[tuple[Laterality, str], PhantomView]

    def side_burden(self, laterality: str) -> Burden:
        return Burden.pooled(
            Burden(v.bac_pixels, v.breast_pixels)
            for (lat, _), v in self.views.items()
            if lat == laterality
        )

    @property
    def grade(self) -> int:
        return int(study_grade(self.side_burden(lat) for lat in LATERALITIES))


def patient_anatomy(plan: StudyPlan) -> PatientAnatomy:
    """The same woman (size, density) in every screening round; her age moves on."""
    rng = np.random.default_rng(
        np.random.SeedSequence([plan.master_seed, 0xB0D1, plan.patient_index])
    )
    return sample_patient(rng, age=plan.age)


def render_study(plan: StudyPlan, *, scale: float = 1.0) -> RenderedStudy:
    """Render the four screening views of a plan (no file is written)."""
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, 0xA11]))
    patient = patient_anatomy(plan)
    detector = vendor_by_name(plan.vendor).geometry(scale)
    views: dict[tuple[Laterality, str], PhantomView] = {}
    for lat in LATERALITIES:
        for view_name, view in render_side(
            patient, lat, detector, plan.side_targets[lat], rng
        ).items():
            views[(lat, view_name)] = view
    return RenderedStudy(plan, patient, views)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(path, optimize=False)


def load_mask(path: Path) -> np.ndarray:
    """A ground-truth mask written by :func:`write_study` as a bool array."""
    with Image.open(path) as img:
        return np.asarray(img.convert("1"), dtype=bool)


def write_study(rendered: RenderedStudy, out_dir: Path) -> list[dict[str, Any]]:
    """Write the DICOM instances and masks of a rendered study; its manifest rows."""
    plan = rendered.plan
    style = vendor_by_name(plan.vendor)
    study_uid = plan.uid("study")
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, 0xD1C0]))
    sides = {lat: rendered.side_burden(lat) for lat in LATERALITIES}
    grade = rendered.grade
    rows: list[dict[str, Any]] = []
    for intent_index, intent in enumerate(plan.intents):
        for view_index, (lat, view_name) in enumerate(
            (lat, v) for v in VIEWS for lat in LATERALITIES
        ):
            view = rendered.views[(lat, view_name)]
            series_number = (intent_index + 1) * 100 + (
                view_index + 1 if style.series_per_view else 0
            )
            series_uid = plan.uid("series", series_number)
            sop_uid = plan.uid("instance", intent, lat, view_name)
            stored = render_pixels(view, style, intent, rng)
            kind = "PROC" if intent == "FOR PROCESSING" else "PRES"
            meta = InstanceMeta(
                patient_name=plan.patient_name,
                patient_id=plan.patient_id,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
                study_date=plan.study_date,
                study_time="093000",
                accession_number=f"PH{plan.master_seed % 10000:04d}{plan.index:06d}",
                study_id=str(plan.index + 1),
                series_number=series_number,
                instance_number=view_index + 1,
                laterality=lat,
                view=view_name,
                vendor=style,
                compressed_thickness_mm=round(view.compressed_thickness_mm, 1),
                series_description=(
                    f"{lat}{view_name} {kind}" if style.series_per_view else f"SCREENING {kind}"
                ),
                patient_age=f"{plan.age:03d}Y",
                patient_birth_date=f"{int(plan.study_date[:4]) - plan.age}0101",
            )
            rel = (
                Path(plan.key)
                / "dicom"
                / str(series_number)
                / f"IMG{intent_index * 4 + view_index + 1:04d}.dcm"
            )
            path = out_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mg_instance(path, stored, meta, jpeg2000_lossless=plan.jpeg2000)
            truth = Path(plan.key) / "truth"
            masks = {
                "bac": view.bac_mask, "breast": view.breast_mask, "pectoral": view.pectoral_mask,
            }  # fmt: skip
            if intent_index == 0:
                for name, mask in masks.items():
                    _save_mask(out_dir / truth / f"{lat}_{view_name}_{name}.png", mask)
            side = sides[lat]
            rows.append(
                {
                    "study": plan.key,
                    "study_instance_uid": study_uid,
                    "series_instance_uid": series_uid,
                    "sop_instance_uid": sop_uid,
                    "file": rel.as_posix(),
                    "patient_id": plan.patient_id,
                    "split": plan.split,
                    "screening_round": plan.screening_round,
                    "study_date": plan.study_date,
                    "age": plan.age,
                    "density_category": rendered.patient.density_category,
                    "vendor": style.name,
                    "manufacturer": style.manufacturer,
                    "presentation_intent": intent,
                    "transfer_syntax": str(
                        JPEG2000Lossless if plan.jpeg2000 else ExplicitVRLittleEndian
                    ),
                    "laterality": lat,
                    "view": view_name,
                    "rows": view.shape[0],
                    "columns": view.shape[1],
                    "pixel_spacing_mm": round(view.pixel_spacing_mm, 6),
                    "bac_mask": (truth / f"{lat}_{view_name}_bac.png").as_posix(),
                    "breast_mask": (truth / f"{lat}_{view_name}_breast.png").as_posix(),
                    "pectoral_mask": (truth / f"{lat}_{view_name}_pectoral.png").as_posix(),
                    "bac_pixels": view.bac_pixels,
                    "breast_pixels": view.breast_pixels,
                    "area_percent": round(
                        Burden(view.bac_pixels, view.breast_pixels).area_percent, 6
                    ),
                    "side_area_percent": round(side.area_percent, 6),
                    "side_grade": int(side.grade),
                    "study_grade": grade,
                    "planned_grade": plan.planned_grade,
                    # The truth of bac_node.imaging.vessels (PhantomView's docstrings).
                    "true_bac_length_mm": round(view.true_bac_length_mm, 3),
                    "true_vessel_count": view.true_vessel_count,
                }
            )
    return rows


def synthesize(
    plans: Sequence[StudyPlan], out_dir: Path, *, scale: float = 1.0, progress: bool = True
) -> list[dict[str, Any]]:
    """Render and write every planned study, then the manifest; all manifest rows."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for plan in tqdm(plans, desc="synth", unit="study", disable=not progress or None):
        rows += write_study(render_study(plan, scale=scale), out_dir)
    write_manifest(
        out_dir,
        rows,
        {"studies": len(plans), "scale": scale, "seed": plans[0].master_seed if plans else None},
    )
    return rows


def write_manifest(
    out_dir: Path, rows: Sequence[Mapping[str, Any]], generator: Mapping[str, Any]
) -> None:
    """``manifest.csv`` and ``manifest.json`` (the JSON adds how the set was made)."""
    with (out_dir / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    doc = {
        "generator": {"name": "bac-node synth", "version": __version__, **generator},
        "note": "Synthetic phantoms made by bac-node. Not patient data. Not for clinical use.",
        "images": list(rows),
    }
    (out_dir / "manifest.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``manifest.json`` (or the ``manifest.json`` in a directory)."""
    if path.is_dir():
        path = path / "manifest.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    return list(doc["images"])


def iter_plan_rows(plans: Sequence[StudyPlan]) -> Iterator[dict[str, Any]]:
    """Plan-level rows (no rendering): for distribution checks and dry runs."""
    for p in plans:
        yield {k: v for k, v in asdict(p).items() if k != "side_targets"} | {
            "patient_id": p.patient_id,
            **{f"target_{k}": v for k, v in p.side_targets.items()},
        }


def ground_truth_summary(plan: StudyPlan, scale: float) -> dict[str, Any]:
    """Render a plan's masks (no DICOM) and summarise its realised burden and grade."""
    rendered = render_study(plan, scale=scale)
    sides = {lat: rendered.side_burden(lat) for lat in LATERALITIES}
    return {
        "index": plan.index,
        "patient_id": plan.patient_id,
        "split": plan.split,
        "vendor": plan.vendor,
        "planned_grade": plan.planned_grade,
        "study_grade": rendered.grade,
        **{f"side_{lat}_percent": sides[lat].area_percent for lat in LATERALITIES},
    }


def _single_threaded() -> None:
    import torch

    torch.set_num_threads(1)


def ground_truth_summaries(
    plans: Sequence[StudyPlan], scale: float, *, workers: int = 2
) -> list[dict[str, Any]]:
    """:func:`ground_truth_summary` of every plan, in worker processes.

    Workers are spawned, not forked: a fork after torch has started its thread pool
    can deadlock in the child (seen here: a CI run hung with an idle worker).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded) as pool:
        return list(pool.map(ground_truth_summary, plans, [scale] * len(plans), chunksize=20))
