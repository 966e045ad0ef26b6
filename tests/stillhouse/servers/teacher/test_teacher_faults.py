"""Fault injection in the local teacher: profiles, determinism, and what each fault looks like
to a real HTTP client over a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from schemas.errors import ConfigError
from stillhouse.servers.teacher import FaultProfile, FixedBackend, create_app
from stillhouse.servers.teacher.faults import (
    FaultKind,
    FaultPlan,
    build_profile,
    load_profile,
    parse_fault_flag,
)
from stillhouse.servers.teacher.process import free_port, wait_ready

LABELS = ["sport", "business", "tech"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": LABELS},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}
BODY: dict[str, Any] = {
    "model": "fixed",
    "messages": [
        {"role": "system", "content": "You route news articles to one topic."},
        {"role": "user", "content": "Classify.\n<document>\nChelsea win 2-0.\n</document>"},
    ],
    "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
}
CLEAN = {"label": "sport", "confidence": 1.0}  # the fixed backend's answer to BODY
ServerFactory = Callable[..., AbstractContextManager[str]]


def post(client: httpx.Client, fault: str | None = None) -> httpx.Response:
    headers = {"X-Stillhouse-Fault": fault} if fault else {}
    return client.post("/v1/chat/completions", json=BODY, headers=headers)


def content_of(response: httpx.Response) -> Any:
    return response.json()["choices"][0]["message"]["content"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "faults.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- profiles -------------------------------------------------------------------------


def test_profile_yaml_loads_every_setting(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "seed: 7\n"
        "latency: {dist: lognormal, median_ms: 300, sigma: 0.4, max_ms: 900}\n"
        "shares: {rate_limit: 0.1, reset: 0.05, wrong: 0.2}\n"
        "retry_after_s: 3\nserver_error_statuses: [503]\nhang_s: 30\ndrip_s: 9\n",
    )
    profile = load_profile(path)
    assert (profile.seed, profile.retry_after_s, profile.hang_s, profile.drip_s) == (7, 3, 30, 9)
    assert profile.shares.rate_limit == 0.1 and profile.shares.wrong == 0.2
    assert profile.server_error_statuses == (503,)
    plan = FaultPlan(profile)
    latencies = [plan.decide(n).latency_s for n in range(200)]
    assert max(latencies) <= 0.9 and 0.2 < sorted(latencies)[100] < 0.4


def test_latency_forms() -> None:
    assert FaultProfile.model_validate({"latency": 250}).latency.ms == 250
    uniform = FaultProfile.model_validate(
        {"latency": {"dist": "uniform", "low_ms": 100, "high_ms": 200}}
    )
    draws = [FaultPlan(uniform).decide(n).latency_s for n in range(100)]
    assert all(0.1 <= draw <= 0.2 for draw in draws) and len(set(draws)) > 90
    assert FaultPlan(FaultProfile()).decide(5).latency_s == 0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("shares: {rate_limit: 1.5}", "shares.rate_limit: Input should be less than or equal to 1"),
        ("shares: {timeout: 0.1}", "shares.timeout: Extra inputs are not permitted"),
        ("shares: {reset: 0.6, hang: 0.6}", "shares: the shares add up to 1.2"),
        ("latency: {dist: gamma}", "latency.dist: Input should be 'fixed', 'uniform' or"),
        ("latency: {dist: uniform, low_ms: 9, high_ms: 1}", "latency: low_ms (9.0) is above"),
        ("server_error_statuses: [404]", "server_error_statuses must be 5xx codes, not [404]"),
        ("hang_s: -1", "hang_s: Input should be greater than 0 (got -1)"),
        ("retry_after: 2", "retry_after: Extra inputs are not permitted"),
        ("- rate_limit", "expected a mapping of settings at the top"),
        ("shares: {rate_limit: [", "not valid YAML"),
    ],
)
def test_bad_profiles_say_which_field_and_what_is_wrong(
    tmp_path: Path, text: str, says: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert str(caught.value).startswith(f"fault profile {path}: ")
    assert says in str(caught.value)


def test_missing_profile_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_profile(tmp_path / "nope.yaml")


def test_flags_override_the_profile(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nshares: {rate_limit: 0.5, wrong: 0.1}\nlatency: 50\n")
    profile = build_profile(path, faults=["rate_limit=0.2", "reset=0.1"], seed=9, latency_ms=5)
    assert profile.seed == 9 and profile.latency.ms == 5
    assert (profile.shares.rate_limit, profile.shares.wrong, profile.shares.reset) == (
        0.2,
        0.1,
        0.1,
    )
    assert parse_fault_flag(" hang=0.25") == ("hang", 0.25)
    for flag in ["hang", "sleep=0.1", "hang=lots"]:
        with pytest.raises(ConfigError, match="expected KIND=SHARE"):
            parse_fault_flag(flag)
    with pytest.raises(ConfigError, match=r"shares\.hang: Input should be less than or equal"):
        build_profile(faults=["hang=2"])


# --- determinism and shares ---------------------------------------------------------


def test_same_seed_same_faults_other_seed_other_faults() -> None:
    shares = {"rate_limit": 0.2, "malformed": 0.2, "wrong": 0.2}

    def sequence(seed: int) -> list[FaultKind | None]:
        plan = FaultPlan(FaultProfile.model_validate({"seed": seed, "shares": shares}))
        return [plan.decide(n).kind for n in range(100)]

    assert sequence(3) == sequence(3)
    assert sequence(3) != sequence(4)
    assert FaultPlan().decide(0, "wrong").kind is FaultKind.WRONG
    forced = FaultPlan(FaultProfile.model_validate({"shares": {"rate_limit": 1}}))
    assert forced.decide(0, "none").kind is None


def _outcome(response: httpx.Response | None, body_s: float) -> str:
    """What a client sees, named as the fault that causes it.

    ``body_s`` is how long the body took after the headers: a drip spreads its body over
    ``drip_s`` whatever the load, while a clean body comes with its headers (timing the
    whole request instead counted a clean answer on a busy CI machine as a drip).
    """
    if response is None:
        return "reset"
    status = {429: "rate_limit", 500: "server_error", 502: "server_error", 504: "hang"}
    if response.status_code != 200:
        return status.get(response.status_code, "server_error")
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "length":
        return "truncated"
    if choice["message"]["content"] is None:
        return "refusal"
    try:
        answer = json.loads(choice["message"]["content"])
    except json.JSONDecodeError:
        return "malformed"
    if answer != CLEAN:
        return "wrong"
    return "slow_drip" if body_s > DRIP_S / 2 else "clean"


def _observe(client: httpx.Client, count: int) -> list[str]:
    outcomes = []
    for _ in range(count):
        response: httpx.Response | None = None
        body_s = 0.0
        try:
            with client.stream("POST", "/v1/chat/completions", json=BODY) as response:
                started = time.monotonic()
                response.read()
                body_s = time.monotonic() - started
        except (httpx.ReadError, httpx.RemoteProtocolError):
            response = None
        outcomes.append(_outcome(response, body_s))
    return outcomes


DRIP_S = 0.25


def test_shares_are_respected_and_counted(threaded_server: ServerFactory) -> None:
    shares = dict.fromkeys((kind.value for kind in FaultKind), 0.06)
    profile = FaultProfile.model_validate(
        {"seed": 11, "shares": shares, "hang_s": 0.02, "drip_s": DRIP_S, "drip_chunk_bytes": 64}
    )
    with (
        threaded_server(create_app(FixedBackend(latency_ms=0), faults=profile)) as root,
        httpx.Client(base_url=root, timeout=5) as client,
    ):
        outcomes = _observe(client, 400)
        stats = client.get("/v1/stats").json()
        client.post("/v1/stats/reset")
        again = _observe(client, 200)
    counts = Counter(outcomes)
    assert stats["requests"] == 400 and stats["completions"] == counts["clean"]
    assert stats["faults"] == {kind.value: counts[kind.value] for kind in FaultKind}
    for kind in FaultKind:  # 24 expected of each; the binomial sd is about 4.7
        assert 10 <= counts[kind.value] <= 40, (kind, counts)
    assert again == outcomes[:200]  # after a reset, the same seed replays the same faults


# --- each fault over a real socket -----------------------------------------------------

PROFILE = FaultProfile.model_validate(
    {"retry_after_s": 7, "hang_s": 1.0, "drip_s": 1.0, "drip_chunk_bytes": 8}
)


@pytest.fixture(scope="module")
def root(threaded_server: ServerFactory) -> Iterator[str]:
    with threaded_server(create_app(FixedBackend(latency_ms=0), faults=PROFILE)) as url:
        yield url


@pytest.fixture
def client(root: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=root, timeout=5) as http:
        yield http


def test_rate_limit_is_429_with_retry_after_in_openai_shape(client: httpx.Client) -> None:
    response = post(client, "rate_limit")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "try again in 7s" in error["message"]


def test_server_errors_are_5xx_in_openai_shape(client: httpx.Client) -> None:
    statuses = set()
    for _ in range(12):
        response = post(client, "server_error")
        statuses.add(response.status_code)
        assert response.json()["error"]["type"] == "server_error"
    assert statuses <= {500, 502, 503} and len(statuses) >= 2


def test_reset_is_a_connection_error_not_a_status(client: httpx.Client) -> None:
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        post(client, "reset")
    assert post(client).status_code == 200  # the server and the client's pool carry on


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_reset_works_with_either_uvicorn_parser(threaded_server: ServerFactory, http: str) -> None:
    pytest.importorskip(http)
    app = create_app(FixedBackend(latency_ms=0))
    with threaded_server(app, http=http) as url, httpx.Client(base_url=url) as http_client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            post(http_client, "reset")
        assert http_client.get("/v1/stats").json()["faults"]["reset"] == 1


def test_hang_outlasts_the_client_timeout_then_answers_504(client: httpx.Client) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"X-Stillhouse-Fault": "hang"},
            timeout=0.3,
        )
    assert time.monotonic() - started < 1.0
    late = post(client, "hang")  # a patient client gets the gateway's 504 after hang_s
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"


def test_slow_drip_passes_read_timeouts_but_not_a_deadline(root: str) -> None:
    async def fetch(deadline: float) -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=root, timeout=0.5) as http:
            started = time.monotonic()
            response = await asyncio.wait_for(
                http.post(
                    "/v1/chat/completions", json=BODY, headers={"X-Stillhouse-Fault": "slow_drip"}
                ),
                deadline,
            )
            return response, time.monotonic() - started

    with pytest.raises(TimeoutError):
        asyncio.run(fetch(0.5))
    response, elapsed = asyncio.run(fetch(5.0))
    assert elapsed > 0.8  # bytes kept coming faster than the 0.5 s read timeout
    assert json.loads(content_of(response)) == CLEAN


def test_malformed_is_a_200_whose_content_is_not_json(client: httpx.Client) -> None:
    contents = {content_of(post(client, "malformed")) for _ in range(16)}
    assert len(contents) >= 3  # several shapes of broken
    for content in contents:
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)


def test_truncated_is_cut_with_finish_reason_length(client: httpx.Client) -> None:
    response = post(client, "truncated")
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert json.dumps(CLEAN).startswith(choice["message"]["content"])
    assert len(choice["message"]["content"]) < len(json.dumps(CLEAN))


def test_refusal_has_null_content_and_refusal_text(client: httpx.Client) -> None:
    message = post(client, "refusal").json()["choices"][0]["message"]
    assert message["content"] is None
    assert message["refusal"] == "I can't help with that."


def test_wrong_is_schema_valid_but_another_label(client: httpx.Client) -> None:
    for _ in range(5):
        answer = json.loads(content_of(post(client, "wrong")))
        jsonschema.validate(answer, SCHEMA)
        assert answer["label"] != CLEAN["label"]


def test_unknown_fault_header_is_a_400_listing_the_kinds(client: httpx.Client) -> None:
    response = post(client, "meltdown")
    assert response.status_code == 400
    assert "rate_limit, server_error, reset" in response.json()["error"]["message"]


def test_stats_count_every_outcome_and_reset(client: httpx.Client) -> None:
    client.post("/v1/stats/reset")
    for fault in ["rate_limit", "wrong", "none", "bogus"]:
        post(client, fault)
    stats = client.get("/v1/stats").json()
    assert (stats["requests"], stats["completions"], stats["errors"]) == (4, 1, 1)
    assert stats["faults"]["rate_limit"] == stats["faults"]["wrong"] == 1
    zeroed = client.post("/v1/stats/reset").json()
    assert zeroed["requests"] == 0 and set(zeroed["faults"].values()) == {0}


def test_latency_delays_answers_but_not_rate_limits() -> None:
    profile = FaultProfile.model_validate({"latency": 150})

    async def timed(fault: str) -> float:
        transport = httpx.ASGITransport(app=create_app(FixedBackend(latency_ms=0), faults=profile))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            started = time.monotonic()
            await http.post(
                "/v1/chat/completions", json=BODY, headers={"X-Stillhouse-Fault": fault}
            )
            return time.monotonic() - started

    assert asyncio.run(timed("none")) >= 0.15
    assert asyncio.run(timed("rate_limit")) < 0.1


# --- the real server process --------------------------------------------------------------


@pytest.mark.slow
def test_real_server_process_follows_its_profile(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 5\nshares: {rate_limit: 0.3, server_error: 0.2, wrong: 0.2}\n")
    port = free_port()
    command = [sys.executable, "-m", "stillhouse", "teacher", "serve", "--backend", "fixed"]
    command += ["--latency-ms", "0", "--port", str(port), "--faults", str(path)]
    command += ["--fault", "refusal=0.1"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1", process, timeout_s=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            seen = _observe(client, 40)
    finally:
        process.terminate()
        process.wait(timeout=20)
    plan = FaultPlan(build_profile(path, faults=["refusal=0.1"]))
    expected = [str(plan.decide(n).kind or "clean") for n in range(40)]
    assert seen == expected
    assert {"rate_limit", "server_error", "wrong", "refusal", "clean"} <= set(seen)
