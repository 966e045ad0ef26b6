"""The Starlette app: OpenAI-compatible routes in front of a ``Backend``, with fault injection.

Routes: ``POST /v1/chat/completions``, ``POST /v1/messages`` (Anthropic's Messages API over
the same backend, faults and limits, ``messages.py``), ``GET /v1/models``, ``GET /v1/stats``
(counters a test can hold against the client's ledger; ``batch`` counts batch requests), ``GET
/v1/requests`` (the request log: one entry per live POST, with its request hash and
``X-Client-Request-Id``), ``POST /v1/stats/reset`` (zeroes them, and restarts the fault
sequence), ``GET /healthz``, and the batch APIs (``batch_jobs.py``): OpenAI's ``/v1/files``,
``/v1/files/{id}``, ``/v1/files/{id}/content``, ``/v1/batches``, ``/v1/batches/{id}``,
``/v1/batches/{id}/cancel`` and Anthropic's ``/v1/messages/batches``, ``…/{id}``,
``…/{id}/cancel``, ``…/{id}/results``. With an API key set, the OpenAI routes and the reset
want ``Authorization: Bearer <key>``, the Anthropic routes ``x-api-key: <key>``; the health
check, the counters and the log (hashes, no content) stay open so operators and tests can
read them without the secret.

A chat completion is checked (key, body), then held to the server's rate limits (``limits``:
requests in flight, per minute, tokens per minute; over them it is answered 429 with
``Retry-After`` and ``x-ratelimit-*`` headers, see ``limits.py``), and then given its fault
by the ``FaultPlan``: faults that need no model (429, 5xx, reset, hang) answer at once;
otherwise the request waits its drawn latency, the backend answers, and a post-model fault
(slow drip, malformed, truncated, refusal, wrong) may spoil the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from stillhouse.servers.teacher.backends import Backend
from stillhouse.servers.teacher.batch_jobs import BatchFaults, BatchStore
from stillhouse.servers.teacher.faults import (
    BEFORE_BACKEND,
    FAULT_HEADER,
    FaultDecision,
    FaultKind,
    FaultPlan,
    FaultProfile,
)
from stillhouse.servers.teacher.injection import (
    TRANSPORT_KEY,
    after_backend,
    before_backend,
    transport_of,
)
from stillhouse.servers.teacher.limits import Admission, LimitsConfig, RateLimits
from stillhouse.servers.teacher.messages import (
    chat_body,
    error_of,
    forced_tool,
    message_body,
    rate_headers,
)
from stillhouse.servers.teacher.protocol import (
    ChatRequest,
    RequestError,
    completion_body,
    error_body,
    parse_chat_request,
    prompt_tokens,
)

__all__ = ["ServerStats", "TeacherApp", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    """Counters behind ``/v1/stats``: every chat-completion POST, and what became of it.

    ``completions`` are clean 200s, ``errors`` the 4xx and model failures, ``faults`` the
    injected ones by kind, and ``rate_limited`` the 429s of the server's own limits (by
    ``rate_limited_by``: concurrency, requests, tokens); the four add up to ``requests`` once
    all have answered. ``max_in_flight`` is the most requests the server held at once.
    """

    requests: int = 0
    completions: int = 0
    errors: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {kind.value: 0 for kind in FaultKind})
    rate_limited: int = 0
    rate_limited_by: dict[str, int] = field(
        default_factory=lambda: {"concurrency": 0, "requests": 0, "tokens": 0}
    )
    max_in_flight: int = 0

    def as_json(self) -> dict[str, object]:
        """The ``/v1/stats`` body."""
        return {
            "requests": self.requests,
            "completions": self.completions,
            "errors": self.errors,
            "faults": dict(self.faults),
            "rate_limited": self.rate_limited,
            "rate_limited_by": dict(self.rate_limited_by),
            "max_in_flight": self.max_in_flight,
        }


# The request log keeps this many entries (the oldest go first).
REQUEST_LOG_SIZE = 200_000


@dataclass
class _RequestLog:
    """One entry per chat-completion POST: what a client's ledger is matched against.

    ``request_hash`` is the hash stillhouse's ledger keys a request by (SHA-256 of the
    provider name ``openai``, a newline and the body bytes as sent); ``client_request_id``
    is the ``X-Client-Request-Id`` header, which stillhouse sends once per HTTP attempt.
    """

    entries: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))
    first: int = 0  # the number of the oldest entry still kept
    path: Path | None = None  # also append each entry here, as it arrives (JSON lines)
    _out: TextIO | None = field(default=None, repr=False)

    def add(self, number: int, raw: bytes, request: Request) -> dict[str, Any]:
        if len(self.entries) == self.entries.maxlen:
            self.first += 1
        entry: dict[str, Any] = {
            "n": number,
            "at": round(time.time(), 6),
            "request_hash": hashlib.sha256(b"openai\n" + raw).hexdigest(),
            "client_request_id": request.headers.get("x-client-request-id"),
            "status": None,
        }
        self.entries.append(entry)
        self._append(entry)
        return entry

    def answered(self, entry: dict[str, Any], status: int) -> None:
        entry["status"] = status
        self._append({"n": entry["n"], "status": status, "done": round(time.time(), 6)})

    def _append(self, line: dict[str, Any]) -> None:
        # Written on arrival, before the answer: a server killed mid-request still has
        # every request it received on file (a restarted one appends to the same file).
        if self.path is not None:
            if self._out is None:
                self._out = self.path.open("a", encoding="utf-8", buffering=1)
            self._out.write(json.dumps(line) + "\n")

    def page(self, offset: int, limit: int) -> dict[str, Any]:
        start = max(0, offset - self.first)
        chosen = [self.entries[i] for i in range(start, min(len(self.entries), start + limit))]
        return {"first": self.first, "total": self.first + len(self.entries), "entries": chosen}


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=status)


class _Routes:
    """Request handlers bound to one backend, key, fault plan and set of counters."""

    def __init__(
        self,
        backend: Backend,
        api_key: str | None,
        plan: FaultPlan,
        limits: LimitsConfig,
        request_log: Path | None = None,
        batch_faults: BatchFaults | None = None,
    ) -> None:
        self.backend = backend
        self.api_key = api_key
        self.plan = plan
        self.limits_config = limits
        self.limits = RateLimits(limits)
        self.stats = ServerStats()
        self.request_log = request_log
        self.log = _RequestLog(path=request_log)
        self.ready = False
        self.started = int(time.time())
        self.batches = BatchStore(self.answer_body, batch_faults)

    async def answer_body(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One chat-completions body through the backend (a batch request: no live limits,
        no live faults): the HTTP status and body a live call would get."""
        try:
            chat = parse_chat_request(body, default_model=self.backend.name)
            completion = await self.backend.complete(chat)
        except RequestError as exc:
            return 400, error_body(str(exc), "invalid_request")
        except Exception:
            log.exception("the teacher backend failed on a batch request")
            return 500, error_body("the model failed", None, "server_error")
        return 200, completion_body(chat, completion)

    def key_refused(self, request: Request) -> JSONResponse | None:
        """Anthropic's auth: ``x-api-key`` must be the key, when one is set."""
        if self.api_key is None:
            return None
        given = request.headers.get("x-api-key", "").encode("latin-1", "replace")
        if hmac.compare_digest(given, self.api_key.encode()):
            return None
        body = error_of(401, {"error": {"message": "invalid x-api-key"}})
        return JSONResponse(body, status_code=401)

    def guarded(self, handler: Any, anthropic: bool) -> Any:
        """A batch route behind the provider's own auth check."""

        async def route(request: Request) -> Response:
            refused = self.key_refused(request) if anthropic else self.unauthorized(request)
            if refused is not None:
                return refused
            response: Response = await handler(request)
            return response

        return route

    async def messages(self, request: Request) -> Response:
        """``POST /v1/messages``: the request translated to a chat completion, answered by the
        same path (limits, faults, backend), and the answer translated back."""
        number = self.stats.requests
        self.stats.requests += 1
        raw = await request.body()
        entry = self.log.add(number, raw, request)
        refused = self.key_refused(request)
        if refused is not None:
            self.stats.errors += 1
            self.log.answered(entry, 401)
            return refused
        try:
            body = json.loads(raw)
            chat = chat_body(body)
            tool = forced_tool(body)
        except (ValueError, RequestError) as exc:
            self.stats.errors += 1
            self.log.answered(entry, 400)
            return JSONResponse(error_of(400, {"error": {"message": str(exc)}}), status_code=400)
        converted = json.dumps(chat).encode()
        response = await self._answer(request, converted, number, auth=False)
        self.log.answered(entry, response.status_code)
        if not isinstance(response, JSONResponse):
            return response  # a reset, a hang or a drip: no body to translate
        payload = json.loads(bytes(response.body))
        headers = rate_headers(response.headers)
        if response.status_code == 200:
            name = str(tool["name"]) if tool is not None else None
            return JSONResponse(message_body(payload, name), headers=headers)
        status = 529 if response.status_code == 503 else response.status_code
        return JSONResponse(error_of(status, payload), status_code=status, headers=headers)

    def unauthorized(self, request: Request) -> JSONResponse | None:
        """A 401 response when a key is required and the request lacks it, else None."""
        if self.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Bytes, not text: compare_digest refuses non-ASCII text (a 500 for a wrong key).
        given = token.strip().encode("latin-1", "replace")
        if scheme.lower() == "bearer" and hmac.compare_digest(given, self.api_key.encode()):
            return None
        return _error(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
            "invalid_api_key",
        )

    async def chat_completions(self, request: Request) -> Response:
        number = self.stats.requests
        self.stats.requests += 1
        raw = await request.body()
        entry = self.log.add(number, raw, request)
        response = await self._answer(request, raw, number)
        self.log.answered(entry, response.status_code)
        return response

    async def _answer(
        self, request: Request, raw: bytes, number: int, *, auth: bool = True
    ) -> Response:
        checked = self._check(request, raw, number, auth=auth)
        if isinstance(checked, Response):
            self.stats.errors += 1
            return checked
        chat, decision, tokens = checked
        limits = self.limits  # a stats reset replaces it: release the one admitted to
        admission = limits.admit(tokens)
        if not admission.admitted:
            return self._over_limit(admission)
        self.stats.max_in_flight = max(self.stats.max_in_flight, limits.in_flight)
        try:
            response = await self._faulted_or_answered(chat, decision)
        finally:
            limits.release()
        response.headers.update(admission.headers)
        return response

    def _over_limit(self, admission: Admission) -> Response:
        assert admission.reason is not None
        self.stats.rate_limited += 1
        self.stats.rate_limited_by[admission.reason] += 1
        body = error_body(admission.message, "rate_limit_exceeded", "rate_limit_error")
        return JSONResponse(body, status_code=429, headers=admission.headers)

    async def _faulted_or_answered(self, chat: ChatRequest, decision: FaultDecision) -> Response:
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

    def _check(
        self, request: Request, raw: bytes, number: int, *, auth: bool = True
    ) -> Response | tuple[ChatRequest, FaultDecision, int]:
        """The parsed request, its fault and its token count, or the 4xx that answers it."""
        denied = self.unauthorized(request) if auth else None
        if denied is not None:
            return denied
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON: {exc}", "invalid_json")
        try:
            chat = parse_chat_request(body, default_model=self.backend.name)
            decision = self.plan.decide(number, request.headers.get(FAULT_HEADER))
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request")
        except ValueError as exc:
            return _error(400, f"{FAULT_HEADER}: {exc}", "invalid_fault")
        return chat, decision, _limit_tokens(chat, body)

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
        return JSONResponse({**self.stats.as_json(), "batch": self.batches.stats.as_json()})

    async def stats_reset(self, request: Request) -> JSONResponse:
        refused = self.unauthorized(request)  # it changes state: the key's holder only
        if refused is not None:
            return refused
        self.stats = ServerStats()
        self.log = _RequestLog(path=self.request_log)
        self.limits = RateLimits(self.limits_config)
        self.batches.reset_stats()
        return JSONResponse({**self.stats.as_json(), "batch": self.batches.stats.as_json()})

    async def requests_view(self, request: Request) -> JSONResponse:
        try:
            offset = int(request.query_params.get("offset", 0))
            limit = min(50_000, int(request.query_params.get("limit", 10_000)))
        except ValueError:
            return _error(400, "offset and limit must be integers", "invalid_request")
        return JSONResponse(self.log.page(offset, limit))

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


def _limit_tokens(chat: ChatRequest, body: dict[str, Any]) -> int:
    """What a request counts against tokens per minute: the prompt and the whole completion
    allowance (``max_tokens`` times ``n``), as hosted providers reckon it at admission."""
    prompt = prompt_tokens(chat)
    allowance = body.get("max_completion_tokens", body.get("max_tokens")) or 0
    samples = body.get("n") or 1
    try:
        return prompt + int(allowance) * int(samples)
    except (TypeError, ValueError):
        return prompt


def create_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    faults: FaultProfile | None = None,
    limits: LimitsConfig | None = None,
    request_log: Path | None = None,
    batch_faults: BatchFaults | None = None,
) -> TeacherApp:
    """Build the teacher app; the backend is loaded in the lifespan, before requests.

    ``request_log`` is a file the request log is also appended to (JSON lines: each request
    as it arrives, then ``{"n", "status", "done"}`` once it is answered)."""
    routes = _Routes(
        backend, api_key, FaultPlan(faults), limits or LimitsConfig(), request_log, batch_faults
    )
    jobs = routes.batches

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.load()
        routes.ready = True
        yield
        await jobs.close()

    app = TeacherApp(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/messages", routes.messages, methods=["POST"]),
            Route("/v1/files", routes.guarded(jobs.upload, False), methods=["POST"]),
            Route("/v1/files/{file_id}", routes.guarded(jobs.file, False), methods=["GET"]),
            Route(
                "/v1/files/{file_id}/content",
                routes.guarded(jobs.file_content, False),
                methods=["GET"],
            ),
            Route("/v1/batches", routes.guarded(jobs.create, False), methods=["POST"]),
            Route("/v1/batches", routes.guarded(jobs.listing, False), methods=["GET"]),
            Route("/v1/batches/{batch_id}", routes.guarded(jobs.get, False), methods=["GET"]),
            Route(
                "/v1/batches/{batch_id}/cancel",
                routes.guarded(jobs.cancel, False),
                methods=["POST"],
            ),
            Route(
                "/v1/messages/batches",
                routes.guarded(jobs.create_messages, True),
                methods=["POST"],
            ),
            Route(
                "/v1/messages/batches", routes.guarded(jobs.list_messages, True), methods=["GET"]
            ),
            Route(
                "/v1/messages/batches/{batch_id}",
                routes.guarded(jobs.get_messages, True),
                methods=["GET"],
            ),
            Route(
                "/v1/messages/batches/{batch_id}/cancel",
                routes.guarded(jobs.cancel_messages, True),
                methods=["POST"],
            ),
            Route(
                "/v1/messages/batches/{batch_id}/results",
                routes.guarded(jobs.results_messages, True),
                methods=["GET"],
            ),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/stats", routes.stats_view, methods=["GET"]),
            Route("/v1/stats/reset", routes.stats_reset, methods=["POST"]),
            Route("/v1/requests", routes.requests_view, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.routes = routes
    return app
