"""Router latency over HTTP (issue 17): p50 and p99 with the student answering and with the
teacher answering, each beside a reference measured in the same run; one JSON line each.

    python bench/router.py                               # both scenarios, SQLite store
    python bench/router.py --scenario student --rates 500 1000 --seconds 10
    python bench/router.py --scenario teacher --postgres --teacher-requests 2000

Set-up (not timed): 300 BBC articles labeled for triage by the local embedding teacher, a bag
student trained on them (``stillhouse backfill`` and ``stillhouse train``, as a user runs
them), and ``stillhouse route serve RUN`` in its own process. The load comes from another
process: ``--clients`` aiohttp coroutines, each on its own keep-alive connection.

- **student**: unseen BBC articles the student answers itself (the ones the router sends to
  the teacher are set aside first), one per request, as ``POST /v1/predict`` and as the
  teacher's own ``POST /v1/chat/completions``. Each client is paced (open loop: the clients
  together send ``--rates`` requests a second, a latency counted from when a request was due
  whenever the one before it held the client up, so a stall is not hidden), then run closed
  loop (each sends as soon as its answer is back) for the most the router can do. The
  reference is the same uvicorn stack with the same guards, metrics middleware, bearer check
  and body reading, answering a constant: what the router adds is routing (parsing the
  request, the bag student, the answer).
- **teacher**: a copy of the run whose ``router.json`` sends every class to the teacher, so
  each request is a fallback: stored as an item, labeled through the client, governor,
  ledger and checks, and answered. The teacher is the local ``fixed`` backend with
  ``--teacher-latency-ms`` and an in-flight cap under the spec's concurrency, so it pushes
  back with 429s the governor has to learn. Every request is a new document (a repeat would
  be answered from its stored label). The reference is the bare aiohttp loop sending the
  teacher the same prompts at the same concurrency, waiting out each 429.

Each line has ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms``, ``per_s`` (answers a second),
``errors`` and the load process's CPU; ``late_ms_p99`` is how late the paced client sent,
which says whether the client kept up. The final ``summary`` line has the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

TOKEN = "bench-router"
LABELED = 300


# --- the load: runs in its own process (--load CONFIG) ------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _load(config: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    bodies = Path(config["bodies"]).read_bytes().splitlines()
    clients, rate, seconds = config["clients"], config.get("rate"), config["seconds"]
    unique, retry_429 = config.get("unique", False), config.get("retry_429", False)
    headers = {"Content-Type": "application/json", **config.get("headers", {})}
    loop = asyncio.get_running_loop()
    records: list[tuple[float, float, float]] = []  # (due, start counted from, done)
    statuses: Counter[int] = Counter()
    counts = {"rate_limited": 0}
    taken = 0

    def next_body() -> bytes | None:
        nonlocal taken
        if unique and taken >= len(bodies):
            return None
        body = bodies[taken % len(bodies)]
        taken += 1
        return body

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # One request each first, so every connection is open before the clock starts.
        async def warm() -> None:
            async with session.post(config["url"], data=bodies[0], headers=headers) as reply:
                await reply.read()

        if not unique:
            await asyncio.gather(*(warm() for _ in range(clients)))
        began = loop.time() + 0.2
        end = began + seconds

        async def client(i: int) -> None:
            interval = clients / rate if rate else 0.0
            due, previous_done = began + i * interval / clients, 0.0
            while (due if rate else loop.time()) < end:
                if rate:
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                body = next_body()
                if body is None:
                    return
                sent = loop.time()
                while True:
                    async with session.post(config["url"], data=body, headers=headers) as reply:
                        await reply.read()
                        status, reply_headers = reply.status, reply.headers
                    if not (retry_429 and status == 429):
                        break
                    counts["rate_limited"] += 1
                    pause = reply_headers.get("retry-after-ms")
                    await asyncio.sleep(
                        float(pause) / 1000 if pause else float(reply_headers.get("retry-after", 1))
                    )
                done = loop.time()
                statuses[status] += 1
                # Held up by the answer before it, a request's latency counts from when it
                # was due; otherwise from when it was sent (asyncio's timer granularity is
                # the client's, not the server's).
                start = due if rate and previous_done > due else sent
                records.append((due if rate else sent, start, done))
                previous_done = done
                due += interval

        cpu = time.process_time()
        wall = loop.time()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall, cpu = loop.time() - wall, time.process_time() - cpu
    latencies = [(done - start) * 1000 for _, start, done in records]
    late = [(start - due) * 1000 for due, start, _ in records if start >= due]
    ok = sum(n for status, n in statuses.items() if status == 200)
    return {
        "requests": len(records),
        "per_s": round(len(records) / wall, 1),
        "p50_ms": round(_percentile(latencies, 0.5), 3),
        "p90_ms": round(_percentile(latencies, 0.9), 3),
        "p99_ms": round(_percentile(latencies, 0.99), 3),
        "max_ms": round(max(latencies, default=float("nan")), 3),
        "late_ms_p99": round(_percentile(late, 0.99), 3) if rate else None,
        "errors": len(records) - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "client_cpu_share": round(cpu / wall, 3),
        **({"rate_limited": counts["rate_limited"]} if retry_429 else {}),
    }


def load(folder: Path, url: str, bodies: list[bytes], **config: Any) -> dict[str, Any]:
    """Run one load in a process of its own and return its figures."""
    path = folder / "bodies.jsonl"
    path.write_bytes(b"\n".join(bodies))
    spec = folder / "load.json"
    spec.write_text(json.dumps({"url": url, "bodies": str(path), **config}))
    done = subprocess.run(
        [sys.executable, __file__, "--load", str(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the load process failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- the reference server: runs in its own process (--serve-reference PORT) ---------------


def serve_reference(port: int) -> None:
    """The router's server stack answering a constant: the same uvicorn config and guards,
    the same metrics middleware, bearer check and bounded body reading."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from pydantic import SecretStr
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from stillhouse.servers.ingest.metrics import Instrumented
    from stillhouse.servers.requests import BearerTokens, Rejected, read_json
    from stillhouse.servers.router.app import ROUTES
    from stillhouse.servers.serving import ReadLimits, serve_announced, uvicorn_config
    from stillhouse.settings import Settings

    settings = Settings()

    class Metrics:
        registry = CollectorRegistry()
        requests = Counter("requests", "", ("route", "status"), registry=registry)
        latency = Histogram("latency", "", ("route",), registry=registry)

    tokens = BearerTokens.from_settings([SecretStr(TOKEN)], insecure_no_auth=False, what="API")
    answer = {
        "label": "business",
        "confidence": 0.97,
        "answered_by": "student",
        "student_label": "business",
        "student_confidence": 0.97,
    }

    async def constant(request: Request) -> Response:
        try:
            tokens.check(request)
            await read_json(request, settings.api_max_body_bytes, too_large_hint="", depth_hint="")
        except Rejected as exc:
            return exc.response()
        return JSONResponse({"run": "reference", "answers": [answer], "counts": {"student": 1}})

    app = Starlette(
        routes=[
            Route("/v1/predict", constant, methods=["POST"]),
            Route("/v1/chat/completions", constant, methods=["POST"]),
            Route("/healthz", lambda _: JSONResponse({"status": "ok"})),
        ],
        middleware=[Middleware(Instrumented, metrics=Metrics(), routes=ROUTES)],
    )
    limits = ReadLimits(settings.api_read_timeout_s, settings.api_max_connections)
    config = uvicorn_config(
        app, limits, host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    import uvicorn

    asyncio.run(serve_announced(uvicorn.Server(config), "127.0.0.1", "reference"))


# --- set-up and orchestration --------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"stillhouse {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


@contextmanager
def _process(command: list[str], env: dict[str, str], port: int) -> Any:
    from stillhouse.servers.teacher.process import stop_process, wait_ready

    process = subprocess.Popen(command, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout=20)


def _router(env: dict[str, str], run: str) -> Any:
    from stillhouse.servers.teacher.process import free_port

    port = free_port()
    command = [sys.executable, "-m", "stillhouse", "route", "serve", run, "--port", str(port)]
    return _process(command, {**env, "STILLHOUSE_API_TOKENS": TOKEN}, port)


def _reference() -> Any:
    from stillhouse.servers.teacher.process import free_port

    port = free_port()
    return _process(
        [sys.executable, __file__, "--serve-reference", str(port)], dict(os.environ), port
    )


def _teacher_only_copy(env: dict[str, str], db: str) -> str:
    """Train a second run on the same labels and send every class of it to the teacher."""
    import sqlalchemy as sa

    from student_train.routing import ROUTER_FILE

    run = json.loads(_cli(env, "train", "--spec", "triage", "--json"))["run"]
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        out_dir = conn.execute(
            sa.text("SELECT out_dir FROM runs WHERE name = :n"), {"n": run}
        ).scalar_one()
    engine.dispose()
    path = Path(out_dir) / ROUTER_FILE
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["policy"]["always_teacher"] = list(saved["policy"]["labels"])
    path.write_text(json.dumps(saved), encoding="utf-8")
    return run


def _texts() -> list[str]:
    from examples.bbc import iter_bbc

    rows = list(iter_bbc(None))
    labeled = {row["id"] for row in iter_bbc(LABELED)}
    return [f"{row['headline']}\n\n{row['body']}" for row in rows if row["id"] not in labeled]


def _student_texts(base: str, texts: list[str]) -> tuple[list[str], int]:
    """The texts the student answers itself (asking the router about all of them once)."""
    kept, sent = [], 0
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, timeout=300) as client:
        for start in range(0, len(texts), 100):
            batch = texts[start : start + 100]
            reply = client.post("/v1/predict", json={"inputs": batch}, headers=auth)
            reply.raise_for_status()
            for text, answer in zip(batch, reply.json()["answers"], strict=True):
                if answer["answered_by"] == "student":
                    kept.append(text)
                else:
                    sent += 1
    return kept, sent


def _chat_body(spec: Any, text: str) -> bytes:
    from workers.prompt import render_messages

    body = {"model": "teacher", "max_tokens": 64, "messages": render_messages(spec, text)}
    return json.dumps(body).encode()


def _print(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def student_scenario(
    args: argparse.Namespace, folder: Path, env: dict[str, str], run: str
) -> dict[str, Any]:
    from workers.spec import load_spec

    spec = load_spec("triage")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    figures: dict[str, Any] = {}
    with _router(env, run) as router, _reference() as reference:
        texts, to_teacher = _student_texts(router, _texts())
        _print({"student_texts": len(texts), "set_aside_for_the_teacher": to_teacher})
        routes = {
            "predict": ("/v1/predict", [json.dumps({"inputs": [t]}).encode() for t in texts]),
            "chat": ("/v1/chat/completions", [_chat_body(spec, t) for t in texts]),
        }
        for route, (path, bodies) in routes.items():
            for rate in [*args.rates, None]:
                mode = f"paced {rate}/s" if rate else "closed loop"
                for server, base in (("reference", reference), ("router", router)):
                    got = load(
                        folder,
                        base + path,
                        bodies,
                        clients=args.clients,
                        rate=rate,
                        seconds=args.seconds,
                        headers=auth,
                    )
                    line = {"scenario": "student", "route": route, "load": mode, "server": server}
                    _print(line | {"clients": args.clients} | got)
                    figures[f"{route} {mode} {server}"] = got
        with httpx.Client(base_url=router, timeout=30) as client:
            info = client.get("/v1/router", headers=auth).json()["answers"]
        _print({"router_answers": info})
    return figures


def teacher_scenario(
    args: argparse.Namespace, folder: Path, env: dict[str, str], run: str
) -> dict[str, Any]:
    from stillhouse.servers.teacher.process import local_teacher
    from workers.spec import load_spec

    spec = load_spec("triage")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    texts = _texts()
    n = args.teacher_requests
    # A new document each time: the n-th request is article n % len with its number on it.
    documents = [f"{texts[i % len(texts)]}\n\n(request {i})" for i in range(2 * n)]
    teacher_args = [
        "--latency-ms",
        str(args.teacher_latency_ms),
        "--max-concurrency",
        str(args.teacher_max_concurrency),
        "--retry-after-s",
        str(args.teacher_retry_after_s),
    ]
    figures: dict[str, Any] = {}
    with local_teacher("fixed", extra_args=teacher_args) as teacher:
        routed_env = {**env, "STILLHOUSE_TEACHER_BASE_URL": teacher}
        direct = load(
            folder,
            teacher + "/chat/completions",
            [_chat_body(spec, d) for d in documents[n:]],
            clients=args.clients,
            rate=None,
            seconds=args.teacher_seconds,
            unique=True,
            retry_429=True,
        )
        line = {"scenario": "teacher", "server": "teacher directly (bare aiohttp)"}
        _print(line | {"clients": args.clients} | direct)
        figures["direct"] = direct
        httpx.post(teacher.removesuffix("/v1") + "/v1/stats/reset")
        with _router(routed_env, run) as router:
            routed = load(
                folder,
                router + "/v1/predict",
                [json.dumps({"inputs": [d]}).encode() for d in documents[:n]],
                clients=args.clients,
                rate=None,
                seconds=args.teacher_seconds,
                unique=True,
                headers=auth,
            )
            with httpx.Client(base_url=router, timeout=30) as client:
                info = client.get("/v1/router", headers=auth).json()["answers"]
        stats = httpx.get(teacher.removesuffix("/v1") + "/v1/stats").json()
        line = {"scenario": "teacher", "server": "router, every answer the teacher's"}
        _print(line | {"clients": args.clients} | routed)
        _print({"router_answers": info, "teacher_stats": stats})
        figures["routed"] = routed | {"teacher_stats": stats, "answers": info}
    return figures


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("student", "teacher", "both"), default="both")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rates", type=int, nargs="*", default=[100, 200, 500])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--teacher-requests", type=int, default=1500)
    parser.add_argument("--teacher-seconds", type=float, default=30.0)
    parser.add_argument("--teacher-latency-ms", type=float, default=100.0)
    parser.add_argument("--teacher-max-concurrency", type=int, default=16)
    parser.add_argument("--teacher-retry-after-s", type=float, default=0.25)
    parser.add_argument("--postgres", action="store_true", help="a scratch Postgres store")
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--serve-reference", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(_load(json.loads(Path(args.load).read_text())))))
        return 0
    if args.serve_reference:
        serve_reference(args.serve_reference)
        return 0

    from reference import drop_database, scratch_database

    from stillhouse.servers.teacher.process import local_teacher

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        if args.postgres:
            db, scratch = scratch_database(args.admin_url)
            stack.callback(drop_database, args.admin_url, scratch)
        else:
            db = f"sqlite:///{folder}/router.db"
        env = {
            **os.environ,
            "STILLHOUSE_DATABASE_URL": db,
            "STILLHOUSE_BROKER_URL": "",
            "STILLHOUSE_RUNS_DIR": str(folder / "runs"),
        }
        started = time.perf_counter()
        if args.postgres:
            _cli(env, "db", "upgrade")  # an embedded SQLite store migrates itself; Postgres not
        with local_teacher("embedding") as teacher:
            env["STILLHOUSE_TEACHER_BASE_URL"] = teacher
            _cli(env, "backfill", "bbc", "--spec", "triage", "--limit", str(LABELED))
            run = json.loads(_cli(env, "train", "--spec", "triage", "--json"))["run"]
            teacher_run = _teacher_only_copy(env, db)
            _print({"setup_s": round(time.perf_counter() - started, 1), "run": run})
            student = (
                student_scenario(args, folder, env, run)
                if args.scenario in ("student", "both")
                else {}
            )
        teacher = (
            teacher_scenario(args, folder, env, teacher_run)
            if args.scenario in ("teacher", "both")
            else {}
        )
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "store": "postgres" if args.postgres else "sqlite",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for key, got in student.items():
        if key.endswith(" router"):
            ref = student[key.removesuffix(" router") + " reference"]
            summary[key.removesuffix(" router")] = {
                "router_p99_ms": got["p99_ms"],
                "reference_p99_ms": ref["p99_ms"],
                "p99_added_ms": round(got["p99_ms"] - ref["p99_ms"], 3),
                "per_s_ratio": _ratio(got["per_s"], ref["per_s"]),
            }
    if teacher:
        routed, direct = teacher["routed"], teacher["direct"]
        summary["teacher answering"] = {
            "router_p50_ms": routed["p50_ms"],
            "router_p99_ms": routed["p99_ms"],
            "direct_p50_ms": direct["p50_ms"],
            "direct_p99_ms": direct["p99_ms"],
            "p50_added_ms": round(routed["p50_ms"] - direct["p50_ms"], 1),
            "per_s_ratio": _ratio(routed["per_s"], direct["per_s"]),
        }
    _print({"summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
