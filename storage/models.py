"""SQLAlchemy 2.0 models: specs, items (with their known-good records), teacher cache, call ledger,
labels.

Postgres is the source of truth. Every item carries its state; Redis only ever sees item ids.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "CONTENT_KEY",
    "CONTENT_KEY_CHARS",
    "Base",
    "Budget",
    "BudgetReservation",
    "Calibration",
    "CallStatus",
    "Dataset",
    "DatasetItem",
    "IngestCounter",
    "Item",
    "ItemAlias",
    "ItemState",
    "Label",
    "ReviewReason",
    "ReviewState",
    "ReviewTask",
    "RunState",
    "SpecRow",
    "StudentRun",
    "TeacherBatch",
    "TeacherBatchRequest",
    "TeacherCall",
    "TeacherResponse",
    "Verdict",
]

# Hex digits of an item's content hash that its dedupe index holds.
CONTENT_KEY_CHARS = 16

# JSONB on Postgres, JSON elsewhere, through one type.
JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; Postgres gets a real BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JsonType, list[Any]: JsonType}


class ItemState(StrEnum):
    """Where an item is in labeling for its current spec version."""

    PENDING = "pending"
    QUEUED = "queued"
    LEASED = "leased"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    REVIEW = "review"  # labeled, waiting for a person (`stillhouse review`)
    FAILED = "failed"
    # In a provider batch (labeling.mode: batch): the poller puts it back to pending with the
    # batch's answer, or for another try (workers.batches); no dispatcher or claim takes it.
    BATCHED = "batched"


FINAL_STATES = (ItemState.ACCEPTED, ItemState.REJECTED, ItemState.REVIEW, ItemState.FAILED)


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    NEEDS_REVIEW = "needs_review"


class CallStatus(StrEnum):
    """One ledger row per attempt: paid successes, cache hits and failures alike."""

    OK = "ok"
    CACHE_HIT = "cache_hit"
    ERROR = "error"
    # Written right before an HTTP attempt is sent and replaced by its outcome when the batch
    # commits: one left behind means the worker died with the call in flight (counted as sent
    # and paid: the ledger errs on the side of spend).
    IN_FLIGHT = "in_flight"


def _enum(cls: type[StrEnum], name: str) -> Enum:
    # Stored as plain strings with a CHECK: adding a state later is an easy migration.
    return Enum(
        cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
    )


def _now() -> Any:
    return func.now()


class SpecRow(Base):
    """One version of one spec, stored exactly as loaded so results can be traced to it."""

    __tablename__ = "specs"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_specs_name_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    body: Mapped[dict[str, Any]]
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    # The operational settings the store's queries need, written from the parsed spec (they
    # may change under a version, as the body does): storage never reads the spec's JSON.
    batch_size: Mapped[int] = mapped_column(Integer, server_default="50")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="5")
    lease_s: Mapped[int] = mapped_column(Integer, server_default="600")
    budget_usd: Mapped[float | None] = mapped_column(Float)
    # ``batch``: the dispatcher leaves its pending items to the batch submitter.
    labeling_mode: Mapped[str] = mapped_column(String(8), server_default="live")


class Item(Base):
    """A document to label for one spec; ``spec_id`` is the version it is being labeled for."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("spec_name", "external_id", name="uq_items_spec_name_external_id"),
        Index("ix_items_spec_state_retry", "spec_id", "state", "retry_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    spec_name: Mapped[str] = mapped_column(String(64))
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    external_id: Mapped[str] = mapped_column(String(256))
    content_hash: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)  # the input rendered by the spec: what the teacher sees
    payload: Mapped[dict[str, Any]]
    slices: Mapped[dict[str, Any]]
    # A trusted record for the item (e.g. the real routing outcome of a ticket), if one exists.
    # None is SQL NULL, not JSON null, so that "has no record" is `known_good IS NULL` on both.
    known_good: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    state: Mapped[ItemState] = mapped_column(
        _enum(ItemState, "item_state"), default=ItemState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Its kind (``schemas.errors``' ``kind``, or ``lease_expired``): what code decides on.
    last_error_kind: Mapped[str | None] = mapped_column(String(32))
    # Whether datasets may take its label: false for a router's fallback kept for the ledger
    # and the cache only (sampled out by the spec's rules, or router.store_fallbacks off).
    trainable: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=_now(), onupdate=_now()
    )


# Dedupe by content looks items up by the first 16 hex digits (64 bits) of their hash, then
# compares the whole hash: an index half the size of one on the full hash, so a bulk load
# of millions of rows keeps it in memory (CONTENT_KEY_SQL in storage/bulk.py matches it).
# The constants are literal SQL: SQLite matches an expression index only on identical text.
CONTENT_KEY = func.substr(
    Item.content_hash, literal_column("1"), literal_column(str(CONTENT_KEY_CHARS))
)
Index("ix_items_spec_name_content_key", Item.spec_name, CONTENT_KEY)


class ItemAlias(Base):
    """A submitted id whose text was already stored under another id (content dedupe): the
    id is kept, pointing at the item that carries the label, so looking it up finds it."""

    __tablename__ = "item_aliases"

    spec_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class TeacherResponse(Base):
    """The teacher's raw successful answer, keyed by the hash of the normalized request.

    This is the cache that keeps teacher spend from ever doubling. Failures are never stored;
    an answer not worth replaying is stored for its label with ``replayable`` false.
    """

    __tablename__ = "teacher_responses"

    request_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256))
    request: Mapped[dict[str, Any]]
    response: Mapped[dict[str, Any]]
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # False for an answer kept only for its label (refused, truncated, unparseable): the cache
    # does not replay it, and a later good answer to the same request replaces it.
    replayable: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class TeacherCall(Base):
    """The call ledger: one row for every attempt, with what it cost."""

    __tablename__ = "teacher_calls"
    __table_args__ = (Index("ix_teacher_calls_spec_created", "spec_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    request_hash: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[CallStatus] = mapped_column(_enum(CallStatus, "call_status"))
    error_kind: Mapped[str | None] = mapped_column(String(32))
    http_status: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    # The X-Client-Request-Id the attempt carried (none for a cache hit).
    client_request_id: Mapped[str | None] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Label(Base):
    """Exactly one verdict per (item, spec version); a rejected label is data, not an error."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("item_id", "spec_id", name="uq_labels_item_id_spec_id"),
        Index("ix_labels_spec_verdict", "spec_id", "verdict"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    output: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    verdict: Mapped[Verdict] = mapped_column(_enum(Verdict, "verdict"))
    reasons: Mapped[list[Any]]
    # One {"reason", "path", "message"} per problem, so people can group by reason and read why.
    problems: Mapped[list[Any] | None] = mapped_column(JsonType)
    confidence: Mapped[float | None] = mapped_column(Float)
    # Share of the k samples, or of the jury's teachers, that gave the kept answer.
    agreement: Mapped[float | None] = mapped_column(Float)
    known_good_match: Mapped[bool | None] = mapped_column(Boolean)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # For a label without a record the checks saw, under checks.target_accuracy: the
    # calibrated confidence threshold it was held to, and the calibration that set it.
    threshold: Mapped[float | None] = mapped_column(Float)
    calibration_id: Mapped[int | None] = mapped_column(ForeignKey("calibrations.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Calibration(Base):
    """What a spec version's labels with a known-good record say about its teacher's
    confidence: the thresholds that reach ``target`` accuracy (overall and per class), fitted
    while labeling goes on. Never changed; a refit is a new row, and each label names its own."""

    __tablename__ = "calibrations"
    __table_args__ = (Index("ix_calibrations_spec_id", "spec_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    signal: Mapped[str] = mapped_column(String(32))
    target: Mapped[float] = mapped_column(Float)
    items: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    # No labeled-with-record item was still to come when it was fitted: it will not improve.
    final: Mapped[bool] = mapped_column(Boolean)
    # The chosen point, the per-class thresholds and the isotonic fit (workers.calibration).
    fit: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class ReviewReason(StrEnum):
    """Why an item is put before a person other than its own label's verdict."""

    SUSPECT_RECORD = "suspect_record"  # the teacher and an out-of-fold model agree against it
    SAMPLE = "sample"  # a stratified sample of labels without a record, to make records


class ReviewState(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class ReviewTask(Base):
    """One item put before a person (``reason``) under one spec version. Resolving it can
    write the item's known-good record: the record before and after, who decided and when are
    kept here, so ``items.known_good`` always has its history."""

    __tablename__ = "review_tasks"
    __table_args__ = (
        UniqueConstraint(
            "spec_id", "item_id", "reason", name="uq_review_tasks_spec_id_item_id_reason"
        ),
        Index("ix_review_tasks_queue", "spec_id", "reason", "state", "rank"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    reason: Mapped[ReviewReason] = mapped_column(_enum(ReviewReason, "review_reason"))
    state: Mapped[ReviewState] = mapped_column(
        _enum(ReviewState, "review_state"), default=ReviewState.OPEN
    )
    # Higher first: P(record wrong) for a suspect; a sample's draw order.
    rank: Mapped[float] = mapped_column(Float)
    # The answer put forward (the suspect's suggested record; the teacher's sampled answer).
    proposed: Mapped[dict[str, Any]]
    # Where a sampled item was drawn from ("class=…|confidence=…") and how many it stands for.
    stratum: Mapped[str | None] = mapped_column(String(128))
    weight: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]]
    decision: Mapped[str | None] = mapped_column(String(16))
    record_before: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    record_after: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Budget(Base):
    """Spend per spec name (all versions): the settled total, and the limit last asked for."""

    __tablename__ = "budgets"

    spec_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    limit_usd: Mapped[float | None] = mapped_column(Float)
    spent_usd: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=_now(), onupdate=_now()
    )


class BudgetReservation(Base):
    """Money set aside for calls in flight; expires with the lease if its worker dies."""

    __tablename__ = "budget_reservations"
    __table_args__ = (Index("ix_budget_reservations_spec_expires", "spec_name", "expires_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    spec_name: Mapped[str] = mapped_column(ForeignKey("budgets.spec_name", ondelete="CASCADE"))
    amount_usd: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class IngestCounter(Base):
    """Items accepted over HTTP per spec name and UTC day: the ledger of the daily cap.

    Incremented in the transaction that inserts the items, with the row locked, so concurrent
    requests can never both take the last places under the cap.
    """

    __tablename__ = "ingest_counters"

    spec_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=_now(), onupdate=_now()
    )


class Dataset(Base):
    """A frozen training set: which labels it holds (``dataset_items``), how it was chosen,
    and a content hash. Never changed after it is created; labeling goes on beside it."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    spec_name: Mapped[str] = mapped_column(String(64))
    spec_version: Mapped[int] = mapped_column(Integer)
    spec_hash: Mapped[str] = mapped_column(String(64))  # the spec version's content hash
    teacher_models: Mapped[list[Any]]
    filters: Mapped[dict[str, Any]]
    # The split shares, the seed salting the split hash, balancing and oversampling.
    recipe: Mapped[dict[str, Any]]
    counts: Mapped[dict[str, Any]]
    rows: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class DatasetItem(Base):
    """One member of a dataset: a label (so the label version is exact), its split and its
    training weight (balancing and oversampling are weights, never copies)."""

    __tablename__ = "dataset_items"
    # A split in label order without a sort: what an export reads.
    __table_args__ = (Index("ix_dataset_items_dataset_split", "dataset_id", "split", "label_id"),)

    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), primary_key=True)
    item_id: Mapped[int] = mapped_column(BigId)
    external_id: Mapped[str] = mapped_column(String(256))
    split: Mapped[str] = mapped_column(String(8))
    weight: Mapped[float] = mapped_column(Float)
    class_value: Mapped[str | None] = mapped_column(String(256))
    # The label's verdict when the dataset was made (a later review decision changes the
    # label, not the dataset).
    verdict: Mapped[str] = mapped_column(String(16))


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class StudentRun(Base):
    """One training of a student on a frozen dataset: what was asked, where it ran, how it
    ended, and a summary of its metrics. Its folder (``out_dir``) holds the weights, config,
    metrics, model card and plots; runs never share a folder."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_spec_created", "spec_name", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    spec_name: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[RunState] = mapped_column(_enum(RunState, "run_state"), default=RunState.QUEUED)
    out_dir: Mapped[str] = mapped_column(Text)
    # What the trainer is to do (overrides such as epochs): small JSON, as a job carries.
    request: Mapped[dict[str, Any]]
    # headline, overall, flagged, latency_ms, size_bytes: what `runs list` and `compare` read.
    summary: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    flagged: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(128))
    pid: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TeacherBatch(Base):
    """One provider batch (OpenAI Batch API, Anthropic Message Batches) and how far stillhouse
    has taken it. ``step`` is ours and moves only forward, each move committed before the next
    network call: ``prepared`` (rows written, budget reserved) → ``uploaded`` (input file id)
    → ``creating`` (about to create; a restart looks the batch up before creating another) →
    ``submitted`` (the provider's id) → ``downloading`` → ``received`` (every result stored)
    → ``done``. ``status`` is the provider's own word for it."""

    __tablename__ = "teacher_batches"
    __table_args__ = (Index("ix_teacher_batches_spec_step", "spec_id", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    spec_name: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(32))
    base_url: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(256))
    # Sent as the batch's metadata (OpenAI), so a restart finds a batch it created but
    # could not record.
    key: Mapped[str] = mapped_column(String(32), unique=True)
    step: Mapped[str] = mapped_column(String(16), default="prepared")
    status: Mapped[str | None] = mapped_column(String(32))
    input_file_id: Mapped[str | None] = mapped_column(String(128))
    provider_batch_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    output_file_id: Mapped[str | None] = mapped_column(String(128))
    error_file_id: Mapped[str | None] = mapped_column(String(128))
    results_url: Mapped[str | None] = mapped_column(Text)
    requests: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    expired: Mapped[int] = mapped_column(Integer, default=0)
    price_factor: Mapped[float] = mapped_column(Float, default=0.5)
    reserved_usd: Mapped[float] = mapped_column(Float, default=0.0)
    reservation_id: Mapped[int | None] = mapped_column(BigInteger)
    spent_usd: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    creating_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=_now(), onupdate=_now()
    )


class TeacherBatchRequest(Base):
    """One item's request in a batch: ``custom_id`` is the request hash (the cache key), so a
    result maps back to its items and a request already answered is never paid for twice.
    ``state``: ``waiting``, then ``succeeded`` (``response`` holds the provider's answer body,
    read by the pipeline as a paid call at the batch price), ``failed`` or ``expired``."""

    __tablename__ = "teacher_batch_requests"
    __table_args__ = (
        Index("ix_teacher_batch_requests_hash_state", "request_hash", "state"),
        Index("ix_teacher_batch_requests_item", "item_id"),
    )

    batch_id: Mapped[int] = mapped_column(
        ForeignKey("teacher_batches.id", ondelete="CASCADE"), primary_key=True
    )
    item_id: Mapped[int] = mapped_column(
        ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="waiting")
    response: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
