"""What every student's training shares: the torch thread count, the device, and how its
CPU latency is measured (one item at a time, as a router asks, and batched)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

import torch

__all__ = [
    "LATENCY_ITEMS",
    "Settings",
    "device",
    "latency",
    "read_settings",
    "threads",
    "usable_cores",
    "write_json",
]

T = TypeVar("T")
LATENCY_ITEMS = 200  # held-out inputs answered one at a time to measure latency


class Settings:
    """A student's hyperparameters (a dataclass) as the JSON its run writes and reads back."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a config from :meth:`as_dict` output, ignoring unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{key: value for key, value in data.items() if key in known})

    def as_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with a fixed torch thread count, restoring the previous one after.

    The steps are small and memory-bound: on a 2-core machine, two threads were 15% faster
    than one when it was idle and 2-3x slower when other work shared it, so the default
    takes half the cores, 1 to 4.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count or max(1, min(4, usable_cores() // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> int:
    """CPU cores this process may run on (Linux honors taskset and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device() -> torch.device:
    """Where to train: the GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def latency(
    predict: Callable[[Sequence[T]], object], items: Sequence[T], *, batch: int = 1_024
) -> dict[str, float]:
    """Milliseconds to answer one input at a time (p50 and p99 over up to
    :data:`LATENCY_ITEMS`), and inputs per second answered in batches of ``batch``."""
    single = list(items[:LATENCY_ITEMS])
    if not single:
        return {}
    predict(single[:1])  # warm
    times = []
    for item in single:
        started = time.perf_counter()
        predict([item])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    started = time.perf_counter()
    for start in range(0, len(items), batch):
        predict(items[start : start + batch])
    rate = len(items) / max(time.perf_counter() - started, 1e-9)
    return {
        "p50": round(times[len(times) // 2], 4),
        "p99": round(times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)], 4),
        "batched_items_per_s": round(rate, 1),
    }


def write_json(path: Path, value: object) -> None:
    """A run file (config, metrics) as indented, sorted JSON."""
    path.write_text(
        json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )


def read_settings(out_dir: Path, fmt: str, files: Sequence[str], what: str) -> dict[str, Any]:
    """The ``config.json`` of a saved student, after checking its files are there and its
    format is ``fmt`` (the config file is the last of ``files``)."""
    missing = [n for n in files if not (out_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"no {what} in {out_dir}: missing {', '.join(missing)}")
    config = out_dir / files[-1]
    settings: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
    if settings.get("format") != fmt:
        raise ValueError(f"{config} is not a {fmt} model (format {settings.get('format')!r})")
    return settings
