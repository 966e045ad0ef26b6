"""The `stillhouse` command line, one module per command group (a thin layer: each command
parses its options, calls ``stillhouse.commands`` and prints through ``stillhouse.output``).

- ``root``: the app, its sub-groups, shared options, settings, the entry point
- ``labeling``: backfill, estimate, requeue, status, report, calibrate
- ``student``: train, runs, advise, demo
- ``dataset``: the ``dataset`` group (create, list, show, diff) and export
- ``fleet``: worker, dispatch
- ``serve``: the ingest API and the router (``route serve``, ``route predict``)
- ``teacher``, ``db``, ``spec``, ``review``: the sub-groups of the same names

A new command goes in the module of its group (or a new module imported below).
"""

import importlib

from stillhouse.cli.root import app, main

__all__ = ["app", "main"]

# Importing a group's module registers its commands, in this order in `stillhouse --help`:
# the flow first (load and label, the student, the servers), then the tools.
GROUPS = ("labeling", "dataset", "student", "serve", "fleet", "teacher", "db", "spec", "review")
for _group in GROUPS:
    importlib.import_module(f"{__name__}.{_group}")
