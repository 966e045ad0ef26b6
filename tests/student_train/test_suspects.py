"""Confident learning on real BBC articles: records flipped to another topic at random are
found by the teacher and an out-of-fold student agreeing against them."""

from __future__ import annotations

import random

from examples.bbc import iter_bbc
from student_train.suspects import Judged, find_suspects

QUEUES = ["business", "entertainment", "politics", "sport", "tech"]


def test_flipped_records_are_found_and_ranked_first() -> None:
    rng = random.Random(5)
    judged, flipped = [], set()
    for n, row in enumerate(iter_bbc(600)):
        record = row["queue"]
        if rng.random() < 0.05:
            record = rng.choice([q for q in QUEUES if q != record])
            flipped.add(n)
        # A teacher that knows the true topic, confidently, but has no say on the rest.
        judged.append(Judged(n, row["id"], f"{row['headline']}\n\n{row['body']}", record,
                             row["queue"], 0.9))  # fmt: skip
    found = find_suspects(judged, QUEUES)
    hits = [s.item_id in flipped for s in found]
    assert flipped and found
    assert sum(hits) / len(found) >= 0.8 and sum(hits) / len(flipped) >= 0.6
    assert [s.p_record_wrong for s in found] == sorted(
        (s.p_record_wrong for s in found), reverse=True
    )
    for suspect in found:
        assert suspect.suggested != suspect.record and 0.0 < suspect.p_record_wrong <= 1.0
    # With no judge against a record, nothing is suspect.
    honest = [Judged(j.item_id, j.external_id, j.text, j.teacher or "", j.teacher, 0.9)
              for j in judged]  # fmt: skip
    assert len(find_suspects(honest, QUEUES)) <= 2
