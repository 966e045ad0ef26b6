"""What every student's training shares: the torch thread count, the device, and how its
CPU latency is measured (one item at a time, as a router asks, and batched)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import torch

__all__ = ["LATENCY_ITEMS", "Settings", "device", "latency", "threads", "usable_cores"]

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
