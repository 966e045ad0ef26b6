"""Frozen datasets on both databases: membership by filters, a split by a stable hash, weights
instead of copies, a content hash that depends on the data only, and errors that leave
nothing behind."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from support.store import QUEUES, Labeled, load_tickets, ticket, write_label

from schemas.errors import ConfigError
from storage.datasets import (
    DatasetFilters,
    DatasetRecipe,
    create_dataset,
    dataset_by_name,
    dataset_diff,
    free_name,
    list_datasets,
    split_of,
)
from storage.models import Dataset, DatasetItem, Verdict
from workers.ingest import store_spec
from workers.spec import parse_spec

N = 200


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> Labeled:
    """200 tickets; the teacher agrees with the queue except on every 10th, which the checks
    rejected; confidence runs from 0.5 to 1.0."""
    labeled = load_tickets(sessions, [ticket(n) for n in range(N)])
    with sessions.begin() as session:
        for n in range(N):
            wrong = n % 10 == 0
            write_label(
                session,
                labeled,
                f"t{n:05d}",
                QUEUES[(n + wrong) % 5],
                verdict=Verdict.REJECTED if wrong else Verdict.ACCEPTED,
                confidence=0.5 + 0.5 * n / N,
            )
    return labeled


def make(
    sessions: sessionmaker[Session],
    store: Labeled,
    name: str,
    filters: DatasetFilters | None = None,
    recipe: DatasetRecipe | None = None,
) -> dict:
    with sessions.begin() as session:
        return create_dataset(
            session,
            name=name,
            spec_id=store.spec_id,
            slice_names=store.spec.slice_fields,
            class_field=store.spec.class_field,
            filters=filters or DatasetFilters(),
            recipe=recipe or DatasetRecipe(),
        )


def members(sessions: sessionmaker[Session], name: str) -> dict[str, DatasetItem]:
    with sessions() as session:
        dataset = dataset_by_name(session, name)
        rows = session.scalars(select(DatasetItem).where(DatasetItem.dataset_id == dataset.id))
        return {m.external_id: m for m in rows}


def test_a_dataset_takes_the_accepted_labels_split_by_a_stable_hash(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    info = make(sessions, store, "d1")
    got = members(sessions, "d1")
    assert info["rows"] == len(got) == N - N // 10  # the rejected ones are left out
    assert {m.verdict for m in got.values()} == {"accepted"}
    assert all(m.split == split_of(i, (0.8, 0.1, 0.1)) for i, m in got.items())
    splits = info["counts"]["splits"]
    assert sum(splits.values()) == info["rows"] and 0.7 < splits["train"] / info["rows"] < 0.9
    assert sum(info["counts"]["classes"]["train"].values()) == splits["train"]
    by_queue = info["counts"]["slices"]["train"]["queue"]
    assert sum(by_queue.values()) == splits["train"] and set(by_queue) == set(QUEUES)
    assert info["teacher_models"] == ["teacher-m"] and info["spec"] == "triage"
    assert len(info["content_hash"]) == 64 and info["version"] == 2


def test_the_same_data_chosen_the_same_way_has_the_same_hash_and_labeling_goes_on_beside_it(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    first = make(sessions, store, "first")
    again = make(sessions, store, "again")
    assert again["content_hash"] == first["content_hash"]  # the name is not in the hash
    other = make(sessions, store, "seeded", recipe=DatasetRecipe(seed=7))
    assert other["content_hash"] != first["content_hash"]
    # Labeling goes on: new items and labels, a review decision on a member's label.
    more = load_tickets(sessions, [ticket(n) for n in range(N, N + 20)])
    with sessions.begin() as session:
        for n in range(N, N + 20):
            write_label(session, more, f"t{n:05d}", QUEUES[n % 5])
    later = make(sessions, store, "later")
    with sessions() as session:
        frozen = dataset_by_name(session, "first")
        count = session.scalar(
            select(func.count()).select_from(DatasetItem).where(DatasetItem.dataset_id == frozen.id)
        )
    assert (frozen.rows, count, frozen.content_hash) == (
        first["rows"],
        first["rows"],
        first["content_hash"],
    )
    assert later["rows"] == first["rows"] + 20
    # An item keeps its split in every dataset made with the same seed.
    old, new = members(sessions, "first"), members(sessions, "later")
    assert all(new[i].split == m.split for i, m in old.items())


def test_filters_choose_by_confidence_verdict_and_slice(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    confident = make(sessions, store, "confident", DatasetFilters(min_confidence=0.9))
    everything = make(sessions, store, "all", DatasetFilters(verdicts=("accepted", "rejected")))
    sport = make(sessions, store, "sport", DatasetFilters(slices={"queue": ["sport", "tech"]}))
    # Confidence 0.5 + n / 400 >= 0.9 from n = 160: 40 items, 4 of them rejected.
    assert confident["rows"] == 36
    assert everything["rows"] == N
    assert Counter(m.verdict for m in members(sessions, "all").values())["rejected"] == N // 10
    queues = {s for per in sport["counts"]["slices"].values() for s in per["queue"]}
    assert queues == {"sport", "tech"} and sport["rows"] == 80  # the rejected are business


def test_balance_and_oversampling_are_weights_not_copies(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    skewed = load_tickets(sessions, [ticket(n, "sport") for n in range(N, N + 60)])
    with sessions.begin() as session:
        for n in range(N, N + 60):
            write_label(session, skewed, f"t{n:05d}", "sport")
    recipe = DatasetRecipe(balance=True, oversample={("class", "tech"): 3.0})
    info = make(sessions, store, "balanced", recipe=recipe)
    got = members(sessions, "balanced")
    assert len(got) == info["rows"] == N - N // 10 + 60  # no copies
    total: Counter[str] = Counter()
    for m in got.values():
        total[m.class_value or ""] += m.weight
    # Balanced, every class carries n / k of the weight; tech three times that.
    share = info["rows"] / 5
    for klass in ("business", "entertainment", "politics", "sport"):
        assert total[klass] == pytest.approx(share)
    assert total["tech"] == pytest.approx(3 * share)


def test_diff_says_what_was_added_removed_and_relabeled(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    make(sessions, store, "before", DatasetFilters(min_confidence=0.6))
    body = dict(store.spec.body, version=store.spec.version + 1)
    with sessions.begin() as session:  # v+1 relabels nine items, two differently
        v2 = store_spec(session, parse_spec(body)).id
        for n in range(41, 50):
            write_label(session, store, f"t{n:05d}", QUEUES[(n + (n < 43)) % 5], spec_id=v2)
    with sessions.begin() as session:
        create_dataset(
            session,
            name="after",
            spec_id=v2,
            slice_names=store.spec.slice_fields,
            class_field="label",
            filters=DatasetFilters(),
            recipe=DatasetRecipe(),
        )
        diff = dataset_diff(session, "before", "after")
    before = members(sessions, "before")
    assert diff["added"]["count"] == 0
    assert diff["removed"]["count"] == len(before) - 9
    assert diff["relabeled"] == {"count": 2, "examples": ["t00041", "t00042"]}
    with sessions() as session:
        assert [d["name"] for d in list_datasets(session)] == ["before", "after"]


@pytest.mark.parametrize(
    ("filters", "recipe", "message"),
    [
        (DatasetFilters(min_confidence=1.5), None, "min_confidence 1.5: a share between 0 and 1"),
        (DatasetFilters(verdicts=("great",)), None, r"verdict \['great'\]: choose from"),
        (DatasetFilters(slices={"region": ["eu"]}), None, "no slice named 'region'"),
        (DatasetFilters(min_confidence=0.999), None, "the filters select no labels of triage v2"),
        (None, DatasetRecipe(shares=(0.5, 0.2, 0.2)), "must add up to 1"),
        (None, DatasetRecipe(oversample={("region", "eu"): 2.0}), "no class or slice named"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_dataset(
    sessions: sessionmaker[Session],
    store: Labeled,
    filters: DatasetFilters | None,
    recipe: DatasetRecipe | None,
    message: str,
) -> None:
    with pytest.raises(ConfigError, match=message):
        make(sessions, store, "bad", filters, recipe)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
        assert session.scalar(select(func.count()).select_from(DatasetItem)) == 0


def test_a_taken_name_and_an_unknown_dataset_are_refused(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    make(sessions, store, "taken")
    with pytest.raises(ConfigError, match="a dataset named 'taken' exists already"):
        make(sessions, store, "taken")
    with pytest.raises(ConfigError, match="dataset name 'no/slash'"):
        make(sessions, store, "no/slash")
    with (
        sessions() as session,
        pytest.raises(ConfigError, match=r"no dataset named 'nope' \(datasets: taken\)"),
    ):
        dataset_by_name(session, "nope")


def test_a_taken_name_gets_the_next_free_suffix(
    sessions: sessionmaker[Session], store: Labeled
) -> None:
    with sessions() as session:
        assert free_name(session, "triage-v2-20261202-101010") == "triage-v2-20261202-101010"
    make(sessions, store, "triage-v2-20261202-101010")
    make(sessions, store, "triage-v2-20261202-101010-2")
    with sessions() as session:
        assert free_name(session, "triage-v2-20261202-101010") == "triage-v2-20261202-101010-3"
        assert free_name(session, "triage-v2-20261202-1010") == "triage-v2-20261202-1010"
