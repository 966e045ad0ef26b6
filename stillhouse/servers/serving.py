"""Serving an ASGI app with uvicorn, shared by every server stillhouse runs (the ingest API,
the local teacher, and the servers to come).

uvicorn reads a request's headers and body for as long as the client cares to send them: a
client that sends ``Content-Length: 500`` and 7 bytes, a chunked body that never ends, or a
thousand connections with unfinished headers would hold them open indefinitely. The protocols
here bound that, whichever HTTP parser uvicorn runs (httptools or h11):

- a request must arrive whole (headers and body) within ``read_timeout_s`` of its first byte
  (or of the connection's opening): past it the server answers ``408`` and closes;
- a request's headers may take at most :data:`MAX_HEADER_BYTES` (past it, ``431``);
- at most ``max_connections`` connections are open at once: one more is answered ``503``
  and closed at once.

The answer to a request already being served is never cut: the deadline covers reading only.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 it is
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

__all__ = [
    "MAX_HEADER_BYTES",
    "GuardedH11",
    "ReadLimits",
    "guarded_protocol",
    "serve_announced",
    "uvicorn_config",
]

MAX_HEADER_BYTES = 64 * 1024
LIMITS_ENV = "STILLHOUSE_READ_LIMITS"


@dataclass(frozen=True, slots=True)
class ReadLimits:
    read_timeout_s: float = 15.0
    max_connections: int = 1000


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": reason.lower().replace(" ", "_"), "message": message}})
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    ).encode()


def _limits_from_environment() -> ReadLimits:
    raw = os.environ.get(LIMITS_ENV)
    return ReadLimits(**json.loads(raw)) if raw else ReadLimits()


class _Guard:
    """The deadline, header cap and connection cap, mixed into a uvicorn HTTP protocol
    (first in the bases: its connection hooks wrap the protocol's own)."""

    limits: ReadLimits = _limits_from_environment()
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    _deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _in_headers = True

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._guard_connection()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.limits.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is not None:
            if getattr(cycle, "response_started", False):
                self.transport.close()  # mid-answer: nothing more can be said
                return
            cycle.disconnected = True  # the app's receive() sees a disconnect, its send() is void
            cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, reason, message))
            self.transport.close()

    def _expired(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and getattr(cycle, "response_started", False):
            return
        self._refuse(
            408,
            "Request Timeout",
            f"the request did not arrive whole within {self.limits.read_timeout_s:g} s",
        )

    def _guard_connection(self) -> bool:
        if len(self.connections) > self.limits.max_connections:
            self.transport.write(
                _raw_response(503, "Service Unavailable", "too many open connections: retry")
            )
            self.transport.close()
            return False
        self._arm()
        return True

    def _count_header_bytes(self, data: bytes) -> bool:
        """After the parser has seen ``data``: False (and a 431) when headers that are
        still unfinished have passed the cap."""
        if not self._in_headers:
            return True
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"the request's headers are over {MAX_HEADER_BYTES} bytes",
            )
            return False
        return True


class GuardedH11(_Guard, H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol with the read guards."""

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._deadline is None:
            self._in_headers, self._header_bytes = True, 0
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._in_headers = False
        if not self._count_header_bytes(data):
            return
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._disarm()


if HttpToolsProtocol is not None:

    class GuardedHttpTools(_Guard, HttpToolsProtocol):  # type: ignore[misc]
        """uvicorn's httptools protocol with the read guards."""

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._count_header_bytes(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers, self._header_bytes = True, 0
            self._arm()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()


def guarded_protocol(limits: ReadLimits, parser: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's protocol class on ``parser`` (``auto``: httptools when installed, else
    h11), with the read guards at ``limits``. The limits also go into the environment, so
    that the worker processes of ``uvicorn.run(workers=N)``, which import this module
    afresh, apply the same ones."""
    os.environ[LIMITS_ENV] = json.dumps(
        {"read_timeout_s": limits.read_timeout_s, "max_connections": limits.max_connections}
    )
    h11_wanted = parser == "h11" or (parser == "auto" and HttpToolsProtocol is None)
    cls: type[asyncio.Protocol] = GuardedH11 if h11_wanted else GuardedHttpTools
    cls.limits = limits  # type: ignore[attr-defined]
    return cls


def uvicorn_config(
    app: Any, limits: ReadLimits | None = None, *, parser: str = "auto", **options: Any
) -> uvicorn.Config:
    """A uvicorn config on the fastest parser installed (or ``parser``), with the guards."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(limits or ReadLimits(), parser),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        **options,
    )


async def serve_announced(server: uvicorn.Server, host: str, what: str, path: str = "") -> None:
    """Run ``server`` and print ``{what} listening on http://HOST:PORT{path}`` once it is bound
    (port 0 picks a free port, so the line is how a caller learns it)."""
    announce = asyncio.create_task(_announce_when_started(server, host, what, path))
    try:
        await server.serve()
    finally:
        announce.cancel()


async def _announce_when_started(server: uvicorn.Server, host: str, what: str, path: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"{what} listening on http://{host}:{port}{path}", file=sys.stderr, flush=True)
