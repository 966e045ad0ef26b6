"""How every command prints: JSON on stdout (:func:`print_json`), progress bars and tables on
stderr, and the one place that renders untrusted text (ids, documents, teacher answers,
error details that quote them) for a terminal.

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
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

__all__ = ["cell", "pct", "plain", "print_json", "progress_bar", "table_console"]

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
