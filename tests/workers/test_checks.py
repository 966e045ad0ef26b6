"""The check chain: raw teacher answers in, verdicts with reason codes out."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from storage.models import Verdict
from workers.checks import Checker, CheckResult, extract_content, parse_json_answer
from workers.spec import Spec, load_spec, parse_spec


def completion(
    content: str | None, *, finish_reason: str = "stop", refusal: str | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if refusal is not None:
        message["refusal"] = refusal
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }


def answer(**fields: Any) -> dict[str, Any]:
    return completion(json.dumps(fields))


def triage_with(**changes: Any) -> Spec:
    body = copy.deepcopy(load_spec("triage").body)
    for key, value in changes.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_spec(body)


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(load_spec("triage"))


# --- the happy path and known-good comparison ------------------------------------------------


def test_matching_answer_is_accepted(checker: Checker) -> None:
    result = checker.check_body(answer(label="sport", confidence=0.9), {"label": "sport"})

    assert result == CheckResult(
        Verdict.ACCEPTED, [], {"label": "sport", "confidence": 0.9}, 0.9, True
    )


def test_known_good_mismatch_is_rejected(checker: Checker) -> None:
    result = checker.check_body(answer(label="tech", confidence=0.9), {"label": "sport"})

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["known_good_mismatch:label"]
    assert result.known_good_match is False
    assert result.output == {"label": "tech", "confidence": 0.9}
    assert result.confidence == 0.9


@pytest.mark.parametrize("known_good", [None, {}, {"unrelated": "x"}])
def test_without_known_good_the_answer_is_accepted(
    checker: Checker, known_good: dict[str, Any] | None
) -> None:
    result = checker.check_body(answer(label="politics", confidence=0.4), known_good)

    assert result.verdict == Verdict.ACCEPTED
    assert result.reasons == []
    assert result.known_good_match is None
    assert result.output == {"label": "politics", "confidence": 0.4}


def test_mismatch_is_recorded_but_accepted_when_not_required() -> None:
    lenient = Checker(triage_with(checks={"require_known_good_match": False}))

    result = lenient.check_body(answer(label="tech", confidence=0.9), {"label": "sport"})

    assert result.verdict == Verdict.ACCEPTED
    assert result.reasons == []
    assert result.known_good_match is False


def test_casefold_comparison() -> None:
    spec = parse_spec(
        {
            "name": "orgs",
            "version": 1,
            "kind": "extraction",
            "input": {"text": "{text}"},
            "prompt": {"user": "Which company? {document}"},
            "teacher": {"model": "m"},
            "output_schema": {
                "type": "object",
                "properties": {"company": {"type": "string"}},
                "required": ["company"],
            },
            "known_good": {"company": {"source": "org", "compare": "casefold"}},
        }
    )
    checker = Checker(spec)

    same = checker.check_body(answer(company=" ACME Corp "), {"company": "acme corp"})
    different = checker.check_body(answer(company="Initech"), {"company": "acme corp"})

    assert (same.verdict, same.known_good_match) == (Verdict.ACCEPTED, True)
    assert same.confidence is None
    assert (different.verdict, different.known_good_match) == (Verdict.REJECTED, False)
    assert different.reasons == ["known_good_mismatch:company"]


def test_exact_comparison_is_case_sensitive(checker: Checker) -> None:
    result = checker.check_body(answer(label="sport", confidence=0.9), {"label": "Sport"})

    assert result.known_good_match is False
    assert result.reasons == ["known_good_mismatch:label"]


# --- parsing the content ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        '```json\n{"label": "sport", "confidence": 0.9}\n```',
        '```\n{"label": "sport", "confidence": 0.9}\n```',
        'Here is my answer:\n```json\n{"label": "sport", "confidence": 0.9}\n```\nHope it helps.',
        'The queue is {"label": "sport", "confidence": 0.9} as requested.',
        '  \n{"label": "sport", "confidence": 0.9}\n  ',
    ],
    ids=["json-fence", "bare-fence", "fence-with-prose", "prose-around", "whitespace"],
)
def test_fenced_or_wrapped_answers_are_parsed(checker: Checker, content: str) -> None:
    result = checker.check_body(completion(content), {"label": "sport"})

    assert result.verdict == Verdict.ACCEPTED
    assert result.output == {"label": "sport", "confidence": 0.9}
    assert result.known_good_match is True


@pytest.mark.parametrize("content", ["not json at all", '{"label": sport}', "", "{"])
def test_invalid_json_is_a_parse_error(checker: Checker, content: str) -> None:
    result = checker.check_body(completion(content), {"label": "sport"})

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["parse_error"]
    assert result.output is None
    assert result.known_good_match is None


def test_invalid_json_cut_off_by_length_is_truncated(checker: Checker) -> None:
    result = checker.check_body(completion('{"label": "spo', finish_reason="length"), None)

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["truncated"]


def test_valid_json_with_finish_reason_length_is_still_checked(checker: Checker) -> None:
    body = completion('{"label": "sport", "confidence": 0.9}', finish_reason="length")

    assert checker.check_body(body, {"label": "sport"}).verdict == Verdict.ACCEPTED


@pytest.mark.parametrize("content", ["[1, 2]", '"sport"', "42"])
def test_json_that_is_not_an_object_is_a_schema_failure(checker: Checker, content: str) -> None:
    result = checker.check_body(completion(content), {"label": "sport"})

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["schema:$"]
    assert result.output is None


# --- schema checks ---------------------------------------------------------------------------


def test_label_outside_the_enum(checker: Checker) -> None:
    result = checker.check_body(answer(label="weather", confidence=0.9), None)

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["schema:$.label"]
    assert result.output == {"label": "weather", "confidence": 0.9}


def test_label_outside_the_enum_and_mismatch_both_reported(checker: Checker) -> None:
    result = checker.check_body(answer(label="weather", confidence=0.9), {"label": "sport"})

    assert result.reasons == ["schema:$.label", "known_good_mismatch:label"]
    assert result.known_good_match is False


def test_extra_property(checker: Checker) -> None:
    result = checker.check_body(
        answer(label="sport", confidence=0.9, why="because"), {"label": "sport"}
    )

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["schema:$"]
    assert result.known_good_match is True


def test_missing_confidence(checker: Checker) -> None:
    result = checker.check_body(answer(label="sport"), None)

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["schema:$"]
    assert result.confidence is None


@pytest.mark.parametrize("confidence", [1.5, -0.1, "high", True])
def test_confidence_out_of_range_or_wrong_type(checker: Checker, confidence: Any) -> None:
    result = checker.check_body(answer(label="sport", confidence=confidence), None)

    assert result.verdict == Verdict.REJECTED
    assert result.reasons[0] == "schema:$.confidence"


def test_boolean_confidence_is_not_a_number(checker: Checker) -> None:
    assert checker.check_body(answer(label="sport", confidence=True), None).confidence is None


# --- refusals and empty answers --------------------------------------------------------------


def test_refusal(checker: Checker) -> None:
    result = checker.check_body(
        completion(None, refusal="I can't help with that."), {"label": "sport"}
    )

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["refused"]
    assert result.output is None


@pytest.mark.parametrize(
    "body",
    [
        completion(None),
        {"choices": [{"message": None}]},
        {"choices": [{"message": {"content": [{"type": "text"}]}}]},
    ],
    ids=["null-content", "null-message", "non-string-content"],
)
def test_empty_answer(checker: Checker, body: dict[str, Any]) -> None:
    result = checker.check_body(body, {"label": "sport"})

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["empty_answer"]


@pytest.mark.parametrize("body", [{"choices": []}, {}], ids=["no-choices", "empty-body"])
def test_a_body_without_choices_is_a_bad_response(checker: Checker, body: dict[str, Any]) -> None:
    result = checker.check_body(body, {"label": "sport"})

    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["bad_response"]


# --- confidence threshold --------------------------------------------------------------------


def test_low_confidence() -> None:
    strict = Checker(triage_with(checks={"min_confidence": 0.5}))

    low = strict.check_body(answer(label="sport", confidence=0.2), {"label": "sport"})
    at_threshold = strict.check_body(answer(label="sport", confidence=0.5), {"label": "sport"})

    assert low.verdict == Verdict.REJECTED
    assert low.reasons == ["low_confidence"]
    assert low.confidence == 0.2
    assert low.known_good_match is True
    assert at_threshold.verdict == Verdict.ACCEPTED


def test_low_confidence_and_mismatch_both_reported() -> None:
    strict = Checker(triage_with(checks={"min_confidence": 0.5}))

    result = strict.check_body(answer(label="tech", confidence=0.2), {"label": "sport"})

    assert result.reasons == ["low_confidence", "known_good_mismatch:label"]


def test_checker_reads_thresholds_from_the_spec(checker: Checker) -> None:
    assert checker.min_confidence == 0.0
    assert checker.require_match is True
    assert checker.validator.is_valid({"label": "sport", "confidence": 0.1})


# --- extract_content and parse_json_answer ---------------------------------------------------


def test_extract_content() -> None:
    assert extract_content(completion("hi", finish_reason="length")) == ("hi", "length")
    assert extract_content(completion(None)) == (None, "stop")
    assert extract_content({}) == (None, None)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```\n{"a": 1}\n```', {"a": 1}),
        ('```json{"a": 1}```', {"a": 1}),
        ('Sure:\n```json\n{"a": 1}\n```\nand\n```json\n{"b": 2}\n```', {"a": 1}),
        ('prefix {"a": {"b": [1, 2]}} suffix', {"a": {"b": [1, 2]}}),
        ('```JSON\n{"a": 1}\n```', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ('"text"', "text"),
        ("  null  ", None),
        ('{"s": "caf\\u00e9 {braces}"}', {"s": "caf\u00e9 {braces}"}),
    ],
    ids=[
        "plain",
        "json-fence",
        "bare-fence",
        "tight-fence",
        "first-fence",
        "nested-in-prose",
        "upper-fence",
        "list",
        "string",
        "null",
        "braces-in-string",
    ],
)
def test_parse_json_answer(content: str, expected: Any) -> None:
    assert parse_json_answer(content) == expected


@pytest.mark.parametrize(
    "content",
    [
        "",
        "   ",
        "no json here",
        "{",
        "}{",
        '{"a": 1',
        '```json\n{"a": \n```',
        '{"a": 1} and then {"b": 2}',
    ],
)
def test_parse_json_answer_raises_value_error(content: str) -> None:
    with pytest.raises(ValueError):
        parse_json_answer(content)


def test_an_answer_over_the_size_limit_is_rejected_before_parsing() -> None:
    checker = Checker(triage_with(checks={"max_output_chars": 50}))
    result = checker.check_body(answer(label="sport", confidence=0.9, note="x" * 60), None)
    assert result.verdict == Verdict.REJECTED
    assert result.reasons == ["output_too_large"]


def test_an_answer_nested_too_deep_is_rejected() -> None:
    checker = Checker(triage_with(checks={"max_depth": 3}))
    deep = {"label": "sport", "confidence": 0.9, "why": {"a": {"b": {"c": 1}}}}
    result = checker.check_body(completion(json.dumps(deep)), None)
    assert result.reasons == ["output_too_deep"]
    shallow = {"label": "sport", "confidence": 0.9}
    assert (
        Checker(triage_with(checks={"max_depth": 1}))
        .check_body(completion(json.dumps(shallow)), None)
        .verdict
        == Verdict.ACCEPTED
    )


def test_repairable_problems_name_what_to_fix(checker: Checker) -> None:
    assert checker.repairable_problems(answer(label="sport", confidence=0.9)) == []
    assert checker.repairable_problems(completion('{"label": "sport"')) == [
        "parse error: the answer must be one JSON object"
    ]
    problems = checker.repairable_problems(answer(label="cooking", confidence=0.9))
    assert problems and problems[0].startswith("at $.label: 'cooking' is not one of")
    # Not a format problem: a re-ask would not help.
    assert checker.repairable_problems(answer(label="tech", confidence=0.9)) == []
    refusal = {"choices": [{"message": {"content": None, "refusal": "no"}}]}
    assert checker.repairable_problems(refusal) == []


EXTRACTION = {
    "name": "deals",
    "version": 1,
    "kind": "extraction",
    "input": {"text": "{body}"},
    "output_schema": {
        "type": "object",
        "properties": {
            "money": {"type": "array", "items": {"type": "string"}},
            "date": {"type": "string"},
            "orgs": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["money"],
    },
    "known_good": {
        "money": {"source": "amount", "compare": "set"},
        "date": {"source": "day", "compare": "date"},
        "orgs": {"source": "orgs", "compare": "set", "min_overlap": 0.5},
    },
    "prompt": {"user": "Extract.\n{document}"},
    "teacher": {"model": "spacy"},
    "checks": {"grounded_fields": ["money", "orgs"]},
}


def test_extraction_fields_are_compared_by_kind_and_grounded_in_the_document() -> None:
    checker = Checker(parse_spec(copy.deepcopy(EXTRACTION)))
    document = "TimeWarner made $1.13bn on 21 January 2005, ahead of Google."
    known = {"money": ["$1.13bn"], "date": "2005-01-21", "orgs": ["TimeWarner", "Google"]}
    good = {"money": ["$1.13bn"], "date": "21 January 2005", "orgs": ["timewarner"]}
    result = checker.check_body(completion(json.dumps(good)), known, document=document)
    assert result.verdict == Verdict.ACCEPTED, result.reasons
    assert result.known_good_match is True

    invented = {"money": ["$2bn"], "date": "22 January 2005", "orgs": ["Yahoo"]}
    result = checker.check_body(completion(json.dumps(invented)), known, document=document)
    assert result.reasons == [
        "ungrounded:money",
        "ungrounded:orgs",
        "known_good_mismatch:money",
        "known_good_mismatch:date",
        "known_good_mismatch:orgs",
    ]


def test_a_confident_disagreement_goes_to_review_not_rejection() -> None:
    checker = Checker(triage_with(checks={"review_confidence": 0.8}))
    confident = checker.check_body(answer(label="tech", confidence=0.9), {"label": "sport"})
    assert confident.verdict == Verdict.NEEDS_REVIEW
    assert confident.reasons == ["known_good_mismatch:label"]
    unsure = checker.check_body(answer(label="tech", confidence=0.5), {"label": "sport"})
    assert unsure.verdict == Verdict.REJECTED
    # Any other problem is a rejection whatever the confidence.
    broken = checker.check_body(answer(label="cooking", confidence=0.99), {"label": "sport"})
    assert broken.verdict == Verdict.REJECTED


def _samples(*labels: str) -> dict[str, Any]:
    return {
        "choices": [
            {"index": i, "message": {"content": json.dumps({"label": lb})}, "finish_reason": "stop"}
            for i, lb in enumerate(labels)
        ]
    }


def test_k_samples_vote_and_their_agreement_is_the_confidence() -> None:
    spec = triage_with(checks={"min_agreement": 0.6})
    # Without a confidence property the answer's confidence is the agreement.
    body = copy.deepcopy(spec.body)
    body["output_schema"] = {
        "type": "object",
        "properties": {"label": {"enum": spec.label_names}},
        "required": ["label"],
    }
    checker = Checker(parse_spec(body))
    result = checker.check_body(_samples("sport", "sport", "tech", "sport", "sport"), None)
    assert result.output == {"label": "sport"}
    assert result.agreement == 0.8 and result.confidence == 0.8
    assert result.verdict == Verdict.ACCEPTED
    split = checker.check_body(_samples("sport", "tech", "politics", "sport", "tech"), None)
    assert split.agreement == 0.4 and split.reasons == ["low_agreement"]
    assert split.verdict == Verdict.REJECTED
