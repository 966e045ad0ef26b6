"""Run the teacher app under uvicorn: one process, one worker, model loaded before binding.

uvicorn runs on ``uvloop`` and ``httptools`` when they are installed (the ``teacher`` extra
brings them), which roughly doubles what one core can answer, and on plain asyncio and h11
otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn

from stillhouse.servers.serving import ReadLimits, serve_announced, uvicorn_config
from stillhouse.servers.teacher.app import create_app
from stillhouse.servers.teacher.backends import Backend, make_backend
from stillhouse.servers.teacher.batch_jobs import BatchFaults
from stillhouse.servers.teacher.faults import FaultProfile, build_profile
from stillhouse.servers.teacher.limits import LimitsConfig

__all__ = ["serve"]


def serve(
    host: str,
    port: int,
    backend: str | Backend = "embedding",
    api_key: str | None = None,
    log_level: str = "warning",
    *,
    faults: str | Path | FaultProfile | None = None,
    fault: Sequence[str] = (),
    seed: int | None = None,
    latency_ms: float | None = None,
    model: str | None = None,
    limits: LimitsConfig | None = None,
    request_log: Path | None = None,
    batch_faults: BatchFaults | None = None,
) -> None:
    """Serve the teacher until interrupted (SIGINT/SIGTERM shut it down gracefully).

    ``faults`` is a YAML fault profile (or a ``FaultProfile``); ``fault`` holds
    ``KIND=SHARE`` overrides and ``seed`` overrides its seed. ``latency_ms`` is the ``fixed``
    backend's answer latency (default 200 ms) and, for the other backends, a fixed latency
    that replaces the profile's. ``model`` is the GGUF file of the ``llama`` backend.
    ``limits`` are the rate limits the server enforces as a hosted provider would (429s);
    ``request_log`` a JSON-lines file every request is appended to as it arrives;
    ``batch_faults`` what the batch APIs inject (``batch_jobs.BatchFaults``).

    Prints ``stillhouse teacher listening on http://HOST:PORT/v1`` to stderr once the model
    is loaded and the socket is bound; with ``port=0`` the line carries the port chosen.
    """
    fixed = backend == "fixed"
    profile = build_profile(
        faults, faults=fault, seed=seed, latency_ms=None if fixed else latency_ms
    )
    if isinstance(backend, str):
        backend = make_backend(backend, model=model, latency_ms=latency_ms if fixed else None)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(
            _serve(
                backend,
                host,
                port,
                api_key,
                log_level,
                profile,
                limits or LimitsConfig(),
                request_log,
                batch_faults,
            )
        )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(
    backend: Backend,
    host: str,
    port: int,
    api_key: str | None,
    log_level: str,
    profile: FaultProfile,
    limits: LimitsConfig,
    request_log: Path | None,
    batch_faults: BatchFaults | None = None,
) -> None:
    await backend.load()  # before binding, so a connection never waits on the model
    app = create_app(
        backend,
        api_key=api_key,
        faults=profile,
        limits=limits,
        request_log=request_log,
        batch_faults=batch_faults,
    )
    config = uvicorn_config(
        app,
        ReadLimits(),
        host=host,
        port=port,
        workers=1,
        log_level=log_level,
        access_log=False,
        # An injected hang or drip must not hold a shutdown for minutes.
        timeout_graceful_shutdown=5,
    )
    await serve_announced(uvicorn.Server(config), host, "stillhouse teacher", "/v1")
