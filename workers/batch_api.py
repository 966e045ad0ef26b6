"""The providers' batch APIs over HTTP: OpenAI's Batch API (``/files`` and ``/batches``) and
Anthropic's Message Batches (``/messages/batches``), behind one small interface.

Each adapter builds request lines (``custom_id`` = the request hash), creates, reads, finds,
cancels and downloads a batch, and reads every result line into a :class:`BatchResult`:
``succeeded`` with the provider's answer body (a chat completion or a message, exactly what
a live call gets, so ``workers.providers`` parses both), ``failed`` with its status and
message, or ``expired`` (not run before the window closed, or cancelled). Errors map into the
project's error tree as live calls do. Synchronous httpx: the poller waits on the provider
anyway, and a result file is streamed line by line, never held whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx
from pydantic import SecretStr

from schemas.errors import BadResponse, ConfigError, StillhouseError
from workers.providers import provider_for
from workers.spec import TeacherConfig

__all__ = [
    "PROVIDER_LIMITS",
    "AnthropicBatches",
    "BatchAPI",
    "BatchInfo",
    "BatchResult",
    "OpenAIBatches",
    "batch_api_for",
]

# The providers' own limits per batch: (requests, bytes).
PROVIDER_LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024)}
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """A batch as the provider reports it."""

    id: str
    status: str
    ended: bool
    created_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    total: int | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One result line: ``succeeded`` (``body`` is the answer), ``failed`` or ``expired``."""

    custom_id: str
    outcome: str
    body: dict[str, Any] | None = None
    http_status: int | None = None
    error: str | None = None


class BatchAPI(Protocol):
    name: str

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes: ...

    def upload(self, content: bytes, filename: str) -> str | None: ...

    def create(self, content: bytes, file_id: str | None, key: str, window: str) -> BatchInfo: ...

    def get(self, batch_id: str) -> BatchInfo: ...

    def find(self, key: str, since: float, requests: int) -> BatchInfo | None: ...

    def cancel(self, batch_id: str) -> BatchInfo: ...

    def results(self, info: BatchInfo) -> Iterator[BatchResult]: ...

    def close(self) -> None: ...


class _Base:
    name = "openai"

    def __init__(self, config: TeacherConfig, api_key: SecretStr | None, timeout_s: float) -> None:
        self.config = config
        headers = {}
        if api_key is not None:
            headers = provider_for(config.provider).auth_headers(api_key.get_secret_value())
        self.http = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            trust_env=False,
        )

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise self._error(response)
        try:
            body = response.json()
        except ValueError as exc:
            raise BadResponse(
                f"the batch API answered {response.status_code} with a body that is not JSON: "
                f"{response.text[:200]!r}"
            ) from exc
        if not isinstance(body, dict):
            raise BadResponse(f"the batch API answer is not a JSON object: {str(body)[:200]}")
        return body

    def _error(self, response: httpx.Response) -> StillhouseError:
        error = provider_for(self.config.provider).map_error(response, self.config.api_key_env)
        error.args = (f"batch API {response.request.url.path}: {error}",)
        return error

    def _lines(self, path: str) -> Iterator[dict[str, Any]]:
        """A JSONL download, line by line (a line that is not JSON is reported and skipped)."""
        with self.http.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                raise self._error(response)
            for number, line in enumerate(response.iter_lines(), start=1):
                if not line.strip():
                    continue
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    yield {"_bad_line": number, "_text": line[:200]}
                    continue
                yield parsed


class OpenAIBatches(_Base):
    """OpenAI's Batch API: upload a JSONL file (``purpose=batch``), create a batch on
    ``/v1/chat/completions``, follow it, download the output and error files."""

    name = "openai"

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        entry = {"custom_id": custom_id, "method": "POST", "url": CHAT_PATH, "body": body}
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    def upload(self, content: bytes, filename: str) -> str | None:
        files = {"file": (filename, content, "application/jsonl")}
        body = self._json(self.http.post("/files", data={"purpose": "batch"}, files=files))
        return str(body["id"])

    def create(self, content: bytes, file_id: str | None, key: str, window: str) -> BatchInfo:
        request = {
            "input_file_id": file_id,
            "endpoint": CHAT_PATH,
            "completion_window": window,
            "metadata": {"stillhouse_batch": key},
        }
        return self._info(self._json(self.http.post("/batches", json=request)))

    def get(self, batch_id: str) -> BatchInfo:
        return self._info(self._json(self.http.get(f"/batches/{batch_id}")))

    def find(self, key: str, since: float, requests: int) -> BatchInfo | None:
        """The batch created with this key (its metadata), among those since ``since``."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = self._json(self.http.get("/batches", params=params))
            data = [self._info(b) for b in page.get("data") or [] if isinstance(b, dict)]
            for info in data:
                if info.metadata.get("stillhouse_batch") == key:
                    return info
            older = [i for i in data if i.created_at is not None and i.created_at < since - 60]
            if not page.get("has_more") or not data or older:
                return None
            after = data[-1].id

    def cancel(self, batch_id: str) -> BatchInfo:
        return self._info(self._json(self.http.post(f"/batches/{batch_id}/cancel")))

    def results(self, info: BatchInfo) -> Iterator[BatchResult]:
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                for entry in self._lines(f"/files/{file_id}/content"):
                    yield _openai_result(entry)

    def _info(self, body: dict[str, Any]) -> BatchInfo:
        status = str(body.get("status"))
        counts = body.get("request_counts") or {}
        metadata = body.get("metadata") or {}
        return BatchInfo(
            id=str(body["id"]),
            status=status,
            ended=status in ("completed", "failed", "expired", "cancelled"),
            created_at=_number(body.get("created_at")),
            counts={k: int(v) for k, v in counts.items() if isinstance(v, int)},
            output_file_id=body.get("output_file_id"),
            error_file_id=body.get("error_file_id"),
            metadata=metadata if isinstance(metadata, dict) else {},
            total=counts.get("total") if isinstance(counts.get("total"), int) else None,
        )


def _openai_result(entry: dict[str, Any]) -> BatchResult:
    if "_bad_line" in entry:
        return BatchResult("", "unreadable", error=f"line {entry['_bad_line']}: {entry['_text']}")
    custom_id = str(entry.get("custom_id") or "")
    response = entry.get("response")
    error = entry.get("error")
    if isinstance(response, dict):
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            return BatchResult(custom_id, "succeeded", body, 200)
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
        code = int(status) if isinstance(status, int) else None
        return BatchResult(custom_id, "failed", None, code, str(message)[:500])
    if isinstance(error, dict) and error.get("code") in ("batch_expired", "batch_cancelled"):
        return BatchResult(custom_id, "expired", error=str(error.get("code")))
    return BatchResult(custom_id, "failed", error=str(error)[:500])


class AnthropicBatches(_Base):
    """Anthropic's Message Batches: the requests go in the create call's body; the results
    are one JSONL stream at ``results_url``."""

    name = "anthropic"

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        entry = {"custom_id": custom_id, "params": body}
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    def upload(self, content: bytes, filename: str) -> str | None:
        return None  # no files: the requests travel in the create call

    def create(self, content: bytes, file_id: str | None, key: str, window: str) -> BatchInfo:
        requests = [json.loads(line) for line in content.splitlines() if line.strip()]
        return self._info(
            self._json(self.http.post("/messages/batches", json={"requests": requests}))
        )

    def get(self, batch_id: str) -> BatchInfo:
        return self._info(self._json(self.http.get(f"/messages/batches/{batch_id}")))

    def find(self, key: str, since: float, requests: int) -> BatchInfo | None:
        """Anthropic batches carry no metadata: the one created since ``since`` (a minute's
        clock skew allowed) with exactly ``requests`` requests, when there is exactly one."""
        page = self._json(self.http.get("/messages/batches", params={"limit": 100}))
        found = [
            info
            for info in (self._info(b) for b in page.get("data") or [] if isinstance(b, dict))
            if info.created_at is not None
            and info.created_at >= since - 60
            and info.total == requests
        ]
        return found[0] if len(found) == 1 else None

    def cancel(self, batch_id: str) -> BatchInfo:
        return self._info(self._json(self.http.post(f"/messages/batches/{batch_id}/cancel")))

    def results(self, info: BatchInfo) -> Iterator[BatchResult]:
        if not info.results_url:
            return
        for entry in self._lines(info.results_url):
            yield _anthropic_result(entry)

    def _info(self, body: dict[str, Any]) -> BatchInfo:
        status = str(body.get("processing_status"))
        counts = {k: int(v) for k, v in (body.get("request_counts") or {}).items()}
        return BatchInfo(
            id=str(body["id"]),
            status=status,
            ended=status == "ended",
            created_at=_timestamp(body.get("created_at")),
            counts=counts,
            results_url=body.get("results_url"),
            total=sum(counts.values()) if counts else None,
        )


def _anthropic_result(entry: dict[str, Any]) -> BatchResult:
    if "_bad_line" in entry:
        return BatchResult("", "unreadable", error=f"line {entry['_bad_line']}: {entry['_text']}")
    custom_id = str(entry.get("custom_id") or "")
    result = entry.get("result") or {}
    kind = result.get("type") if isinstance(result, dict) else None
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        return BatchResult(custom_id, "succeeded", result["message"], 200)
    if kind in ("expired", "canceled"):
        return BatchResult(custom_id, "expired", error=str(kind))
    error = (result.get("error") or {}) if isinstance(result, dict) else {}
    inner = error.get("error", error) if isinstance(error, dict) else {}
    kind_of = inner.get("type") if isinstance(inner, dict) else None
    status = 400 if kind_of == "invalid_request_error" else 500
    message = inner.get("message") if isinstance(inner, dict) else str(error)
    return BatchResult(custom_id, "failed", None, status, f"{kind_of}: {message}"[:500])


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return _number(value)
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def batch_api_for(
    config: TeacherConfig, api_key: SecretStr | None, *, timeout_s: float = 120.0
) -> BatchAPI:
    """The batch API of the teacher's provider."""
    if config.provider == "openai":
        return OpenAIBatches(config, api_key, timeout_s)
    if config.provider == "anthropic":
        return AnthropicBatches(config, api_key, timeout_s)
    raise ConfigError(
        f"teacher.provider {config.provider!r} has no batch API; use labeling.mode: live"
    )
