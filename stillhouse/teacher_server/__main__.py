"""``python -m stillhouse.teacher_server``: run the local teacher without the full CLI."""

from __future__ import annotations

import argparse
import os

from stillhouse.teacher_server.backends import BACKENDS
from stillhouse.teacher_server.server import serve


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m stillhouse.teacher_server",
        description="Serve the local OpenAI-compatible teacher.",
        epilog="example: python -m stillhouse.teacher_server --backend fixed --fault reset=0.1",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="embedding")
    parser.add_argument("--api-key-env", help="environment variable that holds the API key")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--faults", metavar="PROFILE.yaml", help="fault profile to inject")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=SHARE",
        help="share of requests that get fault KIND (repeatable; overrides the profile)",
    )
    parser.add_argument("--seed", type=int, help="seed of the fault sequence")
    parser.add_argument(
        "--latency-ms", type=float, help="fixed backend's latency (default 200); else added"
    )
    parser.add_argument("--model", metavar="PATH", help="GGUF file for --backend llama")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that variable is not set")
    serve(
        args.host,
        args.port,
        args.backend,
        api_key=api_key,
        log_level=args.log_level,
        faults=args.faults,
        fault=args.fault,
        seed=args.seed,
        latency_ms=args.latency_ms,
        model=args.model,
    )


if __name__ == "__main__":
    main()
