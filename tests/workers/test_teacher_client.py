"""The teacher client against httpx.MockTransport: retries, error mapping, request hashing."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas.errors import (
    BadResponse,
    ConfigError,
    RateLimited,
    RequestRejected,
    TeacherTimeout,
    TransientError,
    Unavailable,
)
from workers.redact import SHOWN_AT_MOST, Redactor
from workers.spec import TeacherConfig
from workers.teacher import (
    TeacherClient,
    TeacherOutcome,
    TeacherRequest,
    build_request,
    make_http_client,
    parse_retry_after,
    teacher_key,
)

BASE_URL = "http://teacher.test/v1"
MESSAGES = [{"role": "system", "content": "Route it."}, {"role": "user", "content": "doc"}]
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
OK_BODY = {
    "id": "cmpl-1",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": '{"label": "sport"}'},
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def ok() -> httpx.Response:
    return httpx.Response(200, json=OK_BODY)


def replies(*responses: httpx.Response | Exception) -> Handler:
    """A handler that answers with each response in turn, repeating the last one."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


def make_config(**overrides: Any) -> TeacherConfig:
    return TeacherConfig(**{"model": "m", "max_retries": 3, "timeout_s": 5, **overrides})


def request_for(config: TeacherConfig) -> TeacherRequest:
    return build_request(config, MESSAGES, SCHEMA, "triage")


def run(
    handler: Handler,
    *,
    config: TeacherConfig | None = None,
    before_send_hook: Any = None,
    **client_kwargs: Any,
) -> tuple[TeacherOutcome, list[httpx.Request], float]:
    """Send one request through a TeacherClient; return the outcome, what was sent, seconds."""
    config = config or make_config()
    sent: list[httpx.Request] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        answer = handler(request)
        return await answer if isinstance(answer, Awaitable) else answer

    async def go() -> TeacherOutcome:
        transport = httpx.MockTransport(recording)
        async with httpx.AsyncClient(base_url=BASE_URL, transport=transport) as http:
            client = TeacherClient(config, http, backoff_base_s=0.001, **client_kwargs)
            return await client.complete(request_for(config), before_send_hook)

    started = time.perf_counter()
    outcome = asyncio.run(go())
    return outcome, sent, time.perf_counter() - started


# --- TeacherClient.complete ------------------------------------------------------------------


def test_success_returns_body_and_one_ok_attempt() -> None:
    outcome, sent, _ = run(replies(ok()))

    assert outcome.body == OK_BODY
    assert outcome.error is None
    assert len(outcome.attempts) == 1
    attempt = outcome.attempts[0]
    assert attempt.ok is True
    assert attempt.http_status == 200
    assert attempt.error_kind is None
    assert (attempt.prompt_tokens, attempt.completion_tokens) == (12, 3)
    assert attempt.latency_ms >= 0
    assert len(sent) == 1
    assert sent[0].method == "POST"
    assert str(sent[0].url) == f"{BASE_URL}/chat/completions"
    assert json.loads(sent[0].content) == request_for(make_config()).body


def test_success_without_usage_counts_zero_tokens() -> None:
    body = {"choices": OK_BODY["choices"]}

    outcome, _, _ = run(replies(httpx.Response(200, json=body)))

    assert outcome.body == body
    assert (outcome.attempts[0].prompt_tokens, outcome.attempts[0].completion_tokens) == (0, 0)


def test_429_with_retry_after_zero_then_success() -> None:
    outcome, sent, _ = run(
        replies(
            httpx.Response(
                429, headers={"Retry-After": "0"}, json={"error": {"message": "slow down"}}
            ),
            ok(),
        )
    )

    assert len(sent) == 2
    assert [a.ok for a in outcome.attempts] == [False, True]
    assert outcome.attempts[0].error_kind == "rate_limited"
    assert outcome.attempts[0].http_status == 429
    assert outcome.body == OK_BODY


def test_503_twice_then_success() -> None:
    outcome, sent, _ = run(replies(httpx.Response(503), httpx.Response(503), ok()))

    assert len(sent) == 3
    assert [(a.ok, a.http_status, a.error_kind) for a in outcome.attempts] == [
        (False, 503, "unavailable"),
        (False, 503, "unavailable"),
        (True, 200, None),
    ]
    assert outcome.body == OK_BODY


def test_500_always_gives_up_after_max_retries() -> None:
    outcome, sent, _ = run(replies(httpx.Response(500, json={"error": {"message": "boom"}})))

    assert len(sent) == 4  # max_retries + 1
    assert len(outcome.attempts) == 4
    assert all(a.error_kind == "unavailable" and not a.ok for a in outcome.attempts)
    assert outcome.body is None
    assert isinstance(outcome.error, Unavailable)
    assert isinstance(outcome.error, TransientError)
    assert "500" in str(outcome.error)
    assert "boom" in str(outcome.error)
    assert outcome.error.retry_after_s is not None


def test_max_retries_zero_means_one_attempt() -> None:
    outcome, sent, _ = run(replies(httpx.Response(503)), config=make_config(max_retries=0))

    assert len(sent) == 1
    assert isinstance(outcome.error, Unavailable)


def test_long_retry_after_is_handed_back_not_slept() -> None:
    outcome, sent, seconds = run(replies(httpx.Response(429, headers={"Retry-After": "120"})))

    assert seconds < 2
    assert len(sent) == 1
    assert isinstance(outcome.error, RateLimited)
    assert outcome.error.retry_after_s is not None
    assert outcome.error.retry_after_s >= 120
    assert outcome.body is None


def test_retry_after_on_503_is_honoured() -> None:
    outcome, sent, _ = run(replies(httpx.Response(503, headers={"Retry-After": "3600"})))

    assert len(sent) == 1
    assert isinstance(outcome.error, Unavailable)
    assert outcome.error.retry_after_s is not None
    assert outcome.error.retry_after_s >= 3600


def test_max_inline_wait_is_configurable() -> None:
    outcome, sent, _ = run(
        replies(httpx.Response(429, headers={"Retry-After": "0"}), ok()), max_inline_wait_s=0.0
    )

    # Even a zero Retry-After gets jitter on top, which exceeds a zero inline budget.
    assert len(sent) == 1
    assert isinstance(outcome.error, RateLimited)


def test_400_is_rejected_without_retry() -> None:
    outcome, sent, _ = run(
        replies(httpx.Response(400, json={"error": {"message": "bad schema"}}), ok())
    )

    assert len(sent) == 1
    assert isinstance(outcome.error, RequestRejected)
    assert outcome.error.status_code == 400
    assert "bad schema" in str(outcome.error)
    assert outcome.body is None
    assert [(a.ok, a.http_status, a.error_kind) for a in outcome.attempts] == [
        (False, 400, "rejected_by_server")
    ]


def test_401_is_a_config_error() -> None:
    outcome, sent, _ = run(replies(httpx.Response(401, text="no key"), ok()))

    assert len(sent) == 1
    assert isinstance(outcome.error, ConfigError)
    assert "401" in str(outcome.error)
    assert "no API key is set" in str(outcome.error)
    assert outcome.attempts[0].error_kind == "config"


def test_403_names_the_key_variable() -> None:
    outcome, _, _ = run(replies(httpx.Response(403)), config=make_config(api_key_env="TEACHER_KEY"))

    assert isinstance(outcome.error, ConfigError)
    assert "TEACHER_KEY" in str(outcome.error)


def test_408_is_retried_as_unavailable() -> None:
    outcome, sent, _ = run(replies(httpx.Response(408), ok()))

    assert len(sent) == 2
    assert outcome.attempts[0].error_kind == "unavailable"
    assert outcome.body == OK_BODY


def test_connect_error_is_unavailable() -> None:
    outcome, sent, _ = run(replies(httpx.ConnectError("connection refused")))

    assert len(sent) == 4
    assert isinstance(outcome.error, Unavailable)
    assert "ConnectError" in str(outcome.error)
    assert all(a.error_kind == "unavailable" and a.http_status is None for a in outcome.attempts)


def test_connect_error_then_success() -> None:
    outcome, _, _ = run(replies(httpx.ConnectError("reset"), ok()))

    assert outcome.body == OK_BODY
    assert [a.ok for a in outcome.attempts] == [False, True]


def test_read_timeout_is_teacher_timeout() -> None:
    outcome, sent, _ = run(replies(httpx.ReadTimeout("too slow")))

    assert len(sent) == 4
    assert isinstance(outcome.error, TeacherTimeout)
    assert "5 s" in str(outcome.error)
    assert all(a.error_kind == "timeout" for a in outcome.attempts)


def test_client_side_timeout_is_teacher_timeout() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2)
        return ok()

    outcome, sent, seconds = run(slow, config=make_config(timeout_s=0.05, max_retries=0))

    assert seconds < 1
    assert len(sent) == 1
    assert isinstance(outcome.error, TeacherTimeout)
    assert outcome.attempts[0].error_kind == "timeout"


def test_non_json_200_is_a_bad_response() -> None:
    outcome, sent, _ = run(replies(httpx.Response(200, text="<html>oops</html>"), ok()))

    assert len(sent) == 1
    assert isinstance(outcome.error, BadResponse)
    assert "not JSON" in str(outcome.error)
    assert "oops" in str(outcome.error)
    assert outcome.body is None
    assert [(a.ok, a.http_status, a.error_kind) for a in outcome.attempts] == [
        (False, 200, "bad_response")
    ]


@pytest.mark.parametrize(
    ("body", "says"),
    [({"choices": []}, "no choices"), ({"id": "x"}, "no choices"), ([1, 2], "not a JSON object")],
)
def test_200_without_choices_is_a_bad_response(body: Any, says: str) -> None:
    outcome, _, _ = run(replies(httpx.Response(200, json=body)))

    assert isinstance(outcome.error, BadResponse)
    assert says in str(outcome.error)


def test_concurrency_is_bounded_by_the_config() -> None:
    config = make_config(concurrency=2)
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return ok()

    async def go() -> list[TeacherOutcome]:
        async with httpx.AsyncClient(
            base_url=BASE_URL, transport=httpx.MockTransport(handler)
        ) as http:
            client = TeacherClient(config, http)
            return await asyncio.gather(*(client.complete(request_for(config)) for _ in range(6)))

    outcomes = asyncio.run(go())

    assert all(o.body == OK_BODY for o in outcomes)
    assert peak == 2


# --- parse_retry_after -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("7", 7.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("Tuesday-ish", None),
    ],
)
def test_parse_retry_after_seconds_and_garbage(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    future = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)

    seconds = parse_retry_after(future)

    assert seconds is not None
    assert 85 <= seconds <= 91
    assert parse_retry_after(past) == 0.0


# --- build_request ---------------------------------------------------------------------------


def test_build_request_body_with_json_schema() -> None:
    config = make_config(params={"temperature": 0, "max_tokens": 64})

    request = build_request(config, MESSAGES, SCHEMA, "triage")

    assert request.body == {
        "model": "m",
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 64,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True},
        },
    }
    assert request.provider == "openai"
    assert request.model == "m"
    assert len(request.request_hash) == 64


def test_build_request_other_response_formats() -> None:
    as_object = build_request(make_config(response_format="json_object"), MESSAGES, SCHEMA, "t")
    plain = build_request(make_config(response_format="none"), MESSAGES, SCHEMA, "t")

    assert as_object.body["response_format"] == {"type": "json_object"}
    assert "response_format" not in plain.body
    assert as_object.request_hash != plain.request_hash


def test_same_inputs_same_hash() -> None:
    first = build_request(make_config(params={"temperature": 0}), MESSAGES, SCHEMA, "triage")
    second = build_request(
        make_config(params={"temperature": 0}),
        [dict(m) for m in MESSAGES],
        json.loads(json.dumps(SCHEMA)),
        "triage",
    )

    assert first.request_hash == second.request_hash
    assert first.body == second.body


@pytest.mark.parametrize(
    ("config", "messages", "schema"),
    [
        (make_config(), [*MESSAGES[:1], {"role": "user", "content": "other doc"}], SCHEMA),
        (make_config(params={"temperature": 0.5}), MESSAGES, SCHEMA),
        (make_config(model="m2"), MESSAGES, SCHEMA),
        (make_config(), MESSAGES, {**SCHEMA, "required": []}),
    ],
    ids=["messages", "params", "model", "schema"],
)
def test_what_shapes_the_answer_changes_the_hash(
    config: TeacherConfig, messages: list[dict[str, str]], schema: dict[str, Any]
) -> None:
    baseline = build_request(make_config(), MESSAGES, SCHEMA, "triage")

    assert build_request(config, messages, schema, "triage").request_hash != baseline.request_hash


@pytest.mark.parametrize(
    "config",
    [
        make_config(base_url="https://elsewhere.example/v1"),
        make_config(timeout_s=99),
        make_config(max_retries=0),
        make_config(concurrency=1),
        make_config(api_key_env="KEY"),
        make_config(input_per_mtok=5.0),
    ],
    ids=["base_url", "timeout", "retries", "concurrency", "api_key_env", "price"],
)
def test_operational_settings_do_not_change_the_hash(config: TeacherConfig) -> None:
    baseline = build_request(make_config(), MESSAGES, SCHEMA, "triage")

    assert build_request(config, MESSAGES, SCHEMA, "triage").request_hash == baseline.request_hash


# --- make_http_client ------------------------------------------------------------------------


def test_make_http_client_without_the_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STILLHOUSE_TEST_TEACHER_KEY", raising=False)

    with pytest.raises(ConfigError) as caught:
        teacher_key(make_config(api_key_env="STILLHOUSE_TEST_TEACHER_KEY"))

    assert "STILLHOUSE_TEST_TEACHER_KEY" in str(caught.value)
    assert "not set" in str(caught.value)


def test_make_http_client_with_an_empty_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STILLHOUSE_TEST_TEACHER_KEY", "")

    with pytest.raises(ConfigError, match="STILLHOUSE_TEST_TEACHER_KEY"):
        teacher_key(make_config(api_key_env="STILLHOUSE_TEST_TEACHER_KEY"))


def test_make_http_client_sends_the_key_but_never_hashes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-test-0123456789"
    monkeypatch.setenv("STILLHOUSE_TEST_TEACHER_KEY", secret)
    config = make_config(
        api_key_env="STILLHOUSE_TEST_TEACHER_KEY",
        base_url="http://teacher.test/v1/",
        timeout_s=7,
        concurrency=3,
    )

    key = teacher_key(config)
    assert key is not None and secret not in repr(key)  # a SecretStr from here on
    client = make_http_client(config, api_key=key, transport="httpx")
    try:
        assert client.headers["Authorization"] == f"Bearer {secret}"
        assert client.headers["Content-Type"] == "application/json"
        assert str(client.base_url) == "http://teacher.test/v1/"
        assert client.timeout.read == 7
        assert client.timeout.connect == 7
    finally:
        asyncio.run(client.aclose())

    request = build_request(config, MESSAGES, SCHEMA, "triage")
    assert secret not in json.dumps(request.body)
    assert (
        request.request_hash
        == build_request(make_config(), MESSAGES, SCHEMA, "triage").request_hash
    )


def test_make_http_client_without_a_key() -> None:
    client = make_http_client(make_config(timeout_s=60), transport="httpx")
    try:
        assert "Authorization" not in client.headers
        assert client.timeout.connect == 10.0
        assert client.timeout.read == 60
    finally:
        asyncio.run(client.aclose())


def test_make_http_client_default_transport_is_aiohttp() -> None:
    client = make_http_client(make_config())
    try:
        from httpx_aiohttp import AiohttpTransport

        assert isinstance(client._transport, AiohttpTransport)
    finally:
        asyncio.run(client.aclose())


def test_a_key_echoed_by_the_server_never_reaches_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-echoed-" + "ab12" * 6
    outcome = _echo_call(
        monkeypatch,
        secret,
        lambda key: httpx.Response(400, json={"error": {"message": f"bad request for key {key}"}}),
    )
    assert outcome.error is not None
    assert secret not in str(outcome.error) and "***" in str(outcome.error)


def _echo_call(
    monkeypatch: pytest.MonkeyPatch, secret: str, answer: Callable[[str], httpx.Response]
) -> TeacherOutcome:
    monkeypatch.setenv("ECHO_KEY", secret)

    async def handler(request: httpx.Request) -> httpx.Response:
        return answer(request.headers["authorization"].removeprefix("Bearer "))

    async def call() -> TeacherOutcome:
        config = TeacherConfig(model="m", api_key_env="ECHO_KEY", max_retries=0)
        http = httpx.AsyncClient(
            base_url="http://teacher.test/v1",
            transport=httpx.MockTransport(handler),
            headers={"Authorization": f"Bearer {secret}"},
        )
        client = TeacherClient(config, http, api_key=teacher_key(config))
        outcome = await client.complete(
            build_request(config, [{"role": "user", "content": "x"}], {"type": "object"}, "s")
        )
        await http.aclose()
        return outcome

    return asyncio.run(call())


def _longest_run_of(secret: str, text: str) -> int:
    """The longest run of the secret's characters that appears in ``text``."""
    best = 0
    for i in range(len(secret)):
        for j in range(i + best + 1, len(secret) + 1):
            if secret[i:j] not in text:
                break
            best = j - i
    return best


SECRET = "sk-proj-" + "Zq7rT2xW9mK4vB8n" * 3


def test_a_key_echoed_past_the_message_cut_leaves_no_run_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The error message is cut to a few hundred characters: an exact-match replace after the
    # cut let most of the key through.
    outcome = _echo_call(
        monkeypatch,
        SECRET,
        lambda key: httpx.Response(400, json={"error": {"message": "x" * 270 + " key " + key}}),
    )
    assert outcome.error is not None
    assert _longest_run_of(SECRET, str(outcome.error)) <= SHOWN_AT_MOST
    assert "***" in str(outcome.error) or SECRET[:8] not in str(outcome.error)


def test_a_key_echoed_in_a_200_answer_is_masked_before_it_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def answer(key: str) -> httpx.Response:
        body = {
            "system_fingerprint": f"Authorization: Bearer {key}",
            "choices": [
                {
                    "message": {"content": json.dumps({"label": f"billing {key[3:40]}"})},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
        return httpx.Response(200, json=body)

    outcome = _echo_call(monkeypatch, SECRET, answer)
    assert outcome.error is None and outcome.answer is not None
    kept = json.dumps(outcome.body) + outcome.answer.content
    assert _longest_run_of(SECRET, kept) <= SHOWN_AT_MOST
    assert "***" in outcome.answer.content and "***" in outcome.body["system_fingerprint"]


def test_redactor_masks_every_long_run_and_leaves_other_text() -> None:
    redactor = Redactor([SECRET, None])
    text = f"a {SECRET[4:30]} b {SECRET[20:27]} c {SECRET} d sk-proj"
    masked = redactor.text(text)
    assert _longest_run_of(SECRET, masked) <= SHOWN_AT_MOST
    assert masked.startswith("a *** b ") and masked.endswith(" c *** d sk-proj")
    assert redactor.bytes(text.encode()) == masked.encode()
    assert Redactor([None]).text(text) == text and not Redactor([])


# --- waits, the adaptive limit and the ledger hook ------------------------------------------


def test_a_429_delays_only_the_call_that_got_it() -> None:
    config = make_config(concurrency=10)
    events: list[str] = []
    waits: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        doc = json.loads(request.content)["messages"][-1]["content"]
        events.append(f"sent {doc}")
        if doc == "doc 0" and events.count("sent doc 0") == 1:
            return httpx.Response(429, headers={"retry-after-ms": "500"}, json={"error": {}})
        await asyncio.sleep(0.02)
        events.append(f"done {doc}")
        return ok()

    async def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    async def go() -> None:
        async with httpx.AsyncClient(
            base_url=BASE_URL, transport=httpx.MockTransport(handler)
        ) as http:
            client = TeacherClient(config, http, sleep=recorded_sleep)

            async def one(i: int) -> None:
                messages = [{"role": "user", "content": f"doc {i}"}]
                outcome = await client.complete(build_request(config, messages, SCHEMA, "t"))
                assert outcome.error is None

            await asyncio.gather(*(one(i) for i in range(10)))

    asyncio.run(go())

    # One wait, the call's own retry-after-ms (plus at most its jitter of a quarter of it).
    assert len(waits) == 1 and 0.5 <= waits[0] <= 0.625
    # Nobody else waited for it: every other document was done before doc 0 was asked again.
    resent = [n for n, e in enumerate(events) if e == "sent doc 0"][1]
    assert {f"done doc {i}" for i in range(1, 10)} <= set(events[:resent])
    assert events[-1] == "done doc 0"


def test_429s_do_not_use_up_max_retries() -> None:
    limited = httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {}})
    outcome, sent, _ = run(
        replies(limited, limited, limited, ok()), config=make_config(max_retries=0)
    )

    assert len(sent) == 4
    assert outcome.body == OK_BODY
    assert [a.error_kind for a in outcome.attempts] == ["rate_limited"] * 3 + [None]


def test_waits_past_max_inline_wait_s_in_all_are_handed_back() -> None:
    limited = httpx.Response(429, headers={"retry-after-ms": "300"}, json={"error": {}})
    outcome, sent, _ = run(replies(limited), config=make_config(max_inline_wait_s=1.0))

    assert 3 <= len(sent) <= 4  # about a second of 0.3 s waits, then the item waits instead
    assert isinstance(outcome.error, RateLimited)
    assert outcome.error.retry_after_s is not None and outcome.error.retry_after_s >= 0.3


def test_every_attempt_is_written_ahead_with_its_own_request_id() -> None:
    events: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        events.append(("sent", request.headers["x-client-request-id"]))
        return httpx.Response(503) if len(events) < 4 else ok()

    async def before_send(attempt: int, request_id: str) -> None:
        events.append((f"ledger {attempt}", request_id))

    outcome, _, _ = run(handler, before_send_hook=before_send)

    ids = [a.request_id for a in outcome.attempts]
    assert len(set(ids)) == 2 and all(ids)
    assert events == [
        ("ledger 1", ids[0]),
        ("sent", ids[0]),
        ("ledger 2", ids[1]),
        ("sent", ids[1]),
    ]


def test_an_attempt_the_ledger_cannot_record_is_not_sent() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return ok()

    async def before_send(attempt: int, request_id: str) -> None:
        raise Unavailable("the database is down")

    outcome, _, _ = run(handler, config=make_config(max_retries=1), before_send_hook=before_send)

    assert sent == [] and outcome.attempts == []
    assert isinstance(outcome.error, Unavailable)


def _limit_after(first: httpx.Response) -> tuple[float, int]:
    async def go() -> tuple[float, int]:
        transport = httpx.MockTransport(replies(first, ok()))
        async with httpx.AsyncClient(base_url=BASE_URL, transport=transport) as http:
            client = TeacherClient(make_config(concurrency=20), http)
            await client.complete(request_for(client.config))
            await asyncio.sleep(0.05)  # the pool's cut reaches the governor
            await client.complete(request_for(client.config))
            return client.slots.limit, client.slots.epoch

    return asyncio.run(go())


def test_a_429_without_rate_headers_shrinks_the_calls_in_flight() -> None:
    limit, epoch = _limit_after(httpx.Response(429, headers={"Retry-After": "0"}))

    # min(20 * 0.95, the calls left in flight: none), but at most halved at once; then one
    # more for the answer that came back while a caller waited.
    assert epoch == 1 and limit in (10.0, 11.0)


def test_a_429_for_an_empty_rate_bucket_paces_instead() -> None:
    headers = {
        "Retry-After": "0",
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "100ms",
    }
    limit, epoch = _limit_after(httpx.Response(429, headers=headers))

    assert (limit, epoch) == (20.0, 0)


def test_a_timeout_while_the_process_was_stopped_does_not_count_against_the_teacher() -> None:
    from workers.governor import GovernorLimits, LocalGovernor

    governor = LocalGovernor(GovernorLimits(failures=1))

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return ok()

    async def go() -> TeacherOutcome:
        config = make_config(timeout_s=0.2, max_retries=0)
        async with httpx.AsyncClient(base_url=BASE_URL, transport=httpx.MockTransport(hang)) as h:
            client = TeacherClient(config, h, governor=governor)
            client.stalls.stalled_since = lambda started: True  # type: ignore[method-assign]
            return await client.complete(request_for(config))

    outcome = asyncio.run(go())

    assert isinstance(outcome.error, TeacherTimeout)
    assert governor.state.get("fails", 0.0) == 0.0
    assert governor.state.get("open_until", 0.0) == 0.0
