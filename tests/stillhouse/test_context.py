"""The edge's openers: a store that cannot be reached is its own error, and what is opened
is closed."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from schemas.errors import ConfigError, DatabaseUnreachable
from stillhouse.context import connect_database, open_database
from stillhouse.servers.teacher.process import free_port
from stillhouse.settings import Settings


def test_an_unreachable_database_is_its_own_error_without_the_password() -> None:
    url = f"postgresql+psycopg://u:hunter2@127.0.0.1:{free_port()}/nothing?connect_timeout=2"
    with pytest.raises(DatabaseUnreachable, match="cannot connect to the database") as caught:
        connect_database(Settings(database_url=url))
    assert isinstance(caught.value, ConfigError)  # a command still says it and exits 2
    assert "hunter2" not in str(caught.value)


def test_open_database_disposes_its_engine(sqlite_url: str) -> None:
    with open_database(Settings(database_url=sqlite_url)) as sessions:
        engine = sessions.kw["bind"]
        with sessions() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
        assert engine.pool.checkedin() == 1
    assert engine.pool.checkedin() == 0  # disposed: its connections are closed
