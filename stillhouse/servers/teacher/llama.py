"""The LLM teacher: any GGUF model through llama-cpp-python, held to the answer schema.

The request's messages go to the model's own chat template; when the request carries a
``json_schema`` response format, decoding is constrained by the grammar llama.cpp derives
from that schema, so the answer parses and validates (unless it runs out of ``max_tokens``,
which is reported as ``finish_reason: "length"``, as OpenAI does). ``llama_cpp`` is imported
in ``load()``: it has no wheel on PyPI and builds from source, so it is an optional install.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError
from stillhouse.servers.teacher.protocol import ChatRequest, Completion

__all__ = ["LlamaBackend"]

INSTALL_HINT = (
    "the llama backend needs llama-cpp-python: pip install llama-cpp-python "
    "(it builds llama.cpp from source, about 10 minutes)"
)


class LlamaBackend:
    """A local GGUF model; one generation at a time (a llama.cpp context is not shareable)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        max_tokens: int = 512,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.max_tokens = max_tokens
        self._llm: Any = None
        self._grammars: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        """The model id reported by ``/v1/models``: the GGUF file's stem."""
        return self.model_path.stem

    async def load(self) -> None:
        """Open the GGUF file; ``ConfigError`` when it or ``llama_cpp`` is missing."""
        if self._llm is None:
            self._llm = await asyncio.to_thread(self._load_model)

    def _load_model(self) -> Any:
        llama_cpp = _import_llama_cpp()
        if not self.model_path.is_file():
            raise ConfigError(f"--model {self.model_path}: no such GGUF file")
        return llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            verbose=False,
        )

    async def complete(self, request: ChatRequest) -> Completion:
        """Generate one answer, constrained by the request's schema."""
        if self._llm is None:
            raise RuntimeError("LlamaBackend.complete() called before load()")
        async with self._lock:
            return await asyncio.to_thread(self._generate, request)

    def _generate(self, request: ChatRequest) -> Completion:
        constraint: dict[str, Any] = {"response_format": {"type": "json_object"}}
        if request.schema is not None:
            constraint = {"grammar": self._grammar(request.schema)}
        result = self._llm.create_chat_completion(
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            temperature=0.0,
            max_tokens=self.max_tokens,
            **constraint,
        )
        choice, usage = result["choices"][0], result["usage"]
        return Completion(
            content=choice["message"]["content"] or "",
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            finish_reason=choice.get("finish_reason") or "stop",
        )

    def _grammar(self, schema: Mapping[str, Any]) -> Any:
        """The GBNF grammar for a schema, built once per distinct schema."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            llama_cpp = _import_llama_cpp()
            self._grammars[key] = llama_cpp.LlamaGrammar.from_json_schema(key, verbose=False)
        return self._grammars[key]


def _import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or ``ConfigError`` naming the package to install."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return llama_cpp
