"""student runs: every training of a student, queued or embedded, with its state, folder,
log and a summary of its metrics

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 19:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
RECORD = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
STATES = ("queued", "running", "finished", "failed")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", BIG_ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "state",
            sa.Enum(*STATES, name="run_state", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("out_dir", sa.Text(), nullable=False),
        sa.Column("request", JSON, nullable=False),
        sa.Column("summary", RECORD, nullable=True),
        sa.Column("flagged", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.Column("host", sa.String(length=128), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_runs_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_runs_spec_id_specs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_runs_name")),
    )
    op.create_index("ix_runs_spec_created", "runs", ["spec_name", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_spec_created", table_name="runs")
    op.drop_table("runs")
