"""Spec files: load a YAML distillation target, validate it, and expose it as typed values."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from schemas.errors import SpecError
from schemas.loader import compile_validator, error_path, schema_problems, spec_validator
from storage.datasets import stable_unit

__all__ = [
    "BatchSettings",
    "Jury",
    "Spec",
    "TeacherConfig",
    "is_withheld",
    "labeling_hash",
    "load_spec",
    "parse_spec",
    "resolve_spec_path",
]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "specs"


@dataclass(frozen=True, slots=True)
class TeacherConfig:
    """How to reach the teacher; the API key is named by env var, never stored."""

    model: str
    provider: str = "openai"
    base_url: str = "http://127.0.0.1:8765/v1"
    api_key_env: str | None = None
    response_format: str = "json_schema"
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60.0
    max_retries: int = 4
    concurrency: int = 16  # calls in flight for the whole fleet: the adaptive limit's ceiling
    min_concurrency: int = 1
    latency_tolerance: float | None = 2.0
    max_output_tokens: int = 256
    samples: int = 1
    logprobs: bool = False
    rpm: int | None = None
    tpm: int | None = None
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    breaker_failure_ratio: float = 0.5
    breaker_window_s: float = 10.0
    max_inline_wait_s: float = 5.0
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """``labeling.batch`` of a spec (see docs/spec-reference.md).

    ``max_requests`` and ``max_bytes`` split the request file below the provider's own limits
    (OpenAI 50,000 requests and 200 MB, Anthropic 100,000 and 256 MB) when set lower;
    ``retry`` is where a request that failed or expired goes next (``batch``: the next batch;
    ``live``: a live call), at most ``max_resubmits`` times through batches; ``price_factor``
    prices batch calls against the teacher's live prices; ``poll_s`` paces the poller."""

    retry: str = "batch"
    max_requests: int | None = None
    max_bytes: int | None = None
    price_factor: float = 0.5
    poll_s: float = 30.0
    max_resubmits: int = 3
    completion_window: str = "24h"


@dataclass(frozen=True, slots=True)
class Jury:
    """More teachers that answer every item alongside the primary one and vote with it.

    ``min_agreement`` is the share of all teachers (the primary included; one that gives no
    usable answer counts as disagreeing) that must give the majority answer.
    """

    teachers: tuple[TeacherConfig, ...] = ()
    min_agreement: float = 0.0


@dataclass(frozen=True, slots=True)
class Spec:
    """One validated distillation target (a spec file's contents)."""

    name: str
    version: int
    kind: str
    body: dict[str, Any]
    content_hash: str
    teacher: TeacherConfig
    output_schema: dict[str, Any]
    source: str = "<memory>"
    jury: Jury = field(default_factory=Jury)

    @property
    def schema_name(self) -> str:
        """The output schema's name in a teacher request (OpenAI's ``json_schema.name``,
        Anthropic's tool name): named by the schema's content, never by the spec's name or
        version, so two specs that ask the same question send the same request, and the
        response cache answers the second (the design's promise)."""
        canonical = json.dumps(self.output_schema, sort_keys=True, separators=(",", ":"))
        return "answer_" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def teachers(self) -> tuple[TeacherConfig, ...]:
        """The primary teacher first, then the jury's, in spec order."""
        return (self.teacher, *self.jury.teachers)

    @property
    def labels(self) -> list[dict[str, str]]:
        return list(self.body.get("labels", []))

    @property
    def label_names(self) -> list[str]:
        return [label["name"] for label in self.labels]

    @property
    def id_field(self) -> str:
        return str(self.body["input"].get("id_field", "id"))

    @property
    def class_field(self) -> str | None:
        """The output field that is a label's class (datasets count and balance by it): a
        classification spec's ``label``; other kinds have none."""
        return "label" if self.kind == "classification" else None

    @property
    def slice_fields(self) -> list[str]:
        return list(self.body.get("slices", []))

    @property
    def known_good(self) -> dict[str, dict[str, str]]:
        return dict(self.body.get("known_good", {}))

    @property
    def checks(self) -> dict[str, Any]:
        return {
            "min_confidence": 0.0,
            "require_known_good_match": True,
            "max_output_chars": 20000,
            "max_depth": 10,
            "repair_attempts": 1,
            "withhold_share": 0.0,
            "target_accuracy": None,
            "calibration_min_items": 200,
            "calibration_per_class": True,
            "calibration_wait_s": 2.0,
            **self.body.get("checks", {}),
        }

    @property
    def target_accuracy(self) -> float | None:
        """``checks.target_accuracy``: labels without a record are held to a learned threshold."""
        value = self.checks["target_accuracy"]
        return None if value is None else float(value)

    @property
    def labeling(self) -> dict[str, int]:
        """The claim settings (``batch_size``, ``max_attempts``, ``lease_s``)."""
        given = self.body.get("labeling", {})
        return {**LABELING_DEFAULTS, **{k: v for k, v in given.items() if k in LABELING_DEFAULTS}}

    @property
    def labeling_mode(self) -> str:
        """``live`` (calls as items come) or ``batch`` (the provider's batch API)."""
        return str(self.body.get("labeling", {}).get("mode", "live"))

    @property
    def batch(self) -> BatchSettings:
        """``labeling.batch``: how a batch-mode backfill splits, prices and retries."""
        return BatchSettings(**self.body.get("labeling", {}).get("batch", {}))

    @property
    def sampling(self) -> dict[str, Any]:
        """Live-sample rules for HTTP ingest: keep everything, no cap, unless the spec says so."""
        return {"rate": 1.0, "slices": {}, "daily_cap": None, **self.body.get("sampling", {})}

    @property
    def budget_usd(self) -> float | None:
        value = self.body.get("budget_usd")
        return None if value is None else float(value)

    def output_validator(self) -> Draft202012Validator:
        return compile_validator(self.output_schema)


def is_withheld(external_id: str, share: float) -> bool:
    """Whether an item's known-good record is kept from the checks (stable, by id hash)."""
    if share <= 0:
        return False
    return stable_unit(external_id, "withhold") < share


def resolve_spec_path(name_or_path: str) -> Path:
    """A spec is a file path, or the name of a bundled example (``triage``)."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml", ".json"} or path.exists():
        if not path.is_file():
            raise SpecError(
                f"spec file not found: {path} (give a path to a .yaml spec file "
                f"or a bundled example name: {', '.join(_example_names())})"
            )
        return path
    candidate = EXAMPLES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise SpecError(
        f"no spec named {name_or_path!r}: give a path to a .yaml spec file or one "
        f"of the bundled examples: {', '.join(_example_names())}"
    )


def _example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))


def load_spec(name_or_path: str) -> Spec:
    """Read, validate and return a spec; every problem names the file and the field path."""
    path = resolve_spec_path(name_or_path)
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(body, source=str(path))


def parse_spec(body: Any, *, source: str = "<memory>") -> Spec:
    """Validate a spec body (already parsed from YAML/JSON) and build a :class:`Spec`."""
    if not isinstance(body, dict):
        raise SpecError(
            f"{source}: a spec must be a mapping at the top level, got {type(body).__name__}"
        )
    problems = schema_problems(spec_validator(), body)
    if problems:
        lines = "\n".join(f"  {where}: {what}" for where, what in problems)
        raise SpecError(f"{source}: invalid spec:\n{lines}")
    output_schema = body.get("output_schema") or _classification_schema(body)
    try:
        compile_validator(output_schema)
    except SchemaError as exc:
        raise SpecError(
            f"{source}: output_schema is not a valid JSON Schema at "
            f"{error_path(exc)}: {exc.message}"
        ) from exc
    _check_consistency(body, source)
    teacher, jury = _teacher_config(body["teacher"]), _jury(body.get("jury"))
    _check_jury_distinct(teacher, jury, source)
    return Spec(
        name=body["name"],
        version=int(body["version"]),
        kind=body["kind"],
        body=body,
        content_hash=labeling_hash(body),
        teacher=teacher,
        output_schema=output_schema,
        source=source,
        jury=jury,
    )


# Operational settings: changing them does not change what a label means, so they are left out
# of the hash that pins a spec version (a budget can be raised without relabeling everything).
_OPERATIONAL = ("description", "labeling", "budget_usd", "student", "sampling", "router")
_OPERATIONAL_TEACHER = (
    "rpm",
    "tpm",
    "circuit_breaker",
    "max_inline_wait_s",
    "base_url",
    "api_key_env",
    "timeout_s",
    "max_retries",
    "concurrency",
    "min_concurrency",
    "latency_tolerance",
    "price",
)


# What `labeling` means when a spec leaves it out; the dispatcher reads stored specs with these.
LABELING_DEFAULTS = {"batch_size": 50, "max_attempts": 5, "lease_s": 600}


def labeling_hash(body: dict[str, Any]) -> str:
    """Hash of everything in a spec that shapes the labels (not budgets, limits or URLs)."""
    meaning = {k: v for k, v in body.items() if k not in _OPERATIONAL}
    meaning["teacher"] = _teacher_meaning(body["teacher"])
    if "jury" in body:
        jury = body["jury"]
        meaning["jury"] = {**jury, "teachers": [_teacher_meaning(t) for t in jury["teachers"]]}
    canonical = json.dumps(meaning, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _teacher_meaning(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in _OPERATIONAL_TEACHER}


def _jury(raw: dict[str, Any] | None) -> Jury:
    if not raw:
        return Jury()
    return Jury(
        teachers=tuple(_teacher_config(t) for t in raw["teachers"]),
        min_agreement=float(raw.get("min_agreement", 0.0)),
    )


# What a teacher's request is made of (its cache key): two teachers alike in all of these ask
# the very same question, so the second would only ever get the first one's cached answer.
_REQUEST_FIELDS = (
    "provider",
    "model",
    "response_format",
    "params",
    "max_output_tokens",
    "samples",
    "logprobs",
)


def _check_jury_distinct(primary: TeacherConfig, jury: Jury, source: str) -> None:
    seen = {_request_identity(primary): "$.teacher"}
    for index, config in enumerate(jury.teachers):
        where = f"$.jury.teachers[{index}]"
        other = seen.setdefault(_request_identity(config), where)
        if other != where:
            raise SpecError(
                f"{source}: {where}: asks exactly what {other} asks (same provider, model, "
                f"params and output settings), so its answer would be the cached one and its "
                f"vote no second opinion; give it another model or other params"
            )


def _request_identity(config: TeacherConfig) -> str:
    fields = {name: getattr(config, name) for name in _REQUEST_FIELDS}
    return json.dumps(fields, sort_keys=True, default=str)


def _teacher_config(raw: dict[str, Any]) -> TeacherConfig:
    price = raw.get("price", {})
    breaker = raw.get("circuit_breaker", {})
    fields = {k: v for k, v in raw.items() if k not in ("price", "circuit_breaker")}
    return TeacherConfig(
        **fields,
        breaker_failures=int(breaker.get("failures", 5)),
        breaker_cooldown_s=float(breaker.get("cooldown_s", 30.0)),
        breaker_failure_ratio=float(breaker.get("failure_ratio", 0.5)),
        breaker_window_s=float(breaker.get("window_s", 10.0)),
        input_per_mtok=float(price.get("input_per_mtok", 0)),
        output_per_mtok=float(price.get("output_per_mtok", 0)),
    )


def _classification_schema(body: dict[str, Any]) -> dict[str, Any]:
    names = [label["name"] for label in body.get("labels", [])]
    return {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": names},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["label", "confidence"],
        "additionalProperties": False,
    }


def _check_consistency(body: dict[str, Any], source: str) -> None:
    teachers = [("$.teacher", body["teacher"])]
    teachers += [
        (f"$.jury.teachers[{n}]", t) for n, t in enumerate(body.get("jury", {}).get("teachers", []))
    ]
    for where, teacher in teachers:
        least, most = teacher.get("min_concurrency", 1), teacher.get("concurrency", 16)
        if least > most:
            raise SpecError(
                f"{source}: {where}.min_concurrency: {least} is above its concurrency {most} "
                f"(the most calls in flight for the whole fleet); lower it or raise concurrency"
            )
    names = [label["name"] for label in body.get("labels", [])]
    if len(names) != len(set(names)):
        raise SpecError(f"{source}: $.labels: label names must be unique, got {names}")
    if "{document}" not in body["prompt"]["user"]:
        raise SpecError(
            f"{source}: $.prompt.user: the prompt must contain {{document}}, "
            f"where the document is inserted (delimited as data)"
        )
    props = (body.get("output_schema") or _classification_schema(body)).get("properties", {})
    for field_name in body.get("known_good", {}):
        if field_name not in props:
            raise SpecError(
                f"{source}: $.known_good.{field_name}: not a property of the "
                f"output schema (properties: {', '.join(sorted(props)) or 'none'})"
            )
