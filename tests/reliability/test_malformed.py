"""The malformed-input corpus against the C-STORE SCP, and the patient-identifier canary.

The SCP runs in-process on an ephemeral loopback port (as in ``tests/node/test_scp.py``)
and a pynetdicom SCU sends every file of ``corpus/`` (made by ``make_corpus.py``; see
its docstring for what each file proves). A well-behaved SCU cannot send some files as
they are: ones whose file meta cannot be read (truncated preamble/meta, not DICOM), the
deflate bomb (the SCP does not offer Deflated Explicit VR Little Endian, so that context
is rejected at negotiation) and the CT/MR objects (their SOP classes are rejected at
negotiation). Those are then sent a second way: their raw bytes (after the file meta
when there is one) as the data set of an MG For Presentation C-STORE in Explicit VR
Little Endian, which is what a broken SCU could put on the wire.

Asserted: every file gets a failure status, nothing of it is stored (no file, no row),
a valid instance sent afterwards on the same node is stored with Success, and the peak
RSS of the process (SCP and SCU together; VmHWM, reset before the run) grows by less than
256 MiB over the corpus and stays under 1 GiB (unless the test process already held
more than 768 MiB before it, as it may late in a full suite run).

Not covered here: the STOW-RS path (``POST /dicomweb/studies``), where a deflated part is
read by pydicom (see RELIABILITY.md for what that means for the deflate bomb).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pynetdicom
import pytest
from _ingest_helpers import files_under, ingest_settings, instance_rows
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE

from bac_node.node.db import Database, open_database
from bac_node.node.http import start_http
from bac_node.node.scp import ScpServer, start_scp
from bac_node.node.store import InstanceStore

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
NODE_AE, PY_AE, LOOPBACK = "BACNODE", "PYSCU", "127.0.0.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CT_IMAGE, MR_IMAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
GIB = 1024**3
MAX_GROWTH = 256 * 1024**2
CANARY = "CANARY7Q3ZX"

_spec = importlib.util.spec_from_file_location("make_corpus", HERE / "make_corpus.py")
assert _spec is not None and _spec.loader is not None
make_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_corpus)


class Node:
    def __init__(self, data_dir: Path) -> None:
        self.settings = ingest_settings(data_dir, ae_title=NODE_AE, allowed_peers=(PY_AE,))
        self.db: Database = open_database(self.settings.data_dir)
        self.store = InstanceStore(self.settings, self.db)
        self.scp: ScpServer = start_scp(self.settings, self.store, host=LOOPBACK, port=0)

    @property
    def instances(self) -> Path:
        return self.settings.data_dir / "instances"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    # A file is sent as its bytes after the file meta, never parsed by the SCU
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    running = Node(tmp_path / "data")
    yield running
    running.scp.shutdown(timeout=5)
    running.db.dispose()


def scu() -> AE:
    ae = AE(ae_title=PY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MG_FOR_PRESENTATION, [ExplicitVRLittleEndian])
    ae.add_requested_context(MG_FOR_PRESENTATION, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    ae.add_requested_context(MR_IMAGE, [ExplicitVRLittleEndian])
    return ae


def send(node: Node, payload: Path | pydicom.Dataset) -> tuple[int | None, str]:
    """(status, error comment) of one C-STORE, or (None, why it could not be sent)."""
    assoc = scu().associate(LOOPBACK, node.scp.port, ae_title=NODE_AE)
    assert assoc.is_established, "the node stopped accepting associations"
    try:
        rsp = assoc.send_c_store(payload)
    except Exception as exc:
        assoc.abort()
        return None, f"{type(exc).__name__}: {exc}"
    assoc.release()
    if not rsp or "Status" not in rsp:
        return None, "no C-STORE response"
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def as_raw_mg(source: Path, target: Path) -> Path:
    """``source``'s data set bytes (whole file if its meta is unreadable) under MG meta."""
    data = source.read_bytes()
    try:
        with io.BytesIO(data) as fp:
            pydicom.filereader.read_preamble(fp, False)
            pydicom.filereader._read_file_meta_info(fp)
            data = data[fp.tell() :]
    except Exception:
        pass
    meta = make_corpus.meta_bytes(MG_FOR_PRESENTATION, make_corpus.uid(500))
    target.write_bytes(meta + data)
    return target


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    # Where the kernel refuses, VmHWM is the process's peak so far: a stricter bound
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def test_corpus_is_what_the_script_makes() -> None:
    expected = make_corpus.corpus()
    assert sorted(p.name for p in CORPUS.glob("*.dcm")) == sorted(expected)
    for name, data in expected.items():
        assert (CORPUS / name).read_bytes() == data, f"{name}: rerun make_corpus.py"


@pytest.mark.slow
def test_every_corpus_file_is_refused_and_the_node_keeps_serving(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    files = sorted(CORPUS.glob("*.dcm"))
    assert len(files) >= 20
    reset_hwm()
    baseline = vm_hwm()
    results: dict[str, str] = {}
    for path in files:
        status, comment = send(node, path)
        how = "as is"
        if status is None:  # the SCU cannot send it: send its raw bytes instead
            how = f"raw (as is: {comment.splitlines()[0][:60]})"
            status, comment = send(node, as_raw_mg(path, tmp_path / f"raw-{path.name}"))
        assert status is not None, f"{path.name}: {comment}"
        assert status not in SUCCESS_OR_WARNING, f"{path.name} accepted: 0x{status:04X}"
        assert comment and "\n" not in comment, f"{path.name}: no one-line reason"
        results[path.name] = f"0x{status:04X} {how}: {comment}"
        assert files_under(node.instances) == [], f"{path.name} left a file"
        assert instance_rows(node.db) == [], f"{path.name} left a row"
    peak = vm_hwm()
    for name, result in results.items():
        print(f"{name:30} {result}")
    print(f"peak RSS (VmHWM) {peak / 2**20:.0f} MiB, {(peak - baseline) / 2**20:.0f} MiB over")

    good = pydicom.dcmread(io.BytesIO(make_corpus.valid_instance()))
    status, comment = send(node, good)
    assert status == 0x0000, comment
    assert len(files_under(node.instances)) == 1
    # The process holds torch and pytest (~600-800 MiB) before the corpus; what the corpus
    # may add is bounded: the deflate bomb alone would add 1.1 GiB if it were inflated.
    assert peak - baseline < MAX_GROWTH, f"peak RSS {peak / 2**20:.0f} MiB"
    assert peak < GIB or baseline > GIB - MAX_GROWTH, f"peak RSS {peak / 2**20:.0f} MiB"


def test_canary_patient_never_reaches_logs_or_error_messages(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    comments: list[str] = []
    good = pydicom.dcmread(io.BytesIO(make_corpus.valid_instance(1)))
    good.PatientName, good.PatientID = f"{CANARY}^NAME", f"{CANARY}-ID"
    status, comment = send(node, good)
    assert status == 0x0000, comment
    bad = pydicom.dcmread(io.BytesIO(make_corpus.valid_instance(2)))
    bad.PatientName, bad.PatientID = f"{CANARY}^NAME", f"{CANARY}-ID"
    bad.PixelData = bad.PixelData[:100]  # refused: the reader's reason is the comment
    status, comment = send(node, bad)
    assert status is not None and status not in SUCCESS_OR_WARNING
    comments.append(comment)
    time.sleep(0.2)  # the association threads' last log lines
    assert caplog.records, "nothing logged: the check below would prove nothing"
    assert CANARY not in caplog.text
    assert all(CANARY not in c for c in comments), comments
    stored = files_under(node.instances)
    assert len(stored) == 1 and CANARY in str(pydicom.dcmread(stored[0]).PatientName)


# --- the STOW-RS path ----------------------------------------------------------------------

TOKEN = "reliability-token-0123456789"
BOUNDARY = "bac-node-reliability"
DICOM_PARTS = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


class WebNode(Node):
    """The store with its HTTP interface only (STOW-RS, /metrics, /status), in-process."""

    def __init__(self, data_dir: Path) -> None:
        self.settings = ingest_settings(
            data_dir, http_port=0, http_host=LOOPBACK, http_tokens=(TOKEN,)
        )
        self.db = open_database(self.settings.data_dir)
        self.store = InstanceStore(self.settings, self.db)
        self.http = start_http(self.settings, self.db, self.store, host=LOOPBACK)
        self.client = httpx.Client(
            base_url=f"http://{LOOPBACK}:{self.http.port}", timeout=60, trust_env=False,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip

    def stow(self, data: bytes) -> httpx.Response:
        body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += data + f"\r\n--{BOUNDARY}--\r\n".encode()
        return self.client.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": DICOM_PARTS}
        )


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebNode]:
    running = WebNode(tmp_path / "web")
    yield running
    running.client.close()
    running.http.shutdown(timeout=5)
    running.db.dispose()


@pytest.mark.slow
def test_stow_refuses_every_corpus_file_and_never_shows_the_canary(
    web: WebNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reset_hwm()
    baseline = vm_hwm()
    answers: list[str] = []
    for path in sorted(CORPUS.glob("*.dcm")):
        answer = web.stow(path.read_bytes())
        assert 400 <= answer.status_code < 500 or answer.status_code == 409, path.name
        reason = answer.headers.get("warning", "")
        assert reason and "\n" not in reason, f"{path.name}: no one-line reason"
        answers += [answer.text, reason]
        print(f"{path.name:30} HTTP {answer.status_code} {reason[:100]}")
        assert files_under(web.instances) == [], f"{path.name} left a file"
        assert instance_rows(web.db) == [], f"{path.name} left a row"
    peak = vm_hwm()
    print(f"STOW peak RSS (VmHWM) {peak / 2**20:.0f} MiB, {(peak - baseline) / 2**20:.0f} MiB over")
    assert peak - baseline < MAX_GROWTH, f"peak RSS {peak / 2**20:.0f} MiB"

    canary = pydicom.dcmread(io.BytesIO(make_corpus.valid_instance(3)))
    canary.PatientName, canary.PatientID = f"{CANARY}^NAME", f"{CANARY}-ID"
    buffer = io.BytesIO()
    canary.save_as(buffer, enforce_file_format=True)
    assert web.stow(buffer.getvalue()).status_code == 200
    canary.PixelData = canary.PixelData[:100]
    canary.SOPInstanceUID = make_corpus.uid(600)
    canary.file_meta.MediaStorageSOPInstanceUID = canary.SOPInstanceUID
    buffer = io.BytesIO()
    canary.save_as(buffer, enforce_file_format=True)
    refused = web.stow(buffer.getvalue())
    assert refused.status_code >= 400
    answers.append(refused.text)
    pages = [web.client.get(p) for p in ("/metrics", "/status", "/status.json")]
    assert all(page.status_code == 200 for page in pages), [p.status_code for p in pages]
    assert "bac_node" in pages[0].text  # the check below reads real pages
    time.sleep(0.2)
    for text in [caplog.text, *answers, *(page.text for page in pages)]:
        assert CANARY not in text
    assert len(files_under(web.instances)) == 1
