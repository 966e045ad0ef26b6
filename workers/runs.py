"""Training as a job: the trainer runs as its own process, its output in the run's log.

A Celery task on the train queue calls :func:`launch_trainer`; it starts the trainer command
(``stillhouse runs exec RUN``, which marks the run running, trains and records the end),
waits for it, and when the process dies without recording an end (killed, out of memory)
marks the run failed with the log's tail, so `stillhouse runs` never shows a dead run as
running. The label worker's pool is never the one that trains.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage.models import StudentRun
from storage.runs import fail_run

__all__ = ["LOG_FILE", "LOG_TAIL_CHARS", "launch_trainer", "log_tail"]

LOG_FILE = "train.log"
LOG_TAIL_CHARS = 2_000


def launch_trainer(
    sessions: sessionmaker[Session], run_id: int, argv: Sequence[str]
) -> dict[str, Any]:
    """Run ``argv`` (the trainer for ``run_id``) to its end, its output into the run's
    ``train.log``; returns ``{"run", "exit_code", "state"}``. Commits: a failure mark when
    the trainer exited non-zero without recording one."""
    with sessions() as session:
        run = session.get(StudentRun, run_id)
        if run is None:
            return {"run": run_id, "exit_code": None, "state": "unknown"}
        folder = Path(run.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / LOG_FILE
    with log_path.open("ab") as log:
        code = subprocess.run(list(argv), stdout=log, stderr=subprocess.STDOUT, check=False)
    if code.returncode != 0:
        with sessions.begin() as session:
            fail_run(
                session,
                run_id,
                f"the trainer exited with {code.returncode}; the end of {log_path}:\n"
                f"{log_tail(log_path)}",
            )
    with sessions() as session:
        run = session.get(StudentRun, run_id)
        state = run.state.value if run is not None else "unknown"
    return {"run": run_id, "exit_code": code.returncode, "state": state}


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log (empty when there is none)."""
    if not path.is_file():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]
