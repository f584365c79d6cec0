"""Benchmarks (3) and (4): this service end to end, and its cache-hit path against a bare endpoint.

Real processes as deployed: redis-server on a free port (fakeredis in its own process where
redis-server is missing), `sentiment api` and `sentiment worker` as separate processes.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from benchmarks.batch_stats import WorkerCounters, between
from benchmarks.loadgen import closed_loop
from benchmarks.processes import Processes, running, uvicorn_args
from benchmarks.workload import UniqueTexts
from sentiment.embedded import embedded_redis, free_port

KEY_PREFIX = "bench"
CACHED_TEXTS = 64  # distinct texts the all-hit requests cycle through
_FAKE_REDIS = (
    "import sys; from fakeredis import TcpFakeServer; "
    "TcpFakeServer(('127.0.0.1', int(sys.argv[1])), server_type='redis').serve_forever()"
)


@contextlib.contextmanager
def redis_server(procs: Processes) -> Iterator[tuple[str, str]]:
    """(URL, kind) of a Redis for this run, in a process of its own either way."""
    if shutil.which("redis-server"):
        with embedded_redis() as url:
            yield url, "redis-server"
        return
    port = free_port()
    procs.start(["-c", _FAKE_REDIS, str(port)], {})
    url = f"redis://127.0.0.1:{port}/0"
    give_up = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.1)
    yield url, "fakeredis"


def measure(
    model_dir: Path, device: str, texts: UniqueTexts, concurrencies: list[int], cache_concurrency: int | None,
    duration_s: float, warmup_s: float,
) -> dict[str, object]:
    """(3) at each concurrency with never-seen texts; then (4), all-hit requests, when asked."""
    with running() as procs, redis_server(procs) as (redis_url, redis_kind):
        port, metrics_port = free_port(), free_port()
        env = {
            "SENTIMENT_REDIS_URL": redis_url, "SENTIMENT_MODEL_DIR": str(model_dir), "SENTIMENT_DEVICE": device,
            "SENTIMENT_KEY_PREFIX": KEY_PREFIX, "SENTIMENT_METRICS_PORT": str(metrics_port),
            "SENTIMENT_LOG_LEVEL": "WARNING",
        }
        url = f"http://127.0.0.1:{port}"
        procs.start(["-m", "sentiment.cli", "api", "--port", str(port)], env)
        procs.start(["-m", "sentiment.cli", "worker"], env)
        procs.wait_ok(f"{url}/ready")
        counters = WorkerCounters(f"http://127.0.0.1:{metrics_port}/metrics", redis_url, KEY_PREFIX)
        points = []
        for concurrency in concurrencies:
            before = counters.snapshot()
            load = closed_loop(f"{url}/predict", lambda _: texts.take(1), concurrency, duration_s, warmup_s)
            points.append({**load.as_dict(), **between(before, counters.snapshot())})
        out: dict[str, object] = {"redis": redis_kind, "points": points}
        if cache_concurrency:
            cached = texts.take(CACHED_TEXTS)
            httpx.post(f"{url}/predict", json={"text": cached}, timeout=60).raise_for_status()
            hits = closed_loop(
                f"{url}/predict", lambda i: [cached[i % CACHED_TEXTS]], cache_concurrency, duration_s, warmup_s
            )
            out["cache_hits"] = hits.as_dict()
    return out


def measure_app(app: str, env: dict[str, str], texts: UniqueTexts, concurrencies: list[int],
                duration_s: float, warmup_s: float) -> list[dict[str, object]]:
    """A single-process benchmark subject (the naive baseline, the bare endpoint) under uvicorn."""
    with running() as procs:
        port = free_port()
        procs.start(uvicorn_args(app, port), {"SENTIMENT_LOG_LEVEL": "WARNING", **env})
        procs.wait_ok(f"http://127.0.0.1:{port}/health")
        return [
            closed_loop(f"http://127.0.0.1:{port}/predict", lambda _: texts.take(1), c, duration_s, warmup_s).as_dict()
            for c in concurrencies
        ]
