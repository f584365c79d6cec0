"""Which workers are alive, read from their heartbeats (for probes and tests; no torch needed)."""

from __future__ import annotations

import socket

from redis import Redis
from rq import Queue
from rq import Worker as RQWorker

from batcher.protocol import Keys, WorkerStatus


def live_workers(redis: Redis, key_prefix: str) -> list[WorkerStatus]:
    """The status of every registered worker whose heartbeat has not expired."""
    keys = Keys(key_prefix)
    ids = [w.decode() for w in redis.smembers(keys.workers)]
    beats = redis.mget([keys.heartbeat(w) for w in ids]) if ids else []
    return [WorkerStatus.decode(b) for b in beats if b is not None]


def worker_alive_on_this_host(redis: Redis, key_prefix: str) -> bool:
    """True when a worker on this host (a Kubernetes pod is one host) has a fresh heartbeat."""
    host = socket.gethostname()
    return any(status.host == host for status in live_workers(redis, key_prefix))


def jobs_worker_alive_on_this_host(redis: Redis, queue: str) -> bool:
    """True when an RQ worker on this host is registered on the jobs queue (RQ refreshes it while it works)."""
    host = socket.gethostname()
    return any(w.hostname == host for w in RQWorker.all(connection=redis, queue=Queue(queue, connection=redis)))
