"""Helpers shared by the tests: the repository root, CLI runs, real servers, fault processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root (examples/, docs/, migrations/ are read from it)."""


def triage_body() -> dict[str, Any]:
    """The bundled triage spec's body for tests of labeling mechanics (leases, retries,
    budgets, faults): its target accuracy taken out and 10 % withheld, so a run of a few items
    is not held to a calibration it has too few records to fit (tests of the calibration
    itself use the bundled spec as it is)."""
    import yaml

    body: dict[str, Any] = yaml.safe_load((ROOT / "examples/specs/triage.yaml").read_text())
    body["checks"].pop("target_accuracy", None)
    body["checks"]["withhold_share"] = 0.1
    return body


def triage_file(directory: Path, name: str = "triage.yaml") -> Path:
    """:func:`triage_body` written to ``directory`` (for the CLI's ``--spec``)."""
    import yaml

    path = directory / name
    path.write_text(yaml.safe_dump(triage_body(), sort_keys=False))
    return path
