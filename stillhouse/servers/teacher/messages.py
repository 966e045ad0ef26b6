"""The Anthropic Messages wire format over the OpenAI-shaped core of the local teacher.

A Messages request (``system``, ``messages``, a forced ``tool`` whose ``input_schema`` is the
answer's schema) becomes the chat-completions body the rest of the server answers
(:func:`chat_body`); the answer (:func:`message_body`) and errors (:func:`error_of`) go back
in Anthropic's shape, rate-limit headers included, so ``workers.providers.AnthropicProvider``
is tested over real HTTP.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from stillhouse.servers.teacher.protocol import RequestError

__all__ = ["ERROR_TYPES", "chat_body", "error_of", "forced_tool", "message_body", "rate_headers"]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p.get("text")
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return "".join(str(p) for p in parts)
    raise RequestError(f"{where} must be a string or a list of text blocks")


def forced_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The tool the request forces (``tool_choice: {type: tool, name}``), if any."""
    choice = body.get("tool_choice")
    tools = body.get("tools") or []
    if not isinstance(choice, Mapping) or choice.get("type") != "tool":
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list")
    for tool in tools:
        if isinstance(tool, Mapping) and tool.get("name") == choice.get("name"):
            if not isinstance(tool.get("input_schema"), Mapping):
                raise RequestError(f"tool {tool.get('name')!r} needs an object 'input_schema'")
            return tool
    raise RequestError(f"tool_choice names {choice.get('name')!r}, which 'tools' does not list")


def chat_body(body: Any) -> dict[str, Any]:
    """The chat-completions body a Messages request asks the same thing with."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    if not isinstance(body.get("max_tokens"), int):
        raise RequestError("'max_tokens' is required and must be an integer")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list")
    messages: list[dict[str, str]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, "'system'")})
    for index, message in enumerate(raw):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            raise RequestError(f"messages[{index}] must have role 'user' or 'assistant'")
        content = _text(message.get("content"), f"messages[{index}].content")
        messages.append({"role": str(message["role"]), "content": content})
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body["max_tokens"],
    }
    if "temperature" in body:
        chat["temperature"] = body["temperature"]
    tool = forced_tool(body)
    if tool is not None:
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": tool["name"], "schema": tool["input_schema"]},
        }
    return chat


def message_body(chat: Mapping[str, Any], tool_name: str | None) -> dict[str, Any]:
    """A chat completion, as the Messages answer for the same request."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content, refusal = message.get("content"), message.get("refusal")
    finish = choice.get("finish_reason")
    blocks: list[dict[str, Any]]
    if content is None and refusal:
        blocks, stop = [{"type": "text", "text": str(refusal)}], "refusal"
    else:
        parsed: Any = None
        if tool_name is not None and finish != "length":
            try:
                parsed = json.loads(content or "")
            except ValueError:
                parsed = None
        if isinstance(parsed, dict):
            tool_use = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}"}
            blocks = [{**tool_use, "name": tool_name, "input": parsed}]
            stop = "tool_use"
        else:  # broken or cut JSON stays what it is: a text block
            blocks = [{"type": "text", "text": content or ""}]
            stop = "max_tokens" if finish == "length" else "end_turn"
    usage = chat.get("usage") or {}
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": chat.get("model"),
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
        },
    }


def error_of(status: int, body: Any) -> dict[str, Any]:
    """An OpenAI-shaped error body, in Anthropic's shape."""
    message = "error"
    if isinstance(body, Mapping):
        error = body.get("error")
        message = str(error.get("message") if isinstance(error, Mapping) else error or body)
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _reset_at(value: str | None) -> str | None:
    """An OpenAI reset duration (``1.5s``, ``20ms``) as an RFC 3339 time."""
    if not value:
        return None
    seconds = 0.0
    try:
        if value.endswith("ms"):
            seconds = float(value[:-2]) / 1000
        elif value.endswith("s"):
            seconds = float(value[:-1])
        else:
            seconds = float(value)
    except ValueError:
        return None
    when = datetime.fromtimestamp(time.time(), UTC) + timedelta(seconds=seconds)
    return when.isoformat().replace("+00:00", "Z")


def rate_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``x-ratelimit-*`` as ``anthropic-ratelimit-*`` (and ``retry-after`` kept)."""
    out: dict[str, str] = {}
    for what in ("requests", "tokens"):
        for part, key in (("limit", "limit"), ("remaining", "remaining")):
            value = headers.get(f"x-ratelimit-{part}-{what}")
            if value is not None:
                out[f"anthropic-ratelimit-{what}-{key}"] = value
        reset = _reset_at(headers.get(f"x-ratelimit-reset-{what}"))
        if reset is not None:
            out[f"anthropic-ratelimit-{what}-reset"] = reset
    if "retry-after" in headers:
        out["retry-after"] = headers["retry-after"]
    return out
