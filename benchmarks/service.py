"""Benchmarks (3) and (4): this service end to end, and its cache-hit path against a bare endpoint.

Real processes as deployed: redis-server on a free port (fakeredis in its own process where
redis-server is missing), `sentiment api` and `sentiment worker` as separate processes.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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
WARM_TRIES = 10  # the previous point may have left a backlog: a warm-up request can time out (504)
_FAKE_REDIS = (
    "import sys; from fakeredis import TcpFakeServer; "
    "TcpFakeServer(('127.0.0.1', int(sys.argv[1])), server_type='redis').serve_forever()"
)


@dataclass(frozen=True)
class Reference:
    """The limit at its best batch size (`rate()`: sentences/s), measured again right before and
    after each of `rounds` saturation points: this box's speed drifts by tens of percent within
    minutes (other tenants), and a ratio of numbers taken minutes apart would measure that drift."""

    rate: Callable[[], float]
    batch_size: int
    rounds: int


def service_env(redis_url: str, model_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a benchmark's service processes: this run's Redis and model, the bench's key
    prefix, quiet logs, no gRPC port (APIs run side by side), and `settings` (SENTIMENT_* variables) on top."""
    return {
        "SENTIMENT_REDIS_URL": redis_url,
        "SENTIMENT_GRPC_PORT": "0",
        "SENTIMENT_MODEL_DIR": str(model_dir),
        "SENTIMENT_KEY_PREFIX": KEY_PREFIX,
        "SENTIMENT_LOG_LEVEL": "WARNING",
        **settings,
    }


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
    model_dir: Path,
    device: str,
    texts: UniqueTexts,
    concurrencies: list[int],
    cache_concurrency: int | None,
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str, Mapping[str, object]], None],
    reference: Reference | None = None,
    api_processes: int = 1,
    workers: int = 1,
    worker_env: dict[str, str] | None = None,
    texts_per_request: int = 1,
) -> dict[str, object]:
    """(3) at each concurrency with never-seen texts (`texts_per_request` a request), then the saturation rounds against
    `reference` when given; then (4), all-hit requests, when asked.

    `api_processes` API replicas (as API pods behind a Kubernetes Service) share `workers` workers
    (each started with `worker_env` added); the client's connections are spread over the APIs. One
    API suits 2 cores; a GPU worker outruns one.
    """
    # Redis outlives the service processes, so they stop without reconnect noise.
    with running() as infra, redis_server(infra) as (redis_url, redis_kind), running() as procs:
        env = service_env(redis_url, model_dir, SENTIMENT_DEVICE=device)
        urls = [f"http://127.0.0.1:{free_port()}" for _ in range(api_processes)]
        for url in urls:
            procs.start(["-m", "sentiment.cli", "api", "--port", url.rsplit(":", 1)[1]], env)
        # Each worker's /metrics (batch size, queue wait) on a port of its own.
        metrics_ports = [free_port() for _ in range(workers)]
        for port in metrics_ports:
            procs.start(
                ["-m", "sentiment.cli", "worker"], {**env, **(worker_env or {}), "SENTIMENT_METRICS_PORT": str(port)}
            )
        metrics_urls = [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports]
        for url in [*metrics_urls, *(f"{url}/ready" for url in urls)]:  # every worker has loaded its model
            procs.wait_ok(url)
        predict = [f"{url}/predict" for url in urls]
        counters = WorkerCounters(metrics_urls, redis_url, KEY_PREFIX)
        fresh = lambda _: texts.take(texts_per_request)  # noqa: E731
        points = []
        for concurrency in concurrencies:
            before = counters.snapshot()
            load = closed_loop(predict, fresh, concurrency, duration_s, warmup_s)
            points.append({**load.as_dict(), **between(before, counters.snapshot())})
            progress("service", points[-1])
        out: dict[str, object] = {"redis": redis_kind, "workers": workers, "points": points}
        if reference and concurrencies:
            out["saturation"] = _saturation(
                lambda: closed_loop(predict, fresh, max(concurrencies), duration_s, warmup_s).texts_per_s,
                max(concurrencies),
                reference,
                progress,
            )
        if cache_concurrency:
            cached = texts.take(CACHED_TEXTS)
            _warm(predict[0], cached)
            hits = closed_loop(predict, lambda i: [cached[i % CACHED_TEXTS]], cache_concurrency, duration_s, warmup_s)
            out["cache_hits"] = cache_hits = hits.as_dict()
            progress("cache", cache_hits)
    return out


def _saturation(
    service: Callable[[], float],
    clients: int,
    reference: Reference,
    progress: Callable[[str, Mapping[str, object]], None],
) -> dict[str, object]:
    """Rounds of limit, service at `clients`, limit; each round's ratio is the service over the mean
    of the two limits beside it. The closed loop ends only when its requests have been answered,
    so the worker is idle while the limit runs."""
    rounds = []
    for _ in range(reference.rounds):
        before = reference.rate()
        texts_per_s = service()
        after = reference.rate()
        rounds.append(
            {
                "limit_before": round(before, 2),
                "service": round(texts_per_s, 2),
                "limit_after": round(after, 2),
                "ratio": round(texts_per_s / ((before + after) / 2), 3),
            }
        )
        progress("saturation", rounds[-1])
    return {
        "clients": clients,
        "limit_batch_size": reference.batch_size,
        "rounds": rounds,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
    }


def _warm(url: str, texts: list[str]) -> None:
    """Put `texts` in the cache, retrying while a backlog from the last point drains."""
    with httpx.Client(timeout=60) as client:
        for _ in range(WARM_TRIES):
            response = client.post(url, json={"text": texts})
            if response.status_code == 200:
                return
        response.raise_for_status()


def measure_app(
    app: str,
    env: dict[str, str],
    texts: UniqueTexts,
    concurrencies: list[int],
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str, Mapping[str, object]], None],
    texts_per_request: int = 1,
) -> list[dict[str, object]]:
    """A single-process benchmark subject (the naive baseline, the bare endpoint) under uvicorn,
    `texts_per_request` never-seen texts a request."""
    with running() as procs:
        port = free_port()
        procs.start(uvicorn_args(app, port), {"SENTIMENT_LOG_LEVEL": "WARNING", **env})
        procs.wait_ok(f"http://127.0.0.1:{port}/health")
        points: list[dict[str, object]] = []
        for concurrency in concurrencies:
            load = closed_loop(
                f"http://127.0.0.1:{port}/predict",
                lambda _: texts.take(texts_per_request),
                concurrency,
                duration_s,
                warmup_s,
            )
            points.append({**load.as_dict()})
            progress(app.split(".")[-1].split("_")[0], points[-1])
        return points
