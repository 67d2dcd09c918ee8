"""The durable instance store: a received dataset becomes a fsynced file and a committed row.

:meth:`InstanceStore.store` is what the C-STORE SCP (:mod:`bac_node.node.scp`) and the
STOW-RS endpoint call for each instance; it takes a pydicom ``Dataset`` and its transfer
syntax, never a protocol event, and answers a :class:`StoreOutcome` carrying the DIMSE
status to send back. It never raises for bad input, a full disk or a database error.

Decisions a next engineer needs:

- **Success means durable.** The file is written to a unique temporary name in its
  final directory, flushed and ``fsync``-ed, renamed over its final name, and the
  directory is ``fsync``-ed; only then are the Study and Instance rows committed, and
  only after the commit is Success (0x0000) returned. A failed commit puts the file
  system back as it was (a new file is removed, a replaced one restored), so an
  answered Success always has its file and its row, and a failure leaves nothing.
- **Statuses** (PS3.4 B.2.3): 0xA700 out of resources (less than ``min_free_mb`` free
  before writing, any ``OSError`` while writing, a database that cannot commit);
  0xA900 data set does not match SOP class (a SOP Class UID other than the one
  negotiated, a missing or malformed SOP/Study/Series Instance UID or SOP Class UID, a
  SOP instance already stored under another study); 0xC000 cannot understand (a data
  set pydicom cannot parse or write, a truncated one, an MG image the reader rejects);
  0x0122 SOP class not supported (only reachable through STOW-RS: the SCP negotiates
  the same classes as :data:`STORABLE_SOP_CLASSES`).
- **SEG, SR and Secondary Capture are stored but not analysed**, and answered with the
  warning 0xB000 "stored; not analysed: bac-node analyses MG images only" (so are DX
  and CR images whose Modality is not MG). A PACS that forwards whole studies, our own
  results included, must not see failures (it would retry them forever and raise
  alarms), but its log should say why nothing came back for those instances. MG
  images (and DX/CR with Modality MG) are validated with
  :func:`bac_node.dicom.reader.read_instance` without decoding the pixels: a header
  the reader rejects is 0xC000 at once, rather than a failed analysis later.
- **Duplicates** (a SOP Instance UID already stored): ``keep-first`` answers as the
  first store did, with ``duplicate=True``, and writes nothing (the study is not
  re-queued: nothing changed); ``replace`` replaces the file atomically, updates the
  row and re-queues the study. Either way a SOP instance that arrives under another
  Study Instance UID is refused (0xA900): a UID is never filed under two studies.
- **File names** are ``instances/<h[:2]>/<h>.dcm`` with ``h`` the sha256 of
  ``study|series|sop`` UIDs: a UID never becomes a path (no separators, no case or
  length surprises), and 256 folders keep directories small. Temporary files are
  ``.<h>.<random>.tmp`` beside them (never ``*.dcm``).
- **Concurrency**: the SCP runs one thread per association, and STOW-RS requests run
  beside it. Stores of the same file name serialise on an in-process lock; the final
  existence check, the rename and the insert run inside one database write transaction
  (``BEGIN IMMEDIATE`` on SQLite, so they are atomic between processes too). On
  PostgreSQL two processes may still race to insert the same SOP instance: the unique
  constraint refuses one, its file change is undone (unless the winner's file already
  took the name, which then stays), and it is answered as a duplicate; under
  ``replace`` it may get 0xA700 instead, and the sender's retry replaces the file.
- Files are Part 10 with a preamble and file meta information: Media Storage SOP
  Class/Instance UID, the transfer syntax the data set arrived in, the calling AE as
  Source Application Entity Title, and bac-node's Implementation Class UID (a
  ``2.25.`` UID derived by :func:`bac_node.dicom.uids.derived_uid`, stable across
  versions) and Implementation Version Name. The store sets ``ds.file_meta`` on the
  dataset it is given.
- Logs (``bac_node.node.store``) name instances and studies by UID, never by patient.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from bac_node import __version__
from bac_node.config import Settings
from bac_node.dicom.reader import (
    ACCEPTED_SOP_CLASSES,
    COMPUTED_RADIOGRAPHY,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    read_instance,
)
from bac_node.dicom.uids import derived_uid
from bac_node.errors import InvalidInstanceError
from bac_node.node.db import Database, Instance, Study, study_by_uid, utcnow

log = logging.getLogger(__name__)

# --- statuses (PS3.4 Annex B, Table B.2-1; PS3.7 Annex C) -------------------------------

SUCCESS = 0x0000
#: Warning "Coercion of data elements" is 0xB000 in PS3.4; it is the Storage warning
#: every SCU logs and none retries, which is what a stored-but-not-analysed answer needs.
WARNING_NOT_ANALYSED = 0xB000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122

NOT_ANALYSED_COMMENT = "stored; not analysed: bac-node analyses MG images only"
#: (0000,0902) Error Comment is LO: at most 64 characters.
ERROR_COMMENT_MAX = 64

# --- SOP classes -------------------------------------------------------------------------

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: Stored but never analysed (see the module docstring).
NOT_ANALYSED_SOP_CLASSES: tuple[str, ...] = (
    SEGMENTATION,
    BASIC_TEXT_SR,
    ENHANCED_SR,
    COMPREHENSIVE_SR,
    SECONDARY_CAPTURE,
)
#: Every SOP class the store accepts; the SCP negotiates exactly these (plus Verification).
STORABLE_SOP_CLASSES: tuple[str, ...] = (*ACCEPTED_SOP_CLASSES, *NOT_ANALYSED_SOP_CLASSES)
#: Classes the reader accepts only when Modality is MG (else stored, not analysed).
_MG_ONLY_BY_MODALITY = frozenset({DX_FOR_PRESENTATION, DX_FOR_PROCESSING, COMPUTED_RADIOGRAPHY})

#: (0002,0012) of the files bac-node writes: one UID for the implementation, any version.
IMPLEMENTATION_CLASS_UID = derived_uid("bac-node", "ImplementationClassUID")
#: (0002,0013) is SH: at most 16 characters.
IMPLEMENTATION_VERSION_NAME = f"BAC_NODE_{__version__}"[:16]

_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: In-process locks, chosen by SOP Instance UID: stores of one instance never interleave.
_LOCK_STRIPES = 64


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one instance, and the DIMSE status that says so."""

    status: int
    """DIMSE status: 0x0000, 0xB000 or a failure (0xA700, 0xA900, 0xC000, 0x0122)."""
    stored: bool
    """The instance is on disk and in the database (now or from before, for a duplicate)."""
    duplicate: bool
    analysable: bool
    sop_instance_uid: str
    study_uid: str
    comment: str
    """One line for logs and STOW-RS answers: names the SOP Instance UID, never the patient."""

    @property
    def failed(self) -> bool:
        return self.status not in (SUCCESS, WARNING_NOT_ANALYSED)

    @property
    def error_comment(self) -> str:
        """The comment as (0000,0902) Error Comment: at most 64 characters.

        The SOP Instance UID is left out (the C-STORE response names it already, and a
        UID alone can fill the 64 characters); what remains is cut with "...".
        """
        text = self.comment
        prefix = f"SOP Instance UID {self.sop_instance_uid}: "
        if self.sop_instance_uid and text.startswith(prefix):
            text = text[len(prefix) :]
        return text if len(text) <= ERROR_COMMENT_MAX else text[: ERROR_COMMENT_MAX - 3] + "..."


@dataclass(frozen=True)
class _Identity:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str


class InstanceStore:
    """Stores received instances durably under ``settings.data_dir`` (thread-safe)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    @property
    def instances_dir(self) -> Path:
        return self.settings.data_dir / "instances"

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance is stored, relative to the data directory."""
        digest = hashlib.sha256(f"{study_uid}|{series_uid}|{sop_uid}".encode()).hexdigest()
        return Path("instances") / digest[:2] / f"{digest}.dcm"

    def store(
        self,
        ds: Dataset,
        *,
        transfer_syntax_uid: str,
        calling_ae: str,
        protocol: str = "dimse",
        expected_sop_class: str | None = None,
    ) -> StoreOutcome:
        """Validate ``ds`` and store it durably; the outcome's status is the answer.

        ``transfer_syntax_uid`` is the syntax the data set is encoded in (the
        presentation context's, or the STOW-RS part's); the file is written in it.
        ``expected_sop_class`` is the negotiated abstract syntax, when there is one.
        """
        checked = self._validate(ds, transfer_syntax_uid, expected_sop_class, calling_ae)
        if isinstance(checked, StoreOutcome):
            return _logged(checked)
        identity, analysable, view = checked
        relative = self.relative_path(identity.study_uid, identity.series_uid, identity.sop_uid)
        with self._lock(identity.sop_uid):
            outcome = self._store_locked(
                ds, identity, analysable, view, relative,
                transfer_syntax_uid=str(transfer_syntax_uid).strip(),
                calling_ae=calling_ae.strip()[:16], protocol=protocol,
            )  # fmt: skip
        return _logged(outcome)

    # --- validation ----------------------------------------------------------------------

    def _validate(
        self,
        ds: Dataset,
        transfer_syntax_uid: str,
        expected_sop_class: str | None,
        calling_ae: str,
    ) -> StoreOutcome | tuple[_Identity, bool, str]:
        try:
            # Inside the try: looking at the last element converts it, and an unknown VR
            # there raised NotImplementedError out of store() (an HTTP 500 on STOW-RS),
            # found by tests/reliability/fuzz/fuzz_read.py.
            truncated = _truncated_element(ds)
            if truncated:
                uid = _safe_text(ds, "SOPInstanceUID")
                return _failure(
                    CANNOT_UNDERSTAND, uid, "", f"the data set is truncated ({truncated})"
                )
            for _ in ds.iterall():  # pydicom parses values lazily: surface errors now
                pass
        except Exception as exc:
            uid = _safe_text(ds, "SOPInstanceUID")
            return _failure(
                CANNOT_UNDERSTAND, uid, "", f"the data set cannot be parsed ({type(exc).__name__})"
            )

        sop_uid = _text(ds, "SOPInstanceUID")
        if not _is_uid(sop_uid):
            what = "missing" if not sop_uid else "not a valid UID"
            return _failure(
                DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "", "",
                f"a data set whose SOP Instance UID (0008,0018) is {what}",
            )  # fmt: skip
        identity = _Identity(
            sop_uid=sop_uid,
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            sop_class=_text(ds, "SOPClassUID"),
        )
        for keyword, tag, value in (
            ("StudyInstanceUID", "(0020,000D)", identity.study_uid),
            ("SeriesInstanceUID", "(0020,000E)", identity.series_uid),
            ("SOPClassUID", "(0008,0016)", identity.sop_class),
        ):
            if not _is_uid(value):
                what = "is missing" if not value else "is not a valid UID"
                return _failure(
                    DATA_SET_DOES_NOT_MATCH_SOP_CLASS, sop_uid, "", f"{keyword} {tag} {what}"
                )
        study_uid = identity.study_uid
        if expected_sop_class is not None and identity.sop_class != str(expected_sop_class).strip():
            return _failure(
                DATA_SET_DOES_NOT_MATCH_SOP_CLASS, sop_uid, study_uid,
                f"data set does not match SOP class: SOP Class UID {identity.sop_class}, "
                f"negotiated {str(expected_sop_class).strip()}",
            )  # fmt: skip
        if identity.sop_class not in STORABLE_SOP_CLASSES:
            return _failure(
                SOP_CLASS_NOT_SUPPORTED, sop_uid, study_uid,
                f"SOP class {_uid_name(identity.sop_class)} is not stored by bac-node",
            )  # fmt: skip
        syntax = UID(str(transfer_syntax_uid).strip())
        if not syntax.is_transfer_syntax:
            return _failure(
                CANNOT_UNDERSTAND, sop_uid, study_uid, f"unknown transfer syntax {syntax}"
            )

        ds.file_meta = _file_meta(identity, syntax, calling_ae)
        modality = _text(ds, "Modality")
        analysed = identity.sop_class in ACCEPTED_SOP_CLASSES and (
            identity.sop_class not in _MG_ONLY_BY_MODALITY or modality == "MG"
        )
        if not analysed:
            return identity, False, ""
        try:
            image = read_instance(ds, decode=False)
        except InvalidInstanceError as exc:
            return _failure(CANNOT_UNDERSTAND, sop_uid, study_uid, exc.reason)
        except Exception as exc:  # the reader wraps its errors; this is a safety net
            return _failure(
                CANNOT_UNDERSTAND, sop_uid, study_uid,
                f"the image cannot be read ({type(exc).__name__})",
            )  # fmt: skip
        return identity, True, image.label if image.is_screening_view else ""

    # --- storing -------------------------------------------------------------------------

    @contextmanager
    def _lock(self, sop_uid: str) -> Iterator[None]:
        stripe = int(hashlib.sha256(sop_uid.encode()).hexdigest()[:8], 16) % _LOCK_STRIPES
        with self._locks[stripe]:
            yield

    def _store_locked(
        self,
        ds: Dataset,
        identity: _Identity,
        analysable: bool,
        view: str,
        relative: Path,
        *,
        transfer_syntax_uid: str,
        calling_ae: str,
        protocol: str,
    ) -> StoreOutcome:
        sop_uid, study_uid = identity.sop_uid, identity.study_uid
        # A cheap look first: a keep-first duplicate is answered without writing anything.
        try:
            with self.db.read() as session:
                known = _known(session, sop_uid)
        except SQLAlchemyError as exc:
            return _failure(OUT_OF_RESOURCES, sop_uid, study_uid, _db_reason(exc))
        if known is not None:
            answer = self._duplicate_answer(identity, known)
            if answer is not None:
                return answer

        final = self.settings.data_dir / relative
        try:
            _make_directories(final.parent, self.settings.data_dir)
            free = shutil.disk_usage(final.parent).free
        except OSError as exc:
            return _failure(OUT_OF_RESOURCES, sop_uid, study_uid, _os_reason("create", exc))
        if free < self.settings.min_free_mb * 1024 * 1024:
            return _failure(
                OUT_OF_RESOURCES, sop_uid, study_uid,
                f"out of resources: less than {self.settings.min_free_mb} MiB free for "
                "received instances",
            )  # fmt: skip

        try:
            temporary = _write_temporary(ds, final)
        except OSError as exc:
            return _failure(OUT_OF_RESOURCES, sop_uid, study_uid, _os_reason("write", exc))
        except Exception as exc:  # pydicom cannot encode the data set as it claims to be
            return _failure(
                CANNOT_UNDERSTAND, sop_uid, study_uid,
                f"the data set cannot be written ({_one_line(exc)})",
            )  # fmt: skip
        try:
            size, sha256 = _digest(temporary)
            record = _Record(
                identity=identity, relative=relative, size=size, sha256=sha256,
                analysable=analysable, view=view, transfer_syntax_uid=transfer_syntax_uid,
                calling_ae=calling_ae, protocol=protocol,
            )  # fmt: skip
            return self._commit(record, temporary, final)
        except OSError as exc:
            return _failure(OUT_OF_RESOURCES, sop_uid, study_uid, _os_reason("store", exc))
        finally:
            with suppress(FileNotFoundError):
                temporary.unlink()

    def _duplicate_answer(self, identity: _Identity, known: _Known) -> StoreOutcome | None:
        """The answer to a SOP instance stored before, or None to store it again."""
        if known.study_uid != identity.study_uid:
            return _failure(
                DATA_SET_DOES_NOT_MATCH_SOP_CLASS, identity.sop_uid, identity.study_uid,
                "already stored; it belongs to another study",
            )  # fmt: skip
        if self.settings.duplicates == "replace":
            return None
        log.info(
            "SOP Instance UID %s of study %s received again: kept the first copy",
            identity.sop_uid, identity.study_uid,
        )  # fmt: skip
        return StoreOutcome(
            status=SUCCESS if known.analysable else WARNING_NOT_ANALYSED,
            stored=True, duplicate=True, analysable=known.analysable,
            sop_instance_uid=identity.sop_uid, study_uid=identity.study_uid,
            comment=(
                f"SOP Instance UID {identity.sop_uid}: already stored, kept the first copy"
                if known.analysable else NOT_ANALYSED_COMMENT
            ),
        )  # fmt: skip

    def _commit(self, record: _Record, temporary: Path, final: Path) -> StoreOutcome:
        try:
            return self._commit_once(record, temporary, final)
        except IntegrityError:
            # Another process inserted this instance or its study between the look and
            # the insert (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises): look again.
            pass
        try:
            return self._commit_once(record, temporary, final)
        except IntegrityError as exc:
            return _failure(
                CANNOT_UNDERSTAND, record.identity.sop_uid, record.identity.study_uid,
                f"the database refused the instance ({_one_line(exc.orig or exc)})",
            )  # fmt: skip

    def _commit_once(self, record: _Record, temporary: Path, final: Path) -> StoreOutcome:
        """One write transaction: look again, place the file, write the rows, commit.

        Any failure puts the file system back as it was; an ``IntegrityError``
        propagates (for :meth:`_commit` to retry), other database errors are 0xA700.
        """
        identity = record.identity
        placement = _Placement(temporary, final)
        obsolete: Path | None = None
        try:
            with self.db.session() as session:
                row = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == identity.sop_uid)
                ).first()
                if row is not None:
                    answer = self._duplicate_answer(identity, _known_of(row))
                    if answer is not None:
                        return answer
                placement.place()
                if row is None:
                    _insert(session, record)
                else:
                    if row.path != record.relative.as_posix():
                        obsolete = self.settings.data_dir / row.path
                    _update(row, record)
        except IntegrityError:
            placement.undo()
            raise
        except SQLAlchemyError as exc:
            placement.undo()
            return _failure(OUT_OF_RESOURCES, identity.sop_uid, identity.study_uid, _db_reason(exc))
        except BaseException:
            placement.undo()
            raise
        placement.finish()
        if obsolete is not None:
            with suppress(OSError):
                obsolete.unlink()
        replaced = row is not None
        log.info(
            "%s SOP Instance UID %s of study %s (%s, %d bytes, %s from %s)%s",
            "replaced" if replaced else "stored", identity.sop_uid, identity.study_uid,
            record.view or "no screening view", record.size, record.protocol,
            record.calling_ae or "-", "" if record.analysable else "; not analysed",
        )  # fmt: skip
        return StoreOutcome(
            status=SUCCESS if record.analysable else WARNING_NOT_ANALYSED,
            stored=True, duplicate=replaced, analysable=record.analysable,
            sop_instance_uid=identity.sop_uid, study_uid=identity.study_uid,
            comment=(
                f"SOP Instance UID {identity.sop_uid}: {'replaced' if replaced else 'stored'}"
                if record.analysable else NOT_ANALYSED_COMMENT
            ),
        )  # fmt: skip


# --- rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Known:
    study_uid: str
    analysable: bool


@dataclass(frozen=True)
class _Record:
    identity: _Identity
    relative: Path
    size: int
    sha256: str
    analysable: bool
    view: str
    transfer_syntax_uid: str
    calling_ae: str
    protocol: str


def _known(session: Session, sop_uid: str) -> _Known | None:
    row = session.execute(
        select(Study.study_uid, Instance.analysable)
        .join(Instance.study)
        .where(Instance.sop_instance_uid == sop_uid)
    ).first()
    return None if row is None else _Known(study_uid=row[0], analysable=bool(row[1]))


def _known_of(row: Instance) -> _Known:
    return _Known(study_uid=row.study.study_uid, analysable=row.analysable)


def _insert(session: Session, record: _Record) -> None:
    now = utcnow()
    identity = record.identity
    study = study_by_uid(session, identity.study_uid)
    if study is None:
        study = Study(
            study_uid=identity.study_uid, first_received=now, last_received=now,
            instance_count=0, queued=False,
        )  # fmt: skip
        session.add(study)
        session.flush()
    # In SQL, not Python: two PostgreSQL transactions storing into one study at once
    # would otherwise both write the count they read (a lost update).
    study.instance_count = Study.instance_count + 1
    study.last_received = now
    study.queued = False
    instance = Instance(
        sop_instance_uid=identity.sop_uid, study_id=study.id,
        series_uid=identity.series_uid, sop_class_uid=identity.sop_class,
        transfer_syntax_uid=record.transfer_syntax_uid, path=record.relative.as_posix(),
        size_bytes=record.size, sha256=record.sha256, protocol=record.protocol,
        calling_ae=record.calling_ae, received_at=now, analysable=record.analysable,
        view=record.view,
    )  # fmt: skip
    session.add(instance)
    session.flush()  # a unique-constraint race surfaces here, inside the try


def _update(row: Instance, record: _Record) -> None:
    now = utcnow()
    row.series_uid = record.identity.series_uid
    row.sop_class_uid = record.identity.sop_class
    row.transfer_syntax_uid = record.transfer_syntax_uid
    row.path = record.relative.as_posix()
    row.size_bytes = record.size
    row.sha256 = record.sha256
    row.protocol = record.protocol
    row.calling_ae = record.calling_ae
    row.received_at = now
    row.analysable = record.analysable
    row.view = record.view
    row.study.last_received = now
    row.study.queued = False  # new pixels: the study is analysed again


# --- files -------------------------------------------------------------------------------


class _Placement:
    """Moving a fsynced temporary file to its final name, undoably.

    An existing final file (a replaced duplicate, or a file orphaned by a crash before
    its commit) is kept under a backup name until :meth:`finish`, so :meth:`undo`
    restores it; the placed file goes back to its temporary name (for a retry; the
    caller removes it). Undo touches the final name only while it still holds this placement's
    file (same inode): another process may have placed and committed its own copy
    since (the PostgreSQL race of the module docstring), and that one must stay.
    """

    def __init__(self, temporary: Path, final: Path) -> None:
        self.temporary, self.final = temporary, final
        self.backup: Path | None = None
        self.placed: tuple[int, int] | None = None  # (device, inode) of the placed file

    def place(self) -> None:
        if self.final.exists():
            self.backup = _unique_name(self.final.parent, self.final.stem, ".prev.tmp")
            try:
                os.link(self.final, self.backup)  # the final name never disappears
            except OSError:
                os.replace(self.final, self.backup)  # a file system without hard links
        placed = self.temporary.stat()
        os.replace(self.temporary, self.final)
        self.placed = (placed.st_dev, placed.st_ino)
        _fsync_directory(self.final.parent)

    def undo(self) -> None:
        if self.placed is None:  # failed before or while renaming
            if self.backup is not None and not self.final.exists():
                os.replace(self.backup, self.final)
            self._drop_backup()
            return
        if self._final_is_ours():
            if self.backup is not None:
                with suppress(OSError):  # keep ours for a retry; the final name stays
                    os.link(self.final, self.temporary)
                os.replace(self.backup, self.final)
                self.backup = None
            else:
                os.replace(self.final, self.temporary)
            _fsync_directory(self.final.parent)
        self._drop_backup()
        self.placed = None

    def finish(self) -> None:
        self._drop_backup()

    def _final_is_ours(self) -> bool:
        try:
            now = self.final.stat()
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == self.placed

    def _drop_backup(self) -> None:
        if self.backup is not None:
            with suppress(FileNotFoundError):
                self.backup.unlink()
            self.backup = None


def _write_temporary(ds: Dataset, final: Path) -> Path:
    """``ds`` as a Part 10 file beside ``final`` under a unique name, fsynced."""
    fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            dcmwrite(file, ds, enforce_file_format=True)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return temporary


def _digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of the bytes as written (read back from the page cache)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _make_directories(directory: Path, root: Path) -> None:
    """Create ``directory`` (under ``root``) and make each new entry durable."""
    missing: list[Path] = []
    current = directory
    while not current.exists() and current != root and current.parent != current:
        missing.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_directory(created.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_name(directory: Path, stem: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=directory)
    os.close(fd)
    os.unlink(name)  # only the name is wanted: os.link will not overwrite
    return Path(name)


def _file_meta(identity: _Identity, syntax: UID, calling_ae: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(identity.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(identity.sop_uid)
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    source = calling_ae.strip()
    if 0 < len(source) <= 16 and "\\" not in source:
        meta.SourceApplicationEntityTitle = source
    return meta


# --- helpers -----------------------------------------------------------------------------


def _failure(status: int, sop_uid: str, study_uid: str, reason: str) -> StoreOutcome:
    comment = f"SOP Instance UID {sop_uid}: {reason}" if sop_uid else reason
    return StoreOutcome(
        status=status, stored=False, duplicate=False, analysable=False,
        sop_instance_uid=sop_uid, study_uid=study_uid, comment=comment,
    )  # fmt: skip


def _logged(outcome: StoreOutcome) -> StoreOutcome:
    """``outcome``, with a WARNING line when it is a failure (successes log where made)."""
    if outcome.failed:
        log.warning("not stored (status 0x%04X): %s", outcome.status, outcome.comment)
    return outcome


def _truncated_element(ds: Dataset) -> str:
    """The last element when its value is shorter than its declared length, else ""."""
    if not ds:
        return ""
    tag = list(ds.keys())[-1]
    raw = ds.get_item(tag)
    if (
        isinstance(raw, RawDataElement)
        and raw.length != _UNDEFINED_LENGTH
        and isinstance(raw.value, bytes)
        and len(raw.value) < raw.length
    ):
        return f"{tag} has {len(raw.value)} of its {raw.length} bytes"
    return ""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().rstrip("\0").strip()


def _safe_text(ds: Dataset, keyword: str) -> str:
    try:
        value = _text(ds, keyword)
    except Exception:
        return ""
    return value if _is_uid(value) else ""


def _is_uid(value: str) -> bool:
    # Lenient on purpose: leading zeros in components are tolerated (old devices send them).
    return 0 < len(value) <= 64 and _UID_PATTERN.fullmatch(value) is not None


def _uid_name(uid: str) -> str:
    known = UID(uid).name
    return f"{known} ({uid})" if known != uid else uid


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _os_reason(what: str, exc: OSError) -> str:
    # pydicom re-raises a write's OSError as OSError("With tag ... got exception: ...")
    # without errno: the reason ("No space left on device") is its cause's.
    cause: BaseException | None = exc
    while cause is not None and not getattr(cause, "strerror", None):
        cause = cause.__cause__
    reason = getattr(cause, "strerror", None) or type(exc).__name__
    return f"out of resources: cannot {what} the file ({reason})"


def _db_reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return f"out of resources: the database cannot commit ({_one_line(orig or exc)})"
