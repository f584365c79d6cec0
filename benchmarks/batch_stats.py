"""What the worker did during a load point: mean batch size, queue wait and forward time, from counters read
before and after. The worker's Prometheus `/metrics` when it serves one; else its heartbeat's
`WorkerStatus` counters (batch size only: the heartbeat has no queue wait)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from core.protocol import Keys, WorkerStatus
from core.redis_replies import raw

SAMPLES = (
    "sentiment_batch_size_sum",
    "sentiment_batch_size_count",
    "sentiment_queue_wait_seconds_sum",
    "sentiment_queue_wait_seconds_count",
    "sentiment_batch_compute_seconds_sum",
    "sentiment_batch_compute_seconds_count",
)


def parse_metrics(text: str, names: Collection[str] = SAMPLES) -> dict[str, float]:
    """The samples named `names` in a Prometheus exposition, each summed over its labels (by default
    the batch-size, queue-wait and forward-time histograms' sums and counts)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


@dataclass(frozen=True)
class Snapshot:
    source: str  # "metrics" or "heartbeat"
    counters: dict[str, float]


def _ratio(before: Snapshot, after: Snapshot, num: str, den: str, scale: float = 1.0) -> float | None:
    count = after.counters.get(den, 0.0) - before.counters.get(den, 0.0)
    if num not in after.counters or count <= 0:
        return None
    return round((after.counters[num] - before.counters.get(num, 0.0)) / count * scale, 2)


def between(before: Snapshot, after: Snapshot) -> dict[str, object]:
    """Mean texts per forward, mean queue wait and mean forward time (ms; None when the source has no
    such counter)."""
    if before.source == "metrics":
        return {
            "source": "metrics",
            "mean_batch_size": _ratio(before, after, "sentiment_batch_size_sum", "sentiment_batch_size_count"),
            "mean_queue_wait_ms": _ratio(
                before, after, "sentiment_queue_wait_seconds_sum", "sentiment_queue_wait_seconds_count", 1000
            ),
            "mean_forward_ms": _ratio(
                before, after, "sentiment_batch_compute_seconds_sum", "sentiment_batch_compute_seconds_count", 1000
            ),
        }
    return {
        "source": "heartbeat",
        "mean_batch_size": _ratio(before, after, "texts", "batches"),
        "mean_queue_wait_ms": None,
        "mean_forward_ms": None,
    }


class WorkerCounters:
    """Reads the workers' counters, summed; prefers their `/metrics` at `metrics_urls` when all answer."""

    def __init__(self, metrics_urls: list[str], redis_url: str, key_prefix: str) -> None:
        self.metrics_urls = metrics_urls
        self.redis = redis.Redis.from_url(redis_url)
        self.keys = Keys(key_prefix)

    def snapshot(self) -> Snapshot:
        if self.metrics_urls:
            try:
                found = [parse_metrics(httpx.get(url, timeout=5).raise_for_status().text) for url in self.metrics_urls]
                if all(found):
                    summed = {k: sum(f[k] for f in found if k in f) for k in SAMPLES if any(k in f for f in found)}
                    return Snapshot("metrics", summed)
            except httpx.HTTPError:
                pass
        totals = {"texts": 0.0, "batches": 0.0}
        for worker_id in self.redis.smembers(self.keys.workers):
            if beat := self.redis.get(self.keys.heartbeat(raw(worker_id).decode())):
                status = WorkerStatus.decode(beat)
                totals["texts"] += status.texts
                totals["batches"] += status.batches
        return Snapshot("heartbeat", totals)
