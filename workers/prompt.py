"""Render a spec's prompt around a document, with the document clearly delimited as data."""

from __future__ import annotations

import functools
import re
from typing import Any

from schemas.errors import PermanentError
from workers.spec import Spec

__all__ = ["FIELD_PATTERN", "neutralize", "render_input", "render_messages"]

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
FIELD_PATTERN = _FIELD  # a source field in the input.text template: {name}


# The prompt's structure: the blocks stillhouse writes around a document and the blocks of a
# ranking prompt (the local teachers read both). A spec's input.text template adds its tags.
STRUCTURE_TAGS = frozenset({"document", "labels", "query", "candidate"})
_TAG_NAME = re.compile(r"</?\s*([A-Za-z][A-Za-z0-9_:-]*)")


def render_input(spec: Spec, row: dict[str, Any]) -> str:
    """Build the item's input text from source fields with the spec's ``input.text`` template.

    Every prompt-structure marker inside a field's value is neutralized (``<labels>`` becomes
    ``&lt;labels&gt;``): a document cannot open, close or fake a block of the prompt. The
    markers are :data:`STRUCTURE_TAGS` and every tag the template itself writes (so
    ``{query}`` cannot close the ``<query>`` around it). A field the spec lists in
    ``input.markup_fields`` carries markup on purpose (ranking's pre-rendered
    ``<candidate>`` blocks) and keeps it, but for ``<document>`` and ``<labels>``; its source
    escapes the text inside (:func:`neutralize`).
    """
    template = str(spec.body["input"]["text"])
    pieces = _pieces(template)
    missing = [f for f in pieces[1::2] if row.get(f) is None]
    if missing:
        raise PermanentError(
            f"row is missing field(s) {', '.join(missing)} used by the spec's input.text template"
        )
    markers = _markers(template)
    markup = spec.body["input"].get("markup_fields") or ()
    # Even positions are literal text, odd ones field names (a bulk load renders per row).
    text = "".join(
        [
            p if i % 2 == 0 else _neutral(str(row[p]), _OWN if p in markup else markers)
            for i, p in enumerate(pieces)
        ]
    )
    return text[: int(spec.body["input"].get("max_chars", 20000))]


@functools.lru_cache(maxsize=64)
def _pieces(template: str) -> tuple[str, ...]:
    return tuple(_FIELD.split(template))


@functools.lru_cache(maxsize=64)
def _markers(*templates: str) -> re.Pattern[str]:
    """The markers to neutralize: the structure tags and every tag the templates use, opening
    or closing, in any case, with spaces or attributes inside."""
    names = set(STRUCTURE_TAGS)
    for template in templates:
        names |= {name.lower() for name in _TAG_NAME.findall(template)}
    alternatives = "|".join(sorted(map(re.escape, names)))
    return re.compile(rf"<(\s*/?\s*(?:{alternatives})\b[^<>]*)>?", re.IGNORECASE)


def _neutral(value: str, markers: re.Pattern[str]) -> str:
    if "<" not in value:  # the common case costs one scan
        return value
    return markers.sub(_escape_marker, value)


def _escape_marker(match: re.Match[str]) -> str:
    closed = match.group(0).endswith(">")
    return "&lt;" + match.group(1) + ("&gt;" if closed else "")


def neutralize(text: str) -> str:
    """``text`` with every prompt-structure marker (:data:`STRUCTURE_TAGS`) neutralized: for
    a source that builds markup around untrusted text."""
    return _neutral(text, _markers())


# What render_messages neutralizes in a stored text (and a markup field keeps no less).
_OWN = re.compile(r"<(\s*/?\s*(?:document|labels)\b[^<>]*)>?", re.IGNORECASE)


def render_messages(spec: Spec, text: str) -> list[dict[str, str]]:
    """The chat messages for one document: system instructions, then the delimited data."""
    # A document cannot close its own delimiter, or bring its own label set, and smuggle
    # instructions after it (texts stored before render_input neutralized them included).
    safe = _neutral(text, _OWN)
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
