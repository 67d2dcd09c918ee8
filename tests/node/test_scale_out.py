"""Scale-out acceptance: one ingest node and three worker processes on one PostgreSQL.

The topology of ``deploy/compose.yaml``, on one machine: ``bac-node serve --workers 0``
(C-STORE in, the scheduler that queues studies, the exporter) and three
``bac-node worker --database URL --data-dir DIR`` processes, all on a PostgreSQL server
of the test's own (``pg.py``), results sent to dcmtk's storescp. 100 small studies (one
tiny phantom study copied with new UIDs) go in with storescu; one worker is killed with
SIGKILL while it holds a job. Every study must be analysed once (one done job, one
result), every result exported, and the dead worker's job finished by another worker
once its lease ran out.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from _processing_helpers import save_tiny_model
from peers import StoreSCP, free_port, storescu, wait_for_port
from pg import TEMPLATE, PostgresServer
from sqlalchemy import func, select

from bac_node.node.db import Database, Export, Job, Result, Study, open_database, utcnow
from benchmarks.bench_workers import clone_studies, phantom

STUDIES = 100
NODE_AE, SENDER_AE, DEST_AE = "BACNODE", "MODALITY", "PACS"
LEASE_SECONDS = 4  # heartbeats every 4/3 s; a dead worker's job is free after 4 s
pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.dcmtk, pytest.mark.network]


class Processes:
    """bac-node subprocesses with the test's settings; each logs to ``<name>.log``."""

    def __init__(self, folder: Path, **settings: str) -> None:
        self.folder = folder
        self.env = dict(
            os.environ, BAC_NODE_ALLOCATOR_TUNED="1", BAC_NODE_DEVICE="cpu",
            BAC_NODE_MIN_FREE_MB="1", BAC_NODE_LOG_LEVEL="INFO",
            **{f"BAC_NODE_{k.upper()}": v for k, v in settings.items()},
        )  # fmt: skip
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "bac_node", *args], env=self.env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.running[name] = child
        return child

    def logs(self, chars: int = 3000) -> str:
        texts = {n: (self.folder / f"{n}.log").read_text(errors="replace") for n in self.running}
        return "\n".join(f"--- {n}.log ---\n{text[-chars:]}" for n, text in texts.items())

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.running[name].poll()
            assert code is None, f"{name} exited with {code}\n{self.logs()}"

    def stop_all(self) -> dict[str, int]:
        for child in self.running.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        codes = {}
        for name, child in self.running.items():
            try:
                codes[name] = child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                codes[name] = child.wait(30)
        return codes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Processes]]:
    made: list[Processes] = []
    yield made
    for group in made:
        group.stop_all()


def _counts(db: Database) -> dict[str, int]:
    with db.read() as s:
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        exports = dict(s.execute(select(Export.state, func.count()).group_by(Export.state)).all())
    return {**{f"jobs {k}": v for k, v in jobs.items()},
            **{f"exports {k}": v for k, v in exports.items()}}  # fmt: skip


def _held_by(db: Database, pid: int) -> list[Job]:
    """Running jobs whose lease a worker process ``pid`` holds."""
    with db.read() as s:
        return list(
            s.scalars(
                select(Job).where(Job.state == "running", Job.lease_owner.contains(f":{pid}:"))
            )
        )


def _wait(condition: Callable[[], bool], timeout: float, what: str, group: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{group.logs()}")
        time.sleep(0.05)


def test_three_workers_on_postgresql_analyse_and_export_each_study_once(
    postgres_server: PostgresServer, tmp_path: Path, processes: list[Processes]
) -> None:
    url = postgres_server.create_database(template=TEMPLATE)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    model = save_tiny_model(tmp_path / "tiny.safetensors")
    db = open_database(url)
    with StoreSCP(tmp_path / "pacs", ae_title=DEST_AE) as pacs:
        group = Processes(
            tmp_path, database=url, model=str(model), lease_seconds=str(LEASE_SECONDS),
            destinations=pacs.destination, allowed_peers=SENDER_AE, stable_after="60",
            export_backoff="1", export_backoff_cap="2", network_timeout="10",
        )  # fmt: skip
        processes.append(group)
        port = free_port()
        node = group.start(
            "serve", "--data-dir", str(data_dir), "--port", str(port), "--ae-title", NODE_AE,
            "serve", "--host", "127.0.0.1", "--workers", "0",
        )  # fmt: skip
        workers = {
            f"worker-{i}": group.start(
                f"worker-{i}", "worker", "--database", url, "--data-dir", str(data_dir)
            )
            for i in range(3)
        }
        # The studies are made while the processes start (both take seconds).
        studies = clone_studies(phantom(tmp_path / "phantom"), tmp_path / "studies", STUDIES)
        wait_for_port("127.0.0.1", port, timeout=240, alive=lambda: node.poll() is None)
        sent = storescu([f for files in studies for f in files], port=port, called_ae=NODE_AE,
                        calling_ae=SENDER_AE, timeout=300)  # fmt: skip
        assert sent.returncode == 0, sent.output

        # Kill a worker while it holds a job: the one that claimed a job last.
        _wait(lambda: any(_held_by(db, w.pid) for w in workers.values()), 240,
              "a worker to claim a job", group)  # fmt: skip
        victim_name, victim = max(
            ((n, w) for n, w in workers.items() if _held_by(db, w.pid)),
            key=lambda item: max(
                j.started_at or dt.datetime.min for j in _held_by(db, item[1].pid)
            ),
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        killed_at = utcnow()
        orphans = _held_by(db, victim.pid)  # what it held when it died: frozen now
        assert orphans, f"{victim_name} held no job when killed: {_counts(db)}"
        (orphan,) = orphans
        assert orphan.lease_expires is not None
        group.check_alive("serve", *(n for n in workers if n != victim_name))

        def all_done() -> bool:
            group.check_alive("serve")
            counts = _counts(db)
            return counts.get("jobs done") == STUDIES and counts.get("exports done") == STUDIES

        _wait(all_done, 600, f"{STUDIES} jobs and exports done", group)
        received = pacs.wait_for_files(STUDIES * 5, timeout=60)  # 4 SEG + 1 SR per study

    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == STUDIES
        jobs = list(s.scalars(select(Job)))
        results = list(s.scalars(select(Result)))
        exports = list(s.scalars(select(Export)))
    # Each study analysed once: one job, done, one result; every result exported once.
    assert len(jobs) == STUDIES and {j.state for j in jobs} == {"done"}
    assert len({j.study_id for j in jobs}) == STUDIES
    assert len(results) == STUDIES and len({r.study_uid for r in results}) == STUDIES
    assert len({r.job_id for r in results}) == STUDIES
    assert len(exports) == STUDIES and {e.state for e in exports} == {"done"}
    assert {e.destination for e in exports} == {pacs.destination}
    # Work was shared: the three workers each finished jobs (the victim before it died).
    owners = {j.lease_owner.split(":")[1] for j in jobs if j.lease_owner}
    assert len(owners - {str(victim.pid)}) == 2, owners
    # The dead worker's job: claimed again once its lease ran out, finished by another.
    finished = next(j for j in jobs if j.id == orphan.id)
    assert finished.attempts == 2 and finished.lease_owner is not None
    assert f":{victim.pid}:" not in finished.lease_owner
    assert finished.started_at is not None and finished.started_at >= orphan.lease_expires
    assert orphan.lease_expires <= killed_at + dt.timedelta(seconds=LEASE_SECONDS)
    # Everything the results name arrived at the PACS, nothing else, nothing twice.
    expected = set()
    for result in results:
        for name in result.files:
            ds = pydicom.dcmread(data_dir / name, stop_before_pixels=True)
            expected.add(str(ds.SOPInstanceUID))
    got = [path.name.split(".", 1)[1] for path in received]
    assert len(got) == len(set(got)) and set(got) == expected
    db.dispose()
    codes = group.stop_all()
    assert {n: c for n, c in codes.items() if n != victim_name} == dict.fromkeys(
        ["serve", *(n for n in workers if n != victim_name)], 0
    ), group.logs()
