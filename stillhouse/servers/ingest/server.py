"""Run the ingest API under uvicorn, in one process or several (``--workers N``).

Each worker process builds its own engine and app after it starts (the factory reads the
served specs from an environment variable the parent sets), so no connection crosses a fork.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import uvicorn
from starlette.applications import Starlette

from schemas.errors import ConfigError
from stillhouse.context import connect_database
from stillhouse.servers.ingest.app import ApiLimits, create_app
from stillhouse.servers.ingest.metrics import MULTIPROC_ENV
from stillhouse.servers.serving import ReadLimits, guarded_protocol, serve_announced, uvicorn_config
from stillhouse.settings import Settings
from storage.session import make_sessionmaker
from workers.spec import load_spec

__all__ = ["api_limits", "app_from_environment", "build_app", "check_bind", "serve"]

OPTIONS_ENV = "STILLHOUSE_SERVE_OPTIONS"


def api_limits(settings: Settings) -> ApiLimits:
    """The API's limits from the settings."""
    return ApiLimits(
        settings.api_max_body_bytes,
        settings.api_max_batch,
        settings.api_max_backlog,
        settings.api_retry_after_s,
    )


def build_app(
    settings: Settings, spec_names: Sequence[str], *, insecure_no_auth: bool
) -> Starlette:
    """The app from settings: loads the specs, connects to the database (the app disposes
    the engine at shutdown) and stores the specs."""
    specs = [load_spec(name) for name in spec_names]
    engine = connect_database(settings)
    try:
        return create_app(
            specs,
            make_sessionmaker(engine),
            tokens=settings.api_tokens,
            limits=api_limits(settings),
            insecure_no_auth=insecure_no_auth,
            engine=engine,
        )
    except BaseException:
        engine.dispose()
        raise


def app_from_environment() -> Starlette:
    """The uvicorn factory of each worker process: settings and specs from the environment."""
    options = json.loads(os.environ[OPTIONS_ENV])
    return build_app(Settings(), options["specs"], insecure_no_auth=options["insecure_no_auth"])


def _multiprocess_metrics_dir() -> str | None:
    """Point the worker processes at a fresh folder for their metrics; None when the operator
    set ``PROMETHEUS_MULTIPROC_DIR`` already (that folder is theirs to empty between runs)."""
    if os.environ.get(MULTIPROC_ENV):
        return None
    folder = tempfile.mkdtemp(prefix="stillhouse-metrics-")
    os.environ[MULTIPROC_ENV] = folder  # the workers start fresh interpreters and inherit it
    return folder


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, insecure_no_auth: bool) -> None:
    """Refuse --insecure-no-auth beyond loopback (every stillhouse API)."""
    if insecure_no_auth and not _is_loopback(host):
        raise ConfigError(
            f"--insecure-no-auth serves without tokens and is only allowed on a loopback "
            f"address (127.0.0.1, ::1), not {host}: set STILLHOUSE_API_TOKENS instead"
        )


def serve(
    settings: Settings,
    spec_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    insecure_no_auth: bool = False,
    log_level: str = "warning",
) -> None:
    """Serve until interrupted; prints ``stillhouse api listening on URL`` once bound."""
    check_bind(host, insecure_no_auth=insecure_no_auth)
    # Built here even with several workers: a bad spec, token or database fails at once,
    # with one clear message, before any worker starts.
    app = build_app(settings, spec_names, insecure_no_auth=insecure_no_auth)
    limits = ReadLimits(settings.api_read_timeout_s, settings.api_max_connections)
    if workers > 1:
        if app.state.engine is not None:
            app.state.engine.dispose()  # the workers open their own after they start
        os.environ[OPTIONS_ENV] = json.dumps(
            {"specs": list(spec_names), "insecure_no_auth": insecure_no_auth}
        )
        metrics_dir = _multiprocess_metrics_dir()
        print(
            f"stillhouse api starting {workers} workers on http://{host}:{port}",
            file=sys.stderr,
            flush=True,
        )
        try:
            uvicorn.run(
                f"{__name__}:app_from_environment",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                http=guarded_protocol(limits),
                log_level=log_level,
                access_log=False,
            )
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return
    config = uvicorn_config(
        app, limits, host=host, port=port, log_level=log_level, access_log=False
    )
    asyncio.run(serve_announced(uvicorn.Server(config), host, "stillhouse api"))
