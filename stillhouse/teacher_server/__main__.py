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
        epilog="example: python -m stillhouse.teacher_server --port 8765",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="embedding")
    parser.add_argument("--api-key-env", help="environment variable that holds the API key")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that variable is not set")
    serve(args.host, args.port, args.backend, api_key=api_key, log_level=args.log_level)


if __name__ == "__main__":
    main()
