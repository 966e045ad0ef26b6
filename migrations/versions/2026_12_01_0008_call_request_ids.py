"""one id per HTTP attempt in the call ledger

Every attempt is written ahead right before it is sent, with the id it carries as
X-Client-Request-Id; the batch's commit replaces exactly those rows by id. The teacher's own
request log (and a provider's support staff) can then be matched to the ledger request by
request.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("teacher_calls", sa.Column("client_request_id", sa.String(64), nullable=True))
    op.create_index(
        "ix_teacher_calls_client_request_id",
        "teacher_calls",
        ["client_request_id"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("ix_teacher_calls_client_request_id", table_name="teacher_calls")
    op.drop_column("teacher_calls", "client_request_id")
