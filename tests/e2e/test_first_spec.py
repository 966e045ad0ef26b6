"""A new user's first runs (issue 12): every mistake ends in an error or a summary that
points at the fix, and nothing is lost on the way. Real CLI processes, a real local teacher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from support import ROOT, triage_file
from support.clitools import run_cli

from stillhouse.servers.teacher.process import local_teacher
from storage.models import Item, ItemState
from storage.session import make_engine, make_sessionmaker

LIMIT = 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(tmp_path: Path, teacher: str) -> dict[str, str]:
    return {
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/first.db",
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": teacher,
        "STILLHOUSE_RUNS_DIR": str(tmp_path / "runs"),
    }


def _states(tmp_path: Path) -> dict[str, int]:
    engine = make_engine(f"sqlite:///{tmp_path}/first.db")
    with make_sessionmaker(engine)() as session:
        rows = session.execute(select(Item.state, Item.attempts)).all()
    engine.dispose()
    counts: dict[str, int] = {}
    for state, _ in rows:
        counts[state.value] = counts.get(state.value, 0) + 1
    counts["attempts"] = sum(attempts for _, attempts in rows)
    return counts


def test_a_teacher_that_is_not_there_is_named_and_the_items_wait_for_it(
    tmp_path: Path, teacher_url: str
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    down = run_cli(
        _env(tmp_path, dead), "backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT)
    )
    # Not a rate limit, not a success: the URL and the refused connection, and exit 3.
    assert down.returncode == 3, down.stderr
    assert f"cannot connect to the teacher at {dead}" in down.stderr
    assert "not finished: " in down.stderr and "run the same command again" in down.stderr
    # The items wait, and no wait cost an attempt.
    assert _states(tmp_path) == {"pending": LIMIT, "attempts": 0}

    up = run_cli(
        _env(tmp_path, teacher_url),
        "backfill",
        "bbc",
        "--spec",
        "triage",
        "--limit",
        str(LIMIT),
        "--json",
    )
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout)
    assert summary["already_loaded"] == LIMIT and summary["labeled"] == LIMIT


def test_failed_items_are_requeued_by_filter(tmp_path: Path, teacher_url: str) -> None:
    env = _env(tmp_path, teacher_url)
    loaded = run_cli(
        env, "backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT), "--load-only"
    )
    assert loaded.returncode == 0, loaded.stderr
    engine = make_engine(env["STILLHOUSE_DATABASE_URL"])
    with make_sessionmaker(engine).begin() as session:
        ids = list(session.scalars(select(Item.id).order_by(Item.id)))
        for n, item_id in enumerate(ids):
            error = "unavailable: cannot connect" if n % 2 else "bad_response: gibberish"
            session.execute(
                update(Item)
                .where(Item.id == item_id)
                .values(state=ItemState.FAILED, attempts=5, last_error=error)
            )
    engine.dispose()

    some = run_cli(env, "requeue", "--spec", "triage", "--error", "cannot connect", "--json")
    assert some.returncode == 0, some.stderr
    assert json.loads(some.stdout)["failed"] == LIMIT // 2
    assert _states(tmp_path) == {
        "pending": LIMIT // 2,
        "failed": LIMIT // 2,
        "attempts": 5 * (LIMIT // 2),
    }
    rest = run_cli(env, "requeue", "--spec", "triage", "--json")
    assert json.loads(rest.stdout)["failed"] == LIMIT // 2
    labeled = run_cli(env, "backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT), "--json")
    assert labeled.returncode == 0, labeled.stderr
    assert json.loads(labeled.stdout)["labeled"] == LIMIT


def _start_backfill(env: dict[str, str]) -> subprocess.Popen[str]:
    args = ["backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT)]
    return subprocess.Popen(
        [sys.executable, "-m", "stillhouse", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_leases(tmp_path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _states(tmp_path).get("leased"):
                return
        except OperationalError:  # the schema is not there yet
            pass
        time.sleep(0.1)
    raise AssertionError("the backfill never leased a batch")


def _wait_for_requests(teacher: str, count: int, timeout_s: float = 60) -> None:
    """Until the teacher has received ``count`` requests (their answers are still to come)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{teacher}/stats").json()["requests"] < count:
        assert time.monotonic() < deadline, "the batch's calls never reached the teacher"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_embedded_run_that_stops_leaves_no_item_leased(
    tmp_path: Path, teacher_url: str, stop: signal.Signals
) -> None:
    # Answers take 20 s: the stop lands while every call of the batch is out, however slow
    # the machine is (the stopped run does not wait for them).
    with local_teacher("fixed", extra_args=["--latency-ms", "20000"]) as slow:
        running = _start_backfill(_env(tmp_path, slow))
        _wait_for_leases(tmp_path)
        _wait_for_requests(slow, LIMIT)
        running.send_signal(stop)
        running.wait(timeout=30)
    after = _states(tmp_path)
    if stop == signal.SIGINT:
        # The batch in hand went back at once, its attempts refunded.
        assert after.get("leased", 0) == 0 and after["attempts"] == 0, after
    else:
        assert after.get("leased", 0) > 0  # a killed process cannot clean up
    again = run_cli(
        _env(tmp_path, teacher_url), "backfill", "bbc", "--spec", "triage", "--limit", str(LIMIT)
    )
    assert again.returncode == 0, again.stderr
    if stop == signal.SIGKILL:
        assert "took back " in again.stderr and "an earlier run left leased" in again.stderr
    final = _states(tmp_path)
    assert final.get("leased", 0) == 0 and final.get("pending", 0) == 0, final


def _spec_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "examples/specs/triage.yaml").read_text()
    assert old in text
    path = tmp_path / "mine.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("{source: queue, compare: exact}", "{source: queu, compare: exact}", "known_good.label"),
        ('"{headline}\\n\\n{body}"', '"{headline}\\n\\n{bdy}"', "input.text reads field 'bdy'"),
    ],
    ids=["known-good", "template"],
)
def test_a_field_no_row_has_is_refused_before_anything_is_written(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    spec = _spec_with(tmp_path, old, new)
    env = _env(tmp_path, "http://127.0.0.1:9/v1")
    run = run_cli(env, "backfill", "bbc", "--spec", str(spec), "--limit", "30", "--load-only")
    assert run.returncode == 2, run.stderr
    assert says in run.stderr and "The rows have: body, headline, id, length, queue" in run.stderr
    assert not (tmp_path / "first.db").exists()  # nothing written, the version not used up


def _load_with_warning(tmp_path: Path, spec: Path, limit: int) -> tuple[str, str]:
    """Load ``limit`` BBC rows with ``spec`` (no teacher needed): its one warning, stderr."""
    env = _env(tmp_path, "http://127.0.0.1:9/v1")
    args = ["backfill", "bbc", "--spec", str(spec), "--limit", str(limit), "--load-only"]
    run = run_cli(env, *args, "--json")
    assert run.returncode == 0, run.stderr
    [warning] = json.loads(run.stdout)["warnings"]
    return warning, run.stderr


def test_known_good_values_no_label_matches_are_counted_at_load(tmp_path: Path) -> None:
    spec = _spec_with(tmp_path, "  - name: sport\n", "  - name: sports\n")
    warning, stderr = _load_with_warning(tmp_path, spec, 300)
    assert warning.startswith("known_good.label: 60 rows have a value no label of the spec")
    assert "'sport' (60 rows)" in warning and "warning: known_good.label" in stderr


def test_a_slice_field_no_row_has_is_a_loud_warning(tmp_path: Path) -> None:
    spec = _spec_with(tmp_path, "slices: [length, queue]", "slices: [lenght, queue]")
    warning, stderr = _load_with_warning(tmp_path, spec, 30)
    assert warning.startswith("slices reads field 'lenght', which none of the first 30 rows")
    assert "warning: slices reads field 'lenght'" in stderr


def test_tables_are_not_cut_to_80_columns_when_piped(monkeypatch: pytest.MonkeyPatch) -> None:
    from stillhouse.output import table_console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert table_console().width == 160  # pytest's stdout is not a terminal
    monkeypatch.setenv("COLUMNS", "100")
    assert table_console().width == 100


def test_a_new_version_relabels_what_the_old_one_rejected(tmp_path: Path, teacher_url: str) -> None:
    env = _env(tmp_path, teacher_url)
    first = run_cli(env, "backfill", "bbc", "--spec", "triage", "--limit", "40", "--json")
    assert first.returncode == 0, first.stderr
    rejected = json.loads(first.stdout)["labels"] - json.loads(first.stdout)["accepted"]
    assert rejected > 0  # the zero-shot teacher gets some of 40 BBC articles wrong
    v3 = _spec_with(tmp_path, "version: 2", "version: 3")
    again = run_cli(env, "requeue", "--spec", str(v3), "--no-failed", "--rejected", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "spec": "triage",
        "version": 3,
        "failed": 0,
        "rejected": rejected,
    }
    # No source: label what is pending.
    relabeled = run_cli(env, "backfill", "--spec", str(v3), "--json")
    assert relabeled.returncode == 0, relabeled.stderr
    done = json.loads(relabeled.stdout)
    assert done["rows"] == 0 and done["labeled"] == rejected


@pytest.mark.slow
def test_a_workers_configuration_error_reaches_the_items_status_and_backfill(
    tmp_path: Path, postgres_url: str, redis_url: str, teacher_url: str
) -> None:
    # The key variable is set where `backfill` runs, not where the worker runs.
    spec = _spec_with(
        tmp_path,
        "  model: minilm-zero-shot\n",
        "  model: minilm-zero-shot\n  api_key_env: MAIL_TEACHER_KEY\n",
    )
    env = {
        "STILLHOUSE_DATABASE_URL": postgres_url,
        "STILLHOUSE_BROKER_URL": redis_url,
        "STILLHOUSE_TEACHER_BASE_URL": teacher_url,
    }
    worker_env = {k: v for k, v in os.environ.items() if k != "MAIL_TEACHER_KEY"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "stillhouse", "worker", "--concurrency", "1", "--loglevel", "ERROR"],
        env={**worker_env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        waited = run_cli(
            {**env, "MAIL_TEACHER_KEY": "sk-only-here"},
            "backfill",
            "bbc",
            "--spec",
            str(spec),
            "--limit",
            "8",
            timeout=120,
        )
        state = run_cli(env, "status", "--json")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        _, worker_log = worker.communicate(timeout=30)
    assert waited.returncode == 2, waited.stderr
    assert "the workers cannot label these items" in waited.stderr
    assert "MAIL_TEACHER_KEY" in waited.stderr and "is not set" in waited.stderr
    last = json.loads(state.stdout)["last_error"]
    assert last.startswith("config: ") and "MAIL_TEACHER_KEY" in last
    assert "Traceback" not in worker_log  # one line in the worker's log, not 40 tracebacks


def test_status_takes_a_spec_name_or_file_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    env = _env(tmp_path, "http://127.0.0.1:9/v1")
    spec = _spec_with(tmp_path, "version: 2", "version: 2")
    loaded = run_cli(env, "backfill", "bbc", "--spec", str(spec), "--limit", "5", "--load-only")
    assert loaded.returncode == 0, loaded.stderr
    by_name = run_cli(env, "status", "--spec", "triage", "--json")
    by_file = run_cli(env, "status", "--spec", str(spec), "--json")
    assert json.loads(by_name.stdout)["items"] == json.loads(by_file.stdout)["items"] == 5
    typo = run_cli(env, "status", "--spec", "triagee")
    assert (
        typo.returncode == 2
        and "no spec named 'triagee' in the store (specs stored: triage)" in typo.stderr
    )
    never = run_cli(env, "report", "--spec", str(spec).replace("mine", "other"))
    assert never.returncode == 2
    other = tmp_path / "other.yaml"
    other.write_text(spec.read_text().replace("name: triage", "name: other"))
    hint = run_cli(env, "report", "--spec", str(other))
    assert hint.returncode == 2 and f"--spec {other}` first" in hint.stderr


def test_dispatch_once_prints_no_alembic_chatter(postgres_url: str, redis_url: str) -> None:
    from storage.migrate import upgrade

    upgrade(postgres_url)
    env = {"STILLHOUSE_DATABASE_URL": postgres_url, "STILLHOUSE_BROKER_URL": redis_url}
    once = run_cli(env, "dispatch", "--once", "--json")
    assert once.returncode == 0, once.stderr
    assert "alembic" not in once.stderr


def test_the_summary_tells_checked_from_unchecked_accepted_labels(
    tmp_path: Path, teacher_url: str
) -> None:
    env = _env(tmp_path, teacher_url)
    spec = str(triage_file(tmp_path))  # no target: the withheld labels are accepted unchecked
    run = run_cli(env, "backfill", "bbc", "--spec", spec, "--limit", "100", "--json")
    assert run.returncode == 0, run.stderr
    done = json.loads(run.stdout)
    unchecked = done["accepted"] - done["accepted_checked"]
    assert unchecked > 0  # it withholds 10 % of the records: those labels are unchecked
    assert f"{done['accepted_checked']} checked against a known-good record" in run.stderr
    assert f"{unchecked} without one (withheld or none: accuracy unknown" in run.stderr
    assert done["needs_review"] == 0


@pytest.mark.slow
def test_train_says_how_the_held_out_share_is_chosen(tmp_path: Path, teacher_url: str) -> None:
    env = _env(tmp_path, teacher_url)
    assert run_cli(env, "backfill", "bbc", "--spec", "triage", "--limit", "60").returncode == 0
    trained = run_cli(env, "train", "--spec", "triage", "--epochs", "2", "--json")
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)
    assert (
        f"held out {report['n_val']} (its val and test splits, by a stable hash" in trained.stderr
    )
    assert report["created_dataset"]["name"] in trained.stderr  # which dataset it froze
