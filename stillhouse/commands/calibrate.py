"""`stillhouse calibrate`: how far the teacher's confidence can be trusted, on the records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.settings import Settings
from workers.spec import load_spec

__all__ = ["run_calibrate"]


def run_calibrate(
    settings: Settings,
    spec_ref: str,
    *,
    target: float | None,
    points: int,
    png: Path | None = None,
) -> dict[str, Any]:
    """The coverage-against-accuracy curve of the spec's current version, the threshold a
    target accuracy needs, and the estimate against the measurement on the withheld share
    (``stillhouse.output.show_calibration`` prints it)."""
    from storage.training import calibration_rows
    from workers.calibration import calibrate_spec

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            rows = calibration_rows(session, spec_id)
    return calibrate_spec(spec, rows, target=target, points=points, png=png)
