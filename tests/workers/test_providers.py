"""Provider adapters: request bodies, answer parsing and error mapping, OpenAI and Anthropic."""

from __future__ import annotations

import asyncio
import copy
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas.errors import (
    BadResponse,
    ConfigError,
    RateLimited,
    RequestRejected,
    Unavailable,
)
from storage.models import Verdict
from workers.checks import Checker
from workers.providers import (
    AnthropicProvider,
    OpenAIProvider,
    RateHeaders,
    parse_duration,
    provider_for,
)
from workers.spec import TeacherConfig, load_spec, parse_spec
from workers.teacher import TeacherClient, build_request

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["label", "confidence"],
}
MESSAGES = [
    {"role": "system", "content": "Route documents."},
    {"role": "system", "content": "Answer with JSON."},
    {"role": "user", "content": "doc"},
]

openai = OpenAIProvider()
anthropic = AnthropicProvider()


def config(**overrides: Any) -> TeacherConfig:
    return TeacherConfig(**{"model": "m", **overrides})


def response(status: int, body: Any = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body or {"error": {"message": "nope"}}, headers=headers)


# --- OpenAI-compatible: bodies --------------------------------------------------------------


def test_openai_body_json_schema() -> None:
    body = openai.body(
        config(params={"temperature": 0}, max_output_tokens=77), MESSAGES, SCHEMA, "triage"
    )

    assert body["model"] == "m"
    assert body["messages"] == MESSAGES
    assert body["max_tokens"] == 77
    assert body["temperature"] == 0
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True},
    }
    assert "n" not in body
    assert "logprobs" not in body


def test_openai_body_json_object_and_none() -> None:
    as_object = openai.body(config(response_format="json_object"), MESSAGES, SCHEMA, "t")
    plain = openai.body(config(response_format="none"), MESSAGES, SCHEMA, "t")

    assert as_object["response_format"] == {"type": "json_object"}
    assert "response_format" not in plain


def test_openai_body_samples_and_logprobs() -> None:
    body = openai.body(config(samples=3, logprobs=True), MESSAGES, SCHEMA, "t")

    assert body["n"] == 3
    assert body["logprobs"] is True


# --- OpenAI-compatible: answers -------------------------------------------------------------


def test_openai_parse_content_usage_and_samples() -> None:
    answer = openai.parse(
        {
            "choices": [
                {"finish_reason": "stop", "message": {"content": '{"label": "a"}'}},
                {"finish_reason": "stop", "message": {"content": '{"label": "b"}'}},
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5},
        }
    )

    assert answer.content == '{"label": "a"}'
    assert answer.finish_reason == "stop"
    assert answer.refusal is None
    assert (answer.prompt_tokens, answer.completion_tokens) == (12, 5)
    assert answer.samples == ['{"label": "a"}', '{"label": "b"}']
    assert answer.logprob_confidence is None


def test_openai_parse_length_finish_reason() -> None:
    answer = openai.parse({"choices": [{"finish_reason": "length", "message": {"content": "{"}}]})

    assert (answer.content, answer.finish_reason) == ("{", "length")
    assert (answer.prompt_tokens, answer.completion_tokens) == (0, 0)


def test_openai_parse_refusal() -> None:
    answer = openai.parse(
        {
            "choices": [
                {
                    "finish_reason": "stop",
                    "message": {"content": None, "refusal": "I can't help with that."},
                }
            ]
        }
    )

    assert answer.content is None
    assert answer.finish_reason == "refusal"
    assert answer.refusal == "I can't help with that."


def test_openai_parse_logprob_confidence() -> None:
    tokens = [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.25}]
    answer = openai.parse(
        {
            "choices": [
                {
                    "finish_reason": "stop",
                    "message": {"content": "{}"},
                    "logprobs": {"content": tokens},
                }
            ]
        }
    )

    assert answer.logprob_confidence == pytest.approx(math.exp(-0.35), abs=1e-6)


@pytest.mark.parametrize("body", [{}, {"choices": []}, {"choices": None}])
def test_openai_parse_without_choices_is_bad_response(body: dict[str, Any]) -> None:
    with pytest.raises(BadResponse):
        openai.parse(body)


# --- Anthropic: bodies and headers ----------------------------------------------------------


def test_anthropic_body_system_tools_and_max_tokens() -> None:
    body = anthropic.body(
        config(params={"temperature": 0}, max_output_tokens=99), MESSAGES, SCHEMA, "triage"
    )

    assert body["model"] == "m"
    assert body["system"] == "Route documents.\n\nAnswer with JSON."
    assert body["messages"] == [{"role": "user", "content": "doc"}]
    assert all(m["role"] != "system" for m in body["messages"])
    assert body["max_tokens"] == 99
    assert body["temperature"] == 0
    assert len(body["tools"]) == 1
    tool = body["tools"][0]
    assert tool["name"] == "triage"
    assert tool["input_schema"] == SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": "triage"}
    assert "response_format" not in body


def test_anthropic_body_without_structure_or_system() -> None:
    body = anthropic.body(
        config(response_format="none"), [{"role": "user", "content": "doc"}], SCHEMA, "t"
    )

    assert "tools" not in body
    assert "tool_choice" not in body
    assert "system" not in body
    assert body["max_tokens"] == 256


def test_auth_headers() -> None:
    assert anthropic.auth_headers("sk-ant") == {
        "x-api-key": "sk-ant",
        "anthropic-version": "2023-06-01",
    }
    assert openai.auth_headers("sk-oai") == {"Authorization": "Bearer sk-oai"}


# --- Anthropic: answers ---------------------------------------------------------------------


def test_anthropic_parse_tool_use() -> None:
    answer = anthropic.parse(
        {
            "content": [
                {"type": "text", "text": "Here is the answer."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "triage",
                    "input": {"label": "sport", "confidence": 0.9},
                },
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 40, "output_tokens": 9},
        }
    )

    assert answer.content is not None
    assert json.loads(answer.content) == {"label": "sport", "confidence": 0.9}
    assert answer.finish_reason == "stop"
    assert answer.refusal is None
    assert (answer.prompt_tokens, answer.completion_tokens) == (40, 9)
    assert answer.samples == [answer.content]


def test_anthropic_parse_text_blocks() -> None:
    answer = anthropic.parse(
        {
            "content": [
                {"type": "text", "text": '{"label": '},
                {"type": "text", "text": '"tech"}'},
            ],
            "stop_reason": "end_turn",
        }
    )

    assert answer.content == '{"label": "tech"}'
    assert answer.finish_reason == "stop"


def test_anthropic_parse_max_tokens_is_length() -> None:
    answer = anthropic.parse(
        {"content": [{"type": "text", "text": '{"lab'}], "stop_reason": "max_tokens"}
    )

    assert answer.finish_reason == "length"
    assert answer.content == '{"lab'


def test_anthropic_parse_refusal() -> None:
    answer = anthropic.parse(
        {"content": [{"type": "text", "text": "I won't do that."}], "stop_reason": "refusal"}
    )

    assert answer.content is None
    assert answer.finish_reason == "refusal"
    assert answer.refusal == "I won't do that."


def test_anthropic_parse_without_content_is_bad_response() -> None:
    with pytest.raises(BadResponse):
        anthropic.parse({"type": "message", "stop_reason": "end_turn"})


# --- Anthropic: errors ----------------------------------------------------------------------


def test_anthropic_429_carries_retry_after() -> None:
    error = anthropic.map_error(response(429, **{"retry-after": "7"}), "ANTHROPIC_API_KEY")

    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 7.0
    assert "nope" in str(error)


@pytest.mark.parametrize("status", [529, 500, 503])
def test_anthropic_overloaded_and_5xx_are_unavailable(status: int) -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

    error = anthropic.map_error(response(status, body), None)

    assert isinstance(error, Unavailable)
    assert "Overloaded" in str(error)


def test_anthropic_400_is_rejected() -> None:
    error = anthropic.map_error(response(400), "ANTHROPIC_API_KEY")

    assert isinstance(error, RequestRejected)
    assert error.status_code == 400


@pytest.mark.parametrize("status", [401, 403])
def test_anthropic_auth_errors_name_the_env_var(status: int) -> None:
    error = anthropic.map_error(response(status), "MY_ANTHROPIC_KEY")

    assert isinstance(error, ConfigError)
    assert "MY_ANTHROPIC_KEY" in str(error)
    assert str(status) in str(error)


# --- choosing a provider --------------------------------------------------------------------


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        provider_for("nope")

    assert "'nope'" in str(caught.value)
    assert "anthropic" in str(caught.value)
    assert "openai" in str(caught.value)


def anthropic_spec_body() -> dict[str, Any]:
    body = copy.deepcopy(load_spec("triage").body)
    body["teacher"]["provider"] = "anthropic"
    body["teacher"]["model"] = "claude-x"
    return body


def test_spec_accepts_anthropic_provider() -> None:
    spec = parse_spec(anthropic_spec_body())

    assert spec.teacher.provider == "anthropic"
    assert provider_for(spec.teacher.provider).name == "anthropic"


# --- end to end through the teacher client and the checks -----------------------------------


def tool_use_body(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "triage", "input": answer}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 30, "output_tokens": 8},
    }


def test_teacher_client_talks_to_anthropic_messages() -> None:
    teacher = TeacherConfig(
        model="claude-x", provider="anthropic", base_url="http://a.test/v1", max_retries=2
    )
    request = build_request(teacher, MESSAGES, SCHEMA, "triage")
    sent: list[httpx.Request] = []
    replies = [
        httpx.Response(529, json={"type": "error", "error": {"message": "Overloaded"}}),
        httpx.Response(200, json=tool_use_body({"label": "sport", "confidence": 0.8})),
    ]

    def handler(http_request: httpx.Request) -> httpx.Response:
        sent.append(http_request)
        return replies.pop(0)

    async def go() -> Any:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url=teacher.base_url, transport=transport) as http:
            client = TeacherClient(teacher, http, backoff_base_s=0.001)
            return await client.complete(request)

    outcome = asyncio.run(go())

    assert outcome.body == tool_use_body({"label": "sport", "confidence": 0.8})
    assert [str(r.url) for r in sent] == ["http://a.test/v1/messages"] * 2
    posted = json.loads(sent[-1].content)
    assert posted["system"] == "Route documents.\n\nAnswer with JSON."
    assert posted["tool_choice"] == {"type": "tool", "name": "triage"}
    assert outcome.answer is not None
    assert json.loads(outcome.answer.content) == {"label": "sport", "confidence": 0.8}
    assert [(a.ok, a.http_status, a.error_kind) for a in outcome.attempts] == [
        (False, 529, "unavailable"),
        (True, 200, None),
    ]
    assert (outcome.attempts[-1].prompt_tokens, outcome.attempts[-1].completion_tokens) == (30, 8)


def test_checker_reads_anthropic_bodies() -> None:
    checker = Checker(parse_spec(anthropic_spec_body()))
    known = {"label": "sport"}

    right = checker.check_body(
        tool_use_body({"label": "sport", "confidence": 0.9}), known, provider="anthropic"
    )
    wrong = checker.check_body(
        tool_use_body({"label": "tech", "confidence": 0.9}), known, provider="anthropic"
    )
    as_openai = checker.check_body(tool_use_body({"label": "sport", "confidence": 0.9}), known)

    assert right.verdict == Verdict.ACCEPTED
    assert right.reasons == []
    assert right.output == {"label": "sport", "confidence": 0.9}
    assert right.known_good_match is True
    assert wrong.verdict == Verdict.REJECTED
    assert wrong.reasons == ["known_good_mismatch:label"]
    assert as_openai.reasons == ["bad_response"]


def test_checker_turns_anthropic_refusal_into_refused() -> None:
    checker = Checker(parse_spec(anthropic_spec_body()))
    body = {"content": [{"type": "text", "text": "No."}], "stop_reason": "refusal"}

    result = checker.check_body(body, {"label": "sport"}, provider="anthropic")

    assert (result.verdict, result.reasons) == (Verdict.REJECTED, ["refused"])


# --- rate-limit headers ----------------------------------------------------------------------


def test_openai_rate_headers_are_read_with_their_durations() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "6000",
            "x-ratelimit-remaining-requests": "5990",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "400ms",
        }
    )
    rate = provider_for("openai").rate_headers(headers)

    assert rate == RateHeaders(6000, 5990, 360.0, 150000, 149000, 0.4)
    assert not rate.exhausted


def test_anthropic_rate_headers_are_read_with_their_reset_times() -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    headers = httpx.Headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": soon,
        }
    )
    rate = provider_for("anthropic").rate_headers(headers)

    assert rate is not None and rate.limit_requests == 50 and rate.exhausted
    assert rate.reset_requests_s is not None and 28 < rate.reset_requests_s <= 30


def test_no_rate_headers_is_none() -> None:
    assert provider_for("openai").rate_headers(httpx.Headers({})) is None
    assert provider_for("anthropic").rate_headers(httpx.Headers({"x-other": "1"})) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20ms", 0.02), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("7", 7.0)],
)
def test_reset_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_garbage_durations_are_none() -> None:
    assert parse_duration("soon") is None
    assert parse_duration(None) is None


def test_retry_after_ms_is_preferred_to_retry_after() -> None:
    response = httpx.Response(
        429, headers={"retry-after-ms": "250", "retry-after": "1"}, json={"error": {}}
    )
    error = provider_for("openai").map_error(response, None)

    assert isinstance(error, RateLimited)
    assert error.retry_after_s == pytest.approx(0.25)
