"""The API's Prometheus metrics, served at GET /metrics on the API's own port.

Request latency by route template (never the raw path: `/jobs/{job_id}`, one value for every
unknown path), cache hits and misses per text, refused and abandoned requests by reason, replies
nobody waited for, and, read from Redis at scrape time, jobs by state, live workers and webhooks on
the dead-letter list. Metric objects are module-level (one process per API replica) so any module
can count with a one-line call; the names are the contract with the dashboards and alerts in
k8s/monitoring/.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.liveness import live_workers
from core.protocol import Keys

log = logging.getLogger(__name__)
disable_created_metrics()  # `_created` series double the series count and no panel uses them

UNMATCHED_ROUTE = "unmatched"  # every path no route serves (404s): one label value, not one per path
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # anything else is "other"

HTTP_REQUEST_DURATION = Histogram(
    "sentiment_http_request_duration_seconds",
    "HTTP request latency, by route template, method and status.",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15),
)
CACHE_LOOKUPS = Counter(
    "sentiment_cache_lookups", "/predict texts (deduplicated per request) found in the cache or not.", ["result"]
)
CACHE_HITS, CACHE_MISSES = CACHE_LOOKUPS.labels("hit"), CACHE_LOOKUPS.labels("miss")
REQUESTS_REFUSED = Counter(
    "sentiment_requests_refused",
    "Requests refused before any work (counted by api.errors.error_response): overload, rate limit, auth, size.",
    ["reason"],
)
RATE_LIMIT_UNCHECKED = Counter(
    "sentiment_rate_limit_unchecked",
    "Requests let through without a rate-limit check: Redis failed the bucket's script (outage, NOPERM, OOM).",
)
REQUESTS_ABANDONED = Counter(
    "sentiment_requests_abandoned",
    "Requests that stopped waiting for their queued work (`disconnected`: the client went away; `deadline`: "
    "cut at the request timeout), their work items marked abandoned for the workers to drop.",
    ["reason"],
)
REPLIES_UNCLAIMED = Counter(
    "sentiment_replies_unclaimed",
    "Results that reached this API process for a request no longer waiting: work a worker did for nobody.",
)
for _reason in ("disconnected", "deadline"):
    REQUESTS_ABANDONED.labels(_reason)  # every reason shows from the start, at 0


@functools.cache  # bounded (route templates x METHODS x statuses); `labels` takes a lock each call
def _duration(route: str, method: str, status: int) -> Histogram:
    return HTTP_REQUEST_DURATION.labels(route, method, str(status))


class RequestMetrics:
    """ASGI middleware timing every HTTP request into `sentiment_http_request_duration_seconds`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router records the matched route in the (shared) scope; its path is the template.
            # Answered before routing (no route, or refused by a middleware): `unmatched`.
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            method = scope["method"] if scope["method"] in METHODS else "other"
            _duration(route, method, status).observe(time.perf_counter() - started)


class ServiceState(Collector):
    """`sentiment_jobs{status}` (RQ's queue and registries), `sentiment_workers_live` and
    `sentiment_webhook_dead_letters`, at scrape time.

    Two Redis round trips and no cleanup (counts are as RQ's registries hold them). A scrape while
    Redis is unreachable leaves these out instead of failing the whole scrape.
    """

    def __init__(self, redis: Redis, queue: Queue, key_prefix: str) -> None:
        self.redis = redis
        self.queue = queue
        self.key_prefix = key_prefix

    def collect(self) -> Iterator[GaugeMetricFamily]:
        q = self.queue
        # The five states GET /jobs/{id} reports; deferred and scheduled jobs wait to run: queued.
        registries = {
            "queued": [q.deferred_job_registry, q.scheduled_job_registry],
            "started": [q.started_job_registry],
            "finished": [q.finished_job_registry],
            "failed": [q.failed_job_registry],
            "canceled": [q.canceled_job_registry],
        }
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.llen(q.key)
                for group in registries.values():
                    for registry in group:
                        pipe.zcard(registry.key)
                pipe.llen(Keys(self.key_prefix).webhook_dead_letters)
                counts = iter(pipe.execute())
            waiting = next(counts)
            by_status = {status: sum(next(counts) for _ in group) for status, group in registries.items()}
            dead_letters = next(counts)
            by_status["queued"] += waiting
            live = len(live_workers(self.redis, self.key_prefix))
        except RedisError as exc:
            log.warning("jobs and workers not sampled: redis unreachable (%s)", exc)
            return
        jobs = GaugeMetricFamily("sentiment_jobs", "Bulk jobs by state (RQ queue and registries).", labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "sentiment_workers_live", "Model workers with a fresh heartbeat (what /ready requires).", value=live
        )
        yield GaugeMetricFamily(
            "sentiment_webhook_dead_letters",
            'Job webhooks that gave up, kept on the dead-letter list (docs/jobs.md, "Webhooks").',
            value=dead_letters,
        )


def scrape_state(redis: Redis, queue: Queue, key_prefix: str) -> CollectorRegistry:
    """A registry of the app's Redis-backed collectors (one per app: tests build many apps per process)."""
    registry = CollectorRegistry()
    registry.register(ServiceState(redis, queue, key_prefix))
    return registry


router = APIRouter(tags=["operations"])


# Plain `def`: the collectors make (short, synchronous) Redis calls, in FastAPI's threadpool.
@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format: this process's metrics plus the app's Redis-backed ones."""
    state: CollectorRegistry = request.app.state.scrape
    return Response(generate_latest(REGISTRY) + generate_latest(state), media_type=CONTENT_TYPE_LATEST)
