"""The teacher client: one ``httpx.AsyncClient`` per teacher, a provider adapter, the governor.

This is the only retry layer: a 429 waits its ``Retry-After`` (that call alone), and 5xx,
resets and timeouts are retried with exponential backoff and full jitter; a wait longer
than the teacher's ``max_inline_wait_s`` is handed back to the caller, which writes it to the
item as ``retry_at`` in the database (never a Celery countdown). Calls in flight are bounded
by the adaptive, fleet-wide limit of ``workers.concurrency``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from pydantic import SecretStr

from schemas.errors import (
    BadResponse,
    RateLimited,
    StillhouseError,
    TeacherBusy,
    TeacherTimeout,
    TransientError,
    Unavailable,
)
from workers.concurrency import SlotPool
from workers.governor import Governor, LocalGovernor, limits_of, wait_for_slot
from workers.http import make_http_client, teacher_key
from workers.loop import StallWatch
from workers.providers import Answer, Provider, RateHeaders, parse_retry_after, provider_for
from workers.redact import Redactor
from workers.spec import TeacherConfig

__all__ = [
    "REQUEST_ID_HEADER",
    "Attempt",
    "BeforeSend",
    "TeacherClient",
    "TeacherOutcome",
    "TeacherRequest",
    "build_request",
    "make_http_client",
    "map_http_error",
    "parse_retry_after",
    "teacher_key",
    "usage_of",
]

# A conservative prompt-token estimate (English runs about 4 characters a token) for limits
# and budget reservations before the teacher tells us the real count.
CHARS_PER_TOKEN_ESTIMATE = 3.0
# One id per HTTP attempt, in OpenAI's header for it: the ledger and the teacher's logs meet.
REQUEST_ID_HEADER = "X-Client-Request-Id"
REQUEST_ID_HEADER_RAW = REQUEST_ID_HEADER.lower().encode()
DEFAULT_RETRY_AFTER_S = 1.0  # a 429 without Retry-After


@dataclass(frozen=True, slots=True)
class TeacherRequest:
    """A normalized request body and its hash (the cache key); carries no secret."""

    body: dict[str, Any]
    payload: bytes
    request_hash: str
    provider: str
    model: str
    prompt_tokens_estimate: int = 0
    max_output_tokens: int = 0

    @property
    def tokens_estimate(self) -> int:
        return self.prompt_tokens_estimate + self.max_output_tokens


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP attempt, for the call ledger."""

    ok: bool
    latency_ms: float
    http_status: int | None = None
    error_kind: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_id: str | None = None  # sent as X-Client-Request-Id; the ledger keeps it


@dataclass(slots=True)
class TeacherOutcome:
    """The raw successful body and its parsed answer, or the error that ended the tries.

    ``error`` is None whenever ``body`` is set; ``attempts`` lists every try either way.
    """

    attempts: list[Attempt] = field(default_factory=list)
    body: dict[str, Any] | None = None
    answer: Answer | None = None
    error: StillhouseError | None = None
    # A provider batch's answer is priced at this share of the live price.
    price_factor: float = 1.0


def build_request(
    config: TeacherConfig,
    messages: list[dict[str, str]],
    output_schema: dict[str, Any],
    schema_name: str,
) -> TeacherRequest:
    """Build the provider's body; its hash covers everything that shapes the answer."""
    provider = provider_for(config.provider)
    body = provider.body(config, messages, output_schema, schema_name)
    # Encoded once, canonically: the same bytes are hashed (the cache key) and sent.
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    chars = sum(len(m["content"]) for m in messages)
    return TeacherRequest(
        body=body,
        payload=payload,
        request_hash=hashlib.sha256(provider.name.encode() + b"\n" + payload).hexdigest(),
        provider=provider.name,
        model=config.model,
        prompt_tokens_estimate=math.ceil(chars / CHARS_PER_TOKEN_ESTIMATE) + 8 * len(messages),
        max_output_tokens=config.max_output_tokens * config.samples,
    )


def map_http_error(
    response: httpx.Response, api_key_env: str | None, provider: str = "openai"
) -> StillhouseError:
    """Map a non-2xx answer into the error tree (what the caller should do next)."""
    return provider_for(provider).map_error(response, api_key_env)


def usage_of(body: dict[str, Any], provider: str = "openai") -> tuple[int, int]:
    answer = provider_for(provider).parse(body)
    return answer.prompt_tokens, answer.completion_tokens


@dataclass(slots=True)
class _Verdict:
    """How one attempt went, for the slots: ``ok`` (with its latency), ``overload``, ``other``."""

    outcome: str = "other"
    latency_s: float | None = None


# Called right before each HTTP attempt with its number and client request id; returns once
# the attempt is on the ledger (committed), so a worker killed mid-call leaves its trace.
BeforeSend = Callable[[int, str], Awaitable[None]]


class TeacherClient:
    """Sends requests to one teacher: the adaptive fleet-wide slots, the governor, one retry
    layer, and a ledger hook before every HTTP attempt.

    Waits are not failures: a 429 delays the call that got it (by its ``Retry-After``), and
    only that call, for up to ``max_inline_wait_s`` in all, without using one of
    ``max_retries``, which bound the transient failures (5xx, resets, timeouts) alone. A
    longer wait is handed back to the caller as a ``RateLimited`` carrying it.
    """

    def __init__(
        self,
        config: TeacherConfig,
        http: httpx.AsyncClient,
        *,
        api_key: SecretStr | None = None,
        governor: Governor | None = None,
        slots: SlotPool | None = None,
        max_inline_wait_s: float | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 20.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self._sleep = sleep  # a retry's wait (a test records it instead of timing it)
        self.http = http
        self.provider: Provider = provider_for(config.provider)
        # A server may echo the key anywhere in what it sends back: no part of it may reach
        # the cache, a label, a log or the database (workers.redact).
        self._redactor = Redactor([api_key.get_secret_value() if api_key else None])
        self.governor = governor or LocalGovernor(limits_of(config))
        self._slots = slots
        self._own_slots = slots is None
        self.max_inline_wait_s = (
            config.max_inline_wait_s if max_inline_wait_s is None else max_inline_wait_s
        )
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stalls = StallWatch()
        # What the teacher did last when it failed (a refused connection, a 503): a wait the
        # breaker asks for then says why, with the URL, instead of only "wait 29.6 s".
        self.last_failure: str | None = None
        self._seen_limits: tuple[int | None, int | None] | None = None
        # Absolute and parsed once: httpx re-parses a relative path on every request; the
        # client's headers are merged once too (merging them per request cost 0.1 ms a call).
        self._url = http.base_url.copy_with(
            path=http.base_url.path.rstrip("/") + self.provider.path
        )
        self._headers = list(http.headers.raw)
        self._extensions = {"timeout": http.timeout.as_dict()}

    def _request(self, payload: bytes, request_id: str) -> httpx.Request:
        headers = [*self._headers, (REQUEST_ID_HEADER_RAW, request_id.encode())]
        return httpx.Request(
            "POST", self._url, headers=headers, content=payload, extensions=self._extensions
        )

    async def aclose(self) -> None:
        """Close the HTTP client and stop the stall watch (the slots belong to the caller
        that gave them; a pool this client made itself is closed too)."""
        self.stalls.stop()
        if self._own_slots and self._slots is not None:
            await self._slots.close()
        await self.http.aclose()

    @property
    def slots(self) -> SlotPool:
        """The process's slots for this teacher (made on first use, inside the event loop)."""
        if self._slots is None:
            self._slots = SlotPool(
                self.governor,
                f"client:{os.urandom(6).hex()}",
                latency_tolerance=self.config.latency_tolerance,
            )
        return self._slots

    async def complete(
        self, request: TeacherRequest, before_send: BeforeSend | None = None
    ) -> TeacherOutcome:
        """Call the teacher, retrying transient errors; never raises for HTTP failures."""
        self.stalls.start()
        outcome = TeacherOutcome()
        failures, waited = 0, 0.0
        while True:
            try:
                await self._attempt(request, outcome, before_send)
                return outcome
            except RateLimited as exc:
                outcome.error = exc
                wait = self._retry_after(exc.retry_after_s)
                if isinstance(exc, TeacherBusy) or waited + wait > self.max_inline_wait_s:
                    exc.retry_after_s = max(wait, exc.retry_after_s or 0.0)
                    return outcome
                await self._sleep(wait)
                waited += wait
            except TransientError as exc:
                outcome.error = exc
                wait = self._backoff(failures, exc.retry_after_s)
                if failures == self.config.max_retries or wait > self.max_inline_wait_s:
                    exc.retry_after_s = max(wait, exc.retry_after_s or 0.0)
                    return outcome
                failures += 1
                await self._sleep(wait)
            except StillhouseError as exc:
                outcome.error = exc
                return outcome

    def _retry_after(self, retry_after_s: float | None) -> float:
        base = DEFAULT_RETRY_AFTER_S if retry_after_s is None else retry_after_s
        return base + random.uniform(0, min(0.25, max(0.01, base / 4)))

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return retry_after_s + random.uniform(0, 0.25)
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))

    async def _attempt(
        self, request: TeacherRequest, outcome: TeacherOutcome, before_send: BeforeSend | None
    ) -> None:
        slots = self.slots
        epoch = await slots.acquire()
        verdict = _Verdict()
        try:
            # Governor waits are not attempts: nothing was sent, so nothing goes in the ledger.
            try:
                probe = await wait_for_slot(
                    self.governor, request.tokens_estimate, self.max_inline_wait_s
                )
            except TeacherBusy as exc:
                if self.last_failure is not None and "circuit breaker" in str(exc):
                    exc.args = (f"{exc}; the last failure: {self.last_failure}",)
                raise
            await self._send(request, outcome, before_send, probe, verdict)
        finally:
            slots.release(epoch, verdict.outcome, verdict.latency_s)

    async def _send(
        self,
        request: TeacherRequest,
        outcome: TeacherOutcome,
        before_send: BeforeSend | None,
        probe: bool,
        verdict: _Verdict,
    ) -> None:
        """One HTTP attempt; ``verdict`` says how it went, for the slots."""
        request_id = os.urandom(16).hex()
        if before_send is not None:
            await before_send(len(outcome.attempts) + 1, request_id)
        started, sent_at = time.perf_counter(), self.stalls.clock()
        status: int | None = None
        rate: RateHeaders | None = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                response = await self.http.send(self._request(request.payload, request_id))
                if self._redactor.found_in(response.content):
                    response = _redacted(response, self._redactor)
                status = response.status_code
                rate = self.provider.rate_headers(response.headers)
                if status >= 400:
                    raise self.provider.map_error(response, self.config.api_key_env)
                body = _json_body(response)
                answer = self.provider.parse(body)
        except StillhouseError as exc:
            self._redact(exc)
            attempt = Attempt(False, _ms(started), status, exc.kind, request_id=request_id)
            outcome.attempts.append(attempt)
            stalled = self.stalls.stalled_since(sent_at)
            verdict.outcome = await self._failed(exc, rate, probe, stalled)
            raise
        except (TimeoutError, httpx.TransportError) as exc:
            error = self._transport_error(exc)
            self._redact(error)
            attempt = Attempt(False, _ms(started), status, error.kind, request_id=request_id)
            outcome.attempts.append(attempt)
            await self._failed(error, rate, probe, self.stalls.stalled_since(sent_at))
            raise error from exc
        stalled = self.stalls.stalled_since(sent_at)
        if probe:
            await self.governor.report("ok", probe=True)
        if rate is not None:
            await self._observe(rate)
        outcome.body, outcome.answer, outcome.error = body, answer, None
        outcome.attempts.append(
            Attempt(
                True,
                _ms(started),
                status,
                None,
                answer.prompt_tokens,
                answer.completion_tokens,
                request_id,
            )
        )
        verdict.outcome = "ok"
        verdict.latency_s = None if stalled else time.perf_counter() - started

    async def _observe(self, rate: RateHeaders) -> None:
        """Share what the rate headers say when it is news: new limits, or nothing left."""
        limits = (rate.limit_requests, rate.limit_tokens)
        if limits != self._seen_limits or rate.exhausted:
            self._seen_limits = limits
            await self.governor.observe(rate)

    async def _failed(
        self, error: StillhouseError, rate: RateHeaders | None, probe: bool, stalled: bool
    ) -> str:
        """Tell the governor what a failed attempt means; returns the slots' verdict."""
        if isinstance(error, RateLimited):
            if rate is not None and rate.exhausted:
                await self._observe(rate)  # a bucket ran dry: pace, keep the calls in flight
                return "other"
            return "overload"  # over the teacher's capacity: fewer calls in flight
        if isinstance(error, TransientError):
            self.last_failure = str(error)
            if not stalled:  # else a timeout that expired while this process was stopped
                oks = self.slots.take_oks()  # the breaker weighs failures against successes
                await self.governor.report(
                    "failure", probe=probe, oks=oks, quiet_s=self.slots.quiet_s
                )
            return "other"
        if probe:
            await self.governor.report("ok", probe=True)  # the teacher answered: it is up
        return "ok"

    def _redact(self, exc: StillhouseError) -> None:
        if self._redactor:
            message = str(exc)
            masked = self._redactor.text(message)
            if masked != message:
                exc.args = (masked,)

    def _transport_error(self, exc: Exception) -> StillhouseError:
        # httpx-aiohttp reports a refused connection as ConnectTimeout: both mean the teacher
        # could not be reached, not that it was slow to answer.
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return Unavailable(
                f"cannot connect to the teacher at {self.config.base_url}: "
                f"{type(exc).__name__}: {exc}"
            )
        if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
            return TeacherTimeout(f"no answer from the teacher within {self.config.timeout_s:g} s")
        return Unavailable(
            f"lost the connection to the teacher at {self.config.base_url}: "
            f"{type(exc).__name__}: {exc}"
        )


def _redacted(response: httpx.Response, redactor: Redactor) -> httpx.Response:
    """The same answer with every run of the key masked, before anything reads it."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        content=redactor.bytes(response.content),
        request=response.request,
        extensions=response.extensions,
    )


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        # orjson parses an answer several times faster; what it refuses (NaN, huge
        # integers) the standard parser may still read.
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    try:
        body = response.json() if body is None else body
    except ValueError as exc:
        raise BadResponse(
            f"teacher answered {response.status_code} with a body that is not "
            f"JSON: {response.text[:200]!r}"
        ) from exc
    if not isinstance(body, dict):
        raise BadResponse(f"teacher answer is not a JSON object: {str(body)[:200]}")
    return body


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
