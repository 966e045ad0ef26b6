"""Frozen datasets: chosen from a spec version's labels by filters, split by a stable hash of
the external id, weighted (never copied) for balance, and recorded member by member.

A dataset holds label ids, so the label version of each member is exact; labels are never
rewritten once written, so a dataset reads the same however labeling goes on. Its content
hash covers the spec version, the recipe, the filters and every member (external id, label,
split, weight), not its name: the same data chosen the same way has the same hash.

The caller owns the transaction (``create_dataset`` only flushes): a failure anywhere, a
filter that selects nothing included, leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, insert, null, select
from sqlalchemy.orm import Session, aliased

from schemas.errors import ConfigError
from storage.models import Dataset, DatasetItem, Item, Label, SpecRow, TeacherResponse, Verdict

__all__ = [
    "MEMBER_COLUMNS",
    "SPLITS",
    "DatasetFilters",
    "DatasetRecipe",
    "create_dataset",
    "dataset_by_name",
    "dataset_diff",
    "dataset_info",
    "free_name",
    "list_datasets",
    "member_rows",
    "open_member_csv",
    "split_of",
    "stable_unit",
]

SPLITS = ("train", "val", "test")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCALE = float(2**64)
_CHUNK = 20_000


def stable_unit(external_id: str, salt: str = "") -> float:
    """A number in [0, 1) from a blake2b hash of the id (and a salt): the same for the same id
    on every machine and in every run, so an item keeps its split as the data grows."""
    digest = hashlib.blake2b(f"{salt}\x00{external_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def split_of(external_id: str, shares: Sequence[float], seed: int = 0) -> str:
    """The split (train, val, test) of one id under the shares and the seed."""
    unit = stable_unit(external_id, str(seed) if seed else "")
    return next((name for name, edge in _edges(shares) if unit < edge), SPLITS[-1])


def _edges(shares: Sequence[float]) -> list[tuple[str, float]]:
    """Each split with the upper end of its interval of [0, 1)."""
    edges, edge = [], 0.0
    for name, share in zip(SPLITS, shares, strict=True):
        edge += share
        edges.append((name, edge))
    return edges


@dataclass(frozen=True, slots=True)
class DatasetFilters:
    """Which labels of the spec version a dataset takes."""

    verdicts: tuple[str, ...] = (Verdict.ACCEPTED.value,)
    min_confidence: float | None = None
    min_agreement: float | None = None
    slices: dict[str, list[str]] = field(default_factory=dict)  # name -> any of these values
    labeled_after: datetime | None = None
    labeled_before: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdicts"] = list(self.verdicts)
        for key in ("labeled_after", "labeled_before"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


@dataclass(frozen=True, slots=True)
class DatasetRecipe:
    """How a dataset is split and weighted."""

    shares: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    balance: bool = False  # weight classes to count equally
    # (what, value) -> factor: ("class", "sport") or (slice name, value), multiplied in.
    oversample: dict[tuple[str, str], float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shares": dict(zip(SPLITS, self.shares, strict=True)),
            "seed": self.seed,
            "balance": self.balance,
            "oversample": [
                {"on": on, "value": value, "factor": factor}
                for (on, value), factor in sorted(self.oversample.items())
            ],
        }


def create_dataset(
    session: Session,
    *,
    name: str,
    spec_id: int,
    slice_names: Sequence[str],
    class_field: str | None,
    filters: DatasetFilters,
    recipe: DatasetRecipe,
) -> dict[str, Any]:
    """Choose, split, weight and record a dataset (flush only); returns :func:`dataset_info`."""
    _check(session, name, slice_names, filters, recipe, class_field)
    spec = session.get(SpecRow, spec_id)
    assert spec is not None
    where = _where(spec_id, filters)
    klass = Label.output[class_field].as_string() if class_field else None
    weights = _class_weights(session, where, klass) if recipe.balance and klass is not None else {}
    dataset = Dataset(
        name=name,
        spec_id=spec_id,
        spec_name=spec.name,
        spec_version=spec.version,
        spec_hash=spec.content_hash,
        teacher_models=_teacher_models(session, where),
        filters=filters.as_dict(),
        recipe={**recipe.as_dict(), "slices": list(slice_names)},
        counts={},
        rows=0,
        content_hash="",
    )
    session.add(dataset)
    session.flush()
    digest = hashlib.sha256(
        json.dumps(
            [spec.content_hash, dataset.filters, dataset.recipe], sort_keys=True, default=str
        ).encode()
    )
    counts = _Counts(slice_names)
    sliced = [Item.slices[n].as_string() for n in slice_names]
    stmt = select(
        Label.id,
        Item.id,
        Item.external_id,
        Label.verdict,
        klass if klass is not None else null(),
        *sliced,
    )
    stmt = stmt.join(Item, Item.id == Label.item_id).where(*where).order_by(Label.id)
    edges = _edges(recipe.shares)
    salt = str(recipe.seed) if recipe.seed else ""
    factors = _Factors(recipe, weights, slice_names)
    buffer: list[tuple[Any, ...]] = []
    for label_id, item_id, external_id, verdict, value, *values in _stream(session, stmt):
        unit = stable_unit(external_id, salt)
        split = next((name for name, edge in edges if unit < edge), SPLITS[-1])
        value = None if value is None else str(value)
        values = [None if v is None else str(v) for v in values]
        weight = factors.weight(value, values)
        verdict = Verdict(verdict).value
        digest.update(f"{external_id}\t{label_id}\t{verdict}\t{split}\t{weight:.9g}\n".encode())
        counts.add(split, value, values)
        buffer.append((dataset.id, label_id, item_id, external_id, split, weight, value, verdict))
        if len(buffer) >= _CHUNK:
            _write(session, buffer)
            buffer = []
    _write(session, buffer)
    if counts.total == 0:
        raise ConfigError(_nothing_selected(session, spec, filters))
    dataset.counts = counts.as_dict()
    dataset.rows = counts.total
    dataset.content_hash = digest.hexdigest()
    session.flush()
    session.refresh(dataset, ["created_at"])  # set by the database
    return dataset_info(dataset)


def dataset_by_name(session: Session, name: str) -> Dataset:
    """The dataset called ``name``, or a ``ConfigError`` that lists the ones there are."""
    found = session.scalar(select(Dataset).where(Dataset.name == name))
    if found is None:
        names = list(session.scalars(select(Dataset.name).order_by(Dataset.id)))
        known = ", ".join(names[-20:]) if names else "none yet: `stillhouse dataset create`"
        raise ConfigError(f"no dataset named {name!r} (datasets: {known})")
    return found


def free_name(session: Session, base: str, column: Any = Dataset.name) -> str:
    """``base``, or ``base-2``, ``base-3``, … when a row has it already in ``column`` (two
    datasets, or runs, made in the same second under a timestamped name)."""
    taken = set(
        session.scalars(select(column).where((column == base) | column.startswith(f"{base}-")))
    )
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    """What `dataset show --json` prints."""
    return {
        "name": dataset.name,
        "content_hash": dataset.content_hash,
        "spec": dataset.spec_name,
        "version": dataset.spec_version,
        "spec_hash": dataset.spec_hash,
        "teacher_models": dataset.teacher_models,
        "rows": dataset.rows,
        "counts": dataset.counts,
        "filters": dataset.filters,
        "recipe": dataset.recipe,
        "created_at": dataset.created_at.isoformat() if dataset.created_at else None,
    }


def list_datasets(session: Session, spec_name: str | None = None) -> list[dict[str, Any]]:
    """Every dataset (or one spec's), oldest first, with its size and hash."""
    stmt = select(Dataset).order_by(Dataset.id)
    if spec_name is not None:
        stmt = stmt.where(Dataset.spec_name == spec_name)
    return [
        {
            "name": d.name,
            "spec": d.spec_name,
            "version": d.spec_version,
            "rows": d.rows,
            "splits": d.counts.get("splits", {}),
            "content_hash": d.content_hash,
            "created_at": d.created_at.isoformat() if d.created_at else None,
        }
        for d in session.scalars(stmt)
    ]


def dataset_diff(session: Session, a: str, b: str, *, examples: int = 20) -> dict[str, Any]:
    """What changed from dataset ``a`` to ``b``, by external id: members added, removed, and
    relabeled (in both, with a different answer), each with a count and a few ids."""
    first, second = dataset_by_name(session, a), dataset_by_name(session, b)
    old, new = aliased(DatasetItem), aliased(DatasetItem)
    old_label, new_label = aliased(Label), aliased(Label)

    def only(left: Any, right: Any, left_id: int, right_id: int) -> tuple[int, list[str]]:
        missing = (
            ~select(right.external_id)
            .where(right.dataset_id == right_id, right.external_id == left.external_id)
            .exists()
        )
        base = select(left.external_id).where(left.dataset_id == left_id, missing)
        count = session.scalar(select(func.count()).select_from(base.subquery())) or 0
        ids = list(session.scalars(base.order_by(left.external_id).limit(examples)))
        return int(count), ids

    added = only(new, old, second.id, first.id)
    removed = only(old, new, first.id, second.id)
    changed = (
        select(new.external_id)
        .join(old, (old.external_id == new.external_id) & (old.dataset_id == first.id))
        .join(old_label, old_label.id == old.label_id)
        .join(new_label, new_label.id == new.label_id)
        .where(new.dataset_id == second.id, old.label_id != new.label_id)
        .where(func.coalesce(old.class_value, "") != func.coalesce(new.class_value, ""))
    )
    relabeled_count = session.scalar(select(func.count()).select_from(changed.subquery())) or 0
    relabeled = list(session.scalars(changed.order_by(new.external_id).limit(examples)))
    return {
        "from": {"name": first.name, "content_hash": first.content_hash, "rows": first.rows},
        "to": {"name": second.name, "content_hash": second.content_hash, "rows": second.rows},
        "added": {"count": added[0], "examples": added[1]},
        "removed": {"count": removed[0], "examples": removed[1]},
        "relabeled": {"count": int(relabeled_count), "examples": relabeled},
    }


MEMBER_COLUMNS = (
    "external_id",
    "class_value",
    "verdict",
    "weight",
    "text",
    "slices",
    "output_json",
    "confidence",
    "agreement",
    "known_good_json",
    "known_good_match",
    "label_id",
    "labeled_at",
)


def member_rows(session: Session, dataset_id: int, split: str) -> Iterator[tuple[Any, ...]]:
    """One split's members with what the store knows of them, in label order, streamed
    (columns as in ``MEMBER_COLUMNS``; the JSON values as their JSON text, unparsed)."""
    stmt = (
        select(
            DatasetItem.external_id,
            DatasetItem.class_value,
            DatasetItem.verdict,
            DatasetItem.weight,
            Item.text,
            Item.slices,
            cast(Label.output, Text),
            Label.confidence,
            Label.agreement,
            cast(Item.known_good, Text),
            Label.known_good_match,
            DatasetItem.label_id,
            Label.created_at,
        )
        .join(Label, Label.id == DatasetItem.label_id)
        .join(Item, Item.id == DatasetItem.item_id)
        .where(DatasetItem.dataset_id == dataset_id, DatasetItem.split == split)
        .order_by(DatasetItem.label_id)
    )
    for row in _stream(session, stmt):
        yield tuple(row)


@contextmanager
def open_member_csv(
    session: Session, dataset_id: int, split: str, slice_names: Sequence[str]
) -> Iterator[io.RawIOBase]:
    """Postgres: one split's members as a CSV stream straight from ``COPY`` (no Python per
    row); NULL is an unquoted empty field, an empty string a quoted one. Columns: external_id, text,
    class, output (JSON text), verdict, weight, confidence, agreement, known_good (JSON text),
    known_good_match (t/f), label_id, labeled_at (microseconds since the epoch, UTC), then
    one per slice name."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}")
    slices = "".join(f", i.slices->>{_literal(n)}" for n in slice_names)
    query = (
        "SELECT m.external_id, i.text, m.class_value, l.output::text, m.verdict, m.weight, "
        "l.confidence, l.agreement, NULLIF(i.known_good::text, 'null'), l.known_good_match, "
        "m.label_id, (extract(epoch FROM l.created_at) * 1000000)::bigint"
        f"{slices} FROM dataset_items m JOIN labels l ON l.id = m.label_id "
        f"JOIN items i ON i.id = m.item_id WHERE m.dataset_id = {int(dataset_id)} "
        f"AND m.split = '{split}' ORDER BY m.label_id"
    )
    dbapi = session.connection().connection.driver_connection
    assert dbapi is not None
    with (
        dbapi.cursor() as cursor,
        cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT csv)") as copy,
    ):
        reader = _CopyReader(copy)
        try:
            yield reader
        finally:
            reader.close()


class _CopyReader(io.RawIOBase):
    """A ``COPY … TO STDOUT`` as a binary file that readers (pyarrow's CSV) pull from.

    A thread pulls the server's rows (one message each) and hands them over joined in blocks
    of about 1 MiB, at most 16 blocks ahead: the server keeps writing while the reader parses,
    in bounded memory. Closed before the whole result was read (an error downstream), it
    cancels the query so the connection is usable again.
    """

    _BLOCK = 1 << 20

    def __init__(self, copy: Any) -> None:
        import queue
        import threading

        self._copy = copy
        self._blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self._left = b""
        self._done = False
        self._thread = threading.Thread(target=self._pull, daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        parts: list[bytes] = []
        size = 0
        try:
            for row in self._copy:
                if self._stop.is_set():
                    break
                parts.append(bytes(row))
                size += len(parts[-1])
                if size >= self._BLOCK:
                    self._put(b"".join(parts))
                    parts, size = [], 0
            if parts:
                self._put(b"".join(parts))
            self._put(None)
        except BaseException as exc:  # handed to the reading thread
            self._put(exc)

    def _put(self, block: bytes | BaseException | None) -> None:
        import queue

        while not self._stop.is_set():
            try:
                self._blocks.put(block, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts, have = [self._left], len(self._left)
        while not self._done and (size < 0 or have < size):
            block = self._blocks.get()
            if isinstance(block, BaseException):
                self._done = True
                raise block
            if block is None:
                self._done = True
                break
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        if size < 0 or len(data) <= size:
            self._left = b""
            return data
        self._left = data[size:]
        return data[:size]

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self._done:
            self._stop.set()
            self._copy.connection.cancel_safe()  # the rest of the result is not wanted
        self._thread.join()
        super().close()


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class _Counts:
    """Members per split, per split and class, per split and slice value."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.total = 0
        self.splits: Counter[str] = Counter()
        self.classes: dict[str, Counter[str]] = defaultdict(Counter)
        self.slices: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)

    def add(self, split: str, value: str | None, values: Sequence[str | None]) -> None:
        """One member: its split, class and slice values (in the order of ``names``)."""
        self.total += 1
        self.splits[split] += 1
        if value is not None:
            self.classes[split][value] += 1
        for name, got in zip(self.names, values, strict=True):
            if got is not None:
                self.slices[(split, name)][got] += 1

    def as_dict(self) -> dict[str, Any]:
        slices: dict[str, dict[str, dict[str, int]]] = {}
        for (split, name), counter in sorted(self.slices.items()):
            slices.setdefault(split, {})[name] = dict(sorted(counter.items()))
        return {
            "total": self.total,
            "splits": {s: self.splits.get(s, 0) for s in SPLITS},
            "classes": {s: dict(sorted(c.items())) for s, c in sorted(self.classes.items())},
            "slices": slices,
        }


def _check(
    session: Session,
    name: str,
    slice_names: Sequence[str],
    filters: DatasetFilters,
    recipe: DatasetRecipe,
    class_field: str | None,
) -> None:
    if not NAME.match(name):
        raise ConfigError(
            f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (at most 128, "
            f"starting with a letter or digit), e.g. triage-2026-12"
        )
    if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
        raise ConfigError(
            f"a dataset named {name!r} exists already (datasets never change): pick a new "
            f"name, e.g. {name}-2"
        )
    verdicts = {v.value for v in Verdict}
    bad = [v for v in filters.verdicts if v not in verdicts]
    if bad or not filters.verdicts:
        raise ConfigError(f"verdict {bad or '(none)'}: choose from {sorted(verdicts)}")
    for option, share in (
        ("min_confidence", filters.min_confidence),
        ("min_agreement", filters.min_agreement),
    ):
        if share is not None and not 0.0 <= share <= 1.0:
            raise ConfigError(f"{option} {share}: a share between 0 and 1")
    for slice_name in filters.slices:
        if slice_name not in slice_names:
            raise ConfigError(
                f"no slice named {slice_name!r} in this spec (its slices: "
                f"{', '.join(slice_names) or 'none'})"
            )
    if len(recipe.shares) != 3 or any(s < 0 for s in recipe.shares):
        raise ConfigError(f"split {recipe.shares}: three shares, train/val/test, e.g. 80/10/10")
    if not math.isclose(sum(recipe.shares), 1.0, abs_tol=1e-6) or recipe.shares[0] == 0:
        raise ConfigError(
            f"split {'/'.join(f'{s:g}' for s in recipe.shares)}: the shares must add up to 1 "
            f"(or 100) with a train share above 0, e.g. 80/10/10"
        )
    for (on, value), factor in recipe.oversample.items():
        if on == "class" and class_field is None:
            raise ConfigError("--oversample class:…: this spec's labels have no class")
        if on != "class" and on not in slice_names:
            raise ConfigError(
                f"--oversample {on}:{value}: no class or slice named {on!r} (slices: "
                f"{', '.join(slice_names) or 'none'})"
            )
        if not factor > 0:
            raise ConfigError(f"--oversample {on}:{value}={factor}: a factor above 0")


def _where(spec_id: int, filters: DatasetFilters) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [
        Label.spec_id == spec_id,
        Label.verdict.in_([Verdict(v) for v in filters.verdicts]),
        Item.trainable.is_(True),
    ]
    if filters.min_confidence is not None:
        where.append(Label.confidence >= filters.min_confidence)
    if filters.min_agreement is not None:
        where.append(Label.agreement >= filters.min_agreement)
    for slice_name, values in filters.slices.items():
        where.append(Item.slices[slice_name].as_string().in_(values))
    if filters.labeled_after is not None:
        where.append(Label.created_at >= _utc(filters.labeled_after))
    if filters.labeled_before is not None:
        where.append(Label.created_at < _utc(filters.labeled_before))
    return where


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _class_weights(
    session: Session, where: list[ColumnElement[bool]], klass: Any
) -> dict[str, float]:
    """Weights that make every class count as much in total: n / (k * n_class)."""
    stmt = (
        select(klass, func.count())
        .select_from(Label)
        .join(Item, Item.id == Label.item_id)
        .where(*where)
        .group_by(klass)
    )
    per_class = {str(v): int(n) for v, n in session.execute(stmt) if v is not None}
    total = sum(per_class.values())
    return {v: total / (len(per_class) * n) for v, n in per_class.items()}


class _Factors:
    """A member's weight: its class's balancing weight times every oversampling factor that
    matches its class or one of its slice values."""

    def __init__(
        self, recipe: DatasetRecipe, weights: dict[str, float], slice_names: Sequence[str]
    ) -> None:
        self.weights = weights
        self.by_class = {v: f for (on, v), f in recipe.oversample.items() if on == "class"}
        index = {name: k for k, name in enumerate(slice_names)}
        self.by_slice = [
            (index[on], v, f) for (on, v), f in recipe.oversample.items() if on != "class"
        ]

    def weight(self, value: str | None, values: Sequence[str | None]) -> float:
        weight = self.weights.get(value, 1.0) if value is not None else 1.0
        if value is not None and value in self.by_class:
            weight *= self.by_class[value]
        for k, wanted, factor in self.by_slice:
            if values[k] == wanted:
                weight *= factor
        return round(weight, 9)


def _teacher_models(session: Session, where: list[ColumnElement[bool]]) -> list[str]:
    stmt = (
        select(TeacherResponse.model)
        .select_from(Label)
        .join(Item, Item.id == Label.item_id)
        .join(TeacherResponse, TeacherResponse.request_hash == Label.request_hash)
        .where(*where)
        .distinct()
    )
    return sorted(str(m) for m in session.scalars(stmt))


def _stream(session: Session, stmt: Any) -> Iterator[Any]:
    """Rows in chunks through a server-side cursor on Postgres: memory stays flat."""
    result = session.execute(stmt.execution_options(yield_per=_CHUNK))
    yield from result


_MEMBER_FIELDS = (
    "dataset_id", "label_id", "item_id", "external_id", "split", "weight", "class_value",
    "verdict",
)  # fmt: skip


def _write(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """Members into ``dataset_items``: COPY on Postgres, one executemany elsewhere."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        dbapi = session.connection().connection.driver_connection
        assert dbapi is not None
        names = ", ".join(_MEMBER_FIELDS)
        with (
            dbapi.cursor() as cursor,
            cursor.copy(f"COPY dataset_items ({names}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
    else:
        session.execute(
            insert(DatasetItem), [dict(zip(_MEMBER_FIELDS, r, strict=True)) for r in rows]
        )


def _nothing_selected(session: Session, spec: SpecRow, filters: DatasetFilters) -> str:
    verdicts = dict(
        session.execute(
            select(Label.verdict, func.count())
            .where(Label.spec_id == spec.id)
            .group_by(Label.verdict)
        ).all()
    )
    have = ", ".join(f"{Verdict(v).value} {n}" for v, n in sorted(verdicts.items())) or "none"
    return (
        f"the filters select no labels of {spec.name} v{spec.version} "
        f"({json.dumps(filters.as_dict(), default=str)}); its labels: {have}. Loosen the "
        f"filters, or label first (`stillhouse backfill`)"
    )
