"""The database as the queue: enqueue rules, claims and leases, exports and backoff.

Every test that takes ``db`` runs twice: on a real SQLite file in WAL mode and on a real
PostgreSQL database (``pg.db_location``: a server of the test session's own, a fresh
database per test). The claim tests race several threads and several spawned processes
against one database.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _processing_helpers import ALL_VIEWS, add_rows, claim_until_empty
from sqlalchemy import select

from bac_node.node.db import (
    MAX_JOB_ATTEMPTS,
    Database,
    Export,
    Job,
    Result,
    Study,
    open_database,
    study_by_uid,
    utcnow,
)
from bac_node.node.queue import (
    ResultRecord,
    backoff_delay,
    claim_exports,
    claim_job,
    complete_job,
    enqueue_ready_studies,
    export_failed,
    export_succeeded,
    fail_job,
    heartbeat,
    inputs_key,
    queue_counts,
    reap_leases,
    recent_failures,
    release_jobs,
    retry_dead,
)

T0 = dt.datetime(2025, 1, 6, 9, 0, 0)
RECORD = ResultRecord(
    path="results/k/1.2.3",
    files=("results/k/1.2.3/seg-R-CC-1.dcm", "results/k/1.2.3/sr.dcm"),
    sr_uid="2.25.1",
    grade=2,
    cardiovascular_flag=False,
    area_percent=1.5,
    model_version="test 0",
    analysis_seconds=1.0,
)


@pytest.fixture
def db(db_location: str | Path) -> Iterator[Database]:
    database = open_database(db_location)
    yield database
    database.dispose()


def _jobs(db: Database, study_uid: str | None = None) -> list[Job]:
    with db.read() as s:
        stmt = select(Job).join(Study).order_by(Job.id)
        if study_uid is not None:
            stmt = stmt.where(Study.study_uid == study_uid)
        return list(s.scalars(stmt))


def _study(db: Database, uid: str) -> Study:
    with db.read() as s:
        study = study_by_uid(s, uid)
        assert study is not None
        return study


def _queued_job(db: Database, uid: str = "1.2.3", now: dt.datetime = T0) -> int:
    add_rows(db, uid, received=now)
    assert enqueue_ready_studies(db, stable_after=60, now=now) == [uid]
    return _jobs(db, uid)[-1].id


# --- enqueue --------------------------------------------------------------------------


def test_four_views_are_queued_at_once(db: Database) -> None:
    add_rows(db, "1.2.3", received=T0)
    assert enqueue_ready_studies(db, stable_after=3600, now=T0) == ["1.2.3"]
    (job,) = _jobs(db)
    assert job.state == "pending" and job.attempts == 0
    assert job.inputs_key == inputs_key((f"1.2.3.{i}", "0" * 64) for i in range(1, 5))
    assert _study(db, "1.2.3").queued
    assert enqueue_ready_studies(db, stable_after=3600, now=T0) == []


def test_three_views_wait_until_the_study_is_stable(db: Database) -> None:
    add_rows(db, "1.2.3", ALL_VIEWS[:3], received=T0)
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=59)) == []
    assert _jobs(db) == [] and not _study(db, "1.2.3").queued
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=60)) == [
        "1.2.3"
    ]
    assert len(_jobs(db)) == 1


def test_a_late_instance_restarts_the_stability_clock(db: Database) -> None:
    add_rows(db, "1.2.3", ALL_VIEWS[:2], received=T0)
    add_rows(db, "1.2.3", ALL_VIEWS[2:3], received=T0 + dt.timedelta(seconds=50))
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=70)) == []
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=110)) == [
        "1.2.3"
    ]


def test_the_same_inputs_sent_twice_make_one_job(db: Database) -> None:
    job_id = _queued_job(db)
    add_rows(db, "1.2.3", received=T0 + dt.timedelta(seconds=5))  # same UIDs, same files
    assert not _study(db, "1.2.3").queued
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=5)) == []
    assert [j.id for j in _jobs(db)] == [job_id]
    assert _study(db, "1.2.3").queued


def test_a_new_instance_makes_a_new_job_and_supersedes_the_pending_one(db: Database) -> None:
    add_rows(db, "1.2.3", ALL_VIEWS[:3], received=T0)
    enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=60))
    add_rows(db, "1.2.3", ALL_VIEWS[3:], received=T0 + dt.timedelta(seconds=90))
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=90)) == [
        "1.2.3"
    ]
    old, new = _jobs(db)
    assert old.inputs_key != new.inputs_key
    assert (old.state, new.state) == ("superseded", "pending")
    assert f"superseded by job {new.id}" in (old.last_error or "")


def test_a_replaced_instance_makes_a_new_job_after_a_done_one(db: Database) -> None:
    job_id = _queued_job(db)
    claimed = claim_job(db, "w", 60, data_dir=Path("/d"), now=T0)
    assert claimed is not None and claimed.job_id == job_id
    assert complete_job(db, job_id, "w", RECORD, [], now=T0)
    add_rows(db, "1.2.3", ALL_VIEWS[:1], sha="1" * 64, received=T0 + dt.timedelta(seconds=9))
    assert enqueue_ready_studies(db, stable_after=60, now=T0 + dt.timedelta(seconds=9)) == ["1.2.3"]
    done, new = _jobs(db)
    assert (done.state, new.state) == ("done", "pending")


def test_a_job_whose_images_changed_after_queueing_is_not_claimed(db: Database) -> None:
    _queued_job(db)
    add_rows(db, "1.2.3", ALL_VIEWS[:1], sha="1" * 64, received=T0)  # not enqueued yet
    assert claim_job(db, "w", 60, data_dir=Path("/d"), now=T0) is None
    (job,) = _jobs(db)
    assert job.state == "superseded"
    assert enqueue_ready_studies(db, stable_after=60, now=T0) == ["1.2.3"]
    assert claim_job(db, "w", 60, data_dir=Path("/d"), now=T0) is not None


def test_a_study_without_an_mg_image_is_not_analysed(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    add_rows(db, "1.2.9", ("",), analysable=False, received=T0)
    with caplog.at_level(logging.INFO, logger="bac_node.node.queue"):
        assert enqueue_ready_studies(db, stable_after=0, now=T0) == []
    assert _jobs(db) == [] and _study(db, "1.2.9").queued
    assert "study 1.2.9: not analysed: no MG image" in caplog.text


# --- claims and leases ----------------------------------------------------------------


def test_claim_gives_absolute_paths_in_view_order(db: Database) -> None:
    job_id = _queued_job(db)
    job = claim_job(db, "w1", 60, data_dir=Path("/data"), now=T0)
    assert job is not None
    assert (job.job_id, job.study_uid, job.attempts) == (job_id, "1.2.3", 1)
    assert job.paths == tuple(Path(f"/data/x/1.2.3.{i}.dcm") for i in range(1, 5))
    (row,) = _jobs(db)
    assert (row.state, row.lease_owner, row.started_at) == ("running", "w1", T0)
    assert row.lease_expires == T0 + dt.timedelta(seconds=60)
    assert claim_job(db, "w2", 60, data_dir=Path("/data"), now=T0) is None


def test_claim_defaults_paths_to_the_sqlite_data_dir(tmp_path: Path) -> None:
    db = open_database(tmp_path)
    _queued_job(db)
    job = claim_job(db, "w1", 60)
    assert job is not None and job.paths[0] == tmp_path.resolve() / "x" / "1.2.3.1.dcm"
    db.dispose()


@pytest.mark.postgres
def test_only_sqlite_knows_its_data_dir(postgres_url: str) -> None:
    db = open_database(postgres_url)
    _queued_job(db)
    with pytest.raises(ValueError, match="pass data_dir"):
        claim_job(db, "w1", 60)
    db.dispose()


def test_threads_claim_each_job_exactly_once(db: Database) -> None:
    for n in range(30):
        add_rows(db, f"1.2.{n}", received=T0)
    assert len(enqueue_ready_studies(db, stable_after=60, now=T0)) == 30
    claimed: dict[str, list[int]] = {}
    start = threading.Barrier(4)

    def claim(owner: str) -> None:
        start.wait()
        mine = claimed.setdefault(owner, [])
        while (job := claim_job(db, owner, 300, data_dir=Path("/d"))) is not None:
            mine.append(job.job_id)
            time.sleep(0.01)  # "work", so that the other threads get the lock too

    threads = [threading.Thread(target=claim, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ids = [i for mine in claimed.values() for i in mine]
    assert Counter(ids) == Counter(j.id for j in _jobs(db))
    # A race, not a relay: several threads got jobs (which ones is up to the OS).
    assert sum(1 for mine in claimed.values() if mine) >= 2, {o: len(m) for o, m in claimed.items()}
    assert {j.lease_owner for j in _jobs(db)} == {o for o, mine in claimed.items() if mine}
    assert all(j.attempts == 1 for j in _jobs(db))


def test_processes_claim_each_job_exactly_once(db_location: str | Path, tmp_path: Path) -> None:
    db = open_database(db_location)
    for n in range(60):
        add_rows(db, f"1.2.{n}", received=T0)
    assert len(enqueue_ready_studies(db, stable_after=60, now=T0)) == 60
    ctx = multiprocessing.get_context("spawn")  # fork after torch was loaded deadlocks
    outs = [tmp_path / f"claimed-{i}.json" for i in range(3)]
    start = ctx.Barrier(3)
    processes = [
        ctx.Process(target=claim_until_empty, args=(db_location, f"p{i}", str(out), start))
        for i, out in enumerate(outs)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    claimed = [json.loads(out.read_text()) for out in outs]
    ids = [i for mine in claimed for i in mine]
    assert Counter(ids) == Counter(j.id for j in _jobs(db)), [len(c) for c in claimed]
    assert len(ids) == 60
    # A race, not a relay: several processes got jobs (which ones is up to the OS).
    assert sum(1 for c in claimed if c) >= 2, [len(c) for c in claimed]
    db.dispose()


def test_an_expired_lease_is_claimed_by_another_worker(db: Database) -> None:
    job_id = _queued_job(db)
    assert claim_job(db, "dead", 30, data_dir=Path("/d"), now=T0) is not None
    assert claim_job(db, "w2", 30, data_dir=Path("/d"), now=T0 + dt.timedelta(seconds=29)) is None
    later = T0 + dt.timedelta(seconds=31)
    job = claim_job(db, "w2", 30, data_dir=Path("/d"), now=later)
    assert job is not None and (job.job_id, job.attempts) == (job_id, 2)
    # The first worker comes back: its heartbeat, result and failure are refused.
    assert not heartbeat(db, job_id, "dead", 30, now=later)
    assert not complete_job(db, job_id, "dead", RECORD, ["A@h:1"], now=later)
    assert not fail_job(db, job_id, "dead", "boom", permanent=True, now=later)
    with db.read() as s:
        assert s.scalars(select(Result)).all() == [] and s.scalars(select(Export)).all() == []
    (row,) = _jobs(db)
    assert (row.state, row.lease_owner) == ("running", "w2")
    assert heartbeat(db, job_id, "w2", 30, now=later)
    assert complete_job(db, job_id, "w2", RECORD, ["A@h:1"], now=later)


def test_heartbeat_extends_the_lease(db: Database) -> None:
    job_id = _queued_job(db)
    claim_job(db, "w1", 30, data_dir=Path("/d"), now=T0)
    assert heartbeat(db, job_id, "w1", 30, now=T0 + dt.timedelta(seconds=25))
    assert claim_job(db, "w2", 30, data_dir=Path("/d"), now=T0 + dt.timedelta(seconds=40)) is None
    (row,) = _jobs(db)
    assert row.lease_expires == T0 + dt.timedelta(seconds=55)


def test_a_job_whose_worker_keeps_dying_fails(db: Database) -> None:
    job_id = _queued_job(db)
    now = T0
    for attempt in range(1, MAX_JOB_ATTEMPTS + 1):
        job = claim_job(db, f"w{attempt}", 10, data_dir=Path("/d"), now=now)
        assert job is not None and job.attempts == attempt
        now += dt.timedelta(seconds=11)
    assert claim_job(db, "last", 10, data_dir=Path("/d"), now=now) is None
    (row,) = _jobs(db)
    assert row.id == job_id and row.state == "failed"
    assert row.last_error == f"worker died {MAX_JOB_ATTEMPTS} times while analysing this study"


def test_complete_job_records_result_and_exports_in_one_go(db: Database) -> None:
    job_id = _queued_job(db)
    claim_job(db, "w1", 30, data_dir=Path("/d"), now=T0)
    later = T0 + dt.timedelta(seconds=3)
    assert complete_job(db, job_id, "w1", RECORD, ["A@h:1", "B@h:2", "A@h:1"], now=later)
    with db.read() as s:
        (result,) = s.scalars(select(Result)).all()
        exports = s.scalars(select(Export).order_by(Export.id)).all()
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.finished_at) == ("done", later)
        assert (result.study_uid, result.files, result.grade) == ("1.2.3", list(RECORD.files), 2)
        assert [(e.destination, e.state, e.next_try) for e in exports] == [
            ("A@h:1", "pending", later),
            ("B@h:2", "pending", later),
        ]
    assert not complete_job(db, job_id, "w1", RECORD, [], now=later)  # done already


def test_fail_job_retries_then_fails(db: Database) -> None:
    job_id = _queued_job(db)
    for attempt in range(1, MAX_JOB_ATTEMPTS + 1):
        assert claim_job(db, "w", 30, data_dir=Path("/d"), now=T0) is not None
        assert fail_job(db, job_id, "w", f"MemoryError\nline {attempt}", permanent=False, now=T0)
        (row,) = _jobs(db)
        assert row.attempts == attempt and row.last_error == f"MemoryError line {attempt}"
        assert row.state == ("failed" if attempt == MAX_JOB_ATTEMPTS else "pending")
    assert claim_job(db, "w", 30, data_dir=Path("/d"), now=T0) is None


def test_a_permanent_failure_is_final_until_retried(db: Database) -> None:
    job_id = _queued_job(db)
    claim_job(db, "w", 30, data_dir=Path("/d"), now=T0)
    assert fail_job(db, job_id, "w", "no analysable MG image", permanent=True, now=T0)
    assert claim_job(db, "w", 30, data_dir=Path("/d"), now=T0) is None
    assert retry_dead(db, "1.2.9") == 0  # another study
    assert retry_dead(db, "1.2.3") == 1
    (row,) = _jobs(db)
    assert (row.state, row.attempts) == ("pending", 0)
    assert claim_job(db, "w", 30, data_dir=Path("/d"), now=T0) is not None


def test_release_jobs_does_not_count_an_orderly_stop(db: Database) -> None:
    _queued_job(db, "1.2.3")
    _queued_job(db, "1.2.4")
    claim_job(db, "w1", 30, data_dir=Path("/d"), now=T0)
    claim_job(db, "w2", 30, data_dir=Path("/d"), now=T0)
    assert release_jobs(db, "w1") == 1
    states = sorted((j.state, j.attempts, j.lease_owner) for j in _jobs(db))
    assert states == [("pending", 0, None), ("running", 1, "w2")]


def test_reap_leases_returns_expired_work(db: Database) -> None:
    job_id = _queued_job(db)
    claim_job(db, "w1", 10, data_dir=Path("/d"), now=T0)
    assert complete_job(db, job_id, "w1", RECORD, ["A@h:1"], now=T0)
    _queued_job(db, "1.2.4")
    claim_job(db, "w1", 10, data_dir=Path("/d"), now=T0)
    assert len(claim_exports(db, "e1", 10, 5, data_dir=Path("/d"), now=T0)) == 1
    assert reap_leases(db, T0 + dt.timedelta(seconds=5)) == (0, 0)
    assert reap_leases(db, T0 + dt.timedelta(seconds=11)) == (1, 1)
    with db.read() as s:
        (export,) = s.scalars(select(Export)).all()
        assert (export.state, export.attempts, export.lease_owner) == ("pending", 0, None)
    assert [(j.state, j.lease_owner) for j in _jobs(db)] == [("done", "w1"), ("pending", None)]


# --- exports --------------------------------------------------------------------------


def _export(db: Database) -> int:
    job_id = _queued_job(db)
    claim_job(db, "w", 30, data_dir=Path("/d"), now=T0)
    assert complete_job(db, job_id, "w", RECORD, ["PACS@127.0.0.1:104"], now=T0)
    with db.read() as s:
        return s.scalars(select(Export.id)).one()


def test_claim_exports_gives_files_and_leases(db: Database) -> None:
    export_id = _export(db)
    (claimed,) = claim_exports(db, "e1", 30, 10, data_dir=Path("/data"), now=T0)
    assert claimed.export_id == export_id and claimed.study_uid == "1.2.3"
    assert claimed.files == tuple(Path("/data") / f for f in RECORD.files)
    assert claim_exports(db, "e2", 30, 10, data_dir=Path("/data"), now=T0) == []
    again = claim_exports(db, "e2", 30, 10, data_dir=Path("/d"), now=T0 + dt.timedelta(seconds=31))
    assert [c.export_id for c in again] == [export_id]  # the first exporter died
    assert not export_succeeded(db, export_id, owner="e1")
    assert export_succeeded(db, export_id, owner="e2")
    assert queue_counts(db)["exports"] == {"pending": 0, "sending": 0, "done": 1, "dead": 0}


def test_export_failures_back_off_then_go_dead_until_retried(db: Database) -> None:
    export_id = _export(db)
    rng = random.Random(7)
    now = T0
    delays = []
    for attempt in range(1, 5):
        assert claim_exports(db, "e", 30, 10, data_dir=Path("/d"), now=now)
        state = export_failed(
            db, export_id, "PACS@127.0.0.1:104: association rejected",
            max_attempts=4, backoff=10, cap=600, rng=rng, owner="e", now=now,
        )  # fmt: skip
        with db.read() as s:
            export = s.get(Export, export_id)
            assert export is not None and export.attempts == attempt
        if attempt < 4:
            assert state == "pending"
            delay = (export.next_try - now).total_seconds()
            assert 10 * 2 ** (attempt - 1) * 0.5 <= delay <= 10 * 2 ** (attempt - 1)
            delays.append(delay)
            assert claim_exports(db, "e", 30, 10, data_dir=Path("/d"), now=now) == []
            now = export.next_try
        else:
            assert state == "dead" and export.finished_at == now
    assert delays == sorted(delays)
    (failure,) = [f for f in recent_failures(db) if f.what.startswith("export")]
    assert (failure.study_uid, failure.state) == ("1.2.3", "dead")
    assert failure.what == "export to PACS@127.0.0.1:104"
    assert failure.last_error == "PACS@127.0.0.1:104: association rejected"
    assert queue_counts(db)["exports"]["dead"] == 1
    assert retry_dead(db) == 1
    with db.read() as s:
        export = s.get(Export, export_id)
        assert export is not None and (export.state, export.attempts) == ("pending", 0)
    assert claim_exports(db, "e", 30, 10, data_dir=Path("/d"))


def test_backoff_delay_stays_within_its_bounds() -> None:
    rng = random.Random(1234)
    for base, cap in ((1.0, 600.0), (10.0, 600.0), (0.01, 0.05), (3.0, 3.0)):
        for attempt in range(1, 80):
            nominal = min(cap, base * 2 ** (attempt - 1))
            samples = [backoff_delay(attempt, base, cap, rng) for _ in range(200)]
            assert all(0.5 * nominal <= d <= nominal for d in samples)
            assert max(samples) > 0.9 * nominal and min(samples) < 0.6 * nominal  # jittered
            assert max(samples) <= cap
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, 1.0, 10.0, rng)


def test_backoff_delay_is_reproducible_with_a_seed() -> None:
    first = [backoff_delay(a, 10, 600, random.Random(5)) for a in range(1, 12)]
    again = [backoff_delay(a, 10, 600, random.Random(5)) for a in range(1, 12)]
    assert first == again


def test_queue_counts_and_failures_for_status(db: Database) -> None:
    job_id = _queued_job(db)
    _queued_job(db, "1.2.4")
    claim_job(db, "w", 30, data_dir=Path("/d"), now=T0)
    fail_job(db, job_id, "w", "no analysable MG image (x: not DICOM)", permanent=True, now=T0)
    counts = queue_counts(db)
    assert counts["jobs"] == {"pending": 1, "running": 0, "done": 0, "failed": 1, "superseded": 0}
    assert counts["exports"] == {"pending": 0, "sending": 0, "done": 0, "dead": 0}
    (failure,) = recent_failures(db, 10)
    assert (failure.study_uid, failure.what, failure.state, failure.when) == (
        "1.2.3", "analysis", "failed", T0,
    )  # fmt: skip
    assert failure.last_error == "no analysable MG image (x: not DICOM)"


def test_the_queue_is_a_utc_clock(db: Database) -> None:
    """Without ``now`` the functions use utcnow (naive UTC), like the store's timestamps."""
    add_rows(db, "1.2.3")
    assert enqueue_ready_studies(db, stable_after=3600) == ["1.2.3"]
    job = claim_job(db, "w", 30, data_dir=Path("/d"))
    assert job is not None
    (row,) = _jobs(db)
    assert row.lease_expires is not None
    assert abs((row.lease_expires - utcnow()).total_seconds() - 30) < 5
