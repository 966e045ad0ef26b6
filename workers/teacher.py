"""The teacher client: OpenAI-compatible chat completions over one ``httpx.AsyncClient``.

This is the only retry layer: 429, 5xx, resets and timeouts are retried with exponential
backoff and full jitter that honours ``Retry-After``; a wait longer than ``max_inline_wait_s``
is handed back to the caller, which writes it to the item as ``retry_at`` in the database.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from schemas.errors import (
    BadResponse,
    ConfigError,
    RateLimited,
    RequestRejected,
    StillhouseError,
    TeacherTimeout,
    TransientError,
    Unavailable,
)
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
]


@dataclass(frozen=True, slots=True)
class TeacherRequest:
    """A normalized request body and its hash (the cache key); carries no secret."""

    body: dict[str, Any]
    request_hash: str
    provider: str
    model: str


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
    """The raw successful body, or the last error, plus every attempt made."""

    attempts: list[Attempt] = field(default_factory=list)
    body: dict[str, Any] | None = None
    error: StillhouseError | None = None


def build_request(
    config: TeacherConfig,
    messages: list[dict[str, str]],
    output_schema: dict[str, Any],
    schema_name: str,
) -> TeacherRequest:
    """Build the chat-completions body; its hash covers everything that shapes the answer."""
    body: dict[str, Any] = {"model": config.model, "messages": messages, **config.params}
    if config.response_format == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema_name, "schema": output_schema, "strict": True},
        }
    elif config.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    canonical = json.dumps(
        {"provider": config.provider, "body": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return TeacherRequest(
        body=body,
        request_hash=hashlib.sha256(canonical.encode()).hexdigest(),
        provider=config.provider,
        model=config.model,
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
        headers["Authorization"] = f"Bearer {key}"
    base_url = config.base_url.rstrip("/")
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=AiohttpTransport(limits=limits, trust_env=False),
        )
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits, trust_env=False
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def map_http_error(response: httpx.Response, api_key_env: str | None) -> StillhouseError:
    """Map a non-2xx answer into the error tree (what the caller should do next)."""
    status, detail = response.status_code, _error_detail(response)
    if status == 429:
        return RateLimited(
            f"teacher rate-limited the request (429): {detail}",
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    if status in (401, 403):
        where = f"the key in {api_key_env}" if api_key_env else "the request (no API key is set)"
        return ConfigError(
            f"the teacher refused {where} with {status}: {detail}; "
            f"set a valid key in teacher.api_key_env's variable"
        )
    if status == 408 or status >= 500:
        return Unavailable(
            f"teacher unavailable ({status}): {detail}",
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    return RequestRejected(f"teacher rejected the request ({status}): {detail}", status_code=status)


def _error_detail(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(payload)[:300]


class TeacherClient:
    """Sends requests to one teacher with bounded concurrency and our single retry layer."""

    def __init__(
        self,
        config: TeacherConfig,
        http: httpx.AsyncClient,
        *,
        max_inline_wait_s: float = 30.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 20.0,
    ) -> None:
        self.config = config
        self.http = http
        self.max_inline_wait_s = max_inline_wait_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._semaphore = asyncio.Semaphore(config.concurrency)

    async def complete(self, request: TeacherRequest) -> TeacherOutcome:
        """Call the teacher, retrying transient errors; never raises for HTTP failures."""
        outcome = TeacherOutcome()
        for attempt in range(self.config.max_retries + 1):
            try:
                async with self._semaphore:
                    outcome.body = await self._attempt(request, outcome)
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

    async def _attempt(self, request: TeacherRequest, outcome: TeacherOutcome) -> dict[str, Any]:
        started = time.perf_counter()
        status: int | None = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                response = await self.http.post("/chat/completions", json=request.body)
            status = response.status_code
            if status >= 400:
                raise map_http_error(response, self.config.api_key_env)
            body = _json_body(response)
        except StillhouseError as exc:
            outcome.attempts.append(_failed(started, status, exc.kind))
            raise
        except (TimeoutError, httpx.TimeoutException) as exc:
            outcome.attempts.append(_failed(started, status, TeacherTimeout.kind))
            raise TeacherTimeout(
                f"no answer from the teacher within {self.config.timeout_s:g} s"
            ) from exc
        except httpx.TransportError as exc:
            outcome.attempts.append(_failed(started, status, Unavailable.kind))
            raise Unavailable(
                f"cannot reach the teacher at {self.config.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        prompt_tokens, completion_tokens = usage_of(body)
        outcome.attempts.append(
            Attempt(True, _ms(started), status, None, prompt_tokens, completion_tokens)
        )
        return body


def usage_of(body: dict[str, Any]) -> tuple[int, int]:
    usage = body.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise BadResponse(
            f"teacher answered {response.status_code} with a body that is not "
            f"JSON: {response.text[:200]!r}"
        ) from exc
    if not isinstance(body, dict) or not body.get("choices"):
        raise BadResponse(f"teacher answer has no choices: {str(body)[:200]}")
    return body


def _failed(started: float, status: int | None, kind: str) -> Attempt:
    return Attempt(False, _ms(started), status, kind)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
