"""Provider batch APIs on the local teacher: OpenAI's Batch API (``/v1/files``,
``/v1/batches``) and Anthropic's Message Batches (``/v1/messages/batches``), in memory.

A batch runs in the background through the same backend as live calls (not through the live
rate limits: providers give batches their own pool), ``BatchFaults.in_progress_s`` after it is
created, and ends in seconds. Results come back in a shuffled order, as the providers' do.
Faults for tests: a share of requests fails (``fail_share``), a share is left unrun when the
batch expires (``expire_share``), only in the first ``faulty_batches`` batches, chosen by a
stable hash of the ``custom_id``; ``result_delay_s`` slows a download line by line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from stillhouse.servers.teacher.messages import chat_body, error_of, forced_tool, message_body
from stillhouse.servers.teacher.protocol import RequestError, error_body

__all__ = ["BatchFaults", "BatchStats", "BatchStore"]

CHAT_URL = "/v1/chat/completions"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# answer(chat-completions body) -> (HTTP status, body): the backend, as a live call gets it.
Answer = Callable[[dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class BatchFaults:
    fail_share: float = 0.0
    expire_share: float = 0.0
    in_progress_s: float = 0.5
    faulty_batches: int | None = None  # None: every batch
    result_delay_s: float = 0.0
    concurrency: int = 8


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0  # processed: succeeded + failed
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    canceled: int = 0

    def as_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Batch:
    id: str
    kind: str  # openai | anthropic
    number: int
    requests: list[tuple[str, dict[str, Any]]]
    created_at: float
    input_file_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "validating"
    errors: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, tuple[str, Any]] = field(default_factory=dict)  # custom_id -> outcome
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    cancel: bool = False
    ended: bool = False


def _now() -> int:
    return int(time.time())


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str, code: str, anthropic: bool = False) -> JSONResponse:
    body: dict[str, Any] = error_body(message, code)
    if anthropic:
        body = error_of(status, body)
    return JSONResponse(body, status_code=status)


class BatchStore:
    """The batches and files of one server, and the routes that serve them."""

    def __init__(self, answer: Answer, faults: BatchFaults | None = None) -> None:
        self.answer = answer
        self.faults = faults or BatchFaults()
        self.stats = BatchStats()
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def reset_stats(self) -> None:
        self.stats = BatchStats(batches=self.stats.batches)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- running -------------------------------------------------------------------------

    def _start(self, batch: _Batch) -> None:
        self.batches[batch.id] = batch
        self.stats.batches += 1
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _faulted(self, batch: _Batch) -> tuple[set[str], set[str]]:
        faults = self.faults
        if faults.faulty_batches is not None and batch.number > faults.faulty_batches:
            return set(), set()
        ids = sorted(
            (c for c, _ in batch.requests), key=lambda c: hashlib.sha256(c.encode()).hexdigest()
        )
        n_fail = round(faults.fail_share * len(ids))
        n_expire = round(faults.expire_share * len(ids))
        return set(ids[:n_fail]), set(ids[n_fail : n_fail + n_expire])

    async def _run(self, batch: _Batch) -> None:
        batch.status = "in_progress"
        batch.times["in_progress_at"] = time.time()
        await asyncio.sleep(self.faults.in_progress_s)
        failing, expiring = self._faulted(batch)
        gate = asyncio.Semaphore(self.faults.concurrency)

        async def one(custom_id: str, body: dict[str, Any]) -> None:
            async with gate:
                if batch.cancel:
                    batch.results[custom_id] = ("canceled", None)
                    self.stats.canceled += 1
                    return
                if custom_id in expiring:
                    batch.results[custom_id] = ("expired", None)
                    self.stats.expired += 1
                    return
                if custom_id in failing:
                    outcome: tuple[str, Any] = ("failed", (500, error_body("the model failed")))
                else:
                    status, answer = await self._answer(batch.kind, body)
                    outcome = (
                        ("succeeded", answer) if status == 200 else ("failed", (status, answer))
                    )
                batch.results[custom_id] = outcome
                self.stats.requests += 1
                if outcome[0] == "succeeded":
                    self.stats.succeeded += 1
                else:
                    self.stats.failed += 1

        await asyncio.gather(*(one(c, b) for c, b in batch.requests))
        self._finish(batch, expired=bool(expiring))

    async def _answer(self, kind: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if kind == "openai":
            return await self.answer(body)
        try:
            chat = chat_body(body)
            tool = forced_tool(body)
        except RequestError as exc:
            return 400, error_body(str(exc), "invalid_request")
        status, answer = await self.answer(chat)
        if status != 200:
            return status, answer
        return 200, message_body(answer, str(tool["name"]) if tool else None)

    def _finish(self, batch: _Batch, *, expired: bool) -> None:
        now = time.time()
        batch.ended = True
        if batch.kind == "anthropic":
            batch.status = "ended"
            batch.times["ended_at"] = now
            return
        rng = random.Random(batch.id)
        order = list(batch.results)
        rng.shuffle(order)  # providers do not keep the input order
        output, errors = [], []
        for custom_id in order:
            kind, value = batch.results[custom_id]
            line: dict[str, Any] = {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": custom_id,
            }
            request_id = f"req_{uuid.uuid4().hex[:16]}"
            if kind == "succeeded":
                line |= {
                    "response": {"status_code": 200, "request_id": request_id, "body": value},
                    "error": None,
                }
                output.append(line)
            elif kind == "failed":
                status, body = value
                line |= {
                    "response": {"status_code": status, "request_id": request_id, "body": body},
                    "error": None,
                }
                errors.append(line)
            else:
                code = "batch_cancelled" if kind == "canceled" else "batch_expired"
                message = (
                    "This request was cancelled before it ran."
                    if kind == "canceled"
                    else "This request could not be executed before the completion window expired."
                )
                errors.append(
                    line | {"response": None, "error": {"code": code, "message": message}}
                )
        batch.output_file_id = self._file(output, "batch_output") if output else None
        batch.error_file_id = self._file(errors, "batch_error") if errors else None
        batch.times["finalizing_at"] = now
        if batch.cancel:
            batch.status = "cancelled"
            batch.times["cancelled_at"] = now
        elif expired:
            batch.status = "expired"
            batch.times["expired_at"] = now
        else:
            batch.status = "completed"
            batch.times["completed_at"] = now

    def _file(self, lines: list[dict[str, Any]], purpose: str) -> str:
        content = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": _now(),
            "filename": f"{purpose}.jsonl",
            "purpose": purpose,
            "content": content,
        }
        return file_id

    async def _stream(self, lines: list[bytes]) -> AsyncIterator[bytes]:
        for line in lines:
            yield line
            if self.faults.result_delay_s:
                await asyncio.sleep(self.faults.result_delay_s)

    # -- OpenAI ---------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        form = await request.form()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch" or upload is None or isinstance(upload, str):
            return _error(400, "send multipart fields 'purpose' = batch and 'file'", "invalid_file")
        content = await upload.read()
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": _now(),
            "filename": upload.filename or "input.jsonl",
            "purpose": "batch",
            "content": content,
        }
        return JSONResponse(self._file_json(file_id))

    def _file_json(self, file_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.files[file_id].items() if k != "content"}

    async def file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.files:
            return _error(404, f"no file {file_id}", "not_found")
        return JSONResponse(self._file_json(file_id))

    async def file_content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.files:
            return _error(404, f"no file {file_id}", "not_found")
        lines = self.files[file_id]["content"].splitlines(keepends=True)
        return StreamingResponse(self._stream(lines), media_type="application/jsonl")

    async def create(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_json")
        file_id = body.get("input_file_id") if isinstance(body, dict) else None
        if file_id not in self.files:
            return _error(
                400, f"input_file_id {file_id!r} is not an uploaded file", "invalid_request"
            )
        if body.get("endpoint") != CHAT_URL:
            return _error(400, f"endpoint must be {CHAT_URL}", "invalid_request")
        if body.get("completion_window") != "24h":
            return _error(400, "completion_window must be 24h", "invalid_request")
        batch = _Batch(
            id=f"batch_{uuid.uuid4().hex[:24]}",
            kind="openai",
            number=self.stats.batches + 1,
            requests=[],
            created_at=time.time(),
            input_file_id=file_id,
            metadata=dict(body.get("metadata") or {}),
        )
        batch.errors = self._validate(batch, self.files[file_id]["content"])
        if batch.errors:
            batch.status, batch.ended = "failed", True
            batch.times["failed_at"] = time.time()
            self.batches[batch.id] = batch
            self.stats.batches += 1
        else:
            self._start(batch)
        return JSONResponse(self._openai_json(batch))

    def _validate(self, batch: _Batch, content: bytes) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(content.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                errors.append({"code": "invalid_json_line", "message": "not JSON", "line": number})
                continue
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                errors.append(
                    {"code": "missing_custom_id", "message": "no custom_id", "line": number}
                )
            elif custom_id in seen:
                errors.append(
                    {
                        "code": "duplicate_custom_id",
                        "message": f"custom_id {custom_id} repeats",
                        "line": number,
                    }
                )
            elif line.get("url") != CHAT_URL or not isinstance(line.get("body"), dict):
                errors.append(
                    {
                        "code": "invalid_url",
                        "message": f"url must be {CHAT_URL} with a body",
                        "line": number,
                    }
                )
            else:
                seen.add(custom_id)
                batch.requests.append((custom_id, line["body"]))
        if not errors and not batch.requests:
            errors.append(
                {"code": "empty_file", "message": "the file holds no request", "line": None}
            )
        return errors

    def _openai_json(self, b: _Batch) -> dict[str, Any]:
        done = [v for v in b.results.values() if v[0] == "succeeded"]
        failed = [v for v in b.results.values() if v[0] != "succeeded"]
        t = b.times
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": CHAT_URL,
            "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": int(b.created_at),
            "in_progress_at": _int(t.get("in_progress_at")),
            "expires_at": int(b.created_at) + 24 * 3600,
            "finalizing_at": _int(t.get("finalizing_at")),
            "completed_at": _int(t.get("completed_at")),
            "failed_at": _int(t.get("failed_at")),
            "expired_at": _int(t.get("expired_at")),
            "cancelling_at": _int(t.get("cancelling_at")),
            "cancelled_at": _int(t.get("cancelled_at")),
            "request_counts": {
                "total": len(b.requests),
                "completed": len(done),
                "failed": len(failed),
            },
            "metadata": b.metadata,
        }

    async def get(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None or batch.kind != "openai":
            return _error(404, f"no batch {request.path_params['batch_id']}", "not_found")
        return JSONResponse(self._openai_json(batch))

    async def listing(self, request: Request) -> Response:
        mine = [b for b in reversed(self.batches.values()) if b.kind == "openai"]
        after = request.query_params.get("after")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query_params.get("limit", 20))
        page = mine[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [self._openai_json(b) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(mine) > limit,
            }
        )

    async def cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None or batch.kind != "openai":
            return _error(404, f"no batch {request.path_params['batch_id']}", "not_found")
        if not batch.ended:
            batch.cancel = True
            batch.status = "cancelling"
            batch.times["cancelling_at"] = time.time()
        return JSONResponse(self._openai_json(batch))

    # -- Anthropic ------------------------------------------------------------------------

    async def create_messages(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_json", anthropic=True)
        raw = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(raw, list) or not raw:
            return _error(400, "'requests' must be a non-empty list", "invalid", anthropic=True)
        seen: set[str] = set()
        requests = []
        for index, entry in enumerate(raw):
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
                message = f"requests[{index}].custom_id must match ^[a-zA-Z0-9_-]{{1,64}}$"
                return _error(400, message, "invalid", anthropic=True)
            if custom_id in seen:
                return _error(400, f"custom_id {custom_id} repeats", "invalid", anthropic=True)
            if not isinstance(entry.get("params"), dict):
                return _error(
                    400, f"requests[{index}].params must be an object", "invalid", anthropic=True
                )
            seen.add(custom_id)
            requests.append((custom_id, entry["params"]))
        batch = _Batch(
            id=f"msgbatch_{uuid.uuid4().hex[:24]}",
            kind="anthropic",
            number=self.stats.batches + 1,
            requests=requests,
            created_at=time.time(),
        )
        self._start(batch)
        return JSONResponse(self._anthropic_json(batch, request))

    def _anthropic_json(self, b: _Batch, request: Request) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for kind, _ in b.results.values():
            counts[{"failed": "errored"}.get(kind, kind)] += 1
        counts["processing"] = len(b.requests) - sum(counts.values())
        status = "ended" if b.ended else ("canceling" if b.cancel else "in_progress")
        root = str(request.base_url).rstrip("/")
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _iso(b.times.get("ended_at")),
            "created_at": _iso(b.created_at),
            "expires_at": _iso(b.created_at + 24 * 3600),
            "archived_at": None,
            "cancel_initiated_at": _iso(b.times.get("cancelling_at")),
            "results_url": f"{root}/v1/messages/batches/{b.id}/results" if b.ended else None,
        }

    def _anthropic_batch(self, request: Request) -> _Batch | Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None or batch.kind != "anthropic":
            message = f"no message batch {request.path_params['batch_id']}"
            return _error(404, message, "not_found", anthropic=True)
        return batch

    async def get_messages(self, request: Request) -> Response:
        batch = self._anthropic_batch(request)
        if isinstance(batch, Response):
            return batch
        return JSONResponse(self._anthropic_json(batch, request))

    async def list_messages(self, request: Request) -> Response:
        mine = [b for b in reversed(self.batches.values()) if b.kind == "anthropic"]
        after = request.query_params.get("after_id")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query_params.get("limit", 20))
        page = mine[:limit]
        return JSONResponse(
            {
                "data": [self._anthropic_json(b, request) for b in page],
                "has_more": len(mine) > limit,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            }
        )

    async def cancel_messages(self, request: Request) -> Response:
        batch = self._anthropic_batch(request)
        if isinstance(batch, Response):
            return batch
        if not batch.ended:
            batch.cancel = True
            batch.times["cancelling_at"] = time.time()
        return JSONResponse(self._anthropic_json(batch, request))

    async def results_messages(self, request: Request) -> Response:
        batch = self._anthropic_batch(request)
        if isinstance(batch, Response):
            return batch
        if not batch.ended:
            return _error(400, "the batch has not ended yet", "invalid", anthropic=True)
        order = list(batch.results)
        random.Random(batch.id).shuffle(order)
        lines = []
        for custom_id in order:
            kind, value = batch.results[custom_id]
            result: dict[str, Any]
            if kind == "succeeded":
                result = {"type": "succeeded", "message": value}
            elif kind == "failed":
                status, body = value
                result = {"type": "errored", "error": error_of(status, body)}
            else:
                result = {"type": kind}
            lines.append(json.dumps({"custom_id": custom_id, "result": result}).encode() + b"\n")
        return StreamingResponse(self._stream(lines), media_type="application/x-jsonl")


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
