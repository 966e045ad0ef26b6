"""The local teacher: an OpenAI-compatible HTTP server backed by a real zero-shot model.

``create_app(backend)`` builds the Starlette app; ``serve(host, port)`` runs it under uvicorn.
Importing this package is light: the model library is imported inside ``Backend.load()``.
"""

from __future__ import annotations

from stillhouse.teacher_server.app import create_app
from stillhouse.teacher_server.backends import Backend, EmbeddingBackend, make_backend
from stillhouse.teacher_server.protocol import ChatRequest, Completion
from stillhouse.teacher_server.server import serve

__all__ = [
    "Backend",
    "ChatRequest",
    "Completion",
    "EmbeddingBackend",
    "create_app",
    "make_backend",
    "serve",
]
