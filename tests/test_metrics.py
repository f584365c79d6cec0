"""Prometheus metrics: they move with the work they describe, and the dashboards query only real ones.

In process (fakeredis, tiny model) for the exact values; one end-to-end test scrapes the real `api`
and `worker` processes, and checks every `sentiment_*` name the Grafana dashboard and the alert
rules query against what those processes export.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import httpx
import pytest
import redis as sync_redis
import yaml
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from api.app import create_app
from batcher import metrics as worker_metrics
from batcher.worker import Worker
from core.protocol import Keys, WorkItem, new_id
from core.settings import Settings
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from tests.conftest import REPO, Service, start_service, start_worker, wait_for

MONITORING = REPO / "k8s" / "monitoring"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: str) -> Samples:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def work_item(keys: Keys, *texts: str, deadline_in_s: float = 30) -> WorkItem:
    now = time.time()
    return WorkItem(new_id(), list(texts), now, now + deadline_in_s, keys.reply_channel("nobody"))


@pytest.fixture
def api(settings: Settings, fake_server: fakeredis.FakeServer) -> Iterator[TestClient]:
    app = create_app(
        settings, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis(server=fake_server)
    )
    with TestClient(app) as client:
        yield client


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


# ---------------------------------------------------------------- API


def test_api_counts_a_miss_then_a_hit_by_route_template_and_status(api: TestClient, worker: Worker) -> None:
    start_worker(worker)
    before = scrape(api)
    first = api.post("/predict", json={"text": ["one", "two", "one"]})
    again = api.post("/predict", json={"text": ["two", "one"]})
    assert [first.headers["x-cache"], again.headers["x-cache"]] == ["miss", "hit"]
    job_id = new_id()
    assert api.get(f"/jobs/{job_id}").status_code == 404
    assert api.get("/no/such/path").status_code == 404
    after = scrape(api)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Per text, deduplicated within a request: the miss looked up 2 texts, the hit 2.
    assert moved("sentiment_cache_lookups_total", result="miss") == 2
    assert moved("sentiment_cache_lookups_total", result="hit") == 2
    latency = "sentiment_http_request_duration_seconds"
    assert moved(f"{latency}_count", route="/predict", method="POST", status="200") == 2
    assert moved(f"{latency}_bucket", route="/predict", method="POST", status="200", le="+Inf") == 2
    assert moved(f"{latency}_sum", route="/predict", method="POST", status="200") > 0
    assert moved(f"{latency}_count", route="/jobs/{job_id}", method="GET", status="404") == 1
    assert moved(f"{latency}_count", route="unmatched", method="GET", status="404") == 1
    routes = {dict(labels)["route"] for name, labels in after if name == f"{latency}_count"}
    assert not any(job_id in r or r == "/no/such/path" for r in routes), routes
    # Refusal reasons are exported from the start (api.errors counts them), at zero here.
    for reason in ("overloaded", "rate_limited", "unauthorized", "forbidden", "too_large"):
        assert ("sentiment_requests_refused_total", frozenset({("reason", reason)})) in after
    # /metrics itself stays out of the API's schema.
    assert "/metrics" not in api.get("/openapi.json").json()["paths"]


def test_refusals_are_counted_by_reason_and_timed(settings: Settings, fake_server: fakeredis.FakeServer) -> None:
    keyed = settings.model_copy(update={"api_keys": [SecretStr("k" * 16)], "max_texts": 1, "max_chars": 10})
    app = create_app(
        keyed, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis(server=fake_server)
    )
    key = {"X-API-Key": "k" * 16}
    with TestClient(app) as client:
        before = scrape_with(client, key)
        assert client.post("/predict", json={"text": ["x"]}).status_code == 401
        assert client.post("/predict", json={"text": ["x"]}, headers={"X-API-Key": "w" * 16}).status_code == 403
        assert client.post("/predict", content=b"x" * 100_000, headers=key).status_code == 413
        after = scrape_with(client, key)
    refused = "sentiment_requests_refused_total"
    for reason in ("unauthorized", "forbidden", "too_large"):
        assert value(after, refused, reason=reason) - value(before, refused, reason=reason) == 1
    # Answered before routing, so under the one label for unrouted requests.
    latency = "sentiment_http_request_duration_seconds_count"
    unrouted = {"route": "unmatched", "method": "POST", "status": "401"}
    assert value(after, latency, **unrouted) - value(before, latency, **unrouted) == 1


def scrape_with(client: TestClient, headers: dict[str, str]) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    return samples(response.text)


def test_jobs_gauge_shows_a_queued_job_and_live_workers(api: TestClient, worker: Worker) -> None:
    scraped = scrape(api)
    assert {s: value(scraped, "sentiment_jobs", status=s) for s in ("queued", "started", "finished")} == {
        "queued": 0,
        "started": 0,
        "finished": 0,
    }
    assert value(scraped, "sentiment_workers_live") == 0
    assert api.post("/jobs", json={"text": ["a", "b"]}).status_code == 202
    start_worker(worker)
    wait_for("a worker heartbeat", lambda: value(scrape(api), "sentiment_workers_live") == 1)
    scraped = scrape(api)
    assert value(scraped, "sentiment_jobs", status="queued") == 1  # no jobs worker runs here
    assert value(scraped, "sentiment_jobs", status="failed") == 0


def test_a_redis_error_during_a_scrape_leaves_out_only_the_redis_backed_metrics(settings: Settings) -> None:
    down = sync_redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(), jobs_redis=down)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        scraped = scrape(client)
    names = {name for name, _ in scraped}
    assert "sentiment_http_request_duration_seconds_count" in names
    assert not {"sentiment_jobs", "sentiment_workers_live"} & names


# ---------------------------------------------------------------- worker


def test_worker_metrics_follow_a_batch_and_an_expired_item(
    worker: Worker, redis: fakeredis.FakeRedis, settings: Settings, classifier: Classifier
) -> None:
    keys = Keys(settings.key_prefix)
    # Lengths a token or two apart: too little difference to cut the batch into forwards (whatever
    # the engine's per-call cost), enough that one packed row beats padding them (DistilBERT packs).
    texts = ["a good movie", "a good movies", "a good movie, fun"]
    lengths = [len(ids) for ids in classifier.tokenize(texts)]
    assert len(set(lengths)) == 3
    before = samples(generate_latest(REGISTRY).decode())
    expired = work_item(keys, "too late", deadline_in_s=-1)
    item = work_item(keys, *texts)
    redis.lpush(keys.queue, expired.encode(), item.encode())  # FIFO: the expired one is taken first
    start_worker(worker)
    wait_for("the result", lambda: redis.exists(keys.result(item.id)) == 1)
    after = samples(generate_latest(REGISTRY).decode())

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert worker.lanes.forwards == 1  # one forward of the three texts
    assert moved("sentiment_batch_size_count") == 1 and moved("sentiment_batch_size_sum") == 3
    assert moved("sentiment_tokens_total", kind="real") == sum(lengths)
    assert classifier.cost.packs and sum(lengths) < 3 * max(lengths)
    assert moved("sentiment_tokens_total", kind="padded") == sum(lengths)  # packed: no position is padding
    assert moved("sentiment_batch_compute_seconds_count") == 1
    assert moved("sentiment_queue_wait_seconds_count") == 1  # the expired item never reached a batch
    assert moved("sentiment_queue_wait_seconds_sum") >= 0
    assert moved("sentiment_work_items_expired_total") == 1
    assert moved("sentiment_worker_busy_seconds_total") > 0
    assert redis.exists(keys.result(expired.id)) == 0
    for stage in ("take", "plan", "forward", "reply"):  # every stage's thread counted its CPU
        assert moved("sentiment_worker_stage_cpu_seconds_total", stage=stage) > 0, stage
    c = classifier
    described = {"name": c.name, "version": c.version, "device": "cpu", "dtype": c.dtype_name, "engine": c.engine.name}
    assert after[("sentiment_model_info", frozenset(described.items()))] == 1


def test_queue_depth_is_read_at_scrape_time_and_a_redis_error_drops_only_it(
    redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    registry = CollectorRegistry()
    registry.register(worker_metrics.QueueDepth(redis, keys))
    assert registry.get_sample_value("sentiment_queue_depth") == 0
    redis.lpush(keys.queue, work_item(keys, "x").encode(), work_item(keys, "y").encode())
    assert registry.get_sample_value("sentiment_queue_depth") == 2
    down = sync_redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    broken = CollectorRegistry()
    broken.register(worker_metrics.QueueDepth(down, keys))
    assert broken.get_sample_value("sentiment_queue_depth") is None
    assert generate_latest(broken) == b""


# ---------------------------------------------------------------- real processes, dashboards, alerts


def promql_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of the dashboard and every alert rule."""
    dashboard = json.loads((MONITORING / "sentiment-dashboard.json").read_text())
    found = []

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    (rules,) = [d for d in yaml.safe_load_all((MONITORING / "prometheus-rules.yaml").read_text()) if d]
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            found.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return found


def queried_metric_names(expr: str) -> set[str]:
    """`sentiment_*` series names a PromQL expression selects (label values in quotes are skipped)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\bsentiment_[a-zA-Z0-9_]+", without_strings))


def test_queried_names_ignore_label_values_and_keep_suffixes() -> None:
    expr = 'sum(rate(sentiment_batch_size_bucket{job="sentiment_not_a_metric"}[5m])) / sentiment_jobs'
    assert queried_metric_names(expr) == {"sentiment_batch_size_bucket", "sentiment_jobs"}


def test_dashboard_and_alerts_query_only_series_the_service_exports(redis_url: str, tiny_model_dir: Path) -> None:
    """Scrape the real `api` and `worker` processes after real work, then check every query.

    A name is compared with the exported *series* names (`_bucket`, `_sum`, `_count`, `_total`
    included), so `rate(sentiment_batch_size[5m])` (a histogram has no such series) fails.
    """
    port = free_port()
    prefix = f"metrics-{new_id()[:8]}"
    service = start_service(redis_url, tiny_model_dir, prefix, SENTIMENT_METRICS_PORT=str(port))
    try:
        client = sync_redis.Redis.from_url(redis_url)
        keys = Keys(prefix)
        client.lpush(keys.queue, work_item(keys, "expired", deadline_in_s=-1).encode())
        for _ in range(2):  # a miss, then a hit
            assert httpx.post(f"{service.url}/predict", json={"text": ["good", "bad"]}, timeout=30).status_code == 200
        assert httpx.post(f"{service.url}/jobs", json={"text": ["queued job"]}).status_code == 202
        worker_url = f"http://127.0.0.1:{port}/metrics"
        wait_for(
            "the expired item",
            lambda: value(samples(httpx.get(worker_url).text), "sentiment_work_items_expired_total") == 1,
        )
        exported_by = {
            "api": samples(httpx.get(f"{service.url}/metrics").text),
            "worker": samples(httpx.get(worker_url).text),
        }
    finally:
        service.stop()

    worker = exported_by["worker"]
    assert value(worker, "sentiment_batch_size_count") >= 1
    assert value(worker, "sentiment_tokens_total", kind="real") > 0
    assert ("sentiment_queue_depth", frozenset()) in worker
    api = exported_by["api"]
    assert value(api, "sentiment_jobs", status="queued") == 1
    assert value(api, "sentiment_cache_lookups_total", result="hit") == 2
    # Each side exports only its own metrics (one registry per process).
    assert not any(name.startswith("sentiment_batch") for name, _ in api)
    assert not any(name.startswith("sentiment_http") for name, _ in worker)

    exported = {name for scraped in exported_by.values() for name, _ in scraped}
    expressions = promql_expressions()
    assert len(expressions) >= 12
    queried: set[str] = set()
    for where, expr in expressions:
        names = queried_metric_names(expr)
        assert names - exported == set(), f"{where} queries series nobody exports: {expr}"
        queried |= names
    # And the dashboard shows every family the service exports (nothing measured goes unseen).
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in exported if n.startswith("sentiment_")}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in queried}
    assert families <= shown, families - shown


def listening_on(port: int) -> set[str]:
    """The IPv4 addresses a socket of this machine listens on at `port` (Linux's /proc/net/tcp)."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, at = local.split(":")
        if state == "0A" and int(at, 16) == port:  # (0A: LISTEN)
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.parametrize(("host", "address"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")], ids=["default", "0.0.0.0"])
def test_the_workers_serve_metrics_on_this_machine_alone_unless_told(
    host: str | None, address: str, redis_url: str, tiny_model_dir: Path
) -> None:
    # As the API does on 127.0.0.1 unless told otherwise; the images and Kubernetes say 0.0.0.0.
    worker_port, jobs_port = free_port(), free_port()
    service = Service(
        redis_url,
        tiny_model_dir,
        f"metrics-{new_id()[:8]}",
        SENTIMENT_METRICS_PORT=str(worker_port),
        SENTIMENT_JOBS_METRICS_PORT=str(jobs_port),
        **({"SENTIMENT_METRICS_HOST": host} if host else {}),
    )
    service.start("worker")
    service.start("jobs-worker")
    try:
        for port in (worker_port, jobs_port):
            assert wait_for(f"metrics on port {port}", lambda port=port: listening_on(port)) == {address}
            assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        service.stop()


def test_busy_time_counts_overlapping_batches_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with forward lanes runs its next batch beside the last: the busy ratio stays <= 1."""
    clock = iter([10.0, 20.0, 21.0, 22.0])  # read when the first batch enters and the last leaves
    monkeypatch.setattr(worker_metrics.time, "perf_counter", lambda: next(clock))
    busy = worker_metrics.Busy()
    before = REGISTRY.get_sample_value("sentiment_worker_busy_seconds_total") or 0.0
    with busy():  # 10 -> 20
        with busy():  # inside the first: no time of its own
            pass
    with busy():  # 21 -> 22
        pass
    assert REGISTRY.get_sample_value("sentiment_worker_busy_seconds_total") - before == pytest.approx(11.0)
