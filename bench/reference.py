"""The reference every throughput bench prints beside its own figure: a bare aiohttp loop.

``C`` coroutines post requests to the same server the bench measures, and each one that gets
a 429 waits out its ``retry-after-ms`` (or ``Retry-After``, 1 s when absent) and asks again:
no httpx, no governor, no database. Measured in the same run against the same limits, it is
what a figure is divided by, so a ratio holds on a noisy machine.

    python bench/reference.py --concurrency 64 --requests 2000 --server-max-concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import aiohttp
from sqlalchemy import create_engine, text

BODY: dict[str, Any] = {
    "model": "fixed",
    "max_tokens": 64,
    "messages": [
        {
            "role": "user",
            "content": "<labels>\n- a: a\n- b: b\n</labels>\n<document>\nticket\n</document>",
        }
    ],
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "t",
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
                "required": ["label"],
            },
        },
    },
}


def _wait_of(headers: Any) -> float:
    precise = headers.get("retry-after-ms")
    if precise is not None:
        return float(precise) / 1000
    return float(headers.get("retry-after", 1))


async def aiohttp_reference(url: str, concurrency: int, requests: int) -> dict[str, Any]:
    """Send ``requests`` with ``concurrency`` in flight, waiting out every 429."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)
    counts = {"attempts": 0, "rate_limited": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                while True:
                    counts["attempts"] += 1
                    async with session.post(f"{url}/chat/completions", json=BODY) as reply:
                        await reply.read()
                        if reply.status != 429:
                            break
                        counts["rate_limited"] += 1
                        wait = _wait_of(reply.headers)
                    await asyncio.sleep(wait)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "client": "bare aiohttp, waits out each 429",
        "requests": requests,
        "seconds": round(wall, 2),
        "per_s": round(requests / wall, 1),
        "client_cpu_ms_per_call": round(cpu * 1000 / requests, 3),
        **counts,
    }


def server_args(args: argparse.Namespace) -> list[str]:
    """The local teacher's flags for the limits a bench asked for."""
    extra = ["--latency-ms", str(args.latency_ms)]
    for flag, value in (
        ("--max-concurrency", args.server_max_concurrency),
        ("--rpm", args.server_rpm),
        ("--tpm", args.server_tpm),
    ):
        if value:
            extra += [flag, str(value)]
    return [*extra, "--retry-after-s", str(args.server_retry_after_s)]


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The teacher-side limits every throughput bench can measure against."""
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument(
        "--server-max-concurrency", type=int, default=None, help="the teacher's in-flight cap"
    )
    parser.add_argument("--server-rpm", type=int, default=None, help="the teacher's rpm cap")
    parser.add_argument("--server-tpm", type=int, default=None, help="the teacher's tpm cap")
    parser.add_argument(
        "--server-retry-after-s", type=float, default=1.0, help="Retry-After over the cap"
    )


def capped_bound(args: argparse.Namespace, concurrency: int) -> float:
    """Items per second the teacher allows at most: the client's concurrency, the in-flight
    cap and the rpm cap, whichever binds."""
    in_flight = min(concurrency, args.server_max_concurrency or concurrency)
    bound = in_flight / (args.latency_ms / 1000)
    if args.server_rpm:
        bound = min(bound, args.server_rpm / 60)
    return bound


def scratch_database(admin_url: str) -> tuple[str, str]:
    """A new, empty Postgres database beside ``admin_url``'s: its URL and its name."""
    name = f"stillhouse_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", name


def drop_database(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def main() -> int:
    from stillhouse.servers.teacher.process import local_teacher

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    add_server_options(parser)
    args = parser.parse_args()
    with local_teacher("fixed", extra_args=server_args(args)) as url:
        result = asyncio.run(aiohttp_reference(url, args.concurrency, args.requests))
    bound = capped_bound(args, args.concurrency)
    result.update(bound_per_s=round(bound, 1), share_of_bound=round(result["per_s"] / bound, 3))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
