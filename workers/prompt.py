"""Render a spec's prompt around a document, with the document clearly delimited as data."""

from __future__ import annotations

import functools
import re
from typing import Any

from schemas.errors import PermanentError
from workers.spec import Spec

__all__ = ["FIELD_PATTERN", "render_input", "render_messages"]

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
FIELD_PATTERN = _FIELD  # a source field in the input.text template: {name}


def render_input(spec: Spec, row: dict[str, Any]) -> str:
    """Build the item's input text from source fields with the spec's ``input.text`` template."""
    pieces = _pieces(str(spec.body["input"]["text"]))
    missing = [f for f in pieces[1::2] if row.get(f) is None]
    if missing:
        raise PermanentError(
            f"row is missing field(s) {', '.join(missing)} used by the spec's input.text template"
        )
    # Even positions are literal text, odd ones field names (a bulk load renders per row).
    text = "".join([p if i % 2 == 0 else str(row[p]) for i, p in enumerate(pieces)])
    return text[: int(spec.body["input"].get("max_chars", 20000))]


@functools.lru_cache(maxsize=64)
def _pieces(template: str) -> tuple[str, ...]:
    return tuple(_FIELD.split(template))


def render_messages(spec: Spec, text: str) -> list[dict[str, str]]:
    """The chat messages for one document: system instructions, then the delimited data."""
    # A document cannot close its own delimiter and smuggle instructions after it.
    safe = text.replace("</document>", "</ document>").replace("<document>", "< document>")
    user = str(spec.body["prompt"]["user"])
    user = user.replace("{labels}", _labels_block(spec)).replace(
        "{document}", f"<document>\n{safe}\n</document>"
    )
    messages = []
    system = spec.body["prompt"].get("system")
    if system:
        messages.append({"role": "system", "content": str(system)})
    messages.append({"role": "user", "content": user})
    return messages


def _labels_block(spec: Spec) -> str:
    lines = [
        f"- {label['name']}: {label.get('description', label['name'])}" for label in spec.labels
    ]
    return "<labels>\n" + "\n".join(lines) + "\n</labels>"
