"""calibrations of a teacher's confidence per spec version, and the threshold each label met

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 11:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "calibrations",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("signal", sa.String(length=32), nullable=False),
        sa.Column("target", sa.Float(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("fit", JSON, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["spec_id"], ["specs.id"], name=op.f("fk_calibrations_spec_id_specs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    op.create_index("ix_calibrations_spec_id", "calibrations", ["spec_id", "id"])
    op.add_column("labels", sa.Column("threshold", sa.Float(), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a constraint only by rebuilding the table, and a rebuild of labels
        # would trip over the views that read it; its own ADD COLUMN takes the reference.
        op.execute(
            "ALTER TABLE labels ADD COLUMN calibration_id INTEGER CONSTRAINT "
            "fk_labels_calibration_id_calibrations REFERENCES calibrations (id)"
        )
        return
    op.add_column("labels", sa.Column("calibration_id", BIG_ID, nullable=True))
    op.create_foreign_key(
        op.f("fk_labels_calibration_id_calibrations"),
        "labels",
        "calibrations",
        ["calibration_id"],
        ["id"],
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(
            op.f("fk_labels_calibration_id_calibrations"), "labels", type_="foreignkey"
        )
    op.drop_column("labels", "calibration_id")
    op.drop_column("labels", "threshold")
    op.drop_index("ix_calibrations_spec_id", table_name="calibrations")
    op.drop_table("calibrations")
