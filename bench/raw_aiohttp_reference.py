"""Reference point: a bare aiohttp client against the same `fixed` backend; prints JSON.

    python bench/raw_aiohttp_reference.py --concurrency 64 --requests 5000

No httpx, no governor, no cache: what the teacher client's overhead is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from stillhouse.localteacher import local_teacher

BODY = {
    "model": "fixed",
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


async def _run(url: str, concurrency: int, requests: int) -> tuple[float, float]:
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with semaphore, session.post(f"{url}/chat/completions", json=BODY) as reply:
                await reply.read()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    with local_teacher("fixed", extra_args=["--latency-ms", str(args.latency_ms)]) as url:
        wall, cpu = asyncio.run(_run(url, args.concurrency, args.requests))
    bound = args.concurrency / (args.latency_ms / 1000)
    print(
        json.dumps(
            {
                "client": "raw aiohttp",
                "concurrency": args.concurrency,
                "requests": args.requests,
                "requests_per_s": round(args.requests / wall, 1),
                "bound_per_s": bound,
                "share_of_bound": round(args.requests / wall / bound, 3),
                "client_cpu_ms_per_call": round(cpu * 1000 / args.requests, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
