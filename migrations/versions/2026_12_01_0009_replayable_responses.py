"""whether a stored teacher answer may be replayed from the cache

A refused, truncated or unparseable answer is kept (its label keeps the raw response) but is
not worth replaying: the next label of the same request asks the teacher again, and a good
answer then replaces it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 23:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "teacher_responses",
        sa.Column("replayable", sa.Boolean(), nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    op.drop_column("teacher_responses", "replayable")
