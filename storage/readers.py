"""Read-only access to the public views on Postgres, for data engineers' tools.

A NOLOGIN group role, ``stillhouse_reader``, holds ``SELECT`` on the views and nothing else;
a reader is a role that is a member of it. The views run with their owner's rights, so a
reader sees what they show (never the response cache, the ledger's raw rows or the items'
payloads) and can write nothing. A migration that recreates a view grants it to the group
again, so readers keep their access across upgrades.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, text

from schemas.errors import ConfigError

__all__ = ["PUBLIC_VIEWS", "READER_GROUP", "grant_reader"]

PUBLIC_VIEWS = ("labeled_clean", "labeled_rejected", "label_stats", "teacher_spend", "dataset_rows")
READER_GROUP = "stillhouse_reader"
_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def grant_reader(engine: Engine, role: str, *, create: bool = False) -> dict[str, Any]:
    """Make ``role`` a reader of this database's public views (idempotent). With ``create``
    a missing role is created with LOGIN (set its password yourself)."""
    if engine.dialect.name != "postgresql":
        raise ConfigError(
            "read-only roles are a Postgres feature; on SQLite, give readers the file opened "
            "read-only (sqlite3 'file:PATH?mode=ro' or a copy)"
        )
    if not _ROLE.match(role) or role == READER_GROUP:
        raise ConfigError(
            f"role {role!r}: letters, digits and '_' (at most 63, not starting with a digit), "
            f"and not {READER_GROUP!r} itself"
        )
    with engine.begin() as conn:
        exists = conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
        if not exists and not create:
            raise ConfigError(
                f"no role {role!r} on this server: create it (CREATE ROLE {role} LOGIN "
                f"PASSWORD '…') or pass --create"
            )
        if not exists:
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        if not conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": READER_GROUP}):
            conn.execute(text(f"CREATE ROLE {READER_GROUP} NOLOGIN"))
        database = conn.scalar(text("SELECT current_database()"))
        conn.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO {READER_GROUP}'))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {READER_GROUP}"))
        conn.execute(text(f"GRANT SELECT ON {', '.join(PUBLIC_VIEWS)} TO {READER_GROUP}"))
        conn.execute(text(f'GRANT {READER_GROUP} TO "{role}"'))
        # What the role may still do beyond the views, through PUBLIC (Postgres 14 and older
        # let PUBLIC create tables in the public schema): said, so an operator can close it.
        can_create = conn.scalar(
            text("SELECT has_schema_privilege(:r, 'public', 'CREATE')"), {"r": role}
        )
    return {
        "role": role,
        "created": not exists,
        "group": READER_GROUP,
        "views": list(PUBLIC_VIEWS),
        "can_create_in_public_schema": bool(can_create),
    }
