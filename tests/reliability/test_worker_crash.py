"""Worker crash: a worker killed mid-analysis, another stalled past its lease; one result set.

``bac-node serve --workers 0`` (SCP, scheduler, exporter) and three ``bac-node worker``
processes (tiny test model) share one data directory; the lease is 6 s. One full-size
4-view study is sent. The test watches the job's row and acts on whichever worker holds
the lease:

1. the first claimer is stalled (SIGSTOP) right after its claim: a worker that hangs
   (swapped out, a stuck NFS read) and so stops renewing its lease;
2. once the lease ran out and a second worker claimed the job, that one is killed with
   SIGKILL while the job is still running and has no result (mid-analysis);
3. the third claims it when that lease runs out and finishes;
4. the stalled worker is resumed (SIGCONT): it finishes its analysis too, but it lost
   the lease, so it must record nothing (``complete_job`` checks the lease owner) and
   say "result dropped" in its log.

Asserted: one Result row, the job ``done`` after 3 attempts, and at the destination
(dcmtk's storescp keeping every copy) exactly one result set, each object once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _crash import (
    RESULT_OBJECTS,
    SENDER_AE,
    Child,
    Senders,
    deliveries,
    free_port,
    node_env,
    serve_child,
    tiny_studies,
    wait_for_port,
    worker_child,
)
from _processing_helpers import save_tiny_model
from peers import StoreSCP
from sqlalchemy import select

from bac_node.node.db import Database, Job, Result, open_database

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

LEASE_SECONDS = 6
#: How a worker's log line ends a job (bac_node/node/worker.py): only the first is right
#: for a worker that lost its lease.
JOB_ENDS = (
    "result dropped", " done: grade", "; dropped (", "crashed", "cannot be analysed",
    "cannot claim a job",
)  # fmt: skip


def job_row(db: Database) -> tuple[str, str, int] | None:
    with db.read() as session:
        row = session.execute(select(Job.state, Job.lease_owner, Job.attempts)).first()
    return None if row is None else (str(row[0]), str(row[1] or ""), int(row[2]))


def results(db: Database) -> int:
    with db.read() as session:
        return len(session.scalars(select(Result.id)).all())


def wait(condition: Callable[[], Any], timeout: float, what: str, *logs: Child) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.log.name}\n{c.tail(2500)}" for c in logs)
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{tails}")
        time.sleep(0.02)
    return value


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.signal(signal.SIGCONT)
        child.stop(timeout=30)


def test_a_killed_worker_s_job_is_finished_by_another_once(
    tmp_path: Path, children: list[Child]
) -> None:
    model = save_tiny_model(tmp_path / "tiny.safetensors")
    study = tiny_studies(1, factor=1, seed=7)
    with StoreSCP(tmp_path / "dest", ae_title="DEST", unique_filenames=True) as dest:
        env = node_env(
            model, allowed_peers=SENDER_AE, destinations=dest.destination, stable_after=3600,
            lease_seconds=LEASE_SECONDS, network_timeout=5, export_backoff=1,
            export_backoff_cap=2,
        )  # fmt: skip
        env["OMP_NUM_THREADS"] = "1"
        data_dir, port = tmp_path / "node", free_port()
        serve = serve_child(data_dir, port, env)
        children.append(serve.start())
        workers = [worker_child(data_dir, env, f"worker-{i}") for i in range(3)]
        children.extend(w.start() for w in workers)
        wait_for_port(port, 120, serve.alive, serve)
        sending = Senders(study, port, 1).start()
        sending.join(60)
        assert len(sending.stats.acknowledged) == 4, sending.stats

        db = open_database(data_dir)
        try:

            def holder(exclude: set[int]) -> Child | None:
                row = job_row(db)
                if row is None or row[0] != "running":
                    return None
                pid = int(row[1].split(":")[1]) if row[1].count(":") >= 2 else -1
                return next((w for w in workers if w.pid == pid and pid not in exclude), None)

            stalled = wait(lambda: holder(set()), 180, "a first claim", serve, *workers)
            stalled.signal(signal.SIGSTOP)
            assert results(db) == 0
            killed = wait(lambda: holder({stalled.pid}), 60, "a claim after the lease ran out",
                          serve, *workers)  # fmt: skip
            row = job_row(db)
            assert row is not None and row[0] == "running" and results(db) == 0, row
            killed.kill9()  # mid-analysis: the job runs and has no result
            assert results(db) == 0
            finisher = wait(lambda: holder({stalled.pid, killed.pid}), 60, "a third claim",
                            serve, *workers)  # fmt: skip
            wait(lambda: (job_row(db) or ("",))[0] == "done", 120, "the job done", *workers)
            stalled.signal(signal.SIGCONT)
            # Its heartbeat notices the lost lease first; wait for the end of its job.
            ended = wait(lambda: next((e for e in JOB_ENDS if e in stalled.tail(20000)), ""),
                         180, "the stalled worker to end its job", stalled)  # fmt: skip
            assert ended == "result dropped", stalled.tail(3000)
            dest.wait_for_files(RESULT_OBJECTS, timeout=60)
            time.sleep(3)  # a second result's export would land by now
            row = job_row(db)
            assert row is not None and row[0] == "done" and row[2] == 3, row
            assert results(db) == 1
        finally:
            db.dispose()
        received = deliveries(dest.received())
    copies = Counter(d.sop_uid for d in received)
    modalities = Counter(d.modality for d in received)
    assert modalities == {"SEG": 4, "SR": 1}, modalities
    assert all(n == 1 for n in copies.values()), copies
    assert "done" in finisher.tail(20000)
