"""`stillhouse report`: what the checks accepted and rejected, by slice and class."""

from __future__ import annotations

from typing import Any

from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.settings import Settings
from workers.spec import load_spec

__all__ = ["run_report"]


def run_report(settings: Settings, spec_ref: str) -> dict[str, Any]:
    """The filter report for the spec's current version (``stillhouse.output.show_report``
    prints it)."""

    from storage.calibrations import latest_calibration
    from storage.training import report_rows
    from workers.calibrator import from_row
    from workers.report import build_report

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            stored = latest_calibration(session, spec_id)
            calibration = None if stored is None else from_row(stored)
            report = build_report(spec, report_rows(session, spec_id), calibration)
    return {"spec": spec.name, "version": spec.version, **report}
