"""every submitted id is kept: an id whose text repeated another's points at that item

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 00:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "item_aliases",
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_item_aliases_item_id_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("spec_name", "external_id", name=op.f("pk_item_aliases")),
    )
    op.create_index(op.f("ix_item_aliases_item_id"), "item_aliases", ["item_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_item_aliases_item_id"), table_name="item_aliases")
    op.drop_table("item_aliases")
