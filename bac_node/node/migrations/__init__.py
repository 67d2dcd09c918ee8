"""Schema migrations of the node's database (Alembic), the same for SQLite and PostgreSQL.

:func:`bac_node.node.db.open_database` calls :func:`upgrade` every time a process opens
the database: a new database gets every migration, an up-to-date one costs a read. There
is no ``alembic.ini``: the scripts live in this package (``versions/``) and run on the
caller's connection, inside its transaction (``env.py``).

Decisions a next engineer needs:

- **One migrator at a time.** Several processes may open a new database at once (a
  node and its workers starting together). On PostgreSQL :func:`upgrade` first takes a
  transaction-scoped advisory lock (:data:`LOCK_KEY`); on SQLite the caller's
  ``BEGIN IMMEDIATE`` holds the write lock. Both backends have transactional DDL, so a
  migration that fails leaves the database as it was.
- **Databases from before migrations.** ``create_all`` made the tables of revision
  0001 and a ``meta`` row ``schema_version = 1``: such a database (no
  ``alembic_version`` table) is stamped ``0001``, its rows kept. Another
  ``schema_version`` is refused.
- **Newer databases are refused**, with the revision in the message: a worker of an
  older bac-node must not write into a schema it does not know. Every host sharing a
  database runs the same bac-node version; upgrade them together.
- **The next migration**: add ``versions/0002_<what>.py`` (``revision = "0002"``,
  ``down_revision = "0001"``; ``script.py.mako`` is the template), use batch operations
  (``with op.batch_alter_table(...)``) so SQLite can follow, set the ``meta`` row
  ``schema_version`` to the new number (bac-node from before migrations checks that
  row), and change the models in ``db.py`` to match:
  ``tests/node/test_migrations.py`` fails while migrations and models differ.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, text

from bac_node.node.db import DatabaseError

MIGRATIONS_DIR = Path(__file__).resolve().parent
#: The revision whose schema ``create_all`` made before migrations existed.
INITIAL_REVISION = "0001"
#: pg_advisory_xact_lock key held while a process checks or migrates the schema.
LOCK_KEY = 0x6261_636E_6F64_65  # "bacnode"
#: The tables of revision 0001 (one of them without ``alembic_version``: a partial schema).
_TABLES = frozenset({"meta", "studies", "instances", "jobs", "results", "exports"})


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this package's scripts, on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this bac-node knows."""
    head = _scripts().get_current_head()
    assert head is not None, "no migration scripts found"
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision (None: no ``alembic_version`` table or row)."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, name: str) -> tuple[str | None, str]:
    """Bring the database of ``connection`` to the newest revision, in its transaction.

    ``name`` names the database in errors (a URL without its password). Returns the
    revision before (None: a new database) and after. Raises :class:`DatabaseError`
    for a database of a newer bac-node, or one that is not bac-node's.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    head = head_revision()
    current = current_revision(connection)
    config = alembic_config(connection)
    if current is None:
        tables = set(inspect(connection).get_table_names()) & _TABLES
        if tables:
            _check_pre_migration_schema(connection, name, tables)
            command.stamp(config, INITIAL_REVISION)
            current = before = INITIAL_REVISION
        else:
            before = None
    else:
        before = current
        try:
            _scripts().get_revision(current)
        except CommandError:
            raise DatabaseError(
                f"{name}: the database is at schema revision {current}, which this "
                f"bac-node (newest revision {head}) does not know: it was written by a "
                "newer bac-node; run that version (every host sharing a database must "
                "run the same one)"
            ) from None
    if current != head:
        command.upgrade(config, "head")
    return before, head


def _check_pre_migration_schema(connection: Connection, name: str, tables: set[str]) -> None:
    """A database ``create_all`` made (schema version 1), or :class:`DatabaseError`."""
    if tables != _TABLES:
        raise DatabaseError(
            f"{name}: holds some of bac-node's tables ({', '.join(sorted(tables))}) but not "
            "all and no alembic_version: not a bac-node database, or a damaged one"
        )
    version = connection.execute(
        text("SELECT value FROM meta WHERE key = 'schema_version'")
    ).scalar()
    if version != "1":
        raise DatabaseError(
            f"{name}: database schema version {version}, this bac-node migrates from "
            "version 1 only; use the bac-node version that wrote it, or a new database"
        )
