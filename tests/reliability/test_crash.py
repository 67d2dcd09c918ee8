"""Crash safety: `bac-node serve` killed with SIGKILL during ingestion loses nothing acknowledged.

The harness is ``_crash.py`` (its docstring says what it runs and checks). Here at CI
size: 15 tiny studies (60 instances), 4 senders, 5 kills; the full size (1,000
instances, 250 studies, 50 kills) is ``python -m benchmarks.bench_crash``, with its
figures in RELIABILITY.md.

A kill cannot show a missing fsync (the kernel keeps the page cache of a killed
process; only a power loss would lose it), so the order "file fsynced, directory
fsynced, row committed, then Success" is checked separately, on the store itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _crash import crash_run, tiny_studies
from _ingest_helpers import ingest_settings
from _processing_helpers import save_tiny_model
from peers import StoreSCP
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import event

from bac_node.node.db import open_database
from bac_node.node.store import SUCCESS, InstanceStore

CI_STUDIES, CI_KILLS = 15, 5


@pytest.mark.slow
@pytest.mark.dcmtk
def test_kill9_during_ingest_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny.safetensors")
    with StoreSCP(tmp_path / "dest", ae_title="CRASHDEST", unique_filenames=True) as dest:
        # The worker is not killed here (test_worker_crash.py does that): its restarts
        # load torch and would slow serve's on a 2-core machine; the benchmark kills both.
        run = crash_run(
            tmp_path, model, dest, studies=CI_STUDIES, kills=CI_KILLS, seed=1,
            settle_timeout=150, worker_kill_every=0, log=print,
        )  # fmt: skip
    figures = run.figures()
    print(json.dumps(figures, indent=1))
    problems = run.tally.problems()
    assert not problems, "\n".join(problems) + "\n" + run.serve_log.read_text()[-3000:]
    assert figures["acknowledged"] == figures["instances"] == CI_STUDIES * 4
    assert figures["kills_during_ingest"] >= 1, "no kill landed while instances were sent"
    assert figures["studies_one_result_set"] == CI_STUDIES


def test_success_comes_after_fsync_and_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's bytes, then its directory entry, are fsynced before the row's commit,
    and the commit comes before the store answers."""
    settings = ingest_settings(tmp_path / "data")
    db = open_database(settings.data_dir)
    store = InstanceStore(settings, db)
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        events.append(("fsync", target))

    monkeypatch.setattr(os, "fsync", fsync)
    event.listen(db.engine, "commit", lambda _conn: events.append(("commit", "")))
    ds = tiny_studies(1)[0][0]
    try:
        outcome = store.store(ds, transfer_syntax_uid=ExplicitVRLittleEndian, calling_ae="X")
    finally:
        db.dispose()
    events.append(("answer", ""))
    assert outcome.status == SUCCESS, outcome.comment
    final = settings.data_dir / store.relative_path(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    assert final.is_file()

    def first(kind: str, target: str = "", after: int = -1) -> int:
        for i, (k, t) in enumerate(events):
            if i > after and k == kind and (not target or t == target or t.startswith(target)):
                return i
        raise AssertionError(f"no {kind} {target} after event {after}: {events}")

    file_synced = first("fsync", str(final.parent / f".{final.stem}."))
    directory_synced = first("fsync", str(final.parent), after=file_synced)
    assert events[directory_synced][1] == str(final.parent), events
    committed = first("commit", after=directory_synced)
    assert committed < first("answer"), events
