"""The workers' Prometheus metrics: what batching achieves, what it costs, and how far behind it is.

Metric objects live here (per process, in prometheus-client's default registry) so the batching
code only makes one-line calls; `serve` exposes them on `SENTIMENT_METRICS_PORT` (the micro-batching
worker) or `SENTIMENT_JOBS_METRICS_PORT` (the bulk-jobs worker). The names are the contract with
the dashboards and alerts in k8s/monitoring/ (tests/test_metrics.py checks they agree).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram, Info, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from core.protocol import Keys

if TYPE_CHECKING:
    from batcher.work import Text
    from model_store.classifier import Classifier

log = logging.getLogger(__name__)
disable_created_metrics()  # `_created` series double the series count and no panel uses them

T = TypeVar("T")

BATCH_SIZE = Histogram(
    "sentiment_batch_size",
    "Texts per model forward.",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256),
)
BATCH_COMPUTE_SECONDS = Histogram(
    "sentiment_batch_compute_seconds",
    "Model time per forward (padding, forward, softmax).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5),
)
QUEUE_WAIT_SECONDS = Histogram(
    "sentiment_queue_wait_seconds",
    "From a work item's enqueue (API clock) to the start of its first batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKENS = Counter(
    "sentiment_tokens",
    "Token positions computed: real = the texts' tokens, padded = what the forward computed (texts x the "
    "batch's longest; a packed forward computes its real tokens only).",
    ["kind"],
)
WORK_ITEMS_EXPIRED = Counter(
    "sentiment_work_items_expired", "Work items skipped because their deadline passed while queued."
)
WORK_ITEMS_ABANDONED = Counter(
    "sentiment_work_items_abandoned",
    "Work items dropped because nobody waits for them any more (their client went away, or the deadline cut "
    "the wait): when=queued at the take, when=held taken but not yet in a forward.",
    ["when"],
)
WORK_ITEMS_LATE = Counter(
    "sentiment_work_items_late",
    "Work items dropped unstarted at the plan because the forward they would ride in could not end by their "
    "deadline (the `deadline` overload policy); answered 504, late.",
)
BULK_TEXTS = Counter(
    "sentiment_bulk_texts",
    "Texts computed for bulk work alone (/jobs parts): of `sentiment_batch_size_sum`, those no interactive "
    "request waited for.",
)
ABANDONED_TEXTS = Counter(
    "sentiment_abandoned_texts",
    "Texts left out of the forwards because every request that asked for them was abandoned.",
)
LONG_TEXTS = Counter(
    "sentiment_long_texts",
    "Texts longer than the model's length, by what they got (SENTIMENT_LONG_TEXTS): truncated (the first "
    "tokens only), rejected (a 422), chunked (overlapping chunks, their logits pooled).",
    ["handling"],
)
WORKER_BUSY_SECONDS = Counter(
    "sentiment_worker_busy_seconds", "Seconds the model spent on batches (or job parts); rate = busy ratio."
)
STAGE_CPU_SECONDS = Counter(
    "sentiment_worker_stage_cpu_seconds",
    "CPU seconds each stage of the worker spent, from its threads' own clocks: "
    "take (Redis, decode, cache check, tokenize), plan (choosing forwards), forward (the engine), reply (encode, write).",
    ["stage"],
)
MODEL = Info("sentiment_model", "The model this process serves: name, version, device, dtype and engine.")
for _kind in ("real", "padded"):
    TOKENS.labels(_kind)
for _handling in ("truncated", "rejected", "chunked"):
    LONG_TEXTS.labels(_handling)
for _stage in ("take", "plan", "forward", "reply"):
    STAGE_CPU_SECONDS.labels(_stage)
for _when in ("queued", "held"):
    WORK_ITEMS_ABANDONED.labels(_when)


def describe_model(c: Classifier) -> None:
    """Publish what runs the model, as `sentiment_model_info`; `/model` on the API shows the same but
    the engine, which a worker's log and this metric tell (`auto` may fall back to torch)."""
    MODEL.info(
        {"name": c.name, "version": c.version, "device": str(c.device), "dtype": c.dtype_name, "engine": c.engine.name}
    )


def timed_forward(forward: Callable[[list[list[int]], bool], T], batch: list[list[int]], packed: bool) -> T:
    """`forward(batch, packed)`, recording its size, model time and real vs computed token positions."""
    started = time.perf_counter()
    result = forward(batch, packed)
    BATCH_COMPUTE_SECONDS.observe(time.perf_counter() - started)
    BATCH_SIZE.observe(len(batch))
    real = sum(map(len, batch))
    TOKENS.labels("real").inc(real)
    TOKENS.labels("padded").inc(real if packed else len(batch) * max(map(len, batch), default=0))
    return result


def bulk_computed(texts: Iterable[Text]) -> None:
    """Count the texts of a computed forward that only bulk work waited for (`BULK_TEXTS`)."""
    if bulk := sum(1 for text in texts if all(held.bulk for held, _ in text.waiters)):
        BULK_TEXTS.inc(bulk)


def forward_started(texts: Iterable[Text]) -> None:
    """Record the queue wait of every work item whose first texts go into the forward starting now."""
    now = time.time()
    for text in texts:
        for held, _ in text.waiters:
            if not held.started:
                held.started = True
                QUEUE_WAIT_SECONDS.observe(max(now - held.item.enqueued_at, 0.0))


class Busy:
    """Time with at least one batch inside (the busy ratio is its rate): a worker with forward lanes
    runs its next batch beside the last one, and that time counts once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._since = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._since = time.perf_counter()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    WORKER_BUSY_SECONDS.inc(time.perf_counter() - self._since)


busy = Busy()


class QueueDepth(Collector):
    """`sentiment_queue_depth`: work items waiting in the Redis queue, read (LLEN) at scrape time.

    A scrape while Redis is unreachable leaves the gauge out instead of failing the whole scrape.
    """

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def describe(self) -> Sequence[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depth = self.redis.llen(self.keys.queue)
        except RedisError as exc:
            log.warning("queue depth not sampled: redis unreachable (%s)", exc)
            return
        yield self._family(depth)

    @staticmethod
    def _family(value: float | None = None) -> GaugeMetricFamily:
        family = GaugeMetricFamily("sentiment_queue_depth", "Work items waiting in the Redis queue (read at scrape).")
        if value is not None:
            family.add_metric([], value)
        return family


def serve(host: str, port: int, *collectors: Collector) -> None:
    """Expose this process's metrics (plus `collectors`) over HTTP on `host`:`port`; port 0 disables.

    A port already taken is logged, not fatal: a worker that cannot be scraped still serves.
    """
    if not port:
        return
    for collector in collectors:
        REGISTRY.register(collector)
    try:
        start_http_server(port, host)
    except OSError as exc:
        log.error("metrics not served: cannot listen on %s:%d (%s)", host, port, exc)
        return
    log.info("metrics on %s:%d/metrics", host, port)
