"""known-good records move onto their item: items.known_good replaces the known_good table

A known-good record belongs to exactly one item (the table's key was the item id), and a
second table cost a bulk load a second COPY, a foreign-key check and an index entry per row,
plus a round trip for the new ids before the first COPY could be built.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 07:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Plain ALTER TABLE on both databases (SQLite has had ADD and DROP COLUMN since 3.35): a
    # batch rebuild of `items` on SQLite would drop the old table, and with foreign keys on,
    # that deletes every label and ledger row through their ON DELETE CASCADE.
    op.add_column("items", sa.Column("known_good", JSON_TYPE, nullable=True))
    op.execute(
        "UPDATE items SET known_good = "
        "(SELECT k.fields FROM known_good AS k WHERE k.item_id = items.id) "
        "WHERE id IN (SELECT item_id FROM known_good)"
    )
    op.drop_table("known_good")


def downgrade() -> None:
    op.create_table(
        "known_good",
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("fields", JSON_TYPE, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_known_good_item_id_items"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_known_good")),
    )
    op.execute(
        "INSERT INTO known_good (item_id, fields) "
        "SELECT id, known_good FROM items WHERE known_good IS NOT NULL"
    )
    op.drop_column("items", "known_good")
