"""The moderation teacher: hatesonar's three classes, shaped by the schema.

``hatesonar`` (an ONNX text classifier shipped in its wheel) scores a text as
``hate_speech``, ``offensive_language`` or ``neither``. The answer is
``{"label": top class, "confidence": its probability}``; when the schema's ``label`` has an
``enum``, the top class is taken among the enum's names only (they must be hatesonar's own
names). Its ONNX graph needs the ``en_US.UTF-8`` locale installed on the machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from schemas.errors import ConfigError
from stillhouse.servers.teacher.batching import BatchedModelBackend
from stillhouse.servers.teacher.protocol import (
    ChatRequest,
    Completion,
    RequestError,
    estimate_tokens,
    prompt_tokens,
)
from stillhouse.servers.teacher.schema_values import fill_answer

__all__ = ["CLASSES", "ModerationBackend", "moderation_answer"]

CLASSES = ("hate_speech", "offensive_language", "neither")
LOCALE_FIX = (
    "hatesonar needs the en_US.UTF-8 locale: apt-get install -y locales && "
    "sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' /etc/locale.gen && locale-gen"
)


class ModerationBackend(BatchedModelBackend):
    """Three-class moderation with hatesonar; concurrent texts share one worker thread."""

    def __init__(self, *, name: str = "hatesonar", max_batch: int = 64) -> None:
        super().__init__(name=name, max_batch=max_batch)

    def _load_model(self) -> Any:
        return _load_sonar()  # ``ConfigError`` with the fix when the locale is missing

    def _validate(self, request: ChatRequest) -> None:
        _allowed(request.schema)  # a bad enum is the caller's 400, checked before batching

    def _complete_batch(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        completions = []
        for request in requests:
            result = self._model.ping(text=request.document)
            scores = {c["class_name"]: float(c["confidence"]) for c in result["classes"]}
            content = json.dumps(moderation_answer(request.schema, scores))
            completions.append(
                Completion(content, prompt_tokens(request), estimate_tokens(content))
            )
        return completions


def _load_sonar() -> Any:
    from hatesonar import Sonar

    try:
        return Sonar()
    except Exception as exc:  # onnxruntime raises its own Fail type
        if "locale" in str(exc).lower():
            raise ConfigError(LOCALE_FIX) from exc
        raise


def _allowed(schema: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The classes the answer may use: the schema's label enum, or all three."""
    properties = schema.get("properties") if schema is not None else None
    label = properties.get("label") if isinstance(properties, Mapping) else None
    enum = label.get("enum") if isinstance(label, Mapping) else None
    if not isinstance(enum, list) or not enum:
        return CLASSES
    unknown = [name for name in enum if name not in CLASSES]
    if unknown:
        raise RequestError(
            f"the moderation teacher's labels are {', '.join(CLASSES)}; "
            f"properties.label.enum has {', '.join(map(str, unknown))}"
        )
    return tuple(enum)


def moderation_answer(
    schema: Mapping[str, Any] | None, scores: Mapping[str, float]
) -> dict[str, Any]:
    """The answer object for class probabilities ``scores``: best allowed class and its prob."""
    allowed = _allowed(schema)
    label = max(allowed, key=lambda name: scores.get(name, 0.0))
    return fill_answer(schema, {"label": label, "confidence": round(scores[label], 4)})
