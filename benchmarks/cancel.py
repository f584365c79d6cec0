"""Benchmark `cancel`: clients that give up, against an overloaded service.

`CLIENTS` closed-loop clients send never-seen texts and give up after `GIVE_UP_S` (closing the
connection, as an HTTP client's read timeout does), far more than the worker can serve: once the
queue holds more than a second of work, the worker, serving in order, reaches only requests whose
clients have gone. One API process and one worker, the queue limit off (every request is queued),
run twice on fresh processes: with the worker's dropping of abandoned work off
(`SENTIMENT_DROP_ABANDONED=false`, the behaviour before it) and on. Each run reports the share of
the texts the model computed for requests nobody waited for any more (the API's
`sentiment_replies_unclaimed_total` against the worker's `sentiment_batch_size_sum`), and the
answers clients got in time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from benchmarks.batch_stats import parse_metrics
from benchmarks.loadgen import closed_loop
from benchmarks.processes import running
from benchmarks.service import redis_server, service_env
from benchmarks.workload import UniqueTexts
from sentiment.embedded import free_port

CLIENTS = 512
GIVE_UP_S = 1.0
MIN_DURATION_S = 10.0  # time for the backlog to outgrow the clients' patience, even with --quick
COUNTERS = (
    "sentiment_replies_unclaimed_total",  # API
    "sentiment_requests_abandoned_total",  # API, all reasons
    "sentiment_batch_size_sum",  # worker: texts computed
    "sentiment_work_items_abandoned_total",  # worker: dropped, queued or held
    "sentiment_abandoned_texts_total",  # worker
    "sentiment_work_items_expired_total",  # worker
)


def counters(*urls: str, names: tuple[str, ...] = COUNTERS) -> dict[str, float]:
    """`names` summed over their labels and the processes at `urls` (their /metrics)."""
    scraped = [parse_metrics(httpx.get(url, timeout=10).text, names) for url in urls]
    return {name: sum(s.get(name, 0.0) for s in scraped) for name in names}


def measure(
    model_dir: Path,
    device: str,
    texts: UniqueTexts,
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str, Mapping[str, object]], None],
    worker_env: dict[str, str],
    texts_per_request: int = 1,
) -> dict[str, object]:
    """The run with dropping off, then on."""
    duration_s, warmup_s = max(duration_s, MIN_DURATION_S), max(warmup_s, 2 * GIVE_UP_S)
    points = []
    for drop in (False, True):
        env = {
            "SENTIMENT_DEVICE": device,
            "SENTIMENT_MAX_QUEUE_DEPTH": "0",
            "SENTIMENT_DROP_ABANDONED": str(drop).lower(),
        }
        points.append(
            {"drop_abandoned": drop, **_run(model_dir, env, worker_env, texts, texts_per_request, duration_s, warmup_s)}
        )
        progress("cancel", points[-1])
    return {
        "clients": CLIENTS,
        "give_up_s": GIVE_UP_S,
        "texts_per_request": texts_per_request,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "points": points,
    }


def _run(
    model_dir: Path,
    settings: dict[str, str],
    worker_env: dict[str, str],
    texts: UniqueTexts,
    texts_per_request: int,
    duration_s: float,
    warmup_s: float,
) -> dict[str, object]:
    """One API and one worker on a fresh Redis under the load; counters read as the measuring window
    opens (the end of the warm-up) and as the load ends."""
    with running() as infra, redis_server(infra) as (redis_url, redis_kind), running() as procs:
        env = service_env(redis_url, model_dir, **settings)
        url = f"http://127.0.0.1:{free_port()}"
        worker_port = free_port()
        procs.start(["-m", "sentiment.cli", "api", "--port", url.rsplit(":", 1)[1]], env)
        procs.start(
            ["-m", "sentiment.cli", "worker"], {**env, **worker_env, "SENTIMENT_METRICS_PORT": str(worker_port)}
        )
        scraped = (f"{url}/metrics", f"http://127.0.0.1:{worker_port}/metrics")
        procs.wait_ok(scraped[1])
        procs.wait_ok(f"{url}/ready")
        window: list[dict[str, float]] = []
        opens = threading.Timer(warmup_s, lambda: window.append(counters(*scraped)))
        opens.start()
        load = closed_loop(
            f"{url}/predict", lambda _: texts.take(texts_per_request), CLIENTS, duration_s, warmup_s, GIVE_UP_S
        )
        opens.join()
        moved = {k: v - window[0][k] for k, v in counters(*scraped).items()}
    computed = moved["sentiment_batch_size_sum"]
    wasted = moved["sentiment_replies_unclaimed_total"] * texts_per_request  # never-seen texts: each computed
    return {
        "redis": redis_kind,
        **load.as_dict(),
        "gave_up": load.gave_up,
        "computed_texts": int(computed),
        "texts_for_nobody": int(wasted),
        "share_for_nobody": round(wasted / computed, 3) if computed else None,
        "requests_abandoned": int(moved["sentiment_requests_abandoned_total"]),
        "items_dropped": int(moved["sentiment_work_items_abandoned_total"]),
        "texts_dropped": int(moved["sentiment_abandoned_texts_total"]),
        "items_expired": int(moved["sentiment_work_items_expired_total"]),
    }
