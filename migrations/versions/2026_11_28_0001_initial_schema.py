"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 01:36:32.834278
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSONB on Postgres, JSON on SQLite; BIGINT ids on Postgres, INTEGER (rowid) on SQLite.
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "specs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", JSON_TYPE, nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_specs")),
        sa.UniqueConstraint("name", "version", name="uq_specs_name_version"),
    )
    op.create_table(
        "teacher_responses",
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("request", JSON_TYPE, nullable=False),
        sa.Column("response", JSON_TYPE, nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("request_hash", name=op.f("pk_teacher_responses")),
    )
    op.create_table(
        "items",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("payload", JSON_TYPE, nullable=False),
        sa.Column("slices", JSON_TYPE, nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "queued",
                "leased",
                "accepted",
                "rejected",
                "failed",
                name="item_state",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_items_spec_id_specs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
        sa.UniqueConstraint("spec_name", "external_id", name="uq_items_spec_name_external_id"),
    )
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_index(
            "ix_items_spec_name_content_hash", ["spec_name", "content_hash"], unique=False
        )
        batch_op.create_index(
            "ix_items_spec_state_retry", ["spec_id", "state", "retry_at"], unique=False
        )

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
    op.create_table(
        "labels",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("output", JSON_TYPE, nullable=True),
        sa.Column(
            "verdict",
            sa.Enum(
                "accepted", "rejected", "needs_review", name="verdict", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("reasons", JSON_TYPE, nullable=False),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("known_good_match", sa.Boolean(), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_labels_item_id_items"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_labels_spec_id_specs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint("item_id", "spec_id", name="uq_labels_item_id_spec_id"),
    )
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.create_index("ix_labels_spec_verdict", ["spec_id", "verdict"], unique=False)

    op.create_table(
        "teacher_calls",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("ok", "cache_hit", "error", name="call_status", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("error_kind", sa.String(length=32), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_teacher_calls_item_id_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["spec_id"], ["specs.id"], name=op.f("fk_teacher_calls_spec_id_specs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teacher_calls")),
    )
    with op.batch_alter_table("teacher_calls", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_teacher_calls_item_id"), ["item_id"], unique=False)
        batch_op.create_index(
            "ix_teacher_calls_spec_created", ["spec_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("teacher_calls", schema=None) as batch_op:
        batch_op.drop_index("ix_teacher_calls_spec_created")
        batch_op.drop_index(batch_op.f("ix_teacher_calls_item_id"))

    op.drop_table("teacher_calls")
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.drop_index("ix_labels_spec_verdict")

    op.drop_table("labels")
    op.drop_table("known_good")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_spec_state_retry")
        batch_op.drop_index("ix_items_spec_name_content_hash")

    op.drop_table("items")
    op.drop_table("teacher_responses")
    op.drop_table("specs")
