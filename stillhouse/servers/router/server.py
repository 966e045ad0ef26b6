"""Run the router under uvicorn (``stillhouse route serve RUN``): one process, its student in
memory, its fallbacks through a labeling runtime of its own."""

from __future__ import annotations

import asyncio
import gc

import uvicorn

from stillhouse.router import Router
from stillhouse.servers.ingest.server import check_bind
from stillhouse.servers.router.app import RouterLimits, create_app
from stillhouse.servers.serving import ReadLimits, serve_announced, uvicorn_config
from stillhouse.settings import Settings

__all__ = ["serve"]


def serve(
    settings: Settings,
    run: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8090,
    insecure_no_auth: bool = False,
    store: bool | None = None,
    log_level: str = "warning",
) -> None:
    """Serve until interrupted; prints ``stillhouse router listening on URL`` once bound."""
    check_bind(host, insecure_no_auth=insecure_no_auth)
    with Router.open(settings, run, store=store) as router:
        app = create_app(
            router,
            tokens=settings.api_tokens,
            limits=RouterLimits(settings.api_max_body_bytes, settings.api_max_batch),
            insecure_no_auth=insecure_no_auth,
        )
        limits = ReadLimits(settings.api_read_timeout_s, settings.api_max_connections)
        # What is loaded now (torch, the student, the runtime) lives as long as the server:
        # out of the collector's sight, a full collection stops scanning it mid-request.
        gc.collect()
        gc.freeze()
        config = uvicorn_config(
            app, limits, host=host, port=port, log_level=log_level, access_log=False
        )
        asyncio.run(serve_announced(uvicorn.Server(config), host, "stillhouse router"))
