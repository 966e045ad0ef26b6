"""Prometheus metrics of the ingest API, in a registry of its own (one per app).

Under ``stillhouse serve --workers N`` each process counts into the files of
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which ``serve`` sets up),
and a scrape, whichever process answers it, adds up every process's counts.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "ApiMetrics", "Instrumented"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Fixed route labels: a raw path would let any client mint new time series.
ROUTES = ("/v1/items", "/v1/limits", "/healthz", "/metrics")


class ApiMetrics:
    """Requests by route and status, latency, items by outcome, and the backlog per spec."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stillhouse_api_requests",
            "HTTP requests answered, by route and status code",
            ("route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "stillhouse_api_request_duration_seconds",
            "Time to answer one HTTP request, by route",
            ("route",),
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.items = Counter(
            "stillhouse_api_items",
            "Submitted items, by spec and outcome",
            ("spec", "outcome"),
            registry=self.registry,
        )
        self.backlog = Gauge(
            "stillhouse_api_backlog_items",
            "Items of the spec's current version waiting for workers (pending, queued, leased)",
            ("spec",),
            registry=self.registry,
            # Every process reads the same backlog from the database: show the latest reading.
            multiprocess_mode="mostrecent",
        )

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or all processes' when several serve."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def count_items(self, spec: str, counts: dict[str, int]) -> None:
        for outcome, n in counts.items():
            if n:
                self.items.labels(spec, outcome).inc(n)


class Instrumented:
    """ASGI middleware that counts every HTTP response and times it."""

    def __init__(self, app: ASGIApp, metrics: Any, routes: tuple[str, ...] = ROUTES) -> None:
        self.app = app
        self.metrics = metrics  # any object with ``requests`` and ``latency`` like ApiMetrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # what the client sees if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
