"""A jury: several teachers answer each item and vote; its spec, the vote, the estimate."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.clitools import run_cli

from schemas.errors import SpecError
from storage.models import Verdict
from workers.checks import Checker, CheckResult
from workers.spec import EXAMPLES_DIR, Spec, labeling_hash, load_spec, parse_spec

JUROR = {"model": "second-opinion", "base_url": "http://127.0.0.1:8766/v1"}


def completion(content: str | None) -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }


def answer(label: str, confidence: float = 0.9) -> dict[str, Any]:
    return completion(json.dumps({"label": label, "confidence": confidence}))


def with_jury(min_agreement: float | None = None, *jurors: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(load_spec("triage").body)
    body["jury"] = {"teachers": [copy.deepcopy(j) for j in jurors or (JUROR,)]}
    if min_agreement is not None:
        body["jury"]["min_agreement"] = min_agreement
    return body


def ballots(checker: Checker, *votes: dict[str, Any] | None) -> list[tuple[str, CheckResult]]:
    """Each vote checked as a teacher's answer; None is a teacher that gave no answer."""
    out = []
    for number, body in enumerate(votes):
        if body is None:
            result = CheckResult(Verdict.REJECTED)
            result.reject("unavailable", "cannot connect to the teacher")
        else:
            result = checker.check_body(body, {"label": "sport"})
        out.append((f"t{number}", result))
    return out


def checker_for(min_agreement: float, *, require_match: bool = False) -> Checker:
    body = with_jury(min_agreement)
    body["checks"]["require_known_good_match"] = require_match
    return Checker(parse_spec(body))


# --- the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml")))
def test_every_bundled_spec_loads_and_keeps_its_hash(name: str) -> None:
    spec = load_spec(name)
    if "jury" in spec.body:
        assert len(spec.teachers) == 1 + len(spec.jury.teachers)
        return
    assert spec.jury.teachers == () and spec.teachers == (spec.teacher,)
    # The hash as it was computed before juries existed: nothing of the jury code adds to it.
    operational = {"description", "labeling", "budget_usd", "student", "sampling"}
    meaning = {k: v for k, v in spec.body.items() if k not in operational}
    teacher_ops = {"rpm", "tpm", "circuit_breaker", "max_inline_wait_s", "base_url"}
    teacher_ops |= {"api_key_env", "timeout_s", "max_retries", "concurrency", "price"}
    meaning["teacher"] = {k: v for k, v in spec.body["teacher"].items() if k not in teacher_ops}
    canonical = json.dumps(meaning, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec.content_hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_a_jury_is_parsed_with_its_own_teachers() -> None:
    juror = {
        **JUROR,
        "provider": "anthropic",
        "api_key_env": "SECOND_KEY",
        "price": {"input_per_mtok": 3, "output_per_mtok": 15},
        "rpm": 60,
        "concurrency": 4,
    }
    spec = parse_spec(with_jury(0.66, juror))

    (config,) = spec.jury.teachers
    assert spec.jury.min_agreement == 0.66
    assert (config.provider, config.model, config.base_url) == (
        "anthropic",
        "second-opinion",
        "http://127.0.0.1:8766/v1",
    )
    assert (config.api_key_env, config.rpm, config.concurrency) == ("SECOND_KEY", 60, 4)
    assert config.cost_usd(1_000_000, 1_000_000) == 18.0
    assert spec.teachers == (spec.teacher, config)
    assert Checker(spec).jury_min_agreement == 0.66


def test_a_jury_changes_the_hash_but_its_operational_settings_do_not() -> None:
    plain = load_spec("triage").content_hash
    jury = with_jury(0.5)
    assert labeling_hash(jury) != plain
    moved = copy.deepcopy(jury)
    moved["jury"]["teachers"][0].update(
        base_url="https://elsewhere.example.com/v1",
        price={"input_per_mtok": 9},
        api_key_env="OTHER_KEY",
        rpm=10,
        max_retries=0,
    )
    assert labeling_hash(moved) == labeling_hash(jury)
    for change in ({"model": "third-opinion"}, {"params": {"temperature": 0.7}}):
        other = copy.deepcopy(jury)
        other["jury"]["teachers"][0].update(change)
        assert labeling_hash(other) != labeling_hash(jury)
    stricter = with_jury(0.9)
    assert labeling_hash(stricter) != labeling_hash(jury)


@pytest.mark.parametrize(
    ("jury", "expected"),
    [
        ({"teachers": []}, "$.jury.teachers: [] should be non-empty"),
        ({"min_agreement": 0.5}, "$.jury: 'teachers' is a required property"),
        ({"teachers": [{"base_url": "http://x/v1"}]}, "'model' is a required property"),
        ({"teachers": [{"model": "m", "base_url": "ftp://x"}]}, "$.jury.teachers[0].base_url"),
        ({"teachers": [{"model": "m", "provder": "openai"}]}, "('provder' was unexpected)"),
        ({"teachers": [JUROR], "min_agreement": 1.5}, "$.jury.min_agreement: 1.5 is greater"),
        ({"teachers": [JUROR], "quorum": 2}, "('quorum' was unexpected)"),
    ],
)
def test_a_bad_jury_is_refused_with_the_field_path(jury: dict[str, Any], expected: str) -> None:
    body = copy.deepcopy(load_spec("triage").body)
    body["jury"] = jury
    with pytest.raises(SpecError) as caught:
        parse_spec(body)
    assert expected in str(caught.value)


def test_a_jury_teacher_that_asks_what_another_asks_is_refused() -> None:
    # Same provider, model and params as the primary: only the URL differs, and the URL is
    # not part of the cache key, so its "vote" would be the primary's cached answer.
    primary = load_spec("triage").body["teacher"]
    twin = {"model": primary["model"], "params": primary["params"], "base_url": "http://b/v1"}
    with pytest.raises(SpecError, match=r"\$\.jury\.teachers\[0\]: asks exactly what \$\.teacher"):
        parse_spec(with_jury(None, twin))
    with pytest.raises(SpecError, match=r"\$\.jury\.teachers\[1\]: asks exactly what \$\.jury"):
        parse_spec(with_jury(None, JUROR, {**JUROR, "base_url": "http://c/v1"}))
    # Another temperature is another question.
    parse_spec(with_jury(None, {**twin, "params": {"temperature": 0.7}}))


# --- the vote ----------------------------------------------------------------------------------


def test_the_majority_answer_wins_over_the_primary() -> None:
    checker = checker_for(0.6)
    votes = ballots(checker, answer("tech"), answer("sport", 0.7), answer("sport", 0.8))

    winner = checker.vote(votes)

    assert winner == 1  # the first teacher that gave the majority answer
    result = votes[1][1]
    assert result.output == {"label": "sport", "confidence": 0.7}
    assert result.agreement == 0.6667 and result.confidence == 0.7
    assert result.verdict == Verdict.ACCEPTED and result.reasons == []


def test_a_tie_goes_to_the_primary_and_low_agreement_says_who_said_what() -> None:
    checker = checker_for(0.6)
    votes = ballots(checker, answer("tech"), answer("sport"))

    assert checker.vote(votes) == 0
    result = votes[0][1]
    assert result.output == {"label": "tech", "confidence": 0.9}
    assert result.agreement == 0.5
    assert result.verdict == Verdict.REJECTED and result.reasons == ["low_agreement"]
    assert result.problems == [
        {
            "reason": "low_agreement",
            "message": "1 of 2 teachers give this answer, below jury.min_agreement 0.6 "
            '(t0: "tech"; t1: "sport")',
        }
    ]


def test_a_teacher_without_an_answer_counts_as_disagreeing() -> None:
    checker = checker_for(0.6)
    failed = ballots(checker, answer("sport"), None, answer("sport"))
    assert checker.vote(failed) == 0 and failed[0][1].agreement == 0.6667
    assert failed[0][1].verdict == Verdict.ACCEPTED

    unparseable = ballots(checker, answer("sport"), completion("I think it is sport"))
    assert checker.vote(unparseable) == 0
    result = unparseable[0][1]
    assert result.agreement == 0.5 and result.reasons == ["low_agreement"]
    assert "t1: no usable answer (parse_error)" in result.problems[0]["message"]

    down = ballots(checker, answer("sport"), None)
    checker.vote(down)
    assert "t1: no usable answer (unavailable)" in down[0][1].problems[0]["message"]


def test_teachers_vote_on_the_label_as_samples_do_not_on_the_confidence() -> None:
    checker = checker_for(1.0)
    votes = ballots(checker, answer("sport", 0.9), answer("sport", 0.4), answer("sport", 0.6))

    assert checker.vote(votes) == 0
    assert votes[0][1].agreement == 1.0 and votes[0][1].confidence == 0.9
    assert votes[0][1].verdict == Verdict.ACCEPTED


def test_with_no_answer_at_all_the_primary_result_stands() -> None:
    checker = checker_for(0.6)
    votes = ballots(checker, completion("not json"), None)

    assert checker.vote(votes) == 0
    assert votes[0][1].reasons == ["parse_error"] and votes[0][1].agreement is None


def test_the_kept_answer_keeps_its_own_checks() -> None:
    checker = checker_for(0.6, require_match=True)
    # The majority disagrees with the known-good record (sport): it is kept, and rejected
    # for that, with the agreement recorded.
    votes = ballots(checker, answer("tech"), answer("tech"), answer("sport"))

    assert checker.vote(votes) == 0
    result = votes[0][1]
    assert result.agreement == 0.6667
    assert result.reasons == ["known_good_mismatch:label"] and result.known_good_match is False


# --- the estimate ------------------------------------------------------------------------------


def jury_spec_file(tmp_path: Path) -> Spec:
    body = with_jury(
        0.6,
        {**JUROR, "price": {"input_per_mtok": 3, "output_per_mtok": 15}},
        {**JUROR, "model": "third-opinion", "price": {"input_per_mtok": 0, "output_per_mtok": 0}},
    )
    path = tmp_path / "jury.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_spec(str(path))


def test_the_estimate_counts_every_teacher_of_the_jury(tmp_path: Path) -> None:
    spec = jury_spec_file(tmp_path)
    env = {"STILLHOUSE_DATABASE_URL": f"sqlite:///{tmp_path}/est.db", "STILLHOUSE_BROKER_URL": ""}
    args = ("estimate", "bbc", "--limit", "40", "--json", "--spec")
    run = run_cli(env, *args, spec.source)
    plain = run_cli(env, *args, "triage")
    assert run.returncode == 0, run.stderr
    assert plain.returncode == 0, plain.stderr
    jury, alone = json.loads(run.stdout), json.loads(plain.stdout)

    assert alone["calls"] == 40 and jury["calls"] == 120
    assert [t["model"] for t in jury["by_teacher"]] == [
        "minilm-zero-shot",
        "second-opinion",
        "third-opinion",
    ]
    assert [t["calls"] for t in jury["by_teacher"]] == [40, 40, 40]
    first, second, third = (t["cost_usd"] for t in jury["by_teacher"])
    assert first == pytest.approx(alone["cost_usd"], abs=1e-4) and third == 0
    assert second > 10 * first  # its own, higher prices
    assert jury["cost_usd"] == pytest.approx(first + second, abs=2e-4)
    assert jury["prompt_tokens"] == 3 * alone["prompt_tokens"]
    assert any("asked of 3 teachers" in note for note in jury["assumptions"])
