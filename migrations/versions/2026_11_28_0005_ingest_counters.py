"""ingest counters: items accepted over HTTP per spec name and UTC day (the daily cap)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 05:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingest_counters",
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("spec_name", "day", name=op.f("pk_ingest_counters")),
    )


def downgrade() -> None:
    op.drop_table("ingest_counters")
