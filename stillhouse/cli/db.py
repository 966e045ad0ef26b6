"""`stillhouse db …`: the schema."""

from __future__ import annotations

from typing import Annotated

import typer

from stillhouse.cli.root import JsonOpt, db_app, err, settings
from stillhouse.output import print_json

__all__ = ["db_grant_reader", "db_upgrade"]


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the migrations to STILLHOUSE_DATABASE_URL.

    Example: stillhouse db upgrade
    """
    from storage.migrate import upgrade

    upgrade(settings().database_url)
    err.print("database is at the latest schema revision")


@db_app.command("grant-reader")
def db_grant_reader(
    role: Annotated[str, typer.Argument(help="the Postgres role that will read the views")],
    create: Annotated[
        bool, typer.Option("--create", help="create the role (LOGIN) if it does not exist")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Give a Postgres role SELECT on the public views (labeled_clean, labeled_rejected,
    label_stats, teacher_spend, dataset_rows) and nothing else.

    The role joins the group stillhouse_reader; later migrations keep the group's grants.

    Example: stillhouse db grant-reader analyst --create
    """
    from stillhouse.context import connect_database
    from storage.readers import grant_reader

    engine = connect_database(settings())
    try:
        result = grant_reader(engine, role, create=create)
    finally:
        engine.dispose()
    if as_json:
        print_json(result)
        return
    err.print(
        f"{role} can read {', '.join(result['views'])} (as a member of {result['group']})",
        markup=False,
    )
    if result["can_create_in_public_schema"]:
        err.print(
            "warning: PUBLIC may create tables in the public schema on this server (Postgres "
            "14 or older): REVOKE CREATE ON SCHEMA public FROM PUBLIC closes it",
            style="bold yellow",
        )
