"""A Redis at its `maxmemory`, on a redis-server of the test's own: what the memory policy may evict
(cache) and what it never may (state), and what the service does when a write is refused
(docs/reliability.md, "When Redis is full")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from batcher.heartbeat import Heartbeat
from batcher.queue import WorkQueue
from core.liveness import live_workers
from core.protocol import Keys, ModelInfo, WorkerStatus
from tests.conftest import RedisServer, evicting_cache

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

