"""The labeling pipeline core: lease a batch, reserve budget, ask the teacher (or the cache),
check, and record everything in one transaction.

Used as is by the embedded mode and by the Celery task adapter. Per-process resources (the
event loop, one HTTP client and governor per teacher, compiled validators) live in
:class:`LabelRuntime`, built after the fork.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import BudgetExhausted, ConfigError
from storage.budget import budget_state, current_budget, reserve, settle
from storage.items import ClaimedItem, claim_items, known_good_for
from storage.models import SpecRow
from storage.results import cached_responses, record_batch
from workers.checks import Checker
from workers.governor import Governor, GovernorLimits, LocalGovernor, RedisGovernor, governor_key
from workers.outcomes import BatchContext, BatchSummary, assemble
from workers.prompt import render_messages
from workers.providers import Answer, provider_for
from workers.spec import Spec, TeacherConfig, is_withheld, parse_spec
from workers.teacher import (
    TeacherClient,
    TeacherOutcome,
    TeacherRequest,
    build_request,
    make_http_client,
)

__all__ = [
    "BatchSummary",
    "LabelRuntime",
    "event_loop_factory",
    "label_until_done",
    "worker_id",
]


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (about half the per-call CPU), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def worker_id() -> str:
    """A lease owner name that is unique per process and readable in the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Loaded:
    spec: Spec
    checker: Checker
    client: TeacherClient


class LabelRuntime:
    """Everything one process needs to label: sessions, one event loop, a client per teacher.

    With ``redis_url`` the teacher limits are shared with every other worker through Redis;
    without it (embedded mode) they hold for this process.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        teacher_base_url: str | None = None,
        http_transport: str = "aiohttp",
        owner: str | None = None,
        config_pause_s: float = 0.0,
        redis_url: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.teacher_base_url = teacher_base_url
        self.http_transport = http_transport
        self.owner = owner or worker_id()
        # After a configuration error (bad key, spent budget) items wait this long: workers
        # use a pause so a fleet does not hammer the teacher; embedded uses none.
        self.config_pause_s = config_pause_s
        self.redis_url = redis_url
        self._runner = asyncio.Runner(loop_factory=event_loop_factory())
        # Start-up objects (modules, ORM metadata) never need collecting again: freezing them
        # keeps the collector's passes short while calls allocate (measured in bench/).
        gc.freeze()
        self._loaded: dict[int, _Loaded] = {}
        self._governors: dict[str, Governor] = {}
        self._redis: Any = None

    def close(self) -> None:
        for loaded in self._loaded.values():
            self._runner.run(loaded.client.http.aclose())
        if self._redis is not None:
            self._runner.run(self._redis.aclose())
        self._loaded.clear()
        self._runner.close()

    def __enter__(self) -> LabelRuntime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def spec(self, spec_id: int) -> Spec:
        return self._load(spec_id).spec

    def _load(self, spec_id: int) -> _Loaded:
        if spec_id not in self._loaded:
            with self.sessions() as session:
                row = session.get(SpecRow, spec_id)
                if row is None:
                    raise ConfigError(f"spec id {spec_id} is not in the database")
                spec = parse_spec(row.body, source=f"spec {row.name} v{row.version}")
            config = spec.teacher
            if self.teacher_base_url:
                config = dataclasses.replace(config, base_url=self.teacher_base_url)
            http = self._runner.run(_make_client(config, self.http_transport))
            client = TeacherClient(config, http, governor=self._governor(config))
            self._loaded[spec_id] = _Loaded(spec, Checker(spec), client)
        return self._loaded[spec_id]

    def _governor(self, config: TeacherConfig) -> Governor:
        key = governor_key(config)
        if key not in self._governors:
            limits = GovernorLimits.from_config(config)
            if self.redis_url:
                if self._redis is None:
                    self._redis = self._runner.run(_make_redis(self.redis_url))
                self._governors[key] = RedisGovernor(self._redis, key, limits)
            else:
                self._governors[key] = LocalGovernor(limits)
        return self._governors[key]

    def label_batch(
        self, spec_id: int, *, item_ids: Sequence[int] | None = None, limit: int | None = None
    ) -> BatchSummary:
        """Lease up to ``limit`` items (or exactly ``item_ids``), label them, commit once."""
        loaded = self._load(spec_id)
        labeling = loaded.spec.labeling
        size = limit or (len(item_ids) if item_ids is not None else labeling["batch_size"])
        with self.sessions.begin() as session:
            claimed = claim_items(
                session, spec_id, self.owner, labeling["lease_s"], item_ids=item_ids, limit=size
            )
        if not claimed:
            return BatchSummary()
        ctx = self._context(loaded, claimed)
        misses = {
            r.request_hash: r for r in ctx.requests.values() if r.request_hash not in ctx.cached
        }
        reservations = [self._reserve(spec_id, loaded.spec, misses, ctx)]
        ctx.outcomes = self._runner.run(_call_all(loaded.client, list(misses.values())))
        for _ in range(int(loaded.spec.checks["repair_attempts"])):
            if not self._repair_round(spec_id, loaded, ctx, reservations):
                break
        batch, summary, stop = assemble(ctx)
        with self.sessions.begin() as session:
            record_batch(session, spec_id, batch)
            spent = summary.spent_usd
            for reservation in reservations:
                if reservation is not None:
                    settle(session, loaded.spec.name, reservation, spent)
                    spent = 0.0
        if stop is not None:
            raise stop
        return summary

    def _repair_round(
        self, spec_id: int, loaded: _Loaded, ctx: BatchContext, reservations: list[int | None]
    ) -> bool:
        """Re-ask, once, every item whose latest answer does not parse or fit the schema,
        quoting the problem back; returns whether anything was re-asked."""
        spec, provider = loaded.spec, provider_for(loaded.spec.teacher.provider)
        round_: dict[int, TeacherRequest] = {}
        for item in ctx.claimed:
            previous = ctx.latest_request(item.id)
            body = ctx.body_for(previous)
            problems = loaded.checker.repairable_problems(body, provider.name) if body else []
            if problems and previous.request_hash not in ctx.unsent:
                messages = [
                    *ctx.messages[item.id],
                    *_repair_turn(provider.parse(body or {}), problems),
                ]
                ctx.messages[item.id] = messages
                round_[item.id] = build_request(
                    spec.teacher, messages, spec.output_schema, f"{spec.name}_v{spec.version}"
                )
        if not round_:
            return False
        ctx.repairs.append(round_)
        with self.sessions() as session:
            ctx.cached.update(cached_responses(session, [r.request_hash for r in round_.values()]))
        misses = {
            r.request_hash: r
            for r in round_.values()
            if r.request_hash not in ctx.cached and r.request_hash not in ctx.outcomes
        }
        reservations.append(self._reserve(spec_id, spec, misses, ctx))
        ctx.outcomes.update(self._runner.run(_call_all(loaded.client, list(misses.values()))))
        return True

    def _context(self, loaded: _Loaded, claimed: list[ClaimedItem]) -> BatchContext:
        spec = loaded.spec
        messages = {c.id: render_messages(spec, c.text) for c in claimed}
        ctx_ids = {c.id: c.external_id for c in claimed}
        requests = {
            item_id: build_request(
                spec.teacher, conversation, spec.output_schema, f"{spec.name}_v{spec.version}"
            )
            for item_id, conversation in messages.items()
        }
        with self.sessions() as session:
            share = float(spec.checks["withhold_share"])
            # Withheld records stay in the store for the report, but the checks never see them.
            known = {
                item_id: fields
                for item_id, fields in known_good_for(session, [c.id for c in claimed]).items()
                if not is_withheld(ctx_ids[item_id], share)
            }
            cached = cached_responses(session, [r.request_hash for r in requests.values()])
        return BatchContext(
            spec,
            loaded.checker,
            claimed,
            requests,
            known,
            cached,
            {},
            self.config_pause_s,
            messages=messages,
        )

    def _reserve(
        self, spec_id: int, spec: Spec, misses: dict[str, TeacherRequest], ctx: BatchContext
    ) -> int | None:
        """Reserve budget for the calls about to be made; drop the ones it cannot cover."""
        if not misses:
            return None
        per_call = max(
            spec.teacher.cost_usd(r.prompt_tokens_estimate, r.max_output_tokens)
            for r in misses.values()
        )
        with self.sessions.begin() as session:
            # The limit is read fresh: raising budget_usd takes effect without a restart.
            limit = current_budget(session, spec_id)
            if limit is None:
                return None
            allowed, reservation = reserve(
                session, spec.name, limit, per_call, len(misses), spec.labeling["lease_s"]
            )
            state = budget_state(session, spec.name)
        if allowed < len(misses):
            error = BudgetExhausted(
                f"spec {spec.name!r} has spent ${state.spent_usd:.4f} of its budget_usd "
                f"${limit:g} (${state.reserved_usd:.4f} reserved by calls in "
                f"flight); the remaining items stay pending. Raise budget_usd in the spec "
                f"file to go on"
            )
            for rhash in list(misses)[allowed:]:
                ctx.unsent[rhash] = error
                del misses[rhash]
        return reservation


def _repair_turn(answer: Answer, problems: list[str]) -> list[dict[str, str]]:
    """The assistant's unusable answer and the user's re-ask that says what to fix."""
    listed = "\n".join(f"- {p}" for p in problems)
    return [
        {"role": "assistant", "content": answer.content or ""},
        {
            "role": "user",
            "content": "Your answer could not be used:\n"
            + listed
            + "\nReply again with only one JSON object that fits the required schema.",
        },
    ]


async def _make_client(config: TeacherConfig, transport: str) -> Any:
    # Built inside the runner's loop: aiohttp sessions bind to the loop that creates them.
    return make_http_client(config, transport=transport)


async def _make_redis(url: str) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url)


async def _call_all(
    client: TeacherClient, requests: list[TeacherRequest]
) -> dict[str, TeacherOutcome]:
    results = await asyncio.gather(*(client.complete(r) for r in requests))
    return {r.request_hash: outcome for r, outcome in zip(requests, results, strict=True)}


def label_until_done(
    runtime: LabelRuntime, spec_id: int, *, on_batch: Callable[[BatchSummary], None] | None = None
) -> BatchSummary:
    """Embedded mode: label claimable items batch after batch until none is left."""
    total = BatchSummary()
    while True:
        summary = runtime.label_batch(spec_id)
        if summary.claimed == 0:
            return total
        total.add(summary)
        if on_batch is not None:
            on_batch(summary)
