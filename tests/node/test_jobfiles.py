"""Workers without the shared data directory: a job's files over the node's HTTP interface.

In process and on loopback: the node's real HTTP server (:func:`start_http`, uvicorn in
a thread) over an SQLite data directory, and a :class:`Worker` whose ``data_dir`` is a
scratch folder of its own, with ``node_url`` and a token file, sharing only the
database URL. The same worker on the node's own data directory is the reference: the
HTTP worker's result must be the same record, its files where a local worker writes
them. The routes' refusals are raw httpx calls, each checked against the data directory
(nothing written, no temporary file left). Across network namespaces and PostgreSQL:
test_netns.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from _processing_helpers import node_settings, phantom_study, save_tiny_model, store_files
from peers import free_port
from sqlalchemy import select

from bac_node.analysis import Predictor
from bac_node.cli import main as cli_main
from bac_node.config import Settings, check_node_url
from bac_node.errors import ConfigError
from bac_node.model.inference import load_predictor
from bac_node.model.weights import ModelCard
from bac_node.node.db import Database, Export, Job, Result, database_url, open_database
from bac_node.node.http import HttpServer, start_http
from bac_node.node.jobfiles import content_digest
from bac_node.node.queue import claim_job, enqueue_ready_studies
from bac_node.node.store import InstanceStore
from bac_node.node.worker import Worker

TOKEN = "jobfiles-token-0123456789"
REMOTE = "remote-host:4242:worker0"
DESTINATION = "PACS@127.0.0.1:11113"

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, ModelCard]:
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    predictor, card, _ = load_predictor(str(path), device="cpu")
    return predictor, card


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_study(tmp_path_factory.mktemp("study"), 21)


class NodeSide:
    """The node: its data directory, database and HTTP server (no SCP, no workers)."""

    def __init__(self, data_dir: Path, max_request_mb: int = 1024) -> None:
        self.data_dir = data_dir
        self.settings = node_settings(
            data_dir, http_port=0, http_tokens=(TOKEN,), min_free_mb=1,
            http_max_request_mb=max_request_mb,
        )  # fmt: skip
        self.db = open_database(data_dir)
        self.server: HttpServer = start_http(
            self.settings, self.db, InstanceStore(self.settings, self.db), host="127.0.0.1"
        )
        self.client = httpx.Client(base_url=self.server.url, timeout=30, trust_env=False)

    def queue(self, files: list[Path]) -> str:
        uid = store_files(self.db, self.data_dir, files)
        assert enqueue_ready_studies(self.db, stable_after=0) == [uid]
        return uid

    def job(self) -> Job:
        with self.db.read() as s:
            return s.scalars(select(Job).order_by(Job.id.desc())).first()  # type: ignore[return-value]

    def call(
        self, method: str, path: str, *, owner: str | None = REMOTE, token: str | None = TOKEN,
        content: bytes | Iterator[bytes] = b"", headers: dict[str, str] | None = None,
    ) -> httpx.Response:  # fmt: skip
        sent = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"owner": owner} if owner is not None else {}
        return self.client.request(
            method, path, params=params, headers={**sent, **(headers or {})},
            content=content if method == "PUT" else None,
        )  # fmt: skip

    def leftovers(self) -> list[Path]:
        results = self.data_dir / "results"
        return [p for p in results.rglob("*") if p.name.startswith(".")] if results.exists() else []

    def close(self) -> None:
        self.client.close()
        self.server.shutdown(10)
        self.db.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeSide]:
    side = NodeSide(tmp_path / "node")
    yield side
    side.close()


def remote_settings(scratch: Path, node: NodeSide, url: str | None = None) -> Settings:
    token_file = scratch.parent / "token"
    token_file.write_text(TOKEN + "\n")
    return node_settings(
        scratch, database=database_url(node.data_dir), node_url=url or node.server.url,
        node_token_file=str(token_file), destinations=(DESTINATION,), lease_seconds=60,
    )  # fmt: skip


def remote_worker(
    scratch: Path, node: NodeSide, model: tuple[Predictor, ModelCard], url: str | None = None
) -> tuple[Worker, Database]:
    settings = remote_settings(scratch, node, url)
    db = open_database(settings.database)  # its own connection, as on another host
    predictor, card = model
    return Worker(settings, db, predictor=predictor, card=card, owner=REMOTE), db


def scratch_files(scratch: Path) -> list[Path]:
    return [p for p in scratch.rglob("*") if p.is_file()]


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_without_the_share_analyses_over_http_like_a_local_one(
    node: NodeSide, tmp_path: Path, model: tuple[Predictor, ModelCard], study_files: list[Path]
) -> None:
    uid = node.queue(study_files)
    worker, worker_db = remote_worker(tmp_path / "scratch", node, model)
    try:
        assert worker.run_once()
    finally:
        worker_db.dispose()
    job = node.job()
    assert (job.state, job.attempts, job.last_error, job.lease_owner) == ("done", 1, None, REMOTE)
    with node.db.read() as s:
        result = s.scalars(select(Result)).one()
        exports = [(e.destination, e.state) for e in s.scalars(select(Export))]
    assert exports == [(DESTINATION, "pending")]
    assert result.path == f"results/{job.inputs_key[:16]}/{uid}"
    names = sorted(p.name for p in (node.data_dir / result.path).iterdir())
    assert names == sorted([Path(f).name for f in result.files] + ["summary.json"])
    for name in result.files:  # the exporter reads these on the node
        assert pydicom.dcmread(node.data_dir / name).StudyInstanceUID == uid
    summary = json.loads((node.data_dir / result.path / "summary.json").read_text())
    assert summary["sr_sop_instance_uid"] == result.sr_uid
    assert scratch_files(tmp_path / "scratch") == []  # emptied after the job
    assert node.leftovers() == []

    # The same study analysed by a worker on a node's own data directory: the same
    # record (path, file names, SR UID, grade), so the node holds what it would hold.
    local_dir = tmp_path / "local"
    local_db = open_database(local_dir)
    try:
        store_files(local_db, local_dir, study_files)
        enqueue_ready_studies(local_db, stable_after=0)
        predictor, card = model
        local = Worker(node_settings(local_dir), local_db, predictor=predictor, card=card)
        assert local.run_once()
        with local_db.read() as s:
            reference = s.scalars(select(Result)).one()
    finally:
        local_db.dispose()
    assert (result.path, result.files, result.sr_uid, result.grade) == (
        reference.path, reference.files, reference.sr_uid, reference.grade,
    )  # fmt: skip


def test_a_node_out_of_reach_gets_the_job_back_without_an_attempt(
    node: NodeSide, tmp_path: Path, model: tuple[Predictor, ModelCard], study_files: list[Path]
) -> None:
    node.queue(study_files)
    nowhere = f"http://127.0.0.1:{free_port()}"
    worker, worker_db = remote_worker(tmp_path / "scratch", node, model, url=nowhere)
    try:
        assert worker.run_once() is False  # given back: the loop waits before claiming again
    finally:
        worker_db.dispose()
    job = node.job()
    assert (job.state, job.attempts, job.lease_owner) == ("pending", 0, None)
    assert scratch_files(tmp_path / "scratch") == []


def test_inputs_changed_after_the_claim_fail_the_attempt_and_the_job_is_superseded(
    node: NodeSide, tmp_path: Path, model: tuple[Predictor, ModelCard], study_files: list[Path]
) -> None:
    node.queue(study_files[:3])
    worker, worker_db = remote_worker(tmp_path / "scratch", node, model)
    try:
        job = claim_job(worker_db, REMOTE, 60, data_dir=worker.settings.data_dir)
        assert job is not None
        store_files(node.db, node.data_dir, study_files[3:])  # a late fourth view
        assert worker.process(job)
    finally:
        worker_db.dispose()
    failed = node.job()
    assert failed.state == "pending" and "lists other inputs" in (failed.last_error or "")
    assert claim_job(node.db, "another", 60) is None  # superseded, no newer job yet
    assert node.job().state == "superseded"
    assert scratch_files(tmp_path / "scratch") == []


# --- the routes ------------------------------------------------------------------------------


def test_job_file_routes_serve_only_the_lease_holder_and_write_atomically(
    node: NodeSide, study_files: list[Path]
) -> None:
    uid = node.queue(study_files)
    claimed = claim_job(node.db, REMOTE, 60)
    assert claimed is not None
    base = f"/jobs/{claimed.job_id}"

    listing = node.call("GET", f"{base}/inputs")
    assert listing.status_code == 200, listing.text
    document = listing.json()
    assert document["study_uid"] == uid and document["inputs_key"] == claimed.inputs_key
    first = document["instances"][0]
    data = node.call("GET", f"{base}/inputs/{first['sop_instance_uid']}")
    assert data.status_code == 200 and data.headers["content-type"] == "application/dicom"
    assert hashlib.sha256(data.content).hexdigest() == first["sha256"]

    for method, path, owner, token, status, reason in [
        ("GET", f"{base}/inputs", REMOTE, None, 401, "missing bearer token"),
        ("GET", f"{base}/inputs", REMOTE, "wrong-token-0123456789", 401, "wrong bearer token"),
        ("GET", f"{base}/inputs", "someone-else", TOKEN, 409, "not under this owner's lease"),
        ("GET", f"{base}/inputs", None, TOKEN, 400, "give owner=LEASE_OWNER"),
        ("GET", "/jobs/999999/inputs", REMOTE, TOKEN, 404, "no job 999999"),
        ("GET", "/jobs/0/inputs", REMOTE, TOKEN, 400, "integer 1-2147483647"),
        ("GET", "/jobs/99999999999/inputs", REMOTE, TOKEN, 400, "integer 1-2147483647"),
        ("GET", f"{base}/inputs/1.2.3.4", REMOTE, TOKEN, 404, "is not an input of job"),
        ("GET", f"{base}/inputs/{first['sop_instance_uid']}", "x", TOKEN, 409, "lease"),
        ("PUT", f"{base}/results/sr.dcm", "someone-else", TOKEN, 409, "lease"),
        ("PUT", f"{base}/results/.sr.dcm", REMOTE, TOKEN, 400, "a result file name"),
    ]:  # fmt: skip
        answer = node.call(method, path, owner=owner, token=token, content=b"x")
        assert (answer.status_code, reason in answer.text) == (status, True), (path, answer.text)

    target = node.data_dir / f"results/{claimed.inputs_key[:16]}/{uid}/sr.dcm"
    body = b"result bytes"
    wrong = content_digest(hashlib.sha256(b"other").hexdigest())
    answer = node.call("PUT", f"{base}/results/sr.dcm", content=body,
                       headers={"Content-Digest": wrong})  # fmt: skip
    assert answer.status_code == 400 and "does not match its Content-Digest" in answer.text
    malformed = node.call("PUT", f"{base}/results/sr.dcm", content=body,
                          headers={"Content-Digest": "md5=:abc:"})  # fmt: skip
    assert malformed.status_code == 400 and "sha-256" in malformed.text
    assert not target.exists() and node.leftovers() == []

    sha = hashlib.sha256(body).hexdigest()
    stored = node.call("PUT", f"{base}/results/sr.dcm", content=body,
                       headers={"Content-Digest": content_digest(sha)})  # fmt: skip
    assert stored.status_code == 201, stored.text
    assert stored.json() == {
        "path": f"results/{claimed.inputs_key[:16]}/{uid}/sr.dcm", "size_bytes": len(body),
        "sha256": sha,
    }  # fmt: skip
    assert target.read_bytes() == body and node.leftovers() == []


def test_an_upload_over_the_size_limit_is_refused_and_leaves_nothing(
    tmp_path: Path, study_files: list[Path]
) -> None:
    node = NodeSide(tmp_path / "node", max_request_mb=1)
    try:
        node.queue(study_files)
        claimed = claim_job(node.db, REMOTE, 60)
        assert claimed is not None

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is met while reading
            for _ in range(3):
                yield b"\0" * 600_000

        answer = node.call("PUT", f"/jobs/{claimed.job_id}/results/big.dcm", content=chunks())
        assert answer.status_code == 413, answer.text
        assert list((node.data_dir / "results").rglob("big.dcm")) == []
        assert node.leftovers() == []
    finally:
        node.close()


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("node:8080", "must look like http(s)://host:port"),
        ("https://user:pw@node:8080", "credentials do not belong"),
        ("http://node:8080/?x=1", "has no query"),
        ("http://node:99999", "invalid port"),
    ],
)
def test_node_url_is_checked(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_node_url(url)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(node_url=url)


def test_a_worker_with_node_url_needs_a_database_and_a_readable_token(
    tmp_path: Path, model: tuple[Predictor, ModelCard]
) -> None:
    predictor, card = model
    db = open_database(tmp_path / "db")
    try:
        token = tmp_path / "token"
        for fields, message in [
            ({"node_token_file": str(token)}, "node_url needs database"),
            ({"database": "sqlite:///x.sqlite"}, "node_url needs node_token_file"),
            ({"database": "sqlite:///x.sqlite", "node_token_file": str(token)},
             "cannot read the token file"),
        ]:  # fmt: skip
            settings = node_settings(tmp_path / "scratch", node_url="http://node:8080", **fields)
            with pytest.raises(ConfigError, match=message):
                Worker(settings, db, predictor=predictor, card=card)
        token.write_text("two tokens\n")
        with pytest.raises(ConfigError, match="must hold one token"):
            Worker(
                node_settings(tmp_path / "scratch", node_url="http://node:8080",
                              database="sqlite:///x.sqlite", node_token_file=str(token)),
                db, predictor=predictor, card=card,
            )  # fmt: skip
    finally:
        db.dispose()
    shutil.rmtree(tmp_path / "scratch", ignore_errors=True)


def test_worker_command_refuses_an_unusable_node_url_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the model loads: a worker without its token says so and exits 1."""
    monkeypatch.setenv("BAC_NODE_ALLOCATOR_TUNED", "1")  # no re-exec of the test process
    data = ["--data-dir", str(tmp_path / "scratch")]
    assert cli_main([*data, "worker", "--node-url", "http://node:8080"]) == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "Error: node_url needs node_token_file (worker --token-file FILE)"
    )
    assert cli_main([*data, "worker", "--node-url", "node:8080", "--token-file", "t"]) == 1
    assert "must look like http(s)://host:port" in capfd.readouterr().err
