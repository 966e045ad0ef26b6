"""The labeling pipeline core: lease a batch, reserve budget, ask the teacher (or the cache),
check, and record the results.

A batch's transactions, and why each is its own:

1. **the claim** (``claim_items``), committed before any call: the lease must be visible to
   the sweeper and the other workers while the calls are out;
2. **each budget reservation** (one per round: the first calls, each repair round),
   committed before its calls: other workers must see the money as taken;
3. **the write-ahead ledger rows** (``workers.writeahead``), one autocommitted group per
   burst of attempts, right before they are sent: a worker killed mid-call leaves a row for
   every request the teacher may have received;
4. **the heartbeats** (``extend_leases``), every third of ``lease_s`` while calls are out;
5. **the results** (``record_batch`` and ``settle``): cached answers, ledger rows (replacing
   the written-ahead ones), labels, item states and the settled budget, in one transaction
   fenced by the claim (``storage.results``): all of a batch's outcome or none of it.

Used as is by the embedded mode and by the Celery task adapter. Per-process resources (the
event loop, one HTTP client and governor per teacher, compiled validators) live in
:class:`LabelRuntime`, built after the fork.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from schemas.errors import BudgetExhausted, ConfigError, LeaseExpired
from storage.batches import batch_answers
from storage.budget import budget_state, current_budget, reserve, settle
from storage.calibrations import awaiting
from storage.items import ClaimedItem, claim_items, known_good_for
from storage.leases import extend_leases, next_retry_in
from storage.models import SpecRow
from storage.results import Fence, InFlight, cached_responses, record_batch
from workers.calibrator import Calibrator
from workers.checks import Checker
from workers.concurrency import SlotPool
from workers.governor import (
    Governor,
    LocalGovernor,
    RedisGovernor,
    governor_key,
    limits_of,
    shared_redis,
)
from workers.loop import LoopThread, event_loop_factory
from workers.outcomes import BatchContext, BatchSummary, assemble
from workers.prompt import render_messages
from workers.providers import Answer, provider_for
from workers.spec import Spec, TeacherConfig, is_withheld, parse_spec
from workers.teacher import (
    Attempt,
    BeforeSend,
    TeacherClient,
    TeacherOutcome,
    TeacherRequest,
    build_request,
    make_http_client,
    teacher_key,
)
from workers.writeahead import WriteAhead

log = logging.getLogger(__name__)

T = TypeVar("T")
LEASE_RENEWALS = 3  # heartbeats per lease_s while a batch's calls are out

__all__ = [
    "BatchSummary",
    "LabelRuntime",
    "label_until_done",
    "worker_id",
]


def worker_id() -> str:
    """A lease owner name that is unique per process and readable in the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Loaded:
    spec: Spec
    checker: Checker
    client: TeacherClient
    jurors: list[TeacherClient] = field(default_factory=list)  # spec.jury.teachers, in order

    @property
    def clients(self) -> list[TeacherClient]:
        return [self.client, *self.jurors]


@dataclass(frozen=True, slots=True)
class _Call:
    """One request about to be sent: for which item, to which teacher."""

    item_id: int
    request: TeacherRequest
    client: TeacherClient

    @property
    def reserve_usd(self) -> float:
        """What the call may cost at most (prompt estimate and the whole output allowance)."""
        request = self.request
        return self.client.config.cost_usd(
            request.prompt_tokens_estimate, request.max_output_tokens
        )


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self.clock = clock  # seconds, for leases: a stopped process sees it jump
        self.teacher_base_url = teacher_base_url
        self.http_transport = http_transport
        self.owner = owner or worker_id()
        # After a configuration error (bad key, spent budget) items wait this long: workers
        # use a pause so a fleet does not hammer the teacher; embedded uses none.
        self.config_pause_s = config_pause_s
        self.redis_url = redis_url
        self._runner = LoopThread(event_loop_factory())
        self._lock = threading.Lock()  # spec loading, from several task threads at once
        # Start-up objects (modules, ORM metadata) never need collecting again: freezing them
        # keeps the collector's passes short while calls allocate (measured in bench/).
        gc.freeze()
        self._loaded: dict[int, _Loaded] = {}
        self._call_cpu_reported = 0.0
        self._governors: dict[str, Governor] = {}
        self._pools: dict[str, SlotPool] = {}
        self._redis: Any = None
        self._ahead = WriteAhead(sessions.kw["bind"])
        self.calibrator = Calibrator(sessions)

    def close(self) -> None:
        for loaded in self._loaded.values():
            for client in loaded.clients:
                self._runner.run(client.aclose())
        for pool in self._pools.values():
            self._runner.run(pool.close())  # its slots go back to the fleet at once
        if self._redis is not None:
            self._runner.run(self._redis.aclose())
        self._loaded.clear()
        self._ahead.close()
        self._runner.close()

    def __enter__(self) -> LabelRuntime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def spec(self, spec_id: int) -> Spec:
        return self._load(spec_id).spec

    def _load(self, spec_id: int) -> _Loaded:
        with self._lock:
            return self._load_locked(spec_id)

    def _load_locked(self, spec_id: int) -> _Loaded:
        if spec_id not in self._loaded:
            with self.sessions() as session:
                row = session.get(SpecRow, spec_id)
                if row is None:
                    raise ConfigError(f"spec id {spec_id} is not in the database")
                spec = parse_spec(row.body, source=f"spec {row.name} v{row.version}")
            config = spec.teacher
            if self.teacher_base_url:
                # The override is for the primary teacher only: each jury teacher keeps its own.
                config = dataclasses.replace(config, base_url=self.teacher_base_url)
            client, *jurors = [self._client(c) for c in (config, *spec.jury.teachers)]
            self._loaded[spec_id] = _Loaded(spec, Checker(spec), client, jurors)
        return self._loaded[spec_id]

    def _client(self, config: TeacherConfig) -> TeacherClient:
        """A client of its own per teacher, behind the governor and the slots of its endpoint
        and model (shared by every spec of this process that calls the same one)."""
        api_key = teacher_key(config)  # read once, here, and passed down as a SecretStr
        http = self._runner.run(_make_client(config, api_key, self.http_transport))
        key = governor_key(config)
        governor = self._governor(key, config)
        if key not in self._pools:
            self._pools[key] = self._runner.run(
                _make_pool(governor, f"{self.owner}:{key[-16:]}", config.latency_tolerance)
            )
        return TeacherClient(
            config, http, api_key=api_key, governor=governor, slots=self._pools[key]
        )

    def _governor(self, key: str, config: TeacherConfig) -> Governor:
        if key not in self._governors:
            limits = limits_of(config)
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
        """Lease up to ``limit`` items (or exactly ``item_ids``), label them and record the
        outcome (the transactions are listed in the module's docstring).

        Safe to call from several threads at once (Celery's threads pool): their teacher calls
        share the one event loop and connection pool, so one batch's calls keep the teacher
        busy while another batch is claimed, checked or written.
        """
        started = time.thread_time()
        loaded = self._load(spec_id)
        labeling = loaded.spec.labeling
        size = limit or (len(item_ids) if item_ids is not None else labeling["batch_size"])
        lease_ends = self.clock() + labeling["lease_s"]  # no later than the database's
        with self.sessions.begin() as session:
            claimed = claim_items(
                session,
                spec_id,
                self.owner,
                labeling["lease_s"],
                item_ids=item_ids,
                limit=size,
                max_attempts=labeling["max_attempts"],
            )
        if not claimed:
            return BatchSummary()
        ctx = self._context(spec_id, loaded, claimed)
        ctx.lease_ends = lease_ends
        misses = {
            call.request.request_hash: call
            for call in _first_calls(loaded, ctx)
            if call.request.request_hash not in ctx.cached
            and call.request.request_hash not in ctx.outcomes  # a provider batch's answer
        }
        reservations = [self._reserve(spec_id, loaded.spec, misses, ctx)]
        ctx.outcomes.update(self._send(spec_id, misses, ctx))
        for _ in range(int(loaded.spec.checks["repair_attempts"])):
            if not self._repair_round(spec_id, loaded, ctx, reservations):
                break
        batch, summary, stop = assemble(ctx)
        batch.replaces_in_flight = self._ahead.replaces_rows
        batch.fence = Fence(self.owner, {item.id: item.attempts for item in claimed})
        with self.sessions.begin() as session:
            summary.lost_leases = record_batch(session, spec_id, batch)
            spent = summary.spent_usd
            for reservation in reservations:
                if reservation is not None:
                    settle(session, loaded.spec.name, reservation, spent)
                    spent = 0.0
        self._ahead.settle([c.client_request_id for c in batch.calls if c.client_request_id])
        summary.call_cpu_ms = self._call_cpu_since_last() * 1000
        summary.cpu_ms = (time.thread_time() - started) * 1000 + summary.call_cpu_ms
        if summary.lost_leases:
            log.warning(
                "spec %s: %d of %d items had been taken over after this worker's lease ran "
                "out (lease_s %s): their results are dropped, the answers kept in the cache",
                spec_id,
                summary.lost_leases,
                len(claimed),
                labeling["lease_s"],
            )
        if stop is not None:
            raise stop
        return summary

    def _send(
        self, spec_id: int, misses: dict[str, _Call], ctx: BatchContext
    ) -> dict[str, TeacherOutcome]:
        """Send the requests concurrently, each to its own teacher; every HTTP attempt is on
        the ledger (committed) right before it goes out."""
        if not misses:
            return {}
        lease_s = float(ctx.spec.labeling["lease_s"])
        calls = [(call, self._before_send(spec_id, call, ctx, lease_s)) for call in misses.values()]
        return self._runner.run(
            _renewing(_call_all(calls), lease_s / LEASE_RENEWALS, lambda: self._renew(ctx))
        )

    def _renew(self, ctx: BatchContext) -> None:
        """The batch's heartbeat: its leases run ``lease_s`` from now again (a stopped
        process sends none, so its leases run out, as they should)."""
        lease_s = float(ctx.spec.labeling["lease_s"])
        now = self.clock()
        try:
            with self.sessions.begin() as session:
                extend_leases(session, self.owner, [c.id for c in ctx.claimed], lease_s)
        except Exception as exc:  # the database is away: the lease runs out, the fence holds
            log.warning("cannot renew the leases of a batch: %s", exc)
            return
        ctx.lease_ends = now + lease_s

    def _before_send(
        self, spec_id: int, call: _Call, ctx: BatchContext, lease_s: float
    ) -> BeforeSend:
        """What runs right before each HTTP attempt: the lease check, then the ledger row.

        An attempt starts only while the claim's lease has time left for it to finish
        (the teacher's ``timeout_s``, at most half the lease; the batch's heartbeat extends
        it): a worker that was stopped or waited past that would pay for a call another
        worker may be making already."""
        cost = round(call.reserve_usd, 10)
        margin = min(call.client.config.timeout_s, lease_s / 2)

        async def write_ahead(attempt: int, request_id: str) -> None:
            if self.clock() > ctx.lease_ends - margin:
                raise LeaseExpired(
                    f"this worker's lease on the item ran out before the call was sent "
                    f"(labeling.lease_s {lease_s:g}): nothing was sent; the item goes back"
                )
            rhash = call.request.request_hash
            await self._ahead.record(
                InFlight(call.item_id, spec_id, rhash, attempt, request_id, cost)
            )

        return write_ahead

    def _call_cpu_since_last(self) -> float:
        """CPU the event loop thread (teacher calls only) used since the last batch asked."""
        total = self._runner.cpu_s()
        with self._lock:
            delta, self._call_cpu_reported = total - self._call_cpu_reported, total
        return delta

    def _repair_round(
        self,
        spec_id: int,
        loaded: _Loaded,
        ctx: BatchContext,
        reservations: list[int | None],
    ) -> bool:
        """Re-ask, once, every item whose latest answer does not parse or fit the schema,
        quoting the problem back; returns whether anything was re-asked.

        Only the primary teacher is re-asked: a jury teacher's unusable answer is a vote
        that agrees with nothing.
        """
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
                    spec.teacher, messages, spec.output_schema, spec.schema_name
                )
        if not round_:
            return False
        ctx.repairs.append(round_)
        with self.sessions() as session:
            ctx.cached.update(cached_responses(session, [r.request_hash for r in round_.values()]))
        misses = {
            r.request_hash: _Call(item_id, r, loaded.client)
            for item_id, r in round_.items()
            if r.request_hash not in ctx.cached and r.request_hash not in ctx.outcomes
        }
        reservations.append(self._reserve(spec_id, spec, misses, ctx))
        ctx.outcomes.update(self._send(spec_id, misses, ctx))
        return True

    def _context(self, spec_id: int, loaded: _Loaded, claimed: list[ClaimedItem]) -> BatchContext:
        spec = loaded.spec
        messages = {c.id: render_messages(spec, c.text) for c in claimed}
        ctx_ids = {c.id: c.external_id for c in claimed}
        schema_name = spec.schema_name
        requests = {
            item_id: build_request(spec.teacher, conversation, spec.output_schema, schema_name)
            for item_id, conversation in messages.items()
        }
        # Every jury teacher gets the very same messages; each request has its own hash, so
        # the cache answers per teacher.
        jury = {
            item_id: [
                build_request(juror.config, conversation, spec.output_schema, schema_name)
                for juror in loaded.jurors
            ]
            for item_id, conversation in messages.items()
        }
        jury_teachers = {
            request.request_hash: juror.config
            for asked in jury.values()
            for juror, request in zip(loaded.jurors, asked, strict=True)
        }
        hashes = [r.request_hash for r in requests.values()]
        hashes += list(jury_teachers)
        with self.sessions() as session:
            share = float(spec.checks["withhold_share"])
            # Withheld records stay in the store for the report, but the checks never see them.
            known = {
                item_id: fields
                for item_id, fields in known_good_for(session, [c.id for c in claimed]).items()
                if not is_withheld(ctx_ids[item_id], share)
            }
            cached = cached_responses(session, hashes)
            # Answers a provider batch paid for (labeling.mode: batch), at the batch price.
            batched = batch_answers(session, [h for h in hashes if h not in cached])
        provider = provider_for(spec.teacher.provider)
        outcomes = {
            rhash: TeacherOutcome(
                [
                    Attempt(
                        True,
                        0.0,
                        200,
                        None,
                        a.prompt_tokens,
                        a.completion_tokens,
                        a.client_request_id,
                    )
                ],
                a.body,
                provider.parse(a.body),
                price_factor=a.price_factor,
            )
            for rhash, a in batched.items()
        }
        calibration = None
        if spec.target_accuracy is not None and any(c.id not in known for c in claimed):
            calibration = self.calibrator.current(spec_id, spec)
        return BatchContext(
            spec,
            loaded.checker,
            claimed,
            requests,
            known,
            cached,
            outcomes,
            self.config_pause_s,
            messages=messages,
            jury=jury,
            jury_teachers=jury_teachers,
            calibration=calibration,
        )

    def _reserve(
        self, spec_id: int, spec: Spec, misses: dict[str, _Call], ctx: BatchContext
    ) -> int | None:
        """Reserve budget for the calls about to be made (the jury's too); drop the items
        whose calls it cannot all cover."""
        if not misses:
            return None
        per_call = max(call.reserve_usd for call in misses.values())
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
            # An item is asked of all its teachers or of none: a jury short of a vote for want
            # of budget would reject good labels.
            short = {call.item_id for call in list(misses.values())[allowed:]}
            for rhash, call in list(misses.items()):
                if call.item_id in short:
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


async def _make_client(config: TeacherConfig, api_key: SecretStr | None, transport: str) -> Any:
    # Built inside the runner's loop: aiohttp sessions bind to the loop that creates them.
    return make_http_client(config, api_key=api_key, transport=transport)


async def _make_pool(governor: Governor, token: str, tolerance: float | None) -> SlotPool:
    return SlotPool(governor, token, latency_tolerance=tolerance)


async def _make_redis(url: str) -> Any:
    return shared_redis(url)


def _first_calls(loaded: _Loaded, ctx: BatchContext) -> Iterator[_Call]:
    """Each item's first requests: the primary teacher's, then one per jury teacher."""
    for item in ctx.claimed:
        yield _Call(item.id, ctx.requests[item.id], loaded.client)
        for juror, request in zip(loaded.jurors, ctx.jury[item.id], strict=True):
            yield _Call(item.id, request, juror)


async def _renewing(work: Coroutine[Any, Any, T], every_s: float, renew: Callable[[], None]) -> T:
    """Run ``work``, calling ``renew`` (in a thread: it is a database write) every
    ``every_s`` seconds until it is done."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=every_s)
        if done:
            return task.result()
        await asyncio.to_thread(renew)


async def _call_all(calls: list[tuple[_Call, BeforeSend]]) -> dict[str, TeacherOutcome]:
    results = await asyncio.gather(*(c.client.complete(c.request, ahead) for c, ahead in calls))
    return {c.request.request_hash: outcome for (c, _), outcome in zip(calls, results, strict=True)}


def label_until_done(
    runtime: LabelRuntime,
    spec_id: int,
    *,
    on_batch: Callable[[BatchSummary], None] | None = None,
    lanes: int | None = None,
) -> BatchSummary:
    """Embedded mode: label claimable items until none is left, several batches at once.

    One batch at a time would leave the teacher idle while a batch is claimed, checked and
    written, and while its last calls finish: ``lanes`` threads (by default enough batches
    to hold four times the teacher's concurrency, 2 to 16) each label batch after batch, as
    the threads of a Celery worker do, over the runtime's one event loop and its slots. A
    configuration error (a bad key, a spent budget) stops every lane after its batch and is
    raised; the lanes' last empty claims are followed by one more pass, since a batch that
    finished meanwhile may have put items back (a short wait after a 429).
    """
    spec = runtime.spec(spec_id)
    lanes = lanes or _lanes_for(spec)
    total, lock, stop = BatchSummary(), threading.Lock(), threading.Event()
    errors: list[BaseException] = []

    def lane() -> None:
        try:
            while not stop.is_set():
                summary = runtime.label_batch(spec_id)
                if summary.claimed == 0:
                    return
                with lock:
                    total.add(summary)
                    if on_batch is not None:
                        on_batch(summary)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def all_lanes() -> None:
        threads = [
            threading.Thread(target=lane, name=f"stillhouse-lane-{n}", daemon=True)
            for n in range(lanes)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        lane()  # the straggler pass, in this thread
        if errors:
            raise errors[0]

    all_lanes()
    _wait_out_retries(runtime, spec_id, total, all_lanes)
    if spec.target_accuracy is not None:
        # Items without a record wait for the calibration that the labels with one build;
        # each round either applies it or, once no item with a record is left, decides.
        wait = float(spec.checks["calibration_wait_s"])
        while True:
            with runtime.sessions() as session:
                if not awaiting(session, spec_id):
                    break
            time.sleep(wait)
            all_lanes()
        # What was labeled under the first, partial calibrations is held to the final one.
        runtime.calibrator.settle(spec_id, spec)
    return total


RETRY_HORIZON_S = 10.0
RETRY_STALL_S = 120.0


def _wait_out_retries(
    runtime: LabelRuntime, spec_id: int, total: BatchSummary, all_lanes: Callable[[], None]
) -> None:
    """Items put back with a short wait (a backoff after a reset, a 429 with a Retry-After of
    a few seconds) are this run's: wait for the soonest and label them, as long as the run
    moves. A longer wait (a 30 s Retry-After, an open breaker's cooldown) is the item's: the
    run returns and they stay pending with their attempts, for the next run or a worker; so
    does everything after ``RETRY_STALL_S`` with nothing labeled or failed."""
    moved_at, done = time.monotonic(), total.labeled + total.failed
    while time.monotonic() - moved_at < RETRY_STALL_S:
        with runtime.sessions() as session:
            ahead = next_retry_in(session, spec_id)
        if ahead is None or ahead > RETRY_HORIZON_S:
            return
        time.sleep(min(max(ahead, 0.0) + 0.05, RETRY_HORIZON_S))
        all_lanes()
        if total.labeled + total.failed > done:
            moved_at, done = time.monotonic(), total.labeled + total.failed


def _lanes_for(spec: Spec) -> int:
    """Batches in work at once: four times the teacher's concurrency in items, so slots
    stay full while some batches wait on a straggler (a call waiting out its 429)."""
    batch = int(spec.labeling["batch_size"])
    widest = max(teacher.concurrency for teacher in spec.teachers)
    return max(2, min(16, -(-4 * widest // batch)))
