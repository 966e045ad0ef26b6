"""Fault profiles: which share of requests fails how, and how slow the rest are, by seed.

A profile is a small YAML file (every key optional)::

    seed: 7
    latency: {dist: lognormal, median_ms: 300, sigma: 0.4, max_ms: 5000}
    # or: latency: 250  (fixed), or {dist: uniform, low_ms: 100, high_ms: 400}
    shares:             # share of requests per fault, each 0-1, summing to at most 1
      rate_limit: 0.05  # 429 with Retry-After: retry_after_s
      server_error: 0.02  # one of server_error_statuses
      reset: 0.01       # the connection is closed with no response (TCP RST)
      hang: 0.01        # no response for hang_s seconds (then a 504)
      slow_drip: 0.01   # a 200 whose body trickles in over drip_s seconds
      malformed: 0.02   # a 200 whose content is not JSON
      truncated: 0.02   # content cut in the middle, finish_reason "length"
      refusal: 0.01     # content null, message.refusal set
      wrong: 0.05       # schema-valid but not the model's answer
    retry_after_s: 2
    hang_s: 120
    drip_s: 60

Request number ``n`` (counted from server start or the last stats reset) draws its fault and
its latency from ``random.Random(f"{seed}:{n}")``, so a run is reproducible request by
request whatever the concurrency. The ``X-Stillhouse-Fault: KIND`` header (or ``none``)
forces one request's fault.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import ConfigError

__all__ = [
    "FaultDecision",
    "FaultKind",
    "FaultPlan",
    "FaultProfile",
    "Latency",
    "Shares",
    "build_profile",
    "load_profile",
    "parse_fault_flag",
]

FAULT_HEADER = "x-stillhouse-fault"


class FaultKind(StrEnum):
    """The injectable faults, in the order their shares are laid out on [0, 1)."""

    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    RESET = "reset"
    HANG = "hang"
    SLOW_DRIP = "slow_drip"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    REFUSAL = "refusal"
    WRONG = "wrong"


# Faults that need no model answer: the backend never runs for them.
BEFORE_BACKEND = frozenset(
    {FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR, FaultKind.RESET, FaultKind.HANG}
)

_STRICT = ConfigDict(extra="forbid", frozen=True)


class Latency(BaseModel):
    """Added latency per answered request: fixed ``ms``, uniform, or lognormal around a median."""

    model_config = _STRICT

    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    ms: float = Field(0.0, ge=0)
    low_ms: float = Field(0.0, ge=0)
    high_ms: float = Field(0.0, ge=0)
    median_ms: float = Field(0.0, ge=0)
    sigma: float = Field(0.5, ge=0)
    max_ms: float | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _number_is_fixed(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"dist": "fixed", "ms": value}
        return value

    @model_validator(mode="after")
    def _bounds_in_order(self) -> Latency:
        if self.dist == "uniform" and self.low_ms > self.high_ms:
            raise ValueError(f"low_ms ({self.low_ms}) is above high_ms ({self.high_ms})")
        return self

    @property
    def zero(self) -> bool:
        """Whether this adds no latency at all."""
        return self.dist == "fixed" and self.ms == 0

    def sample_s(self, rng: random.Random) -> float:
        """One latency draw, in seconds (``max_ms`` caps it)."""
        if self.dist == "uniform":
            ms = rng.uniform(self.low_ms, self.high_ms)
        elif self.dist == "lognormal":
            ms = self.median_ms * math.exp(rng.gauss(0.0, self.sigma))
        else:
            ms = self.ms
        return min(ms, self.max_ms if self.max_ms is not None else ms) / 1000


class Shares(BaseModel):
    """The share (0-1) of requests that get each fault; they sum to at most 1."""

    model_config = _STRICT

    rate_limit: float = Field(0.0, ge=0, le=1)
    server_error: float = Field(0.0, ge=0, le=1)
    reset: float = Field(0.0, ge=0, le=1)
    hang: float = Field(0.0, ge=0, le=1)
    slow_drip: float = Field(0.0, ge=0, le=1)
    malformed: float = Field(0.0, ge=0, le=1)
    truncated: float = Field(0.0, ge=0, le=1)
    refusal: float = Field(0.0, ge=0, le=1)
    wrong: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _at_most_one(self) -> Shares:
        total = sum(self.model_dump().values())
        if total > 1 + 1e-9:
            raise ValueError(f"the shares add up to {total:g}; they must sum to at most 1")
        return self


class FaultProfile(BaseModel):
    """How the local teacher misbehaves: latency, fault shares and each fault's parameters."""

    model_config = _STRICT

    seed: int = 0
    latency: Latency = Latency()
    shares: Shares = Shares()
    retry_after_s: int = Field(1, ge=0)
    server_error_statuses: tuple[int, ...] = Field((500, 502, 503), min_length=1)
    hang_s: float = Field(120.0, gt=0)
    drip_s: float = Field(60.0, gt=0)
    drip_chunk_bytes: int = Field(8, ge=1)
    refusal_text: str = "I can't help with that."

    @model_validator(mode="after")
    def _statuses_are_5xx(self) -> FaultProfile:
        bad = [status for status in self.server_error_statuses if not 500 <= status <= 599]
        if bad:
            raise ValueError(f"server_error_statuses must be 5xx codes, not {bad}")
        return self


@dataclass(frozen=True)
class FaultDecision:
    """What happens to one request: its fault (None for a clean answer) and latency."""

    kind: FaultKind | None
    latency_s: float
    rng: random.Random


class FaultPlan:
    """Decides each request's fault and latency from ``(seed, request number)``."""

    def __init__(self, profile: FaultProfile | None = None) -> None:
        self.profile = profile or FaultProfile()
        shares = self.profile.shares.model_dump()
        self._cumulative: list[tuple[float, FaultKind]] = []
        total = 0.0
        for kind in FaultKind:
            total += shares[kind.value]
            self._cumulative.append((total, kind))
        self.active = total > 0 or not self.profile.latency.zero
        self._clean = FaultDecision(None, 0.0, random.Random(0))

    def decide(self, number: int, forced: str | None = None) -> FaultDecision:
        """The decision for request ``number``; ``forced`` is a header value to obey."""
        if forced is None and not self.active:
            return self._clean
        rng = random.Random(f"{self.profile.seed}:{number}")
        drawn = self._pick(rng.random())  # drawn even when forced: keeps the stream aligned
        kind = drawn if forced is None else _parse_forced(forced)
        return FaultDecision(kind, self.profile.latency.sample_s(rng), rng)

    def _pick(self, draw: float) -> FaultKind | None:
        for bound, kind in self._cumulative:
            if draw < bound:
                return kind
        return None


def _parse_forced(value: str) -> FaultKind | None:
    """The fault an ``X-Stillhouse-Fault`` header names (``none`` for none); ValueError else."""
    name = value.strip().lower()
    if name == "none":
        return None
    try:
        return FaultKind(name)
    except ValueError:
        known = ", ".join(kind.value for kind in FaultKind)
        raise ValueError(f"unknown fault {value!r}; use one of: {known}, none") from None


def load_profile(path: str | Path) -> FaultProfile:
    """Read and validate a YAML fault profile; ``ConfigError`` says which field is wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"fault profile {path}: cannot read it: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"fault profile {path}: not valid YAML: {exc}") from exc
    return _validate(raw if raw is not None else {}, str(path))


def build_profile(
    path: str | Path | FaultProfile | None = None,
    *,
    faults: Sequence[str] = (),
    seed: int | None = None,
    latency_ms: float | None = None,
) -> FaultProfile:
    """A profile from an optional file (or profile), overridden by command-line flags."""
    if isinstance(path, FaultProfile):
        base = path.model_dump()
    else:
        base = load_profile(path).model_dump() if path is not None else {}
    shares = dict(base.get("shares", {}))
    shares.update(parse_fault_flag(flag) for flag in faults)
    overrides: dict[str, Any] = {"shares": shares}
    if seed is not None:
        overrides["seed"] = seed
    if latency_ms is not None:
        overrides["latency"] = latency_ms
    source = path if isinstance(path, str | Path) else "the given profile"
    return _validate({**base, **overrides}, f"{source} with the command-line flags")


def parse_fault_flag(flag: str) -> tuple[str, float]:
    """``"rate_limit=0.1"`` -> ``("rate_limit", 0.1)``, or ``ConfigError`` saying why not."""
    name, _, value = flag.partition("=")
    try:
        return FaultKind(name.strip()).value, float(value)
    except ValueError:
        known = ", ".join(kind.value for kind in FaultKind)
        raise ConfigError(
            f"--fault {flag!r}: expected KIND=SHARE, KIND one of {known}, SHARE from 0 to 1"
        ) from None


def _validate(raw: object, source: str) -> FaultProfile:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"fault profile {source}: expected a mapping of settings at the top")
    try:
        return FaultProfile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"fault profile {source}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """Each problem as ``field.path: what is wrong (got value)``."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        got = f" (got {error['input']!r})" if error["type"] != "value_error" else ""
        problems.append(f"{where}: {message}{got}")
    return "; ".join(problems)
