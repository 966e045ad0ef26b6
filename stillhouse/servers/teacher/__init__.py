"""The local teacher: an OpenAI-compatible HTTP server over real local models, with faults.

``create_app(backend)`` builds the Starlette app; ``serve(host, port)`` runs it under uvicorn.
Backends: ``embedding`` (zero-shot classification and ranking), ``spacy`` (extraction),
``moderation`` (hatesonar), ``llama`` (any GGUF model) and ``fixed`` (no model, for
benchmarks). A ``FaultProfile`` makes any of them slow, rate-limited or broken on purpose,
reproducibly by seed. Importing this package is light: each model library is imported inside
its backend's ``load()``.
"""

from __future__ import annotations

from stillhouse.teacher_server.app import create_app
from stillhouse.teacher_server.backends import BACKENDS, Backend, EmbeddingBackend, make_backend
from stillhouse.teacher_server.extraction import SpacyBackend
from stillhouse.teacher_server.faults import FaultKind, FaultProfile, build_profile, load_profile
from stillhouse.teacher_server.fixed import FixedBackend
from stillhouse.teacher_server.llama import LlamaBackend
from stillhouse.teacher_server.moderation import ModerationBackend
from stillhouse.teacher_server.protocol import ChatRequest, Completion
from stillhouse.teacher_server.server import serve

__all__ = [
    "BACKENDS",
    "Backend",
    "ChatRequest",
    "Completion",
    "EmbeddingBackend",
    "FaultKind",
    "FaultProfile",
    "FixedBackend",
    "LlamaBackend",
    "ModerationBackend",
    "SpacyBackend",
    "build_profile",
    "create_app",
    "load_profile",
    "make_backend",
    "serve",
]
