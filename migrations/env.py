"""Alembic environment: the URL comes from the caller or STILLHOUSE_DATABASE_URL."""

from __future__ import annotations

import os

from alembic import context

from storage.models import Base
from storage.session import DEFAULT_DATABASE_URL, make_engine

config = context.config
url = config.get_main_option("sqlalchemy.url") or os.environ.get(
    "STILLHOUSE_DATABASE_URL", DEFAULT_DATABASE_URL
)
target_metadata = Base.metadata


def run_offline() -> None:
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                compare_type=True,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
