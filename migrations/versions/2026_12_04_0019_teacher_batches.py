"""provider batches: teacher_batches and teacher_batch_requests (a backfill sent through the
OpenAI Batch API or Anthropic Message Batches, followed by a durable poller), and
specs.labeling_mode (``batch``: the dispatcher leaves the spec's pending items to the batch
submitter)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04 03:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_NULLABLE = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)


def upgrade() -> None:
    op.add_column(
        "specs",
        sa.Column("labeling_mode", sa.String(length=8), nullable=False, server_default="live"),
    )
    op.create_table(
        "teacher_batches",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("input_file_id", sa.String(length=128), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=128), nullable=True),
        sa.Column("output_file_id", sa.String(length=128), nullable=True),
        sa.Column("error_file_id", sa.String(length=128), nullable=True),
        sa.Column("results_url", sa.Text(), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("expired", sa.Integer(), nullable=False),
        sa.Column("price_factor", sa.Float(), nullable=False),
        sa.Column("reserved_usd", sa.Float(), nullable=False),
        sa.Column("reservation_id", sa.BigInteger(), nullable=True),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("creating_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["spec_id"], ["specs.id"], name=op.f("fk_teacher_batches_spec_id_specs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teacher_batches")),
        sa.UniqueConstraint("key", name=op.f("uq_teacher_batches_key")),
        sa.UniqueConstraint("provider_batch_id", name=op.f("uq_teacher_batches_provider_batch_id")),
    )
    op.create_index("ix_teacher_batches_spec_step", "teacher_batches", ["spec_id", "step"])
    op.create_table(
        "teacher_batch_requests",
        sa.Column("batch_id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("response", JSON_NULLABLE, nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["teacher_batches.id"],
            name=op.f("fk_teacher_batch_requests_batch_id_teacher_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_teacher_batch_requests_item_id_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", "item_id", name=op.f("pk_teacher_batch_requests")),
    )
    op.create_index(
        "ix_teacher_batch_requests_hash_state",
        "teacher_batch_requests",
        ["request_hash", "state"],
    )
    op.create_index("ix_teacher_batch_requests_item", "teacher_batch_requests", ["item_id"])


def downgrade() -> None:
    op.drop_index("ix_teacher_batch_requests_item", table_name="teacher_batch_requests")
    op.drop_index("ix_teacher_batch_requests_hash_state", table_name="teacher_batch_requests")
    op.drop_table("teacher_batch_requests")
    op.drop_index("ix_teacher_batches_spec_step", table_name="teacher_batches")
    op.drop_table("teacher_batches")
    op.drop_column("specs", "labeling_mode")
