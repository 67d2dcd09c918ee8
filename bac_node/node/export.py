"""The exporter: sends each result's SEGs and SR to its destination by C-STORE.

Decisions a next engineer needs:

- **One association per export** (one result to one destination), proposing, for the
  SOP class of each file, Explicit VR Little Endian (how the files are stored) and
  Implicit VR Little Endian. pynetdicom sends a file as stored when the peer accepts
  its transfer syntax and converts between the two uncompressed syntaxes otherwise.
- **All or nothing.** An export succeeds only when every file got Success (0x0000) or
  a Warning (0xBxxx). Any failure status, a refused or aborted association, a
  connection error or a timeout fails the attempt with one line naming the
  destination and the SOP Instance UID (never patient data); the queue retries it with
  capped exponential backoff and dead-letters it after ``export_attempts``
  (``bac-node retry`` sends dead ones again). Sending all files again after a partial
  failure is safe: SEG/SR UIDs are deterministic, so the destination gets the same
  instances again, not a second result set.
- **DICOMweb destinations** (a ``destinations`` entry that is an ``http(s)://`` base
  URL, e.g. Orthanc's ``http://pacs:8042/dicom-web``) get the same files in one
  STOW-RS request (dicomweb-client, ``network_timeout`` per request, its own retries
  off) through the same queue, retries and dead letter. All or nothing there too:
  an HTTP error, a Failed SOP Sequence item, or a sent SOP Instance UID missing from
  a Referenced SOP Sequence fails the attempt. Proxies come from the environment
  (``https_proxy``/``no_proxy``), as for any requests-based client.
- **No destinations, no exports.** The worker creates no Export rows then; results
  stay on disk under ``data_dir/results`` and :func:`warn_if_no_destinations` says
  so once at start.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from bac_node.config import Destination, Settings, is_dicomweb_destination, parse_destination
from bac_node.node.db import Database, utcnow
from bac_node.node.queue import (
    RESULTS_DIR,
    ClaimedExport,
    claim_exports,
    default_owner,
    export_failed,
    export_succeeded,
)

log = logging.getLogger(__name__)

#: Exports claimed per :meth:`Exporter.run_once` (one at a time, so no lease waits).
EXPORTS_PER_RUN = 8


class ExportError(Exception):
    """One attempt of an export failed; the message is the one-line reason."""


def warn_if_no_destinations(settings: Settings, logger: logging.Logger = log) -> bool:
    """Log once, at start, that results are not sent anywhere; True when so."""
    if settings.destinations:
        return False
    logger.warning(
        "no destinations configured: results are kept on disk at %s and sent nowhere; "
        "set `destinations` (AE@host:port) to send them back by C-STORE",
        settings.data_dir / RESULTS_DIR,
    )
    return True


class Exporter:
    """Sends due exports; safe to run in several processes (exports are leased)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        owner: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.db = db
        self.owner = owner or default_owner("exporter")
        self.rng = rng or random.Random()
        self.clock = clock

    def run_once(self, limit: int = EXPORTS_PER_RUN) -> int:
        """Send up to ``limit`` due exports; how many were attempted."""
        attempted = 0
        while attempted < limit:
            claimed = claim_exports(
                self.db, self.owner, self._lease_seconds(), 1,
                data_dir=self.settings.data_dir, now=self.clock(),
            )  # fmt: skip
            if not claimed:
                break
            self.export(claimed[0])
            attempted += 1
        return attempted

    def _lease_seconds(self) -> float:
        # A send may legitimately take a few network timeouts (connect, each C-STORE).
        return max(float(self.settings.lease_seconds), 4.0 * self.settings.network_timeout)

    def export(self, export: ClaimedExport) -> bool:
        """Send one claimed export and record the outcome; True when delivered."""
        try:
            if is_dicomweb_destination(export.destination):
                self.send_dicomweb(export.files, export.destination)
            else:
                self.send(export.files, parse_destination(export.destination))
        except ExportError as exc:
            self._failed(export, str(exc))
            return False
        except Exception as exc:  # a bug or an unreadable file: recorded, never fatal
            log.exception("export %d of study %s crashed", export.export_id, export.study_uid)
            self._failed(export, f"{export.destination}: {type(exc).__name__}: {exc}")
            return False
        export_succeeded(self.db, export.export_id, owner=self.owner, now=self.clock())
        log.info(
            "export %d: study %s sent to %s (%d file(s))",
            export.export_id, export.study_uid, export.destination, len(export.files),
        )  # fmt: skip
        return True

    def _failed(self, export: ClaimedExport, error: str) -> None:
        state = export_failed(
            self.db, export.export_id, error,
            max_attempts=self.settings.export_attempts,
            backoff=self.settings.export_backoff, cap=self.settings.export_backoff_cap,
            rng=self.rng, owner=self.owner, now=self.clock(),
        )  # fmt: skip
        attempt = export.attempts + 1
        if state == "dead":
            log.error(
                "export %d: study %s to %s dead-lettered after %d attempt(s): %s; "
                "`bac-node retry` sends it again",
                export.export_id, export.study_uid, export.destination, attempt, error,
            )  # fmt: skip
        else:
            log.warning(
                "export %d: study %s attempt %d failed: %s",
                export.export_id, export.study_uid, attempt, error,
            )  # fmt: skip

    def send(self, files: tuple[Path, ...], destination: Destination) -> None:
        """C-STORE ``files`` in order over one association; ExportError unless every
        file got Success or a Warning."""
        peer = str(destination)
        metas = []
        for path in files:
            try:
                meta = read_file_meta_info(path)
            except (OSError, ValueError) as exc:
                raise ExportError(f"{peer}: cannot read result file {path.name} ({exc})") from None
            metas.append((path, str(meta.MediaStorageSOPClassUID), meta.MediaStorageSOPInstanceUID))
        ae = AE(ae_title=self.settings.ae_title)
        timeout = float(self.settings.network_timeout)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        for sop_class in dict.fromkeys(sop_class for _, sop_class, _ in metas):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        connected = threading.Event()
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title,
            max_pdu=self.settings.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.set())],
        )  # fmt: skip
        if not assoc.is_established:
            # pynetdicom reports a failed TCP connect as an abort; the event tells them apart.
            if not connected.is_set():
                raise ExportError(f"{peer}: cannot connect (refused, unreachable or timed out)")
            if assoc.is_rejected:
                raise ExportError(f"{peer}: association rejected")
            raise ExportError(f"{peer}: association aborted")
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for path, sop_class, sop_uid in metas:
                if sop_class not in accepted:
                    raise ExportError(
                        f"{peer}: SOP class {sop_class} not accepted for SOP {sop_uid}"
                    )
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                if code is None:
                    raise ExportError(f"{peer}: no response for SOP {sop_uid} (timeout or abort)")
                if code != 0x0000 and code & 0xF000 != 0xB000:
                    raise ExportError(f"{peer}: status 0x{code:04X} for SOP {sop_uid}")
                if code != 0x0000:
                    log.info("%s: warning status 0x%04X for SOP %s", peer, code, sop_uid)
        finally:
            if assoc.is_established:
                assoc.release()

    def send_dicomweb(self, files: tuple[Path, ...], url: str) -> None:
        """STOW-RS ``files`` to the DICOMweb base ``url`` in one request; ExportError
        unless every file is referenced as stored and none failed."""
        import requests
        from dicomweb_client.api import DICOMwebClient
        from pydicom import dcmread

        datasets = []
        for path in files:
            try:
                datasets.append(dcmread(path))
            except (OSError, ValueError) as exc:
                raise ExportError(f"{url}: cannot read result file {path.name} ({exc})") from None
        sent = [str(ds.SOPInstanceUID) for ds in datasets]
        client = DICOMwebClient(url=url, timeout=float(self.settings.network_timeout))
        client.set_http_retry_params(retry=False)  # the export queue retries, with backoff
        try:
            answer = client.store_instances(datasets)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise ExportError(f"{url}: STOW-RS answered HTTP {code}") from None
        except requests.RequestException as exc:
            raise ExportError(f"{url}: cannot connect ({type(exc).__name__})") from None
        failed = [
            f"{i.get('ReferencedSOPInstanceUID', '?')} (0x{int(i.get('FailureReason', 0)):04X})"
            for i in answer.get("FailedSOPSequence", [])
        ]
        if failed:
            raise ExportError(f"{url}: STOW-RS failed for SOP {', '.join(failed[:3])}")
        if "ReferencedSOPSequence" in answer:
            stored = {
                str(i.get("ReferencedSOPInstanceUID", "")) for i in answer.ReferencedSOPSequence
            }
            missing = [uid for uid in sent if uid not in stored]
            if missing:
                raise ExportError(f"{url}: STOW-RS did not reference SOP {missing[0]}")
