"""`stillhouse db …`: the schema."""

from __future__ import annotations

from stillhouse.cli.root import db_app, err, settings

__all__ = ["db_upgrade"]


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the migrations to STILLHOUSE_DATABASE_URL.

    Example: stillhouse db upgrade
    """
    from storage.migrate import upgrade

    upgrade(settings().database_url)
    err.print("database is at the latest schema revision")
