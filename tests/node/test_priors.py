"""Priors against a real PACS: Debian's Orthanc holding a prior and a current study of
the same synthetic patient (training/phantom/study.py:plan_prior_pair), C-FIND and
C-GET for real, the worker end to end, the SR read back (highdicom, dciodvfy, dcmjs).

The images-path test runs the shipped model: the tiny test model's random weights call
~97 % of every breast BAC (grade 3 on both studies, nothing to compare). The phantom pair
(seed 3, Hologic, scale 0.15) is planned at grade 1 then grade 3 and the shipped model
grades it so; the prior's expected values are measured here with the same code path the
node uses (:func:`measure_study`). The SR-path and failure tests run the tiny model (the
prior's values come from its SR, or there is no prior).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from _processing_helpers import node_settings, store_files
from peers import Orthanc, dciodvfy_errors, free_port
from test_outputs import run_dcmjs

from bac_node.analysis import CanvasModel, Predictor, StudyResult, measure_study
from bac_node.config import Settings
from bac_node.dicom.selection import read_paths, select_studies
from bac_node.errors import ConfigError
from bac_node.grading import BACGrade, Burden
from bac_node.imaging.vessels import VesselMeasurement
from bac_node.model.inference import load_predictor
from bac_node.model.weights import ModelCard
from bac_node.node.db import open_database
from bac_node.node.priors import current_study, lookup_prior
from bac_node.node.queue import enqueue_ready_studies
from bac_node.node.worker import Worker
from bac_node.outputs import concepts
from bac_node.outputs.sr import DAYS_PER_MONTH, read_study_values
from bac_node.results import build_results
from training.phantom.study import plan_prior_pair, render_study, write_study

NODE_AE = "BACNODE"
#: What a PACS administrator configures for the node: C-FIND and C-GET allowed.
NODE_ENTRY = {"AET": NODE_AE, "Host": "127.0.0.1", "Port": 104, "AllowFind": True,
              "AllowGet": True}  # fmt: skip
COMPARISON_TIMEOUT = 240  # seconds: the prior's analysis on a busy 2-core machine


@dataclass
class Pair:
    prior: list[Path]
    current: list[Path]
    prior_uid: str
    current_uid: str
    prior_date: dt.date
    current_date: dt.date


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    out = tmp_path_factory.mktemp("pair")
    files: dict[int, list[Path]] = {}
    plans = plan_prior_pair(3, prior_grade=1, current_grade=3, vendor="Hologic")
    for plan in plans:
        rows = write_study(render_study(plan, scale=0.15), out)
        files[plan.index] = [out / str(row["file"]) for row in rows]
    assert plans[0].patient_id == plans[1].patient_id
    return Pair(
        files[0], files[1], plans[0].uid("study"), plans[1].uid("study"),
        dt.date.fromisoformat(plans[0].study_date), dt.date.fromisoformat(plans[1].study_date),
    )  # fmt: skip


@pytest.fixture(scope="module")
def shipped() -> tuple[Predictor, ModelCard]:
    predictor, card, untrained = load_predictor(None, device="cpu")
    if untrained:
        pytest.fail("the shipped model is not installed: the comparison needs real grades")
    return predictor, card


def _measure(files: list[Path], model: tuple[Predictor, ModelCard]) -> StudyResult:
    predictor, card = model
    images, rejected = read_paths(files)
    (selection,) = select_studies(images, rejected)
    return measure_study(selection, predictor, CanvasModel(card.input_spacing_mm, card.threshold))


def _orthanc(directory: Path, files: list[Path]) -> Orthanc:
    server = Orthanc(directory, modalities={"bacnode": NODE_ENTRY}).start()
    for path in files:
        server.upload(path)
    return server


@dataclass
class Run:
    sr_path: Path
    sr: pydicom.Dataset
    summary: dict[str, object]
    seconds: float


def _run_worker(
    data_dir: Path, files: list[Path], model: tuple[Predictor, ModelCard], **settings: object
) -> Run:
    """Store and queue ``files``, run one worker job, and read its SR and summary."""
    predictor, card = model
    db = open_database(data_dir)
    try:
        store_files(db, data_dir, files)
        assert len(enqueue_ready_studies(db, stable_after=60)) == 1
        worker = Worker(
            node_settings(data_dir, ae_title=NODE_AE, **settings), db,
            predictor=predictor, card=card,
        )  # fmt: skip
        start = time.monotonic()
        assert worker.run_once()
        seconds = time.monotonic() - start
    finally:
        db.dispose()
    (sr_path,) = (data_dir / "results").rglob("sr.dcm")
    summary = json.loads((sr_path.parent / "summary.json").read_text())
    return Run(sr_path, pydicom.dcmread(sr_path), summary, seconds)


def _previous_findings(sr: pydicom.Dataset) -> pydicom.Dataset:
    (container,) = [
        item for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == concepts.PREVIOUS_FINDINGS.value
    ]  # fmt: skip
    assert isinstance(container, pydicom.Dataset)
    return container


def _by_code(items: pydicom.Sequence) -> dict[str, pydicom.Dataset]:
    found = {str(item.ConceptNameCodeSequence[0].CodeValue): item for item in items}
    assert len(found) == len(items), "one item per concept"
    return found


def _number(item: pydicom.Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _code(item: pydicom.Dataset) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


def _assert_valid_sr(path: Path) -> None:
    assert dciodvfy_errors(path, "ComprehensiveSR") == []
    report = hd.sr.srread(path)
    assert isinstance(report.content, hd.sr.MeasurementReport)
    assert report.content.get_image_measurement_groups()  # the TID 1500 part still parses
    loaded = run_dcmjs("sr", path)
    assert loaded["groups"], "dcmjs finds the measurement groups"


def _assert_compared(
    run: Run, pair: Pair, area_percent: float, grade: BACGrade, length_mm: float
) -> None:
    """The SR and summary compare with the prior: values then and now (area %, grade,
    length), the interval and the progression."""
    items = _by_code(_previous_findings(run.sr).ContentSequence)
    assert _code(items[concepts.COMPARISON_WITH_PRIOR_STUDY_DONE.value]) == concepts.YES.value
    prior_items = _by_code(items[concepts.PRIOR_STUDY_VALUES.value].ContentSequence)
    uid_item = prior_items[concepts.PROCEDURE_STUDY_INSTANCE_UID.value]
    assert (uid_item.RelationshipType, uid_item.UID) == ("HAS OBS CONTEXT", pair.prior_uid)
    assert prior_items[concepts.STUDY_DATE.value].Date == pair.prior_date.strftime("%Y%m%d")
    assert _number(prior_items[concepts.BAC_AREA_PERCENT.value]) == pytest.approx(area_percent)
    assert _number(prior_items[concepts.BAC_GRADE_NUMBER.value]) == int(grade)
    assert _code(prior_items[concepts.BAC_GRADE_SEVERITY.value]) == (
        concepts.GRADE_CODES[grade].value
    )
    assert _number(prior_items[concepts.BAC_LENGTH.value]) == pytest.approx(length_mm)
    months = round((pair.current_date - pair.prior_date).days / DAYS_PER_MONTH, 1)
    assert _number(items[concepts.INTERVAL_SINCE_PRIOR.value]) == months
    assert (
        items[concepts.INTERVAL_SINCE_PRIOR.value]
        .MeasuredValueSequence[0]
        .MeasurementUnitsCodeSequence[0]
        .CodeValue
        == "mo"
    )
    now_area, now_grade, now_length = read_study_values(run.sr)
    assert now_length is not None
    assert int(now_grade) > int(grade), "the phantom pair is planned to progress"
    assert _code(items[concepts.BAC_PROGRESSED.value]) == concepts.YES.value
    comment = str(items[concepts.COMMENT.value].TextValue)
    assert "progressed" in comment and "not progressed" not in comment

    prior = run.summary["prior"]
    assert isinstance(prior, dict)
    assert prior["compared"] is True
    assert prior["study_instance_uid"] == pair.prior_uid
    assert prior["interval_months"] == months
    assert prior["grade"] == {"prior": int(grade), "current": int(now_grade)}
    assert prior["area_percent"]["prior"] == pytest.approx(area_percent, abs=1e-5)
    assert prior["area_percent"]["current"] == pytest.approx(now_area, abs=1e-5)
    assert prior["length_mm"] == {
        "prior": pytest.approx(length_mm, abs=0.01),
        "current": pytest.approx(now_length, abs=0.01),
    }
    assert prior["progressed"] is True
    loaded = run_dcmjs("sr", run.sr_path)
    assert comment in loaded["texts"]  # type: ignore[operator]


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.orthanc
def test_prior_without_an_sr_is_retrieved_and_analysed(
    tmp_path: Path, pair: Pair, shipped: tuple[Predictor, ModelCard]
) -> None:
    """Orthanc holds both studies (images only): the node C-GETs the prior's four views,
    analyses them in-process and reports the comparison; nothing is exported for it."""
    prior_result = _measure(pair.prior, shipped)
    server = _orthanc(tmp_path / "orthanc", pair.prior + pair.current)
    try:
        run = _run_worker(
            tmp_path / "data", pair.current, shipped,
            priors_pacs=server.destination, priors_timeout=COMPARISON_TIMEOUT,
        )  # fmt: skip
    finally:
        server.stop()
    expected = max(burden.area_percent for burden in prior_result.sides.values())
    assert prior_result.grade == BACGrade.MILD  # the planned prior grade, as measured
    _assert_compared(run, pair, expected, prior_result.grade, prior_result.vessels.length_mm)
    source = _by_code(
        _by_code(_previous_findings(run.sr).ContentSequence)[
            concepts.PRIOR_STUDY_VALUES.value
        ].ContentSequence
    )[concepts.PRIOR_VALUES_SOURCE.value].TextValue
    assert source == "4 image(s) of the prior study analysed by this node"
    # Only the current study's results: the prior's images never entered the store.
    assert [p.parent.name for p in (tmp_path / "data" / "results").rglob("sr.dcm")] == [
        pair.current_uid
    ]
    assert not (tmp_path / "data" / "instances" / pair.prior_uid).exists()
    _assert_valid_sr(run.sr_path)


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.orthanc
def test_prior_with_a_bac_node_sr_is_read_from_the_sr(
    tmp_path: Path, pair: Pair, model: tuple[Predictor, ModelCard]
) -> None:
    """The prior already has bac-node's SR on the PACS (beside its images): only that SR
    is retrieved and its values, not a fresh analysis of the images, are the prior's."""
    # bac-node's report of the prior from an earlier run that found no BAC (grade 0);
    # the tiny model now finds grade 3 on the images, so the values tell the paths apart.
    measured = _measure(pair.prior, model)
    no_bac = StudyResult(
        measured.study_instance_uid,
        [
            dataclasses.replace(
                image,
                bac_mask=np.zeros_like(image.bac_mask),
                burden=Burden.measured(0, image.burden.breast_pixels, image.image.pixel_spacing_mm),
                vessels=VesselMeasurement.none(),
            )
            for image in measured.images
        ],
    )
    prior_report = build_results(no_bac, model[1]).report
    report_path = tmp_path / "prior-sr.dcm"
    prior_report.save_as(report_path, enforce_file_format=True)
    expected_area, expected_grade, expected_length = read_study_values(prior_report)
    assert (expected_area, expected_grade, expected_length) == (0.0, BACGrade.ABSENT, 0.0)
    assert measured.grade == BACGrade.SEVERE
    server = _orthanc(tmp_path / "orthanc", [*pair.prior, report_path, *pair.current])
    try:
        run = _run_worker(
            tmp_path / "data", pair.current, model,
            priors_pacs=server.destination, priors_timeout=COMPARISON_TIMEOUT,
        )  # fmt: skip
    finally:
        server.stop()
    _assert_compared(run, pair, expected_area, expected_grade, 0.0)
    items = _by_code(_previous_findings(run.sr).ContentSequence)
    source = _by_code(items[concepts.PRIOR_STUDY_VALUES.value].ContentSequence)[
        concepts.PRIOR_VALUES_SOURCE.value
    ].TextValue
    assert source == f"bac-node SR {prior_report.SOPInstanceUID} of the prior study"
    assert run.summary["prior"]["source"] == source  # type: ignore[index]
    _assert_valid_sr(run.sr_path)


def _assert_not_compared(run: Run, reason_part: str) -> str:
    items = _by_code(_previous_findings(run.sr).ContentSequence)
    assert _code(items[concepts.COMPARISON_WITH_PRIOR_STUDY_DONE.value]) == concepts.NO.value
    reason = str(items[concepts.NO_PRIOR_REASON.value].TextValue)
    assert reason_part in reason
    assert concepts.PRIOR_STUDY_VALUES.value not in items
    assert run.summary["prior"] == {"compared": False, "reason": reason}
    return reason


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.orthanc
def test_stopped_pacs_does_not_hold_up_the_result(
    tmp_path: Path, pair: Pair, model: tuple[Predictor, ModelCard]
) -> None:
    """Orthanc stopped (its port closed): the result arrives at once, without a prior, and
    the SR says why; PatientID never appears in the reason."""
    server = _orthanc(tmp_path / "orthanc", pair.prior)
    pacs = server.destination
    server.stop()
    timeout = 20
    run = _run_worker(tmp_path / "data", pair.current, model, priors_pacs=pacs,
                      priors_timeout=timeout)  # fmt: skip
    reason = _assert_not_compared(run, "not reachable")
    assert pacs in reason and "PHANTOM" not in reason
    assert run.seconds < timeout  # refused at once: far less than the whole deadline
    _assert_valid_sr(run.sr_path)


@pytest.fixture
def silent_pacs() -> Iterator[str]:
    """A TCP listener that accepts and never says a word (a hung PACS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(4)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"HUNG@127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.mark.network
def test_a_pacs_that_never_answers_times_out_within_priors_timeout(
    tmp_path: Path, pair: Pair, model: tuple[Predictor, ModelCard], silent_pacs: str
) -> None:
    timeout = 3
    predictor, card = model
    dataset = pydicom.dcmread(pair.current[0], stop_before_pixels=True)
    settings = Settings(data_dir=tmp_path, priors_pacs=silent_pacs, priors_timeout=timeout)
    start = time.monotonic()
    lookup = lookup_prior(
        settings, current_study(pair.current_uid, dataset), predictor,
        CanvasModel(card.input_spacing_mm, card.threshold),
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert lookup.prior is None
    assert lookup.reason.startswith(f"prior lookup on PACS {silent_pacs} timed out after 3 s")
    assert timeout <= seconds < timeout + 2


def test_priors_settings_are_validated() -> None:
    assert Settings().priors_pacs == ""  # off by default
    assert Settings(priors_pacs="PACS@pacs.example:104").priors_timeout == 30
    with pytest.raises(ConfigError, match="priors_pacs 'pacs:104' must look like AE@host:port"):
        Settings(priors_pacs="pacs:104")
    with pytest.raises(ConfigError, match="priors_timeout must be at least 1"):
        Settings(priors_pacs="PACS@pacs.example:104", priors_timeout=0)


def test_phantom_pair_is_one_patient_with_more_bac_later() -> None:
    prior, current = plan_prior_pair(7, prior_grade=0, current_grade=2, interval_days=400)
    assert prior.patient_id == current.patient_id
    assert prior.uid("study") != current.uid("study")
    days = dt.date.fromisoformat(current.study_date) - dt.date.fromisoformat(prior.study_date)
    assert days.days == 400
    assert max(current.side_targets.values()) > max(prior.side_targets.values())
    with pytest.raises(ValueError, match="never decreases"):
        plan_prior_pair(7, prior_grade=2, current_grade=1)


def test_synth_prior_pair_writes_one_patient_twice(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bac_node.cli import cli

    out = tmp_path / "pair"
    result = CliRunner().invoke(
        cli, ["synth", "--prior-pair", "--scale", "0.05", "--seed", "5", "--out", str(out),
              "--no-contact-sheet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "manifest.json").read_text())["images"]
    studies = sorted({(r["study_date"], r["patient_id"], r["study_grade"]) for r in rows})
    assert len(rows) == 8 and len(studies) == 2
    (then, then_patient, then_grade), (now, now_patient, now_grade) = studies
    assert then_patient == now_patient and then < now and then_grade < now_grade
