"""What the CLI's commands do, one module per domain noun, composed from the layers below.

Each ``run_*`` takes values (the process's settings, options), opens what it needs, owns its
transactions, and returns the command's result as data (what ``--json`` prints); progress
and human summaries go to the console it is given. Rendering helpers are in
``stillhouse.output``. Logic that is not composition belongs in ``workers/`` or ``storage/``.
"""

from stillhouse.commands.advise import run_advise
from stillhouse.commands.backfill import BackfillOptions, run_backfill
from stillhouse.commands.calibrate import run_calibrate
from stillhouse.commands.dataset import (
    run_dataset_create,
    run_dataset_diff,
    run_dataset_list,
    run_dataset_show,
    run_export,
)
from stillhouse.commands.demo import run_demo
from stillhouse.commands.estimate import run_estimate
from stillhouse.commands.report import run_report
from stillhouse.commands.requeue import run_requeue
from stillhouse.commands.review import (
    run_review_list,
    run_review_resolve,
    run_review_sample,
    run_review_suspects,
    run_task_resolve,
)
from stillhouse.commands.runs import (
    run_runs_compare,
    run_runs_exec,
    run_runs_list,
    run_runs_show,
)
from stillhouse.commands.status import run_status
from stillhouse.commands.train import run_train, train_student

__all__ = [
    "BackfillOptions",
    "run_advise",
    "run_backfill",
    "run_calibrate",
    "run_dataset_create",
    "run_dataset_diff",
    "run_dataset_list",
    "run_dataset_show",
    "run_demo",
    "run_estimate",
    "run_export",
    "run_report",
    "run_requeue",
    "run_review_list",
    "run_review_resolve",
    "run_review_sample",
    "run_review_suspects",
    "run_runs_compare",
    "run_runs_exec",
    "run_runs_list",
    "run_runs_show",
    "run_status",
    "run_task_resolve",
    "run_train",
    "train_student",
]
