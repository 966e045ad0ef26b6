"""What each injected fault looks like on the wire, as Starlette responses.

``before_backend`` answers the faults that need no model (429, 5xx, reset, hang);
``after_backend`` turns the model's completion into the faulty 200 (slow drip, malformed,
truncated, refusal, wrong). A reset aborts the TCP connection with an RST, so the client sees
a connection error rather than any HTTP status; that needs the ASGI server's transport,
which the app records under ``TRANSPORT_KEY`` in the scope (uvicorn's ``send`` is a bound
method of an object that holds it). Without one (an in-process test transport), a reset
raises ``ConnectionResetError`` into the caller instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from stillhouse.servers.teacher.faults import FaultDecision, FaultKind, FaultProfile
from stillhouse.servers.teacher.protocol import (
    ChatRequest,
    Completion,
    completion_body,
    error_body,
    estimate_tokens,
)
from stillhouse.servers.teacher.schema_values import wrong_answer

__all__ = ["TRANSPORT_KEY", "after_backend", "before_backend", "transport_of"]

TRANSPORT_KEY = "stillhouse.transport"
_SERVER_ERRORS = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
}


def transport_of(send: Callable[..., Any]) -> Any:
    """The connection's transport behind an ASGI ``send`` (uvicorn's), or None."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if hasattr(transport, "abort") else None


def before_backend(decision: FaultDecision, profile: FaultProfile) -> Response:
    """The response for a fault that replaces the model's answer entirely."""
    kind = decision.kind
    if kind is FaultKind.RATE_LIMIT:
        return _rate_limited(profile.retry_after_s)
    if kind is FaultKind.SERVER_ERROR:
        status = decision.rng.choice(profile.server_error_statuses)
        message = _SERVER_ERRORS.get(status, "The server had an error.")
        return JSONResponse(error_body(message, None, "server_error"), status_code=status)
    if kind is FaultKind.RESET:
        return _ResetResponse()
    return _HangResponse(profile.hang_s)


def after_backend(
    decision: FaultDecision, profile: FaultProfile, chat: ChatRequest, completion: Completion
) -> Response:
    """The faulty 200 made from the model's real completion."""
    kind = decision.kind
    if kind is FaultKind.SLOW_DRIP:
        body = completion_body(chat, completion)
        return _DripResponse(body, profile.drip_s, profile.drip_chunk_bytes)
    if kind is FaultKind.MALFORMED:
        completion = _malformed(completion, decision.rng.randrange(4))
    elif kind is FaultKind.TRUNCATED:
        completion = _truncated(completion)
    elif kind is FaultKind.REFUSAL:
        completion = _refusal(completion, profile.refusal_text)
    elif kind is FaultKind.WRONG:
        completion = _wrong(completion, chat, decision)
    return JSONResponse(completion_body(chat, completion))


def _rate_limited(retry_after_s: int) -> JSONResponse:
    message = f"Rate limit reached for requests. Please try again in {retry_after_s}s."
    headers = {
        "Retry-After": str(retry_after_s),
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{retry_after_s}s",
    }
    body = error_body(message, "rate_limit_exceeded", "requests")
    return JSONResponse(body, status_code=429, headers=headers)


def _malformed(completion: Completion, variant: int) -> Completion:
    """Content that is not JSON: cut short, prose, single-quoted, or in a Markdown fence."""
    content = completion.content or "{}"
    broken = [
        content[:-1] if content.endswith("}") else content + ",",
        "Based on the document, my answer is " + content.replace('"', ""),
        content.replace('"', "'"),
        f"```json\n{content}\n```",
    ][variant % 4]
    return replace(
        completion, content=broken, completion_tokens=estimate_tokens(broken), choices=()
    )


def _truncated(completion: Completion) -> Completion:
    """The content cut in the middle, as when ``max_tokens`` runs out."""
    content = completion.content or ""
    return replace(
        completion,
        content=content[: max(1, len(content) // 2)],
        completion_tokens=max(1, completion.completion_tokens // 2),
        finish_reason="length",
        choices=(),
    )


def _refusal(completion: Completion, text: str) -> Completion:
    """No content; the refusal text instead (OpenAI's ``message.refusal``)."""
    return replace(
        completion,
        content=None,
        refusal=text,
        completion_tokens=estimate_tokens(text),
        choices=(),
    )


def _wrong(completion: Completion, chat: ChatRequest, decision: FaultDecision) -> Completion:
    """A schema-valid answer other than the model's (another label, a reversed ranking…)."""
    try:
        answer = json.loads(completion.content or "")
    except json.JSONDecodeError:
        return completion
    content = json.dumps(wrong_answer(answer, chat.schema, decision.rng))
    return replace(completion, content=content, choices=())


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _ResetResponse(Response):
    """Close the connection with a TCP RST and send nothing."""

    def __init__(self) -> None:
        super().__init__(status_code=500)  # never sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = scope.get(TRANSPORT_KEY)
        if transport is None:
            raise ConnectionResetError("injected reset: this ASGI server exposes no transport")
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        # Return only once the server has seen the loss, or it would answer a 500.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_until_disconnect(receive), 2.0)


class _HangResponse(Response):
    """Say nothing for ``hang_s`` seconds (or until the client leaves), then a 504."""

    def __init__(self, hang_s: float) -> None:
        message = f"the teacher did not answer within {hang_s:g} s (injected hang)"
        super().__init__(
            json.dumps(error_body(message, "timeout", "server_error")),
            status_code=504,
            media_type="application/json",
        )
        self.hang_s = hang_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await asyncio.wait_for(_until_disconnect(receive), self.hang_s)
        except TimeoutError:
            await super().__call__(scope, receive, send)


class _DripResponse(Response):
    """A complete, valid 200 whose body arrives a few bytes at a time over ``drip_s``."""

    def __init__(self, content: dict[str, object], drip_s: float, chunk_bytes: int) -> None:
        super().__init__(json.dumps(content), media_type="application/json")
        self.drip_s = drip_s
        self.chunk_bytes = chunk_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, size = bytes(self.body), self.chunk_bytes
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        pause = self.drip_s / len(chunks)
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.wait({gone}, timeout=pause)
                if gone.done():
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
