"""The spec reference (docs/spec-reference.md), generated from ``spec.schema.json``: every
field with its type, default and meaning. ``stillhouse spec reference`` prints it; a test
keeps the committed file equal to what the schema says."""

from __future__ import annotations

import json
from typing import Any

from schemas.loader import load_schema

__all__ = ["render_reference"]

_INTRO = """# Spec reference

Generated from `schemas/spec.schema.json` by `stillhouse spec reference` (a test keeps the two
in sync). A spec is a YAML file; `stillhouse spec check FILE` validates it and says what to fix.
Required fields are marked **required**. `examples/specs/` holds one spec per use case.
"""


def _type(node: dict[str, Any], root: dict[str, Any]) -> str:
    node = _resolve(node, root)
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array" and isinstance(node.get("items"), dict):
        inner = _resolve(node["items"], root).get("type", "value")
        return f"array of {inner}"
    if kind is None and "additionalProperties" in node:
        return "object"
    return str(kind or "value")


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        merged = dict(root["$defs"][ref.removeprefix("#/$defs/")])
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return node


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def _rows(
    node: dict[str, Any], root: dict[str, Any], path: str, required: set[str]
) -> list[tuple[str, dict[str, Any], bool]]:
    rows: list[tuple[str, dict[str, Any], bool]] = []
    for name, child in node.get("properties", {}).items():
        child = _resolve(child, root)
        full = f"{path}.{name}" if path else name
        rows.append((full, child, name in required))
        if child.get("type") == "object" and "properties" in child:
            rows += _rows(child, root, full, set(child.get("required", [])))
        extra = child.get("additionalProperties")
        if isinstance(extra, dict) and "properties" in extra:
            rows += _rows(extra, root, f"{full}.NAME", set(extra.get("required", [])))
        items = child.get("items")
        if isinstance(items, dict) and "properties" in _resolve(items, root):
            items = _resolve(items, root)
            rows += _rows(items, root, f"{full}[]", set(items.get("required", [])))
    return rows


def render_reference() -> str:
    """The reference as Markdown, one table per top-level section."""
    root = load_schema("spec")
    out = [_INTRO]
    rows = _rows(root, root, "", set(root.get("required", [])))
    parents = {p.split(".")[0].split("[")[0] for p, _, _ in rows if "." in p or "[" in p}
    sections: dict[str, list[str]] = {"the top level": []}
    for path, node, required in rows:
        top = path.split(".")[0].split("[")[0]
        top = top if top in parents else "the top level"
        default = f"`{json.dumps(node['default'])}`" if "default" in node else ""
        meaning = _cell(node.get("description", ""))
        if required:
            meaning = f"**required**. {meaning}".rstrip()
        sections.setdefault(top, []).append(
            f"| `{path}` | {_type(node, root)} | {default} | {meaning} |"
        )
    for top, lines in sections.items():
        title = top if top == "the top level" else f"`{top}`"
        out.append(
            f"\n## {title}\n\n| field | type | default | meaning |\n| --- | --- | --- | --- |"
        )
        out.extend(lines)
    return "\n".join(out) + "\n"
