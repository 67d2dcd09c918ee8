"""A real PostgreSQL server for tests: Debian's binaries, a throw-away cluster, one port.

Import it by name like the other shared test modules (pytest puts ``tests/`` on
``sys.path``)::

    from pg import PostgresServer

    with PostgresServer() as server:           # initdb + start, 127.0.0.1, a free port
        url = server.create_database("queue")  # postgresql+psycopg://bac:…@127.0.0.1:PORT/queue
        db = open_database(url)

    # another address (a veth in a network namespace) and loopback both:
    PostgresServer(host="10.77.0.1", listen=("10.77.0.1", "127.0.0.1"))

Fixtures (bind them in a conftest or test module, like ``peers``' fixtures):
``postgres_server`` (session scope: one cluster for the whole run, about 2-4 s to make)
and ``postgres_url`` (function scope: a fresh database, cloned from a template that is
already migrated to the newest schema, so a test pays about 0.1 s, not a migration).

Decisions a next engineer needs:

- **Binaries.** ``initdb``/``pg_ctl``/``postgres`` from ``$PATH`` or Debian's
  ``/usr/lib/postgresql/<version>/bin`` (the newest). Missing: the test skips locally and
  fails in CI (``CI=true``), like ``peers.require_tool`` (Debian package ``postgresql``).
- **Root.** CI runs as root and ``initdb`` refuses root: the cluster's folder is made
  with :func:`tempfile.mkdtemp` (pytest's ``tmp_path`` lies under a 0700 folder the
  ``postgres`` user cannot enter), chowned to ``postgres``, and every server command runs
  through ``runuser -u postgres --``. As another user, they run as that user.
- **Access.** The superuser is ``bac`` with password :data:`PASSWORD` (scram-sha-256 on
  every TCP address, so a test's URL carries a password, as production's do); the Unix
  socket is in the cluster's folder (trust), never in /var/run/postgresql. ``fsync``,
  ``synchronous_commit`` and ``full_page_writes`` are off: a test never survives a power
  cut, and a commit then costs no disk flush on this shared machine.
- **Ports** come from ``peers.free_port``; a port taken in between makes ``pg_ctl`` fail
  and the server starts again on a fresh one.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest
from peers import LOOPBACK, PeerError, free_port, missing

USER = "bac"
PASSWORD = "bac-test-password"
#: The database every fresh test database is cloned from (migrated once per session).
TEMPLATE = "bac_template"
_names = itertools.count(1)


def postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``; skip (locally) or fail (CI) without one."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = [Path(p).parent.parent.name for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    debian = [
        f"/usr/lib/postgresql/{v}/bin/pg_ctl"
        for v in sorted(versions, key=lambda v: int(v) if v.isdigit() else 0)
    ]
    if debian:
        return Path(debian[-1]).parent
    missing("postgresql")


class PostgresServer:
    """A PostgreSQL cluster of its own, started by :meth:`start`, removed by :meth:`stop`.

    ``host`` is the address URLs name; ``listen`` the addresses the server listens on
    (default: ``host`` only).
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        *,
        listen: Sequence[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.host = host
        self.listen = tuple(listen) if listen else (host,)
        self.port = port or free_port(LOOPBACK if host == LOOPBACK else "")
        self._fixed_port = port is not None
        self.bindir = postgres_bindir()
        self.directory: Path | None = None
        self._as_postgres = os.geteuid() == 0

    # --- life cycle ---------------------------------------------------------------------

    @property
    def data(self) -> Path:
        assert self.directory is not None, "start() first"
        return self.directory / "data"

    @property
    def log(self) -> Path:
        assert self.directory is not None, "start() first"
        return self.directory / "postgres.log"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False,
            cwd=self.directory,
        )  # fmt: skip

    def start(self) -> PostgresServer:
        self.directory = Path(tempfile.mkdtemp(prefix="bac-node-pg-"))
        pwfile = self.directory / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            for path in (self.directory, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        made = self._run(
            "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        if made.returncode:
            raise PeerError(f"initdb failed ({made.returncode}): {made.stderr.strip()[-2000:]}")
        with (self.data / "pg_hba.conf").open("a") as hba:
            # Any address (a veth in another network namespace), always with a password.
            hba.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
        for attempt in range(5):
            options = (
                f"-c listen_addresses='{','.join(self.listen)}' -p {self.port} "
                f"-k {self.directory} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            started = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                "-w", "-t", "90", "start",
            )  # fmt: skip
            if started.returncode == 0:
                return self
            in_use = "already in use" in self.log.read_text(errors="replace")
            if self._fixed_port or not in_use or attempt == 4:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise PeerError(
                    f"PostgreSQL did not start ({started.stdout.strip()} "
                    f"{started.stderr.strip()})\n--- {self.log} ---\n{tail}"
                )
            self.port = free_port(LOOPBACK if self.host == LOOPBACK else "")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its cluster."""
        if self.directory is None:
            return
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- databases ----------------------------------------------------------------------

    def url(self, database: str = "postgres", *, host: str | None = None) -> str:
        """SQLAlchemy URL of ``database`` (psycopg 3), password included."""
        return f"postgresql+psycopg://{USER}:{PASSWORD}@{host or self.host}:{self.port}/{database}"

    def execute(self, *statements: str) -> None:
        """Run statements in autocommit mode (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=USER, password=PASSWORD, dbname="postgres",
            autocommit=True, connect_timeout=20,
        ) as connection:  # fmt: skip
            for statement in statements:
                connection.execute(statement)

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """A new empty database (or a copy of ``template``); its URL."""
        name = name or f"test_{os.getpid()}_{next(_names)}"
        clause = f" TEMPLATE {template}" if template else ""
        for attempt in itertools.count():
            try:
                self.execute(f'CREATE DATABASE "{name}"{clause}')
                break
            except Exception as exc:  # the template may still have a closing session
                if "being accessed by other users" not in str(exc) or attempt > 50:
                    raise
                time.sleep(0.1)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, with :data:`TEMPLATE` migrated to the head."""
    from bac_node.node.db import open_database

    server = PostgresServer().start()
    try:
        template = server.create_database(TEMPLATE)
        open_database(template).dispose()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database with the node's schema, on the session's server; dropped after."""
    url = postgres_server.create_database(template=TEMPLATE)
    yield url
    with contextlib.suppress(Exception):
        postgres_server.drop_database(url.rsplit("/", 1)[1])


#: ``params`` of a fixture that runs a test on both backends; PostgreSQL's are marked.
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """What ``open_database`` takes, once per backend: ``tmp_path`` (its SQLite file), then
    a fresh PostgreSQL database's URL. ``request.param`` says which."""
    if request.param == "sqlite":
        return tmp_path
    return str(request.getfixturevalue("postgres_url"))
