"""The local teacher's Anthropic Messages route and both providers' batch APIs, over a real
socket: the project's own clients (``TeacherClient`` with the Anthropic provider, the batch
adapters of ``workers.batch_api``) against it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from stillhouse.servers.teacher import FixedBackend
from stillhouse.servers.teacher.app import create_app
from stillhouse.servers.teacher.batch_jobs import BatchFaults
from workers.batch_api import AnthropicBatches, BatchInfo, OpenAIBatches
from workers.spec import TeacherConfig
from workers.teacher import TeacherClient, build_request, make_http_client

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["sport", "tech"]}},
    "required": ["label"],
}
KEY = "sk-local-test"
Server = Callable[..., AbstractContextManager[str]]


@pytest.fixture
def served(threaded_server: Server) -> Iterator[Callable[..., str]]:
    """``served(faults)``: a fixed-backend teacher with a key, on a loopback port."""
    stack: list[AbstractContextManager[str]] = []

    def start(faults: BatchFaults | None = None) -> str:
        app = create_app(FixedBackend(latency_ms=0), api_key=KEY, batch_faults=faults)
        server = threaded_server(app)
        stack.append(server)
        return server.__enter__() + "/v1"

    yield start
    for server in reversed(stack):
        server.__exit__(None, None, None)


def _config(base_url: str, provider: str) -> TeacherConfig:
    return TeacherConfig(model="fixed", provider=provider, base_url=base_url, max_retries=0)


def _request(config: TeacherConfig, text: str) -> Any:
    messages = [
        {"role": "system", "content": "Route the document."},
        {"role": "user", "content": f"<document>{text}</document>"},
    ]
    return build_request(config, messages, SCHEMA, "answer_x")


def test_the_anthropic_provider_gets_a_tool_answer_over_http(served: Callable[..., str]) -> None:
    base = served()
    config = _config(base, "anthropic")

    async def call() -> Any:
        client = TeacherClient(
            config, make_http_client(config, api_key=SecretStr(KEY)), api_key=SecretStr(KEY)
        )
        try:
            return await client.complete(_request(config, "A match report"))
        finally:
            await client.aclose()

    outcome = asyncio.run(call())
    assert outcome.error is None, outcome.error
    assert outcome.body["type"] == "message" and outcome.body["stop_reason"] == "tool_use"
    assert json.loads(outcome.answer.content)["label"] in ("sport", "tech")
    assert outcome.answer.prompt_tokens > 0


def test_anthropic_errors_come_in_anthropics_shape(served: Callable[..., str]) -> None:
    base = served()
    body = {
        "model": "fixed",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "<document>hi</document>"}],
        "tools": [{"name": "answer", "input_schema": SCHEMA}],
        "tool_choice": {"type": "tool", "name": "answer"},
    }
    wrong = httpx.post(f"{base}/messages", json=body, headers={"x-api-key": "nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    limited = httpx.post(
        f"{base}/messages",
        json=body,
        headers={"x-api-key": KEY, "x-stillhouse-fault": "rate_limit"},
    )
    assert limited.status_code == 429 and limited.headers["retry-after"]
    assert limited.json() == {"type": "error", "error": limited.json()["error"]}
    assert limited.json()["error"]["type"] == "rate_limit_error"
    bad = httpx.post(f"{base}/messages", json={"messages": []}, headers={"x-api-key": KEY})
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]


def _wait(api: Any, batch_id: str) -> BatchInfo:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info: BatchInfo = api.get(batch_id)
        if info.ended:
            return info
        time.sleep(0.05)
    raise AssertionError("the batch did not end")


@pytest.mark.parametrize("api_class", [OpenAIBatches, AnthropicBatches])
def test_a_batch_with_failures_and_expiry_reports_each_request_once(
    served: Callable[..., str], api_class: Any
) -> None:
    faults = BatchFaults(fail_share=0.2, expire_share=0.1, in_progress_s=0.05, faulty_batches=1)
    base = served(faults)
    config = _config(base, api_class.name)
    api = api_class(config, SecretStr(KEY), 30.0)
    requests = [_request(config, f"document {i}") for i in range(20)]
    content = b"".join(api.line(r.request_hash, r.body) for r in requests)
    info = _wait(api, api.create(content, api.upload(content, "in.jsonl"), "key1", "24h").id)
    results = list(api.results(info))
    ids = [r.custom_id for r in results]
    assert sorted(ids) == sorted(r.request_hash for r in requests)
    assert ids != [r.request_hash for r in requests]  # not in the submitted order
    outcomes = [r.outcome for r in results]
    assert outcomes.count("failed") == 4 and outcomes.count("expired") == 2
    ok = [r for r in results if r.outcome == "succeeded"]
    assert all(r.body and r.body.get("usage") for r in ok)
    stats = httpx.get(f"{base}/stats").json()["batch"]
    assert stats == {
        "batches": 1,
        "requests": 18,
        "succeeded": 14,
        "failed": 4,
        "expired": 2,
        "canceled": 0,
    }
    # Only the first batch is faulty: the same requests again all succeed.
    again = _wait(api, api.create(content, api.upload(content, "in.jsonl"), "key2", "24h").id)
    assert {r.outcome for r in api.results(again)} == {"succeeded"}
    if api_class is OpenAIBatches:
        assert info.status == "expired" and again.status == "completed"
        assert api.find("key2", time.time() - 5, 20) is not None  # by its metadata
    else:
        assert api.find("key2", time.time() - 5, 20) is None  # two batches of 20: ambiguous
    api.close()


def test_a_bad_request_file_fails_validation_and_a_batch_can_be_cancelled(
    served: Callable[..., str],
) -> None:
    base = served(BatchFaults(in_progress_s=2.0))
    config = _config(base, "openai")
    api = OpenAIBatches(config, SecretStr(KEY), 30.0)
    request = _request(config, "doc")
    line = api.line("same", request.body)
    info = api.create(line + line, api.upload(line + line, "dup.jsonl"), "k", "24h")
    assert info.status == "failed"
    got = httpx.get(f"{base}/batches/{info.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert got.json()["errors"]["data"][0]["code"] == "duplicate_custom_id"
    started = api.create(line, api.upload(line, "one.jsonl"), "k2", "24h")
    assert api.cancel(started.id).status == "cancelling"
    ended = _wait(api, started.id)
    assert ended.status == "cancelled"
    assert [r.outcome for r in api.results(ended)] == ["expired"]  # never ran
    denied = httpx.get(f"{base}/batches", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401
    api.close()
