"""Turn one batch's teacher outcomes into rows: ledger, cached responses, labels, releases."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import ConfigError, PermanentError, RateLimited, StillhouseError
from storage.calibrations import AWAITING_CALIBRATION
from storage.items import ClaimedItem
from storage.models import CallStatus, Verdict
from storage.results import BatchResult, CallRecord, LabelRecord, NewResponse, Release
from workers.calibration import Calibration
from workers.checks import Checker, CheckResult, parse_json_answer
from workers.providers import Answer
from workers.spec import Spec, TeacherConfig
from workers.teacher import TeacherOutcome, TeacherRequest

__all__ = [
    "BELOW_CALIBRATED_THRESHOLD",
    "BatchContext",
    "BatchSummary",
    "assemble",
    "below_threshold",
]

# One jury teacher's request, the answer it got (None: none) and why not.
JuryAnswer = tuple[TeacherRequest, dict[str, Any] | None, StillhouseError | None]


@dataclass(slots=True)
class BatchSummary:
    claimed: int = 0
    labeled: int = 0
    accepted: int = 0
    cache_hits: int = 0
    teacher_calls: int = 0
    released: int = 0
    failed: int = 0
    spent_usd: float = 0.0
    # Items whose lease another claim had taken over by the time this batch was written.
    lost_leases: int = 0
    # Process CPU for the batch, and the part of it spent in teacher calls (HTTP client,
    # governor); the rest is the pipeline's own overhead (claims, checks, database writes).
    cpu_ms: float = 0.0
    call_cpu_ms: float = 0.0

    def add(self, other: BatchSummary) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class BatchContext:
    """Everything one batch knows before it is written."""

    spec: Spec
    checker: Checker
    claimed: list[ClaimedItem]
    requests: dict[int, TeacherRequest]
    known: dict[int, dict[str, Any]]
    cached: dict[str, dict[str, Any]]
    outcomes: dict[str, TeacherOutcome]
    config_pause_s: float = 0.0
    # When the claim's lease runs out, on this process's monotonic clock.
    lease_ends: float = math.inf
    # Requests left unsent because the budget could not cover them, and why.
    unsent: dict[str, ConfigError] = field(default_factory=dict)
    # The conversation each item's first request carried, and one dict per repair round.
    messages: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    repairs: list[dict[int, TeacherRequest]] = field(default_factory=list)
    # The jury's requests per item (same messages, one per jury teacher, in spec order), and
    # which jury teacher each request hash belongs to (any other hash is the primary's).
    jury: dict[int, list[TeacherRequest]] = field(default_factory=dict)
    jury_teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    # Under checks.target_accuracy: the thresholds for items without a record the checks
    # see (None: not ready, such items wait).
    calibration: Calibration | None = None

    def teacher_for(self, request_hash: str) -> TeacherConfig:
        """The teacher a request went to: what prices its ledger rows and parses its answer."""
        return self.jury_teachers.get(request_hash, self.spec.teacher)

    @property
    def texts(self) -> dict[int, str]:
        """Each claimed item's input text: what grounding checks extracted strings against."""
        return {item.id: item.text for item in self.claimed}

    def body_for(self, request: TeacherRequest) -> dict[str, Any] | None:
        """The answer a request got in this batch, from the cache or from the teacher."""
        cached = self.cached.get(request.request_hash)
        if cached is not None:
            return cached
        outcome = self.outcomes.get(request.request_hash)
        return outcome.body if outcome is not None else None

    def latest_request(self, item_id: int) -> TeacherRequest:
        """The last request made for an item: its first, or its latest repair."""
        for round_ in reversed(self.repairs):
            if item_id in round_:
                return round_[item_id]
        return self.requests[item_id]


def assemble(ctx: BatchContext) -> tuple[BatchResult, BatchSummary, ConfigError | None]:
    """Rows for one batch; a config error (bad key, budget spent) is returned to stop the run."""
    batch = BatchResult([], [], [], [])
    summary = BatchSummary(claimed=len(ctx.claimed))
    stop: ConfigError | None = None
    charged: set[str] = set()  # one request answered once, even if two items asked it
    for item in ctx.claimed:
        request = ctx.requests[item.id]
        jury = ctx.jury.get(item.id, [])
        unsent = _unsent(ctx, [request, *jury])
        if unsent is not None:
            stop = stop or unsent
            _release(ctx, item, unsent, batch, summary)
            continue
        body, error = _answer(ctx, item.id, request, charged, batch, summary)
        # Every jury answer is ledgered and cached, whatever became of the primary's.
        votes = [_answer(ctx, item.id, r, charged, batch, summary) for r in jury]
        # A bad key or setting of a jury teacher stops the run as the primary's would.
        error = error or next((e for _, e in votes if isinstance(e, ConfigError)), None)
        if body is None or isinstance(error, ConfigError):
            stop = stop or _release(ctx, item, error or PermanentError("no answer"), batch, summary)
            continue
        final, repair_failed, unsent_repair = request.request_hash, False, None
        for round_ in ctx.repairs:
            repair = round_.get(item.id)
            if repair is None:
                break
            if repair.request_hash in ctx.unsent:
                unsent_repair = ctx.unsent[repair.request_hash]
                break
            repaired, _ = _answer(ctx, item.id, repair, charged, batch, summary)
            if repaired is None:
                repair_failed = True
                break
            body, final = repaired, repair.request_hash
        if unsent_repair is not None:
            # The budget ran out before the re-ask could go: not the item's fault (its answer
            # was repairable), so it waits with its attempt, as an unsent first call does,
            # and the run stops; it is not rejected for a flaw a re-ask would have fixed.
            stop = stop or _release(ctx, item, unsent_repair, batch, summary)
            continue
        ballots = [(r, b, e) for r, (b, e) in zip(jury, votes, strict=True)]
        _label(ctx, item.id, final, body, batch, summary, repair_failed, ballots)
    return batch, summary, stop


def _unsent(ctx: BatchContext, requests: list[TeacherRequest]) -> ConfigError | None:
    """Why an item's requests were not sent (the budget), if they were not."""
    return next(
        (ctx.unsent[r.request_hash] for r in requests if r.request_hash in ctx.unsent), None
    )


def _answer(
    ctx: BatchContext,
    item_id: int,
    request: TeacherRequest,
    charged: set[str],
    batch: BatchResult,
    summary: BatchSummary,
) -> tuple[dict[str, Any] | None, StillhouseError | None]:
    """The body one request got, with its ledger rows (a cache hit costs nothing)."""
    rhash = request.request_hash
    if rhash in ctx.cached or rhash in charged:
        batch.calls.append(CallRecord(item_id, rhash, 0, CallStatus.CACHE_HIT))
        summary.cache_hits += 1
        return ctx.body_for(request), None
    charged.add(rhash)
    outcome = ctx.outcomes[rhash]
    _ledger(ctx.teacher_for(rhash), item_id, request, outcome, batch, summary)
    return outcome.body, outcome.error


def _ledger(
    teacher: TeacherConfig,
    item_id: int,
    request: TeacherRequest,
    outcome: TeacherOutcome,
    batch: BatchResult,
    summary: BatchSummary,
) -> None:
    rhash = request.request_hash
    for number, attempt in enumerate(outcome.attempts, start=1):
        cost = teacher.cost_usd(attempt.prompt_tokens, attempt.completion_tokens)
        cost = round(cost * outcome.price_factor, 10)
        status = CallStatus.OK if attempt.ok else CallStatus.ERROR
        batch.calls.append(
            CallRecord(
                item_id,
                rhash,
                number,
                status,
                attempt.error_kind,
                attempt.http_status,
                attempt.prompt_tokens,
                attempt.completion_tokens,
                cost,
                attempt.latency_ms,
                attempt.request_id,
            )
        )
        summary.spent_usd += cost
    summary.teacher_calls += len(outcome.attempts)
    if outcome.body is not None and outcome.answer is not None:
        batch.responses.append(
            NewResponse(
                rhash,
                request.provider,
                request.model,
                request.body,
                outcome.body,
                outcome.answer.prompt_tokens,
                outcome.answer.completion_tokens,
                _worth_caching(outcome.answer),
            )
        )


def _worth_caching(answer: Answer) -> bool:
    """Whether an answer may be replayed from the cache: not a refusal, not cut short, and
    every sample JSON (the checks decide the rest, every time). A refused, truncated or
    unparseable answer is kept on its label, with its reasons, but asked again next time."""
    if answer.refusal or answer.finish_reason in ("length", "refusal", "content_filter"):
        return False
    for content in answer.samples or [answer.content]:
        if content is None:
            return False
        try:
            parse_json_answer(content)
        except (ValueError, RecursionError):
            return False
    return True


def _release(
    ctx: BatchContext,
    item: ClaimedItem,
    error: StillhouseError,
    batch: BatchResult,
    summary: BatchSummary,
) -> ConfigError | None:
    summary.released += 1
    if isinstance(error, ConfigError):
        # Not the item's fault: it keeps its attempt and waits (workers) until the key,
        # the budget or the setting is fixed; the run stops with the message.
        wait = ctx.config_pause_s or None
        batch.releases.append(
            Release(item.id, f"{error.kind}: {error}", wait, False, True, error.kind)
        )
        return error
    wait = getattr(error, "retry_after_s", None)
    if isinstance(error, RateLimited) or not _sent_anything(ctx, item.id):
        # A wait (a 429, an open breaker, a spent rate) or a claim that sent nothing is not
        # the item's fault: it goes back with its attempt, so waits never fail an item.
        batch.releases.append(
            Release(item.id, f"{error.kind}: {error}", wait, False, True, error.kind)
        )
        return None
    failed = isinstance(error, PermanentError) or (
        item.attempts >= ctx.spec.labeling["max_attempts"]
    )
    batch.releases.append(Release(item.id, f"{error.kind}: {error}", wait, failed, kind=error.kind))
    summary.failed += int(failed)
    summary.released -= int(failed)
    return None


def _sent_anything(ctx: BatchContext, item_id: int) -> bool:
    """Whether any HTTP attempt went out for this item in this claim."""
    asked = [ctx.requests[item_id], *ctx.jury.get(item_id, [])]
    asked += [r[item_id] for r in ctx.repairs if item_id in r]
    return any(
        ctx.outcomes[r.request_hash].attempts for r in asked if r.request_hash in ctx.outcomes
    )


def _label(
    ctx: BatchContext,
    item_id: int,
    rhash: str,
    body: dict[str, Any],
    batch: BatchResult,
    summary: BatchSummary,
    repair_failed: bool = False,
    jury: list[JuryAnswer] | None = None,
) -> None:
    document = ctx.texts.get(item_id) if ctx.checker.grounded else None
    result = ctx.checker.check_body(
        body, ctx.known.get(item_id), ctx.spec.teacher.provider, document
    )
    if repair_failed and result.reasons:
        # The re-ask itself got no answer.
        result.reject("repair_failed", "the repair re-ask got no usable answer from the teacher")
    if jury:
        rhash, result = _jury_vote(ctx, item_id, (rhash, result), jury, document)
    threshold: float | None = None
    calibration_id: int | None = None
    if (
        ctx.spec.target_accuracy is not None
        and item_id not in ctx.known
        and result.verdict == Verdict.ACCEPTED
    ):
        held = _calibrated(ctx, result)
        if held is None:
            _await_calibration(ctx, item_id, batch, summary)
            return
        threshold, calibration_id = held
    batch.labels.append(
        LabelRecord(
            item_id,
            result.output,
            result.verdict,
            result.reasons,
            result.confidence,
            result.known_good_match,
            rhash,
            result.agreement,
            result.problems or None,
            threshold,
            calibration_id,
        )
    )
    summary.labeled += 1
    summary.accepted += int(result.verdict == Verdict.ACCEPTED)


def _calibrated(ctx: BatchContext, result: CheckResult) -> tuple[float | None, int | None] | None:
    """Hold an accepted label without a record to the calibrated threshold of its class;
    returns the threshold and the calibration's id, or None when the calibration is not
    ready (too few labels with a record yet, or none reaching the target while more come)."""
    calibration = ctx.calibration
    field_name = ctx.spec.class_field
    cls = (result.output or {}).get(field_name) if field_name else None
    cls = cls if isinstance(cls, str) else None
    if calibration is None:
        return None
    threshold = calibration.threshold_of(cls)
    if threshold is None and not calibration.final:
        return None
    message = below_threshold(calibration, cls, result.confidence)
    if message is not None:
        result.reject(BELOW_CALIBRATED_THRESHOLD, message)
    if result.reasons:
        result.verdict = Verdict.REJECTED
    return threshold, calibration.id


BELOW_CALIBRATED_THRESHOLD = "below_calibrated_threshold"


def below_threshold(
    calibration: Calibration, cls: str | None, confidence: float | None
) -> str | None:
    """Why a label without a record fails ``calibration`` (None: it passes)."""
    threshold = calibration.threshold_of(cls)
    target = f"checks.target_accuracy {calibration.target:g}"
    if threshold is None:
        return (
            f"no confidence threshold reaches {target} at the 95 % lower bound on the "
            f"{calibration.describe(cls)}; lower the target or add known-good records"
        )
    if confidence is None:
        return (
            f"the answer has no confidence to hold to the threshold {threshold:.3f} that "
            f"reaches {target}"
        )
    if confidence < threshold:
        return (
            f"confidence {confidence:.3f} is below {threshold:.3f}, the threshold that "
            f"reaches {target} at the 95 % lower bound on the {calibration.describe(cls)} "
            f"(calibration {calibration.id})"
        )
    return None


def _await_calibration(
    ctx: BatchContext, item_id: int, batch: BatchResult, summary: BatchSummary
) -> None:
    """No label yet: the item goes back, its attempt refunded, and is looked at again once
    the calibration may be ready (its answer is cached: no second call)."""
    min_items = int(ctx.spec.checks["calibration_min_items"])
    message = (
        f"{AWAITING_CALIBRATION}: checks.target_accuracy needs a calibration on at least "
        f"{min_items} labels with a known-good record (or every such item labeled) before "
        f"labels without one can be held to it"
    )
    wait = float(ctx.spec.checks["calibration_wait_s"])
    batch.releases.append(Release(item_id, message, wait, False, True, AWAITING_CALIBRATION))
    summary.released += 1


def _jury_vote(
    ctx: BatchContext,
    item_id: int,
    primary: tuple[str, CheckResult],
    jury: list[JuryAnswer],
    document: str | None,
) -> tuple[str, CheckResult]:
    """Check every jury answer as the primary's was, vote, and keep the majority's answer
    with the request hash of the response it came from."""
    names, hashes, results = [ctx.spec.teacher.model], [primary[0]], [primary[1]]
    for request, body, error in jury:
        teacher = ctx.teacher_for(request.request_hash)
        if body is None:
            # No answer (an error after the retries) is a vote that agrees with nothing.
            result = CheckResult(Verdict.REJECTED)
            failure = error or PermanentError("no answer")
            result.reject(failure.kind, str(failure))
        else:
            result = ctx.checker.check_body(
                body, ctx.known.get(item_id), teacher.provider, document
            )
        names.append(teacher.model)
        hashes.append(request.request_hash)
        results.append(result)
    winner = ctx.checker.vote(list(zip(names, results, strict=True)))
    return hashes[winner], results[winner]
