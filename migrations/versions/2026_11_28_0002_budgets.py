"""budgets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 02:17:51.998972
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("limit_usd", sa.Float(), nullable=True),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("spec_name", name=op.f("pk_budgets")),
    )
    op.create_table(
        "budget_reservations",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("amount_usd", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["spec_name"],
            ["budgets.spec_name"],
            name=op.f("fk_budget_reservations_spec_name_budgets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_reservations")),
    )
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_budget_reservations_spec_expires", ["spec_name", "expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.drop_index("ix_budget_reservations_spec_expires")

    op.drop_table("budget_reservations")
    op.drop_table("budgets")
