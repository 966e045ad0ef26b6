"""Teacher client throughput against the local `fixed` backend; one JSON line per concurrency.

    python bench/teacher_throughput.py --concurrency 16 64 --latency-ms 200 --requests 5000
    python bench/teacher_throughput.py --concurrency 64 --requests 2000 --server-max-concurrency 32

Runs the same client code the pipeline uses: requests built by `build_request`, the cache
looked up in the database once per batch (`cached_responses`), the governor (Redis when
STILLHOUSE_BROKER_URL is set, in-process otherwise) with its adaptive slots, and
`TeacherClient` over the configured httpx transport. The teacher may enforce a hosted
provider's limits (--server-max-concurrency, --server-rpm, --server-tpm); the bound is what
it allows (concurrency or its cap over the latency, or its rpm). ``reference`` is the bare
aiohttp loop of `bench/reference.py` against the same server in the same run. Client CPU is
this process's CPU time. Exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import httpx
from reference import add_server_options, aiohttp_reference, capped_bound, server_args

from stillhouse.servers.teacher.process import local_teacher
from stillhouse.settings import Settings
from storage.migrate import upgrade
from storage.results import cached_responses
from storage.session import make_engine, make_sessionmaker
from workers.governor import LocalGovernor, RedisGovernor, governor_key, limits_of, shared_redis
from workers.loop import event_loop_factory
from workers.spec import TeacherConfig, load_spec
from workers.teacher import TeacherClient, build_request, make_http_client, teacher_key


async def _run(
    overlap: int,
    config: TeacherConfig,
    sessions: Any,
    requests: int,
    batch: int,
    settings: Settings,
) -> dict[str, Any]:
    spec = load_spec("triage")
    redis = None
    if settings.broker_url:
        redis = shared_redis(settings.broker_url)
        governor: Any = RedisGovernor(redis, governor_key(config) + ":bench", limits_of(config))
    else:
        governor = LocalGovernor(limits_of(config))
    key = teacher_key(config)
    http = make_http_client(config, api_key=key, transport=settings.http_transport)
    client = TeacherClient(config, http, api_key=key, governor=governor)
    outcomes: list[Any] = []
    starts = list(range(0, requests, batch))

    async def lane(first: int) -> None:
        # Batches as the pipeline handles them: build requests, one cache lookup, then the
        # calls; ``overlap`` lanes keep the client busy across batch boundaries.
        for start in starts[first::overlap]:
            reqs = [
                build_request(
                    config,
                    [{"role": "user", "content": f"doc {i}\n<document>\nticket {i}\n</document>"}],
                    spec.output_schema,
                    "bench",
                )
                for i in range(start, min(requests, start + batch))
            ]
            with sessions() as session:
                cached = cached_responses(session, [r.request_hash for r in reqs])
            todo = [r for r in reqs if r.request_hash not in cached]
            outcomes.extend(await asyncio.gather(*(client.complete(r) for r in todo)))

    gc.freeze()  # as LabelRuntime does: start-up objects never need collecting again
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane(k) for k in range(overlap)))
    failed = sum(1 for o in outcomes if o.body is None)
    attempts = sum(len(o.attempts) for o in outcomes)
    errors = Counter(a.error_kind for o in outcomes for a in o.attempts if a.error_kind)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.aclose()
    if redis is not None:
        await redis.aclose()
    return {
        "wall": wall,
        "cpu": cpu,
        "failed": failed,
        "attempts": attempts,
        "errors": dict(errors),
    }


def _loop_run(coro: Any) -> Any:
    # The same loop the pipeline's runtime uses (uvloop when installed).
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="requests per cache lookup and gather (default 2 x concurrency)",
    )
    parser.add_argument("--overlap", type=int, default=2, help="batches in flight at once")
    add_server_options(parser)
    args = parser.parse_args()
    settings = Settings()
    failed_any = False
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_teacher("fixed", extra_args=server_args(args)) as base_url,
    ):
        url = settings.database_url if not settings.is_sqlite else f"sqlite:///{tmp}/b.db"
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        for concurrency in args.concurrency:
            reference = asyncio.run(aiohttp_reference(base_url, concurrency, args.requests))
            httpx.post(f"{base_url}/stats/reset", timeout=5).raise_for_status()
            config = TeacherConfig(
                model="fixed",
                base_url=base_url,
                concurrency=concurrency,
                max_retries=2,
                timeout_s=30,
            )
            # Batches as the pipeline sends them: several per concurrency slot.
            result = _loop_run(
                _run(
                    args.overlap,
                    config,
                    sessions,
                    args.requests,
                    args.batch or concurrency * 2,
                    settings,
                )
            )
            bound = capped_bound(args, concurrency)
            rate = args.requests / result["wall"]
            served = httpx.get(f"{base_url}/stats", timeout=5).json()
            reference["share_of_bound"] = round(reference["per_s"] / bound, 3)
            print(
                json.dumps(
                    {
                        "concurrency": concurrency,
                        "overlap": args.overlap,
                        "requests": args.requests,
                        "latency_ms": args.latency_ms,
                        "requests_per_s": round(rate, 1),
                        "bound_per_s": round(bound, 1),
                        "share_of_bound": round(rate / bound, 3),
                        "share_of_reference": round(rate / reference["per_s"], 3),
                        "reference": reference,
                        "teacher_429s": served["rate_limited"],
                        "server_limits": {
                            "max_concurrency": args.server_max_concurrency,
                            "rpm": args.server_rpm,
                            "tpm": args.server_tpm,
                        },
                        "client_cpu_ms_per_call": round(result["cpu"] * 1000 / args.requests, 3),
                        "failed": result["failed"],
                        "attempts": result["attempts"],
                        "errors": result["errors"],
                        "transport": settings.http_transport,
                        "governor": "redis" if settings.broker_url else "local",
                        "database": "postgresql" if url.startswith("postgresql") else "sqlite",
                    }
                ),
                flush=True,
            )
            failed_any = failed_any or result["failed"] > 0
        engine.dispose()
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
