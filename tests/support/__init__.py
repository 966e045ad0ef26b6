"""Helpers shared by the tests: the repository root, CLI runs, real servers, fault processes."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root (examples/, docs/, migrations/ are read from it)."""
