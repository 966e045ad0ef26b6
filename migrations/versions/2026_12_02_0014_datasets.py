"""frozen datasets: their recipe and counts, their exact membership, and the dataset_rows view

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 07:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(JSONB(), "postgresql")

# What a dataset's members are, joined to what the store knows of them: one row per member.
DATASET_ROWS = """
    SELECT d.name AS dataset, d.content_hash AS dataset_hash, m.split, m.weight,
           m.external_id, m.class_value AS class, m.verdict, i.text, i.slices, l.output,
           l.confidence, l.agreement, i.known_good, l.known_good_match, d.spec_name, d.spec_version,
           m.label_id, l.created_at AS labeled_at
    FROM dataset_items m
    JOIN datasets d ON d.id = m.dataset_id
    JOIN labels l ON l.id = m.label_id
    JOIN items i ON i.id = m.item_id"""


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("spec_id", BIG_ID, nullable=False),
        sa.Column("spec_name", sa.String(length=64), nullable=False),
        sa.Column("spec_version", sa.Integer(), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("teacher_models", JSON, nullable=False),
        sa.Column("filters", JSON, nullable=False),
        sa.Column("recipe", JSON, nullable=False),
        sa.Column("counts", JSON, nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_datasets_spec_id_specs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_table(
        "dataset_items",
        sa.Column("dataset_id", BIG_ID, nullable=False),
        sa.Column("label_id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("class_value", sa.String(length=256), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_items_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["label_id"], ["labels.id"], name=op.f("fk_dataset_items_label_id_labels")
        ),
        sa.PrimaryKeyConstraint("dataset_id", "label_id", name=op.f("pk_dataset_items")),
    )
    op.create_index(
        "ix_dataset_items_dataset_split",
        "dataset_items",
        ["dataset_id", "split", "label_id"],
        unique=False,
    )
    op.execute(f"CREATE VIEW dataset_rows AS {DATASET_ROWS}")
    if op.get_bind().dialect.name == "postgresql":  # readers keep their access (see 0013)
        op.execute(
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stillhouse_reader') "
            "THEN GRANT SELECT ON dataset_rows TO stillhouse_reader; END IF; END $$"
        )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS dataset_rows")
    op.drop_index("ix_dataset_items_dataset_split", table_name="dataset_items")
    op.drop_table("dataset_items")
    op.drop_table("datasets")
