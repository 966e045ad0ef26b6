"""Start the local teacher server as a child process and wait until it answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from schemas.errors import ConfigError

__all__ = ["free_port", "local_teacher", "stop_process", "wait_ready"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[Any], *, timeout: float) -> None:
    """SIGTERM a child, and SIGKILL it if it has not exited within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(
    base_url: str, process: subprocess.Popen[Any] | None = None, timeout_s: float = 180.0
) -> None:
    """Poll ``/healthz`` until the teacher is up (model loaded) or fail with a clear error."""
    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigError(
                f"the local teacher exited with code {process.returncode} before "
                f"it was ready; run `stillhouse teacher serve` to see why"
            )
        try:
            if httpx.get(f"{root}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ConfigError(f"the local teacher at {root} was not ready after {timeout_s:.0f} s")


@contextmanager
def local_teacher(
    backend: str = "embedding",
    port: int | None = None,
    api_key_env: str | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run ``stillhouse teacher serve`` on 127.0.0.1 for the duration; yields its base URL.

    ``extra_args`` go to the command as they are (``["--latency-ms", "200"]``, faults, …).
    """
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "stillhouse",
        "teacher",
        "serve",
        "--backend",
        backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if api_key_env:
        command += ["--api-key-env", api_key_env]
    command += list(extra_args)
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base_url, process)
        yield base_url
    finally:
        stop_process(process, timeout=10)
