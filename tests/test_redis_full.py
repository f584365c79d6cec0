"""A Redis at its `maxmemory`, on a redis-server of the test's own: what the memory policy may evict
(cache) and what it never may (state), and what the service does when a write is refused
(docs/reliability.md, "When Redis is full")."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from api.job_store import JobStore
from batcher.bulk import Bulk
from batcher.heartbeat import Heartbeat
from batcher.jobs import JobsWorker, serve_jobs
from batcher.queue import WorkQueue
from batcher.worker import Worker
from core.liveness import live_workers
from core.protocol import Keys, ModelInfo, WorkerStatus, WorkItem, new_id
from core.settings import Settings
from model_store.classifier import Classifier
from tests.conftest import RedisServer, evicting_cache, hold_forwards, start_worker, wait_for
from tests.test_worker import announcements

Caplog = pytest.LogCaptureFixture

KEYS = Keys("full")
MODEL = ModelInfo(name="m", version="v", labels=["NEGATIVE", "POSITIVE"], device="cpu", dtype="fp32")


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of a Redis that evicts keys with an expiry (the policy `sentiment serve` and
    k8s/base/redis.yaml ship), 8 MiB above what it holds now."""
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "volatile-lru")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 8 * 2**20)
    yield client
    client.close()


@pytest.fixture
def full(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of a Redis that evicts nothing: once at its `maxmemory` (set by the test), full."""
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "noeviction")
    yield client
    client.close()


def test_a_live_workers_heartbeat_is_never_evicted_for_the_cache(client: redis.Redis) -> None:
    # Written first, it is the least recently used key: a heartbeat with an expiry would be among
    # the first evicted, and the death watch would reclaim a live worker's work.
    queue = WorkQueue(client, KEYS, "alive")
    status = WorkerStatus(id="alive", host="h", pid=1, model_version="v", started_at=0.0)
    heartbeat = Heartbeat(client, KEYS, queue, 60.0, lambda: status, lambda: True, MODEL)
    heartbeat.beat()
    client.lpush(KEYS.processing("alive"), b"held")
    evicting_cache(client)
    assert [s.id for s in live_workers(client, KEYS.prefix)] == ["alive"]
    assert WorkQueue(client, KEYS, "another").reclaim_dead() == 0
    assert client.lrange(KEYS.processing("alive"), 0, -1) == [b"held"]


def test_a_full_redis_takes_the_answers_without_their_cache_entries_and_nothing_is_computed_twice(
    full: redis.Redis, settings: Settings, classifier: Classifier, monkeypatch: pytest.MonkeyPatch, caplog: Caplog
) -> None:
    # At maxmemory with nothing it may evict, Redis refuses every transaction, the reply's too: the
    # answer goes on its channel, the item is acknowledged, and its cache entry and result key are not
    # written; the worker goes on, and caches again once Redis has room.
    client = full
    keys = Keys(settings.key_prefix)
    worker = Worker(settings, client, classifier)
    forwarding, release = hold_forwards(monkeypatch, classifier)
    pubsub = client.pubsub()
    pubsub.subscribe(keys.reply_channel("api"))
    pubsub.get_message(timeout=1)
    caplog.set_level(logging.INFO)
    thread = start_worker(worker)
    try:
        first = queued(client, keys, "computed while Redis fills")
        wait_for("the forward to start", forwarding.is_set)
        client.config_set("maxmemory", 1)  # full: every write that needs memory is refused
        release.set()
        assert wait_for("the answer", lambda: announcements(pubsub)) == [first.id]
        assert client.llen(keys.processing(worker.id)) == 0 and not client.exists(keys.result(first.id))
        assert not client.keys(keys.cache("*", "computed while Redis fills").rsplit(":", 1)[0] + ":*")
        client.config_set("maxmemory", 0)
        second = queued(client, keys, "computed once Redis has room")
        assert wait_for("the second answer", lambda: announcements(pubsub)) == [second.id]
        assert client.exists(keys.result(second.id))
        assert thread.is_alive() and worker.lanes.computed == 2
    finally:
        worker.stop()
        thread.join(10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if not w.startswith("redis failed (OutOfMemoryError)")] == [
        "redis is full (OutOfMemoryError): answers sent without 2 cache and result writes"
    ]  # (the takes meanwhile back off as in an outage)


def queued(client: redis.Redis, keys: Keys, text: str) -> WorkItem:
    now = time.time()
    item = WorkItem(new_id(), [text], now, now + 30, keys.reply_channel("api"))
    client.lpush(keys.queue, item.encode())
    return item


def test_a_job_whose_predictions_do_not_fit_fails_saying_so_once_and_the_next_one_finishes(
    redis_server: RedisServer,
    full: redis.Redis,
    settings: Settings,
    classifier: Classifier,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Caplog,
) -> None:
    # Redis fills (other jobs' texts, nothing it may evict) while a job runs: its finish, results and
    # all, is refused. It was retried, computing every text again to the same end, and the jobs
    # worker quit with a traceback. Now it fails with a reason a person can act on, its texts given
    # up to make room for that; the jobs worker goes on and, with room again, finishes the next.
    client = full
    settings = settings.model_copy(update={"jobs_max_texts": 5000})
    store = JobStore(client, settings)
    worker = Worker(settings, redis.Redis.from_url(redis_server.url), classifier)
    parts: list[int] = []
    bulk = Bulk(settings, client)
    send = bulk.send
    monkeypatch.setattr(bulk, "send", lambda texts: parts.append(len(texts)) or send(texts))
    finish = JobsWorker.handle_job_success

    def filled_as_it_finishes(self: JobsWorker, *args: Any, **kwargs: Any) -> None:
        if kwargs["job"].id == big:
            client.config_set("maxmemory", client.info("memory")["used_memory"] + 65536)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(JobsWorker, "handle_job_success", filled_as_it_finishes)
    caplog.set_level(logging.INFO)
    thread = start_worker(worker)
    try:
        big = store.create([f"review {new_id()} {new_id()}" for _ in range(5000)])  # (texts that compress little)
        serve_jobs(settings, bulk, client, burst=True)
        view = store.view(big)
        assert (view["status"], view["progress"]["done"]) == ("failed", 5000)
        assert view["error"].startswith("its 5,000 predictions did not fit in Redis, which is full (OutOfMemoryError")
        assert sum(parts) == 5000  # computed once: not retried
        client.config_set("maxmemory", 0)
        small = store.create(["once Redis has room"])
        serve_jobs(settings, bulk, client, burst=True)
        assert store.view(small)["status"] == "finished"
    finally:
        worker.stop()
        thread.join(10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text[-3000:]
    assert "stopped unasked" not in caplog.text


def test_a_job_whose_part_a_full_redis_refuses_is_retried_without_a_traceback(
    full: redis.Redis, settings: Settings, classifier: Classifier, monkeypatch: pytest.MonkeyPatch, caplog: Caplog
) -> None:
    # Redis fills as a job queues its part (its LPUSH refused): RQ logged the error with a traceback
    # as a bug's. It is a Redis that refuses, as when it is down: one line, and the job retried, which
    # finishes once there is room (its failure write waits for that room meanwhile).
    client = full
    store = JobStore(client, settings)
    worker = Worker(settings, client, classifier)
    bulk = Bulk(settings, client)
    send = bulk.send
    filled = []

    def filled_as_it_queues(texts: list[str]) -> Any:
        if not filled:
            filled.append(client.config_set("maxmemory", 1))
            threading.Timer(0.5, client.config_set, ("maxmemory", 0)).start()  # room again, a moment later
        return send(texts)

    monkeypatch.setattr(bulk, "send", filled_as_it_queues)
    caplog.set_level(logging.INFO)
    thread = start_worker(worker)
    try:
        job_id = store.create(["queued as Redis fills"])
        serve_jobs(settings, bulk, client, burst=True)
        view = store.view(job_id)
        assert view["status"] == "finished" and len(view["predictions"]) == 1
    finally:
        worker.stop()
        thread.join(10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text[-3000:]
    [line] = [r.getMessage() for r in caplog.records if "while it ran" in r.getMessage()]
    assert line == f"job {job_id}: redis failed while it ran (OutOfMemoryError); retried"
