"""Sampling rules for live samples: which submitted items are kept, decided without state.

The decision is a pure function of the spec name, the item's external id and its fields: a
hash of the id gives a point in [0, 1), and the item is kept when that point falls under its
rate. A retried submission therefore gets the same answer, and raising a rate later only adds
items (everything kept before is still kept). Backfills of history are never sampled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.spec import Spec

__all__ = ["SamplingRules", "sample_point"]


def sample_point(spec_name: str, external_id: str) -> float:
    """A stable, uniform point in [0, 1) for one item of one spec."""
    digest = hashlib.blake2b(f"sample\x00{spec_name}\x00{external_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64


def _value_key(value: Any) -> str:
    # Rates are keyed by strings (JSON object keys): match true/false and numbers as written.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class SamplingRules:
    """A base rate, per-slice rates that override it, and a daily cap (None: no cap)."""

    rate: float = 1.0
    slices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    daily_cap: int | None = None

    @classmethod
    def from_spec(cls, spec: Spec) -> SamplingRules:
        raw = spec.sampling
        cap = raw.get("daily_cap")
        return cls(
            rate=float(raw["rate"]),
            slices={
                name: {str(value): float(rate) for value, rate in rates.items()}
                for name, rates in raw["slices"].items()
            },
            daily_cap=None if cap is None else int(cap),
        )

    def rate_for(self, row: Mapping[str, Any]) -> float:
        """The rate of a row: the highest matching slice rate, else the base rate."""
        matched = [
            rates[_value_key(row[name])]
            for name, rates in self.slices.items()
            if row.get(name) is not None and _value_key(row[name]) in rates
        ]
        return max(matched) if matched else self.rate

    def keeps(self, spec_name: str, external_id: str, row: Mapping[str, Any]) -> bool:
        """Whether this item is taken; the same answer every time it is submitted."""
        rate = self.rate_for(row)
        if rate >= 1.0:
            return True
        if rate <= 0.0:
            return False
        return sample_point(spec_name, external_id) < rate
