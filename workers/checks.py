"""The chain of checks that turns a raw teacher answer into a verdict with reason codes.

A failed check is a rejected label, never an exception. Reason codes are short strings such as
``parse_error``, ``schema:$.label``, ``low_confidence``, ``known_good_mismatch:label`` so that
people can group rejections by reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import Any

from jsonschema import Draft202012Validator

from schemas.errors import BadResponse
from schemas.loader import schema_problems
from storage.models import Verdict
from workers.compare import compare, compare_ranking, ungrounded
from workers.providers import Answer, provider_for
from workers.spec import Spec

__all__ = [
    "CheckResult",
    "Checker",
    "extract_content",
    "field_matches",
    "parse_json_answer",
]

# Reason codes a re-ask that quotes the problem back can fix.
_REPAIRABLE = ("parse_error", "truncated", "schema:", "output_too_large", "output_too_deep")

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


@dataclass(slots=True)
class CheckResult:
    verdict: Verdict
    reasons: list[str] = field(default_factory=list)
    output: dict[str, Any] | None = None
    confidence: float | None = None
    known_good_match: bool | None = None
    # Share of samples (k > 1), or of the jury's teachers, that gave this answer.
    agreement: float | None = None
    # Why, in words: one {"reason", "message"[, "path"]} per reason code, stored with the label.
    problems: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, reason: str, message: str, path: str | None = None) -> None:
        """Add one reason code with the message that explains it."""
        self.reasons.append(reason)
        problem = {"reason": reason, "message": message[:500]}
        if path is not None:
            problem["path"] = path
        self.problems.append(problem)


def _rejected(reason: str, message: str) -> CheckResult:
    result = CheckResult(Verdict.REJECTED)
    result.reject(reason, message)
    return result


def extract_content(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The first choice's message content and finish reason from a chat-completions body."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = message.get("content")
    return (content if isinstance(content, str) else None), choice.get("finish_reason")


def parse_json_answer(content: str) -> Any:
    """Parse a JSON answer, tolerating code fences and prose around one JSON object."""
    text = content.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            return json.loads(text[start : end + 1])
        raise


_PROBLEMS_KEPT = 20_000  # distinct answers whose schema verdict is remembered


class Checker:
    """Compiled once per spec; ``check`` runs the whole chain on one answer."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.validator: Draft202012Validator = spec.output_validator()
        self.min_confidence = float(spec.checks["min_confidence"])
        self.require_match = bool(spec.checks["require_known_good_match"])
        self.max_chars = int(spec.checks["max_output_chars"])
        self.max_depth = int(spec.checks["max_depth"])
        self.grounded = list(spec.checks.get("grounded_fields", []))
        self.min_agreement = float(spec.checks.get("min_agreement", 0.0))
        self.jury_min_agreement = spec.jury.min_agreement
        review = spec.checks.get("review_confidence")
        self.review_confidence = None if review is None else float(review)
        self._problems: dict[str, list[tuple[str, str]]] = {}

    def check_body(
        self,
        body: dict[str, Any],
        known_good: dict[str, Any] | None,
        provider: str = "openai",
        document: str | None = None,
    ) -> CheckResult:
        """Check a stored raw response (e.g. from the cache) as the provider answered it."""
        try:
            answer = provider_for(provider).parse(body)
        except BadResponse as exc:
            return _rejected("bad_response", str(exc))
        return self.check(answer, known_good, document)

    def repairable_problems(self, body: dict[str, Any], provider: str = "openai") -> list[str]:
        """What is structurally wrong with an answer that a re-ask could fix, in words.

        Empty when the answer parses and fits the schema, or when its problem is not the
        format (a refusal, a disagreement with the known-good record, low confidence).
        """
        try:
            answer = provider_for(provider).parse(body)
        except BadResponse:
            return []
        result = self.check(answer, None)
        structural = [r for r in result.reasons if r.startswith(_REPAIRABLE)]
        if not structural:
            return []
        if result.output is None:
            return [f"{structural[0].replace('_', ' ')}: the answer must be one JSON object"]
        return [
            f"at {path}: {message}"
            for path, message in self._schema_problems(answer.content or "", result.output)
        ][:5]

    def _schema_problems(self, content: str, output: Any) -> list[tuple[str, str]]:
        """The schema's verdict on an answer, remembered by its text: a batch checks each
        answer two or three times (repairs, the final check, the jury's vote)."""
        found = self._problems.get(content)
        if found is None:
            if len(self._problems) >= _PROBLEMS_KEPT:
                self._problems.clear()
            found = self._problems[content] = schema_problems(self.validator, output)
        return found

    def check(
        self, answer: Answer, known_good: dict[str, Any] | None, document: str | None = None
    ) -> CheckResult:
        """Run the chain on one answer: parse, schema, confidence, known-good comparison."""
        if answer.content is None:
            if answer.refusal or answer.finish_reason == "refusal":
                return _rejected("refused", answer.refusal or "the teacher refused to answer")
            return _rejected("empty_answer", "the answer has no content")
        if len(answer.samples) > 1:
            return self._check_samples(answer, known_good, document)
        if len(answer.content) > self.max_chars:
            return _rejected(
                "output_too_large",
                f"{len(answer.content)} characters, over checks.max_output_chars {self.max_chars}",
            )
        try:
            output = parse_json_answer(answer.content)
        except ValueError as exc:
            if answer.finish_reason == "length":
                return _rejected("truncated", f"cut off at the token limit: {exc}")
            return _rejected("parse_error", f"not JSON: {exc}")
        except RecursionError:
            return _rejected("output_too_deep", "nested too deeply to parse")
        if not isinstance(output, dict):
            result = CheckResult(Verdict.REJECTED)
            result.reject("schema:$", f"expected a JSON object, got {type(output).__name__}", "$")
            return result
        if _depth(output) > self.max_depth:
            return _rejected(
                "output_too_deep",
                f"nesting depth {_depth(output)}, over checks.max_depth {self.max_depth}",
            )
        confidence = _confidence(output)
        if confidence is None:
            confidence = answer.logprob_confidence
        result = CheckResult(Verdict.ACCEPTED, [], output, confidence)
        for path, message in self._schema_problems(answer.content, output):
            result.reject(f"schema:{path}", message, path)
        if result.confidence is not None and result.confidence < self.min_confidence:
            result.reject(
                "low_confidence",
                f"confidence {result.confidence:.3f} is below checks.min_confidence "
                f"{self.min_confidence:g}",
            )
        if document is not None:
            for name in self.grounded:
                missing = ungrounded(output.get(name), document)
                if missing:
                    result.reject(
                        f"ungrounded:{name}",
                        f"not found in the document: {', '.join(map(repr, missing[:5]))}",
                    )
        self._compare(result, output, known_good)
        if result.reasons:
            result.verdict = self._verdict_for(result)
        return result

    def _check_samples(
        self, answer: Answer, known_good: dict[str, Any] | None, document: str | None
    ) -> CheckResult:
        """Self-consistency: check every sample, keep the majority answer, record agreement."""
        results = [
            self.check(dc_replace(answer, content=c, samples=[]), known_good, document)
            for c in answer.samples
            if c is not None
        ]
        usable = [r for r in results if r.output is not None]
        majority = _majority([r.output for r in usable])
        if majority is None:
            return results[0] if results else _rejected("empty_answer", "no sample has content")
        index, count = majority
        winner = usable[index]
        winner.agreement = round(count / len(answer.samples), 4)
        if winner.confidence is None:
            winner.confidence = winner.agreement
        if winner.agreement < self.min_agreement:
            winner.reject(
                "low_agreement",
                f"{count} of {len(answer.samples)} samples agree, below checks.min_agreement "
                f"{self.min_agreement:g}",
            )
            winner.verdict = self._verdict_for(winner)
        return winner

    def vote(self, ballots: Sequence[tuple[str, CheckResult]]) -> int:
        """A jury's vote on one item: which ballot (teacher name, checked answer) carries the
        majority answer; that result gets the agreement, and ``low_agreement`` under
        ``jury.min_agreement``.

        Teachers vote on what k samples vote on (``_vote_key``). A tie goes to the earliest
        ballot, the primary teacher's; a ballot without a parsed answer disagrees. With no
        answer at all, the primary's ballot (0) is kept as it is.
        """
        majority = _majority([result.output for _, result in ballots])
        if majority is None:
            return 0
        index, count = majority
        winner = ballots[index][1]
        winner.agreement = round(count / len(ballots), 4)
        if winner.confidence is None:
            winner.confidence = winner.agreement
        if winner.agreement < self.jury_min_agreement:
            said = "; ".join(f"{name}: {_said(result)}" for name, result in ballots)
            winner.reject(
                "low_agreement",
                f"{count} of {len(ballots)} teachers give this answer, below "
                f"jury.min_agreement {self.jury_min_agreement:g} ({said})",
            )
            winner.verdict = self._verdict_for(winner)
        return index

    def _verdict_for(self, result: CheckResult) -> Verdict:
        # A confident teacher that only disagrees with the record may be right: a person decides.
        only_mismatch = all(r.startswith("known_good_mismatch:") for r in result.reasons)
        confident = (
            self.review_confidence is not None
            and result.confidence is not None
            and result.confidence >= self.review_confidence
        )
        return Verdict.NEEDS_REVIEW if only_mismatch and confident else Verdict.REJECTED

    def _compare(
        self, result: CheckResult, output: dict[str, Any], known_good: dict[str, Any] | None
    ) -> None:
        if not known_good:
            return
        compared = {name: rule for name, rule in self.spec.known_good.items() if name in known_good}
        if not compared:
            return
        mismatched = [
            name
            for name, rule in compared.items()
            if not field_matches(output.get(name), known_good[name], rule)
        ]
        result.known_good_match = not mismatched
        if self.require_match:
            for name in mismatched:
                result.reject(
                    f"known_good_mismatch:{name}",
                    f"teacher gave {_short(output.get(name))}, the known-good record has "
                    f"{_short(known_good[name])}",
                )


def field_matches(value: Any, reference: Any, rule: dict[str, Any]) -> bool:
    """One field against its known-good value, by the rule's ``compare`` kind."""
    if rule.get("compare") == "ranking":
        # The reference is an order (a list of ids) or graded relevance ({id: grade}).
        relevance = reference if isinstance(reference, dict) else None
        order = sorted(reference, key=lambda k: -float(reference[k])) if relevance else reference
        given = [str(v) for v in value] if isinstance(value, list) else []
        return compare_ranking(given, [str(o) for o in order], relevance, rule).match
    return compare(value, reference, {"compare": "exact", **rule}).match


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _vote_key(output: dict[str, Any] | None) -> str:
    """What samples vote on: the label when there is one, else the whole answer."""
    if output is not None and "label" in output:
        return json.dumps(output["label"], sort_keys=True)
    return json.dumps(
        {k: v for k, v in (output or {}).items() if k != "confidence"}, sort_keys=True
    )


def _majority(outputs: Sequence[dict[str, Any] | None]) -> tuple[int, int] | None:
    """Where the most common answer first occurs and how many gave it (None: no answers).

    ``most_common`` keeps first-seen order among equal counts, so the earliest wins a tie.
    """
    keys = [None if output is None else _vote_key(output) for output in outputs]
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return None
    key, count = votes.most_common(1)[0]
    return keys.index(key), count


def _said(result: CheckResult) -> str:
    """One teacher's vote in a few words, for the low_agreement message."""
    if result.output is None:
        return "no usable answer" + (f" ({result.reasons[0]})" if result.reasons else "")
    return _short(json.loads(_vote_key(result.output)))


def _depth(value: Any, level: int = 1) -> int:
    """Nesting depth of a parsed JSON value (an object of scalars is 1)."""
    children = (
        value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    )
    return max(
        (_depth(child, level + 1) for child in children if isinstance(child, (dict, list))),
        default=level,
    )


def _confidence(output: dict[str, Any]) -> float | None:
    value = output.get("confidence")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None
