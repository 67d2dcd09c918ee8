"""A job's files for workers on other hosts: the shared data directory, or the node over HTTP.

A worker reads a job's input instances and writes its result files under a data
directory. On the ingesting node's host, or on a host that mounts the node's data
directory (a network filesystem), that is the node's own directory
(:class:`SharedDataDirectory`: nothing to move). A host without the share sets
``node_url`` (``bac-node worker --node-url URL --token-file F``): it fetches the inputs
from the node's HTTP interface and uploads the results back (:class:`NodeFiles`); its
``data_dir`` is then a local scratch folder. Either way the job is claimed, renewed and
completed through the shared database (:mod:`bac_node.node.queue`): leases, one result
set per inputs and exactly-once exports are the queue's, and the exporter runs on the
node, which reads the files where a local worker would have written them.

The routes (served by ``bac-node serve`` with ``http_port``; :func:`routes`,
:func:`openapi_paths`), all with ``?owner=LEASE_OWNER`` and a bearer token of
``http_tokens``:

- ``GET /jobs/{job}/inputs``: the job's analysable instances (SOP Instance UID,
  sha256, size, view) as JSON, in the order the queue hands them to a local worker.
- ``GET /jobs/{job}/inputs/{instance}``: one of them, ``application/dicom``.
- ``PUT /jobs/{job}/results/{name}``: one result file (``seg-….dcm``, ``sr.dcm``,
  ``summary.json``), written to ``DATA_DIR/results/<inputs_key[:16]>/<StudyInstanceUID>/``
  atomically (a temporary file beside it, fsynced, renamed, the folder fsynced); an
  ``Content-Digest: sha-256=:…:`` header (RFC 9530), which the worker always sends,
  is checked before the rename.

Decisions a next engineer needs:

- **Only the lease's holder.** Every route answers 409 unless the job is ``running``
  with ``lease_owner`` = ``owner``: a worker that lost its lease can neither read the
  inputs nor overwrite results (which would be the same objects anyway: their UIDs
  derive from the inputs). The token says who may call at all; the owner says which
  job's files. The final word stays with :func:`~bac_node.node.queue.complete_job`.
- **The inputs are checked, twice.** The worker recomputes ``inputs_key`` from the
  listing (a study that got new images since the job was queued fails this attempt;
  the queue then supersedes the job and a newer one follows) and the sha256 of every
  file it downloads.
- **Failures.** The node unreachable, or refusing this worker (401, 5xx, an unknown
  job: a node on another database), gives the job back without counting an attempt
  (:class:`NodeUnavailableError`) and the worker waits before claiming again. A file that
  arrives damaged, or an input the node no longer has, is a failed attempt
  (:class:`TransferError`). 409 means the lease was lost (:class:`LeaseLostError`): the
  worker drops the job without writing anything.
- **Scratch is emptied** after each job (inputs and results); the node's copy is the
  one that counts.
- **No patient identifiers** in listings, errors or logs: instances by UID. The
  input files themselves are the images (what the worker needs), to token holders only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from bac_node import __version__
from bac_node.config import Settings
from bac_node.errors import ConfigError
from bac_node.node.db import Database, Job

# The queue's own order and instance filter, so that a listing is what claim_job gives.
from bac_node.node.queue import (
    _VIEW_ORDER,
    RESULTS_DIR,
    ClaimedJob,
    ResultRecord,
    _analysable,
    inputs_key,
)

if TYPE_CHECKING:
    import httpx
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from bac_node.node.http import HttpContext

log = logging.getLogger(__name__)

#: Folder of a worker's scratch directory where a job's inputs are downloaded.
SCRATCH_INPUTS = "inputs"
#: The largest job id the routes accept (the column is a 32-bit integer on PostgreSQL).
MAX_JOB_ID = 2**31 - 1
#: A result file name: what write_results names its files (no path, no leading dot).
RESULT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
OWNER_MAX = 128
#: A lease owner (``host:pid:workerN``): visible ASCII.
OWNER_PATTERN = rf"^[!-~]{{1,{OWNER_MAX}}}$"
_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/]+={0,2}):")
_CHUNK = 1 << 20


# --- the job, as the node sees it ----------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One input instance of a job (by UID; no patient data)."""

    sop_instance_uid: str
    sha256: str
    size_bytes: int
    view: str
    path: str
    """Relative to the node's data directory (not sent to workers)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid, "sha256": self.sha256,
            "size_bytes": self.size_bytes, "view": self.view,
        }  # fmt: skip


@dataclass(frozen=True)
class HeldJob:
    """A running job and its inputs, as the node answers its lease holder."""

    job_id: int
    study_uid: str
    inputs_key: str
    inputs: tuple[InputFile, ...]

    @property
    def results_path(self) -> str:
        """Where the job's result files go, relative to the data directory (as the
        worker's :meth:`~bac_node.node.worker.Worker.results_root` puts them)."""
        return f"{RESULTS_DIR}/{self.inputs_key[:16]}/{self.study_uid}"

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job_id, "study_uid": self.study_uid, "inputs_key": self.inputs_key,
            "instances": [i.as_json() for i in self.inputs],
        }  # fmt: skip


class JobRequestError(Exception):
    """A job-file request the node refuses: HTTP status and one line."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def held_job(db: Database, job_id: int, owner: str) -> HeldJob:
    """The job ``owner`` holds the lease of; JobRequestError 404 (no such job) or 409."""
    with db.read() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobRequestError(404, f"no job {job_id} in the node's database")
        if job.state != "running" or job.lease_owner != owner:
            raise JobRequestError(
                409, f"job {job_id} is {job.state} and not under this owner's lease"
            )
        instances = sorted(
            _analysable(job.study), key=lambda i: (_VIEW_ORDER.get(i.view, 9), i.sop_instance_uid)
        )
        return HeldJob(
            job_id=job.id, study_uid=job.study.study_uid, inputs_key=job.inputs_key,
            inputs=tuple(
                InputFile(i.sop_instance_uid, i.sha256, i.size_bytes, i.view, i.path)
                for i in instances
            ),
        )  # fmt: skip


def job_arguments(path_params: dict[str, Any], query: Any) -> tuple[int, str]:
    """The job id of the path and the ``owner`` of the query; JobRequestError 400 when bad."""
    text = str(path_params.get("job", ""))
    if not text.isdigit() or not 1 <= int(text) <= MAX_JOB_ID:
        raise JobRequestError(400, f"the job in the path must be an integer 1-{MAX_JOB_ID}")
    owner = str(query.get("owner", ""))
    if not re.fullmatch(OWNER_PATTERN, owner):
        raise JobRequestError(
            400, f"give owner=LEASE_OWNER (1-{OWNER_MAX} visible ASCII characters) in the query"
        )
    return int(text), owner


def content_sha256(header: str) -> str | None:
    """The sha256 (hex) of an RFC 9530 ``Content-Digest`` header; None without the header.

    JobRequestError 400 when the header is there without a usable ``sha-256`` entry.
    """
    if not header.strip():
        return None
    match = _DIGEST.search(header)
    if match:
        with contextlib.suppress(ValueError):
            raw = base64.b64decode(match[1], validate=True)
            if len(raw) == 32:
                return raw.hex()
    raise JobRequestError(400, "Content-Digest must hold sha-256=:BASE64:")


def content_digest(sha256_hex: str) -> str:
    """The RFC 9530 ``Content-Digest`` value of a sha256."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


# --- the node's routes ---------------------------------------------------------------------


def routes(context: HttpContext) -> list[Route]:
    """The job-file routes of the node's Starlette application."""
    from starlette.routing import Route

    handlers = _JobFileRoutes(context)
    return [
        Route("/jobs/{job}/inputs", handlers.inputs, methods=["GET"]),
        Route("/jobs/{job}/inputs/{instance}", handlers.input_file, methods=["GET"]),
        Route("/jobs/{job}/results/{name}", handlers.put_result, methods=["PUT"]),
    ]


class _JobFileRoutes:
    def __init__(self, context: HttpContext) -> None:
        self.context = context

    async def inputs(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        try:
            held = await run_in_threadpool(self._held, request)
        except JobRequestError as refused:
            return self._refused(request, refused)
        return JSONResponse(held.as_json())

    async def input_file(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import FileResponse

        try:
            held = await run_in_threadpool(self._held, request)
            uid = str(request.path_params.get("instance", ""))
            found = next((i for i in held.inputs if i.sop_instance_uid == uid), None)
            if found is None:
                shown = uid if re.fullmatch(UID_PATTERN, uid) and len(uid) <= 64 else "(not a UID)"
                raise JobRequestError(404, f"instance {shown} is not an input of job {held.job_id}")
            path = self.context.settings.data_dir / found.path
            if not path.is_file():
                raise JobRequestError(
                    404, f"instance {uid}: its file is gone from the node (purged or removed)"
                )
        except JobRequestError as refused:
            return self._refused(request, refused)
        return FileResponse(path, media_type="application/dicom")

    async def put_result(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse

        try:
            held = await run_in_threadpool(self._held, request)
            name = str(request.path_params.get("name", ""))
            if not re.fullmatch(RESULT_NAME_PATTERN, name) or ".." in name:
                raise JobRequestError(400, "a result file name is letters, digits, '.', '-', '_'")
            expected = content_sha256(request.headers.get("content-digest", ""))
            relative = f"{held.results_path}/{name}"
            target = self.context.settings.data_dir / relative
            size, sha = await self._receive(request, target, expected)
        except JobRequestError as refused:
            return self._refused(request, refused)
        except ClientDisconnect:
            log.warning("job result upload: the client went away; nothing written")
            return self._text(400, "the client disconnected before the body was complete")
        log.info(
            "job %d: study %s: result file %s received (%d bytes)",
            held.job_id, held.study_uid, name, size,
        )  # fmt: skip
        return JSONResponse({"path": relative, "size_bytes": size, "sha256": sha}, 201)

    def _held(self, request: Request) -> HeldJob:
        refusal = self.context.access.refusal(request)
        if refusal:
            raise JobRequestError(401, refusal)
        job_id, owner = job_arguments(request.path_params, request.query_params)
        return held_job(self.context.db, job_id, owner)

    async def _receive(
        self, request: Request, target: Path, expected: str | None
    ) -> tuple[int, str]:
        """The body into ``target``, atomically: (size, sha256). JobRequestError 400/413/507."""
        from starlette.concurrency import run_in_threadpool

        limit_mb = self.context.settings.http_max_request_mb
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit_mb * (1 << 20):
            raise JobRequestError(
                413, f"the file is larger than http_max_request_mb ({limit_mb} MiB)"
            )
        try:
            await run_in_threadpool(_make_directories, target.parent)
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".upload",
                                            dir=target.parent)  # fmt: skip
        except OSError as exc:
            raise JobRequestError(
                507, f"cannot write in the data directory ({exc.strerror})"
            ) from None
        temporary = Path(name)
        try:
            with os.fdopen(handle, "wb") as out:
                size, digest = await self._write_body(request, out, limit_mb)
                await run_in_threadpool(_flush, out)
            sha = digest.hexdigest()
            if size == 0:  # no result file is empty: a body lost on the way
                raise JobRequestError(400, "the request has no body")
            if expected is not None and sha != expected:
                raise JobRequestError(400, "the body does not match its Content-Digest (sha-256)")
            await run_in_threadpool(_place, temporary, target)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise JobRequestError(507, f"cannot write the result file ({exc.strerror})") from None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return size, sha

    async def _write_body(self, request: Request, out: IO[bytes], limit_mb: int) -> tuple[int, Any]:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit_mb * (1 << 20):
                raise JobRequestError(
                    413, f"the file is larger than http_max_request_mb ({limit_mb} MiB)"
                )
            digest.update(chunk)
            out.write(chunk)
        return size, digest

    def _refused(self, request: Request, refused: JobRequestError) -> Response:
        client = request.client.host if request.client else "-"
        log.warning(
            "job files: %s %r from %s refused (%d): %s",  # %r: no control characters
            request.method, request.url.path[:200], client, refused.status, refused.reason,
        )  # fmt: skip
        return self._text(refused.status, refused.reason)

    def _text(self, status: int, reason: str) -> Response:
        from bac_node.node.http import _text_error, _unauthorized

        return _unauthorized(reason) if status == 401 else _text_error(status, reason)


def _flush(out: IO[bytes]) -> None:
    out.flush()
    os.fsync(out.fileno())


def _place(temporary: Path, target: Path) -> None:
    os.replace(temporary, target)
    _fsync_directory(target.parent)


def _make_directories(directory: Path) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        _fsync_directory(created.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- OpenAPI -------------------------------------------------------------------------------


def openapi_paths() -> dict[str, Any]:
    """The job-file routes in :func:`bac_node.node.http.openapi_document`."""

    def text(description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }

    job = {
        "name": "job", "in": "path", "required": True, "description": "The job's id.",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_JOB_ID},
    }  # fmt: skip
    owner = {
        "name": "owner", "in": "query", "required": True,
        "description": "The lease owner that claimed the job (the worker's name).",
        "schema": {"type": "string", "pattern": OWNER_PATTERN, "maxLength": OWNER_MAX},
    }  # fmt: skip
    refusals = {
        "400": text("A bad job id, owner, name or Content-Digest."),
        "401": text("Missing or wrong bearer token."),
        "404": text("No such job, or no such input of the job."),
        "409": text("The job is not running under this owner's lease."),
    }
    listing = {
        "type": "object",
        "properties": {
            "job": {"type": "integer"},
            "study_uid": {"type": "string"},
            "inputs_key": {"type": "string"},
            "instances": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sop_instance_uid": {"type": "string"},
                        "sha256": {"type": "string"},
                        "size_bytes": {"type": "integer"},
                        "view": {"type": "string"},
                    },
                    "required": ["sop_instance_uid", "sha256", "size_bytes", "view"],
                },
            },
        },
        "required": ["job", "study_uid", "inputs_key", "instances"],
    }
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "/jobs/{job}/inputs": {
            "get": {
                "summary": "A claimed job's input instances (workers without the shared "
                "data directory)",
                "operationId": "jobInputs",
                "tags": ["Workers"],
                "security": security,
                "parameters": [job, owner],
                "responses": {
                    "200": {
                        "description": "The inputs, by UID, in analysis order.",
                        "content": {"application/json": {"schema": listing}},
                    },
                    **refusals,
                },
            }
        },
        "/jobs/{job}/inputs/{instance}": {
            "get": {
                "summary": "One input instance of a claimed job (DICOM Part 10)",
                "operationId": "jobInputFile",
                "tags": ["Workers"],
                "security": security,
                "parameters": [
                    job,
                    {
                        "name": "instance",
                        "in": "path",
                        "required": True,
                        "description": "SOP Instance UID of one of the job's inputs.",
                        "schema": {"type": "string", "pattern": UID_PATTERN, "maxLength": 64},
                    },
                    owner,
                ],
                "responses": {
                    "200": {
                        "description": "The instance as stored by the node.",
                        "content": {
                            "application/dicom": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    **refusals,
                },
            }
        },
        "/jobs/{job}/results/{name}": {
            "put": {
                "summary": "Upload one result file of a claimed job (SEG, SR, summary.json)",
                "description": "Written atomically (temporary file, fsync, rename) where a "
                "local worker writes it: DATA_DIR/results/<inputs_key[:16]>/"
                "<StudyInstanceUID>/<name>. A Content-Digest header (RFC 9530, "
                "sha-256=:BASE64:), which bac-node workers always send, is checked first "
                "(400 when it does not match). The worker then completes the job through "
                "the shared database.",
                "operationId": "putJobResult",
                "tags": ["Workers"],
                "security": security,
                "parameters": [
                    job,
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "The file's name, e.g. sr.dcm.",
                        "schema": {"type": "string", "pattern": RESULT_NAME_PATTERN},
                    },
                    owner,
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary", "minLength": 1}
                        }
                    },
                },
                "responses": {
                    "201": {
                        "description": "Written and fsynced.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "path": {"type": "string"},
                                        "size_bytes": {"type": "integer"},
                                        "sha256": {"type": "string"},
                                    },
                                    "required": ["path", "size_bytes", "sha256"],
                                }
                            }
                        },
                    },
                    **refusals,
                    "413": text("Larger than http_max_request_mb."),
                    "507": text("The file cannot be written in the data directory."),
                },
            }
        },
    }


# --- the worker's side ---------------------------------------------------------------------


class NodeUnavailableError(RuntimeError):
    """The node cannot be reached or refuses this worker: give the job back, wait."""


class TransferError(RuntimeError):
    """A file did not arrive intact, or the inputs are not the job's: a failed attempt."""


class LeaseLostError(RuntimeError):
    """The node says this worker no longer holds the job (409)."""


class JobFiles(Protocol):
    """Where a worker finds a job's inputs and puts its results."""

    def fetch(self, job: ClaimedJob, owner: str) -> ClaimedJob:
        """``job`` with ``paths`` a local worker can read."""
        ...

    def publish(self, job: ClaimedJob, owner: str, record: ResultRecord) -> None:
        """Put the files of ``record`` where the node's exporter reads them."""
        ...

    def cleanup(self, job: ClaimedJob) -> None:
        """Forget the job's local copies (after it was completed, failed or dropped)."""
        ...

    def close(self) -> None: ...


class SharedDataDirectory:
    """The worker's data directory is the node's: nothing to move."""

    def fetch(self, job: ClaimedJob, owner: str) -> ClaimedJob:
        return job

    def publish(self, job: ClaimedJob, owner: str, record: ResultRecord) -> None:
        return None

    def cleanup(self, job: ClaimedJob) -> None:
        return None

    def close(self) -> None:
        return None


def job_files(settings: Settings) -> JobFiles:
    """:class:`NodeFiles` when ``node_url`` is set, else :class:`SharedDataDirectory`."""
    return NodeFiles.from_settings(settings) if settings.node_url else SharedDataDirectory()


class NodeFiles:
    """Inputs fetched from, and results uploaded to, the node's HTTP interface.

    ``scratch`` (the worker's ``data_dir``) mirrors the node's layout for results
    (``results/<inputs_key[:16]>/<StudyInstanceUID>/``), so the worker's
    :class:`~bac_node.node.queue.ResultRecord` names the files where the node has them.
    """

    def __init__(self, base_url: str, token: str, scratch: Path, *, verify: Any = True) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.scratch = scratch
        self.client: httpx.Client = httpx.Client(
            base_url=self.base_url + "/", verify=verify, trust_env=False,
            timeout=httpx.Timeout(120.0, connect=10.0),
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"bac-node/{__version__}"},
        )  # fmt: skip

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeFiles:
        """From ``node_url``, ``node_token_file``, ``node_ca_file``; ConfigError when unusable."""
        if not settings.node_token_file:
            raise ConfigError("node_url needs node_token_file (worker --token-file FILE)")
        if not settings.database:
            raise ConfigError(
                "node_url needs database: a worker that fetches its inputs over HTTP claims "
                "jobs from the node's shared database (worker --database URL)"
            )
        try:
            lines = Path(settings.node_token_file).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(
                f"{settings.node_token_file}: cannot read the token file ({why})"
            ) from None
        if len(lines) != 1:
            raise ConfigError(f"{settings.node_token_file}: the token file must hold one token")
        verify: Any = True
        if settings.node_ca_file:
            import ssl

            try:
                verify = ssl.create_default_context(cafile=settings.node_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"{settings.node_ca_file}: cannot load node_ca_file ({exc})"
                ) from None
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.node_url, lines[0], settings.data_dir, verify=verify)

    # --- inputs ---

    def fetch(self, job: ClaimedJob, owner: str) -> ClaimedJob:
        self.cleanup(job)  # an earlier attempt on this host may have left files
        listing = self._json("GET", f"jobs/{job.job_id}/inputs", owner, missing_job=True)
        instances = listing.get("instances", [])
        key = inputs_key((str(i["sop_instance_uid"]), str(i["sha256"])) for i in instances)
        if key != job.inputs_key or listing.get("job") != job.job_id:
            raise TransferError(
                f"job {job.job_id}: the node lists other inputs than the job's (the study's "
                "images changed since it was queued; a newer job follows)"
            )
        folder = self._inputs_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in instances:
            uid, sha = str(item["sop_instance_uid"]), str(item["sha256"])
            if not re.fullmatch(UID_PATTERN, uid) or len(uid) > 64:
                raise TransferError(f"job {job.job_id}: the node listed a malformed UID")
            paths.append(self._download(job, owner, uid, sha, folder / f"{uid}.dcm"))
        log.info(
            "job %d: %d input(s) of study %s fetched from %s",
            job.job_id, len(paths), job.study_uid, self.base_url,
        )  # fmt: skip
        return replace(job, paths=tuple(paths))

    def _download(self, job: ClaimedJob, owner: str, uid: str, sha: str, path: Path) -> Path:
        import httpx

        digest = hashlib.sha256()
        temporary = path.with_name(f".{path.name}.part")
        try:
            with self.client.stream(
                "GET", f"jobs/{job.job_id}/inputs/{uid}", params={"owner": owner}
            ) as answer:
                if answer.status_code != 200:
                    answer.read()
                    self._refused(answer, f"instance {uid} of job {job.job_id}")
                with temporary.open("wb") as out:
                    for chunk in answer.iter_bytes(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.TransportError as exc:
            temporary.unlink(missing_ok=True)
            raise NodeUnavailableError(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != sha:
            temporary.unlink(missing_ok=True)
            raise TransferError(f"instance {uid} of job {job.job_id} arrived damaged (sha256)")
        os.replace(temporary, path)
        return path

    # --- results ---

    def publish(self, job: ClaimedJob, owner: str, record: ResultRecord) -> None:
        folder = self.scratch / record.path
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        for path in files:
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            answer = self._json(
                "PUT", f"jobs/{job.job_id}/results/{path.name}", owner, content=data,
                headers={"Content-Digest": content_digest(sha),
                         "Content-Type": "application/octet-stream"},
            )  # fmt: skip
            if answer.get("path") != f"{record.path}/{path.name}" or answer.get("sha256") != sha:
                raise TransferError(
                    f"job {job.job_id}: the node stored {path.name} as {answer.get('path')} "
                    f"(expected {record.path}/{path.name}); is it the same bac-node version?"
                )
        log.info(
            "job %d: %d result file(s) of study %s uploaded to %s",
            job.job_id, len(files), job.study_uid, self.base_url,
        )  # fmt: skip

    def cleanup(self, job: ClaimedJob) -> None:
        shutil.rmtree(self._inputs_dir(job), ignore_errors=True)
        shutil.rmtree(self.scratch / RESULTS_DIR / job.inputs_key[:16], ignore_errors=True)

    def close(self) -> None:
        self.client.close()

    # --- HTTP ---

    def _inputs_dir(self, job: ClaimedJob) -> Path:
        return self.scratch / SCRATCH_INPUTS / str(job.job_id)

    def _json(
        self, method: str, path: str, owner: str, *, missing_job: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        import httpx

        try:
            answer = self.client.request(method, path, params={"owner": owner}, **kwargs)
        except httpx.TransportError as exc:
            raise NodeUnavailableError(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        if answer.status_code not in (200, 201):
            self._refused(answer, path, missing_job=missing_job)
        try:
            document = answer.json()
        except ValueError:
            raise NodeUnavailableError(f"{self.base_url}/{path}: the answer is not JSON") from None
        if not isinstance(document, dict):
            raise NodeUnavailableError(f"{self.base_url}/{path}: unexpected answer")
        return document

    def _refused(self, answer: httpx.Response, what: str, *, missing_job: bool = False) -> None:
        status = answer.status_code
        reason = " ".join(answer.text.split())[:300]
        message = f"{self.base_url}: {what}: HTTP {status} {reason}"
        if status == 409:
            raise LeaseLostError(message)
        if status in (401, 403) or status >= 500 or (status == 404 and missing_job):
            raise NodeUnavailableError(message)
        raise TransferError(message)
