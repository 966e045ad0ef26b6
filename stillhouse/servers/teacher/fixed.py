"""The model-less teacher for throughput tests: a constant, schema-valid answer after a delay.

``FixedBackend`` answers every request with the smallest value its schema allows (first
``enum`` value, 1.0 for numbers when the bounds allow, ``""``, ``[]``, nested objects filled
the same way; see ``schema_values.example_value``) after ``latency_ms`` of ``asyncio.sleep``.
With no schema it answers the first candidate label. It does no other work, so the server's
own overhead is what a benchmark against it measures.
"""

from __future__ import annotations

import asyncio
import json

from schemas.errors import ConfigError
from stillhouse.servers.teacher.protocol import (
    ChatRequest,
    Completion,
    estimate_tokens,
    prompt_tokens,
    render_answer,
)
from stillhouse.servers.teacher.schema_values import example_value

__all__ = ["DEFAULT_LATENCY_MS", "FixedBackend"]

DEFAULT_LATENCY_MS = 200.0


class FixedBackend:
    """Answers ``example_value(schema)`` after a fixed latency; nothing to load."""

    def __init__(self, *, latency_ms: float = DEFAULT_LATENCY_MS, name: str = "fixed") -> None:
        if latency_ms < 0:
            raise ConfigError(f"--latency-ms must be >= 0, got {latency_ms}")
        self.latency_s = latency_ms / 1000
        self._name = name

    @property
    def name(self) -> str:
        """The model id reported by ``/v1/models``."""
        return self._name

    async def load(self) -> None:
        """Nothing to load."""

    async def complete(self, request: ChatRequest) -> Completion:
        """The constant answer for this request's schema, after the latency."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if request.schema is None:
            content = render_answer(request, request.labels[0].name, 1.0)
        else:
            content = json.dumps(example_value(request.schema))
        return Completion(content, prompt_tokens(request), estimate_tokens(content))
