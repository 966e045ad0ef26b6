"""The OpenAI chat-completions wire format, as far as a labelling teacher needs it.

``parse_chat_request`` turns a request body into a ``ChatRequest`` (the prompt, the document,
the candidate labels and the requested answer schema) or raises ``RequestError`` saying what
is wrong; ``render_answer`` and ``completion_body`` build the reply. Candidate labels are
required only when no answer schema is given: a schema without a ``label`` enum (ranking,
extraction, moderation) is for the backend to judge.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChatRequest",
    "Choice",
    "Completion",
    "Label",
    "Message",
    "RequestError",
    "completion_body",
    "error_body",
    "estimate_tokens",
    "parse_chat_request",
    "prompt_tokens",
    "render_answer",
]

# Chat templates add a few tokens per message (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 4

_DOCUMENT = re.compile(r"<document>(.*?)</document>", re.DOTALL)
_LABELS = re.compile(r"<labels>(.*?)</labels>", re.DOTALL)
_LABEL_LINE = re.compile(r"^\s*[-*]\s*([^:\n]+?)\s*(?::\s*(.*?))?\s*$")
# Words and punctuation: close to a BPE tokenizer's count on English prose.
_TOKEN = re.compile(r"\w+|[^\w\s]")


class RequestError(ValueError):
    """A request the server cannot answer as sent; the message says what is wrong."""


@dataclass(frozen=True)
class Message:
    """One chat message, reduced to its role and plain-text content."""

    role: str
    content: str


@dataclass(frozen=True)
class Label:
    """A candidate label and the description it is matched against."""

    name: str
    description: str

    @property
    def text(self) -> str:
        """The text that is embedded for this label."""
        return f"{self.name}: {self.description}"


@dataclass(frozen=True)
class ChatRequest:
    """A parsed request: what to label, with which labels, in which shape.

    ``prompt`` is the last user message in full, for backends that read more than the
    ``<document>`` block (ranking reads ``<query>`` and ``<candidate>`` blocks from it).
    """

    model: str
    messages: tuple[Message, ...]
    document: str
    labels: tuple[Label, ...]
    schema: Mapping[str, Any] | None
    prompt: str = ""
    # Sampling, as OpenAI takes it: ``n`` answers, drawn at ``temperature`` (0 or None: the
    # most likely answer every time), reproducibly by ``seed``; ``logprobs`` asks for each
    # answer token's log probability, with the ``top_logprobs`` most likely alternatives.
    n: int = 1
    temperature: float | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def wants(self, field: str) -> bool:
        """Whether the answer should carry ``field`` (every field when no schema was given)."""
        if self.schema is None:
            return True
        properties = self.schema.get("properties")
        return isinstance(properties, Mapping) and field in properties


@dataclass(frozen=True)
class Completion:
    """A backend's answer: the assistant content and the token counts for ``usage``.

    ``content`` is None only for a refusal, which then carries ``refusal`` text.
    """

    content: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    refusal: str | None = None
    # Every sampled answer (n > 1) or one answer with its logprobs: ``choices`` of the body.
    # Empty: one choice, ``content``, repeated ``n`` times by ``completion_body``.
    choices: tuple[Choice, ...] = ()


@dataclass(frozen=True)
class Choice:
    """One sampled answer, and its tokens with their log probabilities when asked for
    (OpenAI's ``logprobs.content`` shape: ``{"token", "logprob", "bytes", "top_logprobs"}``)."""

    content: str
    logprobs: tuple[dict[str, Any], ...] | None = None


def parse_chat_request(body: object, *, default_model: str = "minilm-zero-shot") -> ChatRequest:
    """Validate a decoded JSON body and pull out the document, labels and answer schema."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    user = [m for m in messages if m.role == "user"]
    if not user:
        raise RequestError("'messages' has no message with role 'user'")
    # The document is wherever the conversation gave it: a repair re-ask comes after it.
    prompt = next(
        (m.content for m in reversed(user) if "<document>" in m.content), user[-1].content
    )
    schema = _schema(body.get("response_format"))
    labels = _labels(schema, messages)
    model = body.get("model")
    return ChatRequest(
        model=model if isinstance(model, str) and model else default_model,
        messages=messages,
        document=_document(prompt),
        labels=labels,
        schema=schema,
        prompt=prompt,
        **_sampling(body),
    )


MAX_SAMPLES = 16


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """``n``, ``temperature``, ``seed``, ``logprobs`` and ``top_logprobs``, checked."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise RequestError(f"'n' must be an integer from 1 to {MAX_SAMPLES}, got {n!r}")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature <= 2
    ):
        raise RequestError(f"'temperature' must be a number from 0 to 2, got {temperature!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}")
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise RequestError(f"'logprobs' must be true or false, got {logprobs!r}")
    top = body.get("top_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20
    ):
        raise RequestError(f"'top_logprobs' must be an integer from 0 to 20, got {top!r}")
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true")
    return {
        "n": n,
        "temperature": None if temperature is None else float(temperature),
        "seed": seed,
        "logprobs": logprobs,
        "top_logprobs": top or 0,
    }


def _messages(raw: object) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of chat messages")
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("role"), str):
            raise RequestError(f"messages[{index}] must be an object with a string 'role'")
        messages.append(Message(item["role"], _content(item.get("content"), index)))
    return tuple(messages)


def _content(raw: object, index: int) -> str:
    """Plain text of a message: a string, or the text parts of a content-part list."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        parts = [p.get("text") for p in raw if isinstance(p, Mapping) and p.get("type") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    raise RequestError(f"messages[{index}].content must be a string or a list of parts")


def _document(prompt: str) -> str:
    """The text inside the last ``<document>`` block, or the whole prompt without one."""
    blocks = _DOCUMENT.findall(prompt)
    return str(blocks[-1]).strip() if blocks else prompt.strip()


def _schema(response_format: object) -> Mapping[str, Any] | None:
    """The JSON schema the answer must follow, or None for json_object / no format."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise RequestError("'response_format' must be an object")
    if response_format.get("type") != "json_schema":
        return None
    wrapper = response_format.get("json_schema")
    schema = wrapper.get("schema") if isinstance(wrapper, Mapping) else None
    if not isinstance(schema, Mapping):
        raise RequestError("response_format.json_schema.schema must be an object")
    return schema


def _labels(schema: Mapping[str, Any] | None, messages: Sequence[Message]) -> tuple[Label, ...]:
    """Candidate labels: the schema's ``label`` enum, described by the ``<labels>`` block."""
    described = _described_labels(messages)
    names = _enum(schema) or list(described)
    if not names and schema is None:
        raise RequestError(
            "no candidate labels: give properties.label.enum in the response_format schema "
            "or a '<labels>' block of '- name: description' lines in the prompt"
        )
    return tuple(Label(name, described.get(name) or name) for name in names)


def _enum(schema: Mapping[str, Any] | None) -> list[str]:
    properties = schema.get("properties") if schema is not None else None
    label = properties.get("label") if isinstance(properties, Mapping) else None
    enum = label.get("enum") if isinstance(label, Mapping) else None
    if enum is None:
        return []
    if not isinstance(enum, list) or not all(isinstance(v, str) and v for v in enum):
        raise RequestError("properties.label.enum must be a list of non-empty strings")
    return list(dict.fromkeys(enum))


def _described_labels(messages: Sequence[Message]) -> dict[str, str]:
    """``name -> description`` from the last ``<labels>`` block, searching newest first."""
    for message in reversed(messages):
        blocks = _LABELS.findall(message.content)
        if blocks:
            return _label_lines(str(blocks[-1]))
    return {}


def _label_lines(block: str) -> dict[str, str]:
    described: dict[str, str] = {}
    for line in block.splitlines():
        match = _LABEL_LINE.match(line)
        if match:
            described[match.group(1)] = (match.group(2) or "").strip()
    return described


def render_answer(request: ChatRequest, label: str, confidence: float) -> str:
    """The assistant content: a JSON object with only the fields the schema asks for."""
    answer: dict[str, object] = {"label": label}
    if request.wants("confidence"):
        answer["confidence"] = confidence
    return json.dumps(answer)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count (words and punctuation marks), for model-less backends."""
    return len(_TOKEN.findall(text))


def prompt_tokens(request: ChatRequest, count: Callable[[str], int] = estimate_tokens) -> int:
    """Prompt tokens for ``usage``: each message's tokens plus the chat template's overhead."""
    return sum(count(message.content) + MESSAGE_OVERHEAD_TOKENS for message in request.messages)


def completion_body(request: ChatRequest, completion: Completion) -> dict[str, object]:
    """The OpenAI ``chat.completion`` object for one answer."""
    answers: Sequence[Choice | None] = completion.choices or [None] * request.n
    choices = []
    for index, choice in enumerate(answers):
        content = completion.content if choice is None else choice.content
        message: dict[str, object] = {"role": "assistant", "content": content}
        if completion.refusal is not None:
            message["refusal"] = completion.refusal
        entry: dict[str, object] = {
            "index": index,
            "message": message,
            "finish_reason": completion.finish_reason,
        }
        if request.logprobs:
            tokens = None if choice is None or choice.logprobs is None else list(choice.logprobs)
            entry["logprobs"] = None if tokens is None else {"content": tokens, "refusal": None}
        choices.append(entry)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }


def error_body(
    message: str, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, object]:
    """An OpenAI-style error object; ``kind`` is its ``type`` field."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
