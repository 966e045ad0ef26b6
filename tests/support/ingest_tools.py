"""Helpers for the ingest API tests: a spec, rows, and the real app under a real uvicorn server."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stillhouse.servers.ingest.app import create_app
from stillhouse.servers.ingest.server import api_limits
from stillhouse.servers.serving import ReadLimits
from stillhouse.settings import Settings
from storage.models import Item
from storage.session import make_engine, make_sessionmaker
from support import triage_body
from support.servers import serve_in_thread
from workers.spec import Spec, parse_spec

TOKEN = "tok-test-1"
OTHER_TOKEN = "tok-test-2"


def triage_spec(sampling: dict[str, Any] | None = None, name: str = "triage") -> Spec:
    body = triage_body()
    body = copy.deepcopy(body)
    body["name"] = name
    if sampling is not None:
        body["sampling"] = sampling
    return parse_spec(body)


def row(n: int | str, queue: str = "business", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"doc-{n}",
        "headline": f"Headline {n}",
        "body": f"Shares in firm {n} rose after strong profits.",
        "queue": queue,
        **extra,
    }


@dataclass
class Running:
    root: str
    sessions: sessionmaker[Session]
    headers: dict[str, str]

    def stored_ids(self) -> list[str]:
        with self.sessions() as session:
            return sorted(session.scalars(select(Item.external_id)))


@contextmanager
def serve_app(app: Any, limits: ReadLimits | None = None) -> Iterator[str]:
    """``app`` under uvicorn on a loopback port, in a thread; yields the root URL."""
    with serve_in_thread(app, lifespan="on", limits=limits) as root:
        yield root


@contextmanager
def running_api(
    database_url: str,
    specs: list[Spec] | None = None,
    *,
    backlog_ttl_s: float = 1.0,
    today: Callable[[], date] | None = None,
    **settings: Any,
) -> Iterator[Running]:
    """The real app for ``specs`` on ``database_url``, served over a real socket."""
    config = Settings(database_url=database_url, api_tokens=f"{TOKEN},{OTHER_TOKEN}", **settings)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    extra: dict[str, Any] = {"today": today} if today else {}
    app = create_app(
        specs or [triage_spec()],
        sessions,
        tokens=config.api_tokens,
        limits=api_limits(config),
        backlog_ttl_s=backlog_ttl_s,
        **extra,
    )
    try:
        limits = ReadLimits(config.api_read_timeout_s, config.api_max_connections)
        with serve_app(app, limits) as root:
            yield Running(root, sessions, {"Authorization": f"Bearer {TOKEN}"})
    finally:
        engine.dispose()
