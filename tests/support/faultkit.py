"""Real processes for the fault tests: workers, a dispatcher, a Redis and a Postgres of their own
(so a test can kill or restart them without touching the servers other tests use)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import func, select, text

from stillhouse.servers.teacher.process import free_port
from storage.models import CallStatus, Item, Label, TeacherCall
from storage.session import make_engine, make_sessionmaker

FINAL = {"accepted", "rejected", "review", "failed"}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Proc:
    """A `python -m stillhouse …` child in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._out = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stillhouse", *args],
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole group: the worker, its pool children, its dispatcher."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()
        return self.process.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Ledger:
    by_state: dict[str, int]
    labels: int
    labeled_items: int
    calls: dict[str, int]

    @property
    def sent(self) -> int:
        """Requests the ledger says reached the teacher: answered, failed or lost in flight."""
        return sum(n for status, n in self.calls.items() if status != CallStatus.CACHE_HIT.value)

    @property
    def paid(self) -> int:
        return self.calls.get("ok", 0) + self.calls.get("in_flight", 0)


def ledger(url: str) -> Ledger:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            by_state = {
                str(getattr(s, "value", s)): int(n)
                for s, n in session.execute(select(Item.state, func.count()).group_by(Item.state))
            }
            labels = session.scalar(select(func.count()).select_from(Label)) or 0
            labeled = session.scalar(select(func.count(func.distinct(Label.item_id)))) or 0
            calls = {
                str(getattr(s, "value", s)): int(n)
                for s, n in session.execute(
                    select(TeacherCall.status, func.count()).group_by(TeacherCall.status)
                )
            }
    finally:
        engine.dispose()
    return Ledger(by_state, labels, labeled, calls)


def served(teacher_url: str) -> int:
    return int(httpx.get(f"{teacher_url}/stats", timeout=5).json()["requests"])


def all_final(url: str, items: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            now = ledger(url)
        except Exception:  # the database is restarting
            return False
        return sum(n for s, n in now.by_state.items() if s in FINAL) == items

    return check


def assert_clean(url: str, teacher_url: str, items: int, *, lost_at_most: int) -> Ledger:
    """Every item final and labeled once; the ledger equals the server's count; paid calls
    exceed items by at most the calls that were in flight when something died."""
    now = ledger(url)
    assert sum(now.by_state.get(s, 0) for s in FINAL) == items, now
    assert now.by_state.get("failed", 0) == 0, now
    assert now.labels == now.labeled_items == items, now
    assert now.sent == served(teacher_url), (now, served(teacher_url))
    assert items <= now.paid <= items + lost_at_most, now
    # Shown by `pytest -rP`: the figures a fault report quotes.
    print(
        f"fault result: {items} items final, {now.labels} labels, teacher served "
        f"{served(teacher_url)} = ledger sent {now.sent}, paid {now.paid} "
        f"(at most {items + lost_at_most}), ledger {dict(now.calls)}"
    )
    return now


@contextmanager
def own_redis() -> Iterator[tuple[str, Callable[[], None]]]:
    """A Redis server of this test's own, without persistence; yields (url, restart)."""
    port = free_port()
    directory = tempfile.mkdtemp(prefix="stillhouse-redis-")
    command = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        directory,
    ]
    state = {"process": subprocess.Popen(command, stdout=subprocess.DEVNULL)}

    def ready() -> bool:
        try:
            import redis

            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except Exception:
            return False

    def restart() -> None:
        state["process"].kill()
        state["process"].wait()
        state["process"] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(ready, 20, "Redis to come back")

    wait_for(ready, 20, "Redis to start")
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        state["process"].kill()
        state["process"].wait()
        shutil.rmtree(directory, ignore_errors=True)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"{name} not found: install the PostgreSQL server binaries")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def own_postgres() -> Iterator[tuple[str, Callable[[], None]]]:
    """A throwaway PostgreSQL cluster on a free port; yields (url, restart)."""
    port = free_port()
    directory = tempfile.mkdtemp(prefix="stillhouse-pg-")
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    data = f"{directory}/data"
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-N"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = _pg_bin("pg_ctl")

    def ctl(*args: str) -> None:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", data, "-o", options, "-l", f"{directory}/log", *args]),
            check=True,
            capture_output=True,
            timeout=60,
        )

    ctl("-w", "start")
    admin = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CREATE DATABASE stillhouse"))
    admin.dispose()
    try:
        yield (
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/stillhouse",
            lambda: ctl("-m", "fast", "-w", "restart"),
        )
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", data, "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(directory, ignore_errors=True)
