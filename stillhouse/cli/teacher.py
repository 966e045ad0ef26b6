"""`stillhouse teacher …`: the local OpenAI-compatible teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from schemas.errors import ConfigError
from stillhouse.cli.root import teacher_app

__all__ = ["teacher_serve"]


@teacher_app.command("serve")
def teacher_serve(
    backend: Annotated[
        str, typer.Option(help="embedding, spacy, moderation, llama or fixed")
    ] = "embedding",
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8765,
    api_key_env: Annotated[
        str | None, typer.Option(help="require this env var's value as the bearer token")
    ] = None,
    faults: Annotated[
        Path | None, typer.Option(metavar="PROFILE.yaml", help="fault profile to inject")
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KIND=SHARE",
            help="share of requests that get fault KIND (repeatable; overrides the profile)",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the fault sequence")] = None,
    latency_ms: Annotated[
        float | None,
        typer.Option(help="--backend fixed: answer latency (default 200); others: added latency"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(metavar="PATH", help="GGUF file for --backend llama")
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="requests in flight; more get 429")
    ] = None,
    rpm: Annotated[
        int | None, typer.Option(min=1, help="requests per minute; more get 429")
    ] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="tokens per minute; more get 429")] = None,
    limit_window_s: Annotated[
        float, typer.Option(min=0.01, help="--rpm/--tpm buckets hold this many seconds' worth")
    ] = 1.0,
    retry_after_s: Annotated[
        float, typer.Option(min=0, help="Retry-After of a 429 over --max-concurrency")
    ] = 1.0,
    request_log: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="append every request to this JSON-lines file"),
    ] = None,
    batch_fail_share: Annotated[
        float, typer.Option(min=0, max=1, help="batch APIs: share of requests that fail (500)")
    ] = 0.0,
    batch_expire_share: Annotated[
        float,
        typer.Option(min=0, max=1, help="batch APIs: share of requests left unrun (expired)"),
    ] = 0.0,
    batch_in_progress_s: Annotated[
        float, typer.Option(min=0, help="batch APIs: seconds a batch waits before it runs")
    ] = 0.5,
    batch_faulty_batches: Annotated[
        int | None,
        typer.Option(min=0, help="batch APIs: faults in the first N batches only (default all)"),
    ] = None,
    batch_result_delay_s: Annotated[
        float, typer.Option(min=0, help="batch APIs: a pause after each result line downloaded")
    ] = 0.0,
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions backed by a real local model.

    Fault kinds: rate_limit, server_error, reset, hang, slow_drip, malformed, truncated,
    refusal, wrong; the X-Stillhouse-Fault header forces one on a single request. Limits
    (--max-concurrency, --rpm, --tpm) are enforced as hosted providers do: 429 with
    Retry-After and x-ratelimit-* headers. Also serves Anthropic's Messages API
    (/v1/messages) and both providers' batch APIs (/v1/files + /v1/batches,
    /v1/messages/batches), completing batches in seconds, with --batch-* faults.

    Example: stillhouse teacher serve --backend fixed --max-concurrency 32 --rpm 6000

    Example: stillhouse teacher serve --batch-fail-share 0.05 --batch-faulty-batches 1
    """
    import os

    from stillhouse.servers.teacher import serve
    from stillhouse.servers.teacher.batch_jobs import BatchFaults
    from stillhouse.servers.teacher.limits import LimitsConfig

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env names {api_key_env}, which is not set")
    serve(
        host,
        port,
        backend=backend,
        api_key=api_key,
        faults=faults,
        fault=fault or (),
        seed=seed,
        latency_ms=latency_ms,
        model=model,
        limits=LimitsConfig(max_concurrency, rpm, tpm, limit_window_s, retry_after_s),
        request_log=request_log,
        batch_faults=BatchFaults(
            fail_share=batch_fail_share,
            expire_share=batch_expire_share,
            in_progress_s=batch_in_progress_s,
            faulty_batches=batch_faulty_batches,
            result_delay_s=batch_result_delay_s,
        ),
    )
