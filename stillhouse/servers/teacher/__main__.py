"""``python -m stillhouse.servers.teacher``: the same command as ``stillhouse teacher serve``.

One command line for the local teacher: this entry point hands its arguments to the CLI's
``teacher serve`` (so every option, the rate limits included, is the same in both).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run ``stillhouse teacher serve`` with these arguments."""
    from stillhouse.cli import app

    app(["teacher", "serve", *(sys.argv[1:] if argv is None else argv)], prog_name="stillhouse")


if __name__ == "__main__":
    main()
