"""The node's clocks: APScheduler runs enqueue, export, lease reaping and retention.

:class:`NodeScheduler` wraps an APScheduler 3.x ``BackgroundScheduler`` with one
interval job per tick (``max_instances=1``: a slow tick is never run twice at once;
``coalesce=True``: ticks missed while one ran are run once, not in a burst):

========================  ==========  =====================================================
tick                      every       what
========================  ==========  =====================================================
:meth:`enqueue_tick`      1 s         studies complete (4 views) or stable → jobs
:meth:`export_tick`       1 s         due exports sent (none without an exporter)
:meth:`reap_tick`         10 s        expired job/export leases → pending
:meth:`retention_tick`    1 h         inputs of studies analysed > ``retention_days`` ago
                                      deleted (only when ``retention_days`` > 0)
========================  ==========  =====================================================

Every tick is a plain method, callable without the scheduler (tests call them
directly), and logs its own exceptions: a tick that fails (a locked database) is
tried again at its next run and never stops the others. The worker is not a tick: it
runs in its own threads or processes (:mod:`bac_node.node.service`).

Retention deletes the received images of a study whose latest job is done and whose
result is older than ``retention_days``, and marks the study ``purged``; its results
(SEG, SR, summary) and its database rows are kept. A study with newer images
(``queued`` is False) or a job still to run is never purged.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from bac_node.config import Settings
from bac_node.node.db import Database, Job, Result, Study, utcnow
from bac_node.node.export import Exporter
from bac_node.node.queue import enqueue_ready_studies, reap_leases

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def purge_expired_inputs(
    db: Database, data_dir: Path, retention_days: float, *, now: dt.datetime | None = None
) -> list[str]:
    """Delete the input files of studies whose result is older than ``retention_days``;
    the Study Instance UIDs purged."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=retention_days)
    purged: list[str] = []
    # One write transaction: the store cannot commit a new instance of a study while its
    # files are deleted (it would clear ``queued`` and be seen here). On PostgreSQL the
    # studies' rows are locked for that (a study being written now waits for the next run).
    with db.session() as s:
        stmt = select(Study).where(Study.purged.is_(False), Study.queued.is_(True))
        if db.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        studies = s.scalars(stmt.order_by(Study.id)).all()
        for study in studies:
            latest = s.scalars(
                select(Job)
                .where(Job.study_id == study.id)
                .order_by(Job.created_at.desc(), Job.id.desc())
            ).first()
            if latest is None or latest.state != "done":
                continue
            result = s.scalars(select(Result).where(Result.job_id == latest.id)).first()
            if result is None or result.created_at > cutoff:
                continue
            for instance in study.instances:
                try:
                    (data_dir / instance.path).unlink(missing_ok=True)
                except OSError as exc:
                    log.warning(
                        "retention: cannot delete %s of study %s (%s)",
                        instance.sop_instance_uid, study.study_uid, exc.strerror,
                    )  # fmt: skip
            study.purged = True
            purged.append(study.study_uid)
            log.info(
                "retention: received images of study %s deleted (%d instance(s)); results kept",
                study.study_uid, len(study.instances),
            )  # fmt: skip
    return purged


class NodeScheduler:
    """The node's periodic work on one database."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        exporter: Exporter | None,
        clock: Callable[[], dt.datetime] = utcnow,
        enqueue_every: float = 1.0,
        export_every: float = 1.0,
        reap_every: float = 10.0,
        retention_every: float = 3600.0,
    ) -> None:
        self.settings = settings
        self.db = db
        self.exporter = exporter
        self.clock = clock
        self.intervals = {
            "enqueue": enqueue_every,
            "export": export_every,
            "reap": reap_every,
            "retention": retention_every,
        }
        self._scheduler: BackgroundScheduler | None = None

    # --- ticks ----------------------------------------------------------------------

    def enqueue_tick(self) -> list[str]:
        """Studies ready for analysis become jobs; their UIDs."""
        return self._guard(
            "enqueue",
            lambda: enqueue_ready_studies(
                self.db, stable_after=self.settings.stable_after, now=self.clock()
            ),
            [],
        )

    def export_tick(self) -> int:
        """Send due exports; how many were attempted."""
        exporter = self.exporter
        if exporter is None:
            return 0
        return self._guard("export", exporter.run_once, 0)

    def reap_tick(self) -> tuple[int, int]:
        """Expired leases back to pending: (jobs, exports)."""
        return self._guard("reap", lambda: reap_leases(self.db, self.clock()), (0, 0))

    def retention_tick(self) -> list[str]:
        """Purge old inputs when ``retention_days`` > 0; the studies purged."""
        days = self.settings.retention_days
        if days <= 0:
            return []
        return self._guard(
            "retention",
            lambda: purge_expired_inputs(self.db, self.settings.data_dir, days, now=self.clock()),
            [],
        )

    def _guard(self, name: str, tick: Callable[[], _T], fallback: _T) -> _T:
        try:
            return tick()
        except Exception:  # logged here; the next run tries again
            log.exception("scheduler: %s tick failed", name)
            return fallback

    # --- the scheduler --------------------------------------------------------------

    def start(self) -> None:
        """Start the ticks in a background thread (the first run of each is immediate)."""
        if self._scheduler is not None:
            raise RuntimeError("the scheduler is already started")
        scheduler = BackgroundScheduler(timezone=dt.UTC)
        first = dt.datetime.now(dt.UTC)
        ticks: list[tuple[str, Callable[[], Any]]] = [
            ("enqueue", self.enqueue_tick),
            ("reap", self.reap_tick),
        ]
        if self.exporter is not None:
            ticks.append(("export", self.export_tick))
        if self.settings.retention_days > 0:
            ticks.append(("retention", self.retention_tick))
        for name, tick in ticks:
            scheduler.add_job(
                tick, "interval", seconds=self.intervals[name], id=name, name=name,
                max_instances=1, coalesce=True, next_run_time=first,
                misfire_grace_time=None,
            )  # fmt: skip
        scheduler.start()
        self._scheduler = scheduler
        log.info(
            "scheduler started: %s",
            ", ".join(f"{name} every {self.intervals[name]:g} s" for name, _ in ticks),
        )

    @property
    def scheduled(self) -> list[str]:
        """Names of the ticks the running scheduler runs (empty when stopped)."""
        return [job.id for job in self._scheduler.get_jobs()] if self._scheduler else []

    @property
    def running(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.running)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the ticks; with ``wait``, after the ones running now have finished."""
        if self._scheduler is None:
            return
        self._scheduler.shutdown(wait=wait)
        self._scheduler = None
        log.info("scheduler stopped")
