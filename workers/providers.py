"""Provider adapters: how one teacher API shapes requests, answers and errors.

Both adapters are thin: they build a JSON body, read a JSON answer into an :class:`Answer`,
and map HTTP errors into the error tree. The HTTP client, retries and the governor are shared
(``workers.teacher``). Refusals and truncation are answers, not errors: the checks turn them
into the reason codes ``refused`` and ``truncated``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from schemas.errors import (
    BadResponse,
    ConfigError,
    RateLimited,
    RequestRejected,
    StillhouseError,
    Unavailable,
)
from workers.spec import TeacherConfig

__all__ = [
    "Answer",
    "AnthropicProvider",
    "OpenAIProvider",
    "Provider",
    "RateHeaders",
    "parse_duration",
    "parse_retry_after",
    "provider_for",
]


@dataclass(frozen=True, slots=True)
class Answer:
    """A teacher answer, normalized across providers.

    ``finish_reason`` is ``stop``, ``length`` (cut by the token limit), ``refusal`` or
    another provider value; ``samples`` holds every sampled content (``n`` > 1).
    """

    content: str | None
    finish_reason: str | None = "stop"
    refusal: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    samples: list[str | None] = field(default_factory=list)
    logprob_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """What a teacher's rate-limit headers say: per-minute limits, what is left, and the
    seconds until each is full again (None where a header is missing)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @property
    def exhausted(self) -> bool:
        """The server says nothing more fits now (requests or tokens)."""
        return self.remaining_requests == 0 or self.remaining_tokens == 0


class Provider(Protocol):
    name: str
    path: str

    def body(
        self,
        config: TeacherConfig,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        schema_name: str,
    ) -> dict[str, Any]: ...

    def auth_headers(self, api_key: str) -> dict[str, str]: ...

    def parse(self, body: dict[str, Any]) -> Answer: ...

    def map_error(self, response: httpx.Response, api_key_env: str | None) -> StillhouseError: ...

    def rate_headers(self, headers: httpx.Headers) -> RateHeaders | None: ...


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds from OpenAI's reset durations (``20ms``, ``1.5s``, ``6m0s``, ``1h2m``)."""
    if not value:
        return None
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _int_header(headers: httpx.Headers, name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _retry_after_of(headers: httpx.Headers) -> float | None:
    """``retry-after-ms`` (OpenAI's and Azure's precise form) first, then ``Retry-After``."""
    precise = headers.get("retry-after-ms")
    if precise is not None:
        try:
            return max(0.0, float(precise) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    import email.utils
    import time

    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(payload)[:300]


def _common_error(response: httpx.Response, api_key_env: str | None) -> StillhouseError:
    status, detail = response.status_code, _error_detail(response)
    retry_after = _retry_after_of(response.headers)
    if status == 429:
        return RateLimited(
            f"teacher rate-limited the request (429): {detail}", retry_after_s=retry_after
        )
    if status in (401, 403):
        where = f"the key in {api_key_env}" if api_key_env else "the request (no API key is set)"
        return ConfigError(
            f"the teacher refused {where} with {status}: {detail}; "
            f"set a valid key in the variable teacher.api_key_env names"
        )
    # 5xx includes Anthropic's 529 "overloaded": back off and retry like a 503.
    if status == 408 or status >= 500:
        return Unavailable(f"teacher unavailable ({status}): {detail}", retry_after_s=retry_after)
    return RequestRejected(f"teacher rejected the request ({status}): {detail}", status_code=status)


class OpenAIProvider:
    """OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM, TGI)."""

    name = "openai"
    path = "/chat/completions"

    def body(
        self,
        config: TeacherConfig,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        schema_name: str,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": config.model,
            "messages": messages,
            "max_tokens": config.max_output_tokens,
            **config.params,
        }
        if config.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True},
            }
        elif config.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        if config.samples > 1:
            body["n"] = config.samples
        if config.logprobs:
            body["logprobs"] = True
        return body

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def parse(self, body: dict[str, Any]) -> Answer:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise BadResponse(f"teacher answer has no choices: {str(body)[:200]}")
        first = choices[0] if isinstance(choices[0], dict) else {}
        message = first.get("message") or {}
        content = message.get("content")
        refusal = message.get("refusal")
        finish = "refusal" if refusal and content is None else first.get("finish_reason")
        usage = body.get("usage") or {}
        return Answer(
            content=content if isinstance(content, str) else None,
            finish_reason=finish,
            refusal=refusal if isinstance(refusal, str) else None,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            samples=[
                (c.get("message") or {}).get("content") for c in choices if isinstance(c, dict)
            ],
            logprob_confidence=_sequence_probability(first.get("logprobs")),
        )

    def map_error(self, response: httpx.Response, api_key_env: str | None) -> StillhouseError:
        return _common_error(response, api_key_env)

    def rate_headers(self, headers: httpx.Headers) -> RateHeaders | None:
        """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (also sent by
        Azure, vLLM behind a gateway, LiteLLM and the local teacher)."""
        names = ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens")
        if not any(name in headers for name in names):
            return None
        return RateHeaders(
            _int_header(headers, "x-ratelimit-limit-requests"),
            _int_header(headers, "x-ratelimit-remaining-requests"),
            parse_duration(headers.get("x-ratelimit-reset-requests")),
            _int_header(headers, "x-ratelimit-limit-tokens"),
            _int_header(headers, "x-ratelimit-remaining-tokens"),
            parse_duration(headers.get("x-ratelimit-reset-tokens")),
        )


def _sequence_probability(logprobs: Any) -> float | None:
    """The probability of the whole answer, from per-token logprobs (OpenAI's shape)."""
    tokens = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list) or not tokens:
        return None
    total = sum(float(t.get("logprob", 0.0)) for t in tokens if isinstance(t, dict))
    return round(math.exp(total), 6)


class AnthropicProvider:
    """The Anthropic Messages API; structured output through one forced tool call."""

    name = "anthropic"
    path = "/messages"
    version = "2023-06-01"

    def body(
        self,
        config: TeacherConfig,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        schema_name: str,
    ) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body: dict[str, Any] = {
            "model": config.model,
            "max_tokens": config.max_output_tokens,
            "messages": [m for m in messages if m["role"] != "system"],
            **config.params,
        }
        if system:
            body["system"] = system
        if config.response_format != "none":
            body["tools"] = [
                {
                    "name": schema_name,
                    "input_schema": schema,
                    "description": "Record the answer in this exact structure.",
                }
            ]
            body["tool_choice"] = {"type": "tool", "name": schema_name}
        return body

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": self.version}

    def parse(self, body: dict[str, Any]) -> Answer:
        blocks = body.get("content")
        if not isinstance(blocks, list):
            raise BadResponse(f"teacher answer has no content blocks: {str(body)[:200]}")
        content = _anthropic_content(blocks)
        stop = body.get("stop_reason")
        finish = {"max_tokens": "length", "refusal": "refusal"}.get(str(stop), "stop")
        usage = body.get("usage") or {}
        return Answer(
            content=None if finish == "refusal" else content,
            finish_reason=finish,
            refusal=content if finish == "refusal" else None,
            prompt_tokens=int(usage.get("input_tokens") or 0),
            completion_tokens=int(usage.get("output_tokens") or 0),
            samples=[content],
        )

    def map_error(self, response: httpx.Response, api_key_env: str | None) -> StillhouseError:
        return _common_error(response, api_key_env)

    def rate_headers(self, headers: httpx.Headers) -> RateHeaders | None:
        """``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (reset is an
        RFC 3339 time)."""
        prefix = "anthropic-ratelimit-"
        if f"{prefix}requests-limit" not in headers and f"{prefix}tokens-limit" not in headers:
            return None
        return RateHeaders(
            _int_header(headers, f"{prefix}requests-limit"),
            _int_header(headers, f"{prefix}requests-remaining"),
            _seconds_until(headers.get(f"{prefix}requests-reset")),
            _int_header(headers, f"{prefix}tokens-limit"),
            _int_header(headers, f"{prefix}tokens-remaining"),
            _seconds_until(headers.get(f"{prefix}tokens-reset")),
        )


def _seconds_until(value: str | None) -> float | None:
    """Seconds from now until an RFC 3339 time (Anthropic's reset headers)."""
    import datetime

    if not value:
        return None
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _anthropic_content(blocks: list[Any]) -> str | None:
    for block in blocks:
        if isinstance(block, dict) and block.get("type") == "tool_use":
            return json.dumps(block.get("input"), ensure_ascii=False)
    texts = [b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
    return "".join(texts) if texts else None


_PROVIDERS: dict[str, Provider] = {"openai": OpenAIProvider(), "anthropic": AnthropicProvider()}


def provider_for(name: str) -> Provider:
    try:
        return _PROVIDERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown teacher provider {name!r}; use one of {', '.join(sorted(_PROVIDERS))}"
        ) from None
