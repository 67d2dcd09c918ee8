"""Security (issue 10, scenario 7): who may talk to the node, and what it keeps to itself.

- **Calling AE and IP allowlists**: an ``AE@host`` entry admits its AE title only from
  the host's addresses. A pynetdicom requestor binds its socket to 127.0.0.2 (another
  loopback address, so the test needs no second host) and gets an A-ASSOCIATE-RJ where
  the same AE title from 127.0.0.1 is accepted. (dcmtk peers and the AE-only rules:
  tests/node/test_scp.py.)
- **DIMSE over TLS** against dcmtk ``storescu +tls``, with a CA, node, client and rogue
  certificates this module makes with the ``openssl`` command: the right client
  certificate stores; a certificate of another CA, none (``+tla``), and plain TCP are
  refused and store nothing; a client that connects and stays silent does not stall the
  next one (the handshake is not done in pynetdicom's accept loop).
- **Data directory mode 0700**, made by ``serve`` and by ``open_database``; files 0600.
- **Weights from safetensors only**: a pickle (``.pt``/``.pth``, what ``torch.save``
  writes) is refused with a one-line ModelError, and no ``torch.load``/``pickle`` call
  exists in ``bac_node/``.
- **Canary, full run**: a study whose patient name and ID are a canary goes through
  ``bac-node serve`` over TLS (storescu), is analysed and exported to dcmtk storescp,
  with one refused instance besides; the canary is then absent from the node's log,
  ``/metrics``, ``/status``, ``/status.json``, and storescu's output (the DIMSE error
  comments), while it is present in the exported SEG (so the search is meaningful).
- STOW-RS bearer tokens are tested in tests/node/test_http.py.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from _ingest_helpers import ingest_settings, instance_rows, sample_files
from _processing_helpers import save_tiny_model
from _serve import NODE_AE, Serve
from peers import StoreSCP, free_port, require_tool, storescu
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from bac_node.config import Settings
from bac_node.errors import ConfigError, ModelError
from bac_node.model.weights import load_model
from bac_node.node.db import Database, open_database
from bac_node.node.scp import ScpServer, start_scp, tls_context
from bac_node.node.service import Node as NodeService
from bac_node.node.store import InstanceStore

REPO = Path(__file__).resolve().parents[2]
LOOPBACK, OTHER_LOOPBACK = "127.0.0.1", "127.0.0.2"
PY_AE, TLS_AE = "PYSCU", "TLSSCU"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CANARY = "CANARY7Q3ZX"


# --- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run(
        [require_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.crt", folder / f"{name}.key"


def _signed(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder,
    )  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.crt", folder / f"{name}.key"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca, rogue_ca = _ca(folder, "test-ca"), _ca(folder, "rogue-ca")
    node = _signed(folder, "localhost", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1")
    client = _signed(folder, "tls-scu", ca, "extendedKeyUsage=clientAuth")
    rogue = _signed(folder, "rogue-scu", rogue_ca, "extendedKeyUsage=clientAuth")
    return Certificates(ca[0], *node, *client, *rogue)


def tls_settings(certs: Certificates) -> dict[str, str]:
    return {"tls_cert": str(certs.node_cert), "tls_key": str(certs.node_key),
            "tls_ca": str(certs.ca)}  # fmt: skip


# --- an in-process node --------------------------------------------------------------------


class Node:
    def __init__(self, data_dir: Path, **fields: object) -> None:
        self.settings: Settings = ingest_settings(data_dir, ae_title=NODE_AE, **fields)
        self.db: Database = open_database(self.settings.data_dir)
        self.scp: ScpServer = start_scp(
            self.settings, InstanceStore(self.settings, self.db), host=LOOPBACK, port=0
        )

    def stored(self) -> int:
        return len(instance_rows(self.db))

    def close(self) -> None:
        self.scp.shutdown(timeout=5)
        self.db.dispose()


@pytest.fixture
def tls_node(tmp_path: Path, certificates: Certificates) -> Iterator[Node]:
    # network_timeout (the handshake's timeout too) well above what a stalled port would
    # add to the silent-client test's storescu run
    node = Node(
        tmp_path / "data", allowed_peers=(TLS_AE,), network_timeout=15,
        **tls_settings(certificates),
    )  # fmt: skip
    yield node
    node.close()


def send_tls(node: Node, certs: Certificates, *how: str, files: list[Path] | None = None) -> str:
    """storescu's output; ``how``: its TLS options (empty: plain TCP)."""
    result = storescu(
        files or sample_files()[:1], port=node.scp.port, called_ae=NODE_AE, calling_ae=TLS_AE,
        timeout=90, extra_args=[*how, "+cf", str(certs.ca)] if how else [],
    )  # fmt: skip
    return ("ok\n" if result.returncode == 0 else "failed\n") + result.output


# --- allowlists ----------------------------------------------------------------------------


def associate_from(port: int, address: str) -> tuple[bool, tuple[int, int, int] | None]:
    """Whether an association from ``address`` is accepted; the A-ASSOCIATE-RJ's reason."""
    ae = AE(ae_title=PY_AE)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MG_FOR_PRESENTATION, [ExplicitVRLittleEndian])
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AE, bind_address=(address, 0))
    if assoc.is_established:
        assoc.release()
        return True, None
    primitive = assoc.acceptor.primitive
    assert assoc.is_rejected and not assoc.is_aborted and primitive is not None
    return False, (int(primitive.result or 0), int(primitive.result_source or 0),
                   int(primitive.diagnostic or 0))  # fmt: skip


def test_ae_at_host_admits_its_address_and_rejects_another(tmp_path: Path) -> None:
    node = Node(tmp_path / "data", allowed_peers=(f"{PY_AE}@{LOOPBACK}",))
    try:
        assert associate_from(node.scp.port, LOOPBACK) == (True, None)
        # A-ASSOCIATE-RJ rejected-permanent, service user: calling AE title not recognised
        assert associate_from(node.scp.port, OTHER_LOOPBACK) == (False, (1, 1, 3))
    finally:
        node.close()
    anywhere = Node(tmp_path / "any", allowed_peers=(PY_AE,))
    try:
        assert associate_from(anywhere.scp.port, OTHER_LOOPBACK) == (True, None)
    finally:
        anywhere.close()


# --- DIMSE over TLS ------------------------------------------------------------------------


@pytest.mark.dcmtk
def test_tls_client_certificate_of_the_ca_stores(
    tls_node: Node, certificates: Certificates
) -> None:
    c = certificates
    output = send_tls(tls_node, c, "+tls", str(c.client_key), str(c.client_cert))
    assert output.startswith("ok"), output
    assert tls_node.stored() == 1


@pytest.mark.dcmtk
def test_tls_refuses_another_ca_no_certificate_and_plain_tcp(
    tls_node: Node, certificates: Certificates
) -> None:
    c = certificates
    attempts = {
        "rogue CA": ("+tls", str(c.rogue_key), str(c.rogue_cert)),
        "no client certificate": ("+tla",),
        "plain TCP": (),
    }
    for what, how in attempts.items():
        output = send_tls(tls_node, c, *how)
        assert output.startswith("failed"), f"{what}: {output}"
        assert "Association Accepted" not in output, f"{what}: {output}"
    assert tls_node.stored() == 0
    output = send_tls(tls_node, c, "+tls", str(c.client_key), str(c.client_cert))
    assert output.startswith("ok"), output  # the node still serves


@pytest.mark.dcmtk
def test_a_silent_client_does_not_stall_the_tls_port(
    tls_node: Node, certificates: Certificates
) -> None:
    c = certificates
    with socket.create_connection((LOOPBACK, tls_node.scp.port)):  # says nothing
        started = time.monotonic()
        output = send_tls(tls_node, c, "+tls", str(c.client_key), str(c.client_cert))
        assert output.startswith("ok"), output
        assert time.monotonic() - started < 10  # under network_timeout (15 s)


def test_tls_settings_are_checked(tmp_path: Path, certificates: Certificates) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key must be set together"):
        Settings(tls_cert=str(certificates.node_cert))
    with pytest.raises(ConfigError, match="tls_ca"):
        Settings(tls_ca=str(certificates.ca))
    broken = tmp_path / "broken.crt"
    broken.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^tls_cert .*cannot load"):
        tls_context(Settings(tls_cert=str(broken), tls_key=str(certificates.node_key)))
    with pytest.raises(ConfigError, match=r"^tls_ca .*cannot load"):
        tls_context(
            Settings(
                tls_cert=str(certificates.node_cert),
                tls_key=str(certificates.node_key),
                tls_ca=str(broken),
            )
        )
    assert tls_context(Settings()) is None


# --- the data directory --------------------------------------------------------------------


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the common default: without the fix, 0755 and 0644
    yield
    os.umask(previous)


@pytest.mark.usefixtures("usual_umask")
def test_data_directory_is_0700_and_received_files_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    node = NodeService(
        Settings(data_dir=data_dir, allowed_peers=(PY_AE,), min_free_mb=1, http_port=-1),
        host=LOOPBACK, port=0, workers=0,
    )  # fmt: skip
    node.start()
    try:
        ae = AE(ae_title=PY_AE)
        ae.add_requested_context(MG_FOR_PRESENTATION, [ExplicitVRLittleEndian])
        assoc = ae.associate(LOOPBACK, node.bound_port, ae_title="BACNODE")
        assert assoc.is_established
        rsp = assoc.send_c_store(pydicom.dcmread(sample_files()[0]))
        assoc.release()
        assert rsp.Status == 0x0000
    finally:
        node.stop()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = list((data_dir / "instances").rglob("*.dcm"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600

    worker_dir = tmp_path / "worker" / "data"  # `bac-node worker`, `status`: the database
    open_database(worker_dir).dispose()
    assert stat.S_IMODE(worker_dir.stat().st_mode) == 0o700


# --- model weights -------------------------------------------------------------------------


class _Planted:
    """Unpickling this creates ``marker``: what a weights file could do to torch.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "unpickled"
    for name in ("model.pt", "model.pth", "model.pkl"):
        path = tmp_path / name
        torch.save({"weights": torch.zeros(2), "payload": _Planted(marker)}, path)
        with pytest.raises(ModelError) as refused:
            load_model(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: not a readable .safetensors weights file")
        assert "\n" not in message
        assert not marker.exists(), f"{name} was unpickled"


#: Calls that unpickle (run code from a file): none may appear in the product.
UNPICKLING = re.compile(
    r"\btorch\.load\(|\btorch\.jit\.load\(|\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\("
    r"|\bcPickle\b|\bdill\b|\bjoblib\.load\(|allow_pickle\s*=\s*True|\bweights_only\s*=\s*False"
)


def test_no_unpickling_call_in_the_product() -> None:
    sources = sorted((REPO / "bac_node").rglob("*.py"))
    assert len(sources) > 20
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if UNPICKLING.search(line)
    ]
    assert found == []
    assert UNPICKLING.search("state = torch.load(path)")  # the pattern does match


# --- the canary through a full run ---------------------------------------------------------

TOKEN = "security-test-token-0123456789"


def canary_study(folder: Path) -> tuple[list[Path], Path]:
    """The sample study under new UIDs with a canary patient; and one refused instance."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(prefix="2.25."), generate_uid(prefix="2.25.")
    paths = []
    for index, source in enumerate(sample_files()):
        ds = pydicom.dcmread(source)
        ds.PatientName, ds.PatientID = f"{CANARY}^NAME", f"{CANARY}-ID"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(prefix="2.25.")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(folder / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    ds.SOPInstanceUID = generate_uid(prefix="2.25.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(prefix="2.25.")
    ds.PixelData = ds.PixelData[:1000]  # the header promises more: refused (0xC000)
    refused = folder / "refused.dcm"
    ds.save_as(refused, enforce_file_format=True)
    return paths, refused


@pytest.mark.slow
@pytest.mark.dcmtk
def test_canary_patient_is_nowhere_after_a_full_run(
    tmp_path: Path, certificates: Certificates
) -> None:
    study, refused = canary_study(tmp_path / "study")
    c = certificates
    with StoreSCP(tmp_path / "destination", ae_title="DEST") as destination:
        http_port = free_port()
        node = Serve(
            tmp_path / "data", save_tiny_model(tmp_path / "tiny.safetensors"),
            allowed_peers=TLS_AE, destinations=destination.destination, http_port=http_port,
            http_host=LOOPBACK, http_tokens=TOKEN, log_level="DEBUG", **tls_settings(c),
        )  # fmt: skip
        node.start()
        try:
            tls = ["+tls", str(c.client_key), str(c.client_cert), "+cf", str(c.ca)]
            sent = storescu(study, port=node.port, called_ae=NODE_AE, calling_ae=TLS_AE,
                            extra_args=tls)  # fmt: skip
            assert sent.returncode == 0, sent.output
            # --debug: storescu prints the response, Error Comment (0000,0902) included
            bad = storescu([refused], port=node.port, called_ae=NODE_AE, calling_ae=TLS_AE,
                           extra_args=[*tls, "--debug"])  # fmt: skip
            # (storescu's returncode: peers.storescu judges --verbose output, not --debug)
            assert "holds 1000 bytes" in bad.output and "ErrorComment" in bad.output, bad.output
            results = destination.wait_for_files(len(study) + 1, timeout=240)
            with httpx.Client(
                base_url=f"http://{LOOPBACK}:{http_port}", timeout=30, trust_env=False,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as client:  # fmt: skip
                pages = {p: client.get(p) for p in ("/metrics", "/status", "/status.json")}
        finally:
            assert node.stop() == 0, node.tail()
    assert {p: a.status_code for p, a in pages.items()} == dict.fromkeys(pages, 200)
    assert "bac_node" in pages["/metrics"].text and "export" in pages["/status.json"].text
    log = node.log.read_text(errors="replace")
    assert "DEBUG" in log and "stored SOP Instance UID" in log  # a real log was read
    for where, text in {
        "log": log,
        "storescu (error comments)": sent.output + bad.output,
        **{page: answer.text for page, answer in pages.items()},
    }.items():
        assert CANARY not in text, f"the canary patient appears in the {where}"
    # ...while it did go through the node: the exported objects carry the patient
    assert all(CANARY in str(pydicom.dcmread(p).PatientName) for p in results)
