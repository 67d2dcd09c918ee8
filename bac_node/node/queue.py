"""The database as the queue: studies become jobs, jobs become results, results exports.

Every function here is one short transaction on :class:`~bac_node.node.db.Database`
and works on SQLite (the embedded default) and PostgreSQL (several worker hosts):

- On SQLite ``db.session()`` begins with ``BEGIN IMMEDIATE``, so a transaction holds
  the database's one write lock from its first read: a read-then-update (claiming a
  job) is atomic between threads and processes.
- On PostgreSQL the same queries add ``FOR UPDATE SKIP LOCKED`` (:func:`_locking`), so
  two hosts never claim one row and neither waits for the other.

Decisions a next engineer needs:

- **When a study is analysed.** A study with ``queued == False`` is ready when its
  analysable instances hold the four screening views (``R-CC``, ``L-CC``, ``R-MLO``,
  ``L-MLO``; ``Instance.view`` as the store sets it) or when nothing arrived for
  ``stable_after`` seconds. The store clears ``queued`` when an instance arrives.
- **The same inputs are never analysed or answered twice.** ``inputs_key`` is a
  sha256 over the sorted (SOP Instance UID, file sha256) pairs of the study's
  analysable instances and ``(study, inputs_key)`` is unique: the same study sent
  twice makes one job and one result set. A study that later gets new or replaced
  instances has new inputs and gets a new job; its SEG/SR UIDs derive from the new
  source UIDs, and its files go to their own folder (see the worker). Older jobs of
  the study that have not started are marked ``superseded``, and a job whose study's
  inputs changed after it was queued is superseded when a worker would claim it (a
  newer job follows), so a destination never gets a result for outdated inputs.
- **Leases.** A claimed job or export carries ``lease_owner`` and ``lease_expires``;
  a worker renews its job's lease (:func:`heartbeat`) while it runs. A job whose
  lease ran out is claimed again (its worker died) until ``MAX_JOB_ATTEMPTS`` claims
  were made, then it is ``failed`` ("worker died N times"). A result is recorded only
  by the lease's owner (:func:`complete_job`), in the same transaction that marks the
  job done and creates its exports: no half-recorded result, and a worker that lost
  its lease writes nothing.
- **Exports** are retried with capped exponential backoff and "equal jitter"
  (:func:`backoff_delay`), then dead-lettered (``dead``) until :func:`retry_dead`.
  An exporter that dies mid-send only loses its lease; the export is sent again
  (deterministic SOP Instance UIDs make a re-send harmless) without counting an attempt.

Times are naive UTC (:func:`~bac_node.node.db.utcnow`); every function takes ``now``
so tests need no sleeping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import os
import random
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from bac_node.node.db import (
    MAX_JOB_ATTEMPTS,
    Database,
    Export,
    Instance,
    Job,
    Result,
    Study,
    utcnow,
)

log = logging.getLogger(__name__)

#: The four screening views; a study with all of them is analysed at once.
SCREENING_VIEWS = frozenset({"R-CC", "L-CC", "R-MLO", "L-MLO"})

JOB_STATES = ("pending", "running", "done", "failed", "superseded")
EXPORT_STATES = ("pending", "sending", "done", "dead")

#: Folder of the data directory that holds every result.
RESULTS_DIR = "results"

#: Longest last_error kept (one line; the full story is in the log).
_ERROR_CHARS = 2000

_T = TypeVar("_T")


# --- records passed between the queue and its users ---------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds the lease of (plain data, detached from any session)."""

    job_id: int
    study_uid: str
    inputs_key: str
    paths: tuple[Path, ...]
    """Absolute paths of the study's analysable instances, in view order."""
    attempts: int


@dataclass(frozen=True)
class ResultRecord:
    """What a worker found, as :func:`complete_job` records it in a ``Result`` row."""

    path: str
    """Folder of the result files, relative to the data directory."""
    files: tuple[str, ...]
    """DICOM files to export, relative to the data directory: the SEGs, then the SR."""
    sr_uid: str
    grade: int | None
    cardiovascular_flag: bool
    area_percent: float | None
    """BAC area % of the side with the higher burden."""
    model_version: str
    analysis_seconds: float


@dataclass(frozen=True)
class ClaimedExport:
    """An export an exporter holds the lease of."""

    export_id: int
    result_id: int
    study_uid: str
    destination: str
    files: tuple[Path, ...]
    """Absolute paths of the files to send, SEGs then the SR."""
    attempts: int
    """Failed attempts before this one."""


@dataclass(frozen=True)
class Failure:
    """Something that went wrong, for ``bac-node status``."""

    study_uid: str
    what: str
    """"analysis" or "export to AE@host:port"."""
    state: str
    last_error: str
    when: dt.datetime | None
    """When it failed for good (failed job, dead export) or was last started (a job
    that will be retried); for an export that will be retried, its next try."""


# --- helpers ------------------------------------------------------------------------


_owner_numbers = itertools.count(1)


def default_owner(kind: str = "worker") -> str:
    """A lease owner unique to this host, process and object: ``host:pid:kind-N``."""
    return f"{socket.gethostname()}:{os.getpid()}:{kind}-{next(_owner_numbers)}"[:128]


def _locking(stmt: Select[_T], db: Database, *of: Any) -> Select[_T]:
    """``stmt`` with ``FOR UPDATE SKIP LOCKED`` where the database has it.

    SQLite has no row locks: ``BEGIN IMMEDIATE`` (see :class:`Database`) already holds
    the write lock for the whole transaction.
    """
    if db.dialect == "postgresql":
        return stmt.with_for_update(skip_locked=True, of=list(of) or None)
    return stmt


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _ERROR_CHARS else line[: _ERROR_CHARS - 1] + "…"


def data_dir_of(db: Database) -> Path:
    """The data directory of an SQLite database (the folder of its file)."""
    name = db.engine.url.database
    if db.dialect != "sqlite" or not name:
        raise ValueError("pass data_dir: only an SQLite database knows its data directory")
    return Path(name).resolve().parent


def inputs_key(instances: Iterable[tuple[str, str]]) -> str:
    """sha256 over sorted (SOP Instance UID, file sha256) pairs: the identity of a job."""
    digest = hashlib.sha256()
    for sop_uid, file_sha in sorted(instances):
        digest.update(f"{sop_uid}\t{file_sha}\n".encode())
    return digest.hexdigest()


def _analysable(study: Study) -> list[Instance]:
    return [i for i in study.instances if i.analysable]


def _study_key(study: Study) -> str:
    return inputs_key((i.sop_instance_uid, i.sha256) for i in _analysable(study))


_VIEW_ORDER = {"R-CC": 0, "L-CC": 1, "R-MLO": 2, "L-MLO": 3}


# --- studies → jobs -----------------------------------------------------------------


def enqueue_ready_studies(
    db: Database, *, stable_after: float, now: dt.datetime | None = None
) -> list[str]:
    """Make a job for every study that is ready; the Study Instance UIDs queued."""
    now = now or utcnow()
    stable_before = now - dt.timedelta(seconds=stable_after)
    queued: list[str] = []
    with db.session() as s:
        studies = s.scalars(
            _locking(select(Study).where(Study.queued.is_(False)).order_by(Study.id), db)
        ).all()
        for study in studies:
            analysable = _analysable(study)
            complete = {i.view for i in analysable} >= SCREENING_VIEWS
            if not complete and study.last_received > stable_before:
                continue
            study.queued = True
            if not analysable:
                log.info("study %s: not analysed: no MG image", study.study_uid)
                continue
            key = _study_key(study)
            job = s.scalars(
                select(Job).where(Job.study_id == study.id, Job.inputs_key == key)
            ).first()
            if job is not None and job.state != "superseded":
                log.info(
                    "study %s: same inputs as job %d (%s): not analysed again",
                    study.study_uid, job.id, job.state,
                )  # fmt: skip
                continue
            if job is None:
                job = Job(study_id=study.id, inputs_key=key, state="pending", created_at=now)
                s.add(job)
                s.flush()
            else:
                # The images changed and changed back (a replaced instance restored):
                # the superseded job is current again.
                job.state, job.attempts, job.last_error, job.finished_at = (
                    "pending", 0, None, None,
                )  # fmt: skip
            for older in s.scalars(
                select(Job).where(
                    Job.study_id == study.id, Job.state == "pending", Job.id != job.id
                )
            ):
                _supersede(older, job.id, now)
            queued.append(study.study_uid)
            log.info(
                "study %s: job %d queued (%d images, %s)",
                study.study_uid, job.id, len(analysable),
                "4 screening views" if complete else f"stable for {stable_after:g} s",
            )  # fmt: skip
    return queued


def _supersede(job: Job, newer: int | None, now: dt.datetime) -> None:
    job.state = "superseded"
    job.lease_owner = job.lease_expires = None
    job.finished_at = now
    job.last_error = (
        f"superseded by job {newer}: the study's images changed"
        if newer is not None
        else "superseded: the study's images changed after it was queued; a new job follows"
    )
    log.info("job %d: %s", job.id, job.last_error)


def claim_job(
    db: Database,
    owner: str,
    lease_seconds: float,
    *,
    data_dir: Path | None = None,
    now: dt.datetime | None = None,
) -> ClaimedJob | None:
    """Take the oldest claimable job (pending, or running with an expired lease).

    ``data_dir`` makes the instance paths absolute (default: the SQLite file's folder).
    A running job whose lease expired after ``MAX_JOB_ATTEMPTS`` claims becomes failed.
    """
    now = now or utcnow()
    root = data_dir if data_dir is not None else data_dir_of(db)
    with db.session() as s:
        _fail_dead_workers(s, db, now)
        while True:
            job = s.scalars(
                _locking(
                    select(Job)
                    .where(
                        or_(
                            Job.state == "pending",
                            and_(Job.state == "running", Job.lease_expires < now),
                        ),
                        Job.attempts < MAX_JOB_ATTEMPTS,
                    )
                    .order_by(Job.created_at, Job.id)
                    .limit(1),
                    db,
                )
            ).first()
            if job is None:
                return None
            if _study_key(job.study) != job.inputs_key:
                _supersede(job, None, now)
                continue
            if job.state == "running":
                log.warning(
                    "job %d (study %s): lease of %s expired; claimed again",
                    job.id, job.study.study_uid, job.lease_owner,
                )  # fmt: skip
            job.state = "running"
            job.lease_owner = owner
            job.lease_expires = now + dt.timedelta(seconds=lease_seconds)
            job.attempts += 1
            job.started_at = now
            instances = sorted(
                _analysable(job.study),
                key=lambda i: (_VIEW_ORDER.get(i.view, 9), i.sop_instance_uid),
            )
            return ClaimedJob(
                job_id=job.id,
                study_uid=job.study.study_uid,
                inputs_key=job.inputs_key,
                paths=tuple(root / i.path for i in instances),
                attempts=job.attempts,
            )


def _fail_dead_workers(s: Session, db: Database, now: dt.datetime) -> int:
    """Running jobs whose lease expired after their last allowed attempt → failed."""
    jobs = s.scalars(
        _locking(
            select(Job).where(
                Job.state == "running",
                Job.lease_expires < now,
                Job.attempts >= MAX_JOB_ATTEMPTS,
            ),
            db,
        )
    ).all()
    for job in jobs:
        job.state = "failed"
        job.last_error = f"worker died {job.attempts} times while analysing this study"
        job.lease_owner = job.lease_expires = None
        job.finished_at = now
        log.error("job %d (study %s): %s", job.id, job.study.study_uid, job.last_error)
    return len(jobs)


def heartbeat(
    db: Database, job_id: int, owner: str, lease_seconds: float, *, now: dt.datetime | None = None
) -> bool:
    """Renew a job's lease; False when ``owner`` no longer holds it."""
    now = now or utcnow()
    with db.session() as s:
        renewed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "running", Job.lease_owner == owner)
            .values(lease_expires=now + dt.timedelta(seconds=lease_seconds))
        )
        return bool(renewed.rowcount)  # type: ignore[attr-defined]


def _owned_job(s: Session, db: Database, job_id: int, owner: str) -> Job | None:
    return s.scalars(
        _locking(
            select(Job).where(Job.id == job_id, Job.state == "running", Job.lease_owner == owner),
            db,
        )
    ).first()


def complete_job(
    db: Database,
    job_id: int,
    owner: str,
    result: ResultRecord,
    destinations: Sequence[str],
    *,
    now: dt.datetime | None = None,
) -> bool:
    """Record a job's result, create one export per destination and mark the job done.

    One transaction, and only while ``owner`` holds the job: False (nothing written)
    when the lease was lost to another worker.
    """
    now = now or utcnow()
    with db.session() as s:
        job = _owned_job(s, db, job_id, owner)
        if job is None:
            return False
        row = Result(
            job_id=job.id,
            study_uid=job.study.study_uid,
            path=result.path,
            files=list(result.files),
            sr_uid=result.sr_uid,
            grade=result.grade,
            cardiovascular_flag=result.cardiovascular_flag,
            area_percent=result.area_percent,
            model_version=result.model_version,
            analysis_seconds=result.analysis_seconds,
            created_at=now,
        )
        s.add(row)
        s.flush()
        for destination in dict.fromkeys(destinations):
            s.add(
                Export(
                    result_id=row.id,
                    destination=destination,
                    state="pending",
                    next_try=now,
                    created_at=now,
                )
            )
        job.state = "done"
        job.lease_expires = None
        job.last_error = None
        job.finished_at = now
        return True


def fail_job(
    db: Database,
    job_id: int,
    owner: str,
    error: str,
    *,
    permanent: bool,
    now: dt.datetime | None = None,
) -> bool:
    """Record a failed attempt: ``failed`` when permanent or out of attempts, else
    ``pending`` again. False when ``owner`` no longer holds the job (nothing written)."""
    now = now or utcnow()
    with db.session() as s:
        job = _owned_job(s, db, job_id, owner)
        if job is None:
            return False
        job.last_error = _one_line(error)
        job.lease_owner = job.lease_expires = None
        if permanent or job.attempts >= MAX_JOB_ATTEMPTS:
            job.state = "failed"
            job.finished_at = now
        else:
            job.state = "pending"
        return True


def release_jobs(db: Database, owner: str) -> int:
    """Give back the running jobs of ``owner`` (an orderly stop: the attempt is not
    counted); how many."""
    with db.session() as s:
        jobs = s.scalars(
            _locking(select(Job).where(Job.state == "running", Job.lease_owner == owner), db)
        ).all()
        for job in jobs:
            job.state = "pending"
            job.lease_owner = job.lease_expires = None
            job.attempts = max(0, job.attempts - 1)
            log.info("job %d released by %s", job.id, owner)
        return len(jobs)


# --- exports ------------------------------------------------------------------------


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...).

    Capped exponential backoff with "equal jitter": ``min(cap, base * 2**(attempt-1))``
    times a uniform factor in [0.5, 1.0], so retries of many exports that failed
    together spread out, yet never come sooner than half the nominal delay.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    nominal = min(cap, base * 2.0 ** min(attempt - 1, 64))
    return nominal * rng.uniform(0.5, 1.0)


def claim_exports(
    db: Database,
    owner: str,
    lease_seconds: float,
    limit: int,
    *,
    data_dir: Path | None = None,
    now: dt.datetime | None = None,
) -> list[ClaimedExport]:
    """Take up to ``limit`` due exports (pending and due, or sending with an expired lease)."""
    now = now or utcnow()
    root = data_dir if data_dir is not None else data_dir_of(db)
    claimed = []
    with db.session() as s:
        exports = s.scalars(
            _locking(
                select(Export)
                .where(
                    or_(
                        and_(Export.state == "pending", Export.next_try <= now),
                        and_(Export.state == "sending", Export.lease_expires < now),
                    )
                )
                .order_by(Export.next_try, Export.id)
                .limit(limit),
                db,
            )
        ).all()
        for export in exports:
            export.state = "sending"
            export.lease_owner = owner
            export.lease_expires = now + dt.timedelta(seconds=lease_seconds)
            claimed.append(
                ClaimedExport(
                    export_id=export.id,
                    result_id=export.result_id,
                    study_uid=export.result.study_uid,
                    destination=export.destination,
                    files=tuple(root / f for f in export.result.files),
                    attempts=export.attempts,
                )
            )
    return claimed


def export_succeeded(
    db: Database, export_id: int, *, owner: str | None = None, now: dt.datetime | None = None
) -> bool:
    """Mark an export done (False if ``owner`` is given and no longer holds it)."""
    now = now or utcnow()
    with db.session() as s:
        export = _export(s, db, export_id, owner)
        if export is None:
            return False
        export.state = "done"
        export.lease_owner = export.lease_expires = None
        export.last_error = None
        export.finished_at = now
        return True


def export_failed(
    db: Database,
    export_id: int,
    error: str,
    *,
    max_attempts: int,
    backoff: float,
    cap: float,
    rng: random.Random,
    owner: str | None = None,
    now: dt.datetime | None = None,
) -> str | None:
    """Count a failed attempt: ``dead`` after ``max_attempts``, else ``pending`` again
    after :func:`backoff_delay`. The new state (None if ``owner`` lost the lease)."""
    now = now or utcnow()
    with db.session() as s:
        export = _export(s, db, export_id, owner)
        if export is None:
            return None
        export.attempts += 1
        export.last_error = _one_line(error)
        export.lease_owner = export.lease_expires = None
        if export.attempts >= max_attempts:
            export.state = "dead"
            export.finished_at = now
        else:
            export.state = "pending"
            delay = backoff_delay(export.attempts, backoff, cap, rng)
            export.next_try = now + dt.timedelta(seconds=delay)
        return export.state


def _export(s: Session, db: Database, export_id: int, owner: str | None) -> Export | None:
    stmt = select(Export).where(Export.id == export_id, Export.state == "sending")
    if owner is not None:
        stmt = stmt.where(Export.lease_owner == owner)
    return s.scalars(_locking(stmt, db)).first()


def retry_dead(
    db: Database, study_uid: str | None = None, *, now: dt.datetime | None = None
) -> int:
    """Try again: dead exports (of one study, or all) → pending with their attempts reset;
    with ``study_uid``, also its failed jobs. How many rows were reset."""
    now = now or utcnow()
    reset = 0
    with db.session() as s:
        stmt = select(Export).where(Export.state == "dead")
        if study_uid is not None:
            stmt = stmt.join(Result).where(Result.study_uid == study_uid)
        for export in s.scalars(_locking(stmt, db, Export)).all():
            export.state = "pending"
            export.attempts = 0
            export.next_try = now
            export.finished_at = None
            reset += 1
        if study_uid is not None:
            jobs = s.scalars(
                _locking(
                    select(Job)
                    .join(Study)
                    .where(Study.study_uid == study_uid, Job.state == "failed"),
                    db,
                    Job,
                )
            ).all()
            for job in jobs:
                job.state = "pending"
                job.attempts = 0
                job.finished_at = None
                reset += 1
    log.info("retry: %d dead export(s) / failed job(s) set pending", reset)
    return reset


def reap_leases(db: Database, now: dt.datetime | None = None) -> tuple[int, int]:
    """Expired leases: running jobs → pending (or failed after their last attempt),
    sending exports → pending. (jobs, exports) reaped."""
    now = now or utcnow()
    with db.session() as s:
        jobs = _fail_dead_workers(s, db, now)
        expired = s.scalars(
            _locking(select(Job).where(Job.state == "running", Job.lease_expires < now), db)
        ).all()
        for job in expired:
            log.warning(
                "job %d (study %s): lease of %s expired; pending again",
                job.id, job.study.study_uid, job.lease_owner,
            )  # fmt: skip
            job.state = "pending"
            job.lease_owner = job.lease_expires = None
        exports = s.scalars(
            _locking(
                select(Export).where(Export.state == "sending", Export.lease_expires < now), db
            )
        ).all()
        for export in exports:
            export.state = "pending"
            export.lease_owner = export.lease_expires = None
            export.next_try = now
        return jobs + len(expired), len(exports)


# --- status -------------------------------------------------------------------------


def queue_counts(db: Database) -> dict[str, dict[str, int]]:
    """``{"jobs": {state: n}, "exports": {state: n}}``, every known state present."""
    with db.read() as s:
        jobs = dict.fromkeys(JOB_STATES, 0)
        for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs[state] = n
        exports = dict.fromkeys(EXPORT_STATES, 0)
        for state, n in s.execute(select(Export.state, func.count()).group_by(Export.state)):
            exports[state] = n
    return {"jobs": jobs, "exports": exports}


def recent_failures(db: Database, limit: int = 20) -> list[Failure]:
    """The latest failed or retrying jobs and exports, newest first."""
    failures: list[Failure] = []
    with db.read() as s:
        job_rows = s.execute(
            select(Study.study_uid, Job.state, Job.last_error, Job.finished_at, Job.started_at)
            .join(Study)
            .where(Job.last_error.is_not(None), Job.state.in_(("failed", "pending", "running")))
            .order_by(func.coalesce(Job.finished_at, Job.started_at).desc())
            .limit(limit)
        ).all()
        for uid, state, error, finished, started in job_rows:
            failures.append(Failure(uid, "analysis", state, error or "", finished or started))
        export_rows = s.execute(
            select(
                Result.study_uid,
                Export.destination,
                Export.state,
                Export.last_error,
                Export.finished_at,
                Export.next_try,
            )
            .join(Result)
            .where(Export.last_error.is_not(None), Export.state.in_(("dead", "pending", "sending")))
            .order_by(func.coalesce(Export.finished_at, Export.next_try).desc())
            .limit(limit)
        ).all()
        for uid, destination, state, error, finished, next_try in export_rows:
            failures.append(
                Failure(uid, f"export to {destination}", state, error or "", finished or next_try)
            )
    failures.sort(key=lambda f: f.when or dt.datetime.min, reverse=True)
    return failures[:limit]
