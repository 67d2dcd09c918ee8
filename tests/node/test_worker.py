"""The worker with a real (tiny) model: jobs end to end, failures, leases, crashes.

The tests about the queue (retries, lost leases, a killed worker) take ``queue_db`` and
run on SQLite and on PostgreSQL (``pg.db_location``); the files stay in ``data_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _processing_helpers import (
    dciodvfy_errors,
    node_settings,
    phantom_study,
    sample_study,
    save_tiny_model,
    store_files,
    wait_for,
)
from numpy.typing import NDArray
from sqlalchemy import select, update

from bac_node.analysis import Predictor
from bac_node.errors import ModelError
from bac_node.model.inference import load_predictor
from bac_node.model.weights import ModelCard, default_model_path
from bac_node.node.db import (
    MAX_JOB_ATTEMPTS,
    Database,
    Export,
    Job,
    Result,
    open_database,
    utcnow,
)
from bac_node.node.queue import claim_job, enqueue_ready_studies
from bac_node.node.worker import Worker

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def model(model_path: Path) -> tuple[Predictor, ModelCard]:
    predictor, card, untrained = load_predictor(str(model_path), device="cpu")
    assert not untrained
    return predictor, card


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def db(data_dir: Path) -> Iterator[Database]:
    database = open_database(data_dir)
    yield database
    database.dispose()


@pytest.fixture
def queue_db(db_location: str | Path, data_dir: Path) -> Iterator[Database]:
    """The database of the queue tests: SQLite in ``data_dir``, then PostgreSQL."""
    database = open_database(data_dir if isinstance(db_location, Path) else db_location)
    yield database
    database.dispose()


def _queue(db: Database, data_dir: Path, files: list[Path]) -> str:
    uid = store_files(db, data_dir, files)
    assert enqueue_ready_studies(db, stable_after=60) == [uid]
    return uid


def _job(db: Database) -> Job:
    with db.read() as s:
        return s.scalars(select(Job)).one()


def _results(db: Database) -> list[Result]:
    with db.read() as s:
        return list(s.scalars(select(Result)))


@pytest.mark.dcmtk
def test_a_job_end_to_end(db: Database, data_dir: Path, model: tuple[Predictor, ModelCard]) -> None:
    destinations = ("PACS@127.0.0.1:11113", "ARCHIVE@127.0.0.1:11114")
    settings = node_settings(data_dir, destinations=destinations)
    uid = _queue(db, data_dir, sample_study())
    predictor, card = model
    worker = Worker(settings, db, predictor=predictor, card=card)

    assert worker.run_once()
    job = _job(db)
    assert (job.state, job.attempts, job.last_error) == ("done", 1, None)
    (result,) = _results(db)
    assert result.study_uid == uid and result.job_id == job.id
    assert result.path == f"results/{job.inputs_key[:16]}/{uid}"
    assert result.model_version == f"{card.name} {card.version}"
    assert result.grade in (0, 1, 2, 3)
    assert result.cardiovascular_flag == (result.grade == 3)
    assert result.area_percent is not None and result.analysis_seconds > 0

    files = [data_dir / f for f in result.files]
    assert [f.name.split("-")[0] for f in files] == ["seg"] * 4 + ["sr.dcm"]
    summary = json.loads((data_dir / result.path / "summary.json").read_text())
    assert summary["study_grade"] == result.grade
    assert max(s["bac_area_percent"] for s in summary["sides"].values()) == pytest.approx(
        result.area_percent, abs=1e-4
    )
    sr = pydicom.dcmread(files[-1])
    assert str(sr.SOPInstanceUID) == result.sr_uid == summary["sr_sop_instance_uid"]
    sources = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sample_study()
    }
    for seg_file in files[:-1]:
        seg = pydicom.dcmread(seg_file)
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == uid
        assert str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                   .ReferencedSOPInstanceUID) in sources  # fmt: skip
    for path in files[:-1]:
        assert dciodvfy_errors(path, "Segmentation") == [], path.name
    assert dciodvfy_errors(files[-1], "ComprehensiveSR") == []

    with db.read() as s:
        exports = s.scalars(select(Export).order_by(Export.id)).all()
        assert [(e.destination, e.state, e.result_id) for e in exports] == [
            (d, "pending", result.id) for d in destinations
        ]
    assert not worker.run_once()


def test_no_destinations_make_no_exports(
    db: Database, data_dir: Path, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    _queue(db, data_dir, phantom_study(tmp_path / "in", 11))
    worker = Worker(node_settings(data_dir), db, predictor=model[0], card=model[1])
    assert worker.run_once()
    assert len(_results(db)) == 1
    with db.read() as s:
        assert s.scalars(select(Export)).all() == []


def test_unreadable_instances_fail_the_job_for_good(
    db: Database, data_dir: Path, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    uid = _queue(db, data_dir, phantom_study(tmp_path / "in", 12))
    stored = sorted((data_dir / "instances" / uid).iterdir())
    for path in stored:  # damaged on disk after they were stored
        path.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    worker = Worker(node_settings(data_dir), db, predictor=model[0], card=model[1])

    assert worker.run_once()
    job = _job(db)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.last_error is not None and job.last_error.startswith("no analysable MG image (")
    for path in stored:  # each file named (by UID, relative to the data directory)
        assert str(path.relative_to(data_dir)) in job.last_error
    assert _results(db) == []
    assert not worker.run_once()  # permanent: not tried again


def test_a_study_uid_mismatch_fails_the_job_for_good(
    db: Database, data_dir: Path, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    files = phantom_study(tmp_path / "in", 13)
    real_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    uid = store_files(db, data_dir, files, study_uid="2.25.99")
    assert enqueue_ready_studies(db, stable_after=60) == [uid]
    worker = Worker(node_settings(data_dir), db, predictor=model[0], card=model[1])
    assert worker.run_once()
    job = _job(db)
    assert job.state == "failed" and job.last_error is not None
    assert f"Study Instance UID {real_uid} in the files, not 2.25.99" in job.last_error


def test_a_crash_is_retried_then_fails(
    queue_db: Database,
    data_dir: Path,
    tmp_path: Path,
    model: tuple[Predictor, ModelCard],
    caplog: pytest.LogCaptureFixture,
) -> None:
    uid = _queue(queue_db, data_dir, phantom_study(tmp_path / "in", 14))

    def out_of_memory(canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        raise MemoryError("cannot allocate 4 GiB")

    worker = Worker(node_settings(data_dir), queue_db, predictor=out_of_memory, card=model[1])
    with caplog.at_level(logging.ERROR, logger="bac_node.node.worker"):
        assert worker.run_once()
    job = _job(queue_db)
    assert (job.state, job.attempts) == ("pending", 1)
    assert job.last_error == "MemoryError: cannot allocate 4 GiB"
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert uid in record.getMessage() and record.exc_info is not None
    for _ in range(MAX_JOB_ATTEMPTS - 1):
        assert worker.run_once()
    job = _job(queue_db)
    assert (job.state, job.attempts) == ("failed", MAX_JOB_ATTEMPTS)
    assert not worker.run_once()


def test_a_worker_that_lost_its_lease_drops_its_result(
    queue_db: Database,
    data_dir: Path,
    tmp_path: Path,
    model: tuple[Predictor, ModelCard],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _queue(queue_db, data_dir, phantom_study(tmp_path / "in", 15))
    predictor, card = model
    inside, steal = threading.Event(), threading.Event()

    def waits_for_the_thief(canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        inside.set()
        steal.wait(30)
        return predictor(canvas)

    settings = node_settings(data_dir, lease_seconds=1)  # heartbeats every 1/3 s
    worker = Worker(settings, queue_db, predictor=waits_for_the_thief, card=card, owner="slow")
    thread = threading.Thread(target=worker.run_once)
    with caplog.at_level(logging.WARNING, logger="bac_node.node.worker"):
        thread.start()
        wait_for(inside.is_set, 30, "the analysis to start")
        with queue_db.session() as s:  # as if its lease ran out and another worker claimed it
            s.execute(update(Job).values(lease_owner="thief"))
        wait_for(lambda: "lease lost to another worker" in caplog.text, 10, "the heartbeat")
        steal.set()
        thread.join(60)
    assert "result dropped" in caplog.text
    assert _results(queue_db) == []
    job = _job(queue_db)
    assert (job.state, job.lease_owner) == ("running", "thief")


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_one_result_recorded(
    queue_db: Database,
    data_dir: Path,
    tmp_path: Path,
    model_path: Path,
    model: tuple[Predictor, ModelCard],
) -> None:
    _queue(queue_db, data_dir, phantom_study(tmp_path / "in", 16))
    log_file = tmp_path / "doomed.log"
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); "
        "from _processing_helpers import slow_worker_main; "
        f"slow_worker_main({str(data_dir)!r}, {str(model_path)!r}, 2, "
        f"{queue_db.engine.url.render_as_string(hide_password=False)!r})"
    )
    with log_file.open("w") as log:
        doomed = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
    try:

        def running() -> bool:
            assert doomed.poll() is None, log_file.read_text()
            job = _job(queue_db)
            return job.state == "running" and job.lease_owner == "doomed"

        wait_for(running, 90, "the doomed worker to claim the job")
    finally:
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(30)
    job = _job(queue_db)
    assert (job.state, job.attempts, job.lease_owner) == ("running", 1, "doomed")
    expires = job.lease_expires
    assert expires is not None
    before_expiry = expires.replace(microsecond=0)
    assert claim_job(queue_db, "early", 2, data_dir=data_dir, now=before_expiry) is None

    wait_for(lambda: utcnow() > expires, 10, "the dead worker's lease to expire")
    survivor = Worker(
        node_settings(data_dir, lease_seconds=2), queue_db, predictor=model[0], card=model[1],
        owner="survivor",
    )  # fmt: skip
    assert survivor.run_once()
    job = _job(queue_db)
    assert (job.state, job.attempts, job.lease_owner) == ("done", 2, "survivor")
    (result,) = _results(queue_db)
    assert all((data_dir / f).is_file() for f in result.files)
    assert not survivor.run_once()


def test_from_settings_loads_the_configured_model(
    db: Database, data_dir: Path, model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bac_node.node.worker"):
        worker = Worker.from_settings(node_settings(data_dir, model=str(model_path)), db)
    assert worker.card.name == "bac-node-test-tiny"
    assert "untrained" not in caplog.text
    assert worker.owner.count(":") == 2 and str(os.getpid()) in worker.owner
    assert Worker.from_settings(node_settings(data_dir), db).owner != worker.owner


def test_from_settings_warns_about_the_untrained_stand_in(
    db: Database, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        default_model_path()
        shipped = True
    except ModelError:
        shipped = False
    with caplog.at_level(logging.WARNING, logger="bac_node.node.worker"):
        worker = Worker.from_settings(node_settings(data_dir), db)
    warned = [r for r in caplog.records if "untrained" in r.getMessage()]
    assert len(warned) == (0 if shipped else 1)
    if not shipped:
        assert warned[0].levelno == logging.WARNING
        assert worker.card.name in warned[0].getMessage()
