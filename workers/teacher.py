"""The teacher client: one ``httpx.AsyncClient`` per teacher, a provider adapter, the governor.

This is the only retry layer: 429, 5xx, resets and timeouts are retried with exponential
backoff and full jitter that honours ``Retry-After``; a wait longer than the teacher's
``max_inline_wait_s`` is handed back to the caller, which writes it to the item as
``retry_at`` in the database (never a Celery countdown).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from schemas.errors import (
    BadResponse,
    ConfigError,
    PermanentError,
    StillhouseError,
    TeacherTimeout,
    TransientError,
    Unavailable,
)
from workers.governor import Governor, GovernorLimits, LocalGovernor, wait_for_slot
from workers.providers import Answer, Provider, parse_retry_after, provider_for
from workers.spec import TeacherConfig

__all__ = [
    "Attempt",
    "TeacherClient",
    "TeacherOutcome",
    "TeacherRequest",
    "build_request",
    "make_http_client",
    "map_http_error",
    "parse_retry_after",
    "usage_of",
]

# A conservative prompt-token estimate (English runs about 4 characters a token) for limits
# and budget reservations before the teacher tells us the real count.
CHARS_PER_TOKEN_ESTIMATE = 3.0


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


@dataclass(slots=True)
class TeacherOutcome:
    """The raw successful body and its parsed answer, or the error that ended the tries.

    ``error`` is None whenever ``body`` is set; ``attempts`` lists every try either way.
    """

    attempts: list[Attempt] = field(default_factory=list)
    body: dict[str, Any] | None = None
    answer: Answer | None = None
    error: StillhouseError | None = None


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


def make_http_client(config: TeacherConfig, *, transport: str = "aiohttp") -> httpx.AsyncClient:
    """One client per process and teacher, sized to the spec's concurrency."""
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=config.concurrency
    )
    timeout = httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s))
    headers = {"Content-Type": "application/json"}
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ConfigError(
                f"the spec's teacher.api_key_env names {config.api_key_env}, "
                f"but that environment variable is not set: export it first"
            )
        headers.update(provider_for(config.provider).auth_headers(key))
    base_url = config.base_url.rstrip("/")
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return _StatelessClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=AiohttpTransport(
                limits=limits, trust_env=False, client=lambda: _aiohttp_session(config)
            ),
        )
    return _StatelessClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits, trust_env=False
    )


def _aiohttp_session(config: TeacherConfig) -> Any:
    """The aiohttp session under httpx: sized to the spec, and keeping no cookies either."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=config.concurrency, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
    )


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: teacher APIs are stateless, and parsing every
    response for cookies cost about a tenth of a millisecond of CPU per call."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class _StatelessClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` without cookie handling (the only change)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = _NoCookies()


def map_http_error(
    response: httpx.Response, api_key_env: str | None, provider: str = "openai"
) -> StillhouseError:
    """Map a non-2xx answer into the error tree (what the caller should do next)."""
    return provider_for(provider).map_error(response, api_key_env)


def usage_of(body: dict[str, Any], provider: str = "openai") -> tuple[int, int]:
    answer = provider_for(provider).parse(body)
    return answer.prompt_tokens, answer.completion_tokens


class TeacherClient:
    """Sends requests to one teacher: bounded concurrency, the governor, one retry layer."""

    def __init__(
        self,
        config: TeacherConfig,
        http: httpx.AsyncClient,
        *,
        governor: Governor | None = None,
        max_inline_wait_s: float | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 20.0,
    ) -> None:
        self.config = config
        self.http = http
        self.provider: Provider = provider_for(config.provider)
        # A server may echo the key in an error body; it must not reach a log or the database.
        self._secret = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.governor = governor or LocalGovernor(GovernorLimits.from_config(config))
        self.max_inline_wait_s = (
            config.max_inline_wait_s if max_inline_wait_s is None else max_inline_wait_s
        )
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._semaphore = asyncio.Semaphore(config.concurrency)
        # Absolute and parsed once: httpx re-parses a relative path on every request.
        self._url = http.base_url.copy_with(
            path=http.base_url.path.rstrip("/") + self.provider.path
        )

    async def complete(self, request: TeacherRequest) -> TeacherOutcome:
        """Call the teacher, retrying transient errors; never raises for HTTP failures."""
        outcome = TeacherOutcome()
        for attempt in range(self.config.max_retries + 1):
            try:
                async with self._semaphore:
                    await self._attempt(request, outcome)
                return outcome
            except TransientError as exc:
                outcome.error = exc
                wait = self._backoff(attempt, exc.retry_after_s)
                if attempt == self.config.max_retries or wait > self.max_inline_wait_s:
                    exc.retry_after_s = max(wait, exc.retry_after_s or 0.0)
                    return outcome
                await asyncio.sleep(wait)
            except StillhouseError as exc:
                outcome.error = exc
                return outcome
        return outcome

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return retry_after_s + random.uniform(0, 0.25)
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))

    async def _attempt(self, request: TeacherRequest, outcome: TeacherOutcome) -> None:
        # Governor waits are not attempts: nothing was sent, so nothing goes in the ledger.
        report_ok = await wait_for_slot(
            self.governor, request.tokens_estimate, self.max_inline_wait_s
        )
        started = time.perf_counter()
        status: int | None = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                response = await self.http.post(self._url, content=request.payload)
                status = response.status_code
                if status >= 400:
                    raise self.provider.map_error(response, self.config.api_key_env)
                body = _json_body(response)
                answer = self.provider.parse(body)
        except StillhouseError as exc:
            self._redact(exc)
            await self._failed(outcome, started, status, exc)
            raise
        except (TimeoutError, httpx.TransportError) as exc:
            error = self._transport_error(exc)
            await self._failed(outcome, started, status, error)
            raise error from exc
        if report_ok:
            await self.governor.report("ok")
        outcome.body, outcome.answer, outcome.error = body, answer, None
        outcome.attempts.append(
            Attempt(
                True, _ms(started), status, None, answer.prompt_tokens, answer.completion_tokens
            )
        )

    def _redact(self, exc: StillhouseError) -> None:
        if self._secret and self._secret in str(exc):
            exc.args = (str(exc).replace(self._secret, "***"),)

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

    async def _failed(
        self, outcome: TeacherOutcome, started: float, status: int | None, error: StillhouseError
    ) -> None:
        outcome.attempts.append(Attempt(False, _ms(started), status, error.kind))
        if error.kind == "rate_limited":
            await self.governor.report("rate_limited", getattr(error, "retry_after_s", None))
        elif isinstance(error, TransientError):
            await self.governor.report("failure")
        elif isinstance(error, PermanentError):
            await self.governor.report("ok")  # the teacher answered: it is up (closes a probe)


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
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
