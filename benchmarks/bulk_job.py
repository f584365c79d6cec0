"""One bulk job's run time on an idle service, this checkout against another (the same job, alternated).

Usage: python -m benchmarks.bulk_job OTHER_CHECKOUT [--runs 3] [--texts 2000] [--model-dir DIR] [--out FILE]

Each run starts its own service from one checkout (redis-server, `sentiment api`, `sentiment worker`
and `sentiment jobs-worker`, each checkout's defaults; a jobs worker that takes `--priority` gets
`normal`, its best case on a box others load), waits until it is ready, then times one job of
never-seen texts (a fresh key prefix each run) from its POST until GET says `finished`. Runs
alternate between the checkouts (other, this, other, ...), so load from others on the machine
falls on both alike. Writes the times and their medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import rq
from redis import Redis

from benchmarks.machine import describe, git_commit
from benchmarks.processes import running
from benchmarks.workload import CHECKOUT, UniqueTexts, default_shared_dir, load_texts
from sentiment.embedded import embedded_redis, free_port

POLL_S = 0.05


def run_once(checkout: Path, redis_url: str, model_dir: Path, texts: list[str], prefix: str) -> float:
    """Seconds from the job's POST to its `finished`, on a fresh service from `checkout`."""
    port = free_port()
    env = {
        "PYTHONPATH": str(checkout),
        "SENTIMENT_REDIS_URL": redis_url,
        "SENTIMENT_MODEL_DIR": str(model_dir),
        "SENTIMENT_KEY_PREFIX": prefix,
        "SENTIMENT_METRICS_PORT": "0",
        "SENTIMENT_JOBS_METRICS_PORT": "0",
        "SENTIMENT_JOBS_MAX_TEXTS": str(len(texts)),
    }
    cli = ["-P", "-m", "sentiment.cli"]  # -P: the checkout from PYTHONPATH, not the working directory
    jobs = [*cli, "jobs-worker"]
    if "--priority" in (checkout / "sentiment" / "cli.py").read_text():
        jobs += ["--priority", "normal"]
    with running() as procs:
        procs.start([*cli, "api", "--port", str(port)], env)
        procs.start([*cli, "worker"], env)
        procs.start(jobs, env)
        url = f"http://127.0.0.1:{port}"
        procs.wait_ok(f"{url}/ready")
        queue = rq.Queue(f"{prefix}-jobs", connection=Redis.from_url(redis_url))
        while not rq.Worker.count(queue=queue):  # registered once ready (with its model loaded, where it loads one)
            time.sleep(POLL_S)
        with httpx.Client(base_url=url, timeout=30) as client:
            started = time.perf_counter()
            job = client.post("/jobs", json={"text": texts}).json()["job_id"]
            while (status := client.get(f"/jobs/{job}").json()["status"]) not in ("finished", "failed", "canceled"):
                time.sleep(POLL_S)
            elapsed = time.perf_counter() - started
        if status != "finished":
            raise RuntimeError(f"the job ended {status}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the checkout to compare with (its own sources, the same venv)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each checkout (default %(default)s)")
    parser.add_argument("--texts", type=int, default=2000, help="texts in the job (default %(default)s)")
    shared = default_shared_dir()
    parser.add_argument("--model-dir", type=Path, default=shared / "models/distilbert-sst2-small")
    parser.add_argument("--data", type=Path, default=shared / "data/sst2-train.tsv")
    parser.add_argument("--out", type=Path, help="the results file (JSON)")
    args = parser.parse_args(argv)
    pool = UniqueTexts(load_texts(args.data))
    times: dict[str, list[float]] = {"other": [], "this": []}
    with embedded_redis() as redis_url:
        for run in range(args.runs):
            for name, checkout in (("other", args.other), ("this", CHECKOUT)):
                seconds = run_once(checkout, redis_url, args.model_dir, pool.take(args.texts), f"bulk-{name}-{run}")
                times[name].append(seconds)
                print(f"{name} run {run}: {args.texts} texts in {seconds:.2f} s", file=sys.stderr)
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe("cpu"),
        "this": git_commit(),
        "other": git_commit(args.other),
        "model": args.model_dir.name,
        "texts": args.texts,
        "method": "alternated runs (other, this, ...), each a fresh service and a fresh key prefix; "
        "seconds from POST /jobs to GET saying finished",
        "seconds": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "texts_per_s": {name: args.texts / statistics.median(t) for name, t in times.items()},
        "cpus": os.cpu_count(),
    }
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
