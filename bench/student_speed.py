"""How fast the classification students answer, each beside its reference in the same run.

- ``featurizer``: the bag student's prediction packing (every n-gram id, weighted 1/count,
  regrouped by a linear scatter) against the training packing it replaced for prediction
  (distinct ids found by a sort), on 1,024 bundled BBC articles, the same logits either way.
- ``encoder``: the frozen MiniLM encoder on one article at a time, float32 against int8
  (dynamic quantization), at 128 and 64 tokens; p50 and p99 over 60 articles, one thread.
- ``--accuracy``: also the MiniLM head's test accuracy against the articles' folders (the gold
  labels as the teacher, the same split) at 64 and 128 tokens, int8.

Prints JSON. Run: ``python bench/student_speed.py [--accuracy]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# This folder's datasets.py would shadow Hugging Face `datasets` (sentence-transformers imports it).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from examples.bbc import iter_bbc  # noqa: E402


def _texts() -> list[str]:
    return [f"{row['headline']}\n\n{row['body']}" for row in iter_bbc()]


def _best(seconds: list[float]) -> float:
    return round(min(seconds), 4)


def featurizer(texts: list[str], repeats: int = 5) -> dict[str, Any]:
    """Seconds to pack 1,024 articles for prediction, both ways (best of ``repeats``)."""
    from student_train.features import Featurizer

    batch = texts[:1024]
    out: dict[str, Any] = {"articles": len(batch)}
    for name, distinct in (("sorted_distinct_reference", True), ("prediction_packing", False)):
        featurizer = Featurizer()
        featurizer.packed(batch, distinct=distinct)  # warm the vocabulary
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            featurizer.packed(batch, distinct=distinct)
            times.append(time.perf_counter() - started)
        out[name] = {"seconds": _best(times), "articles_per_s": round(len(batch) / min(times))}
    out["speedup"] = round(
        out["sorted_distinct_reference"]["seconds"] / out["prediction_packing"]["seconds"], 2
    )
    return out


def encoder(texts: list[str]) -> dict[str, Any]:
    """p50 and p99 milliseconds to embed one article, float32 and int8, 128 and 64 tokens."""
    from student_train.encoder import TextEncoder

    torch.set_num_threads(1)
    sample = texts[:60]
    out: dict[str, Any] = {"articles": len(sample), "threads": 1}
    for tokens in (128, 64):
        for int8 in (False, True):
            model = TextEncoder.load(tokens, 0, torch.device("cpu"), int8=int8)
            model.embed(sample[:2])
            times = []
            for text in sample:
                started = time.perf_counter()
                model.embed([text])
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            out[f"{'int8' if int8 else 'float32'}_{tokens}"] = {
                "p50_ms": round(times[len(times) // 2], 2),
                "p99_ms": round(times[-1], 2),
            }
    out["int8_speedup_p50_128"] = round(out["float32_128"]["p50_ms"] / out["int8_128"]["p50_ms"], 2)
    return out


def accuracy(texts: list[str]) -> dict[str, Any]:
    """The int8 MiniLM head's test accuracy with the folders as the teacher, 64 vs 128."""
    from student_train.data import Example
    from student_train.encoder import EncoderConfig, fit_encoder_student

    rows = list(iter_bbc())
    examples = []
    for k, (row, text) in enumerate(zip(rows, texts, strict=True)):
        share = hashlib.blake2b(row["id"].encode()).digest()[0] / 256
        split = "test" if share < 0.1 else "val" if share < 0.2 else "train"
        examples.append(
            Example(k, row["id"], text, row["queue"], known_good=row["queue"], split=split)
        )
    labels = sorted({e.label for e in examples})
    out: dict[str, Any] = {}
    for tokens in (64, 128):
        started = time.perf_counter()
        _, report = fit_encoder_student(examples, labels, EncoderConfig(max_seq_length=tokens))
        out[f"tokens_{tokens}"] = {
            "test_accuracy": report.overall["student_accuracy"],
            "test_items": report.overall["with_record"],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", action="store_true", help="also fit the MiniLM head")
    args = parser.parse_args()
    texts = _texts()
    result: dict[str, Any] = {
        "bench": "student_speed",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "featurizer": featurizer(texts),
        "encoder": encoder(texts),
    }
    if args.accuracy:
        result["accuracy"] = accuracy(texts)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
