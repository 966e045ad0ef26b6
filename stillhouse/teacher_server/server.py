"""Run the teacher app under uvicorn: one process, one worker, model loaded before binding."""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from stillhouse.teacher_server.app import create_app
from stillhouse.teacher_server.backends import Backend, make_backend

__all__ = ["serve"]


def serve(
    host: str,
    port: int,
    backend: str | Backend = "embedding",
    api_key: str | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the teacher until interrupted (SIGINT/SIGTERM shut it down gracefully).

    Prints ``stillhouse teacher listening on http://HOST:PORT/v1`` to stderr once the model
    is loaded and the socket is bound; with ``port=0`` the line carries the port chosen.
    """
    model = make_backend(backend) if isinstance(backend, str) else backend
    asyncio.run(_serve(model, host, port, api_key, log_level))


async def _serve(
    backend: Backend, host: str, port: int, api_key: str | None, log_level: str
) -> None:
    await backend.load()  # before binding, so a connection never waits on the model
    app = create_app(backend, api_key=api_key)
    config = uvicorn.Config(
        app, host=host, port=port, workers=1, log_level=log_level, access_log=False
    )
    server = uvicorn.Server(config)
    announce = asyncio.create_task(_announce_when_started(server, host))
    try:
        await server.serve()
    finally:
        announce.cancel()


async def _announce_when_started(server: uvicorn.Server, host: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"stillhouse teacher listening on http://{host}:{port}/v1", file=sys.stderr, flush=True)
