"""What several commands need: the stored id of a spec version."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import ConfigError
from storage.models import SpecRow
from workers.spec import Spec

__all__ = ["stored_spec_id"]


def stored_spec_id(sessions: sessionmaker[Session], spec: Spec) -> int:
    with sessions() as session:
        spec_id = session.scalar(
            select(SpecRow.id).where(SpecRow.name == spec.name, SpecRow.version == spec.version)
        )
    if spec_id is None:
        given = spec.source if spec.source.endswith((".yaml", ".yml")) else spec.name
        bundled = (
            Path(given).parent.name == "specs" and Path(given).parent.parent.name == "examples"
        )
        ref = spec.name if bundled else given
        raise ConfigError(
            f"nothing is labeled for spec {spec.name!r} v{spec.version} yet: run "
            f"`stillhouse backfill SOURCE --spec {ref}` first"
        )
    return spec_id
