"""Run the real `stillhouse` command in a child process, as a user would (shared by tests)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m stillhouse ARGS` with ``env`` on top of this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def embedded_env(database_url: str, teacher_url: str) -> dict[str, str]:
    """Settings for an embedded run: this database, no broker, this teacher."""
    return {
        "STILLHOUSE_DATABASE_URL": database_url,
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": teacher_url,
    }
