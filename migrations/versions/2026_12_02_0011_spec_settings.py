"""a spec version's operational settings as columns: storage reads them, never the spec's JSON

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 04:00:00.000000
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The spec schema's defaults (workers.spec.LABELING_DEFAULTS) when a stored body has none.
DEFAULTS = {"batch_size": 50, "max_attempts": 5, "lease_s": 600}


def upgrade() -> None:
    # Plain ALTER TABLE on both databases: rebuilding `specs` (SQLite's batch mode) would
    # trip the foreign keys that point at it.
    for name, default in DEFAULTS.items():
        op.add_column(
            "specs", sa.Column(name, sa.Integer(), nullable=False, server_default=str(default))
        )
    op.add_column("specs", sa.Column("budget_usd", sa.Float(), nullable=True))
    specs = sa.table(
        "specs",
        sa.column("id", sa.BigInteger()),
        sa.column("body", sa.JSON()),
        *(sa.column(name, sa.Integer()) for name in DEFAULTS),
        sa.column("budget_usd", sa.Float()),
    )
    connection = op.get_bind()
    for spec_id, body in connection.execute(sa.select(specs.c.id, specs.c.body)).all():
        body = json.loads(body) if isinstance(body, str) else (body or {})
        labeling = body.get("labeling") or {}
        values = {name: int(labeling.get(name, default)) for name, default in DEFAULTS.items()}
        budget = body.get("budget_usd")
        values["budget_usd"] = None if budget is None else float(budget)
        connection.execute(sa.update(specs).where(specs.c.id == spec_id).values(**values))


def downgrade() -> None:
    for name in (*DEFAULTS, "budget_usd"):
        op.drop_column("specs", name)
