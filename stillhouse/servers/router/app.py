"""The router's HTTP API: a trained student with its teacher as fallback (``stillhouse.router``).

Routes:

- ``POST /v1/chat/completions`` (bearer token): the teacher's own protocol. The request the
  application sends the teacher (the spec's prompt with the ``<document>`` block) gets the
  same OpenAI ``chat.completion`` back, its content the spec's JSON answer; an application
  switches from the teacher to the router by changing its base URL. The answer's
  ``stillhouse`` field (and the ``X-Stillhouse-Answered-By`` header) says who answered, with
  what confidence and why.
- ``POST /v1/predict`` (bearer token): ``{"inputs": [INPUT, ...]}``, each a document string
  or a source row; the answer lists one result per input (``label``, ``confidence``,
  ``answered_by``, the student's call, ``reason`` when the teacher was asked, ``error`` for an
  invalid input) and the counts: 200 when any input was valid, 422 when none was.
- ``GET /v1/router`` (bearer token): the run, its policy and the answers so far.
- ``GET /healthz`` and ``GET /metrics`` (Prometheus text: answers by class and by who gave
  them, the share each class sends to the teacher, fallback errors), open.

Errors are ``{"error": {"code", "message"}}`` as the ingest API's: 401, 413 (body or batch
over the limit), 415, 422.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stillhouse.router import Router
from stillhouse.servers.ingest.metrics import CONTENT_TYPE_LATEST, Instrumented
from stillhouse.servers.requests import BearerTokens, Rejected, client_gone, read_json
from stillhouse.servers.router.batching import Coalescer
from stillhouse.servers.teacher.protocol import (
    Completion,
    RequestError,
    completion_body,
    parse_chat_request,
)
from storage.items import ItemIn

__all__ = ["RouterLimits", "RouterMetrics", "create_app"]

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/predict", "/v1/router", "/healthz", "/metrics")
SHAPE = '{"inputs": [TEXT or ROW, ...]}'
# Fallbacks from concurrent requests share a store batch and a labeling call: this many
# inputs a batch, this many batches with the teacher at once.
FALLBACK_BATCH, FALLBACK_ROUNDS = 64, 4


@dataclass(frozen=True, slots=True)
class RouterLimits:
    """What one request may carry (``STILLHOUSE_API_MAX_BODY_BYTES`` and ``_MAX_BATCH``)."""

    max_body_bytes: int
    max_batch: int


def _tokens(text: str) -> int:
    """``usage`` for an answer nobody is billed for: four characters a token (counting words
    with a regex cost a fifth of a millisecond on a 3 KB prompt, more than the student)."""
    return (len(text) + 3) // 4


class RouterMetrics:
    """Requests and latency by route; answers by class and by who gave them; the teacher's
    share per class, read from the router's counts at each scrape."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stillhouse_router_requests",
            "HTTP requests answered, by route and status code",
            ("route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "stillhouse_router_request_duration_seconds",
            "Time to answer one HTTP request, by route",
            ("route",),
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.answers = Counter(
            "stillhouse_router_answers",
            "Inputs answered, by the answer's class and by who answered (student or teacher)",
            ("label", "answered_by"),
            registry=self.registry,
        )
        self.teacher_share = Gauge(
            "stillhouse_router_teacher_share",
            "Share of the answers of each class that the teacher gave, since the router started",
            ("label",),
            registry=self.registry,
        )
        self.fallback_errors = Counter(
            "stillhouse_router_fallback_errors",
            "Inputs sent to the teacher that the student answered after all (the teacher could "
            "not: budget, outage, an answer the checks could not read)",
            registry=self.registry,
        )
        self.invalid = Counter(
            "stillhouse_router_invalid_inputs",
            "Inputs refused as invalid",
            registry=self.registry,
        )

    def count(self, answers: Sequence[Any]) -> None:
        for answer in answers:
            if answer.answered_by == "none":
                self.invalid.inc()
                continue
            self.answers.labels(answer.label or "", answer.answered_by).inc()
            if answer.fallback_error:
                self.fallback_errors.inc()

    def exposition(self) -> bytes:
        for label, share in self.router.stats.teacher_share().items():
            self.teacher_share.labels(label).set(share)
        return generate_latest(self.registry)


class _RouterApi:
    def __init__(
        self,
        router: Router,
        tokens: BearerTokens,
        limits: RouterLimits,
        inline: bool,
    ) -> None:
        self.router, self.tokens, self.limits = router, tokens, limits
        self.metrics = RouterMetrics(router)
        # The student decides on the event loop when it is fast (the bag model), a slower
        # one in a thread; either way for all the requests that arrived together.
        self.decide: Coalescer[str, Any] = Coalescer(router.decide, inline=inline)
        # Fallbacks wait on the teacher: a few rounds at once, each one store batch.
        self.ask: Coalescer[ItemIn, Any] = Coalescer(
            self._ask, inline=False, max_values=FALLBACK_BATCH, max_rounds=FALLBACK_ROUNDS
        )

    def _ask(self, items: list[ItemIn]) -> list[Any]:
        got = self.router.fallbacks(items)
        return [got[item.external_id] for item in items]

    async def _route(self, inputs: list[Any]) -> list[Any]:
        router = self.router
        items = router.items(inputs)
        valid = [i for i, item in enumerate(items) if isinstance(item, ItemIn)]
        texts = [items[i].text for i in valid]  # type: ignore[union-attr]
        decisions = dict(zip(valid, await self.decide(texts), strict=True))
        asked = router.asked(items, decisions)
        fallbacks = {}
        if asked:
            got = await self.ask(asked)
            fallbacks = {item.external_id: g for item, g in zip(asked, got, strict=True)}
        answers = router.answer(items, decisions, fallbacks)
        self.metrics.count(answers)
        return answers

    async def _body(self, request: Request) -> Any:
        self.tokens.check(request)
        return await read_json(
            request,
            self.limits.max_body_bytes,
            too_large_hint="send fewer inputs per request",
            depth_hint="a row may nest a few levels at most",
        )

    async def predict(self, request: Request) -> Response:
        try:
            inputs = self._inputs(await self._body(request))
            answers = await self._route(inputs)
        except Rejected as exc:
            return exc.response()
        except ClientDisconnect:
            return client_gone()
        counts = {"student": 0, "teacher": 0, "invalid": 0}
        for answer in answers:
            counts["invalid" if answer.answered_by == "none" else answer.answered_by] += 1
        body = {
            "run": self.router.run,
            "answers": [answer.as_json() for answer in answers],
            "counts": counts,
        }
        return JSONResponse(body, status_code=422 if counts["invalid"] == len(answers) else 200)

    def _inputs(self, data: Any) -> list[Any]:
        def shape_error(message: str) -> Rejected:
            return Rejected(422, "invalid_request", f"{message}; send {SHAPE}")

        if not isinstance(data, dict):
            raise shape_error(f"the body must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"inputs"})
        if unknown:
            raise shape_error(f"unknown field(s) {', '.join(map(repr, unknown))}")
        inputs = data.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise shape_error("'inputs' must be a non-empty array")
        if len(inputs) > self.limits.max_batch:
            raise Rejected(
                413,
                "batch_too_large",
                f"{len(inputs)} inputs are over the limit of {self.limits.max_batch} per "
                f"request: split them",
            )
        return inputs

    async def chat(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            try:
                chat = parse_chat_request(
                    body, default_model=f"stillhouse-router/{self.router.run}"
                )
            except RequestError as exc:
                raise Rejected(422, "invalid_request", str(exc)) from exc
            if chat.n != 1:
                raise Rejected(422, "invalid_request", "the router answers n=1 only")
            (answer,) = await self._route([chat.document])
        except Rejected as exc:
            return exc.response()
        except ClientDisconnect:
            return client_gone()
        if answer.answered_by == "none":
            return Rejected(422, "invalid_input", answer.error or "invalid input").response()
        content = json.dumps(answer.output, separators=(",", ":"))
        completion = Completion(content, _tokens(chat.prompt), _tokens(content))
        out = completion_body(chat, completion)
        out["stillhouse"] = answer.as_json()
        return JSONResponse(out, headers={"X-Stillhouse-Answered-By": answer.answered_by})

    async def info(self, request: Request) -> Response:
        try:
            self.tokens.check(request)
        except Rejected as exc:
            return exc.response()
        router = self.router
        return JSONResponse(
            {
                "run": router.run,
                "spec": router.spec.name,
                "version": router.spec.version,
                "labels": list(router.policy.labels),
                "policy": router.policy.as_dict(),
                "store_fallbacks": router.store,
                "max_batch": self.limits.max_batch,
                "max_body_bytes": self.limits.max_body_bytes,
                "answers": router.stats.snapshot(),
            }
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "run": self.router.run})

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def create_app(
    router: Router,
    *,
    tokens: Sequence[SecretStr],
    limits: RouterLimits,
    insecure_no_auth: bool = False,
    inline: bool | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> Starlette:
    """The router's app. ``inline`` (default: for the bag model) decides on the event loop;
    ``on_shutdown`` closes what the caller opened for the router."""
    bearer = BearerTokens.from_settings(tokens, insecure_no_auth=insecure_no_auth, what="API")
    fast = router.kind == "bag_of_ngrams"  # sub-millisecond: no thread hop
    api = _RouterApi(router, bearer, limits, fast if inline is None else inline)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/predict", api.predict, methods=["POST"]),
            Route("/v1/router", api.info, methods=["GET"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/metrics", api.metrics_route, methods=["GET"]),
        ],
        middleware=[Middleware(Instrumented, metrics=api.metrics, routes=ROUTES)],
        lifespan=lifespan,
    )
    app.state.router = api
    return app
