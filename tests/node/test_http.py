"""The HTTP side of `bac-node serve` between real peers: the DICOMweb issue's acceptance.

One `bac-node serve` subprocess per module (tiny test model, HTTP on a free loopback
port, bearer tokens, Orthanc's DICOMweb plugin as its only destination). dicomweb-client
stores the sample study by STOW-RS; the node's SEG and SR go to Orthanc by STOW-RS and
are read back with WADO-RS; Chromium renders the status page; schemathesis runs against
the served OpenAPI document. Bad requests are raw httpx calls, and every one of them is
checked against the node's database and data directory: nothing partial is stored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pydicom
import pytest
from _processing_helpers import sample_study, save_tiny_model
from _serve import Serve
from peers import Orthanc, PeerError, free_port
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from bac_node.cli import main as cli_main
from bac_node.config import Settings, parse_dicomweb_destination
from bac_node.errors import BacNodeError, ConfigError
from bac_node.node.db import Export, Instance, Job, Study, open_database, utcnow
from bac_node.node.export import Exporter, ExportError
from bac_node.node.http import HttpError, openapi_document, split_multipart, start_http
from bac_node.node.queue import inputs_key
from bac_node.node.scp import CallingAllowlist
from bac_node.node.store import InstanceStore

REPO = Path(__file__).resolve().parents[2]
OPENAPI = REPO / "deploy" / "openapi.json"
SCREENSHOT = REPO / "docs" / "status-page.png"
TOKEN = "test-token-0123456789abcdef"
#: A second token, configured only as its sha256 digest.
HASHED_TOKEN = "another-token-fedcba9876543210"
MAX_REQUEST_MB = 8
BOUNDARY = "bac-node-test-boundary"
DICOM_PARTS = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


# --- the node ------------------------------------------------------------------------------


class HttpNode(Serve):
    """`bac-node serve` (tests/node/_serve.py) with its HTTP interface on a free port."""

    def __init__(self, data_dir: Path, model: Path | None, destination: str) -> None:
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        digest = hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()
        super().__init__(
            data_dir, model, destinations=destination, http_port=self.http_port,
            http_host="127.0.0.1", http_tokens=f"{TOKEN},sha256:{digest}",
            http_max_request_mb=MAX_REQUEST_MB,
        )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def start(self) -> HttpNode:
        super().start()
        return self

    def wait_ready(self) -> None:
        """Until /healthz answers (the DICOM port opens before the HTTP one)."""
        deadline = time.monotonic() + 120
        while True:
            if not self.alive():
                raise PeerError(f"serve exited while starting:\n{self.tail()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"serve's HTTP did not answer within 120 s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> int:
        self.client.close()
        return super().stop()

    def get(self, path: str, token: str | None = TOKEN) -> httpx.Response:
        return self.client.get(path, headers=auth(token))

    def stow(
        self, body: Any, content_type: str = DICOM_PARTS, *, token: str | None = TOKEN,
        path: str = "/dicomweb/studies", accept: str | None = None,
    ) -> httpx.Response:  # fmt: skip
        headers = {"Content-Type": content_type, **auth(token)}
        if accept:
            headers["Accept"] = accept
        return self.client.post(path, content=body, headers=headers)

    def instance_uids(self) -> dict[str, str]:
        """SOP Instance UID → protocol of every stored instance."""
        db = open_database(self.data_dir)
        try:
            with db.read() as s:
                return dict(s.execute(select(Instance.sop_instance_uid, Instance.protocol)).all())
        finally:
            db.dispose()

    def stored_files(self) -> list[Path]:
        return sorted((self.data_dir / "instances").rglob("*.dcm"))

    def leftovers(self) -> list[Path]:
        """Anything a refused request may have left: temporary files, spooled bodies."""
        temporary = list((self.data_dir / "instances").rglob("*.tmp"))
        incoming = self.data_dir / "incoming"
        return temporary + (list(incoming.iterdir()) if incoming.exists() else [])

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        answer = self.get("/metrics")
        assert answer.status_code == 200, answer.text
        samples = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


SCHEMATHESIS_OWNER = "schemathesis:1:worker0"


def held_job(data_dir: Path, owner: str, tmp_path: Path) -> tuple[int, str]:
    """A running job held by ``owner`` for a day (the node's own worker never claims it),
    of a new study with one stored image: what the job-file routes serve. (job id, the
    image's SOP Instance UID)."""
    sop_uid, content = new_instance(tmp_path)
    relative = Path("instances") / "schemathesis" / f"{sop_uid}.dcm"
    (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / relative).write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    db = open_database(data_dir)
    try:
        with db.session() as s:
            study = Study(study_uid=pydicom.uid.generate_uid(prefix="2.25."), queued=True)
            s.add(study)
            s.flush()
            s.add(
                Instance(
                    sop_instance_uid=sop_uid, study_id=study.id, series_uid="2.25.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(relative), size_bytes=len(content), sha256=sha, view="R-CC",
                )
            )  # fmt: skip
            job = Job(
                study_id=study.id, inputs_key=inputs_key([(sop_uid, sha)]), state="running",
                lease_owner=owner, lease_expires=utcnow() + dt.timedelta(days=1), attempts=1,
            )  # fmt: skip
            s.add(job)
            s.flush()
            return job.id, sop_uid
    finally:
        db.dispose()


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def multipart(*parts: tuple[str | None, bytes], close: bool = True) -> bytes:
    """A multipart/related body of ``(Content-Type or None, content)`` parts."""
    out = b""
    for content_type, content in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def new_instance(tmp_path: Path) -> tuple[str, bytes]:
    """A sample MG image under new UIDs (a study the node has never seen): UID, bytes."""
    ds = pydicom.dcmread(sample_study()[0])
    ds.StudyInstanceUID = pydicom.uid.generate_uid(prefix="2.25.")
    ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="2.25.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "new.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID), path.read_bytes()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, node: HttpNode) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}\n{node.tail()}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc"), aet="ORTHANC") as server:
        yield server


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[HttpNode]:
    folder = tmp_path_factory.mktemp("http-node")
    # The README's screenshot shows the shipped model's grade; the tests run the tiny one.
    docs = os.environ.get("BAC_NODE_UPDATE_DOCS") == "1"
    model = None if docs else save_tiny_model(folder / "tiny.safetensors")
    server = HttpNode(folder / "data", model, orthanc.dicomweb_url).start()
    yield server
    code = server.stop()
    # A clean stop with the HTTP thread running: exit 0, and the node says so.
    assert code == 0, server.tail()
    assert "stopped" in server.tail()


@pytest.fixture(scope="module")
def stored(node: HttpNode) -> pydicom.Dataset:
    """The sample study stored over STOW-RS by dicomweb-client: the response."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{node.url}/dicomweb", headers=auth(TOKEN))
    client.set_http_retry_params(retry=False)
    response: pydicom.Dataset = client.store_instances(
        [pydicom.dcmread(path) for path in sample_study()]
    )
    return response


@pytest.fixture(scope="module")
def exported(node: HttpNode, stored: pydicom.Dataset, orthanc: Orthanc) -> str:
    """Wait until the node's SEGs and SR of the sample study are in Orthanc; its study UID."""
    study_uid = str(pydicom.dcmread(sample_study()[0]).StudyInstanceUID)

    def modalities() -> list[str]:
        study = orthanc.find_study(study_uid)
        return [] if study is None else sorted(orthanc.study_modalities(study))

    wait_until(lambda: modalities() == ["SEG"] * 4 + ["SR"], 120, "SEG x4 + SR in Orthanc", node)
    return study_uid


def node_test(function: Callable[..., None]) -> Callable[..., None]:
    """A test of the module's node: `serve` takes ~10-15 s to start (torch, the model)."""
    marked: Callable[..., None] = pytest.mark.slow(
        pytest.mark.orthanc(pytest.mark.network(function))
    )
    return marked


# --- the acceptance --------------------------------------------------------------------------


def test_multipart_parser_finds_parts_and_refuses_malformed_bodies() -> None:
    body = b"preamble\r\n" + multipart(("application/dicom", b"one"), (None, b"\r\ntwo"))
    parts = split_multipart(body, BOUNDARY)
    assert [bytes(body[p.start : p.end]) for p in parts] == [b"one", b"\r\ntwo"]
    assert [p.media_type for p in parts] == ["application/dicom", ""]
    for bad, reason in [
        (multipart(("application/dicom", b"one"), close=False), "no closing boundary"),
        (b"no boundary at all", "does not occur"),
        (f"--{BOUNDARY}--\r\n".encode(), "no part"),
        (f"--{BOUNDARY}\r\nContent-Type application/dicom\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
         "bad header line"),
    ]:  # fmt: skip
        with pytest.raises(HttpError, match=reason) as raised:
            split_multipart(bad, BOUNDARY)
        assert raised.value.status == 400


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("http_port", -2, "http_port must be -1 (off), 0 (any free port) or 1-65535"),
        ("http_tls_cert", "cert.pem", "http_tls_cert and http_tls_key must be set together"),
        ("http_tokens", ("short",), "at least 16 printable ASCII characters"),
        ("http_tokens", ("sha256:abc",), "64 hexadecimal digits"),
        ("http_max_request_mb", 0, "http_max_request_mb must be at least 1"),
        ("destinations", ("https://user:secret@pacs/dicom-web",), "credentials do not belong"),
        ("destinations", ("http:///dicom-web",), "must look like http(s)://host"),
    ],
)
def test_http_settings_are_checked(setting: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(**{setting: value})


def test_dicomweb_destinations_are_accepted_and_not_calling_ae_titles() -> None:
    settings = Settings(destinations=("http://pacs:8042/dicom-web/", "PACS@pacs:104"))
    assert parse_dicomweb_destination(settings.destinations[0]) == "http://pacs:8042/dicom-web"
    assert CallingAllowlist.from_settings(settings).any_host == frozenset({"PACS"})


def test_settings_command_does_not_print_tokens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BAC_NODE_HTTP_TOKENS", f"{TOKEN},{HASHED_TOKEN}")
    assert cli_main(["settings"]) == 0
    shown = capsys.readouterr().out
    assert TOKEN not in shown and HASHED_TOKEN not in shown
    assert "(2 set, not shown)" in shown


@pytest.mark.network
def test_https_on_a_free_port_and_a_port_in_use(tmp_path: Path) -> None:
    """In process: TLS from http_tls_cert/key, http_port 0, and a taken port is one line."""
    openssl = shutil.which("openssl") or pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = Settings(
        data_dir=tmp_path / "data", http_port=0, http_tls_cert=str(cert), http_tls_key=str(key),
        http_tokens=(TOKEN,), min_free_mb=1,
    )  # fmt: skip
    db = open_database(settings.data_dir)
    server = start_http(settings, db, InstanceStore(settings, db), host="127.0.0.1")
    try:
        assert server.url == f"https://127.0.0.1:{server.port}" and server.port > 0
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)),
                          trust_env=False) as client:  # fmt: skip
            assert client.get(f"{server.url}/healthz").json() == {"status": "ok"}
            assert client.get(f"{server.url}/metrics", headers=auth(TOKEN)).status_code == 200
        taken = dataclasses.replace(settings, http_port=server.port)
        with pytest.raises(
            BacNodeError, match=f"cannot listen for HTTP on 127.0.0.1:{server.port}"
        ):
            start_http(taken, db, InstanceStore(taken, db), host="127.0.0.1")
    finally:
        server.shutdown(10)
        db.dispose()
    assert not server.thread.is_alive()


@node_test
def test_openapi_served_equals_committed(node: HttpNode) -> None:
    served = node.get("/openapi.json", token=None)
    assert served.status_code == 200
    committed = json.loads(OPENAPI.read_text(encoding="utf-8"))
    assert served.json() == committed == openapi_document(), (
        "deploy/openapi.json is stale: run `bac-node openapi -o deploy/openapi.json`"
    )


@node_test
def test_health_and_readiness_are_open_the_rest_needs_a_token(node: HttpNode) -> None:
    assert node.get("/healthz", token=None).json() == {"status": "ok"}
    ready = node.get("/readyz", token=None)
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True
    assert set(ready.json()["checks"]) == {"database", "model", "disk"}
    before = len(node.instance_uids())
    for token in (None, "wrong-token-0123456789abcdef"):
        for answer in (
            node.get("/metrics", token=token), node.get("/status", token=token),
            node.get("/status.json", token=token),
            node.stow(multipart(("application/dicom", sample_study()[0].read_bytes())),
                      token=token),
        ):  # fmt: skip
            assert answer.status_code == 401, (answer.request.url, answer.text)
            assert answer.headers["www-authenticate"].startswith(("Bearer", "Basic"))
            assert ("missing" if token is None else "wrong") in answer.text
    assert len(node.instance_uids()) == before
    assert node.get("/metrics", token=HASHED_TOKEN).status_code == 200  # the sha256: entry
    # A browser: the page challenges with Basic; any user name, a token as the password.
    page = node.client.get("/status")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert node.client.get("/status", auth=("admin", TOKEN)).status_code == 200
    assert node.client.get("/status", auth=("admin", "nope")).status_code == 401


@node_test
def test_dicomweb_client_stores_the_sample_study(node: HttpNode, stored: pydicom.Dataset) -> None:
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sample_study()}
    assert "FailedSOPSequence" not in stored
    assert {str(i.ReferencedSOPInstanceUID) for i in stored.ReferencedSOPSequence} == sent
    uids = node.instance_uids()
    assert {uid: uids[uid] for uid in sent} == dict.fromkeys(sent, "dicomweb")
    assert len(node.stored_files()) == len(uids)


@node_test
def test_bad_requests_get_their_status_and_store_nothing(node: HttpNode, tmp_path: Path) -> None:
    sop_uid, instance = new_instance(tmp_path)
    files_before, uids_before = node.stored_files(), node.instance_uids()

    def refused(answer: httpx.Response, status: int, reason: str) -> None:
        assert answer.status_code == status, answer.text
        assert reason in answer.text and reason in answer.headers["warning"]

    # Wrong content type: one bare DICOM file, and DICOM JSON metadata parts.
    refused(node.stow(instance, "application/dicom"), 415, "must be multipart/related")
    refused(node.stow(multipart(("application/dicom", instance)),
                      f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'),
            415, "only application/dicom parts")  # fmt: skip
    # Malformed multipart: no boundary parameter; a good part but no closing delimiter.
    refused(node.stow(multipart(("application/dicom", instance)), "multipart/related"),
            400, "no boundary")  # fmt: skip
    refused(node.stow(multipart(("application/dicom", instance), close=False)), 400,
            "no closing boundary")  # fmt: skip
    # Too large, streamed in chunks (no Content-Length), the good instance first.
    padding = b"\0" * (MAX_REQUEST_MB * 1024 * 1024)
    chunks = iter([multipart(("application/dicom", instance))[:-2], padding])
    refused(node.stow(chunks), 413, "larger than http_max_request_mb")
    # A part that is not DICOM, alone: nothing stored, 409, the reason per part.
    alone = node.stow(multipart(("application/dicom", b"this is not DICOM")))
    assert alone.status_code == 409, alone.text
    assert alone.headers["content-type"] == "application/dicom+json"
    failed = pydicom.Dataset.from_json(alone.json()).FailedSOPSequence
    assert [int(item.FailureReason) for item in failed] == [0xC000]
    assert "part 1: not a DICOM Part 10 file" in alone.headers["warning"]
    # An instance whose study is not the one in the path.
    other = node.stow(multipart(("application/dicom", instance)),
                      path="/dicomweb/studies/1.2.3.4")  # fmt: skip
    assert other.status_code == 409 and "not in study 1.2.3.4" in other.headers["warning"]

    assert node.instance_uids() == uids_before
    assert sop_uid not in node.instance_uids()
    assert node.stored_files() == files_before
    assert node.leftovers() == []


@node_test
def test_partial_store_is_202_and_xml_when_asked(node: HttpNode, stored: pydicom.Dataset) -> None:
    known = sample_study()[0]
    known_uid = str(pydicom.dcmread(known, stop_before_pixels=True).SOPInstanceUID)
    body = multipart(("application/dicom", known.read_bytes()), ("text/plain", b"hello"))
    answer = node.stow(body, accept="application/dicom+xml")
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"] == "application/dicom+xml"
    root = ElementTree.fromstring(answer.content)
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    referenced = root.findall(
        ".//d:DicomAttribute[@keyword='ReferencedSOPInstanceUID']/d:Value", ns
    )
    assert [v.text for v in referenced] == [known_uid]
    reasons = root.findall(".//d:DicomAttribute[@keyword='FailureReason']/d:Value", ns)
    assert [int(str(v.text)) for v in reasons] == [0xC000]
    assert "part 2: text/plain is not application/dicom" in answer.headers["warning"]


@node_test
def test_metrics_move_as_data_arrives(node: HttpNode, stored: pydicom.Dataset) -> None:
    before = node.metrics()
    body = multipart(("application/dicom", sample_study()[1].read_bytes()))
    assert node.stow(body).status_code == 200  # a duplicate: answered as stored
    after = node.metrics()

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("bac_node_stow_requests_total", status="200") == 1
    assert moved("bac_node_stow_instances_total", outcome="stored") == 1
    assert moved("bac_node_stow_request_bytes_total") == len(body)
    assert after[("bac_node_instances_received_total", (("protocol", "dicomweb"),))] >= 4
    assert after[("bac_node_received_bytes_total", (("protocol", "dicomweb"),))] > 4 * 1_000_000
    assert after[("bac_node_database_up", ())] == 1
    assert after[("bac_node_studies", ())] >= 1


@node_test
def test_dicomweb_export_failures_are_one_line_reasons(node: HttpNode, tmp_path: Path) -> None:
    """What the retry/dead-letter machinery records for a DICOMweb destination."""
    settings = Settings(data_dir=tmp_path / "data", network_timeout=5)
    db = open_database(settings.data_dir)
    exporter = Exporter(settings, db)
    files = (sample_study()[0],)
    try:
        down = f"http://127.0.0.1:{free_port()}/dicom-web"
        with pytest.raises(ExportError, match=re.escape(f"{down}: cannot connect")):
            exporter.send_dicomweb(files, down)
        refused = f"{node.url}/dicomweb"  # our own node, without a token
        with pytest.raises(ExportError, match=re.escape(f"{refused}: STOW-RS answered HTTP 401")):
            exporter.send_dicomweb(files, refused)
    finally:
        db.dispose()


@node_test
def test_results_go_to_orthanc_by_stow_and_come_back_by_wado(
    node: HttpNode, exported: str, orthanc: Orthanc
) -> None:
    from dicomweb_client.api import DICOMwebClient

    results = list((node.data_dir / "results").rglob("sr.dcm"))
    assert len(results) == 1
    sr = pydicom.dcmread(results[0])
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    back = client.retrieve_instance(exported, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
    assert back.Modality == "SR" and back.SOPInstanceUID == sr.SOPInstanceUID
    assert back.ContentSequence == sr.ContentSequence
    db = open_database(node.data_dir)
    try:
        with db.read() as s:
            states = s.execute(select(Export.destination, Export.state)).all()
    finally:
        db.dispose()
    assert [tuple(row) for row in states] == [(orthanc.dicomweb_url, "done")]
    metrics = node.metrics()
    destination = (("destination", orthanc.dicomweb_url),)
    assert metrics[("bac_node_export_attempts_total", destination)] == 1
    assert metrics[("bac_node_export_failures_total", destination)] == 0
    assert metrics[("bac_node_analysis_seconds_count", ())] == 1


@node_test
@pytest.mark.browser
def test_status_page_renders_in_chromium_without_patient_data(
    node: HttpNode, exported: str, tmp_path: Path
) -> None:
    from browser import open_page

    sample = pydicom.dcmread(sample_study()[0], stop_before_pixels=True)
    with open_page(f"{node.url}/status", extra_headers=auth(TOKEN)) as view:
        assert view.errors == []
        page = view.page.content()
        assert exported in page and "Research use only" in page
        assert "done" in view.page.inner_text("table")
        for identifier in (str(sample.PatientName), str(sample.PatientID)):
            assert identifier and identifier not in page
        shot = tmp_path / "status-page.png"
        view.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("BAC_NODE_UPDATE_DOCS") == "1":  # how docs/status-page.png is made
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    json_status = node.get("/status.json").json()
    assert [s["study_uid"] for s in json_status["studies"]][-1] == exported
    for identifier in (str(sample.PatientName), str(sample.PatientID)):
        assert identifier not in json.dumps(json_status)


@node_test
def test_schemathesis_finds_no_server_error_nor_departure_from_the_spec(
    node: HttpNode, tmp_path: Path
) -> None:
    """Every default check (not_a_server_error, status code, content type and response
    schema conformance, auth enforced, ...) on every operation; few examples, fixed seed.

    The job-file routes get a job held by a fixed lease owner (schemathesis.toml), so
    schemathesis reaches their logic rather than only their 404s."""
    job_id, sop_uid = held_job(node.data_dir, SCHEMATHESIS_OWNER, tmp_path)
    (tmp_path / "schemathesis.toml").write_text(
        f'[parameters]\n"path.job" = {job_id}\n"path.instance" = "{sop_uid}"\n'
        f'"query.owner" = "{SCHEMATHESIS_OWNER}"\n'
    )
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{node.url}/openapi.json",
        "--max-examples", "8", "--seed", "1",
        "--phases", "examples,coverage,fuzzing", "--header", f"Authorization: Bearer {TOKEN}",
        "--request-timeout", "30", "--workers", "1",
    ]  # fmt: skip
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env=dict(
            os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
            SCHEMATHESIS_HOOKS="_schemathesis_hooks", PYTHONPATH=str(Path(__file__).parent),
        ),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested: 11" in run.stdout and "No issues found" in run.stdout, run.stdout[-3000:]
