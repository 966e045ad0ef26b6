"""Slow and hostile clients against the real servers over real sockets: a request must arrive
whole within the read timeout, headers are capped, connections are capped, and a client that
goes away is neither a traceback nor a 500 (the ingest API and the local teacher alike)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ingest_tools import TOKEN, running_api
from support.servers import serve_in_thread

from stillhouse.servers.ingest.server import build_app
from stillhouse.servers.serving import MAX_HEADER_BYTES, ReadLimits
from stillhouse.servers.teacher import FixedBackend
from stillhouse.servers.teacher.app import create_app as create_teacher_app
from stillhouse.settings import Settings

TIMEOUT_S = 1.0


@contextmanager
def connection(root: str) -> Iterator[socket.socket]:
    parts = urlsplit(root)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def read_all(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes, and after how long."""
    started = time.monotonic()
    sock.settimeout(within_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open past {within_s} s: {data[:200]!r}")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


HEADERS = f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"


@pytest.fixture(params=["httptools", "h11"])
def api(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    """The ingest API on each HTTP parser uvicorn runs, with a 1 s read timeout and room for
    20 connections."""
    settings = Settings(database_url=sqlite_url, api_tokens=TOKEN)
    app = build_app(settings, ["triage"], insecure_no_auth=False)
    limits = ReadLimits(read_timeout_s=TIMEOUT_S, max_connections=20)
    with serve_in_thread(app, http=request.param, lifespan="on", limits=limits) as root:
        yield root


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"POST /v1/items HTTP/1.1\r\nHost: x\r\n", id="unfinished-headers"),
        pytest.param(b"", id="nothing-sent"),
        pytest.param(
            f"POST /v1/items HTTP/1.1\r\n{HEADERS}Content-Length: 500\r\n\r\n".encode()
            + b'{"spec"',
            id="short-body",
        ),
        pytest.param(
            f"POST /v1/items HTTP/1.1\r\n{HEADERS}Transfer-Encoding: chunked\r\n\r\n".encode()
            + b'7\r\n{"spec"\r\n',
            id="endless-chunked-body",
        ),
    ],
)
def test_a_request_that_does_not_arrive_whole_is_answered_408_and_closed(
    api: str, sent: bytes
) -> None:
    with connection(api) as sock:
        sock.sendall(sent)
        answer, after = read_all(sock, within_s=TIMEOUT_S + 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive whole within 1 s" in answer
    assert TIMEOUT_S * 0.8 <= after <= TIMEOUT_S + 3
    assert httpx.get(api + "/healthz", timeout=5).status_code == 200


def test_a_slow_but_steady_request_within_the_timeout_is_served(api: str) -> None:
    body = b'{"spec": "triage", "item": {"id": "slow-1", "headline": "h", "body": "b"}}'
    with connection(api) as sock:
        sock.sendall(f"POST /v1/items HTTP/1.1\r\n{HEADERS}".encode())
        time.sleep(TIMEOUT_S / 3)
        sock.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:20])
        time.sleep(TIMEOUT_S / 3)
        sock.sendall(body[20:])
        sock.settimeout(5)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_keep_alive_requests_each_get_their_own_deadline(api: str) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with connection(api) as sock:
        for _ in range(3):
            sock.sendall(request)
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(TIMEOUT_S * 0.7)  # idle between requests is the keep-alive's business


def test_headers_over_the_cap_are_answered_431(api: str) -> None:
    with connection(api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        try:
            for _ in range(MAX_HEADER_BYTES // len(filler) + 10):
                sock.sendall(filler)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, _ = read_all(sock, within_s=5)
    assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_connections_past_the_cap_are_refused_and_the_rest_time_out(api: str) -> None:
    held = []
    try:
        for _ in range(25):
            parts = urlsplit(api)
            sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(sock)
        answers = [read_all(sock, within_s=TIMEOUT_S + 5)[0] for sock in held]
    finally:
        for sock in held:
            sock.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(refused) >= 5 and len(refused) + len(timed_out) == 25
    assert httpx.get(api + "/healthz", timeout=5).status_code == 200


def test_a_client_that_goes_away_mid_body_is_not_a_500_or_a_traceback(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with running_api(sqlite_url) as running:
        with connection(running.root) as sock:
            sock.sendall(
                f"POST /v1/items HTTP/1.1\r\n{HEADERS}Content-Length: 5000\r\n\r\n".encode()
                + b'{"spec": "triage", "items": ['
            )
            time.sleep(0.3)
        time.sleep(0.5)
        metrics = httpx.get(running.root + "/metrics", timeout=5).text
        health = httpx.get(running.root + "/healthz", timeout=5)
    statuses = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "stillhouse_api_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("route") == "/v1/items"
    }
    assert statuses.get("499") == 1 and "500" not in statuses
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # /healthz reveals nothing about what is served.
    assert health.json() == {"status": "ok", "database": "ok"}


def test_the_local_teacher_has_the_same_guards() -> None:
    app = create_teacher_app(FixedBackend(latency_ms=1))
    with serve_in_thread(app, limits=ReadLimits(read_timeout_s=TIMEOUT_S)) as root:
        with connection(root) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n{"
            )
            answer, after = read_all(sock, within_s=TIMEOUT_S + 5)
        assert answer.startswith(b"HTTP/1.1 408") and after <= TIMEOUT_S + 3
        assert httpx.get(root + "/healthz", timeout=5).status_code == 200


def test_the_local_teacher_refuses_a_non_ascii_key_and_guards_its_reset() -> None:
    app = create_teacher_app(FixedBackend(latency_ms=1), api_key="sk-local-key")
    with serve_in_thread(app) as root:
        odd = httpx.post(
            root + "/v1/chat/completions",
            headers={"Authorization": "Bearer sk-l\u00f6cal".encode()},
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        reset = httpx.post(root + "/v1/stats/reset")
        allowed = httpx.post(
            root + "/v1/stats/reset", headers={"Authorization": "Bearer sk-local-key"}
        )
    assert odd.status_code == 401  # was a 500: compare_digest refuses non-ASCII text
    assert reset.status_code == 401 and allowed.status_code == 200
