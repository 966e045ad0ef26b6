"""`stillhouse estimate` (and `backfill --dry-run`): calls, tokens, cost and time, before
anything is spent."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from stillhouse.context import open_database
from stillhouse.settings import Settings
from workers.ingest import (
    read_source,
)
from workers.spec import load_spec

__all__ = ["run_estimate"]


def run_estimate(
    settings: Settings,
    source: str,
    spec_ref: str,
    *,
    limit: int | None,
    sample: int,
    as_json: bool,
    console: Console,
) -> dict[str, Any]:
    """Print what labeling ``source`` would cost; loads nothing, calls nothing."""

    from workers.estimate import estimate_source

    spec = load_spec(spec_ref)
    rows = read_source(source, limit=limit)
    with open_database(settings) as sessions:
        with sessions() as session:
            result = estimate_source(
                session,
                spec,
                rows,
                sample_size=sample,
                workers=settings.worker_concurrency if settings.distributed else 1,
            ).as_dict()
        if as_json:
            return result
        budget = result["budget_usd"]
        console.print(
            f"{result['rows']} rows ({result['bad_rows']} bad): about {result['calls']} "
            f"teacher calls, {result['prompt_tokens']:,} prompt + "
            f"{result['completion_tokens']:,} completion tokens, ${result['cost_usd']:.4f}, "
            f"{result['seconds']:.0f} s"
            + (
                ""
                if budget is None
                else f"; budget_usd ${budget:.2f} "
                f"({'enough' if result['within_budget'] else 'NOT enough'})"
            ),
            markup=False,
            highlight=False,
        )
        console.print(
            f"already labeled: {100 * result['already_done_share']:.0f} % of the sample; "
            f"cached answers: {100 * result['cached_share']:.0f} %"
        )
        for note in result["assumptions"]:
            console.print(f"  assumed: {note}", markup=False, highlight=False)
        return result
