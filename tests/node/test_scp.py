"""The C-STORE/C-ECHO SCP against real peers: dcmtk's storescu/echoscu and pynetdicom SCUs.

Each test starts the SCP in-process on an ephemeral loopback port (``port=0``) over a
fresh data directory and database, and stops it at teardown.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom
import pytest
from _ingest_helpers import (
    MG_FOR_PRESENTATION,
    PATIENT_ID,
    PATIENT_NAME,
    files_under,
    ingest_settings,
    instance_rows,
    non_image,
    read,
    sample_files,
    save,
    small_mg,
    truncated_pixels,
    unparseable_file,
)
from peers import echoscu, storescu
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association

from bac_node.config import Settings
from bac_node.dicom.reader import pixel_array, read_instance
from bac_node.node.db import Database, open_database
from bac_node.node.scp import (
    TRANSFER_SYNTAXES,
    CallingAllowlist,
    ScpServer,
    build_ae,
    start_scp,
)
from bac_node.node.store import BASIC_TEXT_SR, NOT_ANALYSED_COMMENT, InstanceStore, StoreOutcome

NODE_AE = "BACNODE"
SENDER_AE = "STORESCU"
PY_AE = "PYSCU"
LOOPBACK = "127.0.0.1"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"


@dataclass
class RunningNode:
    settings: Settings
    db: Database
    store: InstanceStore
    scp: ScpServer

    @property
    def port(self) -> int:
        return self.scp.port

    @property
    def instances(self) -> Path:
        return self.settings.data_dir / "instances"


StartNode = Callable[..., RunningNode]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    """A factory of running SCPs (settings overridable; ``store`` replaces the store)."""
    running: list[RunningNode] = []

    def start(store_class: type[InstanceStore] = InstanceStore, **fields: Any) -> RunningNode:
        values: dict[str, Any] = {
            "ae_title": NODE_AE, "allowed_peers": (SENDER_AE, "ECHOSCU", PY_AE), **fields,
        }  # fmt: skip
        settings = ingest_settings(tmp_path / f"data{len(running)}", **values)
        db = open_database(settings.data_dir)
        store = store_class(settings, db)
        node = RunningNode(settings, db, store, start_scp(settings, store, host=LOOPBACK, port=0))
        running.append(node)
        return node

    yield start
    for node in running:
        node.scp.shutdown(timeout=5)
        node.db.dispose()


def py_scu(*contexts: tuple[str, Sequence[str]], ae_title: str = PY_AE) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    return ae


def associate(ae: AE, node: RunningNode) -> Association:
    return ae.associate(LOOPBACK, node.port, ae_title=NODE_AE)


def c_store(assoc: Association, ds: Dataset | Path) -> Dataset:
    status = assoc.send_c_store(ds)
    assert status, "no C-STORE response (association aborted?)"
    return status


MG_CONTEXT = (MG_FOR_PRESENTATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])


def stored_sop_uids(node: RunningNode) -> set[str]:
    return {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for path in files_under(node.instances)
    }


# --- storing and echoing ---------------------------------------------------------------


@pytest.mark.dcmtk
def test_storescu_sends_a_study_four_successes_four_files_four_rows(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = start_node()
    files = sample_files()
    sent = storescu(files, port=node.port, called_ae=NODE_AE, calling_ae=SENDER_AE)

    assert sent.returncode == 0, sent.output
    assert sent.responses == ["Success"] * 4
    rows = instance_rows(node.db)
    assert len(rows) == 4
    assert sorted(row.view for row in rows) == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    assert {row.calling_ae for row in rows} == {SENDER_AE}
    assert files_under(node.instances) == sorted(node.settings.data_dir / r.path for r in rows)
    originals = {str(read(f).SOPInstanceUID): read(f).PixelData for f in files}
    for row in rows:
        stored = pydicom.dcmread(node.settings.data_dir / row.path)
        assert stored.PixelData == originals[row.sop_instance_uid]
    assert any(SENDER_AE in r.getMessage() and "accepted" in r.getMessage() for r in caplog.records)


@pytest.mark.dcmtk
def test_echoscu_gets_an_answer(start_node: StartNode) -> None:
    node = start_node()
    echo = echoscu(port=node.port, called_ae=NODE_AE, calling_ae="ECHOSCU")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert "Received Echo Response (Success)" in echo.stdout + echo.stderr


@pytest.mark.dcmtk
def test_secondary_objects_are_stored_with_a_warning(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()
    report = non_image(BASIC_TEXT_SR, "SR")
    sent = storescu(
        [save(report, tmp_path / "sr.dcm")], port=node.port, called_ae=NODE_AE,
        calling_ae=SENDER_AE,
    )  # fmt: skip
    assert sent.returncode == 0, sent.output
    assert [r.split(":")[0] for r in sent.responses] == ["Warning"], sent.responses

    # The Error Comment says why (storescu shows it only under --debug; pynetdicom returns it).
    second = non_image(BASIC_TEXT_SR, "SR", study_uid=str(report.StudyInstanceUID))
    assoc = associate(py_scu((BASIC_TEXT_SR, [ExplicitVRLittleEndian])), node)
    assert assoc.is_established
    try:
        response = c_store(assoc, second)
    finally:
        assoc.release()
    assert (response.Status, response.ErrorComment) == (0xB000, NOT_ANALYSED_COMMENT)
    rows = instance_rows(node.db)
    assert [(row.analysable, row.sop_class_uid) for row in rows] == [(False, BASIC_TEXT_SR)] * 2


# --- who may associate -----------------------------------------------------------------


@pytest.mark.dcmtk
def test_an_unknown_calling_ae_is_rejected_at_association(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    sent = storescu(sample_files()[:1], port=node.port, called_ae=NODE_AE, calling_ae="STRANGER")
    assert sent.storescu_returncode != 0
    assert "Association Rejected" in sent.output
    assert "Calling AE Title Not Recognized" in sent.output
    assert sent.requests == 0
    assert files_under(node.instances) == [] and instance_rows(node.db) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("STRANGER" in m and "rejected" in m for m in warnings), warnings


def test_a_pynetdicom_requestor_sees_a_permanent_calling_ae_rejection(
    start_node: StartNode,
) -> None:
    node = start_node()
    assoc = associate(py_scu(MG_CONTEXT, ae_title="STRANGER"), node)
    assert assoc.is_rejected and not assoc.is_aborted
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 3)


@pytest.mark.dcmtk
def test_a_wrong_called_ae_title_is_rejected(start_node: StartNode) -> None:
    node = start_node()
    echo = echoscu(port=node.port, called_ae="NOTUS", calling_ae="ECHOSCU")
    assert echo.returncode != 0
    assert "Called AE Title Not Recognized" in echo.stdout + echo.stderr


@pytest.mark.dcmtk
def test_ae_at_host_entries_also_check_the_peer_address(start_node: StartNode) -> None:
    here = start_node(allowed_peers=("ECHOSCU@localhost",))
    elsewhere = start_node(allowed_peers=("ECHOSCU@192.0.2.7",))  # TEST-NET-1: not us
    assert echoscu(port=here.port, called_ae=NODE_AE, calling_ae="ECHOSCU").returncode == 0
    refused = echoscu(port=elsewhere.port, called_ae=NODE_AE, calling_ae="ECHOSCU")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


@pytest.mark.dcmtk
def test_destinations_may_send_and_an_empty_allowlist_admits_nobody(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    pacs = start_node(allowed_peers=(), destinations=("ECHOSCU@192.0.2.7:104",))
    assert echoscu(port=pacs.port, called_ae=NODE_AE, calling_ae="ECHOSCU").returncode == 0

    caplog.clear()
    closed = start_node(allowed_peers=(), destinations=())
    assert any(
        r.levelno == logging.WARNING and "allowed_peers" in r.getMessage() for r in caplog.records
    )
    for calling in ("ECHOSCU", "ANYONE"):
        refused = echoscu(port=closed.port, called_ae=NODE_AE, calling_ae=calling)
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


def test_allowlist_matches_ipv4_mapped_addresses_and_survives_unresolvable_hosts(
    tmp_path: Path,
) -> None:
    def resolve(host: str) -> list[str]:
        if host == "pacs.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["10.1.2.3"]

    settings = ingest_settings(
        tmp_path, allowed_peers=("PACS@pacs.example", "GHOST@pacs.invalid", "ANY")
    )
    allowlist = CallingAllowlist.from_settings(settings, resolve)
    assert allowlist.admits("PACS", "10.1.2.3")
    assert allowlist.admits("PACS", "::ffff:10.1.2.3")
    assert not allowlist.admits("PACS", "10.1.2.4")
    assert not allowlist.admits("GHOST", "10.1.2.3")
    assert allowlist.admits("ANY", "198.51.100.1")
    assert not CallingAllowlist.from_settings(ingest_settings(tmp_path), resolve).admits(
        "ANY", "10.1.2.3"
    )


# --- negotiation ------------------------------------------------------------------------


def test_deflate_and_big_endian_are_refused_at_negotiation(start_node: StartNode) -> None:
    node = start_node()
    ae = py_scu(
        (MG_FOR_PRESENTATION, [DeflatedExplicitVRLittleEndian]),
        (MG_FOR_PROCESSING, [ExplicitVRBigEndian]),
    )
    assoc = associate(ae, node)
    try:
        assert assoc.accepted_contexts == []
        rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        # 0x04: transfer syntaxes not supported (PS3.8 9.3.3.2)
        assert rejected == {MG_FOR_PRESENTATION: 0x04, MG_FOR_PROCESSING: 0x04}
    finally:
        if assoc.is_established:
            assoc.release()
    assert instance_rows(node.db) == []


def test_the_offered_contexts_and_limits_come_from_the_settings(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, max_associations=3, max_pdu=65536, network_timeout=7)
    ae = build_ae(settings)
    offered = {str(cx.abstract_syntax): cx.transfer_syntax for cx in ae.supported_contexts}
    assert "1.2.840.10008.1.1" in offered  # Verification
    assert set(offered[MG_FOR_PRESENTATION]) == set(TRANSFER_SYNTAXES)
    assert DeflatedExplicitVRLittleEndian not in offered[MG_FOR_PRESENTATION]
    assert (ae.maximum_associations, ae.maximum_pdu_size) == (3, 65536)
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (7, 7, 7)
    assert ae.require_called_aet


#: storescu proposes one compressed syntax family per run (plus the uncompressed ones).
STORESCU_PROPOSALS = {RLELossless: "-xr", JPEG2000Lossless: "-xv", JPEGLSLossless: "-xt"}


@pytest.mark.dcmtk
@pytest.mark.parametrize("syntax", list(STORESCU_PROPOSALS), ids=lambda uid: uid.name)
def test_compressed_transfer_syntaxes_are_stored_as_sent_and_decode(
    start_node: StartNode, tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    node = start_node()
    ds = small_mg(sample_files()[0])
    pixels = ds.pixel_array.copy()
    ds.compress(syntax, generate_instance_uid=False)
    path = save(ds, tmp_path / "compressed.dcm")

    sent = storescu(
        [path], port=node.port, called_ae=NODE_AE, calling_ae=SENDER_AE,
        extra_args=[STORESCU_PROPOSALS[syntax]],
    )  # fmt: skip

    assert sent.returncode == 0, sent.output
    assert sent.responses == ["Success"]
    [row] = instance_rows(node.db)
    stored = node.settings.data_dir / row.path
    assert row.sop_instance_uid == ds.SOPInstanceUID
    assert row.transfer_syntax_uid == syntax
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax
    image = read_instance(stored, decode=True)
    assert np.array_equal(pixel_array(image), pixels)


def test_lossless_compression_is_preferred_and_lossy_never_chosen_over_uncompressed(
    start_node: StartNode,
) -> None:
    """Of several syntaxes proposed in one context, the SCP picks lossless compressed,
    then uncompressed, then lossy (whatever order the requestor proposes them in)."""
    node = start_node()
    ae = py_scu(
        (MG_FOR_PRESENTATION, [ExplicitVRLittleEndian, JPEG2000Lossless]),
        (MG_FOR_PROCESSING, [JPEG2000, ExplicitVRLittleEndian]),
        (BASIC_TEXT_SR, [JPEG2000]),
    )
    assoc = associate(ae, node)
    try:
        accepted = {
            str(cx.abstract_syntax): cx.transfer_syntax[0] for cx in assoc.accepted_contexts
        }
    finally:
        assoc.release()
    assert accepted == {
        MG_FOR_PRESENTATION: JPEG2000Lossless,
        MG_FOR_PROCESSING: ExplicitVRLittleEndian,
        BASIC_TEXT_SR: JPEG2000,  # lossy only if that is all there is
    }


# --- bad instances among good ones --------------------------------------------------------


@pytest.mark.dcmtk
def test_a_malformed_instance_in_the_middle_of_a_study(
    start_node: StartNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    files = sample_files()
    broken = truncated_pixels(files[0])
    broken.PatientName = PATIENT_NAME
    broken_path = save(broken, tmp_path / "broken.dcm")

    sent = storescu(
        [*files[:2], broken_path, *files[2:]], port=node.port, called_ae=NODE_AE,
        calling_ae=SENDER_AE,
    )  # fmt: skip

    assert sent.requests == 5
    assert sent.responses[:2] == ["Success", "Success"]
    assert sent.responses[3:] == ["Success", "Success"]
    assert sent.responses[2] == "Error: CannotUnderstand", sent.responses  # 0xC000
    assert stored_sop_uids(node) == {str(read(f).SOPInstanceUID) for f in files}
    assert len(instance_rows(node.db)) == 4
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


def test_a_data_set_that_cannot_be_parsed_fails_alone(
    start_node: StartNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom sends the file's bytes as they are (chunked mode), so the broken data set
    reaches the SCP unparsed, among good instances of one association; a malformed
    mammogram is answered with its reason in the Error Comment."""
    node = start_node()
    bad_uid, bad = unparseable_file(sample_files()[0], tmp_path / "unparseable.dcm")
    truncated = save(truncated_pixels(sample_files()[1]), tmp_path / "truncated.dcm")
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(py_scu(MG_CONTEXT), node)
    assert assoc.is_established
    try:
        sent = (sample_files()[0], bad, truncated, sample_files()[1])
        responses = [c_store(assoc, path) for path in sent]
    finally:
        assoc.release()
    assert [r.Status for r in responses] == [0x0000, 0xC000, 0xC000, 0x0000]
    assert responses[1].ErrorComment == "the data set cannot be parsed"
    assert responses[2].ErrorComment.startswith("PixelData (7FE0,0010) holds")
    assert all(len(r.ErrorComment) <= 64 for r in responses[1:3])
    assert bad_uid not in stored_sop_uids(node)
    assert len(instance_rows(node.db)) == 2


def test_an_unexpected_error_fails_one_store_and_the_association_goes_on(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    doomed = str(read(sample_files()[1]).SOPInstanceUID)

    class FaultyStore(InstanceStore):
        def store(self, ds: Dataset, **kwargs: Any) -> StoreOutcome:
            if ds.SOPInstanceUID == doomed:
                raise RuntimeError("a bug")
            return super().store(ds, **kwargs)

    node = start_node(store_class=FaultyStore)
    assoc = associate(py_scu(MG_CONTEXT), node)
    assert assoc.is_established
    try:
        responses = [c_store(assoc, read(path)) for path in sample_files()[:3]]
    finally:
        assoc.release()
    assert [r.Status for r in responses] == [0x0000, 0xC000, 0x0000]
    assert "internal error" in responses[1].ErrorComment
    assert len(instance_rows(node.db)) == 2
    assert any(doomed in r.getMessage() and r.exc_info for r in caplog.records)


# --- limits and shutdown ------------------------------------------------------------------


def test_one_association_more_than_max_associations_is_rejected(start_node: StartNode) -> None:
    node = start_node(max_associations=2)
    ae = py_scu(MG_CONTEXT, ("1.2.840.10008.1.1", [ImplicitVRLittleEndian]))
    first, second = associate(ae, node), associate(ae, node)
    try:
        assert first.is_established and second.is_established
        extra = associate(ae, node)
        assert extra.is_rejected
        primitive = extra.acceptor.primitive
        assert primitive is not None
        # rejected-transient, DUL service provider (presentation), local limit exceeded
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
        assert c_store(first, read(sample_files()[0])).Status == 0x0000
        assert c_store(second, read(sample_files()[1])).Status == 0x0000
        assert second.send_c_echo().Status == 0x0000
    finally:
        first.release()
        second.release()
    assert len(instance_rows(node.db)) == 2
    deadline = time.monotonic() + 5
    while node.scp.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    again = associate(ae, node)  # the slots are free again
    assert again.is_established
    again.release()


def test_shutdown_lets_an_association_in_flight_finish(start_node: StartNode) -> None:
    node = start_node()
    assoc = associate(py_scu(MG_CONTEXT), node)
    assert assoc.is_established
    files = sample_files()
    assert c_store(assoc, read(files[0])).Status == 0x0000
    assert len(node.scp.active_associations) == 1

    stopper = threading.Thread(target=node.scp.shutdown, kwargs={"timeout": 30})
    stopper.start()
    deadline = time.monotonic() + 10
    while _accepts_connections(node.port):  # the listening socket closes first
        assert time.monotonic() < deadline, "the SCP still accepts connections"
        time.sleep(0.05)
    assert stopper.is_alive()  # waiting for the association in flight

    statuses = [c_store(assoc, read(path)).Status for path in files[1:]]
    assoc.release()
    stopper.join(15)

    assert not stopper.is_alive()
    assert statuses == [0x0000] * 3
    assert len(instance_rows(node.db)) == 4
    assert node.scp.active_associations == []


def test_shutdown_aborts_an_association_that_outstays_the_timeout(start_node: StartNode) -> None:
    node = start_node()
    assoc = associate(py_scu(MG_CONTEXT), node)
    assert assoc.is_established
    began = time.monotonic()
    node.scp.shutdown(timeout=0.5)
    assert time.monotonic() - began < 5
    deadline = time.monotonic() + 5
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False
