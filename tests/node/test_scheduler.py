"""The scheduler: its ticks on their own, and the clocks running a study to its export."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _processing_helpers import (
    StoreSCP,
    add_rows,
    node_settings,
    phantom_study,
    store_files,
    wait_for,
)
from peers import free_port
from sqlalchemy import select

from bac_node.analysis import Predictor
from bac_node.model.weights import ModelCard
from bac_node.node.db import Database, Export, Instance, Job, Result, Study, open_database, utcnow
from bac_node.node.export import Exporter
from bac_node.node.queue import ResultRecord, claim_job, complete_job, enqueue_ready_studies
from bac_node.node.scheduler import NodeScheduler
from bac_node.node.worker import Worker


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(tmp_path / "data")
    yield database
    database.dispose()


@pytest.fixture
def queue_db(db_location: str | Path, tmp_path: Path) -> Iterator[Database]:
    """``db`` on SQLite, then on PostgreSQL (``pg.db_location``); files in tmp_path/data."""
    database = open_database(tmp_path / "data" if isinstance(db_location, Path) else db_location)
    yield database
    database.dispose()


def _state(db: Database, model: type[Job] | type[Export]) -> list[str]:
    with db.read() as s:
        return list(s.scalars(select(model.state).order_by(model.id)))


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "APScheduler" in t.name and t.is_alive()]


@pytest.mark.dcmtk
@pytest.mark.network
def test_a_study_is_queued_analysed_and_delivered_by_the_clocks(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    scp = StoreSCP(tmp_path / "received", "PACS", free_port())
    settings = node_settings(tmp_path / "data", destinations=(scp.destination,))
    scheduler = NodeScheduler(
        settings, db, exporter=Exporter(settings, db), enqueue_every=0.1, export_every=0.1,
        reap_every=0.5,
    )  # fmt: skip
    worker = Worker(settings, db, predictor=model[0], card=model[1])
    stop = threading.Event()
    worker_thread = threading.Thread(target=worker.run_forever, args=(stop, 0.1))
    scheduler.start()
    worker_thread.start()
    try:
        assert scheduler.running
        store_files(db, settings.data_dir, phantom_study(tmp_path / "in", 31))  # 4 views
        wait_for(lambda: _state(db, Job) == ["done"], 60, "the job to be done")
        wait_for(lambda: _state(db, Export) == ["done"], 60, "the export to be delivered")
        with db.read() as s:
            result = s.scalars(select(Result)).one()
        assert len(scp.received()) == len(result.files) == 5
    finally:
        stop.set()
        worker_thread.join(60)
        scheduler.shutdown()
        scp.stop()
    assert not scheduler.running
    assert not worker_thread.is_alive()
    assert _scheduler_threads() == []
    scheduler.shutdown()  # twice is harmless


def test_shutdown_waits_for_a_running_tick(db: Database, tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "data")
    entered, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    class SlowExporter(Exporter):
        def run_once(self, limit: int = 8) -> int:
            entered.set()
            release.wait(10)
            finished.append(True)
            return 0

    scheduler = NodeScheduler(settings, db, exporter=SlowExporter(settings, db), export_every=0.1)
    scheduler.start()
    wait_for(entered.is_set, 10, "the export tick to start")
    threading.Timer(0.3, release.set).start()
    scheduler.shutdown(wait=True)
    assert finished == [True]
    assert _scheduler_threads() == []


def test_a_failing_tick_is_logged_and_the_clocks_go_on(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = node_settings(tmp_path / "data")
    calls: list[int] = []

    class BrokenExporter(Exporter):
        def run_once(self, limit: int = 8) -> int:
            calls.append(1)
            raise RuntimeError("database is locked")

    scheduler = NodeScheduler(
        settings, db, exporter=BrokenExporter(settings, db), export_every=0.05
    )
    with caplog.at_level(logging.ERROR, logger="bac_node.node.scheduler"):
        scheduler.start()
        try:
            wait_for(lambda: len(calls) >= 3, 10, "three export ticks")
        finally:
            scheduler.shutdown()
    assert "scheduler: export tick failed" in caplog.text


def test_enqueue_and_reap_ticks_use_the_clock(queue_db: Database, tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "data", stable_after=60, lease_seconds=30)
    now = [utcnow()]
    scheduler = NodeScheduler(settings, queue_db, exporter=None, clock=lambda: now[0])
    add_rows(queue_db, "1.2.3", ("R-CC", "L-CC"), received=now[0])
    assert scheduler.enqueue_tick() == []
    now[0] += dt.timedelta(seconds=61)
    assert scheduler.enqueue_tick() == ["1.2.3"]
    assert claim_job(queue_db, "dead", 30, data_dir=settings.data_dir, now=now[0]) is not None
    assert scheduler.reap_tick() == (0, 0)
    now[0] += dt.timedelta(seconds=31)
    assert scheduler.reap_tick() == (1, 0)
    assert _state(queue_db, Job) == ["pending"]
    assert scheduler.export_tick() == 0  # no exporter
    assert scheduler.retention_tick() == []  # retention off by default


def _done_study(db: Database, data_dir: Path, tmp_path: Path, seed: int, when: dt.datetime) -> str:
    """A stored study whose job is done with a result made at ``when``."""
    uid = store_files(db, data_dir, phantom_study(tmp_path / f"in{seed}", seed), received=when)
    assert enqueue_ready_studies(db, stable_after=60, now=when) == [uid]
    job = claim_job(db, "w", 30, data_dir=data_dir, now=when)
    assert job is not None
    record = ResultRecord(
        path=f"results/x/{uid}", files=(f"results/x/{uid}/sr.dcm",), sr_uid="2.25.7", grade=0,
        cardiovascular_flag=False, area_percent=0.0, model_version="t", analysis_seconds=1.0,
    )  # fmt: skip
    assert complete_job(db, job.job_id, "w", record, [], now=when)
    return uid


def _files(db: Database, data_dir: Path, uid: str) -> list[Path]:
    with db.read() as s:
        rows = s.scalars(select(Instance).join(Study).where(Study.study_uid == uid)).all()
        return [data_dir / row.path for row in rows]


def test_retention_deletes_old_inputs_and_keeps_results(queue_db: Database, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    now = [utcnow()]
    old = _done_study(queue_db, data_dir, tmp_path, 41, now[0] - dt.timedelta(days=10))
    recent = _done_study(queue_db, data_dir, tmp_path, 42, now[0] - dt.timedelta(days=2))
    pending = store_files(queue_db, data_dir, phantom_study(tmp_path / "in43", 43))  # not analysed
    result_file = data_dir / "results" / "x" / old / "sr.dcm"
    result_file.parent.mkdir(parents=True)
    result_file.write_bytes(b"result")

    settings = node_settings(data_dir, retention_days=7)
    scheduler = NodeScheduler(settings, queue_db, exporter=None, clock=lambda: now[0])
    assert scheduler.retention_tick() == [old]
    assert not any(path.exists() for path in _files(queue_db, data_dir, old))
    assert all(path.exists() for path in _files(queue_db, data_dir, recent))
    assert all(path.exists() for path in _files(queue_db, data_dir, pending))
    assert result_file.read_bytes() == b"result"
    with queue_db.read() as s:
        purged = {st.study_uid: st.purged for st in s.scalars(select(Study))}
    assert purged == {old: True, recent: False, pending: False}
    assert scheduler.retention_tick() == []  # once

    # New images of a studied study: its inputs are kept until their own result is old.
    store_files(queue_db, data_dir, phantom_study(tmp_path / "in42", 42)[:1], received=now[0])
    now[0] += dt.timedelta(days=30)
    assert scheduler.retention_tick() == []
    assert all(path.exists() for path in _files(queue_db, data_dir, recent))


def test_retention_is_off_by_default_and_not_scheduled(db: Database, tmp_path: Path) -> None:
    off = NodeScheduler(node_settings(tmp_path / "data"), db, exporter=None)
    on = NodeScheduler(node_settings(tmp_path / "data", retention_days=3), db, exporter=None)
    for scheduler, expected in ((off, {"enqueue", "reap"}), (on, {"enqueue", "reap", "retention"})):
        scheduler.start()
        try:
            assert set(scheduler.scheduled) == expected
        finally:
            scheduler.shutdown()
        assert scheduler.scheduled == []
