"""The node's database: studies, instances, jobs, results and exports.

The database is the queue (DESIGN.md). SQLite in WAL mode with ``synchronous=FULL``
and a busy timeout is the embedded default: one file, ``<data_dir>/bac-node.sqlite``.
Every process (``serve``, ``worker``, ``status``) opens it with :func:`open_database`,
which migrates the schema to the newest Alembic revision on first use (a new database
gets every migration: ``bac_node/node/migrations``) and refuses a database written by a
newer bac-node with a message that says what to do. The ``database`` setting chooses
another database: ``postgresql+psycopg://…`` for workers on several hosts.

States
------
- Job: ``pending`` → ``running`` (claimed: ``lease_owner`` + ``lease_expires``) →
  ``done`` | back to ``pending`` (lease expired or a retryable failure) | ``failed``
  (the study cannot be analysed, or ``attempts`` reached ``MAX_JOB_ATTEMPTS``) |
  ``superseded`` (the study's images changed before it ran; a newer job follows).
- Export: ``pending`` (``next_try``) → ``sending`` → ``done`` | back to ``pending``
  with a later ``next_try`` | ``dead`` (dead-lettered after the configured attempts).

Times are naive UTC (:func:`utcnow`), stored as SQLite text by SQLAlchemy.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from bac_node.errors import BacNodeError

log = logging.getLogger(__name__)

#: The ``meta`` row ``schema_version`` that bac-node from before migrations checks; each
#: migration that changes a table sets it (the Alembic revision is the real version).
SCHEMA_VERSION = 1
DATABASE_FILE = "bac-node.sqlite"
#: Busy timeout of SQLite connections (ms): writers wait this long for the lock.
BUSY_TIMEOUT_MS = 30_000
#: A job whose analysis failed this many times (crashes included) is ``failed``.
MAX_JOB_ATTEMPTS = 3

UID = String(64)


def utcnow() -> dt.datetime:
    """Now, naive UTC (what every timestamp column holds)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class DatabaseError(BacNodeError):
    """The node's database cannot be opened or has the wrong schema."""


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself (``schema_version``)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    first_received: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    #: Instances stored for this study (duplicates not counted).
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Set when a job was made for the instances received so far; cleared by a new one.
    queued: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    #: Received images deleted by the retention purge (results are kept).
    purged: Mapped[bool] = mapped_column(Boolean, default=False)
    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    #: Path of the stored Part 10 file, relative to the data directory.
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    #: "dimse" (C-STORE) or "dicomweb" (STOW-RS)
    protocol: Mapped[str] = mapped_column(String(8), default="dimse")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: MG image the worker analyses; SEG/SR/SC are stored but not analysed.
    analysable: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Laterality + view when known at ingest ("L-CC"), for the 4-view completeness rule.
    view: Mapped[str] = mapped_column(String(16), default="")
    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    #: sha256 of the sorted (SOP Instance UID, file sha256) pairs the job analyses: the
    #: same inputs are never analysed (nor answered) twice (queue.inputs_key).
    inputs_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    study: Mapped[Study] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(back_populates="job")
    __table_args__ = (UniqueConstraint("study_id", "inputs_key"),)


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    #: Folder of sr.dcm, seg-*.dcm and summary.json, relative to the data directory.
    path: Mapped[str] = mapped_column(Text)
    #: Relative paths of the DICOM files to export (SEGs then the SR).
    files: Mapped[list[str]] = mapped_column(JSON)
    sr_uid: Mapped[str] = mapped_column(UID)
    grade: Mapped[int | None] = mapped_column(Integer, default=None)
    cardiovascular_flag: Mapped[bool] = mapped_column(Boolean, default=False)
    area_percent: Mapped[float | None] = mapped_column(Float, default=None)
    model_version: Mapped[str] = mapped_column(String(64), default="")
    analysis_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    job: Mapped[Job] = relationship(back_populates="result")
    exports: Mapped[list[Export]] = relationship(back_populates="result")


class Export(Base):
    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    #: ``AE@host:port`` as configured (the destination's identity).
    destination: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    result: Mapped[Result] = relationship(back_populates="exports")
    __table_args__ = (UniqueConstraint("result_id", "destination"),)


class Database:
    """The node's engines and sessions.

    ``with db.session() as s:`` is a write transaction, committed on success and rolled
    back on an exception. On SQLite it begins with ``BEGIN IMMEDIATE``: the write lock
    is taken first, so a read-then-update (claiming a job) is atomic between processes,
    the SQLite equivalent of ``SELECT … FOR UPDATE``. ``db.read()`` is a plain
    transaction for status queries; in WAL mode it never waits for writers.
    """

    def __init__(self, engine: Engine, read_engine: Engine | None = None) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._reads = sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reads() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def _sqlite_engine(url: str, begin: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; SQLAlchemy issues it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def database_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / DATABASE_FILE).resolve()}"


def open_database(url_or_data_dir: str | Path) -> Database:
    """Open the node's database and migrate its schema to the newest revision.

    ``url_or_data_dir``: a data directory (its ``bac-node.sqlite``) or a database URL
    (the ``database`` setting: ``settings.database or settings.data_dir``).
    """
    url = (
        database_url(Path(url_or_data_dir))
        if isinstance(url_or_data_dir, Path)
        else url_or_data_dir
    )
    if url.startswith("sqlite:///"):
        # 0700: the data directory holds patient data (bac_node.node.service)
        Path(url.removeprefix("sqlite:///")).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = Database(_sqlite_engine(url, "BEGIN IMMEDIATE"), _sqlite_engine(url, "BEGIN"))
    else:
        db = Database(create_engine(url, pool_pre_ping=True))
    try:
        from bac_node.node.migrations import upgrade

        # One transaction (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL):
        # processes that open a new database together migrate it once.
        with db.engine.begin() as connection:
            before, after = upgrade(connection, _safe_url(url))
        if before != after:
            log.info("%s: schema migrated from %s to %s", _safe_url(url), before or "none", after)
    except DatabaseError:
        db.dispose()
        raise
    except Exception as exc:  # any driver error becomes one clear line
        db.dispose()
        raise DatabaseError(f"{_safe_url(url)}: cannot open the database ({exc})") from None
    return db


def _safe_url(url: str) -> str:
    """The URL without a password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}@{tail}"


def study_by_uid(session: Session, study_uid: str) -> Study | None:
    return session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
