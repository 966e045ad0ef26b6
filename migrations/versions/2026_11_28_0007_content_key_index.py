"""content dedupe index on the first 16 hex digits of the content hash

An index on (spec_name, content_hash) holds the full 64-character hash in every entry; its
random inserts and probes dominated a bulk load once the index outgrew shared buffers. The
first 16 hex digits (64 bits) find the candidates, the full hash in the row confirms them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 07:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_items_spec_name_content_key",
        "items",
        ["spec_name", sa.text("substr(content_hash, 1, 16)")],
        unique=False,
    )
    op.drop_index("ix_items_spec_name_content_hash", table_name="items")


def downgrade() -> None:
    op.create_index(
        "ix_items_spec_name_content_hash", "items", ["spec_name", "content_hash"], unique=False
    )
    op.drop_index("ix_items_spec_name_content_key", table_name="items")
