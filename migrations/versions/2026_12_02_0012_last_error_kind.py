"""an item's last error kind in a column of its own, beside the message

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 04:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every kind an item's last error could carry so far, as the ``kind: message`` prefix the
# messages were written with (schemas.errors' kinds, and the sweeper's lease_expired).
KINDS = (
    "error", "transient", "rate_limited", "teacher_busy", "unavailable", "timeout",
    "permanent", "rejected_by_server", "bad_response", "config", "spec", "budget",
    "database_unreachable", "lease_expired",
)  # fmt: skip


def upgrade() -> None:
    op.add_column("items", sa.Column("last_error_kind", sa.String(length=32), nullable=True))
    items = sa.table(
        "items", sa.column("last_error", sa.Text()), sa.column("last_error_kind", sa.String())
    )
    for kind in KINDS:
        op.execute(
            sa.update(items)
            .where(items.c.last_error.like(f"{kind}: %"), items.c.last_error_kind.is_(None))
            .values(last_error_kind=kind)
        )


def downgrade() -> None:
    op.drop_column("items", "last_error_kind")
