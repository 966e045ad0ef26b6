"""items.trainable: whether datasets may take an item's label (a router's fallback the spec's
sampling rules leave out, or that its operator chose not to keep, is stored for the ledger and
the cache but kept out of training)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "items",
        sa.Column("trainable", sa.Boolean(), nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    op.drop_column("items", "trainable")
