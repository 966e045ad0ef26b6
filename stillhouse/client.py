"""A small client for producers: send live samples to ``stillhouse serve``.

    from stillhouse.client import StillhouseClient

    with StillhouseClient("http://127.0.0.1:8080", token="s3cret") as client:
        result = client.submit("triage", rows)
        print(result.counts)  # {"inserted": 98, "duplicate": 2, ...}

Asyncio producers use ``AsyncStillhouseClient`` the same way (``async with``, ``await
client.submit(...)``).

``submit`` splits rows into batches that fit the server's batch and body limits (read once
from ``GET /v1/limits``), and retries a batch answered 429 or 503, or lost to a connection
error, honoring ``Retry-After``, until ``max_wait_s`` of waiting is spent. Retrying is safe:
the server dedupes on the external id, and sampling is decided by the id, so a retried batch
gets the same outcome. A 4xx raises ``SubmitRejected`` (401: ``Unauthorized``) with the
server's message; rows the server found invalid are results, not errors. Every error the
client raises is a :class:`ClientError`, itself a ``schemas.errors.StillhouseError``: one
error tree for the whole package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from schemas.errors import StillhouseError

__all__ = [
    "AsyncStillhouseClient",
    "ClientError",
    "ServerBusy",
    "StillhouseClient",
    "SubmitRejected",
    "SubmitResult",
    "Unauthorized",
]

OUTCOMES = ("inserted", "duplicate", "sampled_out", "capped", "invalid")
_ENVELOPE_BYTES = 256  # room for '{"spec": …, "items": [ … ]}' around the rows


class ClientError(StillhouseError):
    """Base of the client's errors; ``status`` is the HTTP status when there was one."""

    kind = "client"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class SubmitRejected(ClientError):
    """The server refused the request (4xx): fix the request, retrying will not help."""

    kind = "submit_rejected"


class Unauthorized(SubmitRejected):
    """401: the token is missing or not one the server accepts."""

    kind = "unauthorized"


class ServerBusy(ClientError):
    """Still 429/503 (or unreachable) after ``max_wait_s`` of retries: try again later."""

    kind = "server_busy"


@dataclass(slots=True)
class SubmitResult:
    """Outcomes of every submitted row; ``index`` is the row's position in ``submit``'s input.

    ``requests`` counts the POSTs sent (retries included), ``retries`` the ones repeated.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    results: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0

    def _add(self, body: Mapping[str, Any], offset: int) -> None:
        for outcome, n in body["counts"].items():
            self.counts[outcome] = self.counts.get(outcome, 0) + int(n)
        for row in body["results"]:
            self.results.append({**row, "index": row["index"] + offset})

    def by_outcome(self, outcome: str) -> list[dict[str, Any]]:
        return [row for row in self.results if row["outcome"] == outcome]


class StillhouseClient:
    """Synchronous client over one ``httpx.Client`` (connection pooling, keep-alive)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        max_wait_s: float = 60.0,
        batch_size: int | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._http = httpx.Client(transport=transport, **_http_options(base_url, token, timeout_s))
        self.max_wait_s = max_wait_s
        self._clock, self._sleep = clock, sleep
        self.batch_size = batch_size
        self._limits: dict[str, Any] | None = None

    def __enter__(self) -> StillhouseClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def limits(self) -> dict[str, Any]:
        """The server's ``max_batch``, ``max_body_bytes`` and served specs (fetched once)."""
        if self._limits is None:
            self._limits = self._send("GET", "/v1/limits", None, SubmitResult())
        return self._limits

    def submit(self, spec: str, items: Iterable[Mapping[str, Any]]) -> SubmitResult:
        """Send rows for ``spec`` in batches; returns every row's outcome and the counts."""
        result = SubmitResult()
        for offset, batch in _batches(items, *_sizes(self.limits(), self.batch_size), result):
            body = self._send("POST", "/v1/items", {"spec": spec, "items": batch}, result)
            result._add(body, offset)
        result.results.sort(key=lambda row: row["index"])
        return result

    def _send(self, method: str, path: str, payload: Any, result: SubmitResult) -> dict[str, Any]:
        retry = _Retry(self.max_wait_s, result, self._clock)
        while True:
            try:
                response = self._http.request(method, path, json=payload)
            except httpx.TransportError as exc:
                self._sleep(retry.after_error(exc))
            else:
                if response.status_code not in (429, 503):
                    return _body_or_raise(response)
                self._sleep(retry.after_busy(response))


class AsyncStillhouseClient:
    """The same client for asyncio producers, over one ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        max_wait_s: float = 60.0,
        batch_size: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        options = _http_options(base_url, token, timeout_s)
        self._http = httpx.AsyncClient(transport=transport, **options)
        self.max_wait_s = max_wait_s
        self._clock, self._sleep = clock, sleep
        self.batch_size = batch_size
        self._limits: dict[str, Any] | None = None

    async def __aenter__(self) -> AsyncStillhouseClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def limits(self) -> dict[str, Any]:
        """The server's ``max_batch``, ``max_body_bytes`` and served specs (fetched once)."""
        if self._limits is None:
            self._limits = await self._send("GET", "/v1/limits", None, SubmitResult())
        return self._limits

    async def submit(self, spec: str, items: Iterable[Mapping[str, Any]]) -> SubmitResult:
        """Send rows for ``spec`` in batches; returns every row's outcome and the counts."""
        result = SubmitResult()
        sizes = _sizes(await self.limits(), self.batch_size)
        for offset, batch in _batches(items, *sizes, result):
            body = await self._send("POST", "/v1/items", {"spec": spec, "items": batch}, result)
            result._add(body, offset)
        result.results.sort(key=lambda row: row["index"])
        return result

    async def _send(
        self, method: str, path: str, payload: Any, result: SubmitResult
    ) -> dict[str, Any]:
        retry = _Retry(self.max_wait_s, result, self._clock)
        while True:
            try:
                response = await self._http.request(method, path, json=payload)
            except httpx.TransportError as exc:
                await self._sleep(retry.after_error(exc))
            else:
                if response.status_code not in (429, 503):
                    return _body_or_raise(response)
                await self._sleep(retry.after_busy(response))


class _Retry:
    """One request's retries: how long to wait next, or ``ServerBusy`` once past the budget."""

    def __init__(self, max_wait_s: float, result: SubmitResult, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.deadline = clock() + max_wait_s
        self.attempt = 0
        self.result = result
        result.requests += 1

    def after_error(self, exc: httpx.TransportError) -> float:
        return self._next(_backoff(self.attempt), f"cannot reach the server: {exc!r}")

    def after_busy(self, response: httpx.Response) -> float:
        why = f"{response.status_code}: {_message(response)}"
        return self._next(_retry_after(response, self.attempt), why)

    def _next(self, wait: float, why: str) -> float:
        if self.clock() + wait > self.deadline:
            raise ServerBusy(f"gave up after {self.attempt + 1} attempts ({why})")
        self.attempt += 1
        self.result.retries += 1
        self.result.requests += 1
        return wait


def _http_options(base_url: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return {"base_url": base_url.rstrip("/"), "headers": headers, "timeout": timeout_s}


def _sizes(limits: Mapping[str, Any], batch_size: int | None) -> tuple[int, int]:
    """Rows and bytes per batch under the server's limits (and the caller's batch size)."""
    max_batch = min(batch_size or limits["max_batch"], limits["max_batch"])
    return max_batch, int(limits["max_body_bytes"]) - _ENVELOPE_BYTES


def _batches(
    items: Iterable[Mapping[str, Any]], max_batch: int, max_bytes: int, result: SubmitResult
) -> Iterator[tuple[int, list[Mapping[str, Any]]]]:
    """Batches under both limits, with the input index of their first row."""
    batch: list[Mapping[str, Any]] = []
    start, size = 0, 0
    for index, row in enumerate(items):
        row_bytes = len(json.dumps(row, ensure_ascii=False).encode()) + 2
        if row_bytes > max_bytes:  # would be refused whole: report it, keep the others
            result.counts["invalid"] += 1
            result.results.append(
                {"index": index, "id": None, "outcome": "invalid", "reason": "row too large"}
            )
            continue
        if batch and (len(batch) >= max_batch or size + row_bytes > max_bytes):
            yield start, batch
            batch, size = [], 0
        if not batch:
            start = index
        batch.append(row)
        size += row_bytes
    if batch:
        yield start, batch


def _backoff(attempt: int) -> float:
    return float(min(0.5 * 2**attempt, 10.0))


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):  # absent, or an HTTP date: fall back to our backoff
        return _backoff(attempt)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _body_or_raise(response: httpx.Response) -> dict[str, Any]:
    body: Any = None
    with contextlib.suppress(ValueError):  # a proxy's HTML error page, say
        body = response.json()
    if response.status_code == 422 and isinstance(body, dict) and "results" in body:
        return body  # every row invalid: outcomes, not an error
    if response.is_success and isinstance(body, dict):
        return body
    code = body["error"].get("code") if isinstance(body, dict) and "error" in body else None
    error: type[ClientError] = SubmitRejected
    if response.status_code == 401:
        error = Unauthorized
    elif not response.is_client_error:
        error = ClientError
    raise error(
        f"{response.request.method} {response.request.url.path} answered "
        f"{response.status_code}: {_message(response)}",
        status=response.status_code,
        code=code,
    )
