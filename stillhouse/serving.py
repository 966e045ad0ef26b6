"""Serving an ASGI app with uvicorn, shared by the local teacher and the ingest API."""

from __future__ import annotations

import asyncio
import sys

import uvicorn

__all__ = ["serve_announced"]


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
