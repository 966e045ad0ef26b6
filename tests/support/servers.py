"""A real uvicorn server on a loopback port, in a thread (a real socket: resets and timeouts
are real); shared by the teacher and the ingest API tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from stillhouse.servers.serving import ReadLimits, uvicorn_config


@contextmanager
def serve_in_thread(
    app: Any, *, http: str = "auto", lifespan: str = "auto", limits: ReadLimits | None = None
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 and a free port, as stillhouse serves it (the read guards
    of ``stillhouse.servers.serving`` included); yields the root URL."""
    config = uvicorn_config(
        app,
        limits,
        parser=http,
        host="127.0.0.1",
        port=0,
        lifespan=lifespan,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the threaded server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
