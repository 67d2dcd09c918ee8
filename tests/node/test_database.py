"""The ``database`` setting and the schema migrations, on SQLite and on PostgreSQL.

The migrations must build exactly the schema of the models (``db.py``): Alembic's own
comparison of a migrated database with the models' metadata is empty on both backends.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pg import PASSWORD, PostgresServer
from sqlalchemy import create_engine, insert, inspect, select, text

from bac_node.cli import main
from bac_node.config import Settings, check_database_url, load_settings, redact_url
from bac_node.errors import ConfigError
from bac_node.node.db import (
    DATABASE_FILE,
    Base,
    DatabaseError,
    Meta,
    Study,
    database_url,
    open_database,
    utcnow,
)
from bac_node.node.migrations import INITIAL_REVISION, current_revision, head_revision

# --- the setting --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///relative/bac-node.sqlite",
        "sqlite:////srv/bac-node/bac-node.sqlite",
        "postgresql+psycopg://bac:secret@db.example:5432/bacnode",
        "postgresql+psycopg://bac@10.0.0.5/bacnode?sslmode=require",
    ],
)
def test_database_urls_accepted(url: str) -> None:
    assert Settings(database=url).database == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://bac:secret@h/db", "must start with sqlite:/// or postgresql+psycopg://"),
        ("postgresql://bac:secret@h/db", "use the postgresql+psycopg:// scheme"),
        ("postgresql+psycopg://bac:secret@h:70000/db", "invalid port"),
        ("postgresql+psycopg://bac:secret@h", "name the database"),
        ("sqlite://relative.db", "an SQLite URL is sqlite:///"),
    ],
)
def test_bad_database_urls_are_refused_without_their_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        Settings(database=url)
    assert "secret" not in str(refused.value)


def test_the_database_setting_comes_from_the_environment_and_is_redacted() -> None:
    url = "postgresql+psycopg://bac:s3cr3t@db:5432/bacnode"
    settings, sources = load_settings(environ={"BAC_NODE_DATABASE": url})
    assert (settings.database, sources["database"]) == (url, "env")
    assert redact_url(url) == "postgresql+psycopg://bac:***@db:5432/bacnode"
    assert check_database_url(url) == url


def test_settings_and_worker_options_never_print_the_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAC_NODE_ALLOCATOR_TUNED", "1")  # never re-exec the test process
    url = "postgresql+psycopg://bac:s3cr3t@127.0.0.1:1/bacnode"
    assert main(["--database", url, "settings"]) == 0
    out = capsys.readouterr().out
    assert "bac:***@127.0.0.1:1/bacnode" in out and "s3cr3t" not in out
    # A bad URL after `worker` is refused before any model loads, password hidden.
    assert main(["worker", "--database", url.replace("+psycopg", ""), "--data-dir", "d"]) == 1
    err = capsys.readouterr().err
    assert "postgresql+psycopg://" in err and "s3cr3t" not in err


# --- migrations ---------------------------------------------------------------------------


def _location(db_location: str | Path, request: pytest.FixtureRequest) -> str:
    """An empty database of the backend under test (not the migrated template)."""
    if isinstance(db_location, Path):
        return database_url(db_location)
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


def test_the_migrations_build_exactly_the_models_schema(
    db_location: str | Path, request: pytest.FixtureRequest
) -> None:
    url = _location(db_location, request)
    db = open_database(url)
    try:
        with db.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert set(inspect(connection).get_table_names()) == {
                *Base.metadata.tables, "alembic_version",
            }  # fmt: skip
        with db.read() as s:
            assert s.get(Meta, "schema_version") is not None
    finally:
        db.dispose()


def test_a_database_from_before_migrations_is_stamped_and_kept(
    db_location: str | Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    url = _location(db_location, request)
    engine = create_engine(url)
    Base.metadata.create_all(engine)  # what bac-node did before Alembic
    with engine.begin() as connection:
        connection.execute(insert(Meta).values(key="schema_version", value="1"))
        connection.execute(
            insert(Study).values(
                study_uid="1.2.3",
                first_received=utcnow(),
                last_received=utcnow(),
                instance_count=4,
                queued=True,
                purged=False,
            )
        )
    engine.dispose()
    db = open_database(url)
    try:
        with db.engine.connect() as connection:
            assert current_revision(connection) == INITIAL_REVISION == head_revision()
        with db.read() as s:
            assert s.scalars(select(Study.study_uid)).all() == ["1.2.3"]
    finally:
        db.dispose()


def test_a_newer_schema_is_refused(db_location: str | Path, request: pytest.FixtureRequest) -> None:
    url = _location(db_location, request)
    open_database(url).dispose()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(DatabaseError, match="schema revision 9999, which this bac-node") as refused:
        open_database(url)
    assert PASSWORD not in str(refused.value)


def test_another_schema_version_or_a_partial_schema_is_refused(tmp_path: Path) -> None:
    url = database_url(tmp_path)
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(Meta).values(key="schema_version", value="2"))
    engine.dispose()
    with pytest.raises(DatabaseError, match="schema version 2, this bac-node migrates"):
        open_database(url)
    partial = tmp_path / "partial"
    partial.mkdir()
    engine = create_engine(database_url(partial))
    Base.metadata.tables["studies"].create(engine)
    engine.dispose()
    with pytest.raises(DatabaseError, match="holds some of bac-node's tables"):
        open_database(partial)


def test_processes_opening_a_new_database_together_migrate_it_once(
    db_location: str | Path, request: pytest.FixtureRequest
) -> None:
    url = _location(db_location, request)
    start, errors = threading.Barrier(4), []

    def open_it() -> None:
        start.wait()
        try:
            open_database(url).dispose()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)  # generous: CI and test machines are shared 2-core boxes
    assert not any(thread.is_alive() for thread in threads), "an open_database never returned"
    assert errors == []
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM meta")).scalar() == 1
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def test_db_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "db", "current"]) == 1
    assert "no bac-node database here" in capsys.readouterr().err
    assert main(["--data-dir", str(data), "db", "upgrade"]) == 0
    assert f"at schema revision {head_revision()}" in capsys.readouterr().out
    assert (data / DATABASE_FILE).is_file()
    assert main(["--data-dir", str(data), "db", "current"]) == 0
    head = head_revision()
    assert capsys.readouterr().out.split() == ["database", f"{head},", "newest", head]
