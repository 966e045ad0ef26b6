"""What a run leaves beside its weights: a model card in Markdown and plots as PNG.

Both read only the run's report (``metrics.json``), whatever the student's kind: the
headline figure, ``overall``, ``slices``, ``flagged``, ``latency_ms``, ``size_bytes``,
``history`` (the learning curve) and, for a classifier, ``confusion``. A slice's figure is
``headline["slice_key"]`` of its scores (the student's accuracy for a classifier), with its
interval under the key's ``_interval`` twin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_FILE",
    "PLOT_FILES",
    "interval_key",
    "slice_figures",
    "write_artifacts",
    "write_card",
    "write_plots",
]

CARD_FILE = "MODEL_CARD.md"
PLOT_FILES = {
    "confusion": "confusion.png",
    "slices": "slices.png",
    "learning_curve": "learning_curve.png",
    "routing": "routing.png",
}
FEW_ITEMS = 30  # a slice smaller than this has an interval too wide to act on alone


def slice_figures(report: Mapping[str, Any]) -> list[tuple[str, float, list[float] | None, int]]:
    """Per slice: its name, the student's figure, its interval and its item count."""
    key = str(report.get("headline", {}).get("slice_key", "student_accuracy"))
    out = []
    for name, scores in sorted(report.get("slices", {}).items()):
        value = scores.get(key)
        if value is None:
            continue
        interval = scores.get(interval_key(key))
        size = scores.get("with_record") or scores.get("items") or 0
        out.append((name, float(value), interval, int(size)))
    return out


def interval_key(key: str) -> str:
    """Where a slice figure's interval is: ``student_interval`` beside a classifier's
    ``student_accuracy`` (metrics.json's first contract), ``KEY_interval`` for the others."""
    return "student_interval" if key == "student_accuracy" else f"{key}_interval"


def write_artifacts(
    report: Mapping[str, Any], out_dir: Path, about: Mapping[str, Any]
) -> list[str]:
    """The card and the plots for one run; the names of the files written."""
    written = [write_card(report, out_dir, about)]
    written += write_plots(report, out_dir)
    return written


def write_card(report: Mapping[str, Any], out_dir: Path, about: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: what the student is, what it learned from, how it did by slice,
    what was flagged, how fast and big it is, what it is for and where it falls short.
    ``about`` names the run, spec (name, version, description) and dataset."""
    lines = _card_head(report, about)
    lines += _card_slices(report)
    lines += _card_flags(report)
    lines += _card_cost(report)
    lines += _card_router(report)
    lines += _card_use(report, about)
    (out_dir / CARD_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CARD_FILE


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1%}" if abs(value) <= 1 else f"{value:.3g}"


def _interval(pair: Sequence[float] | None) -> str:
    return "-" if not pair else f"{pair[0]:.1%} to {pair[1]:.1%}"


def _card_head(report: Mapping[str, Any], about: Mapping[str, Any]) -> list[str]:
    dataset = report.get("dataset") or {}
    headline = report.get("headline") or {}
    lines = [
        f"# {about.get('run', 'student')}: {report.get('kind', 'student')} student for "
        f"{about.get('spec', '?')} v{about.get('version', '?')}",
        "",
        str(about.get("description") or ""),
        "",
        "| | |",
        "| --- | --- |",
        f"| kind | {report.get('kind')} |",
        f"| dataset | {dataset.get('name', '-')} |",
        f"| dataset content hash | `{dataset.get('content_hash', '-')}` |",
        f"| trained on | {report.get('n_train')} accepted teacher labels (train split) |",
        f"| measured on | {report.get('evaluated_on')} split |",
    ]
    if headline:
        lines.append(
            f"| {headline.get('metric')} | student {_pct(headline.get('student'))}, teacher "
            f"{_pct(headline.get('teacher'))}, ratio {_pct(headline.get('ratio'))} |"
        )
    return [*lines, ""]


def _card_slices(report: Mapping[str, Any]) -> list[str]:
    figures = slice_figures(report)
    if not figures:
        return []
    key = (report.get("headline") or {}).get("slice_key", "student_accuracy")
    lines = [
        "## By slice",
        "",
        f"The student's {key.removeprefix('student_')} on each slice of the "
        f"{report.get('evaluated_on')} split, with a 95 % interval from the slice's size.",
        "",
        "| slice | items | student | interval |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [f"| {n} | {size} | {_pct(v)} | {_interval(i)} |" for n, v, i, size in figures]
    return [*lines, ""]


def _card_flags(report: Mapping[str, Any]) -> list[str]:
    flagged = report.get("flagged") or []
    lines = ["## Flagged", ""]
    if not flagged:
        margin = report.get("slice_margin")
        return [*lines, f"No slice fell more than {_pct(margin)} below the overall figure.", ""]
    lines += [f"- **{flag['slice']}**: {flag.get('why', '')}" for flag in flagged]
    return [*lines, ""]


def _card_cost(report: Mapping[str, Any]) -> list[str]:
    latency = report.get("latency_ms") or {}
    return [
        "## Latency and size (CPU)",
        "",
        f"- one input at a time: p50 {latency.get('p50', '-')} ms, p99 "
        f"{latency.get('p99', '-')} ms",
        f"- batched: {latency.get('batched_items_per_s', '-')} inputs/s",
        f"- weights: {report.get('size_bytes', 0) / 1e6:.2f} MB",
        "",
    ]


def _card_router(report: Mapping[str, Any]) -> list[str]:
    router = report.get("router")
    if not router:
        return []
    test, policy = router["test"], router["policy"]
    lines = [
        "## Serving with the teacher as fallback",
        "",
        f"Calibrated on the val split (temperature {policy['temperature']}, calibration error "
        f"{_pct(router['ece_before'])} before, {_pct(router['ece_after'])} after); target "
        f"{_pct(router['target_accuracy'])} ({router['target_from']}); confidence threshold "
        f"{policy['threshold']}"
        + (
            f", per class {', '.join(f'{c} {t}' for c, t in policy['class_thresholds'].items())}"
            if policy["class_thresholds"]
            else ""
        )
        + ".",
        "",
        f"On the test split ({test.get('items', 0)} items, against {router['against']}): routed "
        f"accuracy {_pct(test.get('accuracy'))} {_interval(test.get('accuracy_interval'))}, "
        f"student alone {_pct(test.get('student_accuracy'))}, teacher alone "
        f"{_pct(test.get('teacher_accuracy'))}, {_pct(test.get('teacher_share'))} of inputs "
        "sent to the teacher.",
        "",
        "| class | items | routed recall | student recall | sent to the teacher |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cls, row in (test.get("per_class") or {}).items():
        lines.append(
            f"| {cls} | {row['items']} | {_pct(row['recall'])} "
            f"{_interval(row['recall_interval'])} | {_pct(row['student_recall'])} | "
            f"{_pct(row['teacher_share'])} |"
        )
    return [*lines, ""]


def _card_use(report: Mapping[str, Any], about: Mapping[str, Any]) -> list[str]:
    small = [name for name, _, _, size in slice_figures(report) if size < FEW_ITEMS]
    limits = [
        "- It imitates the teacher: where the teacher is wrong, it learned to be wrong too. "
        "Its figures against known-good records hold only where records exist.",
        "- It has seen only inputs like the dataset's; new kinds of input (another language, "
        "a new product line) need new labels before its figures apply.",
    ]
    if report.get("flagged"):
        limits.append(
            "- The flagged slices above are where it should not answer alone: send them to "
            "the teacher (the router's fallback)."
        )
    if small:
        limits.append(f"- Too few items to judge alone (< {FEW_ITEMS}): {', '.join(small)}.")
    return [
        "## Intended use",
        "",
        f"Answer the {about.get('spec')} task ({about.get('kind', report.get('kind'))}) in "
        "place of the teacher, for inputs like its dataset's, with low-confidence inputs sent "
        "back to the teacher.",
        "",
        "## Limits",
        "",
        *limits,
    ]


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[str]:
    """The confusion matrix (classifiers), per-slice bars with intervals and the learning
    curve, as PNG; the names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, draw in (
        ("confusion", _confusion),
        ("slices", _slices),
        ("learning_curve", _learning_curve),
        ("routing", _routing),
    ):
        figure = draw(plt, report)
        if figure is None:
            continue
        figure.savefig(out_dir / PLOT_FILES[name], dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(PLOT_FILES[name])
    return written


def _confusion(plt: Any, report: Mapping[str, Any]) -> Any:
    confusion = report.get("confusion") or {}
    labels, matrix = confusion.get("labels"), confusion.get("matrix")
    if not labels or not matrix:
        return None
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1.0 + 0.6 * len(labels)))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("student")
    axes.set_ylabel("known-good record")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = "white" if count > peak / 2 else "black"
            axes.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    axes.set_title(f"{report.get('kind')}: {report.get('evaluated_on')} split")
    return figure


def _slices(plt: Any, report: Mapping[str, Any]) -> Any:
    figures = slice_figures(report)
    if not figures:
        return None
    names = [name for name, *_ in figures]
    values = [value for _, value, _, _ in figures]
    low = [value - (i[0] if i else value) for _, value, i, _ in figures]
    high = [(i[1] if i else value) - value for _, value, i, _ in figures]
    flagged = {flag["slice"] for flag in report.get("flagged") or []}
    colors = ["tab:red" if name in flagged else "tab:blue" for name in names]
    figure, axes = plt.subplots(figsize=(6.5, 0.9 + 0.32 * len(names)))
    axes.barh(names, values, xerr=[low, high], color=colors, capsize=3)
    key = (report.get("headline") or {}).get("slice_key", "student_accuracy")
    overall = (report.get("overall") or {}).get(key)
    if overall is not None:
        axes.axvline(overall, color="black", linestyle="--", linewidth=1, label="overall")
        axes.legend(loc="lower right")
    axes.invert_yaxis()
    axes.set_xlabel(f"{key} (95 % interval; red: flagged)")
    return figure


def _learning_curve(plt: Any, report: Mapping[str, Any]) -> Any:
    history = report.get("history") or []
    if not history:
        return None
    epochs = [row["epoch"] for row in history]
    figure, loss_axes = plt.subplots(figsize=(6.0, 3.5))
    loss_axes.plot(epochs, [row["loss"] for row in history], color="tab:blue", marker="o")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss", color="tab:blue")
    vals = [(row["epoch"], row["val"]) for row in history if row.get("val") is not None]
    if vals:
        val_axes = loss_axes.twinx()
        val_axes.plot(*zip(*vals, strict=True), color="tab:orange", marker="s")
        val_axes.set_ylabel("validation (agreement with the teacher)", color="tab:orange")
    return figure


def _routing(plt: Any, report: Mapping[str, Any]) -> Any:
    router = report.get("router")
    if not router or not router.get("curve"):
        return None
    curve = router["curve"]
    figure, axes = plt.subplots(figsize=(6.0, 3.8))
    axes.plot(
        [p["coverage"] for p in curve],
        [p["accuracy"] for p in curve],
        label="routed (student above the threshold)",
    )
    val = router["val"]
    axes.axhline(val["teacher_accuracy"], color="grey", label="teacher alone")
    axes.axhline(router["target_accuracy"], color="grey", linestyle="--", label="target")
    for split, marker in (("val", "o"), ("test", "s")):
        point = router[split]
        if point.get("items"):
            axes.plot(
                [1 - point["teacher_share"]],
                [point["accuracy"]],
                marker,
                color="black",
                label=f"chosen thresholds, {split} split",
            )
    axes.set_xlabel("coverage (share the student answers)")
    axes.set_ylabel(f"accuracy against {router['against']}")
    axes.set_xlim(0, 1.0)
    axes.legend(loc="lower left", fontsize="small")
    return figure
