"""The Starlette app: OpenAI-compatible routes in front of a ``Backend``, with fault injection.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/stats`` (counters a test
can hold against the client's ledger), ``POST /v1/stats/reset`` (zeroes them, and restarts
the fault sequence) and ``GET /healthz``. With an API key set, the two OpenAI routes want
``Authorization: Bearer <key>``; the health check and the counters stay open so operators
and tests can read them without the secret.

A chat completion is checked (key, body) and then given its fault by the ``FaultPlan``:
faults that need no model (429, 5xx, reset, hang) answer at once; otherwise the request
waits its drawn latency, the backend answers, and a post-model fault (slow drip, malformed,
truncated, refusal, wrong) may spoil the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from stillhouse.teacher_server.backends import Backend
from stillhouse.teacher_server.faults import (
    BEFORE_BACKEND,
    FAULT_HEADER,
    FaultDecision,
    FaultKind,
    FaultPlan,
    FaultProfile,
)
from stillhouse.teacher_server.injection import (
    TRANSPORT_KEY,
    after_backend,
    before_backend,
    transport_of,
)
from stillhouse.teacher_server.protocol import (
    ChatRequest,
    RequestError,
    completion_body,
    error_body,
    parse_chat_request,
)

__all__ = ["ServerStats", "TeacherApp", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    """Counters behind ``/v1/stats``: every chat-completion POST, and what became of it.

    ``completions`` are clean 200s, ``errors`` the 4xx and model failures, and ``faults``
    the injected ones by kind; the three add up to ``requests`` once all have answered.
    """

    requests: int = 0
    completions: int = 0
    errors: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {kind.value: 0 for kind in FaultKind})

    def as_json(self) -> dict[str, object]:
        """The ``/v1/stats`` body."""
        return {
            "requests": self.requests,
            "completions": self.completions,
            "errors": self.errors,
            "faults": dict(self.faults),
        }


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=status)


class _Routes:
    """Request handlers bound to one backend, key, fault plan and set of counters."""

    def __init__(self, backend: Backend, api_key: str | None, plan: FaultPlan) -> None:
        self.backend = backend
        self.api_key = api_key
        self.plan = plan
        self.stats = ServerStats()
        self.ready = False
        self.started = int(time.time())

    def unauthorized(self, request: Request) -> JSONResponse | None:
        """A 401 response when a key is required and the request lacks it, else None."""
        if self.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return None
        return _error(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
            "invalid_api_key",
        )

    async def chat_completions(self, request: Request) -> Response:
        number = self.stats.requests
        self.stats.requests += 1
        checked = await self._check(request, number)
        if isinstance(checked, Response):
            self.stats.errors += 1
            return checked
        chat, decision = checked
        if decision.kind in BEFORE_BACKEND:
            return self._faulty(decision, before_backend(decision, self.plan.profile))
        if decision.latency_s:
            await asyncio.sleep(decision.latency_s)
        try:
            completion = await self.backend.complete(chat)
        except RequestError as exc:
            self.stats.errors += 1
            return _error(400, str(exc), "invalid_request")
        except Exception:
            log.exception("the teacher backend failed")
            self.stats.errors += 1
            body = error_body("the model failed", None, "server_error")
            return JSONResponse(body, status_code=500)
        if decision.kind is None:
            self.stats.completions += 1
            return JSONResponse(completion_body(chat, completion))
        return self._faulty(decision, after_backend(decision, self.plan.profile, chat, completion))

    async def _check(
        self, request: Request, number: int
    ) -> Response | tuple[ChatRequest, FaultDecision]:
        """The parsed request and its fault, or the 4xx that answers it."""
        denied = self.unauthorized(request)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON: {exc}", "invalid_json")
        try:
            chat = parse_chat_request(body, default_model=self.backend.name)
            decision = self.plan.decide(number, request.headers.get(FAULT_HEADER))
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request")
        except ValueError as exc:
            return _error(400, f"{FAULT_HEADER}: {exc}", "invalid_fault")
        return chat, decision

    def _faulty(self, decision: FaultDecision, response: Response) -> Response:
        assert decision.kind is not None
        self.stats.faults[decision.kind] += 1
        return response

    async def models(self, request: Request) -> JSONResponse:
        denied = self.unauthorized(request)
        if denied is not None:
            return denied
        model = {
            "id": self.backend.name,
            "object": "model",
            "created": self.started,
            "owned_by": "stillhouse",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def stats_view(self, request: Request) -> JSONResponse:
        return JSONResponse(self.stats.as_json())

    async def stats_reset(self, request: Request) -> JSONResponse:
        self.stats = ServerStats()
        return JSONResponse(self.stats.as_json())

    async def healthz(self, request: Request) -> JSONResponse:
        if not self.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})


class TeacherApp(Starlette):
    """Starlette that records the connection's transport in the scope, for injected resets."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[TRANSPORT_KEY] = transport_of(send)
        await super().__call__(scope, receive, send)


def create_app(
    backend: Backend, *, api_key: str | None = None, faults: FaultProfile | None = None
) -> TeacherApp:
    """Build the teacher app; the backend is loaded in the lifespan, before requests."""
    routes = _Routes(backend, api_key, FaultPlan(faults))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.load()
        routes.ready = True
        yield

    app = TeacherApp(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/stats", routes.stats_view, methods=["GET"]),
            Route("/v1/stats/reset", routes.stats_reset, methods=["POST"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.routes = routes
    return app
