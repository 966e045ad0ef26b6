"""The Starlette app: OpenAI-compatible routes in front of a ``Backend``.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/stats`` (request
counters a test can hold against the client's ledger) and ``GET /healthz``. With an API key
set, the two OpenAI routes want ``Authorization: Bearer <key>``; the health check and the
counters stay open so operators and tests can read them without the secret.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stillhouse.teacher_server.backends import Backend
from stillhouse.teacher_server.protocol import (
    RequestError,
    completion_body,
    error_body,
    parse_chat_request,
)

__all__ = ["ServerStats", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    """Counters behind ``/v1/stats``: chat-completion POSTs received and 200s sent."""

    requests: int = 0
    completions: int = 0


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=status)


class _Routes:
    """Request handlers bound to one backend, one optional key and one set of counters."""

    def __init__(self, backend: Backend, api_key: str | None) -> None:
        self.backend = backend
        self.api_key = api_key
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

    async def chat_completions(self, request: Request) -> JSONResponse:
        self.stats.requests += 1
        denied = self.unauthorized(request)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON: {exc}", "invalid_json")
        try:
            chat = parse_chat_request(body, default_model=self.backend.name)
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request")
        try:
            completion = await self.backend.complete(chat)
        except Exception:
            log.exception("the teacher backend failed")
            return JSONResponse(
                {"error": {"message": "the model failed", "type": "server_error", "code": None}},
                status_code=500,
            )
        self.stats.completions += 1
        return JSONResponse(completion_body(chat, completion))

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
        return JSONResponse(
            {"requests": self.stats.requests, "completions": self.stats.completions}
        )

    async def healthz(self, request: Request) -> JSONResponse:
        if not self.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})


def create_app(backend: Backend, *, api_key: str | None = None) -> Starlette:
    """Build the teacher app; the backend is loaded in the lifespan, before requests."""
    routes = _Routes(backend, api_key)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.load()
        routes.ready = True
        yield

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/stats", routes.stats_view, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.stats = routes.stats
    return app
