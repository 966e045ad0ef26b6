"""The ingest API: producers POST live samples, which land as pending items for the workers.

Routes:

- ``POST /v1/items`` (bearer token): ``{"spec": NAME, "items": [ROW, ...]}`` or
  ``{"spec": NAME, "item": ROW}``. A row is a source row as a backfill reads it (the id in the
  spec's ``input.id_field``). The answer gives each row's outcome (``inserted``,
  ``duplicate``, ``sampled_out``, ``capped``, ``invalid`` with the reason) and the counts:
  200 when any row was valid, 422 when none was.
- ``GET /v1/limits`` (bearer token): batch and body limits and the specs served, for clients.
- ``GET /healthz`` and ``GET /metrics`` (Prometheus text), open: they reveal no data.

Errors are ``{"error": {"code", "message"}}``: 401 (no or wrong token), 413 (body or batch
over the limit), 415 (not JSON), 422 (bad JSON, shape or spec name), 429 with ``Retry-After``
(the spec's backlog is over the limit) and 503 with ``Retry-After`` (database unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine, text
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from schemas.errors import ConfigError
from stillhouse.servers.ingest.metrics import CONTENT_TYPE_LATEST, ApiMetrics, Instrumented
from stillhouse.servers.requests import BearerTokens, Rejected, client_gone, read_json
from storage.intake import backlog_by_spec
from workers.ingest import store_spec
from workers.intake import IntakeResult, Outcome, RowOutcome, ingest_live
from workers.rowpolicy import MAX_DEPTH
from workers.sampling import SamplingRules
from workers.spec import Spec

__all__ = ["ApiLimits", "create_app"]

log = logging.getLogger(__name__)

SHAPE = '{"spec": NAME, "items": [ROW, ...]} or {"spec": NAME, "item": ROW}'


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What one request may carry and when the API pushes back (``STILLHOUSE_API_*``)."""

    max_body_bytes: int
    max_batch: int
    max_backlog: int
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class _Served:
    spec: Spec
    spec_id: int
    rules: SamplingRules


class _Backlog:
    """Backlog per spec, counted at most once per ``ttl_s`` whatever the request rate."""

    def __init__(self, sessions: sessionmaker[Session], served: dict[str, _Served], ttl_s: float):
        self.sessions, self.served, self.ttl_s = sessions, served, ttl_s
        self.counts: dict[str, int] = {}
        self.at = float("-inf")
        self.lock = asyncio.Lock()

    async def get(self, metrics: ApiMetrics) -> dict[str, int]:
        if time.monotonic() - self.at < self.ttl_s:
            return self.counts
        async with self.lock:  # one refresh at a time; the others use its result
            if time.monotonic() - self.at >= self.ttl_s:
                by_id = await run_in_threadpool(self._count)
                self.counts = {name: by_id[s.spec_id] for name, s in self.served.items()}
                self.at = time.monotonic()
                for name, n in self.counts.items():
                    metrics.backlog.labels(name).set(n)
        return self.counts

    def _count(self) -> dict[int, int]:
        with self.sessions() as session:
            return backlog_by_spec(session, [s.spec_id for s in self.served.values()])


def _is_outage(exc: SQLAlchemyError) -> bool:
    """Whether a database error means the database cannot be reached (a 503 and a retry
    help), not that it refused what was sent."""
    return isinstance(exc, (OperationalError, InterfaceError)) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def _utc_today() -> date:
    return datetime.now(UTC).date()


class _IngestApi:
    """The handlers, bound to the specs, the database, the limits and the tokens."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        served: dict[str, _Served],
        limits: ApiLimits,
        tokens: BearerTokens,
        backlog_ttl_s: float,
        today: Callable[[], date],
    ) -> None:
        self.sessions, self.served, self.limits = sessions, served, limits
        self.tokens, self.today = tokens, today
        self.metrics = ApiMetrics()
        self.backlog = _Backlog(sessions, served, backlog_ttl_s)

    def check_token(self, request: Request) -> None:
        self.tokens.check(request)

    async def items(self, request: Request) -> Response:
        try:
            self.check_token(request)
            served, rows = self._parse(await self._json_body(request))
            await self._check_backlog(served)
            result = await run_in_threadpool(self._ingest, served, rows)
        except Rejected as exc:
            return exc.response()
        except ClientDisconnect:
            return client_gone()
        except SQLAlchemyError as exc:
            if not _is_outage(exc):
                log.exception("ingest failed on a database error")
            else:
                log.warning("ingest failed: the database is unavailable: %s", exc)
            return self._unavailable().response()
        counts = result.counts()
        self.metrics.count_items(served.spec.name, counts)
        body = {
            "spec": served.spec.name,
            "version": served.spec.version,
            "counts": counts,
            "results": [row.as_json() for row in result.outcomes],
        }
        return JSONResponse(body, status_code=422 if counts["invalid"] == len(rows) else 200)

    async def _json_body(self, request: Request) -> Any:
        return await read_json(
            request,
            self.limits.max_body_bytes,
            too_large_hint="send fewer items per request",
            depth_hint=f"a row may nest at most {MAX_DEPTH}",
        )

    def _parse(self, data: Any) -> tuple[_Served, list[Any]]:
        def shape_error(message: str) -> Rejected:
            return Rejected(422, "invalid_request", f"{message}; send {SHAPE}")

        if not isinstance(data, dict):
            raise shape_error(f"the body must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"spec", "items", "item"})
        if unknown:
            raise shape_error(f"unknown field(s) {', '.join(map(repr, unknown))}")
        served = self._spec(data.get("spec"))
        if ("items" in data) == ("item" in data):
            raise shape_error("give exactly one of 'items' (a batch) and 'item' (one row)")
        if "item" in data:
            if not isinstance(data["item"], dict):
                raise shape_error("'item' must be a JSON object (one source row)")
            return served, [data["item"]]
        rows = data["items"]
        if not isinstance(rows, list) or not rows:
            raise shape_error("'items' must be a non-empty array of source rows")
        if len(rows) > self.limits.max_batch:
            raise Rejected(
                413,
                "batch_too_large",
                f"a batch of {len(rows)} items is over the limit of {self.limits.max_batch}: "
                f"split it into smaller batches",
            )
        return served, rows

    def _spec(self, name: Any) -> _Served:
        served = self.served.get(name) if isinstance(name, str) else None
        if served is None:
            raise Rejected(
                422,
                "unknown_spec",
                f"'spec' must name a spec this server serves ({', '.join(sorted(self.served))}), "
                f"got {json.dumps(name)}",
            )
        return served

    async def _check_backlog(self, served: _Served) -> None:
        waiting = (await self.backlog.get(self.metrics)).get(served.spec.name, 0)
        if waiting > self.limits.max_backlog:
            raise Rejected(
                429,
                "backlog_full",
                f"spec {served.spec.name!r} has {waiting} items waiting for labeling, over the "
                f"limit of {self.limits.max_backlog}: retry in {self.limits.retry_after_s} s",
                **{"Retry-After": str(self.limits.retry_after_s)},
            )

    def _unavailable(self) -> Rejected:
        return Rejected(
            503,
            "unavailable",
            "the database is unavailable: retry later",
            **{"Retry-After": str(self.limits.retry_after_s)},
        )

    def _ingest(self, served: _Served, rows: list[Any]) -> IntakeResult:
        try:
            with self.sessions.begin() as session:
                return ingest_live(
                    session, served.spec, served.spec_id, rows, day=self.today(), rules=served.rules
                )
        except SQLAlchemyError as exc:
            if _is_outage(exc) or len(rows) == 1:
                raise
            # The database refused something in the batch that the row checks let through:
            # find the row one at a time, and keep the others (never a 503 for bad data,
            # which a producer would retry forever).
            log.warning(
                "a batch of %d rows failed (%s): storing them one at a time", len(rows), exc
            )
            return self._ingest_one_by_one(served, rows)

    def _ingest_one_by_one(self, served: _Served, rows: list[Any]) -> IntakeResult:
        result = IntakeResult()
        for index, row in enumerate(rows):
            try:
                with self.sessions.begin() as session:
                    one = ingest_live(
                        session,
                        served.spec,
                        served.spec_id,
                        [row],
                        day=self.today(),
                        rules=served.rules,
                    )
            except SQLAlchemyError as exc:
                if _is_outage(exc):
                    raise
                cause = getattr(exc, "orig", None) or exc
                reason = f"the database refused this row: {type(cause).__name__}"
                result.outcomes.append(RowOutcome(index, Outcome.INVALID, None, reason))
                continue
            result.outcomes.extend(replace(o, index=index) for o in one.outcomes)
        return result

    async def limits_route(self, request: Request) -> Response:
        try:
            self.check_token(request)
        except Rejected as exc:
            return exc.response()
        specs = {
            name: {"version": s.spec.version, "id_field": s.spec.id_field, **s.spec.sampling}
            for name, s in self.served.items()
        }
        return JSONResponse(
            {
                "max_batch": self.limits.max_batch,
                "max_body_bytes": self.limits.max_body_bytes,
                "specs": specs,
            }
        )

    async def healthz(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self._ping)
        except SQLAlchemyError as exc:
            log.warning("health check: database unreachable: %s", exc)
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
        return JSONResponse({"status": "ok", "database": "ok"})

    def _ping(self) -> None:
        with self.sessions() as session:
            session.execute(text("select 1"))

    async def metrics_route(self, request: Request) -> Response:
        # A scrape sees a current gauge; in an outage it keeps its last value (see /healthz).
        with contextlib.suppress(SQLAlchemyError):
            await self.backlog.get(self.metrics)
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def create_app(
    specs: Sequence[Spec],
    sessions: sessionmaker[Session],
    *,
    tokens: Sequence[SecretStr],
    limits: ApiLimits,
    insecure_no_auth: bool = False,
    backlog_ttl_s: float = 1.0,
    today: Callable[[], date] = _utc_today,
    engine: Engine | None = None,
) -> Starlette:
    """Build the ingest app for ``specs`` on ``sessions``; their rows are stored before the
    first request. It takes values, not settings (``server.build_app`` composes them).

    ``tokens`` are the bearer tokens accepted; none is refused unless ``insecure_no_auth``
    (loopback development) says otherwise. An ``engine`` given is the app's to dispose at
    shutdown.
    """
    bearer = BearerTokens.from_settings(tokens, insecure_no_auth=insecure_no_auth)
    names = [spec.name for spec in specs]
    if not specs or len(set(names)) != len(names):
        raise ConfigError(f"give one or more distinct specs to serve, got {names}")
    with sessions.begin() as session:
        served = {
            spec.name: _Served(spec, store_spec(session, spec).id, SamplingRules.from_spec(spec))
            for spec in specs
        }
    api = _IngestApi(
        sessions,
        served,
        limits,
        bearer,
        backlog_ttl_s,
        today,
    )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if engine is not None:
            engine.dispose()

    app = Starlette(
        routes=[
            Route("/v1/items", api.items, methods=["POST"]),
            Route("/v1/limits", api.limits_route, methods=["GET"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/metrics", api.metrics_route, methods=["GET"]),
        ],
        middleware=[Middleware(Instrumented, metrics=api.metrics)],
        lifespan=lifespan,
    )
    app.state.ingest = api
    app.state.engine = engine
    return app
