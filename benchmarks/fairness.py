"""Benchmark (6), fairness: a quiet client beside a flood.

One API (API keys on) and one worker on the bench's model. A flood client sends `FLOOD_TEXTS`
never-seen texts a request on `FLOOD_CONNECTIONS` connections; a quiet client one text on one
connection. Three points: the quiet client alone; both under ONE key, which is the single FIFO
queue (clients are told apart by key); both under their own keys, which the worker serves in turn
(`batcher.plan.Window`). The target: the quiet client's p99 beside the flood at most its p99 alone
plus one full batch's forward, and the total throughput within noise of the single queue. A full
batch is `max_batch_size` texts; its forward time is the flood's mean forward scaled from the mean
texts a forward to that (a CPU forward costs about its tokens at these sizes). The quiet text rides in
a forward with the flood's texts: beside the flood it waits for the lanes' running forwards, then
its own forward is a full one, where alone it was one text's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.batch_stats import WorkerCounters, between
from benchmarks.loadgen import Load, LoadResult, together
from benchmarks.processes import running
from benchmarks.service import KEY_PREFIX, redis_server, service_env
from benchmarks.workload import UniqueTexts
from sentiment.embedded import free_port

FLOOD_CONNECTIONS = 24
FLOOD_TEXTS = 4
FLOOD_KEY, QUIET_KEY = "bench-flood-client-key-0001", "bench-quiet-client-key-0002"


def _take(texts: UniqueTexts, count: int, _: int) -> list[str]:
    return texts.take(count)


def measure(
    model_dir: Path,
    device: str,
    texts: UniqueTexts,
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str, Mapping[str, object]], None],
    worker_env: dict[str, str],
    max_batch_size: int,
) -> dict[str, object]:
    """The three points, and the target's numbers."""
    quiet = Load(functools.partial(_take, texts, 1), 1, {"X-API-Key": QUIET_KEY})
    flood_as = lambda key: Load(functools.partial(_take, texts, FLOOD_TEXTS), FLOOD_CONNECTIONS, {"X-API-Key": key})  # noqa: E731
    with running() as infra, redis_server(infra) as (redis_url, redis_kind), running() as procs:
        env = service_env(redis_url, model_dir, SENTIMENT_DEVICE=device, SENTIMENT_API_KEYS=f"{FLOOD_KEY},{QUIET_KEY}")
        url = f"http://127.0.0.1:{free_port()}"
        metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        procs.start(["-m", "sentiment.cli", "api", "--port", url.rsplit(":", 1)[1]], env)
        procs.start(
            ["-m", "sentiment.cli", "worker"],
            {**env, **worker_env, "SENTIMENT_METRICS_PORT": metrics_url.split(":")[2].split("/")[0]},
        )
        procs.wait_ok(metrics_url)
        procs.wait_ok(f"{url}/ready")  # a worker serves
        counters = WorkerCounters([metrics_url], redis_url, KEY_PREFIX)
        points: dict[str, dict[str, Any]] = {}
        for name, loads in (
            ("quiet_alone", [quiet]),
            ("one_queue", [flood_as(QUIET_KEY), quiet]),  # one key: one client, first come first served
            ("fair", [flood_as(FLOOD_KEY), quiet]),
        ):
            before = counters.snapshot()
            results: list[LoadResult] = together(f"{url}/predict", loads, duration_s, warmup_s)
            *flood, alone = results
            points[name] = {
                "quiet": alone.as_dict(),
                **({"flood": flood[0].as_dict()} if flood else {}),
                "texts_per_s": round(sum(r.texts_per_s for r in results), 2),
                **between(before, counters.snapshot()),
            }
            progress("fairness", {"point": name, "quiet_p99_ms": alone.p99_ms, **points[name]})
    fair = points["fair"]
    forward_ms = fair["mean_forward_ms"] * max_batch_size / fair["mean_batch_size"] if fair["mean_forward_ms"] else None
    alone_p99, fair_p99 = points["quiet_alone"]["quiet"]["p99_ms"], fair["quiet"]["p99_ms"]
    return {
        "redis": redis_kind,
        "flood": {"connections": FLOOD_CONNECTIONS, "texts_per_request": FLOOD_TEXTS},
        "points": points,
        "full_batch_forward_ms": round(forward_ms, 2) if forward_ms else None,
        "quiet_p99_allowed_ms": round(alone_p99 + forward_ms, 2) if alone_p99 and forward_ms else None,
        "quiet_p99_ms": fair_p99,
        "throughput_ratio_to_one_queue": round(points["fair"]["texts_per_s"] / points["one_queue"]["texts_per_s"], 3)
        if points["one_queue"]["texts_per_s"]
        else None,
    }
