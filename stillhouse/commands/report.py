"""`stillhouse report`: what the checks accepted and rejected, by slice and class."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from stillhouse.commands.common import stored_spec_id
from stillhouse.context import open_database
from stillhouse.output import cell, pct, table_console
from stillhouse.settings import Settings
from workers.spec import load_spec

__all__ = ["run_report"]


def run_report(
    settings: Settings, spec_ref: str, *, as_json: bool, console: Console
) -> dict[str, Any]:
    """Print the filter report for the spec's current version."""

    from storage.training import report_rows
    from workers.report import build_report

    spec = load_spec(spec_ref)
    with open_database(settings) as sessions:
        spec_id = stored_spec_id(sessions, spec)
        with sessions() as session:
            result = build_report(spec, report_rows(session, spec_id))
        if as_json:
            return result
        table = Table(title=f"{spec.name} v{spec.version}: what the checks kept")
        for column in (
            "group",
            "labels",
            "accepted",
            "rejected",
            "teacher vs known-good",
            "accepted vs known-good",
            "top reasons",
        ):
            table.add_column(column)
        for name, tally in [("overall", result["overall"]), *result["slices"].items()]:
            reasons = ", ".join(
                f"{k} {v}" for k, v in sorted(tally["by_reason"].items(), key=lambda kv: -kv[1])[:3]
            )
            table.add_row(
                cell(name),
                str(tally["labels"]),
                str(tally["by_verdict"].get("accepted", 0)),
                str(tally["by_verdict"].get("rejected", 0)),
                pct(tally["teacher_agreement"]),
                pct(tally["accepted_accuracy"]),
                cell(reasons),
            )
        table_console().print(table)
        held = result["withheld"]
        console.print(
            f"withheld known-good ({held['labels']} items): the other checks accepted "
            f"{pct(held['accepted_share'])}, and {pct(held['accepted_accuracy'])} of "
            f"those were right (raw teacher: {pct(held['raw_accuracy'])})"
        )
        return result
