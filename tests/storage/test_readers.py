"""A read-only role on Postgres, logged in as: it reads the public views, and nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support.store import load_tickets, ticket, write_label

from schemas.errors import ConfigError
from storage.readers import PUBLIC_VIEWS, grant_reader
from storage.session import make_engine, make_sessionmaker


@pytest.fixture
def role(postgres_admin_url: str) -> Iterator[str]:
    name = f"reader_{uuid.uuid4().hex[:8]}"
    yield name
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
    admin.dispose()


def test_a_reader_reads_the_views_and_cannot_touch_the_rest(postgres_url: str, role: str) -> None:
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    store = load_tickets(sessions, [ticket(0), ticket(1)])
    with sessions.begin() as session:
        write_label(session, store, "t00000", "business")
    with pytest.raises(ConfigError, match=f"no role '{role}' on this server"):
        grant_reader(engine, role)
    granted = grant_reader(engine, role, create=True)
    assert granted["created"] and granted["views"] == list(PUBLIC_VIEWS)
    assert grant_reader(engine, role)["created"] is False  # again: nothing changes
    engine.dispose()

    url = make_url(postgres_url)
    dsn = f"host={url.host} port={url.port} dbname={url.database} user={role}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for view in PUBLIC_VIEWS:
            conn.execute(f"SELECT * FROM {view}").fetchall()
        (external_id,) = conn.execute("SELECT external_id FROM labeled_clean").fetchone() or ("",)
        assert external_id == "t00000"
        denied = [
            "SELECT * FROM teacher_responses",
            "SELECT * FROM items",
            "SELECT * FROM labels",
            "INSERT INTO specs (name, version, kind, body, content_hash) "
            "VALUES ('x', 1, 'classification', '{}', 'h')",
            "UPDATE labels SET verdict = 'rejected'",
            "DELETE FROM teacher_calls",
            "CREATE TABLE mine (x int)",
            "DROP VIEW labeled_clean",
        ]
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_a_reader_keeps_its_access_when_a_migration_makes_a_view_again(
    postgres_url: str, role: str
) -> None:
    from alembic import command

    from storage.migrate import alembic_config

    engine = make_engine(postgres_url)
    grant_reader(engine, role, create=True)
    config = alembic_config(postgres_url)
    command.downgrade(config, "0012")  # the views go
    command.upgrade(config, "head")  # and come back, granted to the readers again
    engine.dispose()
    url = make_url(postgres_url)
    dsn = f"host={url.host} port={url.port} dbname={url.database} user={role}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for view in PUBLIC_VIEWS:
            conn.execute(f"SELECT count(*) FROM {view}").fetchone()


def test_sqlite_has_no_roles_and_says_what_to_do_instead(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with pytest.raises(ConfigError, match="read-only roles are a Postgres feature"):
        grant_reader(engine, "reader")
    engine.dispose()
