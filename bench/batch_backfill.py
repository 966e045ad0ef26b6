"""A BBC backfill through the providers' batch APIs (issue 18), as a user runs it: the CLI
(``stillhouse backfill bbc --spec S --mode batch``) against the local teacher, for the OpenAI
Batch API and Anthropic's Message Batches, with faults injected in the first batch; prints one
JSON line per run and a summary.

    python bench/batch_backfill.py                          # both protocols, the whole corpus
    python bench/batch_backfill.py --limit 500 --providers openai

Each run records the wall time, the spend on the ledger against ``stillhouse estimate``'s live
and batch figures (made before anything is spent), and what the faults did (requests failed
and expired in the first batch, sent again in the next). The reference is measured in the same
run: the same corpus labeled live (``--mode live``) on a fresh store against the same server,
so the cost ratio (batch spend over live spend) and the time ratio hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from stillhouse.servers.teacher.process import local_teacher

ROOT = Path(__file__).resolve().parent.parent


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "stillhouse", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=3 * 3600,
    )
    if done.returncode not in (0, 3):
        raise SystemExit(f"stillhouse {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def _spec(folder: Path, provider: str, mode: str) -> Path:
    body = yaml.safe_load((ROOT / "examples/specs/triage.yaml").read_text())
    body["name"] = f"triage-{provider}"
    body["teacher"]["provider"] = provider
    # The bundled spec holds labels without a record to a calibrated threshold: a batch run
    # labels everything at once, as a live run does.
    body["checks"].pop("target_accuracy", None)
    body["labeling"] = {"mode": mode, "batch": {"poll_s": 0.5}}
    path = folder / f"{provider}-{mode}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _one(teacher: str, folder: Path, provider: str, mode: str, limit: int | None) -> dict[str, Any]:
    db = folder / f"{provider}-{mode}.db"
    env = {
        **os.environ,
        "STILLHOUSE_DATABASE_URL": f"sqlite:///{db}",
        "STILLHOUSE_BROKER_URL": "",
        "STILLHOUSE_TEACHER_BASE_URL": teacher,
        "STILLHOUSE_BATCH_POLL_S": "0.5",
    }
    spec = str(_spec(folder, provider, mode))
    limited = ["--limit", str(limit)] if limit else []
    estimate = _cli(env, "estimate", "bbc", "--spec", spec, *limited)
    httpx.post(f"{teacher}/stats/reset")
    started = time.perf_counter()
    result = _cli(env, "backfill", "bbc", "--spec", spec, "--mode", mode, *limited)
    wall = time.perf_counter() - started
    status = _cli(env, "status")
    served = httpx.get(f"{teacher}/stats").json()
    line: dict[str, Any] = {
        "provider": provider,
        "mode": mode,
        "items": status["items"],
        "by_state": {k: v for k, v in status["by_state"].items() if v},
        "wall_s": round(wall, 1),
        "spend_usd": round(status["spend_usd"], 6),
        "estimate_live_usd": estimate["cost_usd"],
        "estimate_batch_usd": estimate["batch"]["cost_usd"],
        "teacher_accuracy": result.get("teacher_accuracy"),
        "server_live_requests": served["requests"],
        "server_batch": served.get("batch"),
    }
    if mode == "batch":
        batches = _cli(env, "batches")
        line["batches"] = [
            {k: b[k] for k in ("requests", "succeeded", "failed", "expired", "spent_usd")}
            for b in reversed(batches)
        ]
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default="openai,anthropic")
    parser.add_argument("--limit", type=int, default=None, help="BBC articles (default: all)")
    parser.add_argument("--fail-share", type=float, default=0.05)
    parser.add_argument("--expire-share", type=float, default=0.03)
    args = parser.parse_args()
    faults = ["--batch-fail-share", str(args.fail_share)]
    faults += ["--batch-expire-share", str(args.expire_share), "--batch-faulty-batches", "1"]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for provider in args.providers.split(","):
            # A fresh server per provider: its first batch is the faulty one.
            with local_teacher("embedding", extra_args=faults) as teacher:
                for mode in ("batch", "live"):
                    line = _one(teacher, folder, provider, mode, args.limit)
                    print(json.dumps(line), flush=True)
                    lines.append(line)
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for provider in args.providers.split(","):
        batch = next(x for x in lines if x["provider"] == provider and x["mode"] == "batch")
        live = next(x for x in lines if x["provider"] == provider and x["mode"] == "live")
        summary[provider] = {
            "batch_wall_s": batch["wall_s"],
            "live_wall_s": live["wall_s"],
            "cost_ratio_batch_to_live": round(batch["spend_usd"] / live["spend_usd"], 4)
            if live["spend_usd"]
            else None,
            "batch_spend_vs_batch_estimate": round(
                batch["spend_usd"] / batch["estimate_batch_usd"], 3
            )
            if batch["estimate_batch_usd"]
            else None,
        }
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
