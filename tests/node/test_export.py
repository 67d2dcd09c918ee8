"""The exporter against real peers: dcmtk's storescp, and pynetdicom SCPs that refuse.

Results come from the real worker with a tiny model; destinations listen on loopback
ports. Retry timing runs on a hand-driven clock, so no test sleeps through a backoff.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _processing_helpers import (
    StoreSCP,
    node_settings,
    phantom_study,
    store_files,
)
from peers import free_port
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from sqlalchemy import select

from bac_node.analysis import Predictor
from bac_node.config import Settings
from bac_node.model.weights import ModelCard
from bac_node.node.db import Database, Export, Result, open_database, utcnow
from bac_node.node.export import Exporter, warn_if_no_destinations
from bac_node.node.queue import enqueue_ready_studies, retry_dead
from bac_node.node.worker import Worker

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(tmp_path / "data")
    yield database
    database.dispose()


def _analysed(
    settings: Settings, db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> Result:
    """One phantom study stored, queued and analysed: its Result (exports pending)."""
    store_files(db, settings.data_dir, phantom_study(tmp_path / "in", 21))
    enqueue_ready_studies(db, stable_after=60)
    assert Worker(settings, db, predictor=model[0], card=model[1]).run_once()
    with db.read() as s:
        return s.scalars(select(Result)).one()


def _export(db: Database) -> Export:
    with db.read() as s:
        return s.scalars(select(Export)).one()


def _sent_uids(settings: Settings, result: Result) -> dict[str, str]:
    """SOP Instance UID → SOP Class UID of the result's files, as the exporter sends them."""
    found = {}
    for name in result.files:
        ds = pydicom.dcmread(settings.data_dir / name, stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
    return found


@contextmanager
def pynetdicom_scp(status: int, *, ae_title: str = "REFUSER") -> Iterator[tuple[int, list[str]]]:
    """A storage SCP on a loopback port that answers every C-STORE with ``status``;
    the port and the SOP Instance UIDs it was offered. It rejects a wrong called AE."""
    offered: list[str] = []

    def handle(event: Any) -> int:
        offered.append(str(event.request.AffectedSOPInstanceUID))
        return status

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = StoragePresentationContexts
    ae.require_called_aet = True
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    assert server is not None
    try:
        yield int(server.server_address[1]), offered
    finally:
        server.shutdown()


@pytest.mark.dcmtk
@pytest.mark.network
def test_storescp_receives_the_segs_and_the_sr(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard], unused_port: int
) -> None:
    scp = StoreSCP(tmp_path / "received", "ARCHIVE", unused_port)
    try:
        settings = node_settings(tmp_path / "data", destinations=(scp.destination,))
        result = _analysed(settings, db, tmp_path, model)
        exporter = Exporter(settings, db)
        assert exporter.run_once() == 1
        export = _export(db)
        assert (export.state, export.attempts, export.last_error) == ("done", 0, None)
        assert export.finished_at is not None
        received = scp.received()
        assert received == _sent_uids(settings, result)
        assert sorted(received.values()) == sorted([COMPREHENSIVE_SR] + [SEG_STORAGE] * 4)
        assert exporter.run_once() == 0
    finally:
        scp.stop()


@pytest.mark.dcmtk
@pytest.mark.network
def test_an_implicit_vr_only_destination_gets_converted_files(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard], unused_port: int
) -> None:
    scp = StoreSCP(tmp_path / "received", "OLDPACS", unused_port, "+xi")
    try:
        settings = node_settings(tmp_path / "data", destinations=(scp.destination,))
        result = _analysed(settings, db, tmp_path, model)
        assert Exporter(settings, db).run_once() == 1
        assert _export(db).state == "done"
        assert scp.received() == _sent_uids(settings, result)
    finally:
        scp.stop()


@pytest.mark.dcmtk
@pytest.mark.network
def test_a_down_destination_backs_off_goes_dead_and_is_sent_after_retry(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard], unused_port: int
) -> None:
    destination = f"LATE@127.0.0.1:{unused_port}"  # nothing listens there yet
    settings = node_settings(
        tmp_path / "data", destinations=(destination,), export_attempts=4, export_backoff=2,
        export_backoff_cap=5,
    )  # fmt: skip
    result = _analysed(settings, db, tmp_path, model)
    clock = [utcnow()]
    exporter = Exporter(settings, db, rng=random.Random(3), clock=lambda: clock[0])

    delays = []
    for attempt in range(1, 5):
        assert exporter.run_once() == 1
        export = _export(db)
        assert export.attempts == attempt
        assert (
            export.last_error
            == f"{destination}: cannot connect (refused, unreachable or timed out)"
        )
        if attempt < 4:
            assert export.state == "pending"
            delays.append((export.next_try - clock[0]).total_seconds())
            nominal = min(5, 2 * 2 ** (attempt - 1))
            assert nominal / 2 <= delays[-1] <= nominal
            clock[0] += dt.timedelta(seconds=delays[-1] / 2)
            assert exporter.run_once() == 0  # not due yet
            clock[0] = export.next_try
        else:
            assert export.state == "dead"
    assert delays == sorted(delays)

    scp = StoreSCP(tmp_path / "received", "LATE", unused_port)
    try:
        clock[0] += dt.timedelta(hours=1)
        assert exporter.run_once() == 0  # dead stays dead
        assert retry_dead(db, result.study_uid) == 1
        assert exporter.run_once() == 1
        export = _export(db)
        assert (export.state, export.attempts) == ("done", 0)
        assert scp.received() == _sent_uids(settings, result)
    finally:
        scp.stop()


@pytest.mark.network
def test_a_failure_status_is_recorded_with_its_code(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    with pynetdicom_scp(0xA700) as (port, offered):
        destination = f"REFUSER@127.0.0.1:{port}"
        settings = node_settings(tmp_path / "data", destinations=(destination,))
        result = _analysed(settings, db, tmp_path, model)
        before = utcnow()
        assert Exporter(settings, db, rng=random.Random(0)).run_once() == 1
    export = _export(db)
    first = str(pydicom.dcmread(settings.data_dir / result.files[0]).SOPInstanceUID)
    assert offered == [first]  # all or nothing: it stopped at the first failure
    assert export.last_error == f"{destination}: status 0xA700 for SOP {first}"
    assert (export.state, export.attempts) == ("pending", 1)
    assert export.next_try >= before + dt.timedelta(seconds=settings.export_backoff / 2)


@pytest.mark.network
def test_a_warning_status_counts_as_delivered(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    with pynetdicom_scp(0xB000) as (port, offered):
        settings = node_settings(tmp_path / "data", destinations=(f"REFUSER@127.0.0.1:{port}",))
        result = _analysed(settings, db, tmp_path, model)
        assert Exporter(settings, db).run_once() == 1
    assert _export(db).state == "done"
    assert set(offered) == set(_sent_uids(settings, result))


@pytest.mark.network
def test_a_rejected_association_is_recorded(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    with pynetdicom_scp(0x0000, ae_title="RIGHT") as (port, offered):
        destination = f"WRONG@127.0.0.1:{port}"
        settings = node_settings(tmp_path / "data", destinations=(destination,))
        _analysed(settings, db, tmp_path, model)
        assert Exporter(settings, db).run_once() == 1
    export = _export(db)
    assert export.last_error == f"{destination}: association rejected"
    assert (export.state, offered) == ("pending", [])


@pytest.mark.network
def test_a_missing_result_file_fails_the_export_not_the_exporter(
    db: Database, tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    with pynetdicom_scp(0x0000) as (port, offered):
        settings = node_settings(tmp_path / "data", destinations=(f"REFUSER@127.0.0.1:{port}",))
        result = _analysed(settings, db, tmp_path, model)
        (settings.data_dir / result.files[-1]).unlink()
        assert Exporter(settings, db).run_once() == 1
    export = _export(db)
    assert export.state == "pending" and offered == []
    assert export.last_error is not None and "cannot read result file sr.dcm" in export.last_error


def test_no_destinations_are_announced_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test.node")
    with caplog.at_level(logging.WARNING, logger="test.node"):
        assert warn_if_no_destinations(node_settings(tmp_path), logger)
        assert not warn_if_no_destinations(
            node_settings(tmp_path, destinations=("PACS@pacs:104",)), logger
        )
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert str(tmp_path / "results") in record.getMessage()
    assert "set `destinations`" in record.getMessage()
