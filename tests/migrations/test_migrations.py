"""Migrations that move data: run them on a database holding rows, both ways, on both databases."""

from __future__ import annotations

import json

import pytest
from alembic import command
from sqlalchemy import Connection, create_engine, text

from storage.migrate import alembic_config, upgrade


def _insert_spec(conn: Connection, spec_id: int, name: str, body: object = None) -> None:
    """A stored spec row as the older revisions have it (no settings columns)."""
    conn.execute(
        text(
            "INSERT INTO specs (id, name, version, kind, body, content_hash) "
            "VALUES (:id, :name, :id, 'classification', :body, 'h')"
        ),
        {"id": spec_id, "name": name, "body": json.dumps(body or {})},
    )


def _insert_item(conn: Connection, n: int, spec_name: str, last_error: str | None = None) -> None:
    """A pending item of spec 1, with only the columns every revision has."""
    conn.execute(
        text(
            "INSERT INTO items (id, spec_name, spec_id, external_id, content_hash, text, "
            "payload, slices, state, attempts, last_error) VALUES "
            "(:n, :spec, 1, :ext, :h, 'text', '{}', '{}', 'pending', 0, :error)"
        ),
        {"n": n, "spec": spec_name, "ext": f"t-{n}", "h": f"h{n}", "error": last_error},
    )


def test_known_good_moves_onto_items_and_back(database_url: str) -> None:
    # `database_url` is migrated to head: step back to 0005, where known_good is a table.
    config = alembic_config(database_url)
    command.downgrade(config, "0005")
    engine = create_engine(database_url)
    with engine.begin() as conn:
        _insert_spec(conn, 1, "triage")
        for n in (1, 2, 3):
            _insert_item(conn, n, "triage")
        # A label must survive both steps: rebuilding `items` would cascade-delete it.
        conn.execute(
            text(
                "INSERT INTO labels (id, item_id, spec_id, verdict, reasons) "
                "VALUES (1, 1, 1, 'accepted', '[]')"
            )
        )
        for n, label in ((1, "sport"), (3, "tech")):
            conn.execute(
                text("INSERT INTO known_good (item_id, fields) VALUES (:n, :f)"),
                {"n": n, "f": json.dumps({"label": label})},
            )

    upgrade(database_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT external_id, known_good FROM items ORDER BY id")).all()
    loaded = [(ext, json.loads(kg) if isinstance(kg, str) else kg) for ext, kg in rows]
    assert loaded == [("t-1", {"label": "sport"}), ("t-2", None), ("t-3", {"label": "tech"})]

    command.downgrade(config, "0005")
    with engine.connect() as conn:
        back = conn.execute(text("SELECT item_id, fields FROM known_good ORDER BY item_id")).all()
        labels = conn.scalar(text("SELECT count(*) FROM labels"))
    engine.dispose()
    assert labels == 1
    assert [(i, json.loads(f) if isinstance(f, str) else f) for i, f in back] == [
        (1, {"label": "sport"}),
        (3, {"label": "tech"}),
    ]


def test_stored_specs_get_their_settings_as_columns(database_url: str) -> None:
    """0011 reads each stored spec body once, so the store never has to again."""
    config = alembic_config(database_url)
    command.downgrade(config, "0010")
    engine = create_engine(database_url)
    body = {"labeling": {"batch_size": 9, "max_attempts": 7}, "budget_usd": 1.5}
    with engine.begin() as conn:
        for spec_id, stored in ((1, body), (2, {})):
            _insert_spec(conn, spec_id, "t", stored)
    upgrade(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT batch_size, max_attempts, lease_s, budget_usd FROM specs ORDER BY id")
        ).all()
    command.downgrade(config, "0010")
    engine.dispose()
    assert [tuple(r) for r in rows] == [(9, 7, 600, 1.5), (50, 5, 600, None)]


def test_last_errors_get_their_kind_as_a_column(database_url: str) -> None:
    """0012 reads the ``kind: `` prefix once; from then on code decides on the column."""
    config = alembic_config(database_url)
    command.downgrade(config, "0011")
    engine = create_engine(database_url)
    with engine.begin() as conn:
        _insert_spec(conn, 1, "t")
        for n, error in ((1, "budget: spent $1 of $1"), (2, "lease_expired: ran out"), (3, None)):
            _insert_item(conn, n, "t", error)
    upgrade(database_url)
    with engine.connect() as conn:
        kinds = conn.execute(text("SELECT last_error_kind FROM items ORDER BY id")).scalars()
        found = list(kinds)
    command.downgrade(config, "0011")
    engine.dispose()
    assert found == ["budget", "lease_expired", None]


@pytest.mark.filterwarnings("ignore:.*expression-based index")  # SQLite cannot reflect those
def test_the_head_schema_is_what_the_models_declare(database_url: str) -> None:
    """Every table, column, index and constraint the models declare is what the migrations
    build (alembic's autogenerate comparison finds nothing to add or drop)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.models import Base

    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
