"""The HTTP side of ``bac-node serve``: STOW-RS in, health, readiness, metrics, status page.

A Starlette application served by uvicorn in a thread of the ``serve`` process
(:class:`HttpServer`, started and stopped by :class:`bac_node.node.service.Node`). The
interface is described by :func:`openapi_document`, served at ``/openapi.json`` and
committed as ``deploy/openapi.json`` (``bac-node openapi`` writes it; a test keeps the
two equal).

Decisions a next engineer needs:

- **Off unless configured.** ``http_port = -1`` (the default) runs no HTTP server;
  ``0`` takes a free port (the log line and :attr:`HttpServer.port` say which: tests
  and the demo); ``deploy/bac-node.toml`` uses 8080. ``http_host`` empty means the
  address ``serve --host`` listens on. One socket is bound before the thread starts,
  so a port in use is a one-line error from ``serve``, like the DICOM port.
- **Who may do what.** ``/healthz``, ``/readyz`` and ``/openapi.json`` are open (they
  say nothing about studies). STOW-RS, ``/metrics``, ``/status`` and ``/status.json``
  need ``Authorization: Bearer <token>`` with a token of ``http_tokens`` (an entry
  ``sha256:HEX`` matches the token whose SHA-256 is HEX, so the settings file need
  not hold the token itself), or HTTP Basic with any user name and a token as the
  password (``/status`` challenges with Basic, so a browser asks for it). With no
  tokens configured they are refused (401) to everyone, except that
  ``http_loopback_trusted = true`` lets loopback clients in without a token (a
  one-host set-up; never behind a reverse proxy on the same host, which makes every
  client look local). Prometheus sends the token with
  ``authorization: {credentials: …}``.
- **STOW-RS** (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with
  ``multipart/related; type="application/dicom"``. The body is spooled to an
  anonymous file under ``DATA_DIR/incoming`` while it is read, counting bytes: more
  than ``http_max_request_mb`` is 413 (at once when Content-Length says so). The
  whole multipart structure is checked before anything is stored, so a malformed
  body (no boundary, no closing delimiter, no part) is 400 and stores nothing. Each
  part is then one instance, stored all or nothing by
  :meth:`~bac_node.node.store.InstanceStore.store` (``protocol="dicomweb"``: the
  same fsync-then-commit rule as C-STORE). A part that is not ``application/dicom``
  or not a Part 10 file, or whose Study Instance UID differs from the one in the
  path, is a failed instance (FailureReason 0xC000, or 0xA900 for the study), never
  an error of the request. Status: 200 every instance stored without warning, 202
  some stored with failures or warnings (SEG/SR/SC are stored with warning 0xB000
  "not analysed"), 409 none stored, 415 a request that is not
  ``multipart/related`` of ``application/dicom``. The answer is the Store Instances
  Response Module (PS3.18 Table 10.5.3-1: Referenced SOP Sequence, Failed SOP
  Sequence, FailureReason, WarningReason) as ``application/dicom+json``, or
  ``application/dicom+xml`` when Accept prefers it; every reason is also a
  ``Warning: 299`` header. Errors of the request (400, 401, 413, 415) answer one
  ``text/plain`` line that says what to fix.
- **Metrics** live in a per-node :class:`~prometheus_client.CollectorRegistry` (never
  the global one: several nodes in one test process must not clash). Counts that
  outlive the process (instances and bytes stored by protocol, studies, jobs and
  exports by state, export attempts and failures by destination, the analysis-time
  histogram) are read from the database at each scrape, so they include what other
  processes (``bac-node worker``) did and survive restarts; this process's STOW-RS
  requests, parts and bytes are ordinary counters.
- **Job files** (``/jobs/{job}/inputs``, ``/jobs/{job}/results/{name}``): a worker on
  a host without the shared data directory fetches a claimed job's inputs and uploads
  its results, token and lease holder only; :mod:`bac_node.node.jobfiles` has the
  routes, their OpenAPI entries and the worker's client.
- **No patient identifiers** leave through HTTP: studies and instances are named by
  UID, the status page shows UIDs, states, grades and times only, and nothing here
  logs a request body.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email.message
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import mmap
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import IO, Any
from xml.etree import ElementTree

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import case, func, select, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bac_node import __version__
from bac_node.config import Settings
from bac_node.errors import BacNodeError
from bac_node.node.db import Database, Export, Instance, Job, Result, Study, utcnow
from bac_node.node.queue import EXPORT_STATES, JOB_STATES, queue_counts, recent_failures
from bac_node.node.store import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    SUCCESS,
    InstanceStore,
    StoreOutcome,
)

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
MULTIPART_RELATED = "multipart/related"
APPLICATION_DICOM = "application/dicom"
#: Folder of the data directory where STOW-RS bodies are spooled (anonymous files).
INCOMING_DIR = "incoming"
#: How many studies the status page lists.
STATUS_STUDIES = 50
#: Upper bounds (seconds) of the analysis-time histogram's buckets.
ANALYSIS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: How long a stop waits for requests in flight before cancelling them.
GRACEFUL_SHUTDOWN_SECONDS = 30
_MIB = 1024 * 1024
_CHUNK = 1 << 20
#: The Study Instance UID path parameter: a DICOM UID (PS3.5 9.1), 64 characters at most.
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


class HttpError(Exception):
    """A request that cannot be served: its HTTP status and the one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- who may call ------------------------------------------------------------------------


class Access:
    """Bearer tokens of ``http_tokens`` and the loopback rule (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self._plain = [t.encode() for t in settings.http_tokens if not _is_digest(t)]
        self._digests = [t[7:].lower().encode() for t in settings.http_tokens if _is_digest(t)]
        self.loopback_trusted = settings.http_loopback_trusted

    @property
    def has_tokens(self) -> bool:
        return bool(self._plain or self._digests)

    def refusal(self, request: Request) -> str | None:
        """None when ``request`` may use a protected route, else why not (one line)."""
        if self.loopback_trusted and _is_loopback(request):
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":  # a browser's login prompt: any user, the token as password
            token = _basic_password(token)
        elif scheme.lower() != "bearer":
            token = ""
        if not token.strip():
            if not self.has_tokens:
                return "no http_tokens are configured: this route is closed"
            return "missing bearer token (send Authorization: Bearer <token>)"
        if self.accepts(token.strip()):
            return None
        return "wrong bearer token"

    def accepts(self, token: str) -> bool:
        given = token.encode()
        digest = hashlib.sha256(given).hexdigest().encode()
        found = False  # every entry is compared: the time taken says nothing about which
        for plain in self._plain:
            found |= hmac.compare_digest(plain, given)
        for expected in self._digests:
            found |= hmac.compare_digest(expected, digest)
        return found


def _basic_password(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def _is_digest(token: str) -> bool:
    return token.lower().startswith("sha256:")


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _unauthorized(reason: str, *, browser: bool = False) -> Response:
    """401 with a Bearer challenge, or a Basic one for the page (the browser asks for a
    user name, any, and a password, the token)."""
    if browser:
        challenge = 'Basic realm="bac-node: any user name, a token as password"'
    else:
        error = ', error="invalid_token"' if reason == "wrong bearer token" else ""
        challenge = f'Bearer realm="bac-node"{error}'
    return _text_error(401, reason, {"WWW-Authenticate": challenge})


def _text_error(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        reason + "\n", status_code=status, media_type="text/plain",
        headers={"Warning": _warning(reason), **(headers or {})},
    )  # fmt: skip


def _warning(reason: str) -> str:
    """An RFC 7234 Warning header value, as PS3.18 uses it for reasons (ASCII only)."""
    text = reason.encode("ascii", "replace").decode().replace("\\", "/").replace('"', "'")
    return f'299 bac-node "{text[:300]}"'


# --- multipart/related -------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One body part of a multipart message: its headers and where its content lies."""

    headers: dict[str, str]
    start: int
    end: int

    @property
    def media_type(self) -> str:
        return _media_type(self.headers.get("content-type", ""))


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _media_params(value: str) -> dict[str, str]:
    """The parameters of a media type; HttpError 400 when the email package cannot parse them.

    ``boundary*=x; boundary*0=y`` (a continuation mixed with a plain RFC 2231 parameter)
    made ``email.utils.decode_params`` raise TypeError: an HTTP 500, found by
    tests/reliability/fuzz/fuzz_multipart.py.
    """
    message = email.message.Message()
    message["content-type"] = value
    try:
        params = message.get_params(header="content-type") or []
        return {str(k).lower(): str(v) for k, v in params[1:]}
    except Exception as exc:  # the stdlib parser's failures are not documented
        raise HttpError(400, f"malformed Content-Type parameters ({type(exc).__name__})") from None


def request_boundary(content_type: str) -> str:
    """The boundary of a STOW-RS request's Content-Type; HttpError 415 or 400 if unusable."""
    media = _media_type(content_type)
    expected = f'{MULTIPART_RELATED}; type="{APPLICATION_DICOM}"'
    if media != MULTIPART_RELATED:
        raise HttpError(415, f"Content-Type must be {expected}, not {media or 'missing'}")
    params = _media_params(content_type)
    kind = params.get("type", APPLICATION_DICOM).strip().lower()
    if kind != APPLICATION_DICOM:
        raise HttpError(
            415, f"only {APPLICATION_DICOM} parts are accepted (type={kind}); send {expected}"
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise HttpError(400, "malformed multipart: the Content-Type has no boundary parameter")
    if len(boundary) > 70 or not boundary.isascii():
        raise HttpError(400, "malformed multipart: the boundary is not 1-70 ASCII characters")
    return boundary


def split_multipart(body: bytes | mmap.mmap, boundary: str) -> list[Part]:
    """The parts of a multipart body (RFC 2046 5.1.1); HttpError 400 when malformed.

    The whole structure is checked, closing delimiter included, before a part is used.
    """
    delimiter = b"--" + boundary.encode("ascii")
    if body[: len(delimiter)] == delimiter:
        position = 0
    else:  # a preamble before the first delimiter is allowed (and ignored)
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise HttpError(400, "malformed multipart: the boundary does not occur in the body")
        position = found + 2
    parts: list[Part] = []
    while True:
        after = position + len(delimiter)
        if body[after : after + 2] == b"--":
            break  # the closing delimiter; an epilogue may follow
        line_end = body.find(b"\r\n", after)
        if line_end < 0 or body[after:line_end].strip(b" \t"):
            raise HttpError(400, f"malformed multipart: bad delimiter line after part {len(parts)}")
        start = line_end + 2
        following = body.find(b"\r\n" + delimiter, start)
        if following < 0:
            raise HttpError(
                400, f"malformed multipart: part {len(parts) + 1} has no closing boundary"
            )
        parts.append(_part(body, start, following, len(parts) + 1))
        position = following + 2
    if not parts:
        raise HttpError(400, "malformed multipart: the message has no part")
    return parts


def _part(body: bytes | mmap.mmap, start: int, end: int, number: int) -> Part:
    if body[start : start + 2] == b"\r\n":
        return Part({}, start + 2, end)  # no headers
    headers_end = body.find(b"\r\n\r\n", start, end)
    if headers_end < 0:
        raise HttpError(400, f"malformed multipart: part {number} has no end of headers")
    headers: dict[str, str] = {}
    for line in bytes(body[start:headers_end]).split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise HttpError(400, f"malformed multipart: part {number} has a bad header line")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return Part(headers, headers_end + 4, end)


# --- the Store Instances response ----------------------------------------------------------


@dataclass(frozen=True)
class InstanceOutcome:
    """What became of one part: its UIDs (when known), DIMSE-style status and reason."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int
    stored: bool
    reason: str


@dataclass
class StowResult:
    outcomes: list[InstanceOutcome] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        stored = [o for o in self.outcomes if o.stored]
        if not stored:
            return 409
        if len(stored) == len(self.outcomes) and all(o.status == SUCCESS for o in stored):
            return 200
        return 202

    def dataset(self) -> Dataset:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-1)."""
        ds = Dataset()
        referenced, failed = [], []
        for outcome in self.outcomes:
            item = Dataset()
            item.ReferencedSOPClassUID = outcome.sop_class_uid
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
            if outcome.stored:
                if outcome.status != SUCCESS:
                    item.WarningReason = outcome.status
                referenced.append(item)
            else:
                item.FailureReason = outcome.status
                failed.append(item)
        if referenced:
            ds.ReferencedSOPSequence = referenced
        if failed:
            ds.FailedSOPSequence = failed
        return ds

    def warnings(self) -> list[str]:
        return [
            o.reason for o in self.outcomes if o.reason and (not o.stored or o.status != SUCCESS)
        ]


def native_dicom_xml(ds: Dataset) -> bytes:
    """``ds`` in the PS3.19 Native DICOM Model (what ``application/dicom+xml`` carries)."""
    root = ElementTree.Element(
        "NativeDicomModel", xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"
    )
    _xml_elements(root, ds)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)


def _xml_elements(parent: ElementTree.Element, ds: Dataset) -> None:
    for element in ds:
        attributes = {"tag": f"{element.tag:08X}", "vr": str(element.VR)}
        node = ElementTree.SubElement(parent, "DicomAttribute", attributes, keyword=element.keyword)
        if element.VR == "SQ":
            for number, item in enumerate(element.value, start=1):
                _xml_elements(ElementTree.SubElement(node, "Item", number=str(number)), item)
            continue
        values = element.value if element.VM > 1 else [element.value]
        for number, value in enumerate(values, start=1):
            if value is not None and value != "":
                ElementTree.SubElement(node, "Value", number=str(number)).text = str(value)


def prefers_xml(accept: str) -> bool:
    """Whether an Accept header prefers DICOM XML over DICOM JSON (JSON by default)."""
    best_json, best_xml = -1.0, -1.0
    for position, entry in enumerate(accept.split(",")):
        media = _media_type(entry)
        q = 1.0
        for param in entry.split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    q = float(value)
        rank = q - position * 1e-6  # equal q: the one listed first wins
        if media in (DICOM_XML, "application/xml", "text/xml"):
            best_xml = max(best_xml, rank)
        elif media in (DICOM_JSON, "application/json", "application/*", "*/*"):
            best_json = max(best_json, rank)
    return best_xml > best_json


# --- metrics -------------------------------------------------------------------------------


class NodeMetrics:
    """The node's Prometheus registry (one per node; see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.stow_requests = Counter(
            "bac_node_stow_requests", "STOW-RS requests answered, by HTTP status.",
            ["status"], registry=self.registry,
        )  # fmt: skip
        self.stow_instances = Counter(
            "bac_node_stow_instances", "STOW-RS parts, by outcome (stored, warning, failed).",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.stow_bytes = Counter(
            "bac_node_stow_request_bytes", "Bytes of STOW-RS request bodies read.",
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(_DatabaseCollector(db))

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _DatabaseCollector:
    """Counts read from the database at each scrape (they outlive the process)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> list[Metric]:
        return []  # nothing is read when the collector is registered

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("bac_node_database_up", "1 when the node's database answers.")
        try:
            families = list(self._families())
        except Exception as exc:  # a scrape reports the database down, never a 500
            log.warning("metrics: the database cannot be read (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        instances = CounterMetricFamily(
            "bac_node_instances_received", "Instances stored, by protocol (dimse, dicomweb).",
            labels=["protocol"],
        )  # fmt: skip
        received_bytes = CounterMetricFamily(
            "bac_node_received_bytes", "Bytes of stored instance files, by protocol.",
            labels=["protocol"],
        )  # fmt: skip
        jobs = GaugeMetricFamily("bac_node_jobs", "Analysis jobs, by state.", labels=["state"])
        exports = GaugeMetricFamily(
            "bac_node_exports", "Exports, by destination and state.",
            labels=["destination", "state"],
        )  # fmt: skip
        attempts = CounterMetricFamily(
            "bac_node_export_attempts", "Export attempts finished, by destination.",
            labels=["destination"],
        )  # fmt: skip
        failures = CounterMetricFamily(
            "bac_node_export_failures", "Failed export attempts, by destination.",
            labels=["destination"],
        )  # fmt: skip
        with self.db.read() as s:
            for protocol, count, size in s.execute(
                select(Instance.protocol, func.count(), func.sum(Instance.size_bytes))
                .group_by(Instance.protocol)
            ):  # fmt: skip
                instances.add_metric([protocol], count)
                received_bytes.add_metric([protocol], size or 0)
            studies = s.scalar(select(func.count()).select_from(Study)) or 0
            by_state = dict.fromkeys(JOB_STATES, 0)
            for state, count in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                by_state[state] = count
            for state, count in by_state.items():
                jobs.add_metric([state], count)
            done = case((Export.state == "done", 1), else_=0)
            for destination, failed, succeeded in s.execute(
                select(Export.destination, func.sum(Export.attempts), func.sum(done))
                .group_by(Export.destination)
            ):  # fmt: skip
                attempts.add_metric([destination], int(failed or 0) + int(succeeded or 0))
                failures.add_metric([destination], int(failed or 0))
            counted: dict[tuple[str, str], int] = {}
            for destination, state, count in s.execute(
                select(Export.destination, Export.state, func.count())
                .group_by(Export.destination, Export.state)
            ):  # fmt: skip
                counted[(destination, state)] = count
            for destination in sorted({d for d, _ in counted}):
                for state in EXPORT_STATES:
                    exports.add_metric([destination, state], counted.get((destination, state), 0))
            row = s.execute(
                select(
                    func.count(Result.id), func.coalesce(func.sum(Result.analysis_seconds), 0.0),
                    *(func.sum(case((Result.analysis_seconds <= b, 1), else_=0))
                      for b in ANALYSIS_BUCKETS),
                )
            ).one()  # fmt: skip
        yield instances
        yield received_bytes
        study_gauge = GaugeMetricFamily("bac_node_studies", "Studies known to the node.")
        study_gauge.add_metric([], studies)
        yield study_gauge
        yield jobs
        yield exports
        yield attempts
        yield failures
        total, seconds, *cumulative = row
        buckets = [
            (repr(b), int(n or 0)) for b, n in zip(ANALYSIS_BUCKETS, cumulative, strict=True)
        ]
        histogram = HistogramMetricFamily(
            "bac_node_analysis_seconds", "Seconds each recorded analysis took."
        )
        histogram.add_metric([], [*buckets, ("+Inf", int(total))], float(seconds))
        yield histogram


# --- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyStatus:
    """One row of the status page: a study by UID, never by patient."""

    study_uid: str
    instances: int
    first_received: dt.datetime
    last_received: dt.datetime
    state: str
    grade: int | None
    cardiovascular_flag: bool
    area_percent: float | None
    analysis_seconds: float | None
    finished: dt.datetime | None
    exports: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid, "instances": self.instances,
            "first_received": _iso(self.first_received), "last_received": _iso(self.last_received),
            "state": self.state, "grade": self.grade,
            "cardiovascular_flag": self.cardiovascular_flag, "area_percent": self.area_percent,
            "analysis_seconds": self.analysis_seconds, "finished": _iso(self.finished),
            "exports": self.exports,
        }  # fmt: skip


def recent_studies(db: Database, limit: int = STATUS_STUDIES) -> list[StudyStatus]:
    """The ``limit`` studies that received an instance last, newest first."""
    with db.read() as s:
        studies = s.scalars(
            select(Study).order_by(Study.last_received.desc(), Study.id.desc()).limit(limit)
        ).all()
        latest: dict[int, Job] = {}
        for job in s.scalars(
            select(Job).where(Job.study_id.in_([st.id for st in studies])).order_by(Job.id)
        ):
            latest[job.study_id] = job
        results = {
            r.job_id: r
            for r in s.scalars(
                select(Result).where(Result.job_id.in_([j.id for j in latest.values()]))
            )
        }
        exports: dict[int, dict[str, str]] = {}
        for result_id, destination, state in s.execute(
            select(Export.result_id, Export.destination, Export.state).where(
                Export.result_id.in_([r.id for r in results.values()])
            )
        ):
            exports.setdefault(result_id, {})[destination] = state
        rows = []
        for study in studies:
            latest_job = latest.get(study.id)
            result = results.get(latest_job.id) if latest_job else None
            rows.append(
                StudyStatus(
                    study_uid=study.study_uid, instances=study.instance_count,
                    first_received=study.first_received, last_received=study.last_received,
                    state=latest_job.state if latest_job else "receiving",
                    grade=result.grade if result else None,
                    cardiovascular_flag=bool(result and result.cardiovascular_flag),
                    area_percent=result.area_percent if result else None,
                    analysis_seconds=result.analysis_seconds if result else None,
                    finished=latest_job.finished_at if latest_job else None,
                    exports=exports.get(result.id, {}) if result else {},
                )
            )  # fmt: skip
    return rows


def status_document(settings: Settings, db: Database, started: dt.datetime) -> dict[str, Any]:
    """What ``/status.json`` answers and ``/status`` shows."""
    return {
        "node": {
            "ae_title": settings.ae_title, "version": __version__,
            "started": _iso(started), "now": _iso(utcnow()),
        },
        "counts": queue_counts(db),
        "studies": [row.as_json() for row in recent_studies(db)],
        "failures": [
            {"study_uid": f.study_uid, "what": f.what, "state": f.state,
             "error": f.last_error, "when": _iso(f.when)}
            for f in recent_failures(db, 20)
        ],
    }  # fmt: skip


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


_PAGE_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.note{color:#8a1c1c;font-weight:600}.meta{color:#555}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f3f4f6}td.uid{font-family:monospace;
font-size:12px;word-break:break-all}.num{text-align:right}.flag{color:#b00020;font-weight:600}
.state-done{color:#116329}.state-failed,.state-dead{color:#b00020}
.counts{margin:4px 0}.what{display:inline-block;width:64px;font-weight:600}
.pill{display:inline-block;margin-right:8px;padding:1px 8px;border:1px solid #ddd;
border-radius:10px;background:#f8f9fa}.empty{color:#777;font-style:italic}.when{white-space:nowrap}
"""


def _when(iso: str | None) -> str:
    """An ISO time of the status document as the page shows it: ``2026-01-02 03:04:05``."""
    return html.escape((iso or "").replace("T", " ").removesuffix("Z"))


def status_html(document: dict[str, Any]) -> str:
    """The status page: counts, recent studies by UID and recent failures; no patient data."""
    e = html.escape
    node = document["node"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='30'>",
        "<link rel='icon' href='data:,'>",  # no favicon request (it would be a 404)
        f"<title>bac-node {e(node['ae_title'])} status</title><style>{_PAGE_STYLE}</style>",
        "</head><body>",
        f"<h1>bac-node {e(node['ae_title'])}</h1>",
        f"<p class='meta'>version {e(node['version'])} · started {_when(node['started'])} · "
        f"page made {_when(node['now'])} (UTC, refreshes every 30 s)</p>",
        "<p class='note'>Research use only. Not for clinical use.</p>",
        "<h2>Queue</h2>",
    ]
    for table, by_state in document["counts"].items():
        pills = "".join(
            f"<span class='pill{f' state-{e(state)}' if count else ''}'>{e(state)} "
            f"<b>{count}</b></span>"
            for state, count in by_state.items()
        )
        parts.append(f"<p class='counts'><span class='what'>{e(table)}</span>{pills}</p>")
    parts.append("<h2>Recent studies</h2>")
    studies = document["studies"]
    if not studies:
        parts.append("<p class='empty'>No study received yet.</p>")
    else:
        parts.append(
            "<table><tr><th>Study Instance UID</th><th class='num'>images</th>"
            "<th>last received</th><th>state</th><th class='num'>grade</th><th>flag</th>"
            "<th class='num'>BAC area %</th><th class='num'>analysis s</th><th>finished</th>"
            "<th>exports</th></tr>"
        )
        for row in studies:
            grade = "" if row["grade"] is None else str(row["grade"])
            area = "" if row["area_percent"] is None else f"{row['area_percent']:.3f}"
            seconds = "" if row["analysis_seconds"] is None else f"{row['analysis_seconds']:.1f}"
            flag = "<span class='flag'>Grade 3</span>" if row["cardiovascular_flag"] else ""
            exports = "<br>".join(
                f"{e(d)}: <span class='state-{e(s)}'>{e(s)}</span>"
                for d, s in sorted(row["exports"].items())
            )
            parts.append(
                f"<tr><td class='uid'>{e(row['study_uid'])}</td>"
                f"<td class='num'>{row['instances']}</td>"
                f"<td class='when'>{_when(row['last_received'])}</td>"
                f"<td class='state-{e(row['state'])}'>{e(row['state'])}</td>"
                f"<td class='num'>{grade}</td><td>{flag}</td><td class='num'>{area}</td>"
                f"<td class='num'>{seconds}</td><td class='when'>{_when(row['finished'])}</td>"
                f"<td>{exports}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Recent failures</h2>")
    failures = document["failures"]
    if not failures:
        parts.append("<p class='empty'>None.</p>")
    else:
        parts.append(
            "<table><tr><th>when</th><th>Study Instance UID</th><th>what</th><th>state</th>"
            "<th>error</th></tr>"
        )
        for f in failures:
            parts.append(
                f"<tr><td class='when'>{_when(f['when'])}</td>"
                f"<td class='uid'>{e(f['study_uid'])}</td>"
                f"<td>{e(f['what'])}</td><td class='state-{e(f['state'])}'>{e(f['state'])}</td>"
                f"<td>{e(f['error'])}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


# --- the application -------------------------------------------------------------------------


@dataclass
class HttpContext:
    """What the routes need from the node."""

    settings: Settings
    db: Database
    store: InstanceStore
    #: None when the model (if this process runs workers) is loaded and its workers
    #: are alive; else the reason the node is not ready.
    model_problem: Callable[[], str | None] = lambda: None
    metrics: NodeMetrics = field(init=False)
    access: Access = field(init=False)
    started: dt.datetime = field(init=False, default_factory=utcnow)

    def __post_init__(self) -> None:
        self.metrics = NodeMetrics(self.db)
        self.access = Access(self.settings)


def build_app(context: HttpContext) -> Starlette:
    """The Starlette application of :func:`openapi_document`'s interface."""
    from bac_node.node import jobfiles  # it imports this module's helpers

    routes = _Routes(context)
    return Starlette(
        routes=[
            Route("/", routes.root, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/status", routes.status_page, methods=["GET"]),
            Route("/status.json", routes.status_json, methods=["GET"]),
            Route("/openapi.json", routes.openapi, methods=["GET"]),
            Route("/dicomweb/studies", routes.stow, methods=["POST"]),
            Route("/dicomweb/studies/{study}", routes.stow, methods=["POST"]),
            *jobfiles.routes(context),  # workers without the shared data directory
        ]
    )


class _Routes:
    def __init__(self, context: HttpContext) -> None:
        self.context = context
        self.settings = context.settings

    async def root(self, request: Request) -> Response:
        return RedirectResponse("/status", status_code=307)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks = await run_in_threadpool(self._readiness)
        ready = all(value.startswith("ok") for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    def _readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            with self.context.db.read() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable ({type(exc).__name__})"
        problem = self.context.model_problem()
        checks["model"] = "ok" if problem is None else problem
        try:
            free = shutil.disk_usage(self.settings.data_dir).free // _MIB
            enough = free >= self.settings.min_free_mb
            checks["disk"] = (
                f"ok: {free} MiB free" if enough
                else f"{free} MiB free, below min_free_mb ({self.settings.min_free_mb})"
            )  # fmt: skip
        except OSError as exc:
            checks["disk"] = f"data directory unreadable ({exc.strerror})"
        return checks

    async def metrics(self, request: Request) -> Response:
        refusal = self.context.access.refusal(request)
        if refusal:
            return _unauthorized(refusal)
        body = await run_in_threadpool(self.context.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def status_page(self, request: Request) -> Response:
        refusal = self.context.access.refusal(request)
        if refusal:
            return _unauthorized(refusal, browser=True)
        document = await run_in_threadpool(self._status)
        return HTMLResponse(status_html(document))

    async def status_json(self, request: Request) -> Response:
        refusal = self.context.access.refusal(request)
        if refusal:
            return _unauthorized(refusal)
        return JSONResponse(await run_in_threadpool(self._status))

    def _status(self) -> dict[str, Any]:
        return status_document(self.settings, self.context.db, self.context.started)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def stow(self, request: Request) -> Response:
        metrics = self.context.metrics
        response = await self._stow(request)
        metrics.stow_requests.labels(str(response.status_code)).inc()
        return response

    async def _stow(self, request: Request) -> Response:
        refusal = self.context.access.refusal(request)
        if refusal:
            return _unauthorized(refusal)
        study = request.path_params.get("study")
        try:
            if study is not None and not _valid_uid(study):
                raise HttpError(400, "the study in the path is not a valid DICOM UID")
            boundary = request_boundary(request.headers.get("content-type", ""))
            with self._spooled() as spool:
                await self._read_body(request, spool)
                result = await run_in_threadpool(self._store_parts, spool, boundary, study)
        except HttpError as error:
            log.warning(
                "STOW-RS from %s refused (%d): %s", _client(request), error.status, error.reason
            )
            return _text_error(error.status, error.reason)
        except ClientDisconnect:
            log.warning("STOW-RS from %s: the client went away; nothing stored", _client(request))
            return _text_error(400, "the client disconnected before the body was complete")
        for outcome in result.outcomes:
            kind = (
                "failed"
                if not outcome.stored
                else "stored"
                if outcome.status == SUCCESS
                else "warning"
            )
            self.context.metrics.stow_instances.labels(kind).inc()
        status = result.http_status
        log.info(
            "STOW-RS from %s: %d part(s), %d stored, %d failed (HTTP %d)",
            _client(request), len(result.outcomes), sum(o.stored for o in result.outcomes),
            sum(not o.stored for o in result.outcomes), status,
        )  # fmt: skip
        headers = {"Warning": ", ".join(_warning(w) for w in result.warnings()[:20])}
        if not headers["Warning"]:
            headers = {}
        ds = result.dataset()
        if prefers_xml(request.headers.get("accept", "")):
            return Response(native_dicom_xml(ds), status, headers, media_type=DICOM_XML)
        body = json.dumps(ds.to_json_dict()).encode()
        return Response(body, status, headers, media_type=DICOM_JSON)

    @contextlib.contextmanager
    def _spooled(self) -> Iterator[IO[bytes]]:
        incoming = self.settings.data_dir / INCOMING_DIR
        try:
            incoming.mkdir(parents=True, exist_ok=True)
            # Anonymous (unlinked at once): a crash leaves nothing behind.
            spool = tempfile.TemporaryFile(dir=incoming)  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise HttpError(
                507, f"cannot spool the request in the data directory ({exc.strerror})"
            ) from None
        with spool:
            yield spool

    async def _read_body(self, request: Request, spool: IO[bytes]) -> None:
        limit = self.settings.http_max_request_mb * _MIB
        too_big = (
            "the request is larger than http_max_request_mb "
            f"({self.settings.http_max_request_mb} MiB)"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HttpError(413, too_big)
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            self.context.metrics.stow_bytes.inc(len(chunk))
            if size > limit:
                raise HttpError(413, too_big)
            try:
                spool.write(chunk)
            except OSError as exc:
                raise HttpError(507, f"cannot spool the request ({exc.strerror})") from None
        if size == 0:
            raise HttpError(400, "malformed multipart: the request has no body")
        spool.flush()

    def _store_parts(self, spool: IO[bytes], boundary: str, study: str | None) -> StowResult:
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
            parts = split_multipart(body, boundary)
            result = StowResult()
            for number, part in enumerate(parts, start=1):
                result.outcomes.append(self._store_part(body, part, number, study))
        return result

    def _store_part(
        self, body: mmap.mmap, part: Part, number: int, study: str | None
    ) -> InstanceOutcome:
        media = part.media_type
        if media and media != APPLICATION_DICOM:
            return InstanceOutcome(
                "",
                "",
                CANNOT_UNDERSTAND,
                False,
                f"part {number}: {media} is not {APPLICATION_DICOM}",
            )
        read = read_part(body[part.start : part.end], number)
        if isinstance(read, InstanceOutcome):
            return read
        ds, syntax = read
        sop_class = _uid_text(ds, "SOPClassUID")
        sop_uid = _uid_text(ds, "SOPInstanceUID")
        if study is not None and _uid_text(ds, "StudyInstanceUID") != study:
            return InstanceOutcome(
                sop_class, sop_uid, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, False,
                f"part {number}: SOP Instance UID {sop_uid} is not in study {study} of the path",
            )  # fmt: skip
        outcome: StoreOutcome = self.context.store.store(
            ds, transfer_syntax_uid=syntax, calling_ae="", protocol="dicomweb"
        )
        return InstanceOutcome(
            sop_class, outcome.sop_instance_uid or sop_uid, outcome.status, outcome.stored,
            f"part {number}: {outcome.comment}" if outcome.failed or outcome.status else "",
        )  # fmt: skip


def read_part(data: bytes, number: int) -> tuple[Dataset, str] | InstanceOutcome:
    """A STOW-RS part as (data set, its transfer syntax), or its refusal (0xC000).

    Never raises for any bytes (tests/reliability/fuzz/fuzz_read.py fuzzes it with the
    store's validation after it).
    """
    problem = _file_meta_problem(data)
    if problem:
        return InstanceOutcome("", "", CANNOT_UNDERSTAND, False, f"part {number}: {problem}")
    if _deflated(data):
        # pydicom inflates a deflated data set whole, in memory: the 1.1 MB
        # tests/reliability/corpus/deflate_bomb.dcm took > 2 GiB. Like the SCP (which
        # does not offer the syntax), STOW-RS refuses Deflated Explicit VR LE.
        return InstanceOutcome(
            "", "", CANNOT_UNDERSTAND, False,
            f"part {number}: Deflated Explicit VR Little Endian is not accepted",
        )  # fmt: skip
    try:
        ds = dcmread(BytesIO(data))
        syntax = ds.file_meta.TransferSyntaxUID
        if not isinstance(syntax, str):  # see _deflated: never str() a sequence
            raise TypeError("the Transfer Syntax UID is not a UID")
    # Any failure of pydicom's parser on these bytes is the part's refusal, as the SCP
    # answers 0xC000 to any failure to decode a data set: a list of types missed
    # RecursionError (a sequence nested 500 deep, tests/reliability/corpus/) and OSError
    # ("No tag to read", found by tests/reliability/fuzz/fuzz_read.py), each an HTTP 500.
    except Exception as exc:
        reason = "not a DICOM Part 10 file" if isinstance(exc, InvalidDicomError) else (
            f"cannot be read as DICOM ({type(exc).__name__})"
        )  # fmt: skip
        return InstanceOutcome("", "", CANNOT_UNDERSTAND, False, f"part {number}: {reason}")
    return ds, syntax


#: Explicit VR Little Endian VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip


def _file_meta_problem(data: bytes) -> str | None:
    """Why a Part 10 file's meta (group 0002) must not reach pydicom, or None.

    The meta is a short list of UIDs and text (PS3.10 7.1): a sequence or an undefined
    length in it is never valid, and pydicom's meta reader followed one nested sequence
    of a 15 kB part past 2 GiB of memory (found by tests/reliability/fuzz/fuzz_read.py,
    kept in fuzz/regressions/). The elements are walked here, without parsing values; a
    file that is not Part 10 at all is left to dcmread, which names the problem.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    offset = 132
    while offset + 8 <= len(data):
        group = int.from_bytes(data[offset : offset + 2], "little")
        if group != 0x0002:
            return None
        vr = data[offset + 4 : offset + 6]
        if vr == b"SQ":
            return "the file meta information (group 0002) holds a sequence"
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                return None
            length = int.from_bytes(data[offset + 8 : offset + 12], "little")
            header = 12
        else:
            length = int.from_bytes(data[offset + 6 : offset + 8], "little")
            header = 8
        if length == 0xFFFFFFFF:
            return "the file meta information (group 0002) has an undefined length"
        offset += header + length
    return None


def _deflated(data: bytes) -> bool:
    """Whether a Part 10 file's meta says Deflated Explicit VR Little Endian (else False)."""
    try:
        # pydicom has no public reader of the meta of an in-memory file; its internal one
        # is imported here so that a pydicom without it only loses this early refusal.
        from pydicom.filereader import _read_file_meta_info, read_preamble

        fp = BytesIO(data)
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        # Never str() a value that is not text: a Transfer Syntax UID that is a deeply
        # nested sequence pretty-printed to > 2 GiB (tests/reliability/fuzz/fuzz_read.py)
        syntax = meta.get("TransferSyntaxUID", "")
        return isinstance(syntax, str) and syntax == DeflatedExplicitVRLittleEndian
    except Exception:
        return False  # dcmread then gives the reason


def _uid_text(ds: Dataset, keyword: str) -> str:
    try:
        value = str(ds.get(keyword, "") or "").strip().rstrip("\0")
    except Exception:
        return ""
    return value if _valid_uid(value) else ""


def _valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and re.fullmatch(UID_PATTERN, value) is not None


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


# --- the server --------------------------------------------------------------------------------


class HttpServer:
    """uvicorn serving ``app`` in a daemon thread on one socket bound at construction."""

    def __init__(self, app: Starlette, settings: Settings, host: str) -> None:
        import uvicorn

        self.host = host
        self.socket = _bind(host, settings.http_port)
        self.port = int(self.socket.getsockname()[1])
        self.tls = bool(settings.http_tls_cert)
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            ssl_certfile=settings.http_tls_cert or None, ssl_keyfile=settings.http_tls_key or None,
        )  # fmt: skip
        try:
            config.load()  # certificate problems surface here, as one line, not in the thread
        except (OSError, ssl.SSLError) as exc:
            self.socket.close()
            raise BacNodeError(
                f"cannot load http_tls_cert/http_tls_key ({getattr(exc, 'strerror', None) or exc})"
            ) from None
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # reported by start(); a crash later is logged
            self._failure = exc
            log.exception("the HTTP server stopped unexpectedly")

    def start(self, timeout: float = 30.0) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.shutdown(5)
                raise BacNodeError(f"the HTTP server did not start ({self._failure or 'timeout'})")
            time.sleep(0.02)
        log.info("HTTP (STOW-RS, /status, /metrics, /healthz) listening on %s", self.url)
        return self

    def shutdown(self, timeout: float = GRACEFUL_SHUTDOWN_SECONDS + 10) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), join."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        with contextlib.suppress(OSError):
            self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BacNodeError(
            f"cannot listen for HTTP on {host or '*'}:{port} ({exc.strerror or exc}); is "
            "another service using the port? Set `http_port`"
        ) from None
    sock.listen(128)
    return sock


def start_http(
    settings: Settings,
    db: Database,
    store: InstanceStore,
    *,
    host: str = "",
    model_problem: Callable[[], str | None] = lambda: None,
) -> HttpServer:
    """Start the HTTP interface of a node (``settings.http_port`` must not be -1)."""
    context = HttpContext(settings, db, store, model_problem)
    if not context.access.has_tokens and not settings.http_loopback_trusted:
        log.warning(
            "HTTP: no http_tokens configured: STOW-RS, /metrics and /status refuse everyone "
            "(401); set http_tokens, or http_loopback_trusted for a one-host set-up"
        )
    return HttpServer(build_app(context), settings, settings.http_host or host).start()


# --- OpenAPI -------------------------------------------------------------------------------------


def _text_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }


def _dicom_json_schema() -> dict[str, Any]:
    attribute = {
        "type": "object",
        "properties": {"vr": {"type": "string"}, "Value": {"type": "array"}},
        "required": ["vr"],
    }
    return {
        "type": "object",
        "description": "Store Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM "
        "JSON (PS3.18 F.2): 00081199 Referenced SOP Sequence, 00081198 Failed SOP Sequence.",
        "additionalProperties": attribute,
    }


def _stow_operation(with_study: bool) -> dict[str, Any]:
    store_response = {
        "content": {
            DICOM_JSON: {"schema": _dicom_json_schema()},
            DICOM_XML: {"schema": {"type": "string"}},
        },
        "headers": {
            "Warning": {
                "description": 'One `299 bac-node "reason"` entry per failed or warned instance.',
                "schema": {"type": "string"},
            }
        },
    }
    operation: dict[str, Any] = {
        "summary": "Store instances (STOW-RS)" + (" of one study" if with_study else ""),
        "description": "PS3.18 10.5. Each part is one DICOM Part 10 instance; each is "
        "stored durably, all or nothing, before it is referenced in the answer. "
        "Accept: application/dicom+xml asks for XML.",
        "operationId": "storeStudyInstances" if with_study else "storeInstances",
        "tags": ["DICOMweb"],
        "security": [{"bearer": []}],
        "requestBody": {
            "required": True,
            "content": {
                f'{MULTIPART_RELATED}; type="{APPLICATION_DICOM}"': {
                    "schema": {"type": "string", "format": "binary"}
                }
            },
        },
        "responses": {
            "200": {"description": "Every instance stored.", **store_response},
            "202": {
                "description": "Some instances stored; failures or warnings for others.",
                **store_response,
            },
            "400": _text_response("Malformed multipart body or study UID."),
            "401": _text_response("Missing or wrong bearer token."),
            "409": {"description": "No instance could be stored.", **store_response},
            "413": _text_response("Larger than http_max_request_mb."),
            "415": _text_response('Not multipart/related; type="application/dicom".'),
            "507": _text_response("The request cannot be spooled in the data directory."),
        },
    }
    if with_study:
        operation["parameters"] = [
            {
                "name": "study", "in": "path", "required": True,
                "description": "Study Instance UID; every instance must belong to it.",
                "schema": {"type": "string", "pattern": UID_PATTERN, "maxLength": 64},
            }
        ]  # fmt: skip
    return operation


def _protected(summary: str, media: str, description: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [{"bearer": []}, {"basic": []}],
            "responses": {
                "200": {
                    "description": description,
                    "content": {
                        media: {
                            "schema": {"type": "string"}
                            if media != "application/json"
                            else {"type": "object"}
                        }
                    },
                },
                "401": _text_response("Missing or wrong bearer token."),
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 description of the HTTP interface (served and committed)."""
    from bac_node.node import jobfiles

    readiness = {
        "type": "object",
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["ready", "checks"],
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "bac-node HTTP interface",
            "version": __version__,
            "description": "STOW-RS into the node, health, readiness, Prometheus metrics and "
            "a status page. Research use only. Not for clinical use.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "Any user name; a bearer token as the password (browsers).",
                },
            }
        },
        "paths": {
            "/": {
                "get": {
                    "summary": "Redirect to the status page",
                    "responses": {"307": {"description": "To /status."}},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process answers",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: database reachable, model loaded, disk above "
                    "min_free_mb",
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": {"application/json": {"schema": readiness}},
                        },
                        "503": {
                            "description": "Not ready; checks say why.",
                            "content": {"application/json": {"schema": readiness}},
                        },
                    },
                }
            },
            "/metrics": _protected(
                "Prometheus metrics", "text/plain", "Prometheus text exposition format."
            ),
            "/status": _protected(
                "Status page (HTML): recent studies by UID, queue, failures",
                "text/html",
                "The page.",
            ),
            "/status.json": _protected(
                "The status page's data", "application/json", "Node, counts, studies, failures."
            ),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.0.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/dicomweb/studies": {"post": _stow_operation(False)},
            "/dicomweb/studies/{study}": {"post": _stow_operation(True)},
            **jobfiles.openapi_paths(),
        },
    }


def write_openapi(path: Path) -> None:
    """Write :func:`openapi_document` as the committed ``deploy/openapi.json``."""
    path.write_text(json.dumps(openapi_document(), indent=2) + "\n", encoding="utf-8")
