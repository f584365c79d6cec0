"""Benchmark (5), the ceiling: the service around a model that costs nothing.

The worker runs the null engine (constant answers, no model), so what is measured is the path
around the model: HTTP, the API, Redis, the worker's take, plan and reply. One API process and one
worker, as deployed, at `CLIENTS` closed-loop clients sending never-seen texts: one a request, then
`BULK` a request; then the bare endpoint (FastAPI answering a constant) with the same client, as the
ceiling of any HTTP service here. Each process's CPU time comes from /proc, and the worker's own
accounting (`sentiment_worker_stage_cpu_seconds_total`) splits its CPU by stage.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import closed_loop
from benchmarks.processes import running
from benchmarks.service import measure_app, redis_server, service_env
from benchmarks.workload import UniqueTexts
from sentiment.embedded import free_port

CLIENTS = 128
BULK = 8  # texts a request in the second point
STAGES = ("take", "plan", "forward", "reply")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_cpu(metrics_url: str) -> dict[str, float]:
    """The worker's CPU seconds per stage, from its /metrics."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        for sample in family.samples:
            if sample.name == "sentiment_worker_stage_cpu_seconds_total":
                found[sample.labels["stage"]] = sample.value
    return found


def _take(texts: UniqueTexts, count: int, _: int) -> list[str]:
    return texts.take(count)


def measure(
    model_dir: Path,
    texts: UniqueTexts,
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str, Mapping[str, object]], None],
) -> dict[str, object]:
    """The two service points and the bare endpoint's, with CPU per request and per text."""
    points: list[dict[str, Any]] = []
    with running() as infra, redis_server(infra) as (redis_url, redis_kind), running() as procs:
        env = service_env(redis_url, model_dir, SENTIMENT_ENGINE="null")
        url = f"http://127.0.0.1:{free_port()}"
        metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        api = procs.start(["-m", "sentiment.cli", "api", "--port", url.rsplit(":", 1)[1]], env)
        worker = procs.start(
            ["-m", "sentiment.cli", "worker"],
            {**env, "SENTIMENT_METRICS_PORT": metrics_url.split(":")[2].split("/")[0]},
        )
        procs.wait_ok(metrics_url)
        procs.wait_ok(f"{url}/ready")
        redis_pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
        pids = {"api": api.pid, "worker": worker.pid, "redis": redis_pid}
        for per in (1, BULK):
            cpu_before, stages_before = {k: cpu_seconds(p) for k, p in pids.items()}, stage_cpu(metrics_url)
            load = closed_loop(f"{url}/predict", functools.partial(_take, texts, per), CLIENTS, duration_s, warmup_s)
            cpu = {k: cpu_seconds(p) - cpu_before[k] for k, p in pids.items()}
            stages = {k: v - stages_before.get(k, 0.0) for k, v in stage_cpu(metrics_url).items()}
            # CPU is counted over warm-up and window, requests inside the window only: scale them up.
            requests = max(load.requests * (warmup_s + duration_s) / duration_s, 1.0)
            sent = requests * per
            point: dict[str, object] = {
                "texts_per_request": per,
                **load.as_dict(),
                "api_cpu_us_per_request": round(cpu["api"] / requests * 1e6, 1),
                "worker_cpu_us_per_text": round(cpu["worker"] / sent * 1e6, 1),
                "redis_cpu_us_per_request": round(cpu["redis"] / requests * 1e6, 1),
                "cores": {k: round(v / (warmup_s + duration_s), 3) for k, v in cpu.items()},
                "worker_stage_cpu_us_per_text": {k: round(stages.get(k, 0.0) / sent * 1e6, 1) for k in STAGES},
                "worker_outside_forward_us_per_text": round(
                    sum(v for k, v in stages.items() if k != "forward") / sent * 1e6, 1
                ),
            }
            points.append(point)
            progress("ceiling", point)
    [bare] = measure_app("benchmarks.bare_app:app", {}, texts, [CLIENTS], duration_s, warmup_s, progress)
    single = points[0]
    return {
        "clients": CLIENTS,
        "redis": redis_kind,
        "points": points,
        "bare": bare,
        "ratio_to_bare": round(float(single["requests_per_s"]) / cast(float, bare["requests_per_s"]), 3),
    }
