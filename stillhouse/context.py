"""Open the per-process objects (engine, sessions, runtime) from settings, at the edges.

``open_database`` and ``open_runtime`` are context managers: what they open is closed and
its engine disposed when the block ends. A long-lived owner (the ingest API's lifespan, a
worker process) uses :func:`connect_database` and disposes the engine itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError, DatabaseUnreachable
from stillhouse.settings import Settings
from storage.migrate import current_revision, head_revision, upgrade
from storage.session import make_engine, make_sessionmaker
from workers.pipeline import LabelRuntime

__all__ = ["connect_database", "open_database", "open_runtime", "runtime_on"]


def connect_database(settings: Settings) -> Engine:
    """An engine on a schema that is current (migrated automatically on SQLite); the
    caller disposes it."""
    engine = make_engine(settings.database_url)
    try:
        current = current_revision(engine)
    except Exception as exc:  # connection problems: say which URL, without the password
        engine.dispose()
        raise DatabaseUnreachable(
            f"cannot connect to the database "
            f"{engine.url.render_as_string(hide_password=True)}: {exc}"
        ) from exc
    head = head_revision(settings.database_url)
    if current != head:
        if not settings.is_sqlite:
            engine.dispose()
            raise ConfigError(
                f"the database is at schema revision {current or 'none'}, the code "
                f"needs {head}: run `stillhouse db upgrade` first"
            )
        upgrade(settings.database_url)
    return engine


@contextmanager
def open_database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the store for the block; the engine is disposed at its end."""
    engine = connect_database(settings)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@contextmanager
def open_runtime(settings: Settings, *, config_pause_s: float = 0.0) -> Iterator[LabelRuntime]:
    """A labeling runtime for the block (its loop, clients and engine closed at the end)."""
    with open_database(settings) as sessions, runtime_on(sessions, settings, config_pause_s) as rt:
        yield rt


def runtime_on(
    sessions: sessionmaker[Session], settings: Settings, config_pause_s: float = 0.0
) -> LabelRuntime:
    """A labeling runtime over these sessions, configured from settings."""
    return LabelRuntime(
        sessions,
        teacher_base_url=settings.teacher_base_url,
        http_transport=settings.http_transport,
        config_pause_s=config_pause_s,
        # The governor shares teacher limits through the broker's Redis when there is one.
        redis_url=settings.broker_url if _is_redis(settings.broker_url) else None,
    )


def _is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://", "unix://"))
