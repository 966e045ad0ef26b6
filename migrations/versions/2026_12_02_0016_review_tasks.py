"""review tasks: suspect known-good records and sampled labels put before a person, with the
history of every record a decision wrote

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 16:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
RECORD = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "review_tasks",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Float(), nullable=False),
        sa.Column("proposed", JSON, nullable=False),
        sa.Column("stratum", sa.String(length=128), nullable=True),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("details", JSON, nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("record_before", RECORD, nullable=True),
        sa.Column("record_after", RECORD, nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_review_tasks_item_id_items")
        ),
        sa.ForeignKeyConstraint(
            ["spec_id"], ["specs.id"], name=op.f("fk_review_tasks_spec_id_specs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_tasks")),
        sa.UniqueConstraint(
            "spec_id", "item_id", "reason", name="uq_review_tasks_spec_id_item_id_reason"
        ),
    )
    op.create_index("ix_review_tasks_queue", "review_tasks", ["spec_id", "reason", "state", "rank"])


def downgrade() -> None:
    op.drop_index("ix_review_tasks_queue", table_name="review_tasks")
    op.drop_table("review_tasks")
