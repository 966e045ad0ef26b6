"""`stillhouse serve`: the ingest API."""

from __future__ import annotations

from typing import Annotated

import typer

from stillhouse.cli.root import app, settings

__all__ = ["serve"]


@app.command()
def serve(
    spec: Annotated[
        list[str],
        typer.Option(
            "--spec", "-s", metavar="SPEC", help="spec file or bundled name to accept (repeatable)"
        ),
    ],
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="accept requests without a token (loopback only)"),
    ] = False,
) -> None:
    """Serve the ingest API: POST /v1/items stores live samples as pending items.

    Tokens come from STILLHOUSE_API_TOKENS (comma-separated). Labeling is done by
    `stillhouse worker` processes; GET /healthz and GET /metrics are open.

    Example: STILLHOUSE_API_TOKENS=s3cret stillhouse serve --spec triage --port 8080
    """
    from stillhouse.servers.ingest.server import serve as serve_api

    serve_api(
        settings(),
        spec,
        host=host,
        port=port,
        workers=workers,
        insecure_no_auth=insecure_no_auth,
    )
