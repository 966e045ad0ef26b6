"""Build the per-process objects (engine, sessions, runtime) from settings, at the edges."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from stillhouse.settings import Settings
from storage.migrate import current_revision, head_revision, upgrade
from storage.session import make_engine, make_sessionmaker
from workers.pipeline import LabelRuntime

__all__ = ["open_database", "open_runtime"]


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """Connect, and make sure the schema is current (migrated automatically on SQLite)."""
    engine = make_engine(settings.database_url)
    try:
        current = current_revision(engine)
    except Exception as exc:  # connection problems: say which URL, without the password
        raise ConfigError(
            f"cannot connect to the database "
            f"{engine.url.render_as_string(hide_password=True)}: {exc}"
        ) from exc
    head = head_revision(settings.database_url)
    if current != head:
        if not settings.is_sqlite:
            raise ConfigError(
                f"the database is at schema revision {current or 'none'}, the code "
                f"needs {head}: run `stillhouse db upgrade` first"
            )
        upgrade(settings.database_url)
    return engine, make_sessionmaker(engine)


def open_runtime(settings: Settings, *, config_pause_s: float = 0.0) -> LabelRuntime:
    """A labeling runtime for this process (called after the fork in workers)."""
    _, sessions = open_database(settings)
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
