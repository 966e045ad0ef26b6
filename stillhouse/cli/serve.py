"""`stillhouse serve` (the ingest API) and `stillhouse route` (the router)."""

from __future__ import annotations

from typing import Annotated

import typer

from stillhouse.cli.root import JsonOpt, app, err, route_app, settings
from stillhouse.output import print_json

__all__ = ["route_predict", "route_serve", "serve"]


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


@route_app.command("serve")
def route_serve(
    run: Annotated[
        str, typer.Argument(help="a finished classification run (`stillhouse runs list`)")
    ],
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8090,
    store: Annotated[
        bool | None,
        typer.Option(
            "--store/--no-store",
            help="keep the teacher's fallback answers for training (default: the spec's "
            "router.store_fallbacks, true)",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="accept requests without a token (loopback only)"),
    ] = False,
) -> None:
    """Serve a run's student with the teacher as fallback, in the teacher's own protocol.

    POST /v1/chat/completions takes what the application sends the teacher and answers in
    the same shape (switch by changing the base URL); POST /v1/predict takes
    {"inputs": [TEXT or ROW, ...]}. The student answers when its calibrated confidence clears
    the run's thresholds (router.json); otherwise the teacher does, through the labeling
    pipeline, and its answer is stored as an item and label of the spec. Tokens as for
    `stillhouse serve` (STILLHOUSE_API_TOKENS); GET /healthz and GET /metrics are open.

    Example: STILLHOUSE_API_TOKENS=s3cret stillhouse route serve triage-v1-20261203-101500
    """
    from stillhouse.servers.router.server import serve as serve_router

    serve_router(
        settings(), run, host=host, port=port, insecure_no_auth=insecure_no_auth, store=store
    )


@route_app.command("predict")
def route_predict(
    run: Annotated[str, typer.Argument(help="a finished classification run")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="documents to answer (else JSON lines on stdin)")
    ] = None,
    store: Annotated[
        bool | None,
        typer.Option("--store/--no-store", help="keep the teacher's answers for training"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer documents as `route serve` would, from the command line: each text given, or
    each line on stdin (a JSON string or source row, or plain text).

    Example: stillhouse route predict triage-v1-20261203-101500 "Stocks fell sharply today"
    """
    import json
    import sys

    from stillhouse.output import show_routed
    from stillhouse.router import Router

    inputs: list[object] = list(texts or [])
    if not inputs:
        for line in sys.stdin:
            if line.strip():
                try:
                    inputs.append(json.loads(line))
                except ValueError:
                    inputs.append(line.rstrip("\n"))
    with Router.open(settings(), run, store=store) as router:
        answers = [answer.as_json() for answer in router.predict(inputs)]
    if as_json:
        print_json({"run": run, "answers": answers})
    else:
        show_routed(answers, err)
    if answers and all(a["answered_by"] == "none" for a in answers):
        raise typer.Exit(2)
