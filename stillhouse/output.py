"""How every command prints: its ``--json`` answer on stdout (:func:`print_json`), or its
human answer (a ``show_*`` below: tables on stdout, summaries on stderr), progress bars on
stderr; and the one place that renders untrusted text (ids, documents, teacher answers,
error details that quote them) for a terminal.

A command in ``stillhouse.commands`` returns data and prints nothing but progress; the CLI
hands that data to :func:`print_json` or to its ``show_*`` here, so every command prints
the same way and a new one has one place to put its rendering.

Rich reads ``[...]`` as markup: an id like ``[/x]`` would crash the command that prints it
(after its work is done, so its ``--json`` summary was lost too), and ``[red]`` would restyle
the output. A document's escape sequences (``ESC [ 2 J`` clears the screen, OSC 8 writes
links, OSC 52 writes the clipboard) and bidirectional overrides (U+202E reverses what
follows) would reach the terminal raw. Everything untrusted goes through :func:`plain` (for
``console.print(..., markup=False)``) or :func:`cell` (a table cell, never parsed as markup):
control, format and bidi characters are written as visible escapes (``\\x1b``, ``\\u202e``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

__all__ = [
    "cell",
    "pct",
    "plain",
    "print_json",
    "progress_bar",
    "show_advice",
    "show_backfill",
    "show_batches",
    "show_calibrated",
    "show_calibration",
    "show_dataset",
    "show_dataset_diff",
    "show_datasets",
    "show_demo",
    "show_estimate",
    "show_export",
    "show_load",
    "show_report",
    "show_requeue",
    "show_review_decision",
    "show_review_progress",
    "show_review_queue",
    "show_review_sample",
    "show_review_suspects",
    "show_review_tasks",
    "show_routed",
    "show_run",
    "show_runs",
    "show_runs_compare",
    "show_slices",
    "show_status",
    "show_task_decision",
    "show_train",
    "table_console",
]

# C0 controls but tab and newline, DEL, C1 controls, the bidi embeddings, overrides and
# isolates, the directional marks, zero-width characters and the BOM, and lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_UNSAFE_IN_LINE = re.compile(_UNSAFE.pattern[:-1] + "\t\n]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    if code == 0x0A:
        return "\\n"
    if code == 0x09:
        return "\\t"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object, *, one_line: bool = False, limit: int | None = None) -> str:
    """``value`` as text that is safe to print (with ``markup=False``): every control,
    format or bidi character escaped; with ``one_line``, newlines and tabs too."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return (_UNSAFE_IN_LINE if one_line else _UNSAFE).sub(_escape, text)


def cell(value: object, *, limit: int | None = None) -> Text:
    """A table cell for untrusted text: escaped, on one line, and never read as markup."""
    return Text(plain(value, one_line=True, limit=limit))


def table_console() -> Console:
    """Where tables go (stdout): as wide as the terminal, and 160 columns when piped or
    redirected (rich would cut every table to 80 there); ``COLUMNS`` still decides."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def print_json(data: Any) -> None:
    """A command's ``--json`` answer, on stdout (values JSON cannot hold become strings)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def progress_bar(console: Console) -> Progress:
    """A progress bar on ``console``, shown only on a terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal (``93.4 %``), or ``n/a``."""
    return "n/a" if value is None else f"{100 * value:.1f} %"


# What each command prints for a person. Each takes the data its command returned (the same
# dict ``--json`` prints) and the stderr console.


def show_load(result: dict[str, Any], console: Console) -> None:
    """`backfill`'s load: rows in, new, repeated, bad (with the first bad lines)."""
    seconds = max(result["load_seconds"], 0.01)
    console.print(
        f"loaded {result['rows']} rows in {seconds:.1f} s ({result['rows'] / seconds:,.0f}/s): "
        f"{result['inserted']} new, {result['already_loaded']} already loaded, "
        f"{result['duplicate_content']} duplicate content, {result['bad_rows']} bad"
    )
    for bad in result["bad_examples"]:
        console.print(
            f"  line {bad['line']}: {plain(bad['reason'])}", markup=False, highlight=False
        )
    if result["bad_rows"] > len(result["bad_examples"]):
        console.print(f"  … and {result['bad_rows'] - len(result['bad_examples'])} more bad rows")
    if result["rejects"]:
        console.print(
            f"bad rows written to {plain(result['rejects'])}", markup=False, highlight=False
        )
    for warning in result["warnings"]:
        console.print(f"warning: {plain(warning)}", style="bold yellow", markup=False)
    if result["changed_documents"]:
        examples = ", ".join(plain(i, one_line=True) for i in result["changed_examples"])
        console.print(
            f"{result['changed_documents']} documents changed under an existing id and were "
            f"kept as first loaded (e.g. {examples})",
            markup=False,
            highlight=False,
        )


def show_batches(rows: list[dict[str, Any]], console: Console) -> None:
    """`batches`: one line per provider batch, newest first."""
    if not rows:
        console.print("no batches yet: `stillhouse backfill SOURCE --spec S --mode batch`")
        return
    for r in rows:
        states = r["items_by_state"]
        progress = "" if r["step"] == "done" else f" ({states.get('waiting', 0)} items waiting)"
        console.print(
            f"{r['id']:>5}  {r['spec']:<16} {r['provider']:<9} {r['step']:<11} "
            f"{(r['status'] or '-'):<11} {r['items']} items, {r['requests']} requests: "
            f"{r['succeeded']} ok, {r['failed']} failed, {r['expired']} expired{progress}; "
            f"${r['spent_usd']:.4f} spent, ${r['reserved_usd']:.4f} reserved"
            + (f"; {plain(r['error'])}" if r["error"] else ""),
            markup=False,
            highlight=False,
        )


def show_backfill(result: dict[str, Any], console: Console) -> None:
    """`backfill`: the load, what labeling did, what is unfinished and why, the accuracy."""
    show_load(result, console)
    if "labels" not in result:  # --load-only
        return
    if result.get("mode") == "batch":
        console.print(
            f"batches: {result['batches_submitted']} submitted ({result['requests_submitted']} "
            f"requests, {result['joined_open_batches']} items joined an open batch, "
            f"{result['answered_from_cache']} answered from the cache), "
            f"{result['results_received']} results in, {result['open_batches']} still open"
            + (
                ""
                if "waiting" in result
                else ": `stillhouse batches poll` follows them (or `worker --beat`)"
            ),
            markup=False,
            highlight=False,
        )
        if result.get("budget_error"):
            console.print(plain(result["budget_error"]), markup=False, highlight=False)
    if "teacher_calls" in result:
        console.print(
            f"labeled {result['labeled']} items: {result['teacher_calls']} teacher "
            f"calls, {result['cache_hits']} cache hits, {result['failed']} failed, "
            f"{result['waiting']} waiting to retry"
        )
    if result.get("failed") or result.get("waiting"):
        console.print(
            f"last item error: {plain(result['last_error'])}", markup=False, highlight=False
        )
        console.print(
            f"not finished: {result.get('waiting', 0)} items wait to retry (they stay pending "
            f"and keep their attempts: run the same command again once the teacher answers), "
            f"{result.get('failed', 0)} failed (`stillhouse requeue --spec SPEC` puts failed "
            f"items back)",
            markup=False,
            highlight=False,
        )
    unchecked = result["accepted"] - result["accepted_checked"]
    console.print(
        f"teacher accuracy vs known-good: {pct(result['teacher_accuracy'])}; "
        f"accepted labels: {result['accepted']} of {result['labels']}: "
        f"{result['accepted_checked']} checked against a known-good record "
        f"({pct(result['accepted_accuracy'])} agree)"
        + (
            f", {unchecked} without one (withheld or none: accuracy unknown, see "
            f"`stillhouse report`)"
            if unchecked
            else ""
        )
        + (
            f"; {result['needs_review']} waiting for review (`stillhouse review list`)"
            if result["needs_review"]
            else ""
        )
    )


def show_advice(result: dict[str, Any], console: Console) -> None:
    """`advise`: the recommendation, its reasons, the monthly costs and what is missing."""
    money = (
        "-"
        if result["monthly_cost_teacher_usd"] is None
        else (f"${result['monthly_cost_teacher_usd']:,.2f}")
    )
    student = (
        "-"
        if result["monthly_cost_student_usd"] is None
        else (f"${result['monthly_cost_student_usd']:,.2f}")
    )
    console.print(
        f"{result['spec']} at {result['volume_per_day']:,.0f} a day: "
        f"{result['recommendation'].upper().replace('_', ' ')}",
        markup=False,
        highlight=False,
    )
    console.print(
        f"  a month: teacher only {money}; student plus fallback {student} "
        f"(fixed ${result['monthly_fixed_student_usd']:,.2f})",
        markup=False,
        highlight=False,
    )
    for reason in result["reasons"]:
        console.print(f"  - {reason}", markup=False, highlight=False)
    for need in result["missing"]:
        console.print(f"  needs: {need}", markup=False, highlight=False)
    task = result["task"]
    console.print(
        f"  task: narrowness {task['narrowness']}, measurability {task['measurability']}, "
        f"volume {task['volume']} ({task['classes']} classes, output entropy "
        f"{task['output_entropy_bits']} bits, student loss {task['student_loss']})",
        markup=False,
        highlight=False,
    )


def show_estimate(result: dict[str, Any], console: Console) -> None:
    """`estimate` (and `backfill --dry-run`): calls, tokens, cost, time, against the budget."""
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
    batch = result.get("batch") or {}
    if batch:
        hours = batch["seconds"] / 3600
        console.print(
            f"live: ${result['cost_usd']:.4f} in about {result['seconds']:.0f} s; batch "
            f"(--mode batch): ${batch['cost_usd']:.4f} (saves ${batch['saving_usd']:.4f}) in "
            f"{batch['batches']} batches, about "
            + (f"{hours:.1f} h" if hours >= 1 else f"{batch['seconds']:.0f} s"),
            markup=False,
            highlight=False,
        )
    console.print(
        f"already labeled: {100 * result['already_done_share']:.0f} % of the sample; "
        f"cached answers: {100 * result['cached_share']:.0f} %"
    )
    for note in result["assumptions"]:
        console.print(f"  assumed: {note}", markup=False, highlight=False)


def show_requeue(result: dict[str, Any], console: Console) -> None:
    """`requeue`: how many items went back to pending, and how they get labeled."""
    rejected = result.get("rejected", 0)
    console.print(
        f"{result['failed'] + rejected} items of {result['spec']} back to pending for "
        f"v{result['version']} ({result['failed']} failed, {rejected} rejected under an "
        f"earlier version): `stillhouse backfill --spec SPEC` (no source) labels them; "
        f"distributed, the dispatcher queues them for the workers",
        markup=False,
        highlight=False,
    )


def show_status(result: dict[str, Any], console: Console) -> None:
    """`status`: a table of counts by state and verdict, calls, spend and rate."""
    spec = result.get("spec")
    table = Table(title=f"stillhouse status{f' — {spec}' if spec else ''}")
    table.add_column("what")
    table.add_column("count", justify="right")
    counts = {
        **result["by_state"],
        **{f"verdict {k}": v for k, v in result["by_verdict"].items()},
    }
    for name, count in counts.items():
        table.add_row(cell(name), str(count))
    table.add_row("items", str(result["items"]))
    for name, count in result["calls"].items():
        table.add_row(f"calls {name}", str(count))
    table.add_row("spend (USD)", f"{result['spend_usd']:.4f}")
    rate = result["labeled_per_s"]
    table.add_row("labeled / s", "n/a" if rate is None else str(rate))
    table_console().print(table)
    if result["last_error"]:
        console.print(
            f"last error on an unfinished item: {plain(result['last_error'])}",
            markup=False,
            highlight=False,
        )


def show_report(result: dict[str, Any], console: Console) -> None:
    """`report`: what the checks kept, overall and by slice, and the withheld share."""
    table = Table(title=f"{result['spec']} v{result['version']}: what the checks kept")
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
    calibrated = result.get("calibrated")
    if calibrated is not None:
        show_calibrated(calibrated, console)


def show_calibrated(calibrated: dict[str, Any], console: Console) -> None:
    """`report` under checks.target_accuracy: the threshold in use, the estimate for labels
    without a record, and the same estimate against the measurement on the withheld share."""
    fit = calibrated["calibration"]
    if fit is None:
        console.print(
            f"target accuracy {pct(calibrated['target'])}: no calibration yet (too few labels "
            f"with a known-good record); items without one wait for it"
        )
        return
    classes = ", ".join(
        f"{name} {'none' if t is None else f'{t:.3f}'}" for name, t in fit["classes"].items()
    )
    overall = "none reaches it" if fit["threshold"] is None else f"{fit['threshold']:.3f}"
    console.print(
        f"target accuracy {pct(calibrated['target'])}: calibration {fit['id']} on "
        f"{fit['items']} labels with a record{'' if fit['final'] else ' (still learning)'}: "
        f"confidence ≥ {overall}" + (f" (per class: {classes})" if classes else "")
    )
    live, held = calibrated["without_record"], calibrated["withheld"]

    def estimate(part: dict[str, Any]) -> str:
        low, high = part["estimated_interval"]
        return (
            f"{pct(part['estimated_accuracy'])} estimated ({pct(low)} to {pct(high)}) at "
            f"{pct(part['coverage'])} coverage"
        )

    console.print(
        f"labels without a record the checks saw ({live['labels']}): {live['accepted']} "
        f"accepted, {estimate(live)}"
    )
    if held["labels"] and held["measured_accuracy"] is not None:
        low, high = held["measured_interval"]
        console.print(
            f"  check on the withheld share ({held['labels']}): {estimate(held)}; measured "
            f"{pct(held['measured_accuracy'])} ({pct(low)} to {pct(high)})"
        )


def show_review_queue(title: str, entries: Sequence[dict[str, Any]], console: Console) -> None:
    """`review list`: the waiting labels, one row each, every cell escaped."""
    table = Table(title=f"{title}: waiting for review ({len(entries)})")
    for column in ("item", "teacher", "known-good", "confidence", "text"):
        table.add_column(column)
    for e in entries:
        confidence = e["confidence"]
        table.add_row(
            cell(e["external_id"]),
            cell(json.dumps(e["output"], ensure_ascii=False)),
            cell(json.dumps(e["known_good"], ensure_ascii=False)),
            "n/a" if confidence is None else f"{confidence:.2f}",
            cell(e["text"].replace("\n", " "), limit=80),
        )
    table_console().print(table)


def show_review_decision(result: dict[str, Any], console: Console) -> None:
    """`review resolve`: how many labels were (or would be) decided, and which."""
    decided = result["decided"]
    shown = ", ".join(plain(i, one_line=True) for i in decided[:10])
    more = f" and {len(decided) - 10} more" if len(decided) > 10 else ""
    console.print(
        f"{'would decide' if result['dry_run'] else 'decided'} {len(decided)} labels: "
        f"{result['verdict']}" + (f" ({shown}{more})" if decided else ""),
        markup=False,
        highlight=False,
    )


def show_review_tasks(
    title: str, reason: str, entries: Sequence[dict[str, Any]], console: Console
) -> None:
    """`review list --reason suspect_record|sample`: the open tasks, highest rank first."""
    suspect = reason == "suspect_record"
    table = Table(title=f"{title}: open ({len(entries)})")
    columns = (
        ("item", "record", "suggested", "P(record wrong)", "teacher conf.", "text")
        if suspect
        else ("item", "teacher", "confidence", "stratum", "text")
    )
    for column in columns:
        table.add_column(column)
    for e in entries:
        text = cell(e["text"].replace("\n", " "), limit=80)
        confidence = "n/a" if e["confidence"] is None else f"{e['confidence']:.2f}"
        if suspect:
            table.add_row(
                cell(e["external_id"]),
                cell(json.dumps(e["record"], ensure_ascii=False)),
                cell(json.dumps(e["proposed"], ensure_ascii=False)),
                f"{e['rank']:.3f}",
                confidence,
                text,
            )
        else:
            shown = {k: v for k, v in (e["output"] or {}).items() if k != "confidence"}
            table.add_row(
                cell(e["external_id"]),
                cell(json.dumps(shown, ensure_ascii=False)),
                confidence,
                cell(e["stratum"] or ""),
                text,
            )
    table_console().print(table)


def show_review_progress(progress: dict[str, Any], console: Console) -> None:
    """Where a sample review stands, and how many more decisions would buy what."""
    line = f"{progress['decided']} decided, {progress['waiting']} waiting"
    if progress["decided"]:
        lo, hi = progress["interval"]
        line += (
            f"; the teacher was right on {progress['teacher_right']} "
            f"({progress['accuracy']:.1%}, 95 % interval {lo:.1%} to {hi:.1%})"
        )
    more = progress["more_for_2_points"]
    line += (
        f"; about {more} more decisions would narrow that to ±2 points"
        if more
        else "; that interval is within ±2 points"
    )
    if progress["more_for_calibration"]:
        line += (
            f"; {progress['more_for_calibration']} more records before a calibration "
            f"(it has {progress['records']}; `stillhouse calibrate` fits one)"
        )
    else:
        line += f"; {progress['records']} labels have a record: `stillhouse calibrate` can fit"
    console.print(line, markup=False, highlight=False)


def show_review_suspects(result: dict[str, Any], console: Console) -> None:
    """`review suspects`: how many records look wrong, and how many went to the queue."""
    console.print(
        f"{result['suspects']} of {result['records']} known-good records of "
        f"{plain(result['spec'], one_line=True)} v{result['version']} look wrong (the teacher "
        f"and an out-of-fold model agree against them); {result['queued']} newly queued: "
        f"`stillhouse review list --reason suspect_record --spec {result['spec']}`",
        markup=False,
        highlight=False,
    )


def show_review_sample(result: dict[str, Any], console: Console) -> None:
    """`review sample`: what was drawn, from where, and where the review stands."""
    console.print(
        f"queued {result['queued']} of {result['population']} labels without a record of "
        f"{plain(result['spec'], one_line=True)} v{result['version']} for review, from "
        f"{len(result['strata'])} strata (class x confidence band; rare classes "
        f"over-represented): `stillhouse review list --reason sample --spec {result['spec']}`",
        markup=False,
        highlight=False,
    )
    show_review_progress(result["progress"], console)


def show_task_decision(result: dict[str, Any], console: Console) -> None:
    """`review resolve --reason …`: what each decision did to the record and the label."""
    decided = result["decided"]
    verb = "would decide" if result["dry_run"] else "decided"
    kinds: dict[str, int] = {}
    for d in decided:
        kinds[d["decision"]] = kinds.get(d["decision"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"
    shown = ", ".join(plain(d["item"], one_line=True) for d in decided[:10])
    more = f" and {len(decided) - 10} more" if len(decided) > 10 else ""
    console.print(
        f"{verb} {len(decided)} {result['reason']} reviews: {summary}"
        + (f" ({shown}{more})" if decided else ""),
        markup=False,
        highlight=False,
    )
    if "progress" in result:
        show_review_progress(result["progress"], console)


def show_train(report: dict[str, Any], console: Console) -> None:
    """`train`: the dataset it learned from, the student against the teacher on the held-out
    members, and where the run went."""
    created = report.get("created_dataset")
    if created:
        console.print(
            f"froze dataset {plain(created['name'], one_line=True)} from "
            f"{plain(created['spec'], one_line=True)} v{created['version']}: "
            f"{created['rows']} labels, content hash {created['content_hash'][:16]} (labeling "
            f"can go on; `stillhouse train --dataset NAME` trains on it again)",
            markup=False,
            highlight=False,
        )
    dataset = report.get("dataset") or {}
    console.print(
        f"trained on {report['n_train']} accepted labels of the train split of dataset "
        f"{plain(dataset.get('name', '?'), one_line=True)}; held out {report['n_val']} "
        f"(its val and test splits, by a stable hash of the id: an item keeps its side as "
        f"the data grows)",
        markup=False,
        highlight=False,
    )
    if "student_accuracy" not in report:  # a ranking (or other non-classifier) student
        console.print(
            f"student on the {report.get('evaluated_on')} split: "
            f"{_headline(report.get('headline'))}; trained in "
            f"{report['train_seconds']:.1f} s; written to {report['out_dir']}",
            markup=False,
            highlight=False,
        )
        _show_flags(report, console)
        return
    console.print(
        f"student on {report['n_val']} held-out items: "
        f"{pct(report['student_accuracy'])} vs known-good "
        f"(teacher on the same items: {pct(report['teacher_accuracy'])}); "
        f"trained in {report['train_seconds']:.1f} s; written to {report['out_dir']}",
        markup=False,
        highlight=False,
    )
    show_slices(report, console)


def show_slices(report: dict[str, Any], console: Console) -> None:
    """`train`: the student by slice on the test split, its latency, and what is flagged."""
    slices = report.get("slices") or {}
    if slices:
        table = Table(title=f"student by slice ({report.get('evaluated_on', 'test')} split)")
        for column in ("slice", "items", "student", "95 % interval", "teacher", "retention"):
            table.add_column(column)
        flagged = {f["slice"] for f in report.get("flagged", [])}
        for name, scores in [("overall", report["overall"]), *slices.items()]:
            interval = scores["student_interval"]
            table.add_row(
                cell(name) + (" (flagged)" if name in flagged else ""),
                str(scores["with_record"]),
                pct(scores["student_accuracy"]),
                "n/a" if interval is None else f"{pct(interval[0])} to {pct(interval[1])}",
                pct(scores["teacher_accuracy"]),
                "n/a" if scores["retention"] is None else f"{scores['retention']:.3f}",
            )
        console.print(table)  # beside the summary (stdout is --json's)
    latency = report.get("latency_ms") or {}
    if latency.get("p50") is not None:
        console.print(
            f"latency on this CPU: p50 {latency['p50']:.3f} ms, p99 {latency['p99']:.3f} ms one "
            f"item at a time; {latency['batched_items_per_s']:,.0f} items/s batched; "
            f"{report.get('size_bytes', 0) / 1e6:.1f} MB of weights",
            markup=False,
            highlight=False,
        )
    router = report.get("router")
    if router and router.get("test", {}).get("items"):
        test = router["test"]
        console.print(
            f"with the teacher as fallback (router.json; thresholds from the val split): "
            f"{pct(test['accuracy'])} on the test split with {pct(test['teacher_share'])} of "
            f"inputs sent to the teacher (student alone {pct(test['student_accuracy'])}, "
            f"teacher alone {pct(test['teacher_accuracy'])}; target "
            f"{pct(router['target_accuracy'])})",
            markup=False,
            highlight=False,
        )
    for flag in report.get("flagged", []):
        console.print(
            f"flagged: {plain(flag['slice'], one_line=True)}: {flag['why']}",
            markup=False,
            highlight=False,
        )


def show_demo(labeled: dict[str, Any], report: dict[str, Any]) -> None:
    """`demo`: the three lines a newcomer reads, on stdout."""
    run = {k: labeled.get(k, 0) for k in ("labeled", "teacher_calls", "cache_hits")}
    print(
        f"{labeled['labels']} BBC articles labeled; this run: {run['labeled']} new labels, "
        f"{run['teacher_calls']} teacher calls, {run['cache_hits']} cache hits, "
        f"{labeled['seconds']:.1f} s"
    )
    print(
        f"teacher accuracy vs known-good: {pct(labeled['teacher_accuracy'])} "
        f"(all {labeled['labels']} labels); accepted labels: {labeled['accepted']}"
    )
    print(
        f"student accuracy vs known-good: {pct(report['student_accuracy'])} on "
        f"{report['n_val']} held-out articles (teacher on the same: "
        f"{pct(report['teacher_accuracy'])})"
    )


def show_dataset(info: dict[str, Any], console: Console) -> None:
    """`dataset create` / `dataset show`: its hash and versions, then rows per split and
    class."""
    counts = info["counts"]
    console.print(
        f"dataset {plain(info['name'], one_line=True)}: {info['rows']} labels of "
        f"{plain(info['spec'], one_line=True)} v{info['version']} (teacher "
        f"{plain(', '.join(info['teacher_models']) or 'unknown', one_line=True)}); "
        f"content hash {info['content_hash']}",
        markup=False,
        highlight=False,
    )
    table = Table(title="rows per split and class")
    table.add_column("split")
    table.add_column("rows", justify="right")
    table.add_column("classes")
    for split, rows in counts["splits"].items():
        classes = counts.get("classes", {}).get(split, {})
        table.add_row(split, str(rows), cell(", ".join(f"{k} {v}" for k, v in classes.items())))
    table_console().print(table)


def show_datasets(found: Sequence[dict[str, Any]], console: Console) -> None:
    """`dataset list`: one row per dataset."""
    table = Table(title=f"datasets ({len(found)})")
    for column in ("name", "spec", "rows", "train/val/test", "content hash", "created"):
        table.add_column(column)
    for d in found:
        splits = "/".join(str(d["splits"].get(s, 0)) for s in ("train", "val", "test"))
        table.add_row(
            cell(d["name"]),
            cell(f"{d['spec']} v{d['version']}"),
            str(d["rows"]),
            splits,
            d["content_hash"][:16],
            cell(d["created_at"] or ""),
        )
    table_console().print(table)


def show_dataset_diff(diff: dict[str, Any], console: Console) -> None:
    """`dataset diff`: counts of added, removed and relabeled members, with a few ids."""
    console.print(
        f"{plain(diff['from']['name'], one_line=True)} ({diff['from']['rows']} rows) → "
        f"{plain(diff['to']['name'], one_line=True)} ({diff['to']['rows']} rows)",
        markup=False,
        highlight=False,
    )
    for what in ("added", "removed", "relabeled"):
        entry = diff[what]
        ids = ", ".join(plain(i, one_line=True) for i in entry["examples"][:5])
        console.print(
            f"  {what}: {entry['count']}" + (f" (e.g. {ids})" if ids else ""),
            markup=False,
            highlight=False,
        )


def show_export(manifest: dict[str, Any], console: Console) -> None:
    """`export`: where the files went and how many rows each holds."""
    files = ", ".join(f"{v['path']} {v['rows']}" for v in manifest["files"].values())
    console.print(
        f"exported {plain(manifest['dataset'], one_line=True)} ({manifest['content_hash'][:16]}) "
        f"to {plain(manifest['out'])} in {manifest['seconds']:.1f} s: {files}, manifest.json, "
        f"README.md",
        markup=False,
        highlight=False,
    )


def show_calibration(result: dict[str, Any], console: Console) -> None:
    """`calibrate`: the curve, the threshold for the target, the estimate beside the
    measurement on the withheld share."""
    table = Table(
        title=f"{result['spec']} v{result['version']}: coverage against accuracy "
        f"({result['calibration_items']} labels with a record the checks saw)"
    )
    for column in ("confidence ≥", "coverage", "accuracy", "95 % interval"):
        table.add_column(column, justify="right")
    for p in result["curve"]:
        table.add_row(
            f"{p['threshold']:.3f}",
            pct(p["coverage"]),
            pct(p["accuracy"]),
            f"{pct(p['lower'])} to {pct(p['upper'])}",
        )
    table_console().print(table)
    chosen, target = result["threshold"], result["target"]
    if target is None:
        return
    if chosen is None:
        console.print(
            f"no confidence threshold reaches {pct(target)} at the 95 % lower bound on these "
            f"{result['calibration_items']} labels (all of them: {pct(result['raw_accuracy'])}); "
            f"more labels with records, or a lower target"
        )
        return
    console.print(
        f"target {pct(target)}: confidence ≥ {chosen['threshold']:.3f} keeps "
        f"{pct(chosen['coverage'])} at {pct(chosen['accuracy'])} (at least {pct(chosen['lower'])}"
        f" with 95 % confidence; all labels: {pct(result['raw_accuracy'])})"
    )
    held = result["withheld"]
    if "estimated" in held:
        est, got = held["estimated"], held["measured"]
        console.print(
            f"withheld share ({held['items']} records the checks never saw): estimated "
            f"{pct(est['accuracy'])} ({pct(est['lower'])} to {pct(est['upper'])}) at "
            f"{pct(est['coverage'])} coverage; measured {pct(got['accuracy'])} "
            f"({pct(got['interval'][0])} to {pct(got['interval'][1])}) at "
            f"{pct(got['coverage'])} (raw teacher {pct(held['raw_accuracy'])})"
        )


def _headline(headline: dict[str, Any] | None) -> str:
    if not headline:
        return "n/a"
    ratio = headline.get("ratio")
    return (
        f"{headline.get('metric')} {pct(headline.get('student'))} (teacher "
        f"{pct(headline.get('teacher'))}{'' if ratio is None else f', ratio {ratio:.3f}'})"
    )


def _show_flags(report: dict[str, Any], console: Console) -> None:
    for flag in report.get("flagged") or []:
        console.print(f"flagged {flag['slice']}: {flag.get('why')}", markup=False)


def show_runs(runs: Sequence[dict[str, Any]], console: Console) -> None:
    """`runs list`: one row a run, newest first."""
    table = Table(title=f"student runs ({len(runs)})")
    for column in ("run", "kind", "state", "headline", "flagged", "p99 ms", "created"):
        table.add_column(column)
    for run in runs:
        latency = run.get("latency_ms") or {}
        table.add_row(
            cell(run["name"]),
            cell(run["kind"]),
            cell(run["state"]),
            cell(_headline(run.get("headline"))),
            "" if run.get("flagged") is None else str(run["flagged"]),
            "" if latency.get("p99") is None else f"{latency['p99']:.3f}",
            cell((run.get("created_at") or "")[:19]),
        )
    console.print(table)


def show_run(info: dict[str, Any], console: Console) -> None:
    """`runs show`: the run, how it ended, its slices and files."""
    lines = [
        f"run {info['name']} ({info['kind']} student for {info['spec']}): {info['state']}",
        f"folder {info['out_dir']}; files: {', '.join(info.get('files') or []) or 'none yet'}",
        f"created {info.get('created_at')}, started {info.get('started_at')} on "
        f"{info.get('host')} (pid {info.get('pid')}), ended {info.get('finished_at')}",
    ]
    if info.get("error"):
        lines.append(f"failed: {info['error']}")
    if info.get("headline"):
        lines.append(f"headline: {_headline(info['headline'])}")
    for line in lines:
        console.print(line, markup=False, highlight=False)
    summary = info.get("summary") or {}
    if summary.get("slices") and summary.get("kind") in ("bag_of_ngrams", "minilm"):
        show_slices(summary, console)
    else:
        _show_flags(summary, console)


def show_runs_compare(compared: dict[str, Any], console: Console) -> None:
    """`runs compare A B`: per slice, A's and B's figure and the difference."""
    pairs = zip("AB", (compared["a"], compared["b"]), compared["headline"], strict=True)
    for side, name, headline in pairs:
        console.print(f"{side}: {name}: {_headline(headline)}", markup=False, highlight=False)
    table = Table(title=f"{compared['metric']} by slice (B minus A)")
    for column in ("slice", "A", "A interval", "B", "B interval", "delta"):
        table.add_column(column)

    def span(pair: Sequence[float] | None) -> str:
        return "n/a" if not pair else f"{pct(pair[0])} to {pct(pair[1])}"

    flagged_a, flagged_b = (set(names) for names in compared["flagged"])
    for row in compared["slices"]:
        mark_a = " (flagged)" if row["slice"] in flagged_a else ""
        mark_b = " (flagged)" if row["slice"] in flagged_b else ""
        delta = row["delta"]
        table.add_row(
            cell(row["slice"]),
            pct(row["a"]) + mark_a,
            span(row["a_interval"]),
            pct(row["b"]) + mark_b,
            span(row["b_interval"]),
            "n/a" if delta is None else f"{delta * 100:+.1f} pts",
        )
    console.print(table)


def show_routed(answers: Sequence[dict[str, Any]], console: Console) -> None:
    """`route predict`: each input's answer, who gave it and why."""
    table = Table(title=f"answers ({len(answers)})")
    for column in ("#", "label", "confidence", "answered by", "student", "why", "note"):
        table.add_column(column)
    for index, answer in enumerate(answers):
        confidence = answer.get("confidence")
        student = answer.get("student_label")
        if student is not None and answer.get("student_confidence") is not None:
            student = f"{student} ({answer['student_confidence']:.2f})"
        table.add_row(
            str(index),
            cell(answer.get("label") or ""),
            "" if confidence is None else f"{confidence:.3f}",
            cell(answer["answered_by"]),
            cell(student or ""),
            cell(answer.get("reason") or ""),
            cell(answer.get("error") or answer.get("fallback_error") or ""),
        )
    console.print(table)
