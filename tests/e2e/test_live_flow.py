"""Live samples end to end, every part a real process: a producer posts rows to `stillhouse
serve`, `stillhouse worker --beat` dispatches and labels them with the real local teacher."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from support import triage_body
from support.faultkit import Proc, all_final, assert_clean, free_port, wait_for

from stillhouse.client import StillhouseClient
from stillhouse.servers.teacher.process import local_teacher

TOKEN = "live-flow-token-0123456789"
ITEMS = 24

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def _spec(tmp_path: Path) -> Path:
    body = triage_body()
    body["name"] = "live_triage"
    body["labeling"] = {"batch_size": 8, "lease_s": 30, "max_attempts": 5}
    body["checks"]["require_known_good_match"] = False
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _rows(n: int) -> list[dict[str, str]]:
    topics = ["sport", "business", "tech", "politics"]
    return [
        {
            "id": f"live-{i}",
            "headline": f"Report {i}",
            "body": f"Live sample number {i} about {topics[i % 4]} and what happened next.",
            "queue": topics[i % 4],
        }
        for i in range(n)
    ]


def test_rows_posted_to_the_api_are_dispatched_and_labeled(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    spec = _spec(tmp_path)
    port = free_port()
    with local_teacher("fixed", extra_args=["--latency-ms", "50"]) as teacher:
        env = {
            "STILLHOUSE_DATABASE_URL": postgres_url,
            "STILLHOUSE_BROKER_URL": redis_url,
            "STILLHOUSE_TEACHER_BASE_URL": teacher,
            "STILLHOUSE_API_TOKENS": TOKEN,
            "STILLHOUSE_DISPATCH_INTERVAL_S": "0.3",
        }
        args = ["serve", "--spec", str(spec), "--host", "127.0.0.1", "--port", str(port)]
        api = Proc(env, tmp_path / "api.log", *args)
        worker = Proc(env, tmp_path / "worker.log", "worker", "--beat", "--loglevel", "INFO")
        root = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _healthy(root), 60, f"the API to answer\n{api.tail()}")
            with StillhouseClient(root, TOKEN) as client:
                first = client.submit("live_triage", _rows(ITEMS))
                again = client.submit("live_triage", _rows(ITEMS)[:4])
            assert first.counts["inserted"] == ITEMS, first.counts
            assert again.counts["duplicate"] == 4
            wait_for(all_final(postgres_url, ITEMS), 90, f"every item labeled\n{worker.tail()}")
        finally:
            worker.stop()
            api.stop()
        assert_clean(postgres_url, teacher, ITEMS, lost_at_most=0)


def _healthy(root: str) -> bool:
    try:
        return httpx.get(f"{root}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
