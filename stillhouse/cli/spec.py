"""`stillhouse spec …`: spec files."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from stillhouse.cli.root import spec_app
from stillhouse.output import print_json

__all__ = ["spec_check", "spec_reference"]


@spec_app.command("check")
def spec_check(spec: Annotated[str, typer.Argument(help="spec file or bundled name")]) -> None:
    """Validate a spec file and print its normalized summary.

    Example: stillhouse spec check examples/specs/triage.yaml
    """
    from workers.spec import load_spec

    loaded = load_spec(spec)
    print_json(
        {
            "name": loaded.name,
            "version": loaded.version,
            "kind": loaded.kind,
            "content_hash": loaded.content_hash,
            "labels": loaded.label_names,
            # The primary first, then the jury that votes with it.
            "teachers": [
                {"provider": t.provider, "model": t.model, "base_url": t.base_url}
                for t in loaded.teachers
            ],
            "jury_min_agreement": loaded.jury.min_agreement if loaded.jury.teachers else None,
            "output_schema": loaded.output_schema,
        }
    )


@spec_app.command("reference")
def spec_reference() -> None:
    """Print the spec reference (every field, its type, default and meaning) as Markdown.

    It is generated from schemas/spec.schema.json; docs/spec-reference.md holds a copy.

    Example: stillhouse spec reference > spec-reference.md
    """
    from schemas.reference import render_reference

    sys.stdout.write(render_reference())
