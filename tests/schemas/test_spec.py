"""Spec files: loading the bundled example, validation messages, the labeling hash, the loader."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.exceptions import SchemaError
from support import ROOT

from schemas.errors import ConfigError, SpecError
from schemas.loader import (
    compile_validator,
    error_path,
    load_schema,
    schema_problems,
    spec_validator,
)
from workers.spec import (
    EXAMPLES_DIR,
    labeling_hash,
    load_spec,
    parse_spec,
    resolve_spec_path,
)

TRIAGE_LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def triage_body() -> dict[str, Any]:
    return copy.deepcopy(load_spec("triage").body)


def minimal_body() -> dict[str, Any]:
    return {
        "name": "mini",
        "version": 1,
        "kind": "classification",
        "input": {"text": "{text}"},
        "labels": [{"name": "yes"}, {"name": "no"}],
        "prompt": {"user": "Is it? {document}"},
        "teacher": {"model": "m"},
    }


def write_spec(tmp_path: Path, body: Any, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


# --- the bundled example -------------------------------------------------------------------


def test_bundled_triage_spec_loads() -> None:
    spec = load_spec("triage")

    assert spec.name == "triage"
    assert spec.version == 2
    assert spec.target_accuracy == 0.95 and spec.checks["withhold_share"] == 0.2
    assert spec.kind == "classification"
    assert spec.label_names == TRIAGE_LABELS
    assert len(spec.labels) == 5
    assert all(label["description"] for label in spec.labels)
    assert Path(spec.source) == EXAMPLES_DIR / "triage.yaml"
    assert spec.id_field == "id"
    assert spec.slice_fields == ["length", "queue"]
    assert spec.known_good == {"label": {"source": "queue", "compare": "exact"}}
    assert spec.budget_usd == 5.0
    assert spec.checks == {
        "min_confidence": 0.0,
        "require_known_good_match": True,
        "max_output_chars": 20000,
        "max_depth": 10,
        "repair_attempts": 1,
        "withhold_share": 0.2,
        "target_accuracy": 0.95,
        "calibration_min_items": 200,
        "calibration_per_class": True,
        "calibration_wait_s": 2.0,
    }
    assert spec.labeling == {"batch_size": 64, "max_attempts": 5, "lease_s": 600}


def test_bundled_triage_output_schema_is_derived_from_labels() -> None:
    schema = load_spec("triage").output_schema

    assert schema["type"] == "object"
    assert schema["properties"]["label"] == {"type": "string", "enum": TRIAGE_LABELS}
    assert schema["properties"]["confidence"]["type"] == "number"
    assert schema["required"] == ["label", "confidence"]
    assert schema["additionalProperties"] is False


def test_bundled_triage_teacher_config() -> None:
    teacher = load_spec("triage").teacher

    assert teacher.model == "minilm-zero-shot"
    assert teacher.provider == "openai"
    assert teacher.base_url == "http://127.0.0.1:8765/v1"
    assert teacher.params == {"temperature": 0}
    assert teacher.concurrency == 32
    assert teacher.max_retries == 4
    assert teacher.api_key_env is None
    assert teacher.input_per_mtok == pytest.approx(0.15)
    assert teacher.output_per_mtok == pytest.approx(0.60)
    assert teacher.cost_usd(1_000_000, 1_000_000) == pytest.approx(0.75)
    assert teacher.cost_usd(2000, 100) == pytest.approx((2000 * 0.15 + 100 * 0.60) / 1e6)


def test_content_hash_is_the_labeling_hash() -> None:
    spec = load_spec("triage")

    assert spec.content_hash == labeling_hash(spec.body)
    assert len(spec.content_hash) == 64
    int(spec.content_hash, 16)  # hex digest


def test_output_validator_accepts_good_answers_and_rejects_bad_ones() -> None:
    validator = load_spec("triage").output_validator()

    assert validator.is_valid({"label": "sport", "confidence": 0.5})
    assert not validator.is_valid({"label": "weather", "confidence": 0.5})
    assert not validator.is_valid({"label": "sport", "confidence": 1.5})
    assert not validator.is_valid({"label": "sport"})
    assert not validator.is_valid({"label": "sport", "confidence": 0.5, "why": "x"})


def test_load_by_path_matches_load_by_name(tmp_path: Path) -> None:
    path = write_spec(tmp_path, triage_body())

    by_path = load_spec(str(path))

    assert by_path.source == str(path)
    assert by_path.content_hash == load_spec("triage").content_hash
    assert by_path.label_names == TRIAGE_LABELS


def test_json_and_yml_spec_files_load(tmp_path: Path) -> None:
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps(minimal_body()), encoding="utf-8")
    yml_path = write_spec(tmp_path, minimal_body(), name="spec.yml")

    assert load_spec(str(json_path)).name == "mini"
    assert load_spec(str(yml_path)).name == "mini"


def test_minimal_spec_gets_defaults(tmp_path: Path) -> None:
    spec = load_spec(str(write_spec(tmp_path, minimal_body())))

    assert spec.id_field == "id"
    assert spec.slice_fields == []
    assert spec.known_good == {}
    assert spec.budget_usd is None
    assert spec.checks == {
        "min_confidence": 0.0,
        "require_known_good_match": True,
        "max_output_chars": 20000,
        "max_depth": 10,
        "repair_attempts": 1,
        "withhold_share": 0.0,
        "target_accuracy": None,
        "calibration_min_items": 200,
        "calibration_per_class": True,
        "calibration_wait_s": 2.0,
    }
    assert spec.target_accuracy is None
    assert spec.labeling == {"batch_size": 50, "max_attempts": 5, "lease_s": 600}
    assert spec.teacher.base_url == "http://127.0.0.1:8765/v1"
    assert spec.teacher.response_format == "json_schema"
    assert spec.teacher.max_retries == 4
    assert spec.teacher.concurrency == 16
    assert spec.teacher.cost_usd(10_000, 10_000) == 0.0
    assert spec.output_schema["properties"]["label"]["enum"] == ["yes", "no"]


def test_explicit_output_schema_is_used_as_given(tmp_path: Path) -> None:
    body = minimal_body()
    del body["labels"]
    body["kind"] = "extraction"
    body["output_schema"] = {
        "type": "object",
        "properties": {"company": {"type": "string"}},
        "required": ["company"],
    }
    body["known_good"] = {"company": {"source": "org"}}

    spec = load_spec(str(write_spec(tmp_path, body)))

    assert spec.output_schema == body["output_schema"]
    assert spec.labels == []
    assert spec.output_validator().is_valid({"company": "ACME"})
    assert not spec.output_validator().is_valid({"company": 3})


# --- invalid specs ---------------------------------------------------------------------------


def _drop_teacher_model(body: dict[str, Any]) -> None:
    del body["teacher"]["model"]


def _drop_labels(body: dict[str, Any]) -> None:
    del body["labels"]


def _duplicate_label(body: dict[str, Any]) -> None:
    body["labels"].append({"name": "sport", "description": "again"})


INVALID_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("missing teacher.model", _drop_teacher_model, "$.teacher", "'model' is a required property"),
    (
        "min_concurrency above concurrency",
        lambda b: b["teacher"].update(concurrency=4, min_concurrency=8),
        "$.teacher.min_concurrency",
        "8 is above its concurrency 4",
    ),
    (
        "latency_tolerance below 1",
        lambda b: b["teacher"].update(latency_tolerance=0.5),
        "$.teacher.latency_tolerance",
        "0.5 is less than the minimum of 1",
    ),
    (
        "wrong kind",
        lambda b: b.update(kind="summarize"),
        "$.kind",
        "'summarize' is not one of ['classification', 'ranking', 'extraction']",
    ),
    ("version 0", lambda b: b.update(version=0), "$.version", "0 is less than the minimum of 1"),
    (
        "version not an integer",
        lambda b: b.update(version="one"),
        "$.version",
        "'one' is not of type 'integer'",
    ),
    ("unknown top-level key", lambda b: b.update(colour="red"), "$:", "'colour' was unexpected"),
    ("classification without labels", _drop_labels, "$:", "'labels' is a required property"),
    (
        "extraction without output_schema",
        lambda b: b.update(kind="extraction"),
        "$:",
        "'output_schema' is a required property",
    ),
    (
        "prompt without {document}",
        lambda b: b["prompt"].update(user="Pick one: {labels}"),
        "$.prompt.user",
        "must contain {document}",
    ),
    (
        "known_good field not in output schema",
        lambda b: b["known_good"].update(topic={"source": "queue"}),
        "$.known_good.topic",
        "not a property of the output schema (properties: confidence, label)",
    ),
    ("duplicate label names", _duplicate_label, "$.labels", "label names must be unique"),
    (
        "invalid output_schema",
        lambda b: b.update(output_schema={"type": "nope"}),
        "output_schema",
        "not a valid JSON Schema",
    ),
    (
        "bad base_url",
        lambda b: b["teacher"].update(base_url="ftp://x"),
        "$.teacher.base_url",
        "does not match",
    ),
    (
        "unknown label key",
        lambda b: b["labels"][1].update(colour="red"),
        "$.labels[1]",
        "'colour' was unexpected",
    ),
    (
        "lowercase api_key_env",
        lambda b: b["teacher"].update(api_key_env="my_key"),
        "$.teacher.api_key_env",
        "does not match",
    ),
    (
        "min_confidence above 1",
        lambda b: b["checks"].update(min_confidence=2),
        "$.checks.min_confidence",
        "2 is greater than the maximum of 1",
    ),
    ("bad name", lambda b: b.update(name="Triage Spec"), "$.name", "does not match"),
]


@pytest.mark.parametrize(
    ("mutate", "where", "what"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_spec_names_file_field_and_problem(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], where: str, what: str
) -> None:
    body = triage_body()
    mutate(body)
    path = write_spec(tmp_path, body)

    with pytest.raises(SpecError) as caught:
        load_spec(str(path))

    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert where in message
    assert what in message


def test_missing_teacher_model_message_is_exact(tmp_path: Path) -> None:
    body = triage_body()
    del body["teacher"]["model"]
    path = write_spec(tmp_path, body)

    with pytest.raises(SpecError) as caught:
        load_spec(str(path))

    assert (
        str(caught.value) == f"{path}: invalid spec:\n  $.teacher: 'model' is a required property"
    )


def test_every_schema_problem_is_listed_sorted_by_path(tmp_path: Path) -> None:
    body = triage_body()
    body["version"] = 0
    del body["teacher"]["model"]
    body["colour"] = "red"
    path = write_spec(tmp_path, body)

    with pytest.raises(SpecError) as caught:
        load_spec(str(path))

    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: invalid spec:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["$", "$.teacher", "$.version"]


def test_spec_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_spec({"name": "x"})


def test_parse_spec_uses_source_in_messages() -> None:
    body = triage_body()
    body["version"] = 0

    with pytest.raises(SpecError, match=r"^inline\.yaml: invalid spec:"):
        parse_spec(body, source="inline.yaml")
    with pytest.raises(SpecError, match=r"^<memory>: "):
        parse_spec(body)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: triage\nlabels: [a, b\nversion: 1\n", encoding="utf-8")

    with pytest.raises(SpecError) as caught:
        load_spec(str(path))

    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML")
    assert "line" in message


@pytest.mark.parametrize(
    ("text", "kind"), [("", "NoneType"), ("- a\n- b\n", "list"), ("just words\n", "str")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(SpecError) as caught:
        load_spec(str(path))

    assert str(caught.value) == (f"{path}: a spec must be a mapping at the top level, got {kind}")


def test_missing_spec_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(SpecError) as caught:
        load_spec(str(path))

    message = str(caught.value)
    assert f"spec file not found: {path}" in message
    assert "triage" in message


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        resolve_spec_path(str(tmp_path))


def test_unknown_bundled_name_lists_bundled_names() -> None:
    with pytest.raises(SpecError) as caught:
        load_spec("no-such-spec")

    message = str(caught.value)
    assert "no spec named 'no-such-spec'" in message
    bundled = sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))
    assert "triage" in bundled
    assert message.endswith(", ".join(bundled))


def test_resolve_spec_path() -> None:
    assert resolve_spec_path("triage") == EXAMPLES_DIR / "triage.yaml"
    bundled = str(EXAMPLES_DIR / "triage.yaml")
    assert resolve_spec_path(bundled) == Path(bundled)


# --- the labeling hash -----------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value

    return mutate


SAME_HASH = {
    "budget_usd": _set("budget_usd", 500.0),
    "budget_usd null": _set("budget_usd", None),
    "labeling": _set("labeling", {"batch_size": 8, "max_attempts": 2, "lease_s": 30}),
    "teacher.base_url": _set("teacher.base_url", "https://teacher.example.com/v1"),
    "teacher.concurrency": _set("teacher.concurrency", 1),
    "teacher.price": _set("teacher.price", {"input_per_mtok": 3.0, "output_per_mtok": 15.0}),
    "teacher.timeout_s": _set("teacher.timeout_s", 5),
    "teacher.max_retries": _set("teacher.max_retries", 0),
    "teacher.api_key_env": _set("teacher.api_key_env", "TEACHER_KEY"),
    "description": _set("description", "something else"),
    "student": _set("student", {"epochs": 2}),
}

CHANGED_HASH = {
    "prompt.user": _set("prompt.user", "Route it.\n{labels}\n{document}"),
    "prompt.system": _set("prompt.system", "Be terse."),
    "label renamed": lambda b: b["labels"][0].update(name="finance"),
    "label description": lambda b: b["labels"][0].update(description="money"),
    "label added": lambda b: b["labels"].append({"name": "weather"}),
    "teacher.model": _set("teacher.model", "bigger-model"),
    "teacher.params": _set("teacher.params", {"temperature": 0.7}),
    "teacher.params added": _set("teacher.params", {"temperature": 0, "seed": 1}),
    "teacher.response_format": _set("teacher.response_format", "json_object"),
    "input.text": _set("input.text", "{body}"),
    "known_good compare": lambda b: b["known_good"]["label"].update(compare="casefold"),
}


@pytest.mark.parametrize("mutate", SAME_HASH.values(), ids=SAME_HASH.keys())
def test_labeling_hash_ignores_operational_settings(
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    body = triage_body()
    before = labeling_hash(body)
    mutate(body)

    assert labeling_hash(body) == before
    assert parse_spec(body).content_hash == before


@pytest.mark.parametrize("mutate", CHANGED_HASH.values(), ids=CHANGED_HASH.keys())
def test_labeling_hash_changes_with_meaning(mutate: Callable[[dict[str, Any]], None]) -> None:
    body = triage_body()
    before = labeling_hash(body)
    mutate(body)

    assert labeling_hash(body) != before


def test_labeling_hash_ignores_key_order_and_does_not_mutate() -> None:
    body = triage_body()
    reordered = dict(reversed(list(body.items())))
    reordered["teacher"] = dict(reversed(list(body["teacher"].items())))
    snapshot = copy.deepcopy(body)

    assert labeling_hash(reordered) == labeling_hash(body)
    assert body == snapshot


# --- schemas.loader --------------------------------------------------------------------------


def test_load_schema_returns_the_bundled_spec_schema() -> None:
    schema = load_schema("spec")

    assert schema["title"] == "stillhouse spec"
    assert "teacher" in schema["properties"]
    assert load_schema("spec") is schema  # cached, parsed once


def test_load_schema_unknown_name() -> None:
    with pytest.raises(FileNotFoundError):
        load_schema("no-such-schema")


def test_spec_validator_is_compiled_once() -> None:
    assert spec_validator() is spec_validator()
    assert spec_validator().is_valid(triage_body())
    assert not spec_validator().is_valid({"name": "x"})


def test_compile_validator_rejects_an_invalid_schema() -> None:
    with pytest.raises(SchemaError):
        compile_validator({"type": "nope"})
    with pytest.raises(SchemaError):
        compile_validator({"type": "object", "required": "label"})


def test_compile_validator_checks_formats() -> None:
    validator = compile_validator({"type": "string", "format": "date"})

    assert validator.is_valid("2024-02-29")
    assert not validator.is_valid("not a date")


def test_error_path_and_schema_problems() -> None:
    validator = compile_validator(
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"n": {"type": "integer"}}},
                },
                "name": {"type": "string"},
            },
            "required": ["name"],
        }
    )

    problems = schema_problems(validator, {"items": [{"n": 1}, {"n": "x"}]})

    assert problems == [
        ("$", "'name' is a required property"),
        ("$.items[1].n", "'x' is not of type 'integer'"),
    ]
    assert schema_problems(validator, {"name": "ok", "items": []}) == []
    error = next(validator.iter_errors({"name": "ok", "items": [{"n": 1.5}]}))
    assert error_path(error) == "$.items[0].n"


def test_the_spec_reference_in_docs_is_what_the_schema_says() -> None:

    from schemas.loader import load_schema
    from schemas.reference import render_reference

    committed = (ROOT / "docs/spec-reference.md").read_text()
    assert committed == render_reference(), (
        "docs/spec-reference.md is stale: run `stillhouse spec reference > docs/spec-reference.md`"
    )

    def fields(node: dict, path: str = "") -> list[str]:
        out = []
        for name, child in node.get("properties", {}).items():
            out.append(f"{path}{name}")
            out += fields(child, f"{path}{name}.")
        return out

    schema = load_schema("spec")
    missing = [f for f in fields(schema) if f"`{f}`" not in committed]
    assert not missing, missing  # every field of the schema is in the reference


def test_a_misspelled_kind_is_the_one_problem_reported() -> None:
    body = minimal_body()
    body["kind"] = "classifcation"
    with pytest.raises(SpecError) as caught:
        parse_spec(body)
    message = str(caught.value)
    assert "$.kind: 'classifcation' is not one of" in message
    assert "output_schema" not in message  # it used to report a missing output_schema too
