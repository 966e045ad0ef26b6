"""The router: a trained classification student that answers when its calibrated confidence
clears the run's thresholds, and the teacher that answers otherwise.

``Router.open(settings, RUN)`` loads the run's student and ``router.json`` policy
(``student_train.routing``), and a labeling runtime (the same teacher client, governor,
budget, cache, checks and ledger as labeling). ``predict(inputs)`` answers each input:

- the student's answer when the policy lets it answer;
- otherwise the teacher's: the input is stored as an item of the run's spec
  (``workers.fallback``) and labeled by the pipeline, and its label's output is the answer;
  an input asked before is answered from its stored label, at no cost;
- when the teacher cannot answer (budget spent, teacher down, an answer the checks could not
  read), the student's answer, saying why (``fallback_error``): an application always gets
  an answer.

Every answer says who answered, with what confidence, and why the teacher was asked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError, PermanentError, StillhouseError
from stillhouse.context import open_runtime
from stillhouse.settings import Settings
from storage.items import ItemIn
from storage.runs import run_by_name
from workers.fallback import Fallback, Stored, fallbacks_of, store_fallbacks
from workers.fallback import routed_item as _routed_item
from workers.pipeline import LabelRuntime
from workers.sampling import SamplingRules
from workers.spec import Spec

__all__ = ["RoutedAnswer", "Router", "RouterStats"]

log = logging.getLogger(__name__)

STUDENT, TEACHER = "student", "teacher"
LABEL_WAIT_S = 0.05  # between looks for a label another worker is writing


@dataclass(frozen=True, slots=True)
class RoutedAnswer:
    """One input's answer: the spec's output (``label``, ``confidence``), who gave it, and
    the student's own call beside it."""

    output: dict[str, Any] | None
    answered_by: str  # "student", "teacher", or "none" (the input was invalid)
    confidence: float | None
    student_label: str | None = None
    student_confidence: float | None = None
    reason: str | None = None  # why the teacher was asked (low_confidence, always_teacher:X, ...)
    item: str | None = None  # the stored fallback's external id
    stored_for_training: bool | None = None
    teacher_verdict: str | None = None
    fallback_error: str | None = None  # the teacher was asked and could not answer
    error: str | None = None  # the input itself was invalid

    @property
    def label(self) -> str | None:
        return None if self.output is None else self.output.get("label")

    def as_json(self) -> dict[str, Any]:
        """The fields that are set, and ``label`` (``dataclasses.asdict`` deep-copies: a
        tenth of a served answer's time)."""
        values = {name: getattr(self, name) for name in _ANSWER_FIELDS}
        values = {k: v for k, v in values.items() if v is not None}
        if self.output is not None:
            values["output"] = dict(self.output)
        values["label"] = self.label
        return values


_ANSWER_FIELDS = tuple(f.name for f in fields(RoutedAnswer))


class RouterStats:
    """Answers by class and by who gave them, since the router started (for ``/metrics``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers: Counter[tuple[str, str]] = Counter()  # (label, answered_by)
        self.fallback_errors = 0
        self.invalid = 0

    def count(self, answers: Sequence[RoutedAnswer]) -> None:
        with self._lock:
            for answer in answers:
                if answer.answered_by == "none":
                    self.invalid += 1
                    continue
                self.answers[(answer.label or "", answer.answered_by)] += 1
                if answer.fallback_error:
                    self.fallback_errors += 1

    def teacher_share(self) -> dict[str, float]:
        """Per class (the answer's), the share of answers the teacher gave."""
        with self._lock:
            labels = sorted({label for label, _ in self.answers})
            out = {}
            for label in labels:
                teacher = self.answers[(label, TEACHER)]
                total = teacher + self.answers[(label, STUDENT)]
                out[label] = teacher / total if total else 0.0
            return out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            by_class: dict[str, dict[str, int]] = {}
            for (label, who), n in sorted(self.answers.items()):
                by_class.setdefault(label, {STUDENT: 0, TEACHER: 0})[who] = n
            total = sum(self.answers.values())
            teacher = sum(n for (_, who), n in self.answers.items() if who == TEACHER)
            return {
                "answers": total,
                "teacher_share": teacher / total if total else 0.0,
                "by_class": by_class,
                "fallback_errors": self.fallback_errors,
                "invalid_inputs": self.invalid,
            }


def _utc_today() -> date:
    return datetime.now(UTC).date()


class Router:
    """A run's student with its teacher fallback (see the module's docstring)."""

    def __init__(
        self,
        *,
        run: str,
        spec: Spec,
        spec_id: int,
        student: Any,
        policy: Any,
        runtime: LabelRuntime | None,
        store: bool,
        kind: str = "bag_of_ngrams",
        wait_s: float = 30.0,
        today: Callable[[], date] = _utc_today,
    ) -> None:
        if spec.kind != "classification":
            raise ConfigError(
                f"the router serves classification students; run {run!r} is of a {spec.kind} spec"
            )
        self.run, self.spec, self.spec_id = run, spec, spec_id
        self.student, self.policy, self.runtime = student, policy, runtime
        self.store, self.kind, self.wait_s, self.today = store, kind, wait_s, today
        self.rules = SamplingRules.from_spec(spec)
        self.stats = RouterStats()

    @classmethod
    @contextmanager
    def open(
        cls, settings: Settings, run: str, *, store: bool | None = None, wait_s: float = 30.0
    ) -> Iterator[Router]:
        """The router of a finished run, with a labeling runtime for its fallbacks; ``store``
        overrides the spec's ``router.store_fallbacks`` (default true)."""
        from stillhouse.commands.train import load_classifier
        from student_train.routing import ROUTER_FILE, ROUTER_FORMAT, RoutingPolicy

        with open_runtime(settings) as runtime:
            with runtime.sessions() as session:
                row = run_by_name(session, run)
                if row is None:
                    raise ConfigError(f"no run {run!r}: `stillhouse runs list` shows them")
                state, kind, out_dir, spec_id = row.state, row.kind, row.out_dir, row.spec_id
            if str(state) != "finished":
                raise ConfigError(f"run {run!r} is {state}: only a finished run can serve")
            path = Path(out_dir) / ROUTER_FILE
            if not path.is_file():
                raise ConfigError(
                    f"run {run!r} has no {ROUTER_FILE} (only a classification run trained on "
                    f"a dataset with a val split has one): train again with a val share"
                )
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("format") != ROUTER_FORMAT:
                raise ConfigError(f"{path} is not a {ROUTER_FORMAT} file")
            spec = runtime.spec(spec_id)
            section = spec.body.get("router") or {}
            yield cls(
                run=run,
                spec=spec,
                spec_id=spec_id,
                student=load_classifier(kind, Path(out_dir)),
                policy=RoutingPolicy.from_dict(saved["policy"]),
                runtime=runtime,
                store=bool(section.get("store_fallbacks", True)) if store is None else store,
                kind=kind,
                wait_s=wait_s,
            )

    # -- the student's half ------------------------------------------------------------

    def items(self, inputs: Sequence[Any]) -> list[ItemIn | PermanentError]:
        """Each input as an item, or the reason it cannot be one."""
        out: list[ItemIn | PermanentError] = []
        for value in inputs:
            try:
                out.append(_routed_item(self.spec, value))
            except PermanentError as exc:
                out.append(exc)
        return out

    def decide(self, texts: Sequence[str]) -> list[Any]:
        """The policy's decision for each text (the student's calibrated answer, and why
        the teacher should answer instead, if it should)."""
        if not texts:
            return []
        decisions: list[Any] = self.policy.decide_many(self.student.predict_proba(list(texts)))
        return decisions

    # -- both halves -------------------------------------------------------------------

    def predict(self, inputs: Sequence[Any]) -> list[RoutedAnswer]:
        """Answer every input (blocking: the teacher's answers come from the pipeline)."""
        items = self.items(inputs)
        return self.answer(items, self.decisions(items))

    def decisions(self, items: Sequence[ItemIn | PermanentError]) -> dict[int, Any]:
        """The policy's decision for each valid item, by its index."""
        valid = [i for i, item in enumerate(items) if isinstance(item, ItemIn)]
        texts = [items[i].text for i in valid]  # type: ignore[union-attr]
        return dict(zip(valid, self.decide(texts), strict=True))

    @staticmethod
    def needs_teacher(decisions: dict[int, Any]) -> bool:
        return any(d.to_teacher is not None for d in decisions.values())

    @staticmethod
    def asked(items: Sequence[ItemIn | PermanentError], decisions: dict[int, Any]) -> list[ItemIn]:
        """The items the decisions send to the teacher."""
        return [
            item
            for i, item in enumerate(items)
            if isinstance(item, ItemIn) and decisions[i].to_teacher is not None
        ]

    def answer(
        self,
        items: Sequence[ItemIn | PermanentError],
        decisions: dict[int, Any],
        fallbacks: dict[str, Any] | None = None,
    ) -> list[RoutedAnswer]:
        """The answers, asking the teacher for the inputs the decisions send to it (blocking
        when there are any), unless ``fallbacks`` (what :meth:`fallbacks` returned for them)
        already holds its answers."""
        if fallbacks is None:
            asked = self.asked(items, decisions)
            fallbacks = self.fallbacks(asked) if asked else {}
        answers = []
        for i, item in enumerate(items):
            if not isinstance(item, ItemIn):
                answers.append(RoutedAnswer(None, "none", None, error=str(item)))
                continue
            decision = decisions[i]
            mine = {"label": decision.label, "confidence": round(decision.confidence, 6)}
            student = RoutedAnswer(
                mine, STUDENT, mine["confidence"], decision.label, mine["confidence"]
            )
            if decision.to_teacher is None:
                answers.append(student)
            else:
                answers.append(self._teacher_answer(student, decision.to_teacher, item, fallbacks))
        self.stats.count(answers)
        return answers

    def _teacher_answer(
        self,
        student: RoutedAnswer,
        reason: str,
        item: ItemIn,
        fallbacks: dict[str, Any],
    ) -> RoutedAnswer:
        got = fallbacks.get(item.external_id)
        # The student's answer, saying the teacher was asked and why.
        asked = replace(student, reason=reason, item=item.external_id)
        if not isinstance(got, Fallback):
            return replace(asked, fallback_error=got or "the teacher's answer did not arrive")
        asked = replace(asked, stored_for_training=got.trainable, teacher_verdict=got.verdict)
        output = got.output
        if not isinstance(output, dict) or output.get("label") not in self.policy.labels:
            why = ", ".join(str(r) for r in got.reasons) or "no usable answer"
            return replace(asked, fallback_error=f"the teacher's answer was {got.verdict} ({why})")
        confidence = output.get("confidence", got.confidence)
        return replace(
            asked,
            output=output,
            answered_by=TEACHER,
            confidence=None if confidence is None else float(confidence),
        )

    def fallbacks(self, items: Sequence[ItemIn]) -> dict[str, Any]:
        """Store the fallbacks, have the pipeline label the new ones, and read the labels:
        ``{external id: its Fallback, or why there is no answer}`` (blocking). An input given
        twice is stored and asked once."""
        items = list({item.external_id: item for item in items}.values())
        if self.runtime is None:
            return {item.external_id: "the router has no teacher" for item in items}
        sessions = self.runtime.sessions
        try:
            with sessions.begin() as session:
                stored = store_fallbacks(
                    session,
                    self.spec,
                    self.spec_id,
                    items,
                    keep=self.store,
                    rules=self.rules,
                    day=self.today(),
                )
        except Exception as exc:  # the database is away: the student still answers
            log.warning("router: cannot store fallbacks: %s", exc, exc_info=True)
            return {item.external_id: f"the store is unavailable: {exc}" for item in items}
        return self._labels(stored)

    def _labels(self, stored: Stored) -> dict[str, Any]:
        ids = stored.item_ids
        runtime = self.runtime
        assert runtime is not None
        with runtime.sessions() as session:
            found = fallbacks_of(session, self.spec_id, list(ids.values()))
        error: str | None = None
        unlabeled = [i for i, f in found.items() if not f.labeled and not f.in_progress]
        if unlabeled:
            try:
                runtime.label_batch(self.spec_id, item_ids=unlabeled)
            except StillhouseError as exc:
                error = f"{exc.kind}: {exc}"
                log.warning(
                    "router: the teacher could not answer %d inputs: %s", len(unlabeled), exc
                )
        deadline = time.monotonic() + self.wait_s
        while True:
            with runtime.sessions() as session:
                found = fallbacks_of(session, self.spec_id, list(ids.values()))
            # Another worker may hold an item's lease (a dispatcher queued it): its label
            # arrives when that worker writes it.
            waiting = any(f.in_progress for f in found.values())
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(LABEL_WAIT_S)
        out: dict[str, Any] = {}
        for ext, item_id in ids.items():
            fallback = found.get(item_id)
            if fallback is not None and fallback.labeled:
                out[ext] = fallback
            elif fallback is not None and fallback.last_error:
                out[ext] = fallback.last_error
            else:
                out[ext] = error or "the teacher's answer did not arrive in time"
        return out
