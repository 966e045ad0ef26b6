"""The local teacher: an OpenAI-compatible HTTP server over real local models, with faults.

``create_app(backend)`` builds the Starlette app; ``serve(host, port)`` runs it under uvicorn.
Backends: ``embedding`` (zero-shot classification and ranking), ``spacy`` (extraction),
``moderation`` (hatesonar), ``llama`` (any GGUF model) and ``fixed`` (no model, for
benchmarks). A ``FaultProfile`` makes any of them slow, rate-limited or broken on purpose,
reproducibly by seed. Importing this package is light: each model library is imported inside
its backend's ``load()``.
"""

from __future__ import annotations

from stillhouse.servers.teacher.app import create_app
from stillhouse.servers.teacher.backends import BACKENDS, Backend, EmbeddingBackend, make_backend
from stillhouse.servers.teacher.extraction import SpacyBackend
from stillhouse.servers.teacher.faults import FaultKind, FaultProfile, build_profile, load_profile
from stillhouse.servers.teacher.fixed import FixedBackend
from stillhouse.servers.teacher.llama import LlamaBackend
from stillhouse.servers.teacher.moderation import ModerationBackend
from stillhouse.servers.teacher.protocol import ChatRequest, Completion
from stillhouse.servers.teacher.server import serve

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
